#include "io/token_dataset.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>

#include "core/error.h"
#include "io/checksum.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

struct TmpDir {
  fs::path p;
  TmpDir() {
    p = fs::temp_directory_path() / (std::string("dsv3_tokds_") + std::to_string(getpid()) + "_" +
                                     ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(p);
    fs::create_directories(p);
  }
  ~TmpDir() { fs::remove_all(p); }
  std::string file(const std::string& n) const { return (p / n).string(); }
};

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}
void spit(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

// The message of the InputError `f` throws ("" when it throws nothing).
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

TEST(Checksum, StandardCheckValue) {
  // The CRC-32 catalogue's check value for this polynomial (CRC-32/ISO-HDLC): 0xCBF43926.
  EXPECT_EQ(crc32("123456789", 9), 0xCBF43926u);
  EXPECT_EQ(crc32("", 0), 0u);
}

TEST(Checksum, IncrementalEqualsWhole) {
  std::string s;
  for (int i = 0; i < 1000; ++i) s.push_back(char(i * 7 + 3));
  uint32_t whole = crc32(s.data(), s.size());
  for (size_t cut : {0, 1, 7, 8, 9, 500, 999, 1000}) {
    uint32_t c = crc32_update(crc32(s.data(), cut), s.data() + cut, s.size() - cut);
    EXPECT_EQ(c, whole) << cut;
  }
  // The bitwise definition, one byte at a time, as a second reference for the sliced tables.
  uint32_t r = 0xFFFFFFFFu;
  for (unsigned char b : s) {
    r ^= b;
    for (int k = 0; k < 8; ++k) r = (r & 1) ? 0xEDB88320u ^ (r >> 1) : r >> 1;
  }
  EXPECT_EQ(~r, whole);
}

TEST(TokenShard, RoundTripU16AndI32) {
  TmpDir d;
  std::vector<int32_t> small = {0, 1, 2, 65535, 17, 4};
  auto info = write_token_shard(d.file("a.tok"), small, 65536);
  EXPECT_EQ(info.dtype, TokenDType::U16);
  auto s = TokenShard::open(d.file("a.tok"));
  ASSERT_EQ(s.size(), small.size());
  for (size_t i = 0; i < small.size(); ++i) EXPECT_EQ(s[i], small[i]);
  EXPECT_EQ(fs::file_size(d.file("a.tok")), 64 + 2 * small.size());

  std::vector<int32_t> big = {129279, 0, 70000, 5};
  info = write_token_shard(d.file("b.tok"), big, 129280);
  EXPECT_EQ(info.dtype, TokenDType::I32);
  auto t = TokenShard::open(d.file("b.tok"));
  std::vector<int32_t> got(4);
  t.read(0, 4, got.data());
  EXPECT_EQ(got, big);
  EXPECT_EQ(t.info().vocab_size, 129280u);

  write_token_shard(d.file("empty.tok"), {}, 10);
  EXPECT_EQ(TokenShard::open(d.file("empty.tok")).size(), 0u);
}

TEST(TokenShard, WriterRejectsOutOfVocab) {
  TmpDir d;
  EXPECT_NE(error_of([&] { write_token_shard(d.file("x.tok"), {1, 10}, 10); }).find("token 1"),
            std::string::npos);
  EXPECT_NE(error_of([&] { write_token_shard(d.file("x.tok"), {-1}, 10); }), "");
  EXPECT_FALSE(fs::exists(d.file("x.tok")));
}

// Every kind of damage is rejected, with a message naming the field.
TEST(TokenShard, EveryCorruptionRejected) {
  TmpDir d;
  const std::string good_path = d.file("good.tok");
  std::vector<int32_t> toks;
  for (int i = 0; i < 100; ++i) toks.push_back(i % 50);
  write_token_shard(good_path, toks, 50);
  const std::string good = slurp(good_path);
  EXPECT_EQ(error_of([&] { TokenShard::open(good_path); }), "");

  auto fix_header_crc = [](std::string& b) {
    uint32_t c = crc32(b.data(), 60);
    std::memcpy(&b[60], &c, 4);
  };
  auto fix_data_crc = [](std::string& b) {
    uint32_t c = crc32(b.data() + 64, b.size() - 64);
    std::memcpy(&b[32], &c, 4);
  };
  struct Case {
    const char* name;
    std::function<void(std::string&)> damage;
    const char* expect;
  };
  std::vector<Case> cases = {
      {"truncated header", [](std::string& b) { b.resize(40); }, "shorter than"},
      {"empty file", [](std::string& b) { b.clear(); }, "shorter than"},
      {"bad magic", [](std::string& b) { b[0] = 'X'; }, "magic"},
      {"version", [&](std::string& b) { b[8] = 9; fix_header_crc(b); }, "version 9"},
      {"header crc", [](std::string& b) { b[20] ^= 1; }, "header checksum"},
      {"dtype", [&](std::string& b) { b[12] = 7; fix_header_crc(b); }, "dtype code 7"},
      {"vocab zero", [&](std::string& b) { std::memset(&b[16], 0, 8); fix_header_crc(b); },
       "vocab_size 0"},
      {"vocab too big for U16", [&](std::string& b) { b[18] = 2; fix_header_crc(b); }, "U16"},
      {"reserved", [&](std::string& b) { b[40] = 1; fix_header_crc(b); }, "reserved header byte 40"},
      {"count too large", [&](std::string& b) { b[24] = char(101); fix_header_crc(b); },
       "101 U16 tokens"},
      {"count overflow", [&](std::string& b) { std::memset(&b[24], 0xFF, 8); fix_header_crc(b); },
       "but the file has"},
      {"truncated data", [](std::string& b) { b.resize(b.size() - 2); }, "but the file has"},
      {"trailing bytes", [](std::string& b) { b += "zz"; }, "but the file has"},
      {"data flipped", [](std::string& b) { b[70] ^= 4; }, "token data checksum"},
      {"id out of range", [&](std::string& b) { b[64] = 60; fix_data_crc(b); fix_header_crc(b); },
       "token 0 has id 60"},
  };
  for (auto& c : cases) {
    std::string b = good;
    c.damage(b);
    const std::string p = d.file("bad.tok");
    spit(p, b);
    std::string msg = error_of([&] { TokenShard::open(p); });
    EXPECT_NE(msg.find(c.expect), std::string::npos) << c.name << ": got '" << msg << "'";
    EXPECT_NE(msg.find("bad.tok"), std::string::npos) << c.name << " does not name the file";
  }
  EXPECT_NE(error_of([&] { TokenShard::open(d.file("missing.tok")); }), "");
}

TEST(TokenShard, AtomicWriteLeavesOldFileOnError) {
  TmpDir d;
  write_token_shard(d.file("s.tok"), {1, 2, 3}, 10);
  EXPECT_NE(error_of([&] { write_token_shard(d.file("s.tok"), {1, 99}, 10); }), "");
  EXPECT_EQ(TokenShard::open(d.file("s.tok")).size(), 3u);
  size_t n = 0;
  for (auto& e : fs::directory_iterator(d.p)) n += e.is_regular_file();
  EXPECT_EQ(n, 1u) << "no temporary file left behind";
}

}  // namespace
}  // namespace dsv3
