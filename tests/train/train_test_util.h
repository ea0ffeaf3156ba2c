// Helpers shared by the train tests: a per-test temporary directory and whole-file reads/writes.
#pragma once
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

namespace dsv3::train_test {

// /tmp/dsv3_<prefix>_<pid>_<test name>, fresh at construction, removed with its contents at scope exit.
struct TmpDir {
  std::filesystem::path p;
  explicit TmpDir(const std::string& prefix) {
    p = std::filesystem::temp_directory_path() /
        ("dsv3_" + prefix + "_" + std::to_string(getpid()) + "_" +
         ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(p);
    std::filesystem::create_directories(p);
  }
  ~TmpDir() { std::filesystem::remove_all(p); }
  std::string file(const std::string& n) const { return (p / n).string(); }
};

inline void spit(const std::string& path, const std::string& s) { std::ofstream(path, std::ios::binary) << s; }
inline std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}

}  // namespace dsv3::train_test
