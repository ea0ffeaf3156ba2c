// experts_forward / experts_backward (model/moe.cpp) on CUDA, where the row blocks' GEMMs go to the
// backend's lane streams (CudaBackend::begin_lanes) through linear_lowp_grouped: in fp8 the
// preparations for all blocks run in one launch on the issuing stream, then the matmuls in one grouped
// launch (grouped_fp8_gemm.cu) or, with that turned off, on the lanes; in bf16
// blocks this small take one linear per block on the lanes (larger ones are batched matmuls:
// cuda_lowp_grouped_test.cpp). With lanes
// the outputs, dx and every weight gradient equal those of the same calls with lanes off, bit for
// bit (the same kernels on the same operands; a race between lanes, or a block reused while a lane
// still reads it, would change them).
// In bf16 both also match the CPU's experts_* under kBf16: a chain (gate/up, SwiGLU, down and back)
// whose intermediate values are rounded to BF16 again, where a value summed in another order can
// round to the neighbouring BF16 number. FP8 re-quantizes those values (a neighbouring E4M3 number
// is up to 2⁻⁴ away), so its chain is compared with the CPU by the trainer tests' losses instead
// (cuda_lowp_trainer_test.cpp). Blocks of 0, 1 and uneven row counts; F32 master weights (converted
// in each call: inside the lanes in bf16, in the grouped preparation in fp8) and BF16 ones. F32
// math with BF16 weights (inference's prefill) runs each forward projection of all blocks as one
// grouped_linear (x split into two BF16 terms, one batched matmul) and opens no lanes: against the
// CPU under kF32.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "../backend/harness.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/linear_lowp.h"
#include "backend/fp8.h"
#include "backend/tolerance.h"
#include "model/model.h"

namespace dsv3::test {
namespace {

constexpr int64_t H = 256, I = 128;
const std::vector<int64_t> kRows = {37, 0, 130, 1, 64, 200, 12};

struct Result {
  std::vector<Tensor> t;  // host: out, dx, then each expert's three weight gradients
};

// bad_row ≥ 0: x[bad_row, 3] = +Inf.
Result run(Backend& be, LinearPrecisionMode mode, DType wtype, int64_t bad_row = -1) {
  const int64_t E = int64_t(kRows.size());
  std::vector<int64_t> offsets = {0};
  for (int64_t r : kRows) offsets.push_back(offsets.back() + r);
  const int64_t M = offsets.back();
  auto dev = [&](const Tensor& t) { return be.device() == Device::CPU ? t.clone() : be.to_device(t); };
  auto zeros = [&](const Shape& s) { return dev(Tensor::zeros(DType::F32, s)); };
  std::vector<MlpParams> p(static_cast<size_t>(E)), g(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) {
    auto lin = [&](int64_t n, int64_t k, uint64_t s) {
      LinearParam l;
      l.w = dev(randn({n, k}, 40 + uint64_t(e), s, 0.06f, wtype));
      l.lowp = true;
      return l;
    };
    p[size_t(e)] = {lin(I, H, 1), lin(I, H, 2), lin(H, I, 3)};
    for (LinearParam* l : {&g[size_t(e)].gate_proj, &g[size_t(e)].up_proj}) l->w = zeros({I, H});
    g[size_t(e)].down_proj.w = zeros({H, I});
  }
  Tensor xh = randn({M, H}, 41, 1);
  if (bad_row >= 0) xh.data<float>()[bad_row * H + 3] = std::numeric_limits<float>::infinity();
  const Tensor x = dev(xh), dout = dev(randn({M, H}, 41, 2)), dx = zeros({M, H});
  linear_precision() = LinearPrecision{mode};
  MlpActs a;
  experts_forward(be, p, offsets, x, a);
  experts_backward(be, p, g, offsets, a, dout, dx, false);
  linear_precision() = LinearPrecision{};
  Result r;
  r.t = {be.to_host(a.out), be.to_host(dx)};
  for (const MlpParams& ge : g)
    for (const LinearParam* l : {&ge.gate_proj, &ge.up_proj, &ge.down_proj}) r.t.push_back(be.to_host(l->w));
  return r;
}

// Equal bits, any NaN equal to any NaN (a GEMM fed a NaN scale writes NaNs of its own choosing).
void expect_same(const Tensor& a, const Tensor& b) {
  ASSERT_EQ(a.numel(), b.numel());
  const float* x = a.data<float>();
  const float* y = b.data<float>();
  int64_t diff = 0;
  for (int64_t i = 0; i < a.numel(); ++i)
    if (!(std::isnan(x[i]) && std::isnan(y[i])) && std::memcmp(&x[i], &y[i], sizeof(float)) != 0) ++diff;
  EXPECT_EQ(diff, 0) << "elements that differ";
}

// Lanes 4 and 8 (twice, cycling the lane count) against lanes off. cpu_tol < 0: no comparison with
// the CPU.
void check(LinearPrecisionMode mode, DType wtype, double cpu_tol) {
  SCOPED_TRACE(cat("mode ", int(mode), " weights ", dtype_name(wtype)));
  const int before = cuda_lanes();
  cuda_set_lanes(1);
  const Result serial = run(cuda_backend(), mode, wtype);
  Result lanes;
  for (int n : {4, 8, 4, 8}) {
    SCOPED_TRACE(cat(n, " lanes"));
    cuda_set_lanes(n);
    lanes = run(cuda_backend(), mode, wtype);
    ASSERT_EQ(lanes.t.size(), serial.t.size());
    for (size_t i = 0; i < lanes.t.size(); ++i) {
      SCOPED_TRACE(cat("tensor ", i));
      expect_same(lanes.t[i], serial.t[i]);
      EXPECT_EQ(compare(lanes.t[i], to_vec(serial.t[i])).non_finite, 0);
    }
  }
  cuda_set_lanes(before);
  if (cpu_tol < 0) return;
  const Result cpu = run(cpu_backend(), mode, wtype);
  for (size_t i = 0; i < lanes.t.size(); ++i) {
    SCOPED_TRACE(cat("tensor ", i, " against the CPU"));
    const Err e = compare(lanes.t[i], to_vec(cpu.t[i]));
    EXPECT_LE(e.norm_err, cpu_tol) << "worst element " << e.worst;
  }
}

TEST(CudaExperts, Bf16LanesEqualSerialAndMatchCpu) {
  check(LinearPrecisionMode::Bf16, DType::F32, tol::kBf16);
  check(LinearPrecisionMode::Bf16, DType::BF16, tol::kBf16);
}

TEST(CudaExperts, F32MathWithBf16WeightsMatchesCpu) {
  check(LinearPrecisionMode::F32, DType::BF16, tol::kF32);
}

// With the grouped kernel the matmuls take no lanes (only the lanes' setup around them), so there
// the comparison says the path is deterministic; that it is the kernel's is counted.
TEST(CudaExperts, Fp8LanesEqualSerial) {
  const bool before = cuda::grouped_fp8();
  for (bool grouped : {false, true}) {
    SCOPED_TRACE(cat("grouped FP8 matmuls ", grouped));
    cuda::set_grouped_fp8(grouped);
    const int64_t l0 = cuda::grouped_fp8_launches();
    check(LinearPrecisionMode::Fp8, DType::F32, -1);
    check(LinearPrecisionMode::Fp8, DType::BF16, -1);
    if (grouped) {
      EXPECT_GT(cuda::grouped_fp8_launches(), l0);
    } else {
      EXPECT_EQ(cuda::grouped_fp8_launches(), l0);
    }
  }
  cuda::set_grouped_fp8(before);
}

// An Inf in one block's x: on lanes, as serially, that block's outputs are all NaN and every other
// block stays finite (each block's preparation in the grouped launch keeps its own NaN flag).
TEST(CudaExperts, Fp8NonFiniteBlockStaysInItsLane) {
  std::vector<int64_t> offsets = {0};
  for (int64_t r : kRows) offsets.push_back(offsets.back() + r);
  const size_t bad = 2;  // 130 rows
  const int64_t bad_row = offsets[bad] + 7;
  const int before = cuda_lanes();
  cuda_set_lanes(1);
  const Result serial = run(cuda_backend(), LinearPrecisionMode::Fp8, DType::BF16, bad_row);
  cuda_set_lanes(4);
  const Result lanes = run(cuda_backend(), LinearPrecisionMode::Fp8, DType::BF16, bad_row);
  cuda_set_lanes(before);
  for (size_t i = 0; i < 2; ++i) expect_same(lanes.t[i], serial.t[i]);
  const Tensor& out = lanes.t[0];
  for (size_t e = 0; e < kRows.size(); ++e) {
    int64_t nan = 0;
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r)
      for (int64_t c = 0; c < H; ++c) nan += std::isnan(out.data<float>()[r * H + c]) ? 1 : 0;
    EXPECT_EQ(nan, e == bad ? kRows[e] * H : 0) << "block " << e;
  }
}

}  // namespace
}  // namespace dsv3::test
