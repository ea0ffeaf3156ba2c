#include <gtest/gtest.h>

#include "infer/kv_cache.h"
#include "model/presets.h"

namespace dsv3 {
namespace {

TEST(KvCache, BytesPerTokenIsTheFormula) {
  // DeepSeek-V3: (512 + 64) × 61 layers × 2 bytes (BF16) = 70,272 bytes per token (paper_facts §2.1).
  const ModelConfig v3 = preset_config("v3");
  LatentKvPool bf(v3.num_hidden_layers, v3.kv_lora_rank, v3.qk_rope_head_dim,
                  KvCacheOptions{64, uint64_t(64) << 20, DType::BF16});
  EXPECT_EQ(bf.bytes_per_token(), uint64_t(576 * 61 * 2));
  EXPECT_EQ(bf.row_width(), 576);
  EXPECT_EQ(bf.num_blocks(), int64_t((uint64_t(64) << 20) / (uint64_t(70272) * 64)));
  LatentKvPool f(3, 24, 8, KvCacheOptions{4, 4096, DType::F32});
  EXPECT_EQ(f.bytes_per_token(), uint64_t((24 + 8) * 3 * 4));
  EXPECT_NE(f.describe().find("384 bytes/token"), std::string::npos) << f.describe();
}

TEST(KvCache, BlocksAreAllOrNothingAndReturnOnTruncate) {
  LatentKvPool p(2, 4, 2, KvCacheOptions{4, uint64_t(6 * 2 * 4) * 4 * 5, DType::F32});
  ASSERT_EQ(p.num_blocks(), 5);
  BlockTable a, b;
  EXPECT_TRUE(p.reserve(a, 9));  // 3 blocks
  EXPECT_EQ(a.blocks.size(), 3u);
  EXPECT_FALSE(p.reserve(b, 12));  // needs 3, 2 free: nothing taken
  EXPECT_TRUE(b.blocks.empty());
  EXPECT_EQ(p.free_blocks(), 2);
  a.length = 9;
  p.truncate(a, 4);
  EXPECT_EQ(a.blocks.size(), 1u);
  EXPECT_EQ(a.length, 4);
  EXPECT_TRUE(p.reserve(b, 12));
  p.release(a);
  p.release(b);
  EXPECT_EQ(p.free_blocks(), 5);
}

TEST(KvCache, RowsRoundTripInBothDtypes) {
  for (DType dt : {DType::F32, DType::BF16}) {
    LatentKvPool p(2, 3, 2, KvCacheOptions{2, 1 << 12, dt});
    BlockTable t;
    ASSERT_TRUE(p.reserve(t, 5));
    const float c[3] = {1.0f, -2.5f, 0.15625f}, k[2] = {3.0f, 0.5f};
    p.write(t, 1, 3, c, k);
    float out[2 * 5];
    p.read_rows(t, 1, 2, 2, out);
    EXPECT_EQ(out[5], 1.0f);
    EXPECT_EQ(out[6], -2.5f);
    EXPECT_EQ(out[7], 0.15625f);  // exact in BF16 too
    EXPECT_EQ(out[8], 3.0f);
    EXPECT_EQ(out[9], 0.5f);
  }
}

TEST(KvCache, BadOptionsAreInputErrors) {
  EXPECT_THROW(LatentKvPool(2, 4, 2, KvCacheOptions{64, 100, DType::F32}), InputError);
  EXPECT_THROW(LatentKvPool(2, 4, 2, KvCacheOptions{0, 1 << 20, DType::F32}), InputError);
  EXPECT_THROW(LatentKvPool(2, 4, 2, KvCacheOptions{64, 1 << 20, DType::F16}), InputError);
  try {
    LatentKvPool(61, 512, 64, KvCacheOptions{64, 1000, DType::BF16});
  } catch (const InputError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("1000"), std::string::npos) << m;
    EXPECT_NE(m.find("4497408"), std::string::npos) << m;  // 64 × 70,272
  }
}

}  // namespace
}  // namespace dsv3
