// Plain references for the max-min solver and the fluid simulation: progressive filling written
// straight from the definition (every level rescans every flow and link, no incidence lists, no
// components), and an event loop that re-solves from scratch after every completion.
#pragma once
#include <algorithm>
#include <limits>
#include <vector>

#include "net/maxmin.h"

namespace dsv3::net::reference {

// Rates of the flows with alive[f] (others get 0).
inline std::vector<double> max_min(const FlowSet& fs, const std::vector<double>& cap, const std::vector<bool>& alive) {
  const size_t F = fs.count(), L = cap.size();
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> rate(F, 0.0);
  std::vector<bool> frozen(F, false);
  for (size_t f = 0; f < F; ++f) {
    if (!alive[f]) frozen[f] = true;
    else if (fs.off[f] == fs.off[f + 1]) rate[f] = inf, frozen[f] = true;
  }
  while (true) {
    std::vector<double> used(L, 0.0), weight(L, 0.0);
    for (size_t f = 0; f < F; ++f) {
      if (!alive[f]) continue;
      for (uint64_t e = fs.off[f]; e < fs.off[f + 1]; ++e)
        (frozen[f] ? used[fs.link[e]] : weight[fs.link[e]]) += fs.coef_at(e) * (frozen[f] ? rate[f] : 1.0);
    }
    double best = inf;
    for (size_t l = 0; l < L; ++l)
      if (weight[l] > 0) best = std::min(best, std::max(cap[l] - used[l], 0.0) / weight[l]);
    if (best == inf) break;
    const double thr = best * (1 + 1e-9) + 1e-300;
    for (size_t f = 0; f < F; ++f) {
      if (frozen[f]) continue;
      bool sat = false;
      for (uint64_t e = fs.off[f]; e < fs.off[f + 1]; ++e) {
        int32_t l = fs.link[e];
        sat |= std::max(cap[l] - used[l], 0.0) / weight[l] <= thr;
      }
      if (sat) rate[f] = best, frozen[f] = true;
    }
  }
  return rate;
}

// Exact event-driven completion times (batch tolerance 0).
inline std::vector<double> finish_times(const FlowSet& fs, const std::vector<double>& cap) {
  const size_t F = fs.count();
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> finish(F, 0.0), remaining(fs.size);
  std::vector<bool> alive(F);
  for (size_t f = 0; f < F; ++f) alive[f] = fs.size[f] > 0;
  double t = 0;
  while (std::count(alive.begin(), alive.end(), true)) {
    auto rate = max_min(fs, cap, alive);
    double dt = inf;
    for (size_t f = 0; f < F; ++f)
      if (alive[f] && rate[f] > 0) dt = std::min(dt, remaining[f] / rate[f]);
    if (dt == inf) {
      for (size_t f = 0; f < F; ++f)
        if (alive[f]) finish[f] = inf, alive[f] = false;
      break;
    }
    for (size_t f = 0; f < F; ++f) {
      if (!alive[f]) continue;
      double tf = rate[f] > 0 ? t + remaining[f] / rate[f] : inf;
      if (tf <= t + dt) finish[f] = tf, alive[f] = false;
      else remaining[f] -= rate[f] * dt;
    }
    t += dt;
  }
  return finish;
}

}  // namespace dsv3::net::reference
