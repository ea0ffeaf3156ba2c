#include "io/safetensors.h"

#include <algorithm>
#include <cstring>
#include <functional>

#include "io/atomic_file.h"
#include "io/mmap_file.h"
#include "io/strict_json.h"

namespace dsv3 {

namespace {

using json = nlohmann::json;

struct FormatDtype {
  const char* name;
  int bits;
};
// Every dtype of the safetensors format, in the reference's order (increasing alignment).
constexpr FormatDtype kFormatDtypes[] = {
    {"BOOL", 8},         {"F4", 4},           {"F6_E2M3", 6}, {"F6_E3M2", 6}, {"U8", 8},
    {"I8", 8},           {"F8_E5M2", 8},      {"F8_E4M3", 8}, {"F8_E8M0", 8}, {"F8_E4M3FNUZ", 8},
    {"F8_E5M2FNUZ", 8},  {"I16", 16},         {"U16", 16},    {"F16", 16},    {"BF16", 16},
    {"I32", 32},         {"U32", 32},         {"F32", 32},    {"C64", 64},    {"F64", 64},
    {"I64", 64},         {"U64", 64}};

std::string format_dtype_list() {
  std::string s;
  for (const FormatDtype& d : kFormatDtypes) {
    if (!s.empty()) s += ", ";
    s += d.name;
  }
  return s;
}

std::string cat_shape(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

// Parses one tensor entry of the header; `at` is "<file>: tensor '<name>'".
TensorInfo parse_entry(const std::string& name, const json& v, const std::string& at) {
  if (!v.is_object())
    input_error(at, ": tensor entry not an object: found a ", json_type_name(v),
                ", expected {\"dtype\", \"shape\", \"data_offsets\"}");
  for (const char* k : {"dtype", "shape", "data_offsets"})
    if (!v.contains(k))
      input_error(at, ": tensor entry missing key: no \"", k,
                  "\" (expected exactly dtype, shape, data_offsets)");
  for (auto it = v.begin(); it != v.end(); ++it)
    if (it.key() != "dtype" && it.key() != "shape" && it.key() != "data_offsets")
      input_error(at, ": tensor entry unknown key: ", quote_name(it.key()),
                  " (expected exactly dtype, shape, data_offsets)");

  TensorInfo t;
  t.name = name;
  const json& dt = v["dtype"];
  int bits = 0;
  if (dt.is_string()) {
    t.dtype_name = dt.get<std::string>();
    for (const FormatDtype& d : kFormatDtypes)
      if (t.dtype_name == d.name) bits = d.bits;
  }
  if (bits == 0)
    input_error(at, ": unknown dtype: ", dt.is_string() ? quote_name(t.dtype_name) : dt.type_name(),
                " is not a safetensors dtype (", format_dtype_list(), ")");
  DType ours;
  if (parse_dtype(t.dtype_name, &ours)) t.dtype = ours;

  auto uint_list = [&](const json& a, const char* key, const char* rule) {
    std::vector<uint64_t> out;
    if (!a.is_array()) input_error(at, ": ", rule, ": \"", key, "\" is a ", json_type_name(a),
                                   ", expected an array of non-negative integers");
    for (const json& x : a) {
      if (!x.is_number_unsigned())
        input_error(at, ": ", rule, ": \"", key, "\" holds a ", json_type_name(x),
                    ", expected non-negative integers");
      uint64_t u = x.get<uint64_t>();
      if (u > kSafetensorsMaxInt)
        input_error(at, ": ", rule, ": \"", key, "\" holds ", u, ", above the format's limit 2^48-1");
      out.push_back(u);
    }
    return out;
  };
  for (uint64_t d : uint_list(v["shape"], "shape", "bad shape")) t.shape.push_back(int64_t(d));
  std::vector<uint64_t> off = uint_list(v["data_offsets"], "data_offsets", "bad data_offsets");
  if (off.size() != 2)
    input_error(at, ": bad data_offsets: ", off.size(), " values, expected [begin, end]");
  if (off[1] < off[0])
    input_error(at, ": bad data_offsets: end ", off[1], " is before begin ", off[0]);
  t.begin = off[0];
  t.end = off[1];

  // numel × bits must not overflow, checked in file order (as the reference does), so a zero
  // dimension late in the shape does not excuse an overflowing prefix.
  unsigned long long numel = 1, total_bits = 0;
  for (int64_t d : t.shape)
    if (mul_overflows(numel, uint64_t(d), &numel) || numel > uint64_t(INT64_MAX))
      input_error(at, ": shape overflow: the product of shape ", cat_shape(t.shape),
                  " does not fit in 63 bits");
  if (mul_overflows(numel, unsigned(bits), &total_bits))
    input_error(at, ": shape overflow: ", numel, " elements of ", t.dtype_name,
                " overflow 64 bits of size");
  if (total_bits % 8 != 0)
    input_error(at, ": sub-byte size: ", numel, " elements of ", bits, "-bit ", t.dtype_name,
                " do not fill a whole number of bytes");
  if (t.nbytes() != total_bits / 8)
    input_error(at, ": byte size mismatch: data_offsets [", t.begin, ", ", t.end, "] hold ",
                t.nbytes(), " bytes, but shape ", cat_shape(t.shape), " of ", t.dtype_name,
                " needs ", total_bits / 8);
  return t;
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;  // validated at parse time not to overflow
  return n;
}

SafetensorsHeader parse_safetensors(const uint8_t* data, size_t size, const std::string& where) {
  if (size < 8)
    input_error(where, ": file too small: ", size,
                " bytes, a safetensors file starts with an 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
  if (n > kSafetensorsMaxHeader)
    input_error(where, ": header too large: header length ", n, " exceeds the limit ",
                kSafetensorsMaxHeader);
  if (n > size - 8)
    input_error(where, ": header past end of file: header length ", n, " needs ", n + 8,
                " bytes, the file has ", size);
  std::string_view text(reinterpret_cast<const char*>(data + 8), size_t(n));
  // Nesting: root object → tensor entry → shape/data_offsets array.
  json root = parse_json_strict(text, cat(where, ": header"), 3);
  if (!root.is_object())
    input_error(where, ": header not a JSON object: found a ", json_type_name(root));

  SafetensorsHeader h;
  h.header_size = n;
  h.tensors.reserve(root.size());
  for (auto it = root.begin(); it != root.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (it.value().is_null()) continue;  // the reference reads null as "no metadata"
      if (!it.value().is_object())
        input_error(where, ": __metadata__ not string to string: found a ",
                    json_type_name(it.value()), ", expected an object of strings");
      for (auto m = it.value().begin(); m != it.value().end(); ++m) {
        if (!m.value().is_string())
          input_error(where, ": __metadata__ not string to string: key ", quote_name(m.key()),
                      " holds a ", json_type_name(m.value()), ", expected a string");
        h.metadata.emplace(m.key(), m.value().get<std::string>());
      }
      continue;
    }
    h.tensors.push_back(parse_entry(it.key(), it.value(), cat(where, ": tensor ", quote_name(it.key()))));
  }
  // nlohmann's object is a std::map, so the entries already come sorted by name.

  std::vector<const TensorInfo*> by_offset;
  by_offset.reserve(h.tensors.size());
  for (const TensorInfo& t : h.tensors) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t end = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo* t : by_offset) {
    if (t->begin != end) {
      std::string at = cat(where, ": tensor ", quote_name(t->name), ": offsets not contiguous: ");
      if (!prev) input_error(at, "the first tensor starts at ", t->begin, ", expected 0");
      if (t->begin > end)
        input_error(at, "a hole of ", t->begin - end, " bytes between the end of ", quote_name(prev->name),
                    " at ", end, " and its start at ", t->begin);
      input_error(at, "data_offsets [", t->begin, ", ", t->end, "] overlap ", quote_name(prev->name),
                  ", which ends at ", end);
    }
    end = t->end;
    prev = t;
  }
  uint64_t have = uint64_t(size) - 8 - n;
  if (end > have)
    input_error(where, ": data section too short: tensors need ", end, " bytes after the header, the file has ",
                have);
  if (end < have)
    input_error(where, ": trailing bytes: ", have - end, " bytes after the last tensor (data ends at ", end,
                ", the file has ", have, " bytes after the header)");
  return h;
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  std::shared_ptr<MappedFile> m = MappedFile::open(path);
  SafetensorsFile f;
  f.h_ = parse_safetensors(m->data(), m->size(), path);
  f.base_ = m->data();
  f.size_ = m->size();
  f.path_ = path;
  f.owner_ = std::move(m);
  return f;
}

SafetensorsFile SafetensorsFile::from_bytes(std::string bytes, std::string label) {
  auto buf = std::make_shared<std::string>(std::move(bytes));
  SafetensorsFile f;
  f.h_ = parse_safetensors(reinterpret_cast<const uint8_t*>(buf->data()), buf->size(), label);
  f.base_ = reinterpret_cast<uint8_t*>(buf->data());
  f.size_ = buf->size();
  f.path_ = std::move(label);
  f.owner_ = std::move(buf);
  return f;
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  auto it = std::lower_bound(h_.tensors.begin(), h_.tensors.end(), name,
                             [](const TensorInfo& t, std::string_view n) { return t.name < n; });
  return it != h_.tensors.end() && it->name == name ? &*it : nullptr;
}

const TensorInfo& SafetensorsFile::info(std::string_view name) const {
  const TensorInfo* t = find(name);
  if (!t) input_error(path_, ": tensor ", quote_name(name), " not found (the file has ", size(), " tensors)");
  return *t;
}

Tensor SafetensorsFile::tensor(std::string_view name) const {
  const TensorInfo& t = info(name);
  if (!t.dtype)
    input_error(path_, ": tensor ", quote_name(name), ": unsupported dtype: ", t.dtype_name,
                " is valid safetensors but dsv3 tensors hold only ", dtype_list());
  if (t.shape.size() > size_t(kMaxDims))
    input_error(path_, ": tensor ", quote_name(name), ": too many dims: shape ", cat_shape(t.shape),
                " has ", t.shape.size(), " dims, dsv3 tensors hold at most ", kMaxDims);
  Shape s = Shape::of(t.shape.data(), int(t.shape.size()));
  uint8_t* p = base_ + h_.data_offset() + t.begin;
  if (reinterpret_cast<uintptr_t>(p) % dtype_size(*t.dtype) == 0)
    return Tensor::borrow(p, *t.dtype, s, owner_);
  Tensor c = Tensor::empty(*t.dtype, s);
  if (t.nbytes()) std::memcpy(c.raw(), p, t.nbytes());
  return c;
}

namespace {

using Sink = std::function<void(const void*, size_t)>;

// Header bytes (padded) and the tensors in file order.
std::string build_header(const std::vector<NamedTensor>& tensors, const Metadata& metadata,
                         std::vector<const NamedTensor*>* order) {
  for (const auto& [k, v] : metadata)
    if (utf8_error_offset(k) != std::string_view::npos || utf8_error_offset(v) != std::string_view::npos)
      input_error("safetensors writer: __metadata__ entry ", quote_name(k), " is not UTF-8");
  order->clear();
  for (const NamedTensor& t : tensors) {
    if (t.name == "__metadata__") input_error("safetensors writer: tensor name '__metadata__' is reserved");
    if (utf8_error_offset(t.name) != std::string_view::npos)
      input_error("safetensors writer: tensor name ", quote_name(t.name), " is not UTF-8");
    DSV3_CHECK(t.tensor.device() == Device::CPU, "safetensors writer: tensor ", t.name, " is not on the CPU");
    DSV3_CHECK(t.tensor.defined(), "safetensors writer: tensor ", t.name, " is undefined");
    order->push_back(&t);
  }
  std::sort(order->begin(), order->end(), [](const NamedTensor* a, const NamedTensor* b) {
    size_t ea = dtype_size(a->tensor.dtype()), eb = dtype_size(b->tensor.dtype());
    return ea != eb ? ea > eb : a->name < b->name;
  });
  for (size_t i = 1; i < order->size(); ++i)
    if ((*order)[i]->name == (*order)[i - 1]->name)
      input_error("safetensors writer: duplicate tensor name ", quote_name((*order)[i]->name));

  std::string h = "{";
  if (!metadata.empty()) {
    h += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [k, v] : metadata) {
      if (!first) h += ",";
      h += json(k).dump();
      h += ":";
      h += json(v).dump();
      first = false;
    }
    h += "}";
  }
  uint64_t offset = 0;
  for (const NamedTensor* t : *order) {
    if (h.size() > 1) h += ",";
    std::string shape;
    for (int i = 0; i < t->tensor.ndim(); ++i) {
      if (i) shape += ",";
      shape += std::to_string(t->tensor.dim(i));
    }
    uint64_t end = offset + t->tensor.nbytes();
    h += cat(json(t->name).dump(), ":{\"dtype\":\"", dtype_name(t->tensor.dtype()), "\",\"shape\":[",
             shape, "],\"data_offsets\":[", offset, ",", end, "]}");
    offset = end;
  }
  h += "}";
  h.append((8 - h.size() % 8) % 8, ' ');
  if (h.size() > kSafetensorsMaxHeader)
    input_error("safetensors writer: header of ", h.size(), " bytes exceeds the limit ",
                kSafetensorsMaxHeader);
  return h;
}

void emit(const std::vector<NamedTensor>& tensors, const Metadata& metadata, const Sink& out) {
  std::vector<const NamedTensor*> order;
  std::string h = build_header(tensors, metadata, &order);
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(h.size()) >> (8 * i));
  out(len, 8);
  out(h.data(), h.size());
  for (const NamedTensor* t : order)
    if (t->tensor.nbytes()) out(t->tensor.raw(), t->tensor.nbytes());
}

}  // namespace

std::string serialize_safetensors(const std::vector<NamedTensor>& tensors, const Metadata& metadata) {
  std::string s;
  emit(tensors, metadata, [&](const void* p, size_t n) { s.append(static_cast<const char*>(p), n); });
  return s;
}

uint64_t write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                           const Metadata& metadata) {
  AtomicFile f(path);
  emit(tensors, metadata, [&](const void* p, size_t n) { f.write(p, n); });
  f.commit();
  return f.bytes_written();
}

}  // namespace dsv3
