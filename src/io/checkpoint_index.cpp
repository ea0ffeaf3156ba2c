#include "io/checkpoint_index.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <set>

#include "io/atomic_file.h"
#include "io/mmap_file.h"
#include "io/strict_json.h"

namespace dsv3 {

namespace {
using json = nlohmann::json;

constexpr uint64_t kMaxIndexBytes = 1'000'000'000;  // a bound on memory, far above real indexes

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

bool is_dir(const std::string& p) {
  struct stat st {};
  return stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
bool exists(const std::string& p) {
  struct stat st {};
  return stat(p.c_str(), &st) == 0;
}
}  // namespace

std::string shard_name_problem(std::string_view name) {
  if (name.empty()) return "it is empty";
  if (name.size() > 255) return "it is longer than 255 bytes";
  if (name == "." || name == "..") return "it names a directory";
  for (char c : name) {
    if (c == '/' || c == '\\') return "it contains a path separator (shards must sit in the checkpoint directory)";
    if (c == '\0') return "it contains a NUL byte";
  }
  if (!ends_with(name, ".safetensors") || name == ".safetensors") return "it does not end in \".safetensors\"";
  return "";
}

std::vector<std::string> CheckpointIndex::shard_files() const {
  std::set<std::string> s;
  for (const auto& [name, shard] : weight_map) s.insert(shard);
  return {s.begin(), s.end()};
}

CheckpointIndex parse_checkpoint_index(std::string_view text, const std::string& where) {
  json root = parse_json_strict(text, where, 64);
  if (!root.is_object()) input_error(where, ": index not a JSON object: found a ", json_type_name(root));
  CheckpointIndex idx;
  if (root.contains("metadata")) {
    const json& m = root["metadata"];
    if (!m.is_object() && !m.is_null())
      input_error(where, ": bad metadata: \"metadata\" is a ", json_type_name(m), ", expected an object");
    if (m.is_object() && m.contains("total_size")) {
      const json& ts = m["total_size"];
      // Some writers store it as a float; accept any exact non-negative integer value.
      if (ts.is_number_unsigned()) idx.total_size = ts.get<uint64_t>();
      else if (ts.is_number_float() && ts.get<double>() >= 0 && ts.get<double>() < 9007199254740992.0 &&
               std::floor(ts.get<double>()) == ts.get<double>())
        idx.total_size = uint64_t(ts.get<double>());
      else
        input_error(where, ": bad metadata: \"total_size\" is a ", json_type_name(ts),
                    ", expected a non-negative integer");
    }
  }
  if (!root.contains("weight_map")) input_error(where, ": missing weight_map: no \"weight_map\" object");
  const json& wm = root["weight_map"];
  if (!wm.is_object())
    input_error(where, ": bad weight_map: \"weight_map\" is a ", json_type_name(wm),
                ", expected an object of tensor name → shard file");
  for (auto it = wm.begin(); it != wm.end(); ++it) {
    std::string at = cat(where, ": weight_map entry ", quote_name(it.key()));
    if (!it.value().is_string())
      input_error(at, ": bad shard name: a ", json_type_name(it.value()), ", expected a file name string");
    std::string shard = it.value().get<std::string>();
    std::string why = shard_name_problem(shard);
    if (!why.empty()) input_error(at, ": bad shard name: ", quote_name(shard), " is rejected because ", why);
    idx.weight_map.emplace(it.key(), std::move(shard));
  }
  return idx;
}

std::string checkpoint_index_json(const CheckpointIndex& index) {
  json j;
  j["metadata"] = json::object();
  if (index.total_size) j["metadata"]["total_size"] = *index.total_size;
  j["weight_map"] = json::object();
  for (const auto& [name, shard] : index.weight_map) j["weight_map"][name] = shard;
  return j.dump(2) + "\n";
}

std::string shard_file_name(int i, int n) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "model-%05d-of-%05d.safetensors", i, n);
  return buf;
}

SafetensorsDir SafetensorsDir::open(const std::string& path) {
  SafetensorsDir d;
  std::string single, index;
  if (is_dir(path)) {
    d.dir_ = path;
    single = path + "/" + kSingleFileName;
    index = path + "/" + kIndexFileName;
    bool has_single = exists(single), has_index = exists(index);
    if (has_single && has_index)
      input_error(path, ": ambiguous checkpoint: both ", kSingleFileName, " and ", kIndexFileName,
                  " are present; remove the stale one");
    if (!has_single && !has_index)
      input_error(path, ": no checkpoint: neither ", kSingleFileName, " nor ", kIndexFileName, " found");
    if (has_single) index.clear();
    else single.clear();
  } else if (ends_with(path, ".index.json")) {
    index = path;
  } else if (ends_with(path, ".safetensors")) {
    single = path;
  } else if (!exists(path)) {
    input_error(path, ": no such file or directory");
  } else {
    input_error(path, ": not a checkpoint: expected a directory, a .safetensors file or a .index.json file");
  }
  if (d.dir_.empty()) {
    const std::string& f = single.empty() ? index : single;
    size_t s = f.find_last_of('/');
    d.dir_ = s == std::string::npos ? "." : f.substr(0, s);
  }

  if (!single.empty()) {
    d.shard_names_ = {single.substr(single.find_last_of('/') + 1)};
    d.shards_.push_back(SafetensorsFile::open(single));
    for (const TensorInfo& t : d.shards_[0].tensors()) d.table_.emplace(t.name, CheckpointTensor{&t, 0});
    return d;
  }

  d.sharded_ = true;
  std::shared_ptr<MappedFile> m = MappedFile::open(index);
  if (m->size() > kMaxIndexBytes)
    input_error(index, ": index too large: ", m->size(), " bytes, the limit is ", kMaxIndexBytes);
  CheckpointIndex idx =
      parse_checkpoint_index(std::string_view(reinterpret_cast<const char*>(m->data()), m->size()), index);
  d.total_size_ = idx.total_size;
  d.shard_names_ = idx.shard_files();
  d.shards_.reserve(d.shard_names_.size());  // table_ points into the shards: no reallocation
  std::map<std::string, size_t> shard_no;
  for (const std::string& s : d.shard_names_) {
    std::string p = d.dir_ + "/" + s;
    if (!exists(p))
      input_error(index, ": missing shard: ", quote_name(s), " is named in weight_map but ", p, " does not exist");
    shard_no[s] = d.shards_.size();
    d.shards_.push_back(SafetensorsFile::open(p));
  }
  for (const auto& [name, shard] : idx.weight_map) {
    size_t i = shard_no.at(shard);
    const TensorInfo* t = d.shards_[i].find(name);
    if (!t)
      input_error(index, ": tensor ", quote_name(name), ": missing tensor in shard: weight_map puts it in ",
                  quote_name(shard), ", which does not contain it");
    d.table_.emplace(name, CheckpointTensor{t, i});
  }
  for (size_t i = 0; i < d.shards_.size(); ++i)
    for (const TensorInfo& t : d.shards_[i].tensors()) {
      auto it = idx.weight_map.find(t.name);
      if (it == idx.weight_map.end() || it->second != d.shard_names_[i])
        input_error(index, ": tensor ", quote_name(t.name), ": tensor not in weight_map: shard ",
                    quote_name(d.shard_names_[i]), " holds it but weight_map ",
                    it == idx.weight_map.end() ? std::string("does not list it")
                                               : cat("sends it to ", quote_name(it->second)));
    }
  return d;
}

const CheckpointTensor* SafetensorsDir::find(std::string_view name) const {
  auto it = table_.find(name);
  return it == table_.end() ? nullptr : &it->second;
}

const TensorInfo& SafetensorsDir::info(std::string_view name) const {
  const CheckpointTensor* t = find(name);
  if (!t) input_error(dir_, ": tensor ", quote_name(name), " not found in the checkpoint (", size(), " tensors)");
  return *t->info;
}

Tensor SafetensorsDir::tensor(std::string_view name) const {
  info(name);
  return shards_[find(name)->shard].tensor(name);
}

uint64_t SafetensorsDir::file_bytes() const {
  uint64_t n = 0;
  for (const SafetensorsFile& f : shards_) n += f.file_size();
  return n;
}

uint64_t SafetensorsDir::tensor_bytes() const {
  uint64_t n = 0;
  for (const auto& [name, t] : table_) n += t.info->nbytes();
  return n;
}

void write_safetensors_dir(const std::string& dir, const std::vector<NamedTensor>& tensors,
                           Metadata metadata, uint64_t max_shard_bytes) {
  if (!is_dir(dir) && mkdir(dir.c_str(), 0777) != 0)
    input_error(dir, ": cannot create the checkpoint directory: ", std::strerror(errno));
  std::set<std::string_view> names;
  for (const NamedTensor& t : tensors)
    if (!names.insert(t.name).second)  // checked before any file is written
      input_error(dir, ": duplicate tensor name ", quote_name(t.name));
  metadata.emplace("format", "pt");
  std::vector<std::vector<NamedTensor>> shards(1);
  uint64_t cur = 0;
  for (const NamedTensor& t : tensors) {
    uint64_t n = t.tensor.nbytes();
    if (!shards.back().empty() && (cur + n > max_shard_bytes || cur + n < cur)) {
      shards.emplace_back();
      cur = 0;
    }
    shards.back().push_back(t);
    cur += n;
  }
  const std::string single = dir + "/" + kSingleFileName, index = dir + "/" + kIndexFileName;
  if (shards.size() == 1) {
    write_safetensors(single, shards[0], metadata);
    if (exists(index)) std::remove(index.c_str());
    return;
  }
  CheckpointIndex idx;
  idx.total_size = 0;
  const int n = int(shards.size());
  for (int i = 0; i < n; ++i) {
    std::string name = shard_file_name(i + 1, n);
    write_safetensors(dir + "/" + name, shards[size_t(i)], metadata);
    for (const NamedTensor& t : shards[size_t(i)]) {
      *idx.total_size += t.tensor.nbytes();
      idx.weight_map[t.name] = name;
    }
  }
  write_file_atomic(index, checkpoint_index_json(idx));
  if (exists(single)) std::remove(single.c_str());
}

}  // namespace dsv3
