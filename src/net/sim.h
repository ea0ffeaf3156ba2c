// Running a flow set on a network and summarising it (completion, bounds, link loads, latency).
#pragma once
#include <nlohmann/json.hpp>

#include "net/maxmin.h"
#include "net/routing.h"
#include "net/topology.h"

namespace dsv3::net {

std::vector<double> capacities(const Network& n);  // 0 for failed links

struct SimSummary {
  int64_t flows = 0;
  double makespan = 0;      // fluid completion (s): dynamic, or the static bound max size/rate
  double lower_bound = 0;   // T* = max over links of bytes / capacity
  double latency = 0;       // largest fixed path latency (Table 5 model)
  double ib_bytes = 0, nvl_bytes = 0;
  double min_rate = 0, mean_rate = 0;  // static max-min rates of the IB flows (bytes/s)
  double swsw_max_over_mean = 0;       // switch-switch link load congestion factor
  int64_t hot_links = 0;               // switch-switch links above 1.1 × mean load
  int64_t events = 0, stalled = 0;
  double seconds = 0;                  // wall time of the solve
  double total() const { return makespan + latency; }
  nlohmann::json json() const;
};

// dynamic: event-driven fluid simulation; else one static max-min solve.
SimSummary run_flows(const Network& n, const FlowSet& fs, bool dynamic, double batch_tol = 1e-3,
                     const LatencyModel& lat = {});

}  // namespace dsv3::net
