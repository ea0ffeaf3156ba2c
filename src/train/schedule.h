// Schedules of training hyper-parameters as pure functions of the optimizer step (0-based), so that
// a resumed run sees exactly the values the straight run saw.
//
// LrSchedule is the DeepSeek-V3 shape: linear warm-up to the peak, constant at the peak, cosine
// decay from the peak to min_lr, then constant at min_lr.
//
// ScalarSchedule covers the loss and balancing coefficients (λ for MTP, α for the sequence-wise
// balance loss, γ for the bias update speed). Its text form:
//   "0.3"                    constant
//   "1e-3@0,0@800"           piecewise constant: 1e-3 from step 0, 0 from step 800 on
//   "lin:0.3@0,0.1@1000"     linear between the points, constant before the first and after the last
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace dsv3 {

struct LrSchedule {
  double peak_lr = 3e-4;
  double min_lr = 3e-5;
  int64_t warmup_steps = 0;  // steps 0..warmup-1 ramp as peak·(step+1)/warmup
  int64_t decay_start = 0;   // first step of the cosine decay (≥ warmup_steps)
  int64_t decay_end = 0;     // step at which min_lr is reached (≥ decay_start)

  double at(int64_t step) const;
  // Warm-up for warmup_frac of total, constant until decay_start_frac of total, cosine to the end.
  static LrSchedule for_run(int64_t total_steps, double peak_lr, double min_lr, double warmup_frac,
                            double decay_start_frac);
  // Throws InputError naming `what` unless the fields are consistent.
  void validate(const std::string& what) const;
  std::string str() const;
  nlohmann::json to_json() const;
  static LrSchedule from_json(const nlohmann::json& j, const std::string& where);
};

class ScalarSchedule {
 public:
  enum class Mode { Constant, Piecewise, Linear };
  ScalarSchedule() = default;
  explicit ScalarSchedule(double constant);
  // `what` names the flag or field in error messages ("--mtp-lambda").
  static ScalarSchedule parse(const std::string& text, const std::string& what);

  double at(int64_t step) const;
  Mode mode() const { return mode_; }
  std::string str() const;  // round-trips through parse()

 private:
  Mode mode_ = Mode::Constant;
  std::vector<double> values_{0.0};
  std::vector<int64_t> steps_{0};
};

}  // namespace dsv3
