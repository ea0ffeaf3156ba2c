// FP8 on the GPU against the CPU reference (backend/fp8.h): tile quantization must give the same
// bytes and scales; cuBLASLt's block-scaled GEMM with BF16 output (the form the recipe uses) must
// match the exact-FP32 CPU emulation within kBf16: the output's BF16 rounding (2^-9) dominates the
// tensor cores' limited in-chunk accumulation (~2^-14 per 128-element chunk, promoted to FP32),
// while a wrong scale layout or operand order gives errors of order 1.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "../backend/harness.h"
#include "backend/cuda/cuda_backend.h"

namespace dsv3::test {
namespace {

struct QCase {
  Fp8Tiling tiling;
  bool pow2, transpose;
};

// Every tiling with and without transposed output (the transposed 1×128 and the plain 128×1 take
// the generic kernel, the others their own), power-of-two scales on each: x's codes and scales on
// the GPU are the CPU's, byte for byte.
void expect_cpu_bytes(const Tensor& x) {
  CudaBackend& be = cuda_backend();
  const int64_t m = x.dim(0), k = x.dim(1);
  for (QCase c : {QCase{Fp8Tiling::Row1x128, false, false}, QCase{Fp8Tiling::Row1x128, true, false},
                  QCase{Fp8Tiling::Row1x128, false, true}, QCase{Fp8Tiling::Col128x1, false, true},
                  QCase{Fp8Tiling::Col128x1, false, false}, QCase{Fp8Tiling::Col128x1, true, false},
                  QCase{Fp8Tiling::Block128x128, false, false}, QCase{Fp8Tiling::Block128x128, true, true}}) {
    SCOPED_TRACE(cat(fp8_tiling_name(c.tiling), " pow2=", c.pow2, " transpose=", c.transpose));
    int64_t th = c.tiling == Fp8Tiling::Row1x128 ? 1 : 128, tw = c.tiling == Fp8Tiling::Col128x1 ? 1 : 128;
    int64_t g0 = (m + th - 1) / th, g1 = (k + tw - 1) / tw;
    Shape qs = c.transpose ? Shape{k, m} : Shape{m, k}, ss = c.transpose ? Shape{g1, g0} : Shape{g0, g1};
    Tensor q_cpu = Tensor::empty(DType::F8_E4M3, qs), s_cpu = Tensor::empty(DType::F32, ss);
    quantize_fp8({x, c.tiling, c.pow2, c.transpose, q_cpu, s_cpu});
    Guards g(be);  // NaN-filled outputs inside guard bytes: a missed or stray write shows up
    Tensor q_gpu = g.out(DType::F8_E4M3, qs), s_gpu = g.out(DType::F32, ss);
    Fp8Status st = cuda_quantize_fp8({be.to_device(x), c.tiling, c.pow2, c.transpose, q_gpu, s_gpu});
    EXPECT_EQ(st.nonfinite, 0);
    EXPECT_EQ(g.damaged(), "");
    Tensor qh = be.to_host(q_gpu), sh = be.to_host(s_gpu);
    EXPECT_EQ(std::memcmp(qh.raw(), q_cpu.raw(), q_cpu.nbytes()), 0) << "FP8 codes differ";
    EXPECT_EQ(std::memcmp(sh.raw(), s_cpu.raw(), s_cpu.nbytes()), 0) << "scales differ";
  }
}

TEST(CudaFp8, QuantizeMatchesCpuBytes) {
  ASSERT_GT(cuda_device_count(), 0);
  int64_t m = 260, k = 300;  // partial tiles in both directions
  Tensor x = randn({m, k}, 7, 1, 3.0f);
  x.data<float>()[5] = 0.0f;
  for (int64_t j = 256; j < 300; ++j) x.data<float>()[j] = 0.0f;  // an all-zero 1×128 edge tile
  expect_cpu_bytes(x);
}

// The GPU divides by a tile's scale through its reciprocal and two fma corrections (quantize.cu,
// ScaleDiv), the CPU by a division: quotients at and a few ulps around every E4M3 rounding midpoint
// (ties go to even, so an ulp decides the code), for scales 2^-120 .. 2^118 in 1×128 rows — beyond
// the reciprocal's range [2^-80, 2^100] at both ends, where the GPU divides too — with subnormal
// values in the smallest. The other tilings see the same values under their own scales.
TEST(CudaFp8, QuantizeRoundsMidpointsLikeCpu) {
  ASSERT_GT(cuda_device_count(), 0);
  expect_cpu_bytes(fp8_midpoints(239, 128, 9, -120));
}

TEST(CudaFp8, QuantizeCountsNonFinite) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  Tensor x = randn({4, 256}, 7, 2);
  x.data<float>()[3] = INFINITY;
  x.data<float>()[700] = NAN;
  Tensor q = be.alloc(DType::F8_E4M3, {4, 256}), s = be.alloc(DType::F32, {4, 2});
  QuantizeFp8Args a{be.to_device(x), Fp8Tiling::Row1x128, false, false, q, s};
  a.on_nonfinite = NonFinitePolicy::Report;
  EXPECT_EQ(cuda_quantize_fp8(a).nonfinite, 2);
  a.on_nonfinite = NonFinitePolicy::Throw;
  EXPECT_THROW(cuda_quantize_fp8(a), InputError);
}

// Fprop shape: a per 1×128, b per 128×128 (and the Wgrad form: both per 1×128).
void gemm_case(int64_t m, int64_t n, int64_t k, bool b_block) {
  CudaBackend& be = cuda_backend();
  Tensor x = randn({m, k}, 11, 1), w = randn({n, k}, 11, 2, 0.05f);
  Tensor qa = Tensor::empty(DType::F8_E4M3, {m, k}), sa = Tensor::empty(DType::F32, {m, k / 128});
  quantize_fp8({x, Fp8Tiling::Row1x128, false, false, qa, sa});
  Shape sbs = b_block ? Shape{(n + 127) / 128, k / 128} : Shape{n, k / 128};
  Tensor qb = Tensor::empty(DType::F8_E4M3, {n, k}), sb = Tensor::empty(DType::F32, sbs);
  quantize_fp8({w, b_block ? Fp8Tiling::Block128x128 : Fp8Tiling::Row1x128, false, false, qb, sb});
  Tensor c_cpu = Tensor::empty(DType::F32, {m, n});
  fp8_gemm({qa, sa, qb, sb, c_cpu});
  Guards g(be);  // a NaN-filled output inside guard bytes
  Tensor c = g.out(DType::BF16, {m, n});
  cuda_fp8_gemm({be.to_device(qa), be.to_device(sa), be.to_device(qb), be.to_device(sb), c});
  Err e = compare(be.to_host(c), to_vec(c_cpu));
  EXPECT_EQ(e.non_finite, 0);
  EXPECT_EQ(g.damaged(), "");
  EXPECT_LE(e.norm_err, tol::kBf16) << "M=" << m << " N=" << n << " K=" << k;
}

TEST(CudaFp8, GemmFpropBlockScaledWeights) {
  ASSERT_GT(cuda_device_count(), 0);
  gemm_case(64, 400, 512, true);  // N = 400: the last 128-row weight block is partial
  gemm_case(128, 256, 1024, true);
}
TEST(CudaFp8, GemmWgradBothRowScaled) {
  ASSERT_GT(cuda_device_count(), 0);
  gemm_case(96, 128, 256, false);
}

// The linear layer's NaN propagation relies on cuBLASLt's block-scaled GEMM carrying a NaN scale
// into the outputs it multiplies: a NaN 1×128 scale of a's row 3 → row 3 NaN; a NaN weight block
// (rows 128..255 of b) → output columns 128..255 NaN; every weight scale NaN → every output NaN,
// with and without accumulate (c + NaN).
TEST(CudaFp8, NanScalesReachTheirOutputs) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  const int64_t m = 64, n = 256, k = 512;
  Tensor x = randn({m, k}, 11, 1), w = randn({n, k}, 11, 2, 0.05f);
  Tensor qa = Tensor::empty(DType::F8_E4M3, {m, k}), sa = Tensor::empty(DType::F32, {m, k / 128});
  quantize_fp8({x, Fp8Tiling::Row1x128, false, false, qa, sa});
  Tensor qb = Tensor::empty(DType::F8_E4M3, {n, k}), sb = Tensor::empty(DType::F32, {n / 128, k / 128});
  quantize_fp8({w, Fp8Tiling::Block128x128, false, false, qb, sb});
  for (int mode = 0; mode < 3; ++mode)
    for (bool acc : {false, true}) {
      SCOPED_TRACE(cat("mode ", mode, " accumulate ", acc));
      Tensor sa2 = sa.clone(), sb2 = sb.clone();
      if (mode == 0) sa2.data<float>()[3 * (k / 128) + 1] = NAN;
      if (mode == 1) sb2.data<float>()[1 * (k / 128) + 2] = NAN;
      if (mode == 2)
        for (int64_t i = 0; i < sb2.numel(); ++i) sb2.data<float>()[i] = NAN;
      Tensor c = be.to_device(randn({m, n}, 11, 3));
      Fp8GemmArgs g{be.to_device(qa), be.to_device(sa2), be.to_device(qb), be.to_device(sb2), c};
      g.accumulate = acc;
      cuda_fp8_gemm(g);
      Tensor h = be.to_host(c);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) {
          const bool want = mode == 2 || (mode == 0 && i == 3) || (mode == 1 && j >= 128);
          ASSERT_EQ(std::isnan(h.data<float>()[i * n + j]), want) << i << ", " << j;
        }
    }
}

}  // namespace
}  // namespace dsv3::test
