#include "infer/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"

namespace dsv3 {

void SamplingParams::validate() const {
  if (!std::isfinite(temperature) || temperature < 0.0f)
    input_error("--temp: temperature ", temperature, " is invalid (expected a finite value >= 0; 0 = greedy)");
  if (top_k < 0) input_error("--top-k: ", top_k, " is invalid (expected >= 0; 0 = off)");
  if (!(top_p > 0.0f && top_p <= 1.0f)) input_error("--top-p: ", top_p, " is invalid (expected 0 < top_p <= 1)");
  if (!(min_p >= 0.0f && min_p <= 1.0f)) input_error("--min-p: ", min_p, " is invalid (expected 0 <= min_p <= 1)");
  if (!(repeat_penalty > 0.0f) || !std::isfinite(repeat_penalty))
    input_error("--repeat-penalty: ", repeat_penalty, " is invalid (expected a finite value > 0; 1 = off)");
}

namespace {

// Penalised logits of ids [0, n_valid) as double.
std::vector<double> penalised(std::span<const float> logits, int64_t n_valid, std::span<const int32_t> history,
                              float penalty) {
  DSV3_CHECK(n_valid >= 1 && n_valid <= int64_t(logits.size()), "n_valid ", n_valid, " V ", logits.size());
  std::vector<double> l(logits.begin(), logits.begin() + n_valid);
  if (penalty != 1.0f) {
    std::vector<char> seen(size_t(n_valid), 0);
    for (int32_t t : history) {
      if (t < 0 || t >= n_valid || seen[size_t(t)]) continue;
      seen[size_t(t)] = 1;
      l[size_t(t)] = l[size_t(t)] > 0 ? l[size_t(t)] / penalty : l[size_t(t)] * penalty;
    }
  }
  return l;
}

int32_t argmax(const std::vector<double>& l) {
  size_t best = 0;
  for (size_t i = 1; i < l.size(); ++i)
    if (l[i] > l[best]) best = i;
  return int32_t(best);
}

}  // namespace

int32_t greedy_token(std::span<const float> logits, int64_t n_valid, std::span<const int32_t> history,
                     float repeat_penalty) {
  if (repeat_penalty != 1.0f) return argmax(penalised(logits, n_valid, history, repeat_penalty));
  // No penalty: the same argmax (float → double keeps the order) without the copy, once per token.
  DSV3_CHECK(n_valid >= 1 && n_valid <= int64_t(logits.size()), "n_valid ", n_valid, " V ", logits.size());
  int64_t best = 0;
  for (int64_t i = 1; i < n_valid; ++i)
    if (logits[size_t(i)] > logits[size_t(best)]) best = i;
  return int32_t(best);
}

void sampling_probs(std::span<const float> logits, int64_t n_valid, std::span<const int32_t> history,
                    const SamplingParams& p, std::vector<float>& probs) {
  const std::vector<double> l = penalised(logits, n_valid, history, p.repeat_penalty);
  probs.assign(logits.size(), 0.0f);
  if (p.greedy()) {
    probs[size_t(argmax(l))] = 1.0f;
    return;
  }
  // Softmax at temperature over the valid ids.
  const double mx = *std::max_element(l.begin(), l.end());
  std::vector<double> q(l.size());
  double sum = 0.0;
  for (size_t i = 0; i < l.size(); ++i) sum += q[i] = std::exp((l[i] - mx) / double(p.temperature));
  for (double& v : q) v /= sum;
  // Ids by decreasing probability (ties: lower id first).
  std::vector<int32_t> order(l.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return q[size_t(a)] > q[size_t(b)]; });
  size_t keep = order.size();
  if (p.top_k > 0) keep = std::min(keep, size_t(p.top_k));
  if (p.top_p < 1.0f) {
    // Mass of the top-k survivors, renormalised, as HF applies top-p after top-k.
    double kept_mass = 0.0;
    for (size_t i = 0; i < keep; ++i) kept_mass += q[size_t(order[i])];
    double cum = 0.0;
    size_t n = 0;
    while (n < keep) {
      cum += q[size_t(order[n])] / kept_mass;
      ++n;
      if (cum >= double(p.top_p)) break;
    }
    keep = n;
  }
  if (p.min_p > 0.0f) {
    const double thr = double(p.min_p) * q[size_t(order[0])];
    size_t n = 0;
    while (n < keep && q[size_t(order[n])] >= thr) ++n;
    keep = std::max<size_t>(n, 1);
  }
  double mass = 0.0;
  for (size_t i = 0; i < keep; ++i) mass += q[size_t(order[i])];
  for (size_t i = 0; i < keep; ++i) probs[size_t(order[i])] = float(q[size_t(order[i])] / mass);
}

int32_t sample_from(std::span<const float> probs, Rng& rng) {
  const double u = rng.uniform();
  double total = 0.0;
  for (float v : probs) total += v;
  double cum = 0.0;
  int32_t last = -1;
  for (size_t i = 0; i < probs.size(); ++i) {
    if (probs[i] <= 0.0f) continue;
    cum += probs[i] / total;
    last = int32_t(i);
    if (u < cum) return last;
  }
  DSV3_CHECK(last >= 0, "sampling from an all-zero distribution");
  return last;
}

int32_t sample_token(std::span<const float> logits, int64_t n_valid, std::span<const int32_t> history,
                     const SamplingParams& p, Rng& rng) {
  if (p.greedy()) return greedy_token(logits, n_valid, history, p.repeat_penalty);
  std::vector<float> probs;
  sampling_probs(logits, n_valid, history, p, probs);
  return sample_from(probs, rng);
}

StopStrings::StopStrings(std::vector<std::string> stops) {
  for (auto& s : stops) {
    if (s.empty()) input_error("--stop: an empty stop string would end every output immediately");
    max_len_ = std::max(max_len_, s.size());
    stops_.push_back(std::move(s));
  }
}

size_t StopStrings::find(std::string_view text, size_t from) const {
  size_t best = std::string_view::npos;
  for (const auto& s : stops_) {
    const size_t p = text.find(s, from);
    if (p != std::string_view::npos && p < best) best = p;
  }
  return best;
}

size_t StopStrings::safe_prefix(std::string_view text) const {
  // Hold back the longest suffix of `text` that is a proper prefix of some stop string.
  size_t hold = 0;
  for (const auto& s : stops_)
    for (size_t n = std::min(s.size() - 1, text.size()); n > hold; --n)
      if (text.substr(text.size() - n) == std::string_view(s).substr(0, n)) {
        hold = n;
        break;
      }
  return text.size() - hold;
}

}  // namespace dsv3
