// What a training run reports, for people and for scripts:
//   - one llm.c-style line per step on stdout:
//       step   12/300 | loss 5.1234 | norm 0.8400 | lr 3.00e-04 | 123 ms | 4.5k tok/s
//   - a progress bar on stderr (only when stderr is a terminal);
//   - OUT/metrics.jsonl: one JSON object per line, each with at least "step" and "loss"
//     ("val_loss" where measured); on resume the lines past the resumed step are dropped, so the
//     file always describes one consistent run;
//   - a loss-curve PNG drawn by gnuplot from metrics.jsonl.
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

namespace dsv3 {

struct StepLine {
  int64_t step = 0;   // 1-based for display
  int64_t total = 0;
  double loss = 0, grad_norm = 0, lr = 0;
  double ms = 0;          // wall time of this step
  double tok_per_s = 0;   // ≤ 0: not shown (the first step)
  bool skipped = false;   // the optimizer skipped the step (non-finite values)
};
std::string format_step_line(const StepLine& s);
// 4.5k, 12.3M: three significant digits with an SI suffix.
std::string si_count(double v);
std::string format_duration(double seconds);  // "45s", "3m07s", "1h02m"

// Tokens per second as llm.c reports it: an exponential moving average (0.95) with bias
// correction, the first step (warm-up, allocation) left out.
class ThroughputMeter {
 public:
  // Record one step; returns the smoothed tok/s (0 until a step after the first is seen).
  double add(int64_t tokens, double seconds);

 private:
  int64_t steps_ = 0, counted_ = 0;
  double ema_ = 0;
};

// "[########------------]  40%  120/300  eta 1m23s"
std::string render_progress(int64_t done, int64_t total, double elapsed_s, int width = 30);

class ProgressBar {
 public:
  explicit ProgressBar(int64_t total);  // enabled only when stderr is a terminal
  void update(int64_t done);
  void clear();  // erase the bar before a normal line is printed
  bool enabled() const { return enabled_; }

 private:
  int64_t total_;
  bool enabled_;
  double t0_;
};

class MetricsLog {
 public:
  // Fresh run (resume_step < 0): the file is emptied. Resume: lines with step > resume_step are
  // dropped (atomically); other lines are kept as they are. Malformed lines are an InputError
  // naming the line.
  MetricsLog(std::string path, int64_t resume_step);
  // Append one record (must have "step" and "loss"); flushed to the file before returning.
  void append(const nlohmann::json& record);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Draw the loss curve (train loss, and val_loss points where present) of a metrics.jsonl into
// a PNG with gnuplot. InputError when gnuplot is missing (naming the Debian package) or the
// metrics file has no data; the PNG is written atomically.
void plot_loss_curve(const std::string& metrics_path, const std::string& png_path,
                     const std::string& title);
// The first executable `name` on PATH, or "" when there is none.
std::string find_program(const std::string& name);

}  // namespace dsv3
