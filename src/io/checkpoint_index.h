// Hugging Face checkpoint directories: either one `model.safetensors`, or shards listed by
// `model.safetensors.index.json`:
//   {"metadata": {"total_size": BYTES}, "weight_map": {"<tensor>": "<shard file>", ...}}
// (`metadata` and `total_size` are optional: DeepSeek's converter writes "metadata": {}). Shard
// names are whatever the index says; ours are model-00001-of-00003.safetensors and DeepSeek-V3's
// model-00001-of-000163.safetensors (6-digit total) reads the same way. A tensor is always found
// through weight_map, never guessed from a shard name.
//
// A hostile index must not reach outside the directory: shard names are plain file names ending in
// ".safetensors" (no '/', '\', NUL, "." or ".."). Symlinks inside the directory are followed, as
// the Hugging Face cache stores snapshots as links to blobs.
//
// Consistency is checked at open, when every shard is mapped (mapping reads only the headers):
// a weight_map entry whose shard lacks the tensor, and a tensor in a shard that weight_map does not
// send there, are both InputErrors — an index that does not describe its shards is corrupt.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "io/safetensors.h"

namespace dsv3 {

constexpr const char* kSingleFileName = "model.safetensors";
constexpr const char* kIndexFileName = "model.safetensors.index.json";

struct CheckpointIndex {
  std::optional<uint64_t> total_size;             // metadata.total_size when present
  std::map<std::string, std::string> weight_map;  // tensor name → shard file name
  std::vector<std::string> shard_files() const;   // distinct, sorted
};

// Parse and validate index JSON text (strict JSON, as for safetensors headers).
CheckpointIndex parse_checkpoint_index(std::string_view text, const std::string& where);
std::string checkpoint_index_json(const CheckpointIndex& index);
// "model-00001-of-00003.safetensors" (1-based i; 5 digits, more when n needs them).
std::string shard_file_name(int i, int n);
// Why `name` is not an acceptable shard file name, or empty when it is.
std::string shard_name_problem(std::string_view name);

struct CheckpointTensor {
  const TensorInfo* info;  // dtype, shape, byte range
  size_t shard;            // index into shard_files()
};

class SafetensorsDir {
 public:
  SafetensorsDir() = default;
  // Move-only: the tensor table points into the shards it owns.
  SafetensorsDir(SafetensorsDir&&) = default;
  SafetensorsDir& operator=(SafetensorsDir&&) = default;
  SafetensorsDir(const SafetensorsDir&) = delete;
  SafetensorsDir& operator=(const SafetensorsDir&) = delete;

  // `path`: a directory holding model.safetensors or model.safetensors.index.json (both at once is
  // ambiguous and rejected), or the path of either file itself.
  static SafetensorsDir open(const std::string& path);

  const std::string& dir() const { return dir_; }
  bool sharded() const { return sharded_; }
  const std::optional<uint64_t>& index_total_size() const { return total_size_; }

  size_t size() const { return table_.size(); }
  bool contains(std::string_view name) const { return find(name) != nullptr; }
  const CheckpointTensor* find(std::string_view name) const;  // O(log n)
  const TensorInfo& info(std::string_view name) const;        // InputError when absent
  Tensor tensor(std::string_view name) const;                 // see SafetensorsFile::tensor
  // Every tensor, sorted by name.
  const std::map<std::string, CheckpointTensor, std::less<>>& tensors() const { return table_; }

  const std::vector<std::string>& shard_files() const { return shard_names_; }
  const SafetensorsFile& shard(size_t i) const { return shards_[i]; }
  uint64_t file_bytes() const;    // sum of shard file sizes: what mapping everything makes resident
  uint64_t tensor_bytes() const;  // sum of tensor data sizes

 private:
  std::string dir_;
  bool sharded_ = false;
  std::optional<uint64_t> total_size_;
  std::vector<std::string> shard_names_;
  std::vector<SafetensorsFile> shards_;
  std::map<std::string, CheckpointTensor, std::less<>> table_;
};

// Write `tensors` into directory `dir` (created if missing; its parent must exist). When they fit
// in one shard of max_shard_bytes (tensor data), the result is model.safetensors; otherwise shards
// model-0000i-of-0000n.safetensors plus the index, tensors kept in the given order and a new shard
// started when the next tensor would overflow the current one (a tensor larger than the limit gets
// a shard of its own). Every file is written atomically and the index last; the other layout's
// file (a stale index or single file) is removed afterwards so open() cannot find both. Old shards
// with other names are left alone. `metadata` goes into every file, with "format": "pt" added when
// absent (transformers refuses safetensors without it).
void write_safetensors_dir(const std::string& dir, const std::vector<NamedTensor>& tensors,
                           Metadata metadata = {}, uint64_t max_shard_bytes = uint64_t(5) << 30);

}  // namespace dsv3
