// Writing a file so that a crash or an error never leaves a half-written file at its path:
// the bytes go to a temporary file in the same directory, which is fsync'ed, renamed over the
// target (atomic on POSIX), and then the directory is fsync'ed so the rename itself is durable.
// Until commit() succeeds the old file (if any) is untouched; an AtomicFile destroyed without a
// commit removes its temporary file.
//
// Errors: a path whose directory cannot be written to (missing, not a directory, no permission)
// is the caller's input → InputError. A failing write/fsync/rename (disk full, I/O error) is an
// environment failure → InternalError. Both name the path.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace dsv3 {

class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t n);
  void write(std::string_view s) { write(s.data(), s.size()); }
  uint64_t bytes_written() const { return written_; }
  // Make the new contents visible at path(). Must be called exactly once.
  void commit();

  const std::string& path() const { return path_; }
  const std::string& temp_path() const { return tmp_; }

 private:
  void discard();
  std::string path_, tmp_;
  int fd_ = -1;
  uint64_t written_ = 0;
  bool committed_ = false;
};

// Replace the file at `path` with `bytes`, atomically.
void write_file_atomic(const std::string& path, std::string_view bytes);

}  // namespace dsv3
