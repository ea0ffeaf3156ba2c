// Max-min fairness and the event-driven simulation on cases solved by hand from the definitions.
#include "net/maxmin.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "core/rng.h"
#include "maxmin_reference.h"

using namespace dsv3::net;

namespace {

void add(FlowSet& fs, std::vector<int32_t> links, double size, std::vector<float> coefs = {}) {
  fs.add(links, coefs, size);
}

}  // namespace

TEST(MaxMin, TwoBottlenecks) {
  // Links: A (id 0, cap 10), B (id 1, cap 4). f0 on A, f1 on A and B, f2 on B.
  // Progressive filling: A would saturate at 10/2 = 5, B at 4/2 = 2, so B goes first: f1 = f2 = 2.
  // A then has 10 - 2 = 8 left for f0 alone: f0 = 8.
  FlowSet fs;
  add(fs, {0}, 1);
  add(fs, {0, 1}, 1);
  add(fs, {1}, 1);
  auto r = max_min_rates(fs, {10, 4});
  EXPECT_DOUBLE_EQ(r[0], 8);
  EXPECT_DOUBLE_EQ(r[1], 2);
  EXPECT_DOUBLE_EQ(r[2], 2);
}

TEST(MaxMin, SprayedFlowCoefficients) {
  // f0 puts half its bytes on X (id 0) and half on Y (id 1), all on Z (id 2); f1 uses X only.
  // Caps X = Y = 1, Z = 10. Per unit of common rate t: X carries 0.5 t + t = 1.5 t -> saturates at
  // t = 2/3; Y at 1/0.5 = 2; Z at 10. So both flows get 2/3.
  FlowSet fs;
  add(fs, {0, 1, 2}, 1, {0.5f, 0.5f, 1.0f});
  add(fs, {0}, 1);
  auto r = max_min_rates(fs, {1, 1, 10});
  EXPECT_NEAR(r[0], 2.0 / 3, 1e-12);
  EXPECT_NEAR(r[1], 2.0 / 3, 1e-12);
}

TEST(MaxMin, ThreeLevelsAndFailedLink) {
  // Link 0 cap 3 shared by f0, f1, f2; link 1 cap 1 used by f1 only; link 2 cap 0 (failed) used by f3.
  // Link 0 saturates at t = 3/3 = 1 and link 1 at t = 1/1 = 1, the same level: f0 = f1 = f2 = 1.
  // f3 crosses a failed link: 0.
  FlowSet fs;
  add(fs, {0}, 1);
  add(fs, {0, 1}, 1);
  add(fs, {0}, 1);
  add(fs, {2}, 1);
  auto r = max_min_rates(fs, {3, 1, 0});
  EXPECT_DOUBLE_EQ(r[0], 1);
  EXPECT_DOUBLE_EQ(r[1], 1);
  EXPECT_DOUBLE_EQ(r[2], 1);
  EXPECT_DOUBLE_EQ(r[3], 0);
}

TEST(MaxMin, IndependentComponents) {
  // Two disjoint links: the components are solved separately and do not influence each other.
  FlowSet fs;
  add(fs, {0}, 1);
  add(fs, {0}, 1);
  add(fs, {1}, 1);
  MaxMinStats st;
  auto r = max_min_rates(fs, {2, 7}, &st);
  EXPECT_EQ(st.components, 2);
  EXPECT_DOUBLE_EQ(r[0], 1);
  EXPECT_DOUBLE_EQ(r[2], 7);
}

TEST(Fluid, EventDrivenCompletions) {
  // Link 0 cap 1 shared by f0 (1 byte) and f1 (3 bytes): both at 0.5 until f0 ends at t = 2; f1 has
  // 3 - 1 = 2 bytes left at rate 1 and ends at t = 4. f2 (1 byte) alone on link 1 (cap 2): t = 0.5.
  FlowSet fs;
  add(fs, {0}, 1);
  add(fs, {0}, 3);
  add(fs, {1}, 1);
  SimResult r = simulate_fluid(fs, {1, 2});
  EXPECT_DOUBLE_EQ(r.finish[0], 2);
  EXPECT_DOUBLE_EQ(r.finish[1], 4);
  EXPECT_DOUBLE_EQ(r.finish[2], 0.5);
  EXPECT_DOUBLE_EQ(r.makespan, 4);
  EXPECT_EQ(r.stalled, 0);
}

TEST(Fluid, ChainedBottlenecks) {
  // f0 on links 0 (cap 2) and 1 (cap 1), size 2; f1 on link 0 only, size 3.
  // t in [0, 2): link 1 limits f0 to 1 (it saturates at t = 1 before link 0 at 1), f1 gets 2 - 1 = 1.
  // At t = 2 f0 is done (2 bytes at 1); f1 has 3 - 2 = 1 left at rate 2: ends at t = 2.5.
  FlowSet fs;
  add(fs, {0, 1}, 2);
  add(fs, {0}, 3);
  SimResult r = simulate_fluid(fs, {2, 1});
  EXPECT_DOUBLE_EQ(r.finish[0], 2);
  EXPECT_DOUBLE_EQ(r.finish[1], 2.5);
}

TEST(Fluid, StalledFlowIsReported) {
  FlowSet fs;
  add(fs, {0}, 1);
  add(fs, {1}, 1);
  SimResult r = simulate_fluid(fs, {1, 0});
  EXPECT_DOUBLE_EQ(r.finish[0], 1);
  EXPECT_TRUE(std::isinf(r.finish[1]));
  EXPECT_EQ(r.stalled, 1);
}

namespace {

// Random flow sets over a few links: paths of 1-4 distinct links, some sprayed (fractional
// coefficients), some failed links, several disconnected groups of links, a flow without links.
FlowSet random_flows(uint64_t seed, int links, int flows, bool weighted, std::vector<double>* cap) {
  dsv3::Rng rng{seed, 0};
  cap->resize(links);
  for (int l = 0; l < links; ++l) (*cap)[l] = rng.below(10) == 0 ? 0.0 : 1.0 + (double)rng.below(1000) / 10;
  FlowSet fs;
  const int groups = 3;
  for (int f = 0; f < flows; ++f) {
    int g = (int)rng.below(groups), per = links / groups;
    std::vector<int32_t> ls;
    std::vector<float> cs;
    int len = 1 + (int)rng.below(4);
    while ((int)ls.size() < len) {
      int32_t l = g * per + (int32_t)rng.below(per);
      if (std::find(ls.begin(), ls.end(), l) != ls.end()) continue;
      ls.push_back(l);
      cs.push_back(weighted && rng.below(3) == 0 ? 1.0f / (float)(1 + rng.below(4)) : 1.0f);
    }
    fs.add(ls, cs, 1.0 + (double)rng.below(10000));
  }
  fs.add({}, {}, 5.0);
  return fs;
}

}  // namespace

TEST(MaxMin, MatchesPlainProgressiveFillingOnRandomSets) {
  for (uint64_t seed = 1; seed <= 12; ++seed)
    for (bool weighted : {false, true}) {
      std::vector<double> cap;
      FlowSet fs = random_flows(seed, 30, 300, weighted, &cap);
      auto fast = max_min_rates(fs, cap);
      auto ref = reference::max_min(fs, cap, std::vector<bool>(fs.count(), true));
      ASSERT_EQ(fast.size(), ref.size());
      for (size_t f = 0; f < ref.size(); ++f) {
        if (std::isinf(ref[f])) {
          EXPECT_TRUE(std::isinf(fast[f])) << "seed " << seed << " flow " << f;
          continue;
        }
        // The two subtract the frozen rates in different orders: equal up to rounding.
        EXPECT_NEAR(fast[f], ref[f], 1e-9 * ref[f]) << "seed " << seed << " flow " << f;
      }
    }
}

TEST(Fluid, MatchesReEveryEventReferenceOnRandomSets) {
  for (uint64_t seed = 1; seed <= 6; ++seed)
    for (bool weighted : {false, true}) {
      std::vector<double> cap;
      FlowSet fs = random_flows(100 + seed, 24, 120, weighted, &cap);
      SimResult fast = simulate_fluid(fs, cap);
      auto ref = reference::finish_times(fs, cap);
      int stalled = 0;
      for (size_t f = 0; f < ref.size(); ++f) {
        if (std::isinf(ref[f])) {
          ++stalled;
          EXPECT_TRUE(std::isinf(fast.finish[f])) << "seed " << seed << " flow " << f;
          continue;
        }
        EXPECT_NEAR(fast.finish[f], ref[f], 1e-9 * ref[f]) << "seed " << seed << " flow " << f;
      }
      EXPECT_EQ(fast.stalled, stalled);
      EXPECT_GT(fast.events, 20);  // the sets really have many distinct completion times
    }
}
