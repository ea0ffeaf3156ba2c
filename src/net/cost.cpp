#include "net/cost.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace dsv3::net {

const std::vector<Table3Ref>& table3_reference() {
  static const std::vector<Table3Ref> rows = [] {
    std::vector<Table3Ref> r;
    TopoSpec ft2{TopoKind::FT2, 64};
    TopoSpec mpft{TopoKind::MPFT, 64, 8};
    TopoSpec ft3{TopoKind::FT3, 64};
    TopoSpec sf{TopoKind::SF, 64};
    sf.q = 28;
    TopoSpec df{TopoKind::DF, 64};
    df.df_p = 16, df.df_a = 32, df.df_h = 16, df.df_g = 511;
    // ISCA '25 Table 3 (64-port 400G switches).
    r.push_back({"FT2", ft2, 2048, 96, 2048, 9, 4.39});
    r.push_back({"MPFT", mpft, 16384, 768, 16384, 72, 4.39});
    r.push_back({"FT3", ft3, 65536, 5120, 131072, 491, 7.5});
    r.push_back({"SF", sf, 32928, 1568, 32928, 146, 4.4});
    r.push_back({"DF", df, 261632, 16352, 384272, 1522, 5.8});
    return r;
  }();
  return rows;
}

static CostPreset fit_isca25() {
  static const CostPreset cached = [] {
  // min Σ ((s·x_i + l·y_i − c_i) / c_i)², x = switches/endpoint, y = links/endpoint, c = $/endpoint.
  double a11 = 0, a12 = 0, a22 = 0, b1 = 0, b2 = 0;
  for (auto& r : table3_reference()) {
    double c = r.cost_per_endpoint_kusd * 1e3;
    double x = (double)r.switches / r.endpoints / c, y = (double)r.links / r.endpoints / c;
    a11 += x * x, a12 += x * y, a22 += y * y, b1 += x, b2 += y;
  }
  double det = a11 * a22 - a12 * a12;
  double s0 = (b1 * a22 - b2 * a12) / det, l0 = (a11 * b2 - a12 * b1) / det;
  // Then minimise the worst relative error over both published columns (cost/endpoint and the
  // total), searching ±10% around the least-squares point on a $1 grid.
  auto worst = [](double sw, double ln) {
    double w = 0;
    for (auto& r : table3_reference()) {
      double usd = sw * r.switches + ln * r.links;
      w = std::max({w, std::fabs(usd / r.endpoints / 1e3 / r.cost_per_endpoint_kusd - 1),
                    std::fabs(usd / 1e6 / r.cost_musd - 1)});
    }
    return w;
  };
  double bs = std::round(s0), bl = std::round(l0), bw = worst(bs, bl);
  for (double sw = std::round(s0 * 0.9); sw <= s0 * 1.1; sw += 10)
    for (double ln = std::round(l0 * 0.9); ln <= l0 * 1.1; ln += 1)
      if (double w = worst(sw, ln); w < bw) bw = w, bs = sw, bl = ln;
  CostPreset p;
  p.name = "isca25";
  p.switch_usd = bs;
  p.link_usd = bl;
  p.description = cat("ISCA'25 Table 3 fit: $", std::lround(p.switch_usd), " per switch + $", std::lround(p.link_usd),
                      " per switch-switch link (minimax relative error on cost and cost/endpoint, from a "
                      "least-squares start of $", std::lround(s0), " + $", std::lround(l0), ")");
    return p;
  }();
  return cached;
}

CostPreset cost_preset(const std::string& name) {
  if (name == "isca25") return fit_isca25();
  input_error("--preset '", name,
              "': unknown cost preset (expected isca25; the Slim Fly paper's unit-cost coefficients are not "
              "available, see docs/network.md)");
}

CostRow cost_row(const TopoSpec& s, const CostPreset& p) {
  CostRow r;
  r.counts = topo_counts(s);
  r.topology = topo_name(s.kind);
  const auto& c = r.counts;
  switch (s.kind) {
    case TopoKind::MPFT: r.params = cat("k=", s.radix, " P=", s.planes); break;
    case TopoKind::SF: r.params = cat("k=", s.radix, " q=", c.q, " k'=", c.sf_kprime, " p=", c.sf_p); break;
    case TopoKind::DF: r.params = cat("k=", s.radix, " p=", c.df_p, " a=", c.df_a, " h=", c.df_h, " g=", c.df_g); break;
    default: r.params = cat("k=", s.radix);
  }
  double usd = c.switches * p.switch_usd * s.radix / p.switch_ref_radix + c.links * p.link_usd +
               c.endpoints * p.endpoint_usd;
  r.cost_musd = usd / 1e6;
  r.cost_per_endpoint_kusd = c.endpoints ? usd / c.endpoints / 1e3 : 0;
  return r;
}

nlohmann::json to_json(const CostRow& r) {
  nlohmann::json j{{"topology", r.topology},
                   {"params", r.params},
                   {"endpoints", r.counts.endpoints},
                   {"switches", r.counts.switches},
                   {"links", r.counts.links},
                   {"radix_used", r.counts.radix_used},
                   {"diameter", r.counts.diameter},
                   {"cost_musd", r.cost_musd},
                   {"cost_per_endpoint_kusd", r.cost_per_endpoint_kusd}};
  if (!r.counts.warnings.empty()) j["warnings"] = r.counts.warnings;
  return j;
}

std::vector<SweepPoint> cost_sweep(const CostPreset& p, const std::vector<int>& radices, int64_t n_min,
                                   int64_t n_max) {
  std::vector<SweepPoint> out;
  for (int k : radices)
    for (int64_t N = n_min; N <= n_max; N *= 2) {
      auto push = [&](const char* name, const TopoSpec& s, int tiers) {
        CostRow r = cost_row(s, p);
        SweepPoint sp{name, k, N, r.counts.endpoints, r.counts.switches, r.counts.links,
                      r.cost_musd * 1e3 / (double)N, tiers};
        out.push_back(sp);
      };
      if (N <= (int64_t)k * k / 2) push("FT2", {TopoKind::FT2, k, 8, 8, N}, 2);
      if (N <= 8LL * k * k / 2) push("MPFT-8", {TopoKind::MPFT, k, 8, 8, N}, 2);
      if (N <= (int64_t)k * k * k / 4) {
        TopoSpec s{TopoKind::FT3, k, 8, 8, N};
        push("FT3", s, 3);
      }
      // Slim Fly: smallest constructible q (prime power) whose instance holds N within radix k.
      for (int q = 3; q < 4 * k; ++q) {
        if (!is_prime_power(q) || q % 4 == 2) continue;
        TopoSpec s{TopoKind::SF, k};
        s.q = q;
        s.exact = true;
        TopoCounts c;
        try {
          c = topo_counts(s);
        } catch (const InputError&) {
          break;  // radix exceeded: larger q only get bigger
        }
        if (c.endpoints >= N) {
          push("SF", s, 2);
          break;
        }
      }
      // Dragonfly: balanced (a = 2p = 2h) at the radix, fewest groups that hold N.
      {
        int pp = (k + 1) / 4, a = 2 * pp;
        int64_t per_group = (int64_t)a * pp, g = (N + per_group - 1) / per_group;
        if (g < 2) g = 2;
        if (g <= (int64_t)a * pp + 1) {
          TopoSpec s{TopoKind::DF, k};
          s.df_p = pp, s.df_a = a, s.df_h = pp, s.df_g = (int)g;
          push("DF", s, 3);
        }
      }
    }
  return out;
}

}  // namespace dsv3::net
