// The experts' fused SwiGLU with its FP8 tiles (backend/fp8.h swiglu_fp8, swiglu_fp8_recompute and
// swiglu_backward_fp8; backend/cuda/swiglu_fp8.cu) against what it replaces: the CUDA swiglu op and
// fp8_tiles of gate, up and out; in the backward dequantize, swiglu and fp8_tiles; swiglu_backward
// of the dequantized tiles — every float and code bit for bit, NaN-marked scales included — and
// against the CPU: the tiles of gate and up are the CPU quantizer's own, out's tiles the CPU's of
// the GPU's out, out the CPU's SwiGLU within kF32.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "../backend/harness.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/linear_lowp.h"
#include "backend/tolerance.h"

namespace dsv3::test {
namespace {

// Bits of a tensor (device or host): floats compared by their patterns, NaN included.
std::vector<uint8_t> bits(const Tensor& t) {
  const Tensor h = t.device() == Device::CUDA ? cuda_backend().to_host(t) : t;
  const uint8_t* p = static_cast<const uint8_t*>(h.raw());
  return {p, p + h.nbytes()};
}
// any_nan: F32 NaNs are equal whatever their payload (the CPU's products keep the NaN operand's,
// the GPU's give the canonical one).
int64_t diffs(const Tensor& got, const Tensor& want, bool any_nan = false) {
  const std::vector<uint8_t> a = bits(got), b = bits(want);
  if (a.size() != b.size()) return -1;
  const size_t w = dtype_size(got.dtype());
  int64_t d = 0;
  for (size_t i = 0; i < a.size(); i += w) {
    if (any_nan && got.dtype() == DType::F32) {
      float x, y;
      std::memcpy(&x, &a[i], 4);
      std::memcpy(&y, &b[i], 4);
      if (std::isnan(x) && std::isnan(y)) continue;
    }
    d += std::memcmp(&a[i], &b[i], w) != 0;
  }
  return d;
}
void expect_same(const Fp8Tiles& got, const Fp8Tiles& want, const char* what, bool any_nan = false) {
  EXPECT_EQ(diffs(got.q, want.q), 0) << what << " codes";
  EXPECT_EQ(diffs(got.scale, want.scale, any_nan), 0) << what << " scales";
}
// The CPU quantizer's tiles of a device tensor's values, a tile with NaN / Inf NaN-marked as the
// GPU's training quantizers mark it (backend/cuda/linear_lowp.h; the CPU counts such values).
Fp8Tiles cpu_tiles(const Tensor& x, bool pow2) {
  const Tensor h = cuda_backend().to_host(x);
  Fp8Tiles t = fp8_tiles(h, pow2, "test");
  const int64_t K = h.dim(-1), ng = t.scale.dim(1);
  for (int64_t i = 0; i < h.numel(); ++i)
    if (!std::isfinite(h.data<float>()[i])) t.scale.data<float>()[(i / K) * ng + (i % K) / 128] = NAN;
  return t;
}

// Gate and up [M, I] with NaN and ±Inf in a few tiles and one all-zero tile of gate (scale 1).
struct Inputs {
  Tensor gate, up;  // host
  Inputs(int64_t M, int64_t I, uint64_t seed) : gate(randn({M, I}, seed, 1, 2.0f)), up(randn({M, I}, seed, 2)) {
    float* g = gate.data<float>();
    float* u = up.data<float>();
    g[5 * I + 10] = NAN;
    g[9 * I + I - 2] = -INFINITY;
    u[7 * I + I / 2] = INFINITY;
    for (int64_t c = 0; c < std::min<int64_t>(I, 128); ++c) g[11 * I + c] = 0.0f;
  }
};

SwigluArgs args(const Tensor& g, const Tensor& u, const Tensor& out) {
  SwigluArgs s;
  s.gate = g;
  s.up = u;
  s.out = out;
  return s;
}

// out (device) against the CPU's SwiGLU of the same inputs: finite values within kF32, the
// non-finite ones the same (NaN of any payload).
void expect_cpu_swiglu(const Inputs& in, const Tensor& out) {
  const int64_t M = in.gate.dim(0), I = in.gate.dim(1);
  Tensor cpu_out = Tensor::empty(DType::F32, {M, I});
  cpu_backend().swiglu(args(in.gate, in.up, cpu_out));
  Vec want = to_vec(cpu_out), got = to_vec(cuda_backend().to_host(out));
  for (size_t i = 0; i < want.size(); ++i)
    if (!std::isfinite(want[i])) {
      EXPECT_TRUE(got[i] == want[i] || (std::isnan(got[i]) && std::isnan(want[i])))
          << i << ": " << got[i] << " against " << want[i];
      got[i] = want[i] = 0.0;  // compare() takes the finite values
    }
  const Err e = compare(host_f32({M, I}, got), want);
  EXPECT_EQ(e.non_finite, 0);
  EXPECT_LE(e.norm_err, tol::kF32);
}

// Forward, recomputation and gradient: the direct CUDA calls (which must take the fused path exactly
// when `fused`) and backend/fp8.h's entry points, each against the composition.
void check_passes(int64_t M, int64_t I, bool pow2, bool fused) {
  SCOPED_TRACE(testing::Message() << "M " << M << " I " << I << " pow2 " << pow2);
  CudaBackend& be = cuda_backend();
  const Inputs in(M, I, 17 + uint64_t(I));
  const Tensor g = be.to_device(in.gate), u = be.to_device(in.up), ref_out = be.alloc(DType::F32, {M, I});
  be.swiglu(args(g, u, ref_out));
  const SwigluTiles ref{fp8_tiles(g, pow2, "gate"), fp8_tiles(u, pow2, "up"), fp8_tiles(ref_out, pow2, "out")};
  const auto expect_forward = [&](const Tensor& out, const SwigluTiles& t, const char* how) {
    SCOPED_TRACE(how);
    EXPECT_EQ(diffs(out, ref_out), 0) << "out";
    expect_same(t.gate, ref.gate, "gate");
    expect_same(t.up, ref.up, "up");
    expect_same(t.out, ref.out, "out");
  };
  SwigluTiles t;
  const Tensor out = be.alloc(DType::F32, {M, I});
  EXPECT_EQ(cuda_swiglu_fp8(args(g, u, out), pow2, t), fused);
  if (fused) expect_forward(out, t, "direct");
  const Tensor out_w = be.alloc(DType::F32, {M, I});
  t = swiglu_fp8(be, args(g, u, out_w), pow2);
  expect_forward(out_w, t, "backend/fp8.h");
  expect_same(t.gate, cpu_tiles(g, pow2), "gate against the CPU", true);
  expect_same(t.up, cpu_tiles(u, pow2), "up against the CPU", true);
  expect_same(t.out, cpu_tiles(out_w, pow2), "out against the CPU's tiles of it", true);
  expect_cpu_swiglu(in, out_w);

  const Tensor dg = dequantize(t.gate), du = dequantize(t.up), ref_r = be.alloc(DType::F32, {M, I});
  be.swiglu(args(dg, du, ref_r));
  const Fp8Tiles ref_r_tiles = fp8_tiles(ref_r, pow2, "out");
  const auto expect_recompute = [&](const SwigluRecompute& r, const char* how) {
    SCOPED_TRACE(how);
    EXPECT_EQ(diffs(r.out, ref_r), 0) << "recomputed out";
    expect_same(r.out_tiles, ref_r_tiles, "recomputed out");
  };
  SwigluRecompute r;
  EXPECT_EQ(cuda_swiglu_fp8_recompute(t.gate, t.up, pow2, r), fused);
  if (fused) expect_recompute(r, "direct");
  r = swiglu_fp8_recompute(be, t.gate, t.up, pow2);
  expect_recompute(r, "backend/fp8.h");
  EXPECT_EQ(r.gate.defined(), !fused) << "the composition's dequantized gate, handed to the gradient";
  expect_same(r.out_tiles, cpu_tiles(r.out, pow2), "recomputed out against the CPU's tiles of it", true);
  Tensor cpu_g = Tensor::empty(DType::F32, {M, I});
  dequantize_fp8_fast(be.to_host(t.gate.q), be.to_host(t.gate.scale), cpu_g);
  EXPECT_EQ(diffs(dg, cpu_g, true), 0) << "the GPU's dequantized gate against the CPU's";

  // The gradients, into dout's own storage for dgate (as the experts' backward does) and not; by
  // the direct call, the entry point, and the entry point given the dequantized gate and up (the
  // composition's recomputation hands them over).
  const Tensor d_host = randn({M, I}, 29, 3);
  for (int how = 0; how < 3; ++how)
    for (bool alias : {false, true}) {
      SCOPED_TRACE(testing::Message() << (how == 0 ? "direct" : how == 1 ? "backend/fp8.h" : "given gate and up")
                                      << (alias ? ", dgate aliases dout" : ""));
      const auto grads = [&](SwigluBackwardArgs& b) {
        b.dout = be.to_device(d_host);
        b.dgate = alias ? b.dout : be.alloc(DType::F32, {M, I});
        b.dup = be.alloc(DType::F32, {M, I});
      };
      SwigluBackwardArgs b, ref_b;
      grads(b);
      grads(ref_b);
      ref_b.gate = dg;
      ref_b.up = du;
      be.swiglu_backward(ref_b);
      if (how == 0) {
        if (!fused) continue;  // the fallback is the entry point's, below
        EXPECT_TRUE(cuda_swiglu_backward_fp8(b, t.gate, t.up));
      }
      if (how == 1) swiglu_backward_fp8(be, b, t.gate, t.up);
      if (how == 2) {
        b.gate = dg;
        b.up = du;
        swiglu_backward_fp8(be, b, t.gate, t.up);
      }
      EXPECT_EQ(diffs(b.dgate, ref_b.dgate), 0) << "dgate";
      EXPECT_EQ(diffs(b.dup, ref_b.dup), 0) << "dup";
    }
  // What the fused gradient does not take: accumulation and BF16 gradients go to the composition.
  SwigluBackwardArgs acc;
  acc.dout = be.to_device(d_host);
  acc.dgate = be.alloc(DType::F32, {M, I});
  acc.dup = be.alloc(DType::BF16, {M, I});
  EXPECT_FALSE(cuda_swiglu_backward_fp8(acc, t.gate, t.up));
  acc.dup = be.alloc(DType::F32, {M, I});
  acc.accumulate = true;
  EXPECT_FALSE(cuda_swiglu_backward_fp8(acc, t.gate, t.up));
}

// 600 tiles, and 111 (a warp whose last tiles are past the end).
TEST(CudaSwigluFp8, FusedBytesAreTheComposition) {
  ASSERT_GT(cuda_device_count(), 0);
  check_passes(200, 384, false, true);
  check_passes(37, 384, true, true);
}

// Rows not a multiple of 128 wide (the tiny preset's 96): no fused launch, the composition's bytes.
TEST(CudaSwigluFp8, NarrowRowsComposeTheOps) {
  ASSERT_GT(cuda_device_count(), 0);
  check_passes(50, 96, false, false);
}

}  // namespace
}  // namespace dsv3::test
