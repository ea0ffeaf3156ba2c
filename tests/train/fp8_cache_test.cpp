// --precision fp8 keeps linear-layer inputs (and the SwiGLU inputs) in FP8 for the backward:
// the cached path gives the numbers of the re-quantizing path bit for bit, and what a forward stores
// is what `dsv3 info --train` reports per token (train/precision_memory.h).
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "backend/fp8.h"
#include "core/rng.h"
#include "model/model.h"
#include "model/presets.h"
#include "train/precision_memory.h"

namespace dsv3 {
namespace {

Tensor randn(const Shape& s, uint64_t seed, float scale = 1.0f) {
  Tensor t = Tensor::empty(DType::F32, s);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = scale * rng_normal(seed, 1, uint64_t(i));
  return t;
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.numel() == b.numel() && std::memcmp(a.raw(), b.raw(), size_t(a.numel()) * dtype_size(a.dtype())) == 0;
}

// Restores the process-wide precision whatever the test does.
struct PrecisionGuard {
  LinearPrecision saved = linear_precision();
  ~PrecisionGuard() { linear_precision() = saved; }
};

TEST(Fp8Cache, CachedInputGivesTheRequantizingPathBitForBit) {
  const int64_t M = 200, K = 300, N = 150;  // partial tiles along every dimension
  Tensor x = randn({M, K}, 1), w = randn({N, K}, 2, 0.05f), dy = randn({M, N}, 3);
  for (bool pow2 : {false, true})
    for (bool block : {false, true}) {
      LinearPrecision p{LinearPrecisionMode::Fp8, pow2, block};
      Tensor y0 = Tensor::empty(DType::F32, {M, N}), y1 = y0.clone(), y2 = y0.clone();
      Tensor dw0 = Tensor::zeros(DType::F32, {N, K}), dw1 = dw0.clone();
      linear_lowp(p, {x, w, Tensor(), y0});
      Fp8Tiles cache;
      linear_lowp(p, {x, w, Tensor(), y1}, &cache);  // fills the cache
      ASSERT_TRUE(cache.defined());
      linear_lowp(p, {x, w, Tensor(), y2}, &cache);  // a second projection of the same input reuses it
      EXPECT_TRUE(same_bits(y0, y1));
      EXPECT_TRUE(same_bits(y0, y2));
      LinearBackwardArgs b;
      b.dy = dy, b.x = x, b.w = w, b.dw = dw0;
      linear_backward_lowp(p, b);
      b.dw = dw1;
      linear_backward_lowp(p, b, &cache);
      EXPECT_TRUE(same_bits(dw0, dw1)) << "pow2 " << pow2 << " block " << block;
      // The cache is the forward's 1×128 quantization of x: E4M3 bytes plus one FP32 scale per tile.
      EXPECT_EQ(cache.bytes(), M * K + M * ((K + 127) / 128) * 4);
    }
}

// The model's linear layer refuses a cached copy of x made under another precision (FP8 tiles read
// as a BF16 copy, or the other way round) instead of reading its bytes as the wrong type.
TEST(Fp8Cache, CacheFromAnotherPrecisionIsRefused) {
  PrecisionGuard guard;
  const int64_t M = 4, K = 128, N = 16;
  LinearParam w, g;
  w.w = randn({N, K}, 2, 0.05f);
  w.lowp = true;
  g.w = Tensor::zeros(DType::F32, {N, K});
  Tensor x = randn({M, K}, 1), y = Tensor::empty(DType::F32, {M, N}), dy = randn({M, N}, 3);
  linear_precision() = LinearPrecision{LinearPrecisionMode::Fp8};
  Fp8Tiles cache;
  linear_forward(cpu_backend(), w, x, y, false, &cache);
  ASSERT_EQ(cache.q.dtype(), DType::F8_E4M3);
  linear_backward(cpu_backend(), w, g, x, dy, Tensor(), false, &cache);  // same precision: fine
  linear_precision() = LinearPrecision{LinearPrecisionMode::Bf16};
  EXPECT_THROW(linear_backward(cpu_backend(), w, g, x, dy, Tensor(), false, &cache), InternalError);
  Fp8Tiles bf16_copy{x.to(DType::BF16), Tensor(), 0};
  linear_precision() = LinearPrecision{LinearPrecisionMode::Fp8};
  EXPECT_THROW(linear_forward(cpu_backend(), w, x, y, false, &bf16_copy), InternalError);
}

int64_t bytes_of(const MlaActs& a) { return a.x_fp8.bytes() + a.q_a_n_fp8.bytes() + a.c_kv_n_fp8.bytes() + a.attn_fp8.bytes(); }
int64_t bytes_of(const MlpActs& a) { return a.x_fp8.bytes() + a.gate_fp8.bytes() + a.up_fp8.bytes(); }
int64_t bytes_of(const LayerActs& a) {
  return bytes_of(a.attn) + bytes_of(a.mlp) + bytes_of(a.moe.routed) + bytes_of(a.moe.shared);
}

TEST(Fp8Cache, StoredFp8BytesPerTokenAreWhatInfoTrainReports) {
  PrecisionGuard guard;
  ModelConfig cfg = preset_config("tiny");
  Weights w = Weights::random(cfg, 5, 0.02f);
  const int64_t B = 2, T = 24;
  std::vector<int32_t> ids(size_t(B * T));
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = int32_t(rng_u64(6, 0, i) % uint64_t(cfg.vocab_size));
  double expected = -1;
  for (const PrecisionActivationBytes& p : activation_bytes_per_token(cfg))
    if (p.precision == "fp8") expected = p.total();
  ASSERT_GT(expected, 0);

  linear_precision() = LinearPrecision{LinearPrecisionMode::Fp8};
  Model m(w, cpu_backend());
  ForwardOptions opt;
  opt.keep_activations = true;
  m.forward(ids, B, T, opt);
  const ModelActs& a = m.acts();
  // Main layers cache B·T rows; MTP module k runs on B·(T−k) rows: each counts per own token.
  double per_token = 0;
  for (const LayerActs& l : a.layers) per_token += double(bytes_of(l)) / double(B * T);
  ASSERT_EQ(a.mtp.size(), size_t(cfg.num_nextn_predict_layers));
  for (size_t k = 0; k < a.mtp.size(); ++k)
    per_token += double(a.mtp[k].cat_fp8.bytes() + bytes_of(a.mtp[k].block)) / double(B * (T - int64_t(k) - 1));
  EXPECT_DOUBLE_EQ(per_token, expected);

  // Other precisions keep no FP8 copies.
  linear_precision() = LinearPrecision{LinearPrecisionMode::Bf16};
  m.forward(ids, B, T, opt);
  int64_t none = 0;
  for (const LayerActs& l : m.acts().layers) none += bytes_of(l);
  EXPECT_EQ(none, 0);
}

}  // namespace
}  // namespace dsv3
