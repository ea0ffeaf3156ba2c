// FP8 weights (E4M3, 128×128 block scales, as DeepSeek-V3's release) in the decode kernels: the
// GEMV and the grouped experts widen them to BF16 on tensor cores and scale each k-block's sums
// (cuda_decode_mma.cuh). Against a double reference over the dequantized weights (what the CPU
// computes with the same checkpoint), under kF32: every path the shapes select (row-range GEMV, its
// K slices, the k-loop GEMV for K beyond four slices, a second weight in the same launch, 1 to 64
// rows; expert row-range and k-loop kernels, fused shared expert), and the outputs' guard bytes.
#include <gtest/gtest.h>

#include <cmath>

#include "../backend/harness.h"
#include "../backend/reference.h"
#include "backend/cuda/cuda_backend.h"
#include "infer/cuda_decode_ops.h"
#include "model/module_ops.h"
#include "model/presets.h"
#include "model/weights.h"

namespace dsv3::test {
namespace {

// A random [M, K] weight quantized to FP8 blocks, on the device, and its dequantized host copy.
struct Fp8Weight {
  LinearParam p;
  Tensor deq;
};
Fp8Weight fp8_weight(int64_t M, int64_t K, uint64_t seed) {
  CudaBackend& be = cuda_backend();
  // Rows of different magnitudes: the 128-row blocks get different scales.
  Tensor w = randn({M, K}, seed, 0);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t k = 0; k < K; ++k) w.data<float>()[r * K + k] *= std::ldexp(1.0f, int(r % 7) - 3);
  auto [q, s] = quantize_fp8_blocks(w);
  Fp8Weight f;
  f.deq = dequantize_fp8_blocks(q, s);
  f.p.w = be.to_device(q);
  f.p.scale_inv = be.to_device(s);
  return f;
}

// y[r, j] = y0[r, j] (when accumulating) + Σ_k x[r, k]·w[j, k], in double.
Vec reference(const Tensor& x, const Tensor& w, const Tensor* y0) {
  const int64_t n = x.dim(0), K = x.dim(1), M = w.dim(0);
  Vec want(size_t(n * M));
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < M; ++j) {
      double s = y0 ? double(y0->data<float>()[r * M + j]) : 0.0;
      for (int64_t k = 0; k < K; ++k) s += double(x.data<float>()[r * K + k]) * double(w.data<float>()[j * K + k]);
      want[size_t(r * M + j)] = s;
    }
  return want;
}

// K 144 and 1024: the row-range GEMV (one k-block per warp; 144 ends in a partial k-block and a
// partial scale block); 2240: its K slices at 9–32 rows (the k-loop GEMV otherwise); 4608 (beyond
// four slices): the k-loop GEMV. 300 outputs: three 128-row scale blocks, the last partial.
TEST(DecodeFp8, SmallLinearEqualsReference) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  for (int64_t K : {144, 1024, 2240, 4608})
    for (int64_t M : {37, 300}) {
      const Fp8Weight f = fp8_weight(M, K, 40 + uint64_t(K + M));
      for (int64_t n : {1, 3, 8, 19, 32, 64})
        for (bool acc : {false, true}) {
          if (K == 4608 && n != 3 && n != 32) continue;  // the k-loop kernel: one row count per n-tile width
          SCOPED_TRACE(cat("K ", K, " outputs ", M, " rows ", n, acc ? " accumulate" : ""));
          const Tensor x = randn({n, K}, 41, uint64_t(n)), y0 = randn({n, M}, 42, uint64_t(n));
          const Vec want = reference(x, f.deq, acc ? &y0 : nullptr);
          Guards g(be);
          const Tensor xd = be.to_device(x), yd = acc ? g.init(y0) : g.out(DType::F32, {n, M});
          ASSERT_TRUE(cuda_small_linear_ok(f.p, xd));
          EXPECT_FALSE(cuda_small_linear_fuses_norm(f.p));
          cuda_small_linear(f.p, xd, yd, acc);
          const Err e = compare(be.to_host(yd), want);
          EXPECT_LE(e.norm_err, tol::kF32) << "worst " << e.worst;
          EXPECT_EQ(e.non_finite, 0);
          EXPECT_EQ(g.damaged(), "");
        }
    }
}

// Two FP8 weights in one call (q_a with kv_a), each with its own scales: one launch, or two when the
// first weight's rows are no multiple of 16 (136); and weights that do not qualify (a K of no
// multiple of 16, missing or misshapen scales) are refused.
TEST(DecodeFp8, PairAndRefusals) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  const int64_t K = 512;
  const Fp8Weight b = fp8_weight(40, K, 51);
  for (int64_t M : {144, 136})
    for (int64_t n : {1, 32}) {
      SCOPED_TRACE(cat(M, " + 40 outputs, ", n, " rows"));
      const Fp8Weight a = fp8_weight(M, K, 50);
      const Tensor x = randn({n, K}, 52, uint64_t(n));
      Guards g(be);
      Tensor y = g.out(DType::F32, {n, M}), y2 = g.out(DType::F32, {n, 40});
      cuda_small_linear(a.p, be.to_device(x), y, false, nullptr, 0.0f, &b.p, &y2);
      const Err e = compare(be.to_host(y), reference(x, a.deq, nullptr));
      const Err e2 = compare(be.to_host(y2), reference(x, b.deq, nullptr));
      EXPECT_LE(e.norm_err, tol::kF32);
      EXPECT_LE(e2.norm_err, tol::kF32);
      EXPECT_EQ(e.non_finite + e2.non_finite, 0);
      EXPECT_EQ(g.damaged(), "");
    }
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

// The grouped experts with FP8 weights (and the shared expert fused as a group) against the CPU's
// moe_forward over the same checkpoint, for 1, 5 and 40 rows: the tiny preset (hidden 128: the
// row-range expert kernels) and a wide one (hidden 1152, experts 2112 wide: the k-loop kernels for
// gate/up and down).
TEST(DecodeFp8, GroupedMoeEqualsCpuMoeForward) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  ModelConfig wide = preset_config("tiny");
  wide.hidden_size = 1152;
  wide.moe_intermediate_size = 2112;
  wide.n_routed_experts = 4;
  wide.num_experts_per_tok = 2;
  wide.n_group = 1;
  wide.topk_group = 1;
  wide.num_hidden_layers = 2;
  wide.num_nextn_predict_layers = 0;
  for (const ModelConfig& cfg : {preset_config("tiny"), wide}) {
    SCOPED_TRACE(cat("hidden ", cfg.hidden_size));
    Weights host = Weights::random(cfg, 55, 0.05f);
    quantize_matrices_to_fp8(host);
    Weights dev = host;
    for (Param& p : dev.params()) {
      p.w = be.to_device(p.w);
      if (present(p.scale_inv)) p.scale_inv = be.to_device(p.scale_inv);
    }
    const ModelParams ph = bind_params(host), pd = bind_params(dev);
    const ModelDims d = model_dims(host.config());
    const size_t layer = 1;
    ASSERT_TRUE(ph.layers[layer].is_moe);
    ASSERT_EQ(pd.layers[layer].moe.experts[0].gate_proj.w.dtype(), DType::F8_E4M3);
    ASSERT_TRUE(cuda_moe_supported(pd.layers[layer].moe));
    const CudaMoeTables t = cuda_moe_tables(pd.layers[layer].moe);
    EXPECT_TRUE(t.shared);
    EXPECT_EQ(t.wt, DType::F8_E4M3);
    for (int64_t N : {1, 5, 40}) {
      SCOPED_TRACE(cat(N, " rows"));
      const Tensor x = randn({N, d.H}, 56, uint64_t(N)), res = randn({N, d.H}, 57, uint64_t(N));
      MoeActs a;
      moe_forward(cpu_backend(), d, ph.layers[layer].moe, x, a);
      Vec want = to_vec(res);
      const Vec moe = to_vec(a.out);
      for (size_t i = 0; i < want.size(); ++i) want[i] += moe[i];
      const Tensor rd = be.to_device(res);
      Guards g(be);
      const Tensor out = g.out(DType::F32, {N, d.H});
      const Tensor got =
          cuda_moe_forward(be, d, pd.layers[layer].moe, t, be.to_device(x), &rd, N <= 8, nullptr, nullptr, out);
      const Err e = compare(be.to_host(got), want);
      EXPECT_LE(e.norm_err, tol::kF32) << "worst " << e.worst;
      EXPECT_EQ(e.non_finite, 0);
      EXPECT_EQ(g.damaged(), "");
    }
  }
}

}  // namespace
}  // namespace dsv3::test
