// Topology counts against the closed-form formulas, built graphs against the counts, validation,
// and the Table 3 rows.
#include "net/topology.h"

#include <gtest/gtest.h>

#include "core/error.h"
#include "net/cost.h"
#include "net/experiments.h"

using namespace dsv3;
using namespace dsv3::net;

namespace {
TopoSpec spec(TopoKind k, int radix, int planes = 8) {
  TopoSpec s;
  s.kind = k;
  s.radix = radix;
  s.planes = planes;
  return s;
}
}  // namespace

TEST(Topology, FatTreeFormulas) {
  for (int64_t k : {8, 16, 64, 128}) {
    TopoCounts f2 = topo_counts(spec(TopoKind::FT2, (int)k));
    EXPECT_EQ(f2.endpoints, k * k / 2);
    EXPECT_EQ(f2.switches, 3 * k / 2);
    EXPECT_EQ(f2.links, k * k / 2);
    TopoCounts f3 = topo_counts(spec(TopoKind::FT3, (int)k));
    EXPECT_EQ(f3.endpoints, k * k * k / 4);
    EXPECT_EQ(f3.switches, 5 * k * k / 4);
    EXPECT_EQ(f3.links, k * k * k / 2);
    TopoCounts mp = topo_counts(spec(TopoKind::MPFT, (int)k, 4));
    EXPECT_EQ(mp.endpoints, 4 * k * k / 2);
    EXPECT_EQ(mp.switches, 4 * 3 * k / 2);
  }
}

TEST(Topology, SlimFlyAndDragonflyFormulas) {
  TopoSpec sf = spec(TopoKind::SF, 64);
  sf.q = 28;
  TopoCounts c = topo_counts(sf);
  EXPECT_EQ(c.switches, 2 * 28 * 28);
  EXPECT_EQ(c.sf_kprime, 42);  // (3q - δ)/2 with δ = 0
  EXPECT_EQ(c.endpoints, 1568 * 21);
  EXPECT_FALSE(c.warnings.empty());  // not a prime power
  sf.exact = true;
  EXPECT_THROW(topo_counts(sf), InputError);
  sf.q = 0;  // largest constructible q for 64 ports
  EXPECT_EQ(topo_counts(sf).q, 27);
  TopoSpec df = spec(TopoKind::DF, 64);
  TopoCounts d = topo_counts(df);  // balanced p = h = 16, a = 32, g = a h + 1
  EXPECT_EQ(d.df_g, 513);
  EXPECT_EQ(d.endpoints, 4LL * 16 * 16 * 16 * 16 + 2 * 16 * 16);  // 4p^4 + 2p^2
  df.df_g = 600;
  EXPECT_THROW(topo_counts(df), InputError);
}

TEST(Topology, BuiltGraphsMatchCounts) {
  struct Case {
    TopoSpec s;
    int gpus;
    int diameter;
  };
  TopoSpec sf5 = spec(TopoKind::SF, 11);
  sf5.q = 5, sf5.gpus_per_node = 1;
  TopoSpec df = spec(TopoKind::DF, 7);
  df.df_p = 2, df.df_a = 4, df.df_h = 2, df.gpus_per_node = 1;
  TopoSpec df7 = df;
  df7.df_g = 7;
  TopoSpec ft2 = spec(TopoKind::FT2, 8), ft3 = spec(TopoKind::FT3, 8), mp = spec(TopoKind::MPFT, 8, 8);
  std::vector<Case> cases = {{ft2, 32, 2}, {ft3, 128, 4}, {mp, 256, 2}, {sf5, 200, 2}, {df, 72, 3}, {df7, 56, 3}};
  for (auto& c : cases) {
    SCOPED_TRACE(topo_name(c.s.kind));
    TopoCounts tc = topo_counts(c.s);
    Network n = build_network(c.s, c.gpus);
    EXPECT_EQ(n.switches, tc.switches);
    EXPECT_EQ(n.swsw_links, tc.links);
    Validation v = validate(n, 64);
    EXPECT_TRUE(v.connected);
    EXPECT_EQ(v.diameter, c.diameter);
    EXPECT_LE(v.max_degree, c.s.radix);
  }
}

TEST(Topology, SlimFlyMmsGraphsHaveDiameterTwo) {
  // q = 4w + δ for δ = 1 (5, 9, 13), -1 (3, 7, 11) and 0 (4, 8): every router has network degree
  // (3q - δ)/2 and the graph has diameter 2.
  for (int q : {3, 4, 5, 7, 8, 9, 11, 13}) {
    SCOPED_TRACE(q);
    TopoSpec s = spec(TopoKind::SF, 64);
    s.q = q, s.gpus_per_node = 1;
    TopoCounts c = topo_counts(s);
    Network n = build_network(s, (int)c.endpoints);
    std::vector<int> deg(n.switches, 0);
    for (auto& l : n.links)
      if (l.kind == LinkKind::SwSw) ++deg[l.from - n.nics];
    for (int d : deg) ASSERT_EQ(d, c.sf_kprime);
    EXPECT_EQ(validate(n, n.switches).diameter, 2);
  }
}

TEST(Topology, NaturalCutOfFullFatTreeIsHalfTheEndpoints) {
  Network n = build_network(spec(TopoKind::FT2, 16), 128);
  EXPECT_EQ(validate(n).bisection_links, 64);
}

TEST(Topology, ImpossibleRequestsNameTheParameter) {
  auto msg = [](TopoSpec s) {
    try {
      topo_counts(s);
    } catch (const InputError& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(msg(spec(TopoKind::FT2, 3)).find("--radix"), std::string::npos);
  TopoSpec big = spec(TopoKind::FT2, 64);
  big.endpoints = 5000;
  EXPECT_NE(msg(big).find("--endpoints"), std::string::npos);
  TopoSpec sf = spec(TopoKind::SF, 64);
  sf.q = 6;
  EXPECT_NE(msg(sf).find("--q"), std::string::npos);
  TopoSpec df = spec(TopoKind::DF, 10);
  df.df_p = 4, df.df_a = 8, df.df_h = 4;
  EXPECT_NE(msg(df).find("--radix"), std::string::npos);
  EXPECT_THROW(build_network(spec(TopoKind::FT2, 8), 64), InputError);  // 64 GPUs > k^2/2 = 32
  EXPECT_NE(msg(spec(TopoKind::FT3, 70000)).find("--radix"), std::string::npos);  // k^3 past 64 bits
  // --endpoints sizes the cost row only: the graph is still bounded by the topology's maximum
  // (Dragonfly radix 7 holds 72; three-tier radix 8 holds 128). These crashed or hung.
  TopoSpec df7 = spec(TopoKind::DF, 7);
  df7.endpoints = 8;
  EXPECT_THROW(build_network(df7, 80), InputError);
  TopoSpec ft3 = spec(TopoKind::FT3, 8);
  ft3.endpoints = 8;
  EXPECT_THROW(build_network(ft3, 1024), InputError);
}

// Few Dragonfly groups: the extra global ports of a group are never cabled to the group itself.
TEST(Topology, DragonflyWithFewGroupsHasNoSelfCables) {
  TopoSpec s = spec(TopoKind::DF, 7);  // p = h = 2, a = 4
  s.df_g = 3;
  const Network n = build_network(s, 24);
  int cables = 0;
  for (const Link& l : n.links) {
    if (l.kind != LinkKind::SwSw) continue;
    ++cables;
    EXPECT_NE(l.from, l.to);
  }
  EXPECT_GT(cables, 0);
}

TEST(Cost, Table3CountsExactAndCostWithin1p5Percent) {
  CostPreset p = cost_preset("isca25");
  for (auto& ref : table3_reference()) {
    SCOPED_TRACE(ref.name);
    CostRow r = cost_row(ref.spec, p);
    EXPECT_EQ(r.counts.endpoints, ref.endpoints);
    EXPECT_EQ(r.counts.switches, ref.switches);
    EXPECT_EQ(r.counts.links, ref.links);
    EXPECT_NEAR(r.cost_per_endpoint_kusd / ref.cost_per_endpoint_kusd, 1.0, 0.015);
    EXPECT_NEAR(r.cost_musd / ref.cost_musd, 1.0, 0.015);
  }
  EXPECT_THROW(cost_preset("sf14"), InputError);
}

TEST(Failures, RandomLinksAndPlanes) {
  Network n = build_network(spec(TopoKind::MPFT, 8, 8), 256);
  int64_t cables = n.swsw_links;
  int failed = fail_random_links(n, 0.1, 3);
  EXPECT_EQ(failed, (int)std::llround(0.1 * cables));
  int down = 0;
  for (auto& l : n.links) down += l.kind == LinkKind::SwSw && !l.up;
  EXPECT_EQ(down, 2 * failed);  // both directions
  fail_plane(n, 3);
  for (auto& l : n.links) {
    if (l.plane == 3) {
      EXPECT_FALSE(l.up);
    }
  }
  EXPECT_THROW(fail_plane(n, 8), InputError);
  EXPECT_THROW(fail_random_links(n, 1.5, 1), InputError);
}

TEST(Experiments, TpotArithmeticReproducedExactly) {
  // ISCA'25 §2.3.2: (1 B + 2 B) × 32 × 9 × 7K / 50 GB/s = 120.96 us; ×2 × 61 = 14.76 ms.
  auto e = dsv3::net::run_experiment("E9", true);
  EXPECT_NEAR(e.json["arithmetic"]["per_layer_us"].get<double>(), 120.96, 1e-9);
  EXPECT_NEAR(e.json["arithmetic"]["two_microbatch_us"].get<double>(), 241.92, 1e-9);
  EXPECT_NEAR(e.json["arithmetic"]["tpot_ms"].get<double>(), 14.75712, 1e-9);
  EXPECT_NEAR(e.json["arithmetic"]["nvl72_per_layer_us"].get<double>(), 6.72, 1e-9);
  EXPECT_THROW(dsv3::net::run_experiment("E5", true), InputError);
}
