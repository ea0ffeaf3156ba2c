// Minimal routing over the switch graph: per-flow ECMP hashing, adaptive (least-loaded next hop at
// flow setup) and packet spraying (fluid: the flow splits evenly over the next hops at every switch).
// Also the latency model calibrated to the insights paper's Table 5.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "net/topology.h"

namespace dsv3::net {

enum class Routing { ECMP, Adaptive, Spray };
const char* routing_name(Routing r);
Routing parse_routing(const std::string& s);

class Router {
 public:
  Router(const Network& n, Routing mode, uint64_t seed = 1);
  // Appends the links (and coefficients, all 1 unless sprayed) from NIC a to NIC b. `key` is the
  // flow's hash input (the QP). Returns false when b is unreachable from a over working links.
  bool route(int a, int b, double bytes, uint64_t key, std::vector<int32_t>& links, std::vector<float>& coefs,
             int* switches_crossed = nullptr);
  bool reachable(int a, int b) const;
  Routing mode() const { return mode_; }
  // Fills every next-hop list now, after which route() only reads shared state and may be called
  // from several threads at once. False (nothing to rely on) in adaptive mode, whose choices depend
  // on the flows placed before, and for graphs too large for the table.
  bool prepare_concurrent();

 private:
  const Network& n_;
  Routing mode_;
  uint64_t seed_;
  std::vector<int32_t> leaf_idx_;  // switch -> index among endpoint switches, or -1
  std::vector<uint8_t> dist_;      // [leaf_idx * switches + switch], 255 = unreachable
  std::vector<double> load_;       // adaptive: bytes assigned per link
  std::vector<int32_t> cand_;
  // Next-hop lists per (destination leaf, switch), filled on first use: [count, link ids...] in
  // nh_pool_ at nh_idx_ (-1 = not yet). Left empty for graphs too large to index this way.
  std::vector<int32_t> nh_idx_, nh_pool_;
  int dist(int leaf_vertex, int sw_vertex) const;
  // Minimal next hops (link ids) from switch vertex u towards leaf vertex dst.
  std::span<const int32_t> next_hops(int u, int dst);
};

// Latency = base + per_switch × switches crossed (Table 5: same leaf crosses 1 switch, cross leaf 3).
struct LatencyModel {
  double ib_same = 2.8e-6, ib_cross = 3.7e-6, roce_same = 3.6e-6, roce_cross = 5.6e-6, nvlink = 3.33e-6;
  bool roce = false;
  double per_switch() const { return ((roce ? roce_cross : ib_cross) - (roce ? roce_same : ib_same)) / 2; }
  double base() const { return (roce ? roce_same : ib_same) - per_switch(); }
  double network(int switches) const { return base() + per_switch() * switches; }
};

}  // namespace dsv3::net
