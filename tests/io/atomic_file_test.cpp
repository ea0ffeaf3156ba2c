// AtomicFile: the old file survives every failure before commit, and no temporary is left behind.
#include "io/atomic_file.h"

#include <gtest/gtest.h>
#include <sys/resource.h>

#include <csignal>
#include <stdexcept>

#include "io/safetensors.h"
#include "io_test_util.h"

namespace dsv3 {
namespace {

using test::read_all;
using test::TempDir;

TEST(AtomicFile, WritesAndReplaces) {
  TempDir dir;
  write_file_atomic(dir / "f", "first");
  EXPECT_EQ(read_all(dir / "f"), "first");
  write_file_atomic(dir / "f", "second, longer");
  EXPECT_EQ(read_all(dir / "f"), "second, longer");
  EXPECT_EQ(dir.count_files(), 1u);
}

TEST(AtomicFile, AbandonedWriteLeavesTheOldFile) {
  TempDir dir;
  write_file_atomic(dir / "f", "good");
  try {
    AtomicFile f(dir / "f");
    f.write("half of a new ");
    EXPECT_EQ(read_all(dir / "f"), "good");  // nothing visible before commit
    throw std::runtime_error("simulated crash in the middle of writing");
  } catch (const std::runtime_error&) {
  }
  EXPECT_EQ(read_all(dir / "f"), "good");
  EXPECT_EQ(dir.count_files(), 1u) << "the temporary file must be removed";
}

TEST(AtomicFile, FailedWriteLeavesTheOldFile) {
  // A real write failure: the file size limit makes write() fail with EFBIG part way through.
  TempDir dir;
  std::string path = dir / "m.safetensors";
  Tensor small = Tensor::zeros(DType::F32, {4});
  write_safetensors(path, {{"w", small}});
  std::string before = read_all(path);

  rlimit old{};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old), 0);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit lim = old;
  lim.rlim_cur = 4096;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &lim), 0);
  Tensor big = Tensor::zeros(DType::F32, {1 << 16});
  bool threw = false;
  try {
    write_safetensors(path, {{"w", big}});
  } catch (const InternalError& e) {
    threw = true;
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("write failed"), std::string::npos) << e.what();
  }
  setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, old_handler);
  EXPECT_TRUE(threw);
  EXPECT_EQ(read_all(path), before);
  EXPECT_EQ(dir.count_files(), 1u);
  EXPECT_EQ(SafetensorsFile::open(path).tensor("w").numel(), 4);
}

TEST(AtomicFile, MissingDirectoryIsAnInputError) {
  TempDir dir;
  test::expect_input_error([&] { write_file_atomic(dir / "no/such/f", "x"); }, {"no/such", "does not exist"});
  test::expect_input_error([&] { AtomicFile f(dir.path + "/"); }, {"names no file"});
}

TEST(AtomicFile, RenameOntoADirectoryFailsCleanly) {
  TempDir dir;
  std::filesystem::create_directory(dir / "d");
  EXPECT_THROW(write_file_atomic(dir / "d", "x"), InternalError);
  EXPECT_EQ(dir.count_files(), 0u);
  EXPECT_TRUE(std::filesystem::is_directory(dir / "d"));
}

}  // namespace
}  // namespace dsv3
