#include "train/data_loader.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "io/checksum.h"
#include "train_test_util.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

using train_test::TmpDir;

// Shards whose token i of shard s is (s·1000 + i) mod vocab, so a window tells where it came from.
std::vector<std::string> make_shards(const TmpDir& d, std::vector<int> sizes, uint64_t vocab = 60000) {
  std::vector<std::string> paths;
  for (size_t s = 0; s < sizes.size(); ++s) {
    std::vector<int32_t> t(static_cast<size_t>(sizes[s]));
    for (int i = 0; i < sizes[s]; ++i) t[size_t(i)] = int32_t((s * 1000 + size_t(i)) % vocab);
    paths.push_back(d.file(std::string("s") + std::to_string(s) + ".tok"));
    write_token_shard(paths.back(), t, vocab);
  }
  return paths;
}

std::vector<int32_t> flat(const Tensor& t) {
  return {t.data<int32_t>(), t.data<int32_t>() + t.numel()};
}

TEST(BatchSampler, WindowsAreContiguousAndCoverEachEpochOnce) {
  TmpDir d("loader");
  auto ds = TokenDataset::from_shards(make_shards(d, {33, 17, 5, 41}));
  const int64_t T = 4;
  BatchSampler s(ds, 2, T, 42);
  // Windows per shard: (n-1)/T → 8 + 4 + 1 + 10.
  EXPECT_EQ(s.windows_per_epoch(), 23u);
  std::set<std::pair<int, int>> seen;
  for (int b = 0; b < 11; ++b) {  // 22 windows: all but one of the epoch
    Tensor x = s.next();
    ASSERT_EQ(x.shape(), (Shape{2, T + 1}));
    for (int r = 0; r < 2; ++r) {
      const int32_t* w = x.data<int32_t>() + r * (T + 1);
      for (int k = 1; k <= T; ++k) ASSERT_EQ(w[k], w[k - 1] + 1) << "a window is one contiguous run";
      int shard = w[0] / 1000, start = w[0] % 1000;
      EXPECT_EQ(start % T, 0);
      EXPECT_TRUE(seen.insert({shard, start}).second) << "window visited twice in one epoch";
    }
  }
  EXPECT_EQ(s.state().epoch, 0u);
  s.next();  // crosses into epoch 1
  EXPECT_EQ(s.state().epoch, 1u);
  EXPECT_EQ(s.state().index, 1u);
  EXPECT_EQ(seen.size(), 22u);
}

TEST(BatchSampler, DeterministicPerSeed) {
  TmpDir d("loader");
  auto ds = TokenDataset::from_shards(make_shards(d, {200, 300}));
  BatchSampler a(ds, 3, 8, 7), b(ds, 3, 8, 7), c(ds, 3, 8, 8);
  bool differs = false;
  for (int i = 0; i < 30; ++i) {
    auto xa = flat(a.next()), xb = flat(b.next()), xc = flat(c.next());
    EXPECT_EQ(xa, xb);
    differs |= xa != xc;
  }
  EXPECT_TRUE(differs) << "another seed gives another order";
}

TEST(BatchSampler, RestoreResumesTheExactSequence) {
  TmpDir d("loader");
  auto ds = TokenDataset::from_shards(make_shards(d, {97, 131, 64}));
  BatchSampler straight(ds, 4, 6, 123);
  std::vector<std::vector<int32_t>> want;
  for (int i = 0; i < 40; ++i) want.push_back(flat(straight.next()));  // several epochs
  for (int cut : {0, 1, 7, 13, 25}) {
    BatchSampler first(ds, 4, 6, 123);
    for (int i = 0; i < cut; ++i) first.next();
    nlohmann::json saved = first.state().to_json();
    BatchSampler resumed(ds, 4, 6, 123);
    resumed.restore(SamplerState::from_json(saved, "state"), "state");
    for (int i = cut; i < 40; ++i) ASSERT_EQ(flat(resumed.next()), want[size_t(i)]) << cut << " " << i;
  }
  BatchSampler other(ds, 4, 6, 124);
  EXPECT_THROW(other.restore(straight.state(), "state"), InputError);
  SamplerState bad = straight.state();
  bad.index = 1'000'000;
  BatchSampler same(ds, 4, 6, 123);
  EXPECT_THROW(same.restore(bad, "state"), InputError);
  EXPECT_THROW(SamplerState::from_json(nlohmann::json{{"seed", 1}}, "state"), InputError);
}

TEST(BatchSampler, ValidationOrderIsFileOrderAndRewinds) {
  TmpDir d("loader");
  auto ds = TokenDataset::from_shards(make_shards(d, {21, 21}));
  BatchSampler v(ds, 2, 5, 0, /*shuffle=*/false);
  auto x = flat(v.next());
  EXPECT_EQ(x[0], 0);
  EXPECT_EQ(x[6], 5);
  v.next();
  auto y = flat(v.next());
  EXPECT_EQ(y[0], 1000);  // second shard
  v.rewind();
  EXPECT_EQ(flat(v.next()), x);
}

TEST(BatchSampler, TooLittleDataIsAnInputError) {
  TmpDir d("loader");
  auto ds = TokenDataset::from_shards(make_shards(d, {10}));
  EXPECT_THROW(BatchSampler(ds, 4, 8, 0), InputError);
  EXPECT_THROW(BatchSampler(ds, 0, 8, 0), InputError);
}

TEST(TokenDataset, OpensDescribedSplitAndChecksIt) {
  TmpDir d("loader");
  auto paths = make_shards(d, {50, 60});
  auto info0 = TokenShard::open(paths[0]).info(), info1 = TokenShard::open(paths[1]).info();
  nlohmann::json meta = {
      {"format", "dsv3-token-dataset"}, {"version", 1}, {"vocab_size", 60000}, {"dtype", "U16"},
      {"splits",
       {{"train", {{"tokens", 50}, {"shards", {{{"file", "s0.tok"}, {"tokens", 50},
                                                {"crc32", crc_hex(info0.data_crc)}}}}}},
        {"val", {{"tokens", 60}, {"shards", {{{"file", "s1.tok"}, {"tokens", 60},
                                              {"crc32", crc_hex(info1.data_crc)}}}}}}}}};
  auto write = [&](const nlohmann::json& j) { std::ofstream(d.file("dataset.json")) << j.dump(); };
  write(meta);
  EXPECT_EQ(TokenDataset::open(d.p.string(), "train").tokens(), 50u);
  EXPECT_EQ(TokenDataset::open(d.p.string(), "val").tokens(), 60u);
  EXPECT_THROW(TokenDataset::open(d.p.string(), "test"), InputError);

  auto bad = meta;
  bad["splits"]["train"]["shards"][0]["crc32"] = "00000000";
  write(bad);
  EXPECT_THROW(TokenDataset::open(d.p.string(), "train"), InputError);
  bad = meta;
  bad["splits"]["train"]["shards"][0]["file"] = "../s0.tok";
  write(bad);
  EXPECT_THROW(TokenDataset::open(d.p.string(), "train"), InputError);
  bad = meta;
  bad["vocab_size"] = 50000;
  write(bad);
  EXPECT_THROW(TokenDataset::open(d.p.string(), "train"), InputError);
  bad = meta;
  bad.erase("version");
  write(bad);
  EXPECT_THROW(TokenDataset::open(d.p.string(), "train"), InputError);
  std::ofstream(d.file("dataset.json")) << "{not json";
  EXPECT_THROW(TokenDataset::open(d.p.string(), "train"), InputError);
  EXPECT_THROW(TokenDataset::open(d.file("nowhere"), "train"), InputError);
}

}  // namespace
}  // namespace dsv3
