// FP8 weights (E4M3, 128×128 block scales, as DeepSeek-V3's release) in the decode kernels: the
// GEMV and the grouped experts widen them to BF16 on tensor cores and scale each k-block's sums
// (cuda_decode_mma.cuh). Against a double reference over the dequantized weights (what the CPU
// computes with the same checkpoint), under kF32: every path the shapes select (row-range GEMV, its
// K slices, the k-loop GEMV for K beyond four slices, a second weight in the same launch, 1 to 64
// rows, the per-head form), and the outputs' guard bytes. The FP8 experts are in
// CudaEngine.GroupedMoeEqualsCpuMoeForward.
#include <gtest/gtest.h>

#include <cmath>

#include "../backend/harness.h"
#include "../backend/reference.h"
#include "backend/cuda/cuda_backend.h"
#include "infer/cuda_decode_ops.h"
#include "model/weights.h"
#include "small_linear_check.h"

namespace dsv3::test {
namespace {

// A random [M, K] weight quantized to FP8 blocks, on the device, and its dequantized host copy.
struct Fp8Weight {
  LinearParam p;
  Tensor deq;
};
Fp8Weight fp8_weight(int64_t M, int64_t K, uint64_t seed) {
  CudaBackend& be = cuda_backend();
  // Blocks of different magnitudes: a wrong scale row or column shows.
  Tensor w = randn({M, K}, seed, 0);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t k = 0; k < K; ++k)
      w.data<float>()[r * K + k] *= std::ldexp(1.0f, int((3 * (r / 128) + k / 128) % 7) - 3);
  auto [q, s] = quantize_fp8_blocks(w);
  Fp8Weight f;
  f.deq = dequantize_fp8_blocks(q, s);
  f.p.w = be.to_device(q);
  f.p.scale_inv = be.to_device(s);
  return f;
}

// K 144 and 1024: the row-range GEMV (one k-block per warp; 144 ends in a partial k-block and a
// partial scale block); 1552: two rounds of k-blocks per warp at 9–128 rows (each block's own
// scale), 2240: K slices of two rounds and one (the k-loop GEMV otherwise); 9216 (beyond four
// slices): the k-loop GEMV. 300 outputs: three 128-row scale blocks, the last partial.
TEST(DecodeFp8, SmallLinearEqualsReference) {
  ASSERT_GT(cuda_device_count(), 0);
  for (int64_t K : {144, 1024, 1552, 2240, 9216})
    for (int64_t M : {37, 300}) {
      const Fp8Weight f = fp8_weight(M, K, 40 + uint64_t(K + M));
      EXPECT_FALSE(cuda_small_linear_fuses_norm(f.p));
      for (int64_t n : {1, 3, 8, 12, 19, 32, 64, 100})
        for (bool acc : {false, true}) {
          // the k-loop kernel: fewer row counts (100: two CTAs of 64 rows along the grid's y)
          if (K == 9216 && n != 3 && n != 12 && n != 32 && n != 100) continue;
          SCOPED_TRACE(cat("K ", K, " outputs ", M, " rows ", n, acc ? " accumulate" : ""));
          expect_small_linear_matches(f.p, f.deq, randn({n, K}, 41, uint64_t(n)), randn({n, M}, 42, uint64_t(n)),
                                      acc);
        }
    }
}

// Two FP8 weights in one call (q_a with kv_a), each with its own scales: one launch (the row-range
// GEMV at K 512, in two rounds at K 1552 from 9 rows, the k-loop one at K 2112), or two when the first
// weight's rows are no multiple of 16 (136); and weights that do not qualify (a K of no multiple of
// 16, missing or misshapen scales) are refused.
TEST(DecodeFp8, PairAndRefusals) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  for (int64_t K : {512, 1552, 2112})
    for (int64_t M : {144, 136})
      for (int64_t n : {1, 32, 40, 100}) {
        SCOPED_TRACE(cat("K ", K, ", ", M, " + 40 outputs, ", n, " rows"));
        const Fp8Weight a = fp8_weight(M, K, 50), b = fp8_weight(40, K, 51);
        const Tensor x = randn({n, K}, 52, uint64_t(n));
        Guards g(be);
        Tensor y = g.out(DType::F32, {n, M}), y2 = g.out(DType::F32, {n, 40});
        cuda_small_linear(a.p, be.to_device(x), y, false, nullptr, 0.0f, &b.p, &y2);
        const Err e = compare(be.to_host(y), ref::linear(to_vec(x), to_vec(a.deq), n, M, K));
        const Err e2 = compare(be.to_host(y2), ref::linear(to_vec(x), to_vec(b.deq), n, 40, K));
        EXPECT_LE(e.norm_err, tol::kF32);
        EXPECT_LE(e2.norm_err, tol::kF32);
        EXPECT_EQ(e.non_finite + e2.non_finite, 0);
        EXPECT_EQ(g.damaged(), "");
      }
  const int64_t K = 512;
  const Fp8Weight a = fp8_weight(144, K, 50);
  const Tensor x = be.to_device(randn({2, 40}, 53, 0));
  LinearParam odd;
  auto [q, s] = quantize_fp8_blocks(randn({16, 40}, 53, 1));
  odd.w = be.to_device(q);
  odd.scale_inv = be.to_device(s);
  EXPECT_FALSE(cuda_small_linear_ok(odd, x)) << "K 40 is no multiple of 16";
  LinearParam no_scales = a.p;
  no_scales.scale_inv = Tensor();
  EXPECT_FALSE(cuda_small_linear_ok(no_scales, be.to_device(randn({2, K}, 53, 2))));
  LinearParam bad_scales = a.p;
  bad_scales.scale_inv = be.to_device(randn({1, 4}, 53, 3));
  EXPECT_FALSE(cuda_small_linear_ok(bad_scales, be.to_device(randn({2, K}, 53, 2))));
}

// The per-head form (the absorbed W_UKᵀ / W_UV): output row (h, i) reads x's head-h slice and
// writes y[q, h·head_y + i]; heads of 48 rows, so scale blocks straddle heads (scales follow the
// global row). The row-range GEMV (K 128, 12 rows; K 1040 in two rounds, 12 and 40 rows) and the
// k-loop one (K 2112); the columns between heads' outputs stay untouched.
TEST(DecodeFp8, HeadsEqualReference) {
  ASSERT_GT(cuda_device_count(), 0);
  const int64_t nh = 3, head_rows = 48, head_y = 56;
  for (int64_t K : {128, 1040, 2112})
    for (int64_t n : {12, 40}) {
      if (K == 128 && n == 40) continue;
      SCOPED_TRACE(cat("K ", K, ", ", n, " rows"));
      const int64_t head_x = K + 4;
      const Fp8Weight f = fp8_weight(nh * head_rows, K, 60 + uint64_t(K));
      expect_heads_gemv_matches(f.p.w, f.p.scale_inv, f.deq, nh, head_rows, head_x, head_y,
                                randn({n, nh * head_x}, 61, uint64_t(n)), randn({n, nh * head_y}, 62, uint64_t(n)));
    }
}

}  // namespace
}  // namespace dsv3::test
