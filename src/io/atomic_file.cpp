#include "io/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <random>

#include "core/error.h"

namespace dsv3 {

namespace {
std::string dir_of(const std::string& path) {
  size_t s = path.find_last_of('/');
  if (s == std::string::npos) return ".";
  return s == 0 ? "/" : path.substr(0, s);
}
std::string base_of(const std::string& path) {
  size_t s = path.find_last_of('/');
  return s == std::string::npos ? path : path.substr(s + 1);
}
}  // namespace

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  if (path_.empty() || path_.back() == '/') input_error("output path '", path_, "' names no file");
  const std::string dir = dir_of(path_);
  struct stat st {};
  if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    input_error(path_, ": cannot write: directory '", dir, "' does not exist");
  std::random_device rd;
  for (int attempt = 0; fd_ < 0; ++attempt) {
    // Hidden, unique name in the same directory so rename() never crosses file systems.
    tmp_ = cat(dir, "/.", base_of(path_), ".tmp.", getpid(), ".", rd() % 1000000);
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd_ < 0 && (errno != EEXIST || attempt > 100))
      input_error(path_, ": cannot create temporary file '", tmp_, "': ", std::strerror(errno));
  }
}

AtomicFile::~AtomicFile() {
  if (!committed_) discard();
}

void AtomicFile::discard() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  if (!tmp_.empty()) ::unlink(tmp_.c_str());
}

void AtomicFile::write(const void* data, size_t n) {
  DSV3_CHECK(fd_ >= 0 && !committed_, "write to a closed AtomicFile ", path_);
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd_, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      int e = w < 0 ? errno : EIO;
      discard();
      internal_error(path_, ": write failed after ", written_, " bytes: ", std::strerror(e),
                     " (the previous file, if any, is unchanged)");
    }
    p += w;
    n -= size_t(w);
    written_ += uint64_t(w);
  }
}

void AtomicFile::commit() {
  DSV3_CHECK(fd_ >= 0 && !committed_, "commit of a closed AtomicFile ", path_);
  auto fail = [&](const char* what) {
    int e = errno;
    discard();
    internal_error(path_, ": ", what, " failed: ", std::strerror(e),
                   " (the previous file, if any, is unchanged)");
  };
  if (fsync(fd_) != 0) fail("fsync");
  int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) fail("close");
  if (std::rename(tmp_.c_str(), path_.c_str()) != 0) fail("rename");
  committed_ = true;
  // Persist the directory entry; the new file is already in place, so a failure here only
  // weakens durability and is not reported as an error.
  int dfd = ::open(dir_of(path_).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    fsync(dfd);
    ::close(dfd);
  }
}

void write_file_atomic(const std::string& path, std::string_view bytes) {
  AtomicFile f(path);
  f.write(bytes);
  f.commit();
}

}  // namespace dsv3
