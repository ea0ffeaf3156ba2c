// The CPU backend's vectorised exp (vec_math.h) against exp in double, for every ISA variant this
// CPU runs, and the cross-entropy built on it: NaN propagation, row tails, and the same loss with
// and without the gradient.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "backend/cpu/vec_math.h"
#include "backend/ops.h"
#include "backend/tolerance.h"
#include "harness.h"
#include "reference.h"

namespace dsv3::test {
namespace {

using cpu::Isa;

std::vector<Isa> variants() {
  std::vector<Isa> v{Isa::Base};
  if (cpu::cpu_isa() != Isa::Base) v.push_back(Isa::Avx2);
  if (cpu::cpu_isa() == Isa::Avx512) v.push_back(Isa::Avx512);
  return v;
}

// |got − exp(x)| in units of the float spacing at exp(x), exp in double.
double ulp_error(float x, float got) {
  const double want = std::exp(double(x));
  const float wf = float(want);
  const double ulp = double(std::nextafter(wf, std::numeric_limits<float>::infinity())) - double(wf);
  return std::fabs(double(got) - want) / ulp;
}

TEST(VecMath, ExpWithinItsUlpBoundOnEveryVariant) {
  // A dense grid over the range with normal results, plus every float in [-1, 1] with a stride
  // (the polynomial's interval), plus points next to each multiple of ln2/2 (where n changes).
  std::vector<float> x;
  const int64_t n = 2'000'000;
  for (int64_t i = 0; i < n; ++i) x.push_back(-87.33f + float((88.72 + 87.33) * double(i) / double(n - 1)));
  for (uint32_t b = std::bit_cast<uint32_t>(1e-30f); b < std::bit_cast<uint32_t>(1.0f); b += 997) {
    x.push_back(std::bit_cast<float>(b));
    x.push_back(-std::bit_cast<float>(b));
  }
  for (int k = -250; k <= 250; ++k) {
    float c = float(k * 0.5 * std::log(2.0));
    x.push_back(std::nextafter(c, -1e9f));
    x.push_back(c);
    x.push_back(std::nextafter(c, 1e9f));
  }
  std::vector<float> y(x.size());
  for (Isa isa : variants()) {
    cpu::exp_f32_array(x.data(), y.data(), int64_t(x.size()), isa);
    double worst = 0;
    float at = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      if (std::exp(double(x[i])) < double(FLT_MIN)) continue;
      const double e = ulp_error(x[i], y[i]);
      if (e > worst) worst = e, at = x[i];
    }
    EXPECT_LE(worst, cpu::kExpMaxUlp) << cpu::isa_name(isa) << " at x = " << at;
    EXPECT_GT(worst, 0.0) << "the sweep compares something";
  }
}

TEST(VecMath, ExpEdgesOnEveryVariant) {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> x{-inf, inf, std::numeric_limits<float>::quiet_NaN(), 0.0f, -0.0f, 88.8f, 1000.0f,
                             -1000.0f, -87.5f, -95.0f, -103.0f, -104.0f, -120.0f};
  std::vector<float> y(x.size());
  for (Isa isa : variants()) {
    cpu::exp_f32_array(x.data(), y.data(), int64_t(x.size()), isa);
    const char* name = cpu::isa_name(isa);
    EXPECT_EQ(y[0], 0.0f) << name;
    EXPECT_EQ(y[1], inf) << name;
    EXPECT_TRUE(std::isnan(y[2])) << name;
    EXPECT_EQ(y[3], 1.0f) << name;
    EXPECT_EQ(y[4], 1.0f) << name;
    EXPECT_EQ(y[5], inf) << name;
    EXPECT_EQ(y[6], inf) << name;
    EXPECT_EQ(y[7], 0.0f) << name;
    // Subnormal results: within one subnormal step (2^-149) of the true value.
    for (size_t i = 8; i < x.size(); ++i)
      EXPECT_LE(std::fabs(double(y[i]) - std::exp(double(x[i]))), std::ldexp(1.0, -149)) << name << " x " << x[i];
  }
}

Tensor logits_tensor(int64_t t, int64_t v, uint64_t seed) { return randn({t, v}, seed, 1, 4.0f); }

TEST(VecMath, CrossEntropyRowTailsAndLossWithoutGradient) {
  Backend& b = cpu_backend();
  for (int64_t v : {1, 15, 17, 37, 1000, 1029}) {
    const int64_t t = 5;
    Tensor l = logits_tensor(t, v, uint64_t(v));
    Tensor tg = Tensor::empty(DType::I32, {t});
    for (int64_t i = 0; i < t; ++i) tg.data<int32_t>()[i] = int32_t((i * 7 + 3) % v);
    tg.data<int32_t>()[2] = -1;
    Tensor loss_a = Tensor::empty(DType::F32, {t}), loss_b = Tensor::empty(DType::F32, {t});
    Tensor dl = Tensor::empty(DType::F32, {t, v});
    b.cross_entropy({l, tg, loss_a, Tensor(), Tensor(), 1.0f});
    b.cross_entropy({l, tg, loss_b, Tensor(), dl, 0.5f});
    EXPECT_EQ(std::memcmp(loss_a.raw(), loss_b.raw(), loss_a.nbytes()), 0) << "v " << v;
    std::vector<int32_t> tv(tg.data<int32_t>(), tg.data<int32_t>() + t);
    Vec lv = to_vec(l);
    Vec want = ref::cross_entropy(lv, tv, t, v);
    Err e = compare(loss_a, want);
    EXPECT_LE(e.norm_err, tol::kF32) << "v " << v;
    // The gradient: 0.5·(softmax − onehot) in double.
    Vec gwant(size_t(t * v), 0.0);
    for (int64_t i = 0; i < t; ++i) {
      if (tv[size_t(i)] < 0) continue;
      double mx = -1e300, s = 0;
      for (int64_t j = 0; j < v; ++j) mx = std::max(mx, lv[size_t(i * v + j)]);
      for (int64_t j = 0; j < v; ++j) s += std::exp(lv[size_t(i * v + j)] - mx);
      for (int64_t j = 0; j < v; ++j)
        gwant[size_t(i * v + j)] = 0.5 * (std::exp(lv[size_t(i * v + j)] - mx) / s - (j == tv[size_t(i)]));
    }
    EXPECT_LE(compare(dl, gwant).norm_err, tol::kF32) << "v " << v;
  }
}

TEST(VecMath, CrossEntropyNanLogitGivesNanLoss) {
  Backend& b = cpu_backend();
  const int64_t t = 3, v = 40;
  Tensor l = logits_tensor(t, v, 9);
  l.data<float>()[1 * v + 21] = std::numeric_limits<float>::quiet_NaN();
  Tensor tg = Tensor::empty(DType::I32, {t});
  for (int64_t i = 0; i < t; ++i) tg.data<int32_t>()[i] = 5;
  Tensor loss = Tensor::empty(DType::F32, {t}), dl = Tensor::empty(DType::F32, {t, v});
  b.cross_entropy({l, tg, loss, Tensor(), dl, 1.0f});
  EXPECT_TRUE(std::isfinite(loss.data<float>()[0]));
  EXPECT_TRUE(std::isnan(loss.data<float>()[1])) << "a NaN logit must make the row's loss NaN (the trainer skips)";
  EXPECT_TRUE(std::isfinite(loss.data<float>()[2]));
}

}  // namespace
}  // namespace dsv3::test
