#include "train/metrics.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "train_test_util.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

using train_test::TmpDir;

std::vector<std::string> lines_of(const std::string& path) {
  std::ifstream f(path);
  std::vector<std::string> out;
  for (std::string l; std::getline(f, l);) out.push_back(l);
  return out;
}

TEST(Metrics, StepLineFormat) {
  StepLine s{12, 300, 5.12345, 0.84, 3e-4, 123.4, 4512, false};
  EXPECT_EQ(format_step_line(s), "step  12/300 | loss 5.1235 | norm 0.8400 | lr 3.00e-04 | 123 ms | 4.51k tok/s");
  s.tok_per_s = 0;
  s.skipped = true;
  EXPECT_EQ(format_step_line(s), "step  12/300 | loss 5.1235 | norm 0.8400 | lr 3.00e-04 | 123 ms | SKIPPED (non-finite)");
  EXPECT_EQ(si_count(950), "950");
  EXPECT_EQ(si_count(12345), "12.3k");
  EXPECT_EQ(si_count(2.5e6), "2.50M");
  EXPECT_EQ(format_duration(45), "45s");
  EXPECT_EQ(format_duration(187), "3m07s");
  EXPECT_EQ(format_duration(3720), "1h02m");
}

TEST(Metrics, ThroughputSkipsFirstStepAndCorrectsBias) {
  ThroughputMeter m;
  EXPECT_EQ(m.add(1000, 10.0), 0.0);          // first step: allocation, warm-up
  EXPECT_NEAR(m.add(1000, 0.5), 2000.0, 1e-9);  // bias correction: the first value is the rate itself
  double v = m.add(1000, 0.25);               // 4000 tok/s now
  double ema = 0.95 * (0.05 * 2000) + 0.05 * 4000;
  EXPECT_NEAR(v, ema / (1 - 0.95 * 0.95), 1e-9);
}

TEST(Metrics, ProgressRendering) {
  EXPECT_EQ(render_progress(0, 10, 0, 10), "[----------]   0%  0/10");
  EXPECT_EQ(render_progress(4, 10, 8, 10), "[####------]  40%  4/10  eta 12s");
  EXPECT_EQ(render_progress(10, 10, 20, 10), "[##########] 100%  10/10  20s");
}

TEST(Metrics, JsonlAppendAndResumeTruncation) {
  TmpDir d("metrics");
  const std::string p = d.file("metrics.jsonl");
  {
    MetricsLog log(p, -1);
    for (int s = 1; s <= 6; ++s) log.append({{"step", s}, {"loss", 10.0 - s}});
    log.append({{"step", 6}, {"loss", 4.0}, {"val_loss", 4.5}});
    EXPECT_THROW(log.append({{"loss", 1.0}}), InternalError);
  }
  EXPECT_EQ(lines_of(p).size(), 7u);
  { std::ofstream(p, std::ios::app) << "{\"step\": 7, \"lo"; }  // a line cut by a crash
  MetricsLog resumed(p, 4);
  auto lines = lines_of(p);
  ASSERT_EQ(lines.size(), 4u);
  for (auto& l : lines) {
    auto j = nlohmann::json::parse(l);
    EXPECT_LE(j["step"].get<int>(), 4);
    EXPECT_TRUE(j.contains("loss"));
  }
  { std::ofstream(p, std::ios::app) << "garbage\n{\"step\": 2, \"loss\": 1}\n"; }
  EXPECT_THROW(MetricsLog(p, 4), InputError);
  MetricsLog fresh(p, -1);
  EXPECT_TRUE(lines_of(p).empty());
}

TEST(Metrics, LossCurvePng) {
  TmpDir d("metrics");
  const std::string p = d.file("metrics.jsonl");
  {
    MetricsLog log(p, -1);
    for (int s = 1; s <= 50; ++s) {
      nlohmann::json r = {{"step", s}, {"loss", 8.0 * std::exp(-s / 20.0) + 2}};
      if (s % 10 == 0) r["val_loss"] = 8.0 * std::exp(-s / 20.0) + 2.2;
      log.append(r);
    }
  }
  const std::string png = d.file("loss.png");
  ASSERT_FALSE(find_program("gnuplot").empty()) << "gnuplot missing: run scripts/setup.sh --deps";
  plot_loss_curve(p, png, "tiny \"test\"");
  std::ifstream f(png, std::ios::binary);
  char sig[8] = {};
  f.read(sig, 8);
  EXPECT_EQ(std::string(sig + 1, 3), "PNG");
  EXPECT_GT(fs::file_size(png), 1000u);
  size_t files = 0;
  for (auto& e : fs::directory_iterator(d.p)) files += e.is_regular_file();
  EXPECT_EQ(files, 2u) << "no temporary files left";

  // With PATH lacking gnuplot: the error names the package.
  std::string old = std::getenv("PATH");
  setenv("PATH", d.p.c_str(), 1);
  try {
    plot_loss_curve(p, png, "t");
    ADD_FAILURE() << "no error without gnuplot";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("gnuplot-nox"), std::string::npos);
  }
  setenv("PATH", old.c_str(), 1);
  std::ofstream(d.file("empty.jsonl")) << "";
  EXPECT_THROW(plot_loss_curve(d.file("empty.jsonl"), png, "t"), InputError);
}

}  // namespace
}  // namespace dsv3
