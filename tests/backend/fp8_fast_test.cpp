// The fast FP8 paths (quantize_fp8_fast, dequantize_fp8_fast, fp8_gemm_fast) against the reference
// ops of backend/cpu/fp8.cpp: every quantized byte, every scale and every GEMM output bit equal.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>

#include "backend/fp8.h"
#include "core/error.h"
#include "harness.h"

namespace dsv3::test {
namespace {

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Q {
  Tensor q, s;
  int64_t nonfinite = 0;
};
Q run_quant(bool fast, const Tensor& x, Fp8Tiling t, bool pow2, bool transpose) {
  int64_t M = x.dim(0), K = x.dim(1);
  int64_t th = t == Fp8Tiling::Row1x128 ? 1 : 128, tw = t == Fp8Tiling::Col128x1 ? 1 : 128;
  int64_t g0 = cdiv(M, th), g1 = cdiv(K, tw);
  Q o{Tensor::empty(DType::F8_E4M3, transpose ? Shape{K, M} : Shape{M, K}),
      Tensor::empty(DType::F32, transpose ? Shape{g1, g0} : Shape{g0, g1})};
  QuantizeFp8Args a;
  a.x = x;
  a.tiling = t;
  a.pow2_scale = pow2;
  a.transpose_out = transpose;
  a.q = o.q;
  a.scale = o.s;
  a.on_nonfinite = NonFinitePolicy::Report;
  o.nonfinite = fast ? quantize_fp8_fast(a).nonfinite : quantize_fp8(a).nonfinite;
  return o;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.numel() == b.numel() && std::memcmp(a.raw(), b.raw(), size_t(a.numel()) * dtype_size(a.dtype())) == 0;
}

void expect_same_quant(const Tensor& x, const char* what) {
  for (Fp8Tiling t : {Fp8Tiling::Row1x128, Fp8Tiling::Col128x1, Fp8Tiling::Block128x128})
    for (bool pow2 : {false, true})
      for (bool tr : {false, true}) {
        SCOPED_TRACE(cat(what, " ", fp8_tiling_name(t), pow2 ? " pow2" : "", tr ? " transposed" : ""));
        Q ref = run_quant(false, x, t, pow2, tr), got = run_quant(true, x, t, pow2, tr);
        ASSERT_TRUE(same_bytes(ref.q, got.q));
        ASSERT_TRUE(same_bytes(ref.s, got.s));
        ASSERT_EQ(ref.nonfinite, got.nonfinite);
      }
}

// Values spanning many binades (so tiles have very different amax), some exact zeros and -0.
Tensor wide(int64_t M, int64_t K, uint64_t seed) {
  Tensor x = randn({M, K}, seed, 1);
  for (int64_t i = 0; i < M * K; ++i) {
    float& v = x.data<float>()[i];
    v *= std::ldexp(1.0f, int(rng_u64(seed, 2, uint64_t(i)) % 40) - 20);
    if (rng_u64(seed, 3, uint64_t(i)) % 50 == 0) v = (i & 1) ? 0.0f : -0.0f;
  }
  return x;
}

TEST(Fp8Fast, EncoderMatchesFloatToE4m3OverTheFp32Line) {
  // Rows of 128 whose first element is 448, so the scale is exactly 1 and x/s = x: the other 127
  // elements probe the encoder on every 397th FP32 pattern of [0, 448] (both signs), and on every
  // E4M3 value and midpoint ±4 ulps (the ties and the subnormal/normal seam).
  std::vector<float> probes;
  for (uint32_t b = 0; b <= 0x43e00000u; b += 397) probes.push_back(std::bit_cast<float>(b));
  for (int c = 0; c < 0x7f; ++c) {
    const float v = e4m3_to_float(uint8_t(c)), next = e4m3_to_float(uint8_t(c + 1));
    const float mid = c + 1 < 0x7f ? 0.5f * (v + next) : 448.0f;
    for (float base : {v, mid})
      for (int d = -4; d <= 4; ++d) {
        const int64_t bits = int64_t(std::bit_cast<uint32_t>(base)) + d;
        if (bits >= 0 && bits <= 0x43e00000) probes.push_back(std::bit_cast<float>(uint32_t(bits)));
      }
  }
  const int64_t per_row = 127, M = 2 * cdiv(int64_t(probes.size()), per_row);
  Tensor x = Tensor::zeros(DType::F32, {M, 128});
  for (int64_t r = 0; r < M; ++r) {
    x.data<float>()[r * 128] = 448.0f;
    for (int64_t k = 1; k < 128; ++k) {
      size_t i = size_t((r / 2) * per_row + k - 1);
      float v = i < probes.size() ? probes[i] : 0.0f;
      x.data<float>()[r * 128 + k] = r % 2 ? -v : v;
    }
  }
  Q ref = run_quant(false, x, Fp8Tiling::Row1x128, false, false);
  Q got = run_quant(true, x, Fp8Tiling::Row1x128, false, false);
  for (int64_t r = 0; r < M; ++r) ASSERT_EQ(ref.s.data<float>()[r], 1.0f);
  const uint8_t* a = static_cast<const uint8_t*>(ref.q.raw());
  const uint8_t* b = static_cast<const uint8_t*>(got.q.raw());
  for (int64_t i = 0; i < M * 128; ++i)
    ASSERT_EQ(a[i], b[i]) << "x = " << x.data<float>()[i] << " (bits 0x" << std::hex
                          << std::bit_cast<uint32_t>(x.data<float>()[i]) << ")";
}

TEST(Fp8Fast, QuantizeBytesAndScalesEqualTheReference) {
  expect_same_quant(wide(130, 300, 7), "130x300");  // edge tiles in both dims
  expect_same_quant(wide(257, 129, 8), "257x129");
  expect_same_quant(wide(1, 1, 9), "1x1");
  expect_same_quant(randn({64, 256}, 10, 1, 1e-40f), "subnormal inputs");  // amax/448 underflows
  Tensor z = Tensor::zeros(DType::F32, {3, 200});
  z.data<float>()[5] = -0.0f;
  expect_same_quant(z, "all zero");
}

TEST(Fp8Fast, NonFiniteInputsSaturateAndAreCountedLikeTheReference) {
  Tensor x = wide(140, 260, 11);
  x.data<float>()[3] = INFINITY;
  x.data<float>()[260 * 7 + 100] = -INFINITY;
  x.data<float>()[260 * 130 + 259] = NAN;
  x.data<float>()[260 * 131 + 1] = -NAN;
  expect_same_quant(x, "non-finite");
  Tensor q = Tensor::empty(DType::F8_E4M3, {140, 260}), s = Tensor::empty(DType::F32, {140, 3});
  QuantizeFp8Args a;
  a.x = x;
  a.q = q;
  a.scale = s;
  a.name = "probe";
  std::string ref_msg, fast_msg;
  try {
    quantize_fp8(a);
  } catch (const InputError& e) {
    ref_msg = e.what();
  }
  try {
    quantize_fp8_fast(a);
  } catch (const InputError& e) {
    fast_msg = e.what();
  }
  EXPECT_FALSE(ref_msg.empty());
  EXPECT_EQ(fast_msg, ref_msg);
}

TEST(Fp8Fast, DequantizeEqualsTheReference) {
  Tensor x = wide(200, 300, 12);
  for (Fp8Tiling t : {Fp8Tiling::Row1x128, Fp8Tiling::Col128x1, Fp8Tiling::Block128x128}) {
    Q o = run_quant(false, x, t, false, false);
    Tensor a = Tensor::empty(DType::F32, {200, 300}), b = Tensor::empty(DType::F32, {200, 300});
    dequantize_fp8(o.q, o.s, a);
    dequantize_fp8_fast(o.q, o.s, b);
    EXPECT_TRUE(same_bytes(a, b)) << fp8_tiling_name(t);
  }
}

TEST(Fp8Fast, GemmOutputBitsEqualTheReference) {
  struct Case {
    int64_t M, N, K;
    Fp8Tiling ta, tb;
  } cases[] = {{70, 200, 300, Fp8Tiling::Row1x128, Fp8Tiling::Block128x128},
               {130, 90, 384, Fp8Tiling::Row1x128, Fp8Tiling::Row1x128},
               {200, 140, 260, Fp8Tiling::Block128x128, Fp8Tiling::Row1x128},
               {1, 3, 5, Fp8Tiling::Row1x128, Fp8Tiling::Block128x128}};
  for (const Case& cs : cases) {
    SCOPED_TRACE(cat(cs.M, "x", cs.N, "x", cs.K));
    Q a = run_quant(false, wide(cs.M, cs.K, 13), cs.ta, false, false);
    Q b = run_quant(false, randn({cs.N, cs.K}, 14, 1, 0.05f), cs.tb, false, false);
    for (DType out : {DType::F32, DType::BF16})
      for (bool accumulate : {false, true}) {
        Tensor c0 = randn({cs.M, cs.N}, 15, 1, 1.0f, out), c1 = c0.clone();
        Fp8GemmArgs g{a.q, a.s, b.q, b.s, c0};
        g.accumulate = accumulate;
        fp8_gemm(g);
        g.c = c1;
        fp8_gemm_fast(g);
        ASSERT_TRUE(same_bytes(c0, c1)) << dtype_name(out) << (accumulate ? " accumulate" : "");
      }
  }
}

}  // namespace
}  // namespace dsv3::test
