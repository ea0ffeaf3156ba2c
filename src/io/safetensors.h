// safetensors files: a validating reader over mmap and an atomic writer.
//
// Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data section.
// The reader enforces every rule of the reference implementation (huggingface/safetensors) and
// reports each violation as an InputError "<file>: [tensor '<name>': ]<rule>: <details>", where
// <rule> is one of:
//   file too small             fewer than 8 bytes
//   header too large           N > 100,000,000
//   header past end of file    8 + N > file size
//   header: not UTF-8 / header: not valid JSON (incl. NUL bytes) / header: duplicate key /
//   header: nested too deep (a safetensors header needs 3 levels)
//   header not a JSON object
//   __metadata__ not string to string
//   tensor entry not an object / tensor entry missing key / tensor entry unknown key
//   unknown dtype              not a safetensors dtype at all
//   bad shape / bad data_offsets   not an array of non-negative integers ≤ 2^48−1 (the schema's
//                              bound), or data_offsets not exactly [begin, end] with begin ≤ end
//   shape overflow             numel or numel × bits overflows 64 bits
//   sub-byte size              a 4/6-bit dtype whose tensor does not fill whole bytes
//   byte size mismatch         end − begin ≠ numel × element size
//   offsets not contiguous     sorted by offset, tensors must tile [0, last end) without holes
//                              or overlaps
//   data section too short / trailing bytes   8 + N + last end ≠ file size
//
// Dtypes: every dtype of the format (BOOL, F4, F6_E2M3, ..., U64) is accepted by the parser so a
// file can always be listed; TensorInfo::dtype is empty for those dsv3::Tensor cannot hold, and
// asking for such a tensor's data is an InputError naming its dtype ("unsupported dtype").
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/tensor.h"

namespace dsv3 {

constexpr uint64_t kSafetensorsMaxHeader = 100'000'000;
constexpr uint64_t kSafetensorsMaxInt = (uint64_t(1) << 48) - 1;  // schema: 48-bit integers

struct TensorInfo {
  std::string name;
  std::string dtype_name;      // as written in the file
  std::optional<DType> dtype;  // empty when dsv3::Tensor has no such dtype
  std::vector<int64_t> shape;  // any rank; [] is a scalar
  uint64_t begin = 0, end = 0;  // byte range within the data section
  uint64_t nbytes() const { return end - begin; }
  int64_t numel() const;
};

using Metadata = std::map<std::string, std::string>;

struct SafetensorsHeader {
  uint64_t header_size = 0;         // N
  std::vector<TensorInfo> tensors;  // sorted by name
  Metadata metadata;
  uint64_t data_offset() const { return 8 + header_size; }
};

// Validate a whole file held in memory (header and data section size); `where` names it in errors.
SafetensorsHeader parse_safetensors(const uint8_t* data, size_t size, const std::string& where);

class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::string& path);
  // Parse bytes held in memory (tests, fuzzing); `label` stands in for the file name.
  static SafetensorsFile from_bytes(std::string bytes, std::string label);

  const std::string& path() const { return path_; }
  uint64_t file_size() const { return size_; }
  const std::vector<TensorInfo>& tensors() const { return h_.tensors; }
  const Metadata& metadata() const { return h_.metadata; }
  size_t size() const { return h_.tensors.size(); }

  const TensorInfo* find(std::string_view name) const;  // nullptr when absent; O(log n)
  const TensorInfo& info(std::string_view name) const;  // InputError when absent
  // The tensor's bytes as a Tensor: borrowed from the mapping (kept alive by the Tensor) when the
  // data is aligned for the dtype, else an aligned copy. InputError for unsupported dtypes and
  // for more dims than a Tensor holds.
  Tensor tensor(std::string_view name) const;
  // Raw bytes of a tensor (any dtype, no alignment promise).
  const uint8_t* bytes(const TensorInfo& t) const { return base_ + h_.data_offset() + t.begin; }

 private:
  std::shared_ptr<void> owner_;
  uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  std::string path_;
  SafetensorsHeader h_;
};

struct NamedTensor {
  std::string name;
  Tensor tensor;  // CPU
};

// The reference writer's layout: tensors sorted by descending element size then name (so each
// starts aligned for its dtype), header padded with spaces to a multiple of 8, `__metadata__`
// first when not empty. InputError for bad names (duplicate, "__metadata__", not UTF-8).
std::string serialize_safetensors(const std::vector<NamedTensor>& tensors,
                                  const Metadata& metadata = {});
// Same bytes, streamed to `path` through an AtomicFile. Returns the file size.
uint64_t write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                           const Metadata& metadata = {});

}  // namespace dsv3
