#include "train/schedule.h"

#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace dsv3 {
namespace {

// The DeepSeek-V3 shape written out independently: ramp, plateau, half-cosine, floor.
double reference_lr(int64_t s, double peak, double lo, int64_t w, int64_t d0, int64_t d1) {
  if (s < w) return peak * double(s + 1) / double(w);
  if (s < d0) return peak;
  if (s >= d1) return lo;
  double frac = double(s - d0) / double(d1 - d0);
  return lo + 0.5 * (peak - lo) * (1.0 + std::cos(M_PI * frac));
}

TEST(LrSchedule, MatchesReferenceEveryStep) {
  LrSchedule s{2.2e-4, 2.2e-5, 20, 60, 100};
  s.validate("test");
  for (int64_t t = 0; t < 120; ++t)
    EXPECT_NEAR(s.at(t), reference_lr(t, 2.2e-4, 2.2e-5, 20, 60, 100), 1e-18) << t;
  EXPECT_DOUBLE_EQ(s.at(19), 2.2e-4);  // warm-up ends exactly at the peak
  EXPECT_DOUBLE_EQ(s.at(59), 2.2e-4);
  EXPECT_DOUBLE_EQ(s.at(60), 2.2e-4);  // cosine starts at the peak
  EXPECT_NEAR(s.at(80), 0.5 * (2.2e-4 + 2.2e-5), 1e-18);  // and is half way at its midpoint
  EXPECT_DOUBLE_EQ(s.at(100), 2.2e-5);
  EXPECT_DOUBLE_EQ(s.at(10'000), 2.2e-5);
}

TEST(LrSchedule, ForRunAndEdges) {
  auto s = LrSchedule::for_run(300, 1e-3, 1e-4, 0.1, 0.5);
  EXPECT_EQ(s.warmup_steps, 30);
  EXPECT_EQ(s.decay_start, 150);
  EXPECT_EQ(s.decay_end, 300);
  EXPECT_NEAR(s.at(299), reference_lr(299, 1e-3, 1e-4, 30, 150, 300), 1e-18);
  LrSchedule flat{1e-3, 0, 0, 0, 0};  // no warm-up, no decay
  EXPECT_DOUBLE_EQ(flat.at(0), 1e-3);
  EXPECT_DOUBLE_EQ(flat.at(1000), 1e-3);
  EXPECT_THROW((LrSchedule{1e-3, 1e-2, 0, 0, 0}.validate("x")), InputError);
  EXPECT_THROW((LrSchedule{1e-3, 0, 10, 5, 20}.validate("x")), InputError);
  auto j = s.to_json();
  auto back = LrSchedule::from_json(j, "state");
  for (int64_t t = 0; t < 310; t += 7) EXPECT_EQ(back.at(t), s.at(t));
  j.erase("min_lr");
  EXPECT_THROW(LrSchedule::from_json(j, "state"), InputError);
}

TEST(ScalarSchedule, ConstantPiecewiseLinear) {
  auto c = ScalarSchedule::parse("0.3", "--mtp-lambda");
  EXPECT_EQ(c.mode(), ScalarSchedule::Mode::Constant);
  EXPECT_DOUBLE_EQ(c.at(0), 0.3);
  EXPECT_DOUBLE_EQ(c.at(1'000'000), 0.3);

  // γ as in DeepSeek-V3: 0.001 for most of training, then 0.
  auto g = ScalarSchedule::parse("1e-3@0,0@800", "--bias-update-speed");
  EXPECT_EQ(g.mode(), ScalarSchedule::Mode::Piecewise);
  EXPECT_DOUBLE_EQ(g.at(0), 1e-3);
  EXPECT_DOUBLE_EQ(g.at(799), 1e-3);
  EXPECT_DOUBLE_EQ(g.at(800), 0.0);
  EXPECT_DOUBLE_EQ(g.at(5000), 0.0);

  // λ: 0.3 then 0.1, as the paper's MTP weight; here with a linear ramp between 100 and 200.
  auto l = ScalarSchedule::parse("lin:0.3@100,0.1@200", "--mtp-lambda");
  EXPECT_DOUBLE_EQ(l.at(0), 0.3);
  EXPECT_DOUBLE_EQ(l.at(100), 0.3);
  EXPECT_NEAR(l.at(150), 0.2, 1e-15);
  EXPECT_NEAR(l.at(125), 0.3 + (0.1 - 0.3) * 0.25, 1e-15);
  EXPECT_DOUBLE_EQ(l.at(200), 0.1);
  EXPECT_DOUBLE_EQ(l.at(900), 0.1);

  auto p = ScalarSchedule::parse("5@10,6@20,7@30", "x");
  EXPECT_DOUBLE_EQ(p.at(0), 5);  // before the first point: the first value
  EXPECT_DOUBLE_EQ(p.at(25), 6);
}

TEST(ScalarSchedule, TextRoundTrip) {
  for (const char* t : {"0.3", "1e-3@0,0@800", "lin:0.3@0,0.1@1000", "0.1@0,0.2@5,0.30000000000000004@6"}) {
    auto s = ScalarSchedule::parse(t, "x");
    auto back = ScalarSchedule::parse(s.str(), "x");
    EXPECT_EQ(back.str(), s.str());
    for (int64_t k = 0; k < 1100; k += 13) EXPECT_EQ(back.at(k), s.at(k)) << t << " @" << k;
  }
  EXPECT_EQ(ScalarSchedule::parse("1e-3@0,0@800", "x").str(), "0.001@0,0@800");
}

TEST(ScalarSchedule, BadTextNamesTheFlag) {
  for (const char* t : {"", "abc", "1@", "1@-3", "1@5,2@5", "1@5,2@4", "lin:0.3", "1@2,x@3",
                        "nan", "inf@0", "1@2,", "1@2.5"}) {
    try {
      ScalarSchedule::parse(t, "--balance-alpha");
      ADD_FAILURE() << "accepted '" << t << "'";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find("--balance-alpha"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace dsv3
