#include "train/schedule.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace dsv3 {

namespace {

constexpr double kPi = 3.14159265358979323846;

// Shortest text that parses back to the same double.
std::string num(double v) {
  char buf[40];
  for (int prec = 6; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*g", prec, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

double parse_double(const std::string& s, const std::string& what, const std::string& text) {
  if (s.empty()) input_error(what, ": empty number in schedule '", text, "'");
  char* end = nullptr;
  errno = 0;
  double v = std::strtod(s.c_str(), &end);
  if (end != s.c_str() + s.size() || errno == ERANGE || !std::isfinite(v))
    input_error(what, ": '", s, "' in schedule '", text, "' is not a finite number");
  return v;
}

int64_t parse_step(const std::string& s, const std::string& what, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || end != s.c_str() + s.size() || errno == ERANGE || v < 0)
    input_error(what, ": step '", s, "' in schedule '", text, "' is not a non-negative integer");
  return v;
}

}  // namespace

double LrSchedule::at(int64_t step) const {
  if (step < warmup_steps) return peak_lr * double(step + 1) / double(warmup_steps);
  // decay_end == decay_start means no decay phase: the peak holds to the end.
  if (step < decay_start || decay_end == decay_start) return peak_lr;
  if (step >= decay_end) return min_lr;
  double t = double(step - decay_start) / double(decay_end - decay_start);
  return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + std::cos(kPi * t));
}

LrSchedule LrSchedule::for_run(int64_t total_steps, double peak_lr, double min_lr,
                               double warmup_frac, double decay_start_frac) {
  LrSchedule s;
  s.peak_lr = peak_lr;
  s.min_lr = min_lr;
  s.warmup_steps = int64_t(std::llround(warmup_frac * double(total_steps)));
  s.decay_start = std::max(s.warmup_steps, int64_t(std::llround(decay_start_frac * double(total_steps))));
  s.decay_end = std::max(s.decay_start, total_steps);
  return s;
}

void LrSchedule::validate(const std::string& what) const {
  if (!(peak_lr >= 0) || !std::isfinite(peak_lr))
    input_error(what, ": peak learning rate ", peak_lr, " must be finite and ≥ 0");
  if (!(min_lr >= 0) || !std::isfinite(min_lr) || min_lr > peak_lr)
    input_error(what, ": minimum learning rate ", min_lr, " must be in [0, peak ", peak_lr, "]");
  if (warmup_steps < 0 || decay_start < warmup_steps || decay_end < decay_start)
    input_error(what, ": expected 0 ≤ warmup_steps (", warmup_steps, ") ≤ decay_start (",
                decay_start, ") ≤ decay_end (", decay_end, ")");
}

std::string LrSchedule::str() const {
  return cat("warmup 0→", num(peak_lr), " over ", warmup_steps, " steps, constant to step ",
             decay_start, ", cosine to ", num(min_lr), " at step ", decay_end);
}

nlohmann::json LrSchedule::to_json() const {
  return {{"peak_lr", peak_lr}, {"min_lr", min_lr}, {"warmup_steps", warmup_steps},
          {"decay_start", decay_start}, {"decay_end", decay_end}};
}

LrSchedule LrSchedule::from_json(const nlohmann::json& j, const std::string& where) {
  LrSchedule s;
  try {
    s.peak_lr = j.at("peak_lr").get<double>();
    s.min_lr = j.at("min_lr").get<double>();
    s.warmup_steps = j.at("warmup_steps").get<int64_t>();
    s.decay_start = j.at("decay_start").get<int64_t>();
    s.decay_end = j.at("decay_end").get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    input_error(where, ": learning-rate schedule: ", e.what());
  }
  s.validate(where);
  return s;
}

ScalarSchedule::ScalarSchedule(double constant) : values_{constant} {}

ScalarSchedule ScalarSchedule::parse(const std::string& text, const std::string& what) {
  ScalarSchedule s;
  std::string body = text;
  bool linear = false;
  if (body.rfind("lin:", 0) == 0) {
    linear = true;
    body = body.substr(4);
  }
  if (body.find('@') == std::string::npos) {
    if (linear) input_error(what, ": 'lin:' schedule '", text, "' needs points value@step");
    s.values_ = {parse_double(body, what, text)};
    return s;
  }
  s.values_.clear();
  s.steps_.clear();
  size_t pos = 0;
  while (pos <= body.size()) {
    size_t comma = body.find(',', pos);
    std::string item = body.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    size_t at = item.find('@');
    if (at == std::string::npos)
      input_error(what, ": item '", item, "' of schedule '", text, "' is not value@step");
    double v = parse_double(item.substr(0, at), what, text);
    int64_t st = parse_step(item.substr(at + 1), what, text);
    if (!s.steps_.empty() && st <= s.steps_.back())
      input_error(what, ": steps in schedule '", text, "' must increase (", st, " after ",
                  s.steps_.back(), ")");
    s.values_.push_back(v);
    s.steps_.push_back(st);
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  s.mode_ = linear ? Mode::Linear : Mode::Piecewise;
  return s;
}

double ScalarSchedule::at(int64_t step) const {
  if (mode_ == Mode::Constant || step <= steps_.front()) return values_.front();
  size_t i = 0;  // last point with steps_[i] <= step
  while (i + 1 < steps_.size() && steps_[i + 1] <= step) ++i;
  if (mode_ == Mode::Piecewise || i + 1 == steps_.size()) return values_[i];
  double t = double(step - steps_[i]) / double(steps_[i + 1] - steps_[i]);
  return values_[i] + (values_[i + 1] - values_[i]) * t;
}

std::string ScalarSchedule::str() const {
  if (mode_ == Mode::Constant) return num(values_.front());
  std::string out = mode_ == Mode::Linear ? "lin:" : "";
  for (size_t i = 0; i < values_.size(); ++i)
    out += cat(i ? "," : "", num(values_[i]), "@", steps_[i]);
  return out;
}

}  // namespace dsv3
