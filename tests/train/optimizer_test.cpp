#include "train/optimizer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>

#include "backend/ops.h"
#include "core/rng.h"

namespace dsv3 {
namespace {

Tensor random_tensor(const Shape& s, uint64_t stream, float scale = 1.0f) {
  Tensor t = Tensor::empty(DType::F32, s);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = scale * rng_normal(7, stream, uint64_t(i));
  return t;
}

// torch.optim.AdamW, written out in double from its documented algorithm (decoupled decay first).
struct RefAdamW {
  std::vector<double> p, m, v;
  double b1 = 0.9, b2 = 0.95, eps = 1e-8;
  void step(const std::vector<double>& g, double lr, double wd, int t) {
    for (size_t i = 0; i < p.size(); ++i) {
      p[i] *= 1.0 - lr * wd;
      m[i] = b1 * m[i] + (1 - b1) * g[i];
      v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
      double mh = m[i] / (1 - std::pow(b1, t)), vh = v[i] / (1 - std::pow(b2, t));
      p[i] -= lr * mh / (std::sqrt(vh) + eps);
    }
  }
};

std::vector<double> as_double(const Tensor& t) {
  std::vector<double> out(size_t(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) out[size_t(i)] = t.data<float>()[i];
  return out;
}

TEST(AdamW, MatchesReferenceWithDecayOnMatricesOnly) {
  Tensor w = random_tensor({8, 16}, 1), b = random_tensor({16}, 2);
  Tensor gw = Tensor::zeros(DType::F32, w.shape()), gb = Tensor::zeros(DType::F32, b.shape());
  OptimizerConfig cfg;
  cfg.clip_norm = 0;  // clipping is tested separately
  AdamW opt({{"w", w, gw, is_matrix(w.shape())}, {"b", b, gb, is_matrix(b.shape())}}, cfg);
  RefAdamW rw{as_double(w), std::vector<double>(128), std::vector<double>(128)};
  RefAdamW rb{as_double(b), std::vector<double>(16), std::vector<double>(16)};
  for (int t = 1; t <= 5; ++t) {
    Tensor nw = random_tensor(w.shape(), 100 + t, 0.1f), nb = random_tensor(b.shape(), 200 + t, 0.1f);
    std::memcpy(gw.raw(), nw.raw(), nw.nbytes());
    std::memcpy(gb.raw(), nb.raw(), nb.nbytes());
    double lr = 1e-2 * t;
    auto r = opt.step(lr, 1.0);
    ASSERT_TRUE(r.applied);
    rw.step(as_double(gw), lr, 0.1, t);
    rb.step(as_double(gb), lr, 0.0, t);
  }
  for (int64_t i = 0; i < w.numel(); ++i) EXPECT_NEAR(w.data<float>()[i], rw.p[size_t(i)], 2e-6) << i;
  for (int64_t i = 0; i < b.numel(); ++i) EXPECT_NEAR(b.data<float>()[i], rb.p[size_t(i)], 2e-6) << i;
  EXPECT_EQ(opt.updates(), 5);
}

TEST(AdamW, GlobalNormAndClipping) {
  Tensor a = Tensor::zeros(DType::F32, {2, 2}), b = Tensor::zeros(DType::F32, {3});
  Tensor ga = Tensor::zeros(DType::F32, {2, 2}), gb = Tensor::zeros(DType::F32, {3});
  for (int i = 0; i < 4; ++i) ga.data<float>()[i] = 3.0f;  // Σ² = 36
  gb.data<float>()[0] = 8.0f;                             // + 64 → norm 10
  OptimizerConfig cfg;
  cfg.weight_decay = 0;
  AdamW opt({{"a", a, ga, true}, {"b", b, gb, false}}, cfg);
  EXPECT_DOUBLE_EQ(opt.grad_norm(), 10.0);
  EXPECT_DOUBLE_EQ(opt.grad_norm(0.5), 5.0);
  auto r = opt.step(1e-3, 2.0, 0.5);
  EXPECT_DOUBLE_EQ(r.grad_norm, 5.0);
  EXPECT_NEAR(r.clip_scale, 1.0 / (5.0 + 1e-6), 1e-15);  // torch's max_norm / (norm + 1e-6)
  // Adam's first step moves every element with a non-zero gradient by lr·sign(g) (up to eps),
  // whatever the scale: the clipped gradient is still in the direction of g.
  EXPECT_NEAR(a.data<float>()[0], -1e-3, 1e-8);
  EXPECT_NEAR(b.data<float>()[0], -1e-3, 1e-8);
  EXPECT_EQ(b.data<float>()[1], 0.0f);
}

TEST(AdamW, Bf16MomentsAreRoundedAndClose) {
  Tensor w1 = random_tensor({4, 32}, 3), w2 = w1.clone();
  Tensor g = random_tensor({4, 32}, 4, 0.01f);
  OptimizerConfig c32, c16;
  c16.moment_dtype = DType::BF16;
  AdamW o32({{"w", w1, g, true}}, c32), o16({{"w", w2, g, true}}, c16);
  for (int t = 0; t < 3; ++t) {
    o32.step(1e-3, 1.0);
    o16.step(1e-3, 1.0);
  }
  auto st = o16.state_tensors();
  ASSERT_EQ(st.size(), 2u);
  EXPECT_EQ(st[0].name, "w.exp_avg");
  EXPECT_EQ(st[0].tensor.dtype(), DType::BF16);
  double maxdiff = 0;
  for (int64_t i = 0; i < w1.numel(); ++i)
    maxdiff = std::max(maxdiff, double(std::abs(w1.data<float>()[i] - w2.data<float>()[i])));
  EXPECT_GT(maxdiff, 0.0);   // BF16 rounding changed something
  EXPECT_LT(maxdiff, 3e-5);  // but by a fraction of one lr-sized step (3 steps of ~1e-3)
}

// With BF16 moments the update reads the moments before their storage rounding, in the plain
// update as in the backend's kernel (which the trainer runs): the two agree to float rounding, where
// an update from the rounded moments is off by BF16's ~2⁻⁹ of the step.
TEST(AdamW, Bf16MomentsPlainUpdateAgreesWithTheBackend) {
  Tensor w1 = random_tensor({4, 32}, 5, 0.01f), w2 = w1.clone();  // small weights: ulps of ~2e-9
  Tensor g = random_tensor({4, 32}, 6, 0.01f);
  OptimizerConfig c;
  c.moment_dtype = DType::BF16;
  AdamW plain({{"w", w1, g, true}}, c), backend({{"w", w2, g, true}}, c, &cpu_backend());
  for (int t = 0; t < 2; ++t) {
    plain.step(1e-3, 1.0);
    backend.step(1e-3, 1.0);
  }
  double maxdiff = 0;
  for (int64_t i = 0; i < w1.numel(); ++i)
    maxdiff = std::max(maxdiff, double(std::abs(w1.data<float>()[i] - w2.data<float>()[i])));
  EXPECT_LT(maxdiff, 2e-8);  // a few ulps of the weights; the rounded moments' update is off by ~1e-6
}

TEST(AdamW, NonFiniteStepsAreSkippedCountedAndStop) {
  Tensor w = random_tensor({4, 4}, 5), g = random_tensor({4, 4}, 6);
  OptimizerConfig cfg;
  cfg.max_consecutive_skips = 3;
  AdamW opt({{"w", w, g, true}}, cfg);
  Tensor before = w.clone();
  auto r = opt.step(1e-3, std::numeric_limits<double>::quiet_NaN());
  EXPECT_FALSE(r.applied);
  EXPECT_EQ(r.skipped_total, 1);
  EXPECT_EQ(std::memcmp(w.raw(), before.raw(), w.nbytes()), 0) << "a skipped step changes nothing";
  g.data<float>()[5] = std::numeric_limits<float>::infinity();
  r = opt.step(1e-3, 1.0);
  EXPECT_FALSE(r.applied);
  EXPECT_EQ(r.consecutive_skips, 2);
  EXPECT_EQ(std::memcmp(w.raw(), before.raw(), w.nbytes()), 0);
  g.data<float>()[5] = 0.5f;
  r = opt.step(1e-3, 1.0);  // a good step resets the run of skips, not the total
  EXPECT_TRUE(r.applied);
  EXPECT_EQ(r.skipped_total, 2);
  EXPECT_EQ(opt.updates(), 1);
  g.data<float>()[0] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_FALSE(opt.step(1e-3, 1.0).applied);
  EXPECT_FALSE(opt.step(1e-3, 1.0).applied);
  try {
    opt.step(1e-3, 1.0);
    FAIL() << "third consecutive skip must stop the run";
  } catch (const TrainingStopped& e) {
    EXPECT_NE(std::string(e.what()).find("3 optimizer steps in a row"), std::string::npos) << e.what();
  }
  EXPECT_EQ(opt.skipped_total(), 5);
}

// set_copies: each applied step leaves every copy equal to its parameter converted (BF16 here),
// through the backend's op and through the plain update; a skipped step leaves them alone; a copy
// of another shape is refused.
TEST(AdamW, CopiesFollowEveryAppliedStep) {
  for (Backend* be : {static_cast<Backend*>(nullptr), &cpu_backend()}) {
    Tensor w = random_tensor({8, 16}, 11), b = random_tensor({16}, 12);
    Tensor gw = random_tensor(w.shape(), 13, 0.1f), gb = random_tensor(b.shape(), 14, 0.1f);
    Tensor cw = Tensor::zeros(DType::BF16, w.shape());
    AdamW opt({{"w", w, gw, true}, {"b", b, gb, false}}, OptimizerConfig{}, be);
    opt.set_copies([&](const std::string& n) { return n == "w" ? cw : Tensor(); });
    for (int t = 1; t <= 2; ++t) {
      ASSERT_TRUE(opt.step(1e-2, 1.0).applied);
      const Tensor want = w.to(DType::BF16);
      EXPECT_EQ(std::memcmp(cw.raw(), want.raw(), cw.nbytes()), 0) << (be ? "backend" : "plain") << " step " << t;
    }
    const Tensor before = cw.clone();
    EXPECT_FALSE(opt.step(1e-2, std::numeric_limits<double>::quiet_NaN()).applied);
    EXPECT_EQ(std::memcmp(cw.raw(), before.raw(), cw.nbytes()), 0);
    EXPECT_THROW(opt.set_copies([&](const std::string& n) { return n == "b" ? cw : Tensor(); }), InternalError);
  }
}

TEST(AdamW, StateRoundTripContinuesBitwise) {
  Tensor w = random_tensor({6, 6}, 8), g = Tensor::zeros(DType::F32, {6, 6});
  OptimizerConfig cfg;
  cfg.moment_dtype = DType::BF16;
  AdamW a({{"w", w, g, true}}, cfg);
  auto set_grad = [&](int t) {
    Tensor n = random_tensor({6, 6}, 300 + t, 0.1f);
    std::memcpy(g.raw(), n.raw(), n.nbytes());
  };
  for (int t = 0; t < 3; ++t) set_grad(t), a.step(1e-2, 1.0);
  a.step(1e-2, NAN);  // one skip, to check the counters travel too
  std::map<std::string, Tensor> saved;
  for (auto& s : a.state_tensors()) saved[s.name] = s.tensor.clone();
  nlohmann::json js = a.state_json();
  Tensor w2 = w.clone();
  AdamW b({{"w", w2, g, true}}, cfg);
  auto lookup = [&](const std::string& n) { return saved.count(n) ? saved[n] : Tensor(); };
  b.load_state(lookup, js, "test");
  EXPECT_EQ(b.updates(), 3);
  EXPECT_EQ(b.skipped_total(), 1);
  for (int t = 3; t < 6; ++t) {
    set_grad(t);
    a.step(1e-2, 1.0);
    b.step(1e-2, 1.0);
  }
  EXPECT_EQ(std::memcmp(w.raw(), w2.raw(), w.nbytes()), 0);

  saved.erase("w.exp_avg_sq");
  EXPECT_THROW(b.load_state(lookup, js, "test"), InputError);
  saved["w.exp_avg_sq"] = Tensor::zeros(DType::F32, {6, 5});
  EXPECT_THROW(b.load_state(lookup, js, "test"), InputError);
}

TEST(AdamW, ConfigValidation) {
  OptimizerConfig c;
  c.beta2 = 1.0;
  EXPECT_THROW(c.validate(), InputError);
  c = {};
  c.moment_dtype = DType::F16;
  EXPECT_THROW(c.validate(), InputError);
}

TEST(GradAccumulator, AveragesMicroBatches) {
  GradAccumulator acc(4);
  EXPECT_DOUBLE_EQ(acc.grad_scale(), 0.25);
  EXPECT_FALSE(acc.add(1.0, 10));
  EXPECT_FALSE(acc.add(2.0, 10));
  EXPECT_FALSE(acc.add(3.0, 10));
  EXPECT_TRUE(acc.add(6.0, 10));
  EXPECT_DOUBLE_EQ(acc.mean_loss(), 3.0);
  EXPECT_EQ(acc.tokens(), 40);
  EXPECT_THROW(acc.add(1.0, 1), InternalError);
  acc.reset();
  EXPECT_FALSE(acc.add(1.0, 1));
  EXPECT_THROW(GradAccumulator(0), InputError);
}

}  // namespace
}  // namespace dsv3
