#include "net/sim.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "net/workload.h"

namespace dsv3::net {

std::vector<double> capacities(const Network& n) {
  std::vector<double> c(n.links.size());
  for (size_t i = 0; i < c.size(); ++i) c[i] = n.links[i].up ? n.links[i].cap : 0.0;
  return c;
}

nlohmann::json SimSummary::json() const {
  return {{"flows", flows},
          {"makespan_s", makespan},
          {"latency_s", latency},
          {"total_s", total()},
          {"lower_bound_s", lower_bound},
          {"t_over_tstar", lower_bound > 0 ? makespan / lower_bound : 0},
          {"ib_bytes", ib_bytes},
          {"nvl_bytes", nvl_bytes},
          {"min_rate_Bps", min_rate},
          {"mean_rate_Bps", mean_rate},
          {"swsw_max_over_mean", swsw_max_over_mean},
          {"hot_links", hot_links},
          {"events", events},
          {"stalled", stalled},
          {"solve_seconds", seconds}};
}

SimSummary run_flows(const Network& n, const FlowSet& fs, bool dynamic, double batch_tol, const LatencyModel& lat) {
  SimSummary s;
  s.flows = (int64_t)fs.count();
  auto cap = capacities(n);
  std::vector<double> load(n.links.size(), 0.0);
  bool any_nvl = false;
  for (size_t f = 0; f < fs.count(); ++f) {
    (fs.tag[f] == TagNVL ? s.nvl_bytes : s.ib_bytes) += fs.size[f];
    int sw = 0;
    for (uint64_t e = fs.off[f]; e < fs.off[f + 1]; ++e) {
      load[fs.link[e]] += fs.size[f] * fs.coef_at(e);
      if (n.links[fs.link[e]].kind == LinkKind::SwSw && fs.coef_at(e) == 1.0f) ++sw;
    }
    if (fs.tag[f] == TagNVL) any_nvl = true;
    else s.latency = std::max(s.latency, lat.network(sw + 1));
  }
  if (any_nvl) s.latency += lat.nvlink;  // forwarded data crosses NVLink before or after the IB hop
  double sum = 0, mx = 0;
  int64_t cnt = 0;
  for (size_t l = 0; l < load.size(); ++l) {
    if (load[l] > 0 && cap[l] > 0) s.lower_bound = std::max(s.lower_bound, load[l] / cap[l]);
    if (n.links[l].kind == LinkKind::SwSw && n.links[l].up) sum += load[l], mx = std::max(mx, load[l]), ++cnt;
  }
  double mean = cnt ? sum / cnt : 0;
  s.swsw_max_over_mean = mean > 0 ? mx / mean : 0;
  for (size_t l = 0; l < load.size(); ++l)
    if (n.links[l].kind == LinkKind::SwSw && n.links[l].up && mean > 0 && load[l] > 1.1 * mean) ++s.hot_links;
  auto t0 = std::chrono::steady_clock::now();
  if (dynamic) {
    SimOptions o;
    o.batch_tol = batch_tol;
    SimResult r = simulate_fluid(fs, cap, o);
    s.makespan = r.makespan;
    s.events = r.events;
    s.stalled = r.stalled;
  }
  auto rate = max_min_rates(fs, cap);
  double bound = 0, rs = 0, rmin = INFINITY;
  int64_t ni = 0;
  for (size_t f = 0; f < fs.count(); ++f) {
    if (rate[f] <= 0) {
      if (!dynamic) ++s.stalled;
      bound = INFINITY;
      continue;
    }
    bound = std::max(bound, fs.size[f] / rate[f]);
    if (fs.tag[f] == TagIB) rs += rate[f], rmin = std::min(rmin, rate[f]), ++ni;
  }
  if (!dynamic) s.makespan = bound;
  s.min_rate = ni ? rmin : 0;
  s.mean_rate = ni ? rs / ni : 0;
  s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return s;
}

}  // namespace dsv3::net
