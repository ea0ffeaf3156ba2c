// A read-only view of a whole file through mmap. The mapping is private and writable
// (copy-on-write), so tensors borrowed from it may be modified in memory without touching the
// file: a stray write costs a page copy instead of a crash. The file itself is never written.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace dsv3 {

class MappedFile {
 public:
  // InputError when the path is missing, not a regular file, or cannot be mapped.
  static std::shared_ptr<MappedFile> open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile() = default;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  std::string path_;
};

}  // namespace dsv3
