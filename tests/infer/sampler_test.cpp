// Sampler: masks against an independent computation, seed determinism, padding rows, penalties,
// stop strings, flag validation; the speculative rejection rule against the target law.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <set>

#include "core/error.h"
#include "infer/sampler.h"
#include "infer/spec_decode.h"

namespace dsv3 {
namespace {

std::vector<float> random_logits(int64_t V, uint64_t seed) {
  std::vector<float> l(static_cast<size_t>(V));
  for (int64_t i = 0; i < V; ++i) l[size_t(i)] = 2.0f * rng_normal(seed, 7, uint64_t(i));
  return l;
}

// Reference: probabilities at temperature T in double, then each filter by its definition.
std::set<int32_t> reference_keep(const std::vector<float>& l, float T, int64_t k, double top_p, double min_p) {
  const size_t V = l.size();
  std::vector<double> p(V);
  double mx = -1e300, sum = 0;
  for (float v : l) mx = std::max(mx, double(v));
  for (size_t i = 0; i < V; ++i) sum += p[i] = std::exp((double(l[i]) - mx) / T);
  for (double& v : p) v /= sum;
  std::vector<int32_t> ids(V);
  std::iota(ids.begin(), ids.end(), 0);
  std::sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return p[size_t(a)] > p[size_t(b)] || (p[size_t(a)] == p[size_t(b)] && a < b); });
  std::vector<int32_t> kept = ids;
  if (k > 0 && size_t(k) < kept.size()) kept.resize(size_t(k));
  if (top_p < 1.0) {
    double mass = 0;
    for (int32_t i : kept) mass += p[size_t(i)];
    double cum = 0;
    size_t n = 0;
    for (; n < kept.size();) {
      cum += p[size_t(kept[n])] / mass;
      ++n;
      if (cum >= top_p) break;
    }
    kept.resize(n);
  }
  if (min_p > 0) {
    const double thr = min_p * p[size_t(kept[0])];
    std::vector<int32_t> k2;
    for (int32_t i : kept)
      if (p[size_t(i)] >= thr) k2.push_back(i);
    kept = k2;
  }
  return {kept.begin(), kept.end()};
}

std::set<int32_t> support(const std::vector<float>& probs) {
  std::set<int32_t> s;
  for (size_t i = 0; i < probs.size(); ++i)
    if (probs[i] > 0) s.insert(int32_t(i));
  return s;
}

TEST(Sampler, MasksMatchAnIndependentComputation) {
  const int64_t V = 64;
  struct Case {
    float T;
    int64_t k;
    float p, m;
  };
  for (const Case c : {Case{1.0f, 5, 1.0f, 0.0f}, Case{0.7f, 0, 0.6f, 0.0f}, Case{1.3f, 0, 1.0f, 0.2f},
                       Case{1.0f, 20, 0.8f, 0.05f}, Case{0.5f, 3, 0.99f, 0.5f}, Case{2.0f, 0, 0.3f, 0.0f}}) {
    for (uint64_t seed = 1; seed <= 5; ++seed) {
      const auto l = random_logits(V, seed);
      SamplingParams sp;
      sp.temperature = c.T;
      sp.top_k = c.k;
      sp.top_p = c.p;
      sp.min_p = c.m;
      std::vector<float> probs;
      sampling_probs(l, V, {}, sp, probs);
      EXPECT_EQ(support(probs), reference_keep(l, c.T, c.k, c.p, c.m)) << "T " << c.T << " k " << c.k << " p " << c.p
                                                                       << " min_p " << c.m << " seed " << seed;
      double sum = 0;
      for (float v : probs) sum += v;
      EXPECT_NEAR(sum, 1.0, 1e-5);
    }
  }
}

TEST(Sampler, SameSeedSameTokensAndGreedyIsArgmax) {
  const auto l = random_logits(100, 3);
  SamplingParams sp;
  sp.temperature = 1.0f;
  sp.seed = 9;
  auto draw = [&](uint64_t seed) {
    Rng r{seed, 0};
    std::vector<int32_t> out;
    for (int i = 0; i < 50; ++i) out.push_back(sample_token(l, 100, {}, sp, r));
    return out;
  };
  EXPECT_EQ(draw(9), draw(9));
  EXPECT_NE(draw(9), draw(10));
  SamplingParams g;
  Rng r{1, 0};
  EXPECT_EQ(sample_token(l, 100, {}, g, r), int32_t(std::max_element(l.begin(), l.end()) - l.begin()));
  EXPECT_EQ(r.counter, 0u);  // greedy draws nothing
}

TEST(Sampler, PaddingRowsAreNeverSampled) {
  // Ids ≥ n_valid get by far the largest logits; none may come out, greedy or sampled.
  std::vector<float> l = random_logits(40, 5);
  for (size_t i = 30; i < 40; ++i) l[i] = 100.0f;
  SamplingParams g;
  Rng r{1, 0};
  EXPECT_LT(sample_token(l, 30, {}, g, r), 30);
  SamplingParams sp;
  sp.temperature = 5.0f;
  for (int i = 0; i < 2000; ++i) EXPECT_LT(sample_token(l, 30, {}, sp, r), 30);
  std::vector<float> probs;
  sampling_probs(l, 30, {}, sp, probs);
  for (size_t i = 30; i < 40; ++i) EXPECT_EQ(probs[i], 0.0f);
}

TEST(Sampler, RepetitionPenaltyDividesPositiveAndMultipliesNegative) {
  std::vector<float> l = {2.0f, 1.9f, -0.5f, -0.6f};
  EXPECT_EQ(greedy_token(l, 4, {}, 1.0f), 0);
  EXPECT_EQ(greedy_token(l, 4, std::vector<int32_t>{0, 0}, 1.2f), 1);  // 2/1.2 < 1.9
  std::vector<float> n = {-1.0f, -1.1f};
  EXPECT_EQ(greedy_token(n, 2, std::vector<int32_t>{0}, 1.2f), 1);  // −1.2 < −1.1
}

TEST(Sampler, InvalidValuesNameTheFlag) {
  auto msg = [](SamplingParams p) {
    try {
      p.validate();
    } catch (const InputError& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  SamplingParams p;
  p.temperature = -1;
  EXPECT_NE(msg(p).find("--temp"), std::string::npos);
  p = {};
  p.top_k = -3;
  EXPECT_NE(msg(p).find("--top-k"), std::string::npos);
  p = {};
  p.top_p = 0.0f;
  EXPECT_NE(msg(p).find("--top-p"), std::string::npos);
  p = {};
  p.min_p = 2.0f;
  EXPECT_NE(msg(p).find("--min-p"), std::string::npos);
  p = {};
  p.repeat_penalty = 0.0f;
  EXPECT_NE(msg(p).find("--repeat-penalty"), std::string::npos);
  p = {};
  p.temperature = NAN;
  EXPECT_NE(msg(p).find("--temp"), std::string::npos);
  EXPECT_EQ(msg(SamplingParams{}), "");
}

TEST(StopStrings, FindsEarliestAndHoldsBackPrefixes) {
  StopStrings s({"</s>", "User:"});
  EXPECT_EQ(s.find("hello User: x </s>"), 6u);
  EXPECT_EQ(s.find("hello"), std::string::npos);
  EXPECT_EQ(s.safe_prefix("hello </"), 6u);
  EXPECT_EQ(s.safe_prefix("hello Us"), 6u);
  EXPECT_EQ(s.safe_prefix("hello"), 5u);
  EXPECT_THROW(StopStrings({""}), InputError);
}

// ---- the speculative rejection rule ---------------------------------------------------------
// Target p and draft q on 6 tokens; over n rounds the first output token must follow p0, and the
// second (present when the first draft was kept) must follow p1. Pearson's chi-square with 5
// degrees of freedom; the threshold 20.515 is the 0.999 quantile of χ²(5), so a correct rule
// fails with probability 0.001 — and with the fixed seed the result is fixed.
constexpr double kChi2_5_999 = 20.515;

double chi2(const std::vector<int64_t>& counts, const std::vector<float>& p) {
  int64_t n = 0;
  for (int64_t c : counts) n += c;
  double x = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    const double e = double(n) * p[i];
    x += (double(counts[i]) - e) * (double(counts[i]) - e) / e;
  }
  return x;
}

TEST(SpecRule, KeepsTheTargetDistribution) {
  const std::vector<float> p0 = {0.30f, 0.05f, 0.25f, 0.10f, 0.20f, 0.10f};
  const std::vector<float> p1 = {0.10f, 0.40f, 0.05f, 0.15f, 0.10f, 0.20f};
  const std::vector<float> p2 = {1 / 6.f, 1 / 6.f, 1 / 6.f, 1 / 6.f, 1 / 6.f, 1 / 6.f};
  const std::vector<float> q0 = {0.05f, 0.40f, 0.10f, 0.30f, 0.05f, 0.10f};
  const std::vector<float> q1 = {0.30f, 0.10f, 0.20f, 0.10f, 0.20f, 0.10f};
  Rng rng{2024, 0};
  std::vector<int64_t> first(6, 0), second(6, 0), raw_draft(6, 0);
  const int n = 40000;
  for (int i = 0; i < n; ++i) {
    const int32_t d1 = sample_from(q0, rng), d2 = sample_from(q1, rng);
    ++raw_draft[size_t(d1)];
    const std::vector<int32_t> d = {d1, d2};
    const SpecVerdict v = speculative_verify(d, {q0, q1}, {p0, p1, p2}, rng);
    const int32_t t1 = v.accepted >= 1 ? d1 : v.next;
    ++first[size_t(t1)];
    if (v.accepted >= 1) ++second[size_t(v.accepted >= 2 ? d2 : v.next)];
  }
  const double x1 = chi2(first, p0), x2 = chi2(second, p1);
  std::printf("[spec rule] chi2 first token %.2f, second token %.2f (threshold %.3f)\n", x1, x2, kChi2_5_999);
  EXPECT_LT(x1, kChi2_5_999);
  EXPECT_LT(x2, kChi2_5_999);
  // The same test rejects the draft law itself: it has the power to catch a wrong rule.
  EXPECT_GT(chi2(raw_draft, p0), kChi2_5_999);
}

TEST(SpecRule, GreedyDistributionsKeepExactlyTheArgmaxPrefix) {
  auto onehot = [](int32_t i) {
    std::vector<float> v(5, 0.0f);
    v[size_t(i)] = 1.0f;
    return v;
  };
  Rng rng{1, 0};
  const SpecVerdict v = speculative_verify(std::vector<int32_t>{2, 3, 4}, {onehot(2), onehot(3), onehot(4)},
                                           {onehot(2), onehot(3), onehot(1), onehot(0)}, rng);
  EXPECT_EQ(v.accepted, 2);
  EXPECT_EQ(v.next, 1);
}

TEST(SpecStats, PerPositionCounts) {
  SpecStats s;
  s.record(3, 1, 2);
  s.record(3, 3, 4);
  EXPECT_EQ(s.proposed, (std::vector<int64_t>{2, 2, 1}));
  EXPECT_EQ(s.accepted, (std::vector<int64_t>{2, 1, 1}));
  EXPECT_DOUBLE_EQ(s.tokens_per_round(), 3.0);
}

}  // namespace
}  // namespace dsv3
