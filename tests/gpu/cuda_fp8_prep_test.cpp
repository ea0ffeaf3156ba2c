// The FP8 GEMM preparation kernels (backend/cuda/linear_lowp.h: fp8_fprop_prep, fp8_backward_prep,
// one preparation per launch and several) byte for byte against the CPU's quantize_fp8, rearranged into the
// layouts cuBLASLt reads: every code and every scale, padding included. The layer tests compare
// GEMM outputs under kBf16, where one wrong code in a 128-element reduction could hide. Shapes with
// partial 128-blocks everywhere (M 200, 37 and 5 token rows; N 320; K 272 for the backward, whose
// x̂ blocks then end inside a block), a BF16 weight, power-of-two scales on the second pass; the
// grouped Fprop from a cached copy of x (the MoE's path).
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "../backend/harness.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/linear_lowp.h"

namespace dsv3::test {
namespace {

int64_t up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

struct Quant {
  Tensor q, s;  // host
};
Quant cpu_quant(const Tensor& x, Fp8Tiling t, bool transpose, bool pow2) {
  const int64_t R = x.dim(0), C = x.dim(1);
  const int64_t th = t == Fp8Tiling::Row1x128 ? 1 : 128, tw = t == Fp8Tiling::Col128x1 ? 1 : 128;
  const int64_t g0 = (R + th - 1) / th, g1 = (C + tw - 1) / tw;
  Quant o{Tensor::empty(DType::F8_E4M3, transpose ? Shape{C, R} : Shape{R, C}),
          Tensor::empty(DType::F32, transpose ? Shape{g1, g0} : Shape{g0, g1})};
  QuantizeFp8Args a{x, t, pow2, transpose, o.q, o.s};
  a.on_nonfinite = NonFinitePolicy::Report;  // the CPU's codes and scales of tiles with NaN / Inf too
  quantize_fp8(a);
  return o;
}

// A device tensor's bytes / floats, fetched.
std::vector<uint8_t> bytes(const Tensor& t) {
  const Tensor h = cuda_backend().to_host(t);
  const uint8_t* p = static_cast<const uint8_t*>(h.raw());
  return {p, p + h.nbytes()};
}
std::vector<float> floats(const Tensor& t) {
  const Tensor h = cuda_backend().to_host(t);
  return {h.data<float>(), h.data<float>() + h.numel()};
}

// want[r, c] (codes of a [rows, cols] host tensor, 0 beyond it) against got [R, ld], the places
// skip(r, c) names left out.
int64_t code_diffs(const std::vector<uint8_t>& got, int64_t R, int64_t ld, const Tensor& want,
                   const std::function<bool(int64_t, int64_t)>& skip = {}) {
  int64_t d = 0;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < ld; ++c) {
      if (skip && skip(r, c)) continue;
      const bool in = r < want.dim(0) && c < want.dim(1);
      const uint8_t w = in ? static_cast<const uint8_t*>(want.raw())[r * want.dim(1) + c] : 0;
      d += got[size_t(r * ld + c)] != w;
    }
  return d;
}
// got[i, j] (i < gi, j < ld) against f(i, j); bit equality.
template <class F>
int64_t scale_diffs(const std::vector<float>& got, int64_t gi, int64_t ld, F f) {
  int64_t d = 0;
  for (int64_t i = 0; i < gi; ++i)
    for (int64_t j = 0; j < ld; ++j) {
      const float w = f(i, j), g = got[size_t(i * ld + j)];
      d += std::memcmp(&w, &g, sizeof w) != 0;
    }
  return d;
}

// The weight side of a preparation: the BF16 weight dw [N, K] on the device into codes wq (leading
// dimension ldq; transposed for Dgrad) and cuBLASLt's 128×128 scales ws (ld4 per row of tiles).
cuda::WeightSide bf16_weight_side(const Tensor& dw, int64_t N, int64_t K, bool transpose, Tensor& wq, int64_t ldq,
                                  Tensor& ws, int64_t ld4) {
  cuda::WeightSide w;
  w.w = dw.raw();
  w.wtype = DType::BF16;
  w.N = N;
  w.K = K;
  w.transpose = transpose;
  w.q = static_cast<uint8_t*>(wq.raw());
  w.ldq = ldq;
  w.scale_lt = ws.data<float>();
  w.ld4 = ld4;
  return w;
}

// What non-finite inputs change in a backward preparation's expected bytes (the defaults:
// nothing): dy's NaN elements (r, c), whose codes are left out (their sign is not the CPU's); dy's
// 1×128 tiles (r, g) and 128×1 tiles (c, rb) with NaN scales; whether the device flag turns x̂'s
// and the weight's whole scale arrays NaN.
struct NonFinite {
  std::function<bool(int64_t, int64_t)> nan_at, row_tile, col_tile;
  bool xhat_scales = false, weight_scales = false;
};

// One backward preparation's device buffers and inputs, with the CPU's expectations.
struct BackwardCase {
  int64_t M, N, K;
  Tensor dy, xq, xs, w;  // host
  Tensor d_dy, d_xq, d_xs, d_w;
  Tensor q1, s1, q2, s2, q3, s3, wq, ws;
  cuda::BackwardPrep p;

  BackwardCase(int64_t m, int64_t n, int64_t k, uint64_t seed, bool pow2)
      : BackwardCase(randn({m, n}, seed, 1), randn({m, k}, seed, 2, 3.0f), seed, pow2) {}
  // dy [M, N] and x [M, K] given (host F32); x's FP8 copy is the CPU's.
  BackwardCase(const Tensor& dy_in, const Tensor& x, uint64_t seed, bool pow2)
      : M(dy_in.dim(0)), N(dy_in.dim(1)), K(x.dim(1)), dy(dy_in) {
    CudaBackend& be = cuda_backend();
    const Quant xc = cpu_quant(x, Fp8Tiling::Row1x128, false, pow2);
    xq = xc.q;
    xs = xc.s;
    w = randn({N, K}, seed, 3, 0.05f, DType::BF16);
    d_dy = be.to_device(dy);
    d_xq = be.to_device(xq);
    d_xs = be.to_device(xs);
    d_w = be.to_device(w);
    const int64_t Np = up(N, 128), M1 = up(M, 4), Mp = up(M, 128), ld4 = up(Np / 128, 4);
    q1 = be.alloc(DType::F8_E4M3, {M1, Np});
    s1 = be.alloc(DType::F32, {Np / 128, M1});
    q2 = be.alloc(DType::F8_E4M3, {N, Mp});
    s2 = be.alloc(DType::F32, {Mp / 128, N});
    q3 = be.alloc(DType::F8_E4M3, {K, Mp});
    s3 = be.alloc(DType::F32, {Mp / 128, K});
    wq = be.alloc(DType::F8_E4M3, {K, Np});
    ws = be.alloc(DType::F32, {up(K, 128) / 128, ld4});
    p.pow2 = pow2;
    p.M = M;
    p.N = N;
    p.K = K;
    p.dy = d_dy.data<float>();
    p.q1 = static_cast<uint8_t*>(q1.raw());
    p.ld1 = Np;
    p.M1 = M1;
    p.s1_lt = s1.data<float>();
    p.q2 = static_cast<uint8_t*>(q2.raw());
    p.ld2 = Mp;
    p.s2_lt = s2.data<float>();
    p.xs_q = static_cast<const uint8_t*>(d_xq.raw());
    p.xs_scale = d_xs.data<float>();
    p.q3 = static_cast<uint8_t*>(q3.raw());
    p.s3_lt = s3.data<float>();
    p.w = bf16_weight_side(d_w, N, K, true, wq, Np, ws, ld4);
  }

  // Every byte and scale the preparation wrote; wgrad false: Dgrad's alone (q2 unset).
  void check(bool wgrad = true, const NonFinite& bad = {}) const {
    SCOPED_TRACE(cat("M ", M, " N ", N, " K ", K, " pow2 ", p.pow2));
    const int64_t Np = p.ld1, M1 = p.M1, Mp = p.ld2, ld4 = p.w.ld4;
    const float nan = NAN;
    const auto is = [](const std::function<bool(int64_t, int64_t)>& f, int64_t a, int64_t b) { return f && f(a, b); };
    const Quant rows = cpu_quant(dy, Fp8Tiling::Row1x128, false, p.pow2);
    EXPECT_EQ(code_diffs(bytes(q1), M1, Np, rows.q, bad.nan_at), 0) << "dy 1x128 codes";
    const int64_t gn = Np / 128;
    EXPECT_EQ(scale_diffs(floats(s1), gn, M1,
                          [&](int64_t g, int64_t r) {
                            return is(bad.row_tile, r, g) ? nan : r < M ? rows.s.data<float>()[r * gn + g] : 1.0f;
                          }),
              0)
        << "dy 1x128 scales";
    const Quant wt = cpu_quant(w.to(DType::F32), Fp8Tiling::Block128x128, true, p.pow2);  // [K, N]
    EXPECT_EQ(code_diffs(bytes(wq), K, Np, wt.q), 0) << "weight codes";
    const int64_t gk = up(K, 128) / 128;
    EXPECT_EQ(scale_diffs(floats(ws), gk, ld4,
                          [&](int64_t i, int64_t j) {
                            return bad.weight_scales ? nan : j < gn ? wt.s.data<float>()[i * gn + j] : 0.0f;
                          }),
              0)
        << "weight scales";
    if (!wgrad) return;
    const Quant cols = cpu_quant(dy, Fp8Tiling::Col128x1, true, p.pow2);  // [N, M], scales [N, Mp/128]
    EXPECT_EQ(code_diffs(bytes(q2), N, Mp, cols.q, [&](int64_t c, int64_t r) { return is(bad.nan_at, r, c); }), 0)
        << "dy 128x1 codes";
    EXPECT_EQ(scale_diffs(floats(s2), Mp / 128, N,
                          [&](int64_t rb, int64_t c) {
                            return is(bad.col_tile, c, rb) ? nan : cols.s.data<float>()[c * (Mp / 128) + rb];
                          }),
              0)
        << "dy 128x1 scales";
    const Quant xh = cpu_quant(dequantize(Fp8Tiles{xq, xs, 0}), Fp8Tiling::Col128x1, true, p.pow2);
    EXPECT_EQ(code_diffs(bytes(q3), K, Mp, xh.q), 0) << "x-hat codes";
    EXPECT_EQ(scale_diffs(floats(s3), Mp / 128, K,
                          [&](int64_t rb, int64_t c) {
                            return bad.xhat_scales ? nan : xh.s.data<float>()[c * (Mp / 128) + rb];
                          }),
              0)
        << "x-hat scales";
  }
};

TEST(CudaFp8Prep, BackwardBytesAreTheCpus) {
  ASSERT_GT(cuda_device_count(), 0);
  for (bool pow2 : {false, true}) {
    const BackwardCase c(200, 320, 272, 5, pow2);
    cuda::fp8_backward_prep({&c.p, 1});
    c.check();
  }
}

// The transpose of a host F32 matrix.
Tensor transposed(const Tensor& a) {
  const int64_t R = a.dim(0), C = a.dim(1);
  Tensor t = Tensor::empty(DType::F32, {C, R});
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) t.data<float>()[c * R + r] = a.data<float>()[r * C + c];
  return t;
}

// Quotients where one ulp decides the code (fp8_midpoints) under tile scales from 2^-121 to 2^118,
// in dy's rows (the 1×128 pass) and then in its columns (the 128×1 pass), so that each pass divides
// both through the reciprocal and, beyond [2^-80, 2^100], outright; x's two column blocks at 2^-100
// and 2^110 take x̂'s 128×1 tiles beyond that range at both ends. Some values are -0 (code 0x80),
// and x̂'s 128×1 tiles of columns 0..15 in rows 128..239 hold only zeros (scale 1).
TEST(CudaFp8Prep, BackwardBytesAtMidpointsAndExtremeScales) {
  ASSERT_GT(cuda_device_count(), 0);
  const int64_t M = 240, K = 240;
  Tensor x = randn({M, K}, 23, 1);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t k = 0; k < K; ++k) {
      float& v = x.data<float>()[r * K + k];
      v = r >= 128 && k < 16 ? 0.0f : std::ldexp(v, k < 128 ? -100 : 110);
      if ((r * K + k) % 97 == 0) v = -0.0f;
    }
  for (Tensor dy : {fp8_midpoints(M, 256, 21, -121), transposed(fp8_midpoints(240, M, 22, -121))}) {
    for (int64_t i = 0; i < dy.numel(); i += 89) dy.data<float>()[i] = -0.0f;
    const BackwardCase c(dy, x, 24, false);
    cuda::fp8_backward_prep({&c.p, 1});
    c.check();
  }
}

// 480 blocks of dy, more than the launch gives dy CTAs (3 per SM: 396 on an H200), so CTAs loop over
// blocks and reuse shared memory: with both GEMMs, and with Dgrad alone, where no barrier separates
// a block's row pass from the next block's copies into shared memory.
TEST(CudaFp8Prep, BackwardBytesWhenCtasLoopOverBlocks) {
  ASSERT_GT(cuda_device_count(), 0);
  for (bool wgrad : {true, false}) {
    SCOPED_TRACE(wgrad ? "Dgrad and Wgrad" : "Dgrad alone");
    BackwardCase c(24 * 128 - 3, 20 * 128, 128, 31, false);
    if (!wgrad) c.p.q2 = c.p.q3 = nullptr;
    cuda::fp8_backward_prep({&c.p, 1});
    c.check(wgrad);
  }
}

// Non-finite values take the exact path (the amax over the finite values and the count) where the
// fast one sees a NaN or infinite maximum. In dy: a NaN at (3, 130) and an Inf at (150, 5), so
// their 1×128 and 128×1 tiles get NaN scales, every code is the CPU's (the NaN's own left out: its
// sign is not the CPU's), and the device flag turns x̂'s scales and the weight's NaN (every output
// of both GEMMs NaN, as on the CPU). In the weight: an Inf at (70, 200), whose tile's codes are
// still the CPU's while the flag turns the weight's scales NaN and leaves dy's and x̂'s alone.
TEST(CudaFp8Prep, BackwardBytesWithNonFiniteValues) {
  ASSERT_GT(cuda_device_count(), 0);
  for (bool in_dy : {true, false}) {
    SCOPED_TRACE(in_dy ? "NaN and Inf in dy" : "Inf in the weight");
    const int64_t M = 200, N = 320, K = 272;
    Tensor dy = randn({M, N}, 41, 1);
    NonFinite bad;
    bad.weight_scales = true;  // a bad dy (Dgrad's a) or weight (its b) either way
    if (in_dy) {
      dy.data<float>()[3 * N + 130] = NAN;
      dy.data<float>()[150 * N + 5] = INFINITY;
      bad.nan_at = [](int64_t r, int64_t c) { return r == 3 && c == 130; };
      bad.row_tile = [](int64_t r, int64_t g) { return (r == 3 && g == 1) || (r == 150 && g == 0); };
      bad.col_tile = [](int64_t c, int64_t rb) { return (c == 130 && rb == 0) || (c == 5 && rb == 1); };
      bad.xhat_scales = true;  // Wgrad's b, beside the bad dy
    }
    BackwardCase c(dy, randn({M, K}, 41, 2, 3.0f), 42, false);
    if (!in_dy) {
      c.w.data<bf16>()[70 * K + 200] = bf16{float_to_bf16(INFINITY)};
      c.d_w = cuda_backend().to_device(c.w);
      c.p.w.w = c.d_w.raw();
    }
    cuda::fp8_backward_prep({&c.p, 1});
    c.check(true, bad);
  }
}

// Three preparations of different row counts in one launch: each one's bytes as alone.
TEST(CudaFp8Prep, GroupedBackwardBytesAreTheCpus) {
  ASSERT_GT(cuda_device_count(), 0);
  const std::vector<int64_t> rows = {200, 37, 5};
  std::vector<std::unique_ptr<BackwardCase>> cases;
  std::vector<cuda::BackwardPrep> ps;
  for (size_t i = 0; i < rows.size(); ++i) {
    cases.push_back(std::make_unique<BackwardCase>(rows[i], 320, 272, 11 + i, false));
    ps.push_back(cases.back()->p);
  }
  cuda::fp8_backward_prep(ps);
  for (const auto& c : cases) c->check();
}

// x's rows at K = 256 and at K = 1,408: eleven 1×128 tiles a row, so the row pass (eight tiles a
// round, two of them per group of eight lanes) ends in a part round with idle groups. With a NaN in
// x (row 9, tile 5: group 1's second tile of the round) that tile's scale is NaN in both layouts,
// every other tile's codes and scales are the CPU's for x without it, and the device flag turns
// the weight's scales NaN (so that every output of the GEMM is NaN, as the CPU's).
TEST(CudaFp8Prep, FpropBytesAreTheCpus) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  struct Case {
    int64_t K;
    bool nan;
  };
  for (const Case c : {Case{256, false}, Case{1408, false}, Case{1408, true}}) {
    const int64_t K = c.K, bad_r = 9, bad_g = 5;
    SCOPED_TRACE(cat("K ", K, c.nan ? ", a NaN in x" : ""));
    const int64_t M = 37, N = 320, M_lt = up(M, 4), kb = K / 128, gn = up(N, 128) / 128, ld4 = up(kb, 4);
    const Tensor x = randn({M, K}, 8, 1, 2.0f), w = randn({N, K}, 8, 2, 0.05f, DType::BF16);
    Tensor xn = x.clone();
    if (c.nan) xn.data<float>()[bad_r * K + bad_g * 128 + 3] = NAN;
    const Tensor dx = be.to_device(xn), dw = be.to_device(w);
    Tensor xq = be.alloc(DType::F8_E4M3, {M_lt, K}), xs = be.alloc(DType::F32, {M, kb});
    Tensor xs_lt = be.alloc(DType::F32, {kb, M_lt}), wq = be.alloc(DType::F8_E4M3, {N, K});
    Tensor ws = be.alloc(DType::F32, {gn, ld4});
    cuda::FpropPrep p;
    p.M = M;
    p.M_lt = M_lt;
    p.x = dx.data<float>();
    p.xq = p.q_lt = static_cast<uint8_t*>(xq.raw());
    p.x_scale = xs.data<float>();
    p.x_scale_lt = xs_lt.data<float>();
    p.w = bf16_weight_side(dw, N, K, false, wq, K, ws, ld4);
    cuda::fp8_fprop_prep({&p, 1});
    const Quant rows = cpu_quant(x, Fp8Tiling::Row1x128, false, false);
    const auto bad = [&](int64_t r, int64_t g) { return c.nan && r == bad_r && g == bad_g; };
    EXPECT_EQ(code_diffs(bytes(xq), M_lt, K, rows.q, [&](int64_t r, int64_t j) { return bad(r, j / 128); }), 0)
        << "x codes";
    const float nan = NAN;
    EXPECT_EQ(scale_diffs(floats(xs), M, kb,
                          [&](int64_t r, int64_t g) { return bad(r, g) ? nan : rows.s.data<float>()[r * kb + g]; }),
              0)
        << "x scales";
    EXPECT_EQ(scale_diffs(floats(xs_lt), kb, M_lt,
                          [&](int64_t g, int64_t r) {
                            return bad(r, g) ? nan : r < M ? rows.s.data<float>()[r * kb + g] : 1.0f;
                          }),
              0)
        << "x scales, cuBLASLt's layout";
    const Quant wb = cpu_quant(w.to(DType::F32), Fp8Tiling::Block128x128, false, false);
    EXPECT_EQ(code_diffs(bytes(wq), N, K, wb.q), 0) << "weight codes";
    EXPECT_EQ(scale_diffs(floats(ws), gn, ld4,
                          [&](int64_t i, int64_t j) {
                            return c.nan ? nan : j < kb ? wb.s.data<float>()[i * kb + j] : 0.0f;
                          }),
              0)
        << "weight scales";
  }
}

// The grouped Fprop from a cached copy of x (the MoE's path: x unset), three blocks of one copy:
// 37 and 5 rows read the rows after them as cuBLASLt's padding (q_lt is the copy itself), the last
// (138 rows) would read past the copy, so its codes are copied with zero padding rows. Each one's
// VEC128 scales (1 for the padding rows), copied codes and weight bytes are the CPU's.
TEST(CudaFp8Prep, GroupedFpropFromCachedCopyBytesAreTheCpus) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  const int64_t R = 180, K = 256, N = 192, kb = K / 128, gn = up(N, 128) / 128, ld4 = up(kb, 4);
  const Quant xc = cpu_quant(randn({R, K}, 12, 1, 2.0f), Fp8Tiling::Row1x128, false, false);
  Tensor xq = be.to_device(xc.q), xs = be.to_device(xc.s);
  const std::vector<int64_t> r0 = {0, 37, 42}, rows = {37, 5, 138};
  std::vector<Tensor> w, dw, wq, ws, s_lt, q_lt;
  std::vector<cuda::FpropPrep> ps;
  for (size_t i = 0; i < rows.size(); ++i) {
    const int64_t M = rows[i], M_lt = up(M, 4);
    const bool copy = r0[i] + M_lt > R;
    w.push_back(randn({N, K}, 12, 2 + i, 0.05f, DType::BF16));
    dw.push_back(be.to_device(w.back()));
    wq.push_back(be.alloc(DType::F8_E4M3, {N, K}));
    ws.push_back(be.alloc(DType::F32, {gn, ld4}));
    s_lt.push_back(be.alloc(DType::F32, {kb, M_lt}));
    q_lt.push_back(copy ? be.alloc(DType::F8_E4M3, {M_lt, K}) : Tensor());
    cuda::FpropPrep p;
    p.M = M;
    p.M_lt = M_lt;
    p.xq = static_cast<uint8_t*>(xq.raw()) + r0[i] * K;
    p.x_scale = xs.data<float>() + r0[i] * kb;
    p.q_lt = copy ? static_cast<uint8_t*>(q_lt.back().raw()) : p.xq;
    p.x_scale_lt = s_lt.back().data<float>();
    p.w = bf16_weight_side(dw.back(), N, K, false, wq.back(), K, ws.back(), ld4);
    ps.push_back(p);
  }
  cuda::fp8_fprop_prep(ps);
  for (size_t i = 0; i < rows.size(); ++i) {
    SCOPED_TRACE(cat("block ", i, ": ", rows[i], " rows"));
    const int64_t M = rows[i], M_lt = up(M, 4);
    const float* cs = xc.s.data<float>() + r0[i] * kb;
    EXPECT_EQ(scale_diffs(floats(s_lt[i]), kb, M_lt,
                          [&](int64_t g, int64_t r) { return r < M ? cs[r * kb + g] : 1.0f; }),
              0)
        << "x scales, cuBLASLt's layout";
    if (q_lt[i].defined()) {
      EXPECT_EQ(code_diffs(bytes(q_lt[i]), M_lt, K, xc.q.rows(r0[i], r0[i] + M)), 0) << "copied codes";
    }
    const Quant wb = cpu_quant(w[i].to(DType::F32), Fp8Tiling::Block128x128, false, false);
    EXPECT_EQ(code_diffs(bytes(wq[i]), N, K, wb.q), 0) << "weight codes";
    EXPECT_EQ(scale_diffs(floats(ws[i]), gn, ld4,
                          [&](int64_t a, int64_t j) { return j < kb ? wb.s.data<float>()[a * kb + j] : 0.0f; }),
              0)
        << "weight scales";
  }
}

}  // namespace
}  // namespace dsv3::test
