// linear_lowp_grouped / linear_backward_lowp_grouped (backend/fp8.h) on CUDA tensors in Fp8 mode —
// the MoE's experts: every block's GEMM preparation in grouped launches of up to 32, and with the
// grouped FP8 kernel off the matmuls on the lane streams, a block whose row count is no multiple of
// 4 reading the next block's FP8 rows as its padding, and the padded rows added into the output in
// one launch — against one linear_lowp /
// linear_backward_lowp per block on the same GPU operands: the same bits (any NaN equal to any
// NaN), and no byte written outside y, dx or a weight gradient (guard bytes). The per-block path is
// checked against the CPU in cuda_lowp_test.cpp. On 1, 4 and 8 lanes. Blocks: more than one
// launch's 32, empty ones, every residue mod 4, a first block that pads into its neighbour and a last
// one that pads past x (its codes copied); BF16, F32 and FP8 (with scale_inv) weights, accumulate on
// and off, power-of-two scales, no dx; an Inf or a NaN in a row another block reads as padding (that
// row's block's outputs NaN, the others untouched); and a K that is no multiple of 128 (the
// per-block fallback). In Bf16 mode the blocks' forward and Dgrad products are batched matmuls of
// 256-row chunks, a block's last rows the tail of a chunk reaching back into earlier blocks (into
// scratch, then added): against the per-block calls under kF32 (the same BF16 products, FP32 sums
// in another order), non-finite values in the same places, the batched path counted as taken (or
// not), with blocks of exact multiples of 256 rows, tails, x shorter than one chunk, 70 blocks,
// F32 weights and many small blocks (the per-block fallback), and a NaN / Inf in a row of x or dy
// that later blocks' tail chunks read. The batched backward's Wgrads are one grouped launch
// (grouped_wgrad.cu: 128 × 128 tiles, here also partial ones, and blocks of any row count), or
// per block when it is turned off. With the grouped FP8 kernel on (the default; grouped_fp8_gemm.cu,
// its own operand-level tests in cuda_grouped_fp8_test.cpp) the Fp8 calls are checked against the
// CPU's emulation instead: the kernel's sums are not cuBLASLt's.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "../backend/harness.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/linear_lowp.h"
#include "backend/fp8.h"
#include "backend/tolerance.h"

namespace dsv3::test {
namespace {

std::vector<int64_t> block_rows();

struct Case {
  int64_t K = 256, N = 128;
  DType wtype = DType::BF16;
  bool accumulate = false, pow2 = false, dx = true;
  int64_t bad_row = -1;     // x[bad_row, 1] = bad
  int64_t bad_dy_row = -1;  // dy[bad_dy_row, 1] = bad
  float bad = std::numeric_limits<float>::infinity();
  LinearPrecisionMode mode = LinearPrecisionMode::Fp8;
  std::vector<int64_t> rows = block_rows();
};

// 40 blocks: 5 first (pads into block 1), empty ones, 1..3 rows, 130 (two token tiles), 203 last
// (pads past x).
std::vector<int64_t> block_rows() {
  std::vector<int64_t> r = {5, 0, 130, 1, 2, 3, 64, 0};
  for (int64_t e = 0; r.size() < 39; ++e) r.push_back((e * 37 + 11) % 97);
  r.push_back(203);
  return r;
}

struct Outs {
  Tensor y, dx;
  std::vector<Tensor> dw;
  std::string damaged;
  int64_t batches = 0;  // Bf16-mode calls that ran as batched matmuls
  int64_t wgrads = 0;   // grouped Wgrad launches (Bf16 mode)
};

Outs run(const Case& c, bool grouped, Backend& be = cuda_backend()) {
  const std::vector<int64_t>& rows = c.rows;
  std::vector<int64_t> off = {0};
  for (int64_t r : rows) off.push_back(off.back() + r);
  const int64_t M = off.back(), E = int64_t(rows.size());
  std::vector<Tensor> w, s, dw;
  Guards g(be);
  for (int64_t e = 0; e < E; ++e) {
    const Tensor wf = randn({c.N, c.K}, 70 + uint64_t(e), 1, 0.05f);
    if (c.wtype == DType::F8_E4M3) {
      Tensor q = Tensor::empty(DType::F8_E4M3, {c.N, c.K});
      Tensor sc = Tensor::empty(DType::F32, {(c.N + 127) / 128, (c.K + 127) / 128});
      quantize_fp8({wf, Fp8Tiling::Block128x128, false, false, q, sc});
      w.push_back(be.to_device(q));
      s.push_back(be.to_device(sc));
    } else {
      w.push_back(be.to_device(wf.to(c.wtype)));
    }
    dw.push_back(g.init(randn({c.N, c.K}, 70 + uint64_t(e), 2, 0.1f)));
  }
  Tensor xh = randn({M, c.K}, 71, 1);
  if (c.bad_row >= 0) xh.data<float>()[c.bad_row * c.K + 1] = c.bad;
  Tensor dyh = randn({M, c.N}, 71, 2);
  if (c.bad_dy_row >= 0) dyh.data<float>()[c.bad_dy_row * c.N + 1] = c.bad;
  const Tensor x = be.to_device(xh), dy = be.to_device(dyh);
  const Tensor y = g.init(randn({M, c.N}, 71, 3)), dx = c.dx ? g.init(randn({M, c.K}, 71, 4)) : Tensor();
  LinearPrecision p;
  p.mode = c.mode;
  p.pow2_scale = c.pow2;
  const Fp8Tiles copy = lowp_input_copy(p, x, "x");
  const int64_t batches0 = cuda_bf16_grouped_batches(), wgrads0 = cuda::grouped_wgrad_launches();
  if (grouped) {
    linear_lowp_grouped(p, {x, w, s, off, y, c.accumulate}, copy);
    GroupedLinearBackwardArgs b;
    b.x = x;
    b.dy = dy;
    b.w = w;
    b.w_scale_inv = s;
    b.dw = dw;
    b.offsets = off;
    b.dx = dx;
    b.accumulate_dx = c.accumulate;
    linear_backward_lowp_grouped(p, b, copy);
  } else {
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = off[size_t(e)], r1 = off[size_t(e) + 1];
      if (r0 == r1) continue;
      Fp8Tiles xe = copy.rows(r0, r1);
      const Tensor se = s.empty() ? Tensor() : s[size_t(e)];
      linear_lowp(p, {x.rows(r0, r1), w[size_t(e)], se, y.rows(r0, r1), c.accumulate}, &xe);
      linear_backward_lowp(p,
                           {dy.rows(r0, r1), x.rows(r0, r1), w[size_t(e)], se, c.dx ? dx.rows(r0, r1) : Tensor(),
                            dw[size_t(e)], c.accumulate, true},
                           &xe);
    }
  }
  Outs o{be.to_host(y), c.dx ? be.to_host(dx) : Tensor(), {}, g.damaged(), cuda_bf16_grouped_batches() - batches0,
         cuda::grouped_wgrad_launches() - wgrads0};
  for (const Tensor& t : dw) o.dw.push_back(be.to_host(t));
  return o;
}

int64_t differing(const Tensor& a, const Tensor& b) {
  const float* x = a.data<float>();
  const float* y = b.data<float>();
  int64_t diff = 0;
  for (int64_t i = 0; i < a.numel(); ++i)
    if (!(std::isnan(x[i]) && std::isnan(y[i])) && std::memcmp(&x[i], &y[i], sizeof(float)) != 0) ++diff;
  return diff;
}

// Non-finite in the same places, the finite values within `tol` of `want`'s (kF32 in Bf16 mode
// against the per-block calls).
void expect_close(const Tensor& got, const Tensor& want, const std::string& what, double tol = tol::kF32) {
  const float* g = got.data<float>();
  const float* w = want.data<float>();
  double mref = 0, md = 0;
  int64_t misplaced = 0;
  for (int64_t i = 0; i < got.numel(); ++i) {
    if (std::isfinite(g[i]) != std::isfinite(w[i]) || (std::isnan(g[i]) != std::isnan(w[i]))) ++misplaced;
    if (!std::isfinite(g[i]) || !std::isfinite(w[i])) continue;
    mref = std::max(mref, std::fabs(double(w[i])));
    md = std::max(md, std::fabs(double(g[i]) - double(w[i])));
  }
  EXPECT_EQ(misplaced, 0) << what;
  EXPECT_LE(mref > 0 ? md / mref : md, tol) << what;
}

void expect_same(const Case& c, const Tensor& got, const Tensor& want, const std::string& what) {
  if (c.mode == LinearPrecisionMode::Bf16) return expect_close(got, want, what);
  EXPECT_EQ(differing(got, want), 0) << what;
}

void check_against(const Case& c, const Outs& per_block, const Outs& grouped) {
  EXPECT_EQ(grouped.damaged, "");
  expect_same(c, grouped.y, per_block.y, "y");
  if (c.dx) expect_same(c, grouped.dx, per_block.dx, "dx");
  ASSERT_EQ(grouped.dw.size(), per_block.dw.size());
  for (size_t e = 0; e < grouped.dw.size(); ++e) expect_same(c, grouped.dw[e], per_block.dw[e], cat("dw ", e));
  if (c.bad_row >= 0 || c.bad_dy_row >= 0) return;
  for (const Tensor* t : {&grouped.y, &grouped.dx}) {
    if (t->defined()) {
      EXPECT_EQ(compare(*t, to_vec(*t)).non_finite, 0);
    }
  }
}

// The grouped calls on 1 (off), 4 and 8 lanes against the per-block calls.
// batched: whether the Bf16-mode grouped calls must take the batched path (forward, and Dgrad when
// there is a dx, with the Wgrads in one grouped launch), or must not. wgrad_grouped off: the
// batched backward's Wgrad per block instead.
void check(const Case& c, bool batched = false, bool wgrad_grouped = true) {
  SCOPED_TRACE(cat(c.mode == LinearPrecisionMode::Bf16 ? "bf16" : "fp8", " rows ", c.rows.size(), " K ", c.K,
                   " w ", dtype_name(c.wtype), " accumulate ", c.accumulate, " pow2 ", c.pow2, " dx ", c.dx,
                   " bad row ", c.bad_row, " bad dy row ", c.bad_dy_row, " bad ", c.bad));
  const Outs per_block = run(c, false);
  const int before = cuda_lanes();
  const bool wgrad_before = cuda_grouped_wgrad(), fp8_before = cuda::grouped_fp8();
  cuda_set_grouped_wgrad(wgrad_grouped);
  cuda::set_grouped_fp8(false);  // Fp8: the per-block matmuls on the lanes (check_fp8_kernel: the grouped one)
  for (int lanes : {1, 4, 8}) {
    SCOPED_TRACE(cat(lanes, " lanes"));
    cuda_set_lanes(lanes);
    const Outs grouped = run(c, true);
    check_against(c, per_block, grouped);
    EXPECT_EQ(per_block.batches, 0);
    EXPECT_EQ(per_block.wgrads, 0);
    EXPECT_EQ(grouped.batches, batched ? (c.dx ? 2 : 1) : 0) << "batched calls";
    EXPECT_EQ(grouped.wgrads, batched && wgrad_grouped ? 1 : 0) << "grouped Wgrad launches";
  }
  cuda_set_lanes(before);
  cuda_set_grouped_wgrad(wgrad_before);
  cuda::set_grouped_fp8(fp8_before);
}

// Fp8 with the grouped matmul kernel (grouped_fp8_gemm.cu, the default): against the same grouped
// calls on CPU tensors, each block's exact emulation, within kBf16 (the FP8 tensor cores' in-block
// sums, docs/tolerances.md), non-finite in the same places; one launch for the forward and one for
// Dgrad and Wgrad together per 32 blocks.
void check_fp8_kernel(const Case& c) {
  SCOPED_TRACE(cat("fp8 kernel, K ", c.K, " N ", c.N, " w ", dtype_name(c.wtype), " accumulate ", c.accumulate,
                   " pow2 ", c.pow2, " dx ", c.dx, " bad row ", c.bad_row, " bad dy row ", c.bad_dy_row));
  const Outs cpu = run(c, true, cpu_backend());
  const bool before = cuda::grouped_fp8();
  cuda::set_grouped_fp8(true);
  const int64_t l0 = cuda::grouped_fp8_launches();
  const Outs gpu = run(c, true);
  const int64_t launches = cuda::grouped_fp8_launches() - l0;
  cuda::set_grouped_fp8(before);
  int64_t blocks = 0;
  for (int64_t r : c.rows) blocks += r > 0;
  EXPECT_EQ(launches, 2 * ((blocks + 31) / 32));
  EXPECT_EQ(gpu.damaged, "");
  expect_close(gpu.y, cpu.y, "y", tol::kBf16);
  if (c.dx) expect_close(gpu.dx, cpu.dx, "dx", tol::kBf16);
  if (c.dx && c.bad_dy_row >= 0) {
    EXPECT_GT(compare(gpu.dx, to_vec(gpu.dx)).non_finite, 0) << "the bad dy row reaches dx";
  }
  for (size_t e = 0; e < gpu.dw.size(); ++e) expect_close(gpu.dw[e], cpu.dw[e], cat("dw ", e), tol::kBf16);
}

TEST(CudaLowpGrouped, EqualsOneLinearPerBlock) {
  ASSERT_GT(cuda_device_count(), 0);
  check({});
  check({256, 128, DType::F8_E4M3, true, true, false});
  check({384, 256, DType::F32, true});
}

TEST(CudaLowpGrouped, Fp8KernelEqualsCpuEmulation) {
  ASSERT_GT(cuda_device_count(), 0);
  check_fp8_kernel({});
  check_fp8_kernel({256, 128, DType::F8_E4M3, true, true, false});
  check_fp8_kernel({384, 400, DType::F32, true});  // N = 400: a 16-wide last column tile
  Case big;  // bench-0.7b's gate/up shape at a few hundred rows per expert
  big.K = 1024;
  big.N = 512;
  big.rows = {300, 0, 129, 517, 4, 260};
  check_fp8_kernel(big);
  const int rows_before = cuda::grouped_fp8_rows();
  cuda::set_grouped_fp8_rows(rows_before == 64 ? 128 : 64);  // the other tile height
  check_fp8_kernel(big);
  check_fp8_kernel({});
  cuda::set_grouped_fp8_rows(rows_before);
  // A NaN in dy's row 7 (block 2): that block's dx and dw NaN on both sides. (A non-finite x is left
  // to NonFiniteBlockStaysInItsBlock: the CPU's shared copy of x counts it for every block, the
  // GPU's NaN scales mark its own block only.)
  Case bad;
  bad.bad_dy_row = 7;
  bad.bad = std::numeric_limits<float>::quiet_NaN();
  check_fp8_kernel(bad);
}

// K = 200: the preparation's direct path needs multiples of 128, so the grouped call takes one
// linear_lowp per block.
TEST(CudaLowpGrouped, UnalignedShapeFallsBackPerBlock) {
  ASSERT_GT(cuda_device_count(), 0);
  check({200, 128, DType::BF16, true});
}

// An Inf, then a NaN, in block 2's first row — which block 0 (5 rows) reads as one of its padding
// rows: block 2's y and dw (and, through dy, nothing else) are NaN; every other block's outputs are
// finite (each grouped preparation keeps its own NaN flag, and a padding row's products are
// dropped).
TEST(CudaLowpGrouped, NonFiniteBlockStaysInItsBlock) {
  ASSERT_GT(cuda_device_count(), 0);
  const std::vector<int64_t> rows = block_rows();
  for (float bad : {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()}) {
    Case c;
    c.bad_row = rows[0] + rows[1];
    c.bad = bad;
    check(c);
    const Outs o = run(c, true);
    int64_t r0 = 0;
    for (size_t e = 0; e < rows.size(); ++e) {
      int64_t nan = 0;
      for (int64_t i = r0 * c.N; i < (r0 + rows[e]) * c.N; ++i) nan += std::isnan(o.y.data<float>()[i]) ? 1 : 0;
      EXPECT_EQ(nan, e == 2 ? rows[e] * c.N : 0) << "block " << e;
      EXPECT_EQ(compare(o.dw[e], to_vec(o.dw[e])).non_finite, e == 2 ? c.N * c.K : 0) << "dw " << e;
      r0 += rows[e];
    }
  }
}

// Bf16: blocks of 256-row multiples (full chunks only), longer ones with tails, short ones whose
// tail chunk reaches back over several earlier blocks (blocks 1 and 2 both over block 0's last
// rows), empty ones. 4,096 rows computed for 2,360: within the batch's limit of twice the rows.
std::vector<int64_t> bf16_rows() { return {600, 5, 7, 0, 256, 1, 300, 512, 0, 37, 255, 257, 130}; }

Case bf16_case(std::vector<int64_t> rows = bf16_rows()) {
  Case c;
  c.mode = LinearPrecisionMode::Bf16;
  c.rows = std::move(rows);
  return c;
}

TEST(CudaLowpGrouped, Bf16BatchesEqualOneLinearPerBlock) {
  ASSERT_GT(cuda_device_count(), 0);
  Case c = bf16_case();
  check(c, true);
  c.accumulate = true;
  check(c, true);
  c.dx = false;
  c.K = 384;
  c.N = 64;
  check(c, true);
  check(bf16_case({100, 0, 30}), true);  // x shorter than one chunk: the chunk is x
  // 70 blocks of tails of 200..255 rows: two pointer-array launches (64 blocks each) and three
  // padded-row adds (32 tails each).
  std::vector<int64_t> many;
  for (int64_t e = 0; e < 70; ++e) many.push_back(256 * (e % 3) + 200 + (e * 7) % 56);
  check(bf16_case(many), true);
  c = bf16_case();
  check(c, true, false);  // the Wgrads per block
  // N and K no multiples of the grouped Wgrad's 128 × 128 tiles (partial tiles at both edges).
  c.K = 200;
  c.N = 72;
  check(c, true);
  c = bf16_case();
  c.wtype = DType::F32;  // not batched: one linear_lowp per block
  check(c);
  check(bf16_case({5, 0, 30, 7, 100}));  // 4 chunks of 142 rows for 142: per block instead
}

// A NaN, then an Inf, in the last row of block 0 (600 rows) of x, then of dy, which the tail chunks of
// blocks 1 and 2 read: only block 0's outputs take it (x: its y row and dw's column 1; dy: its dx row
// and dw's row 1).
TEST(CudaLowpGrouped, Bf16NonFiniteRowStaysInItsBlock) {
  ASSERT_GT(cuda_device_count(), 0);
  for (bool in_dy : {false, true})
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      Case c = bf16_case();
      (in_dy ? c.bad_dy_row : c.bad_row) = 599;
      c.bad = bad;
      check(c, true);
      const Outs o = run(c, true);
      int64_t r0 = 0;
      for (size_t e = 0; e < c.rows.size(); ++e) {
        const int64_t r1 = r0 + c.rows[e];
        const int64_t bad_y = compare(o.y.rows(r0, r1), to_vec(o.y.rows(r0, r1))).non_finite;
        const int64_t bad_dx = compare(o.dx.rows(r0, r1), to_vec(o.dx.rows(r0, r1))).non_finite;
        EXPECT_EQ(bad_y, e == 0 && !in_dy ? c.N : 0) << "y, block " << e;
        EXPECT_EQ(bad_dx, e == 0 && in_dy ? c.K : 0) << "dx, block " << e;
        EXPECT_EQ(compare(o.dw[e], to_vec(o.dw[e])).non_finite, e == 0 ? (in_dy ? c.K : c.N) : 0) << "dw " << e;
        r0 = r1;
      }
    }
}

}  // namespace
}  // namespace dsv3::test
