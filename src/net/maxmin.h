// Flow-level solver: max-min fair rates by progressive filling, and an event-driven fluid
// simulation that re-solves the rates whenever flows complete.
//
// A flow is a list of (link, coefficient) pairs: an unsplit path has coefficient 1 on each of its
// links; a sprayed flow has the fraction of its bytes that crosses each link (the fluid model of
// packet spraying). Flows that share no link (directly or through other flows) never influence
// each other, so both solvers split the flow set into connected components and solve each alone
// (planes of a multi-plane network are separate components).
#pragma once
#include <cstdint>
#include <span>
#include <vector>

namespace dsv3::net {

struct FlowSet {
  std::vector<uint64_t> off{0};
  std::vector<int32_t> link;
  std::vector<float> coef;  // empty while every coefficient is 1
  std::vector<double> size;  // bytes
  std::vector<uint8_t> tag;  // caller's class (e.g. dispatch IB, NVLink forward)
  std::vector<int32_t> src, dst;  // caller's endpoints (for statistics)

  size_t count() const { return size.size(); }
  std::span<const int32_t> links_of(size_t f) const { return {link.data() + off[f], link.data() + off[f + 1]}; }
  float coef_at(uint64_t i) const { return coef.empty() ? 1.0f : coef[i]; }
  void add(std::span<const int32_t> links, std::span<const float> coefs, double bytes, uint8_t tag_ = 0,
           int32_t s = -1, int32_t d = -1);
  void reserve(size_t flows, size_t entries);
  void clear();  // keeps the capacity
  void append(const FlowSet& o);
};

struct MaxMinStats {
  int64_t rounds = 0;  // progressive-filling levels
  int components = 0;
};

// Max-min fair rates (bytes/s) given per-link capacities (0 = failed link). Flows with no links get
// +inf. Flows crossing a zero-capacity link get 0.
std::vector<double> max_min_rates(const FlowSet& fs, const std::vector<double>& cap, MaxMinStats* st = nullptr);

struct SimOptions {
  // Flows whose projected finish lies within batch_tol × max(now, component lower bound) after the
  // earliest one complete in the same event (at their own projected times), so one re-solve serves
  // many nearly simultaneous completions. 0 = exact.
  double batch_tol = 0;
  int threads = 0;  // 0 = dsv3::num_threads()
};

struct SimResult {
  std::vector<double> finish;  // seconds from start (fluid part only); +inf if stalled
  double makespan = 0;
  int64_t events = 0, solves = 0, rounds = 0;
  int components = 0, stalled = 0;
};

SimResult simulate_fluid(const FlowSet& fs, const std::vector<double>& cap, const SimOptions& o = {});

}  // namespace dsv3::net
