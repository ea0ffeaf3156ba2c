// The output head under the training precisions (model/output_head.h): F32 in F32 training, BF16
// operands with FP32 accumulation under bf16 and fp8 — never FP8. References in double from the
// operands as each mode should round them: the plain F32 values, or both rounded to BF16.
#include <gtest/gtest.h>

#include <cmath>

#include "backend/fp8.h"
#include "backend/tolerance.h"
#include "core/rng.h"
#include "model/output_head.h"

namespace dsv3 {
namespace {

Tensor normal(const Shape& s, uint64_t stream) {
  Tensor t = Tensor::empty(DType::F32, s);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = rng_normal(91, stream, uint64_t(i));
  return t;
}

float bf16(float v) { return Tensor::borrow(&v, DType::F32, {1}, nullptr).to(DType::BF16).to(DType::F32).data<float>()[0]; }

// Relative L2 error of y against x·Wᵀ in double, with x and W rounded to BF16 first when `round`.
double rel_err(const Tensor& x, const Tensor& w, const Tensor& y, bool round) {
  const int64_t N = x.dim(0), K = x.dim(1), V = w.dim(0);
  double num = 0, den = 0;
  for (int64_t r = 0; r < N; ++r)
    for (int64_t j = 0; j < V; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) {
        const float a = x.data<float>()[r * K + k], b = w.data<float>()[j * K + k];
        s += round ? double(bf16(a)) * double(bf16(b)) : double(a) * double(b);
      }
      const double d = double(y.data<float>()[r * V + j]) - s;
      num += d * d;
      den += s * s;
    }
  return std::sqrt(num / den);
}

class OutputHead : public ::testing::TestWithParam<LinearPrecisionMode> {
 protected:
  void TearDown() override { linear_precision() = LinearPrecision{}; }
};

TEST_P(OutputHead, ForwardRoundsOperandsToBf16OnlyInLowPrecision) {
  const LinearPrecisionMode mode = GetParam();
  linear_precision() = LinearPrecision{mode};
  const Tensor x = normal({6, 256}, 1), w = normal({40, 256}, 2);
  LinearParam p;
  p.w = w;
  Tensor y = Tensor::zeros(DType::F32, {6, 40});
  head_forward(cpu_backend(), p, x, y);
  const bool low = mode != LinearPrecisionMode::F32;
  // The expected rounding within FP32 accumulation error; the other rounding is ~1e-3 away.
  EXPECT_LE(rel_err(x, w, y, low), tol::kF32);
  EXPECT_GT(rel_err(x, w, y, !low), 10 * tol::kF32);
}

TEST_P(OutputHead, BackwardRoundsOperandsToBf16OnlyInLowPrecision) {
  const LinearPrecisionMode mode = GetParam();
  linear_precision() = LinearPrecision{mode};
  const Tensor x = normal({6, 128}, 3), w = normal({40, 128}, 4), dy = normal({6, 40}, 5);
  LinearParam p, g;
  p.w = w;
  g.w = Tensor::zeros(DType::F32, {40, 128});
  Tensor dx = Tensor::zeros(DType::F32, {6, 128});
  head_backward(cpu_backend(), p, g, x, dy, dx, false);
  const bool low = mode != LinearPrecisionMode::F32;
  // dx = dy·W: the same check with W transposed (dx[r, k] = Σ_j dy[r, j]·W[j, k]).
  Tensor wt = Tensor::empty(DType::F32, {128, 40});
  for (int64_t j = 0; j < 40; ++j)
    for (int64_t k = 0; k < 128; ++k) wt.data<float>()[k * 40 + j] = w.data<float>()[j * 128 + k];
  EXPECT_LE(rel_err(dy, wt, dx, low), tol::kF32);
  EXPECT_GT(rel_err(dy, wt, dx, !low), 10 * tol::kF32);
}

INSTANTIATE_TEST_SUITE_P(Modes, OutputHead,
                         ::testing::Values(LinearPrecisionMode::F32, LinearPrecisionMode::Bf16,
                                           LinearPrecisionMode::Fp8));

}  // namespace
}  // namespace dsv3
