// Network cost: counts from topology.h times unit prices from a preset.
//
// The insights paper (ISCA '25, Table 3) gives counts and totals but no unit prices; it says the
// method is the Slim Fly paper's. Preset "isca25" is a two-term model (price per switch, price per
// switch-to-switch link) whose two prices are the least-squares fit, in relative error, to the
// published cost per endpoint of the five Table 3 rows; the fit is computed here, from the
// published numbers and our own counts, not typed in.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "net/topology.h"

namespace dsv3::net {

struct CostPreset {
  std::string name, description;
  double switch_usd = 0, link_usd = 0, endpoint_usd = 0;
  // Switch price scales with the port count (constant price per port): a switch of radix k costs
  // switch_usd × k / switch_ref_radix. The fit only sees 64-port switches.
  int switch_ref_radix = 64;
};

// "isca25" only (see docs/network.md for why the Slim Fly §VI preset is not offered).
CostPreset cost_preset(const std::string& name);

struct Table3Ref {
  const char* name;
  TopoSpec spec;
  int64_t endpoints, switches, links;
  double cost_musd, cost_per_endpoint_kusd;  // as printed (rounded)
};
// The five published rows with the topology parameters that reproduce their counts.
const std::vector<Table3Ref>& table3_reference();

struct CostRow {
  std::string topology, params;
  TopoCounts counts;
  double cost_musd = 0, cost_per_endpoint_kusd = 0;
};

CostRow cost_row(const TopoSpec& s, const CostPreset& p);
nlohmann::json to_json(const CostRow& r);

struct SweepPoint {
  std::string topology;
  int radix = 0;
  int64_t wanted = 0, endpoints = 0;  // endpoints: size of the smallest instance that holds `wanted`
  int64_t switches = 0, links = 0;
  double cost_per_endpoint_kusd = 0;  // instance cost / wanted
  int tiers = 0;
};
// Endpoint counts 1K..256K (powers of two) × radix {64, 128} × FT2, MPFT-8, FT3, SF, DF.
std::vector<SweepPoint> cost_sweep(const CostPreset& p, const std::vector<int>& radices, int64_t n_min,
                                   int64_t n_max);

}  // namespace dsv3::net
