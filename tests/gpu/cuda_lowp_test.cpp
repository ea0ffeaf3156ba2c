// The reduced-precision linear layer (backend/fp8.h linear_lowp / linear_backward_lowp) on CUDA
// tensors against the same calls on CPU tensors:
//   bf16: BF16 operands, FP32 accumulation on both sides — the products are exact in FP32, so only
//         the summation order differs: kF32.
//   fp8:  the same quantization bytes and scales on both sides; cuBLASLt's FP8 tensor-core
//         accumulation inside a 128-element chunk is not FP32-exact (~2^-14 relative per chunk,
//         promoted to FP32 between chunks), so the comparison with the CPU's exact emulation uses
//         kBf16; a wrong scale, tile layout, padding or transposition gives errors of order 1.
// Shapes cover cuBLASLt's direct path (K % 128 == 0, M, N % 16 == 0) and the zero-padded one
// (partial 128-tiles, odd row counts), the forward's FP8 copy of x reused by the backward, the
// dgrad_block negative control, non-finite inputs (an all-NaN output, as on the CPU), and in BF16 the
// GPU's kept BF16 copy of x (the CPU's rounding, byte for byte).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "../backend/harness.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/linear_lowp.h"
#include "backend/cuda/lt_gemm.h"
#include "backend/fp8.h"
#include "backend/tolerance.h"

namespace dsv3::test {
namespace {

struct Outs {
  Tensor y, dx, dw;  // host
  Fp8Tiles cache;    // host copies of the forward's FP8 copy of x (fp8 only)
};

struct Case {
  int64_t M, K, N;
  bool accumulate = false;
  DType wtype = DType::F32;
};

// Forward and backward of one layer on the CPU or the GPU from the same host inputs (w and dy drawn
// from fixed seeds unless given).
Outs run(const LinearPrecision& p, const Case& c, const Tensor& x, bool gpu, const Tensor& w_in = Tensor(),
         const Tensor& dy_in = Tensor()) {
  Backend& be = gpu ? static_cast<Backend&>(cuda_backend()) : cpu_backend();
  const Tensor w = w_in.defined() ? w_in : randn({c.N, c.K}, 21, 2, 0.05f, c.wtype);
  const Tensor dy = dy_in.defined() ? dy_in : randn({c.M, c.N}, 21, 3);
  const Tensor y0 = randn({c.M, c.N}, 21, 4), dx0 = randn({c.M, c.K}, 21, 5), dw0 = randn({c.N, c.K}, 21, 6, 0.1f);
  auto dev = [&](const Tensor& t) { return gpu ? be.to_device(t) : t.clone(); };
  Tensor xd = dev(x), wd = dev(w), dyd = dev(dy), y = dev(y0), dx = dev(dx0), dw = dev(dw0);
  Fp8Tiles cache;
  LinearArgs f;
  f.x = xd;
  f.w = wd;
  f.y = y;
  f.accumulate = c.accumulate;
  linear_lowp(p, f, &cache);
  LinearBackwardArgs b;
  b.dy = dyd;
  b.x = xd;
  b.w = wd;
  b.dx = dx;
  b.dw = dw;
  b.accumulate_dx = b.accumulate_dw = c.accumulate;
  linear_backward_lowp(p, b, &cache);
  Outs o{be.to_host(y), be.to_host(dx), be.to_host(dw), {}};
  if (cache.defined())
    o.cache = {be.to_host(cache.q), cache.scale.defined() ? be.to_host(cache.scale) : Tensor(), cache.nonfinite};
  return o;
}

void expect_close(const Tensor& got, const Tensor& want, double tol, const char* what) {
  Err e = compare(got, to_vec(want));
  EXPECT_EQ(e.non_finite, 0) << what;
  EXPECT_LE(e.norm_err, tol) << what << " (worst element " << e.worst << ")";
}

void compare_case(const LinearPrecision& p, const Case& c, double tol) {
  SCOPED_TRACE(cat("M=", c.M, " K=", c.K, " N=", c.N, " accumulate=", c.accumulate, " w=", dtype_name(c.wtype),
                   " pow2=", p.pow2_scale, " dgrad_block=", p.dgrad_block));
  const Tensor x = randn({c.M, c.K}, 21, 1);
  Outs cpu = run(p, c, x, false), gpu = run(p, c, x, true);
  expect_close(gpu.y, cpu.y, tol, "y");
  expect_close(gpu.dx, cpu.dx, tol, "dx");
  expect_close(gpu.dw, cpu.dw, tol, "dw");
  if (p.mode == LinearPrecisionMode::Fp8) {  // the cached FP8 copy of x: the CPU's bytes and scales
    ASSERT_TRUE(gpu.cache.defined());
    EXPECT_EQ(std::memcmp(gpu.cache.q.raw(), cpu.cache.q.raw(), cpu.cache.q.nbytes()), 0);
    EXPECT_EQ(std::memcmp(gpu.cache.scale.raw(), cpu.cache.scale.raw(), cpu.cache.scale.nbytes()), 0);
  }
  if (p.mode == LinearPrecisionMode::Bf16) {  // the GPU keeps x's BF16 copy for Wgrad (backend/fp8.h)
    ASSERT_TRUE(gpu.cache.defined());
    const Tensor xb = x.to(DType::BF16);
    ASSERT_EQ(gpu.cache.q.nbytes(), xb.nbytes());
    EXPECT_EQ(std::memcmp(gpu.cache.q.raw(), xb.raw(), xb.nbytes()), 0);
  }
}

const Case kCases[] = {
    {64, 256, 128},                    // cuBLASLt's shape rules met: no padding
    {37, 200, 72},                     // partial tiles everywhere: padded
    {130, 384, 48, true},              // two token blocks (Wgrad's K = 130 padded), accumulate
    {16, 128, 400, false, DType::BF16},  // a BF16 weight (the trainer's copies), partial weight block row
};

TEST(CudaLowp, Bf16MatchesCpuEmulation) {
  ASSERT_GT(cuda_device_count(), 0);
  LinearPrecision p;
  p.mode = LinearPrecisionMode::Bf16;
  for (const Case& c : kCases) compare_case(p, c, tol::kF32);
}

// Row counts in one power-of-two bucket share its cuBLASLt plans (lt_gemm.h): the rows of x are a
// free dimension of all three products (the forward's and dgrad's columns in cuBLASLt's view,
// Wgrad's K), so after the first call no new heuristic query runs, and each call still matches the
// CPU at its exact size.
TEST(CudaLowp, Bf16RowCountsInOneBucketShareAPlan) {
  ASSERT_GT(cuda_device_count(), 0);
  LinearPrecision p;
  p.mode = LinearPrecisionMode::Bf16;
  compare_case(p, {1000, 256, 136}, tol::kF32);
  const int64_t plans = cuda::lt_plan_count();
  for (int64_t m : {777, 513, 1024}) compare_case(p, {m, 256, 136}, tol::kF32);
  EXPECT_EQ(cuda::lt_plan_count(), plans);
}

TEST(CudaLowp, Fp8MatchesCpuEmulation) {
  ASSERT_GT(cuda_device_count(), 0);
  LinearPrecision p;
  p.mode = LinearPrecisionMode::Fp8;
  for (const Case& c : kCases) compare_case(p, c, tol::kBf16);
  p.pow2_scale = true;
  compare_case(p, kCases[1], tol::kBf16);
}

// Shapes on the direct path (one preparation launch per pass writes cuBLASLt's layouts and pads the
// reductions): token counts of every residue mod 4 (cuBLASLt takes multiples of 4: the others go
// through padding rows) and no multiple of 128 (an expert's rows; Wgrad's reduction padded to 128),
// an output width whose Dgrad reduction is padded (N = 320, as kv_a_proj_with_mqa), accumulate, a
// BF16 weight, power-of-two scales; and an FP8 copy of x reused from a larger one (an expert's slice,
// as the MoE layer passes it) with a row count the GEMM must pad.
TEST(CudaLowp, Fp8DirectPathMatchesCpuEmulation) {
  ASSERT_GT(cuda_device_count(), 0);
  LinearPrecision p;
  p.mode = LinearPrecisionMode::Fp8;
  for (const Case& c : {Case{1999, 256, 320}, Case{37, 128, 64, true}, Case{300, 384, 192, false, DType::BF16},
                        Case{129, 256, 16, true, DType::BF16}, Case{130, 128, 32}, Case{1, 128, 16, true}})
    compare_case(p, c, tol::kBf16);
  p.pow2_scale = true;
  compare_case(p, {130, 256, 320, true}, tol::kBf16);
}

// An expert's rows: the FP8 copy of all rows made once, the layer called on a row slice with the
// slice of that copy (rows 37..174: 137, no multiple of 4, so the GEMM pads a copy of the codes), as
// the MoE layer does; the same outputs as the CPU's layer on those rows.
TEST(CudaLowp, Fp8SliceOfSharedCopyMatchesCpu) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  const int64_t R = 300, K = 256, N = 128, r0 = 37, r1 = 174, M = r1 - r0;
  const Tensor x = randn({R, K}, 41, 1), w = randn({N, K}, 41, 2, 0.05f, DType::BF16), dy = randn({M, N}, 41, 3);
  LinearPrecision p;
  p.mode = LinearPrecisionMode::Fp8;
  const Tensor xs = x.rows(r0, r1).clone();
  Tensor y_cpu = Tensor::zeros(DType::F32, {M, N}), dx_cpu = Tensor::zeros(DType::F32, {M, K});
  Tensor dw_cpu = Tensor::zeros(DType::F32, {N, K});
  linear_lowp(p, {xs, w, {}, y_cpu});
  linear_backward_lowp(p, {dy, xs, w, {}, dx_cpu, dw_cpu});
  Tensor xd = be.to_device(x), wd = be.to_device(w), dyd = be.to_device(dy);
  Fp8Tiles all = fp8_tiles(xd, false, "x"), part = all.rows(r0, r1);
  Tensor y = be.to_device(Tensor::zeros(DType::F32, {M, N})), dx = be.to_device(Tensor::zeros(DType::F32, {M, K}));
  Tensor dw = be.to_device(Tensor::zeros(DType::F32, {N, K}));
  linear_lowp(p, {xd.rows(r0, r1), wd, {}, y}, &part);
  linear_backward_lowp(p, {dyd, xd.rows(r0, r1), wd, {}, dx, dw}, &part);
  expect_close(be.to_host(y), y_cpu, tol::kBf16, "y");
  expect_close(be.to_host(dx), dx_cpu, tol::kBf16, "dx");
  expect_close(be.to_host(dw), dw_cpu, tol::kBf16, "dw");
}

// An FP8 weight with its 128×128 scale_inv (dequantized inside the weight's quantization on the GPU,
// as_f32 on the CPU): the same outputs as the CPU.
TEST(CudaLowp, Fp8WeightWithScaleInvMatchesCpu) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  const int64_t M = 200, K = 384, N = 272;
  Tensor wf = randn({N, K}, 31, 2, 0.05f);
  Tensor wq = Tensor::empty(DType::F8_E4M3, {N, K}), ws = Tensor::empty(DType::F32, {(N + 127) / 128, K / 128});
  quantize_fp8({wf, Fp8Tiling::Block128x128, false, false, wq, ws});
  Tensor x = randn({M, K}, 31, 1), dy = randn({M, N}, 31, 3);
  LinearPrecision p;
  p.mode = LinearPrecisionMode::Fp8;
  Tensor y[2], dx[2], dw[2];
  for (int gpu = 0; gpu < 2; ++gpu) {
    auto dev = [&](const Tensor& t) { return gpu ? be.to_device(t) : t.clone(); };
    Tensor xd = dev(x), wd = dev(wq), sd = dev(ws), dyd = dev(dy);
    Tensor yy = dev(Tensor::zeros(DType::F32, {M, N})), dxx = dev(Tensor::zeros(DType::F32, {M, K}));
    Tensor dww = dev(Tensor::zeros(DType::F32, {N, K}));
    Fp8Tiles cache;
    linear_lowp(p, {xd, wd, sd, yy}, &cache);
    linear_backward_lowp(p, {dyd, xd, wd, sd, dxx, dww}, &cache);
    y[gpu] = gpu ? be.to_host(yy) : yy;
    dx[gpu] = gpu ? be.to_host(dxx) : dxx;
    dw[gpu] = gpu ? be.to_host(dww) : dww;
  }
  expect_close(y[1], y[0], tol::kBf16, "y");
  expect_close(dx[1], dx[0], tol::kBf16, "dx");
  expect_close(dw[1], dw[0], tol::kBf16, "dw");
}

bool all_nan(const Tensor& t) {
  for (int64_t i = 0; i < t.numel(); ++i)
    if (!std::isnan(t.data<float>()[i])) return false;
  return true;
}

// Non-finite values in dy or in the weight, on the direct path: every output they reach is all NaN
// on both sides (with accumulate too), the others match; and a finite layer right after it matches
// the CPU (nothing of the NaN propagation is left over).
TEST(CudaLowp, Fp8NonFiniteOperandsLikeCpu) {
  ASSERT_GT(cuda_device_count(), 0);
  LinearPrecision p;
  p.mode = LinearPrecisionMode::Fp8;
  const Case c{200, 256, 128, true};
  const Tensor x = randn({c.M, c.K}, 9, 1);
  Tensor dy = randn({c.M, c.N}, 9, 3);
  dy.data<float>()[150 * c.N + 5] = NAN;
  Outs cpu = run(p, c, x, false, Tensor(), dy), gpu = run(p, c, x, true, Tensor(), dy);
  for (const Tensor* t : {&cpu.dx, &gpu.dx, &cpu.dw, &gpu.dw}) EXPECT_TRUE(all_nan(*t));
  expect_close(gpu.y, cpu.y, tol::kBf16, "y (dy does not reach it)");

  Tensor w = randn({c.N, c.K}, 9, 2, 0.05f, DType::BF16);
  reinterpret_cast<uint16_t*>(w.raw())[70 * c.K + 200] = 0x7f80;  // +Inf in BF16
  cpu = run(p, c, x, false, w);
  gpu = run(p, c, x, true, w);
  for (const Tensor* t : {&cpu.y, &gpu.y, &cpu.dx, &gpu.dx}) EXPECT_TRUE(all_nan(*t));
  expect_close(gpu.dw, cpu.dw, tol::kBf16, "dw (W does not reach it)");

  compare_case(p, c, tol::kBf16);
}

TEST(CudaLowp, Fp8DgradBlockNegativeControl) {
  ASSERT_GT(cuda_device_count(), 0);
  LinearPrecision p;
  p.mode = LinearPrecisionMode::Fp8;
  p.dgrad_block = true;
  compare_case(p, kCases[0], tol::kBf16);
  compare_case(p, kCases[2], tol::kBf16);
}

// The forward's FP8 copy of x, reused: a second forward and the backward give the bits of the
// uncached path; the copy dequantizes to the CPU's values bit for bit.
TEST(CudaLowp, Fp8CacheReusedBitForBit) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  LinearPrecision p;
  p.mode = LinearPrecisionMode::Fp8;
  const int64_t M = 37, K = 200, N = 72;
  Tensor x = be.to_device(randn({M, K}, 5, 1)), w = be.to_device(randn({N, K}, 5, 2, 0.05f, DType::BF16));
  Tensor dy = be.to_device(randn({M, N}, 5, 3));
  Fp8Tiles cache;
  Tensor y1 = be.alloc(DType::F32, {M, N}), y2 = be.alloc(DType::F32, {M, N});
  linear_lowp(p, {x, w, {}, y1}, &cache);
  ASSERT_TRUE(cache.defined());
  EXPECT_EQ(cache.q.device(), Device::CUDA);
  linear_lowp(p, {x, w, {}, y2}, &cache);
  Tensor dw1 = be.alloc(DType::F32, {N, K}), dw2 = be.alloc(DType::F32, {N, K});
  linear_backward_lowp(p, {dy, x, w, {}, {}, dw1}, &cache);
  linear_backward_lowp(p, {dy, x, w, {}, {}, dw2}, nullptr);
  Tensor a = be.to_host(y1), b = be.to_host(y2), c = be.to_host(dw1), d = be.to_host(dw2);
  EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0) << "forward from the cache";
  EXPECT_EQ(std::memcmp(c.raw(), d.raw(), c.nbytes()), 0) << "Wgrad from the cache";
  Fp8Tiles host{be.to_host(cache.q), be.to_host(cache.scale), 0};
  Tensor dq_gpu = be.to_host(dequantize(cache)), dq_cpu = dequantize(host);
  EXPECT_EQ(std::memcmp(dq_gpu.raw(), dq_cpu.raw(), dq_cpu.nbytes()), 0) << "dequantized copy";
  // An expert's slice of the copy is the copy of its rows.
  Fp8Tiles part = fp8_tiles(x.rows(8, 24), false, "x");
  Tensor pq = be.to_host(part.q), cq = be.to_host(cache.rows(8, 24).q);
  EXPECT_EQ(std::memcmp(pq.raw(), cq.raw(), pq.nbytes()), 0);
}

// Wgrad's x̂ᵀ straight from the FP8 copy (one kernel) = the CPU's dequantize then 128×1 quantize with
// the transposed output, byte for byte (partial tiles both ways, an expert's row slice, pow2 scales).
TEST(CudaLowp, RequantizeColumnsMatchesCpuBytes) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  Tensor x = randn({300, 260}, 13, 1, 2.0f);
  for (bool pow2 : {false, true}) {
    Fp8Tiles all = fp8_tiles(x, pow2, "x"), all_gpu = fp8_tiles(be.to_device(x), pow2, "x");
    for (auto [r0, r1] : {std::pair<int64_t, int64_t>{0, 300}, {37, 211}}) {
      SCOPED_TRACE(cat("pow2=", pow2, " rows ", r0, "..", r1));
      const int64_t M = r1 - r0, K = 260, g = (M + 127) / 128;
      Tensor xh = dequantize(all.rows(r0, r1));
      Tensor q_cpu = Tensor::empty(DType::F8_E4M3, {K, M}), s_cpu = Tensor::empty(DType::F32, {K, g});
      quantize_fp8({xh, Fp8Tiling::Col128x1, pow2, true, q_cpu, s_cpu});
      Tensor q = be.alloc(DType::F8_E4M3, {K, M}), s = be.alloc(DType::F32, {K, g});
      cuda_requantize_cols_t(all_gpu.rows(r0, r1), pow2, q, s);
      Tensor qh = be.to_host(q), sh = be.to_host(s);
      EXPECT_EQ(std::memcmp(qh.raw(), q_cpu.raw(), q_cpu.nbytes()), 0) << "FP8 codes differ";
      EXPECT_EQ(std::memcmp(sh.raw(), s_cpu.raw(), s_cpu.nbytes()), 0) << "scales differ";
    }
  }
}

// A NaN in x: in fp8 every output that x reaches is all NaN (as on the CPU, so the trainer skips the
// step); dx does not depend on x and stays finite. In bf16 the NaN row of y is NaN on both sides.
TEST(CudaLowp, NonFiniteInputLikeCpu) {
  ASSERT_GT(cuda_device_count(), 0);
  const Case c{40, 256, 32};
  Tensor x = randn({c.M, c.K}, 9, 1);
  x.data<float>()[3 * c.K + 7] = NAN;
  LinearPrecision p;
  p.mode = LinearPrecisionMode::Fp8;
  Outs cpu = run(p, c, x, false), gpu = run(p, c, x, true);
  for (const Tensor* t : {&cpu.y, &gpu.y, &cpu.dw, &gpu.dw})
    for (int64_t i = 0; i < t->numel(); ++i) ASSERT_TRUE(std::isnan(t->data<float>()[i])) << i;
  expect_close(gpu.dx, cpu.dx, tol::kBf16, "dx");

  p.mode = LinearPrecisionMode::Bf16;
  cpu = run(p, c, x, false);
  gpu = run(p, c, x, true);
  for (int64_t i = 0; i < c.M * c.N; ++i)
    EXPECT_EQ(std::isnan(gpu.y.data<float>()[i]), std::isnan(cpu.y.data<float>()[i])) << i;
  for (int64_t j = 0; j < c.N; ++j) EXPECT_TRUE(std::isnan(gpu.y.data<float>()[3 * c.N + j]));
  Tensor yr = gpu.y.rows(0, 3), cr = cpu.y.rows(0, 3);
  expect_close(yr, cr, tol::kF32, "finite rows of y");
}

}  // namespace
}  // namespace dsv3::test
