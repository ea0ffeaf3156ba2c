#include "model/weights.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <iostream>
#include <optional>
#include <tuple>

#include "core/rng.h"
#include "io/checkpoint_index.h"
#include "io/safetensors.h"

namespace dsv3 {
namespace {

// One tensor offered by a source (a checkpoint or an in-memory map), read only once it matches.
struct Entry {
  std::vector<int64_t> shape;
  std::optional<DType> dtype;
  std::string dtype_name;
  std::function<Tensor()> get;
  bool used = false;
};

std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "[";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "]";
}

std::vector<int64_t> dims(const Shape& s) { return std::vector<int64_t>(s.d.begin(), s.d.begin() + s.n); }

bool plain_float(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }

// FP8 is read only by `linear`, so only 2-D weights that feed a linear may be stored in it.
bool fp8_allowed(const TensorSpec& s) {
  return s.shape.n == 2 && s.kind != TensorKind::embed_tokens && s.kind != TensorKind::mtp_embed_tokens;
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

Tensor as_f32(const Param& p) {
  return p.fp8() ? dequantize_fp8_blocks(p.w, p.scale_inv) : p.w.to(DType::F32);
}

}  // namespace

void round_matrices_to_bf16(Weights& w) {
  for (Param& p : w.params())
    if (p.w.ndim() == 2 && p.w.dtype() == DType::F32) p.w = p.w.to(DType::BF16);
}

void quantize_matrices_to_fp8(Weights& w) {
  for (Param& p : w.params())
    if (p.spec.fp8 && !p.fp8()) std::tie(p.w, p.scale_inv) = quantize_fp8_blocks(p.w);
  round_matrices_to_bf16(w);
}

std::pair<Tensor, Tensor> quantize_fp8_blocks(const Tensor& w) {
  DSV3_CHECK(w.ndim() == 2, "quantize_fp8_blocks wants a matrix, got ", w.shape().str());
  const int64_t R = w.dim(0), C = w.dim(1), B = 128;
  const int64_t rb = (R + B - 1) / B, cb = (C + B - 1) / B;
  Tensor f = w.to(DType::F32);
  Tensor q = Tensor::empty(DType::F8_E4M3, w.shape());
  Tensor s = Tensor::empty(DType::F32, {rb, cb});
  const float* x = f.data<float>();
  uint8_t* qo = static_cast<uint8_t*>(q.raw());
  float* so = s.data<float>();
  for (int64_t bi = 0; bi < rb; ++bi)
    for (int64_t bj = 0; bj < cb; ++bj) {
      const int64_t r1 = std::min(R, (bi + 1) * B), c1 = std::min(C, (bj + 1) * B);
      float amax = 0.0f;
      for (int64_t r = bi * B; r < r1; ++r)
        for (int64_t c = bj * B; c < c1; ++c) amax = std::max(amax, std::fabs(x[r * C + c]));
      const float scale = amax > 0.0f ? amax / kE4M3Max : 1.0f;
      so[bi * cb + bj] = scale;
      for (int64_t r = bi * B; r < r1; ++r)
        for (int64_t c = bj * B; c < c1; ++c) qo[r * C + c] = float_to_e4m3(x[r * C + c] / scale);
    }
  return {q, s};
}

Tensor dequantize_fp8_blocks(const Tensor& q, const Tensor& scale_inv) {
  DSV3_CHECK(q.ndim() == 2 && q.dtype() == DType::F8_E4M3 && scale_inv.ndim() == 2, q.shape().str());
  const int64_t R = q.dim(0), C = q.dim(1), cb = scale_inv.dim(1);
  Tensor out = Tensor::empty(DType::F32, q.shape());
  const uint8_t* qi = static_cast<const uint8_t*>(q.raw());
  const float* s = scale_inv.data<float>();
  float* o = out.data<float>();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) o[r * C + c] = e4m3_to_float(qi[r * C + c]) * s[(r / 128) * cb + c / 128];
  return out;
}

void Weights::index() {
  by_name_.clear();
  for (size_t i = 0; i < params_.size(); ++i) by_name_.emplace(params_[i].spec.name, i);
}

const Param* Weights::find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &params_[it->second];
}

Param* Weights::find(const std::string& name) {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &params_[it->second];
}

const Param& Weights::get(const std::string& name) const {
  if (const Param* p = find(name)) return *p;
  TensorTable t = build_tensor_table(config_);
  if (const TensorSpec* s = t.find(name); s && !s->shared_with.empty()) return get(s->shared_with);
  internal_error("weights of ", source_, " have no tensor '", name, "'");
}

uint64_t Weights::resident_bytes() const {
  uint64_t n = 0;
  for (const Param& p : params_) n += p.w.nbytes() + (p.scale_inv.defined() ? p.scale_inv.nbytes() : 0);
  return n;
}

namespace {

// Match the offered entries against the table; every problem is collected into one InputError.
std::vector<Param> bind_entries(const ModelConfig& config, const std::string& where,
                                std::map<std::string, Entry>& entries) {
  const TensorTable table = build_tensor_table(config);
  std::vector<std::string> problems;
  std::vector<Param> params;

  if (config.quantization_config) {
    const auto& b = config.quantization_config->weight_block_size;
    if (b[0] != 128 || b[1] != 128)
      problems.push_back(cat("config.json quantization_config.weight_block_size is [", b[0], ", ", b[1],
                             "]; only [128, 128] blocks are supported"));
  }

  for (const TensorSpec& s : table.tensors) {
    auto it = entries.find(s.name);
    if (it == entries.end()) {
      // The hub's copies of the shared embedding/head are optional: the main tensors are authoritative.
      if (s.shared_with.empty())
        problems.push_back(cat("missing tensor '", s.name, "' (expected shape ", s.shape.str(), ")"));
      continue;
    }
    Entry& e = it->second;
    e.used = true;
    bool ok = true;
    if (e.shape != dims(s.shape)) {
      problems.push_back(cat("tensor '", s.name, "' has shape ", shape_str(e.shape), ", expected ", s.shape.str()));
      ok = false;
    }
    const bool is_fp8 = e.dtype && *e.dtype == DType::F8_E4M3;
    if (!e.dtype || !(plain_float(*e.dtype) || (is_fp8 && fp8_allowed(s)))) {
      problems.push_back(cat("tensor '", s.name, "' has dtype ", e.dtype_name, ", expected F32, BF16 or F16",
                             fp8_allowed(s) ? " (or F8_E4M3 with a _scale_inv)" : ""));
      ok = false;
    }
    Tensor scale;
    if (is_fp8 && fp8_allowed(s)) {
      const std::string sn = scale_inv_name(s);
      auto si = entries.find(sn);
      if (si == entries.end()) {
        problems.push_back(cat("tensor '", s.name, "' is F8_E4M3 but its block scales '", sn, "' are missing"));
        ok = false;
      } else {
        si->second.used = true;
        const Shape want = scale_inv_shape(s);
        if (si->second.shape != dims(want) || !si->second.dtype || *si->second.dtype != DType::F32) {
          problems.push_back(cat("tensor '", sn, "' is ", si->second.dtype_name, " ", shape_str(si->second.shape),
                                 ", expected F32 ", want.str(), " (one scale per 128x128 block)"));
          ok = false;
        } else if (ok && s.shared_with.empty()) {
          scale = si->second.get();
        }
      }
    }
    if (!ok || !s.shared_with.empty()) continue;
    Param p;
    p.spec = s;
    p.w = e.get();
    p.scale_inv = scale;
    params.push_back(std::move(p));
  }
  for (const auto& [name, e] : entries)
    if (!e.used) problems.push_back(cat("unexpected tensor '", name, "' ", e.dtype_name, " ", shape_str(e.shape)));

  if (!problems.empty()) {
    std::string msg = cat(where, ": the tensors do not match config.json (model_type ", config.model_type, ", ",
                          table.size(), " tensors expected); ", problems.size(),
                          problems.size() == 1 ? " problem:" : " problems:");
    for (const std::string& p : problems) msg += "\n  " + p;
    throw InputError(msg);
  }
  return params;
}

}  // namespace

Weights Weights::from_tensors(const ModelConfig& config, std::map<std::string, Tensor> tensors,
                              const std::string& where) {
  std::map<std::string, Entry> entries;
  for (const auto& kv : tensors) {
    const Tensor& t = kv.second;  // clang 14 cannot capture a structured binding
    entries[kv.first] = Entry{dims(t.shape()), t.dtype(), dtype_name(t.dtype()), [t] { return t; }};
  }
  Weights w;
  w.config_ = config;
  w.source_ = where;
  w.params_ = bind_entries(config, where, entries);
  w.index();
  return w;
}

Weights Weights::load(const std::string& dir, const LoadOptions& opt) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(dir)) input_error(dir, ": not a directory (expected an HF checkpoint directory)");
  const std::string cfg_path = (fs::path(dir) / "config.json").string();
  if (!fs::exists(cfg_path)) input_error(dir, ": no config.json (expected an HF checkpoint directory)");
  ModelConfig config = load_model_config(cfg_path);
  SafetensorsDir files = SafetensorsDir::open(dir);

  const uint64_t total = files.tensor_bytes();
  const bool show = opt.progress && total >= opt.progress_min_bytes;
  if (show)
    std::cerr << "dsv3: mapping " << files.size() << " tensors (" << double(total) / 1e9 << " GB) from "
              << files.shard_files().size() << " file(s) in " << dir << "\n";
  uint64_t done = 0, next_report = total / 10;
  // Tensors are read (mapped) only once their name, shape and dtype matched the table.
  std::map<std::string, Entry> entries;
  for (const auto& [name, ct] : files.tensors()) {
    const TensorInfo* info = ct.info;
    entries[name] = Entry{info->shape, info->dtype, info->dtype_name,
                          [&, n = name, bytes = info->nbytes()] {
                            Tensor t = files.tensor(n);
                            done += bytes;
                            if (show && done >= next_report) {
                              std::cerr << "dsv3: loaded " << int(100.0 * double(done) / double(total)) << "% ("
                                        << double(done) / 1e9 << " GB)\n";
                              next_report += std::max<uint64_t>(total / 10, 1);
                            }
                            return t;
                          }};
  }
  Weights w;
  w.config_ = config;
  w.source_ = dir;
  w.params_ = bind_entries(config, dir, entries);
  w.index();
  return w;
}

Weights Weights::random(const ModelConfig& config, uint64_t seed, float std) {
  Weights w;
  w.config_ = config;
  w.source_ = cat("random(seed ", seed, ", std ", std, ")");
  for (const TensorSpec& s : build_tensor_table(config).tensors) {
    if (!s.shared_with.empty()) continue;
    Param p;
    p.spec = s;
    p.w = Tensor::empty(DType::F32, s.shape);
    float* d = p.w.data<float>();
    const int64_t n = s.numel();
    if (s.shape.n == 1) {
      // Norm weights start at 1 (HF's init); biases and the router's correction bias at 0.
      const bool norm = s.name.size() >= 11 && s.name.compare(s.name.size() - 11, 11, "norm.weight") == 0;
      std::fill(d, d + n, norm ? 1.0f : 0.0f);
    } else {
      const uint64_t stream = fnv1a(s.name);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) d[i] = std * rng_normal(seed, stream, uint64_t(i));
    }
    w.params_.push_back(std::move(p));
  }
  w.index();
  return w;
}

void Weights::save(const std::string& dir, const SaveOptions& opt) const {
  if (!plain_float(opt.dtype)) input_error("saving weights: dtype ", dtype_name(opt.dtype), " (expected F32, BF16 or F16)");
  std::filesystem::create_directories(dir);
  std::vector<NamedTensor> out;
  for (const TensorSpec& s : build_tensor_table(config_).tensors) {
    const Param& p = get(s.shared_with.empty() ? s.name : s.shared_with);
    if (opt.fp8 && s.fp8) {
      auto [q, sc] = p.fp8() ? std::pair<Tensor, Tensor>{p.w, p.scale_inv} : quantize_fp8_blocks(as_f32(p));
      out.push_back({s.name, q});
      out.push_back({scale_inv_name(s), sc});
      continue;
    }
    const DType t = s.kind == TensorKind::router_bias ? DType::F32 : opt.dtype;
    out.push_back({s.name, p.fp8() ? as_f32(p).to(t) : p.w.to(t)});
  }
  write_safetensors_dir(dir, out, {}, opt.max_shard_bytes);
  ModelConfig c = config_;
  c.torch_dtype = opt.dtype == DType::F32 ? "float32" : opt.dtype == DType::F16 ? "float16" : "bfloat16";
  if (opt.fp8)
    c.quantization_config = QuantizationConfig{};
  else
    c.quantization_config.reset();
  save_model_config(c, (std::filesystem::path(dir) / "config.json").string());
}

}  // namespace dsv3
