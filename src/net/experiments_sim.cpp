// Simulated experiments: E3 (collectives, MPFT vs MRFT), E4 (DeepEP model), E8 (failures),
// E9 (TPOT arithmetic and the simulated decode network).
#include <algorithm>
#include <cmath>
#include <limits>
#include <map>

#include "core/error.h"
#include "core/rng.h"
#include "net/experiments.h"
#include "net/sim.h"
#include "net/workload.h"

namespace dsv3::net {

namespace {

constexpr double GiB = 1024.0 * 1024 * 1024, MiB = 1024.0 * 1024;

TopoSpec spec_of(TopoKind k, int radix) {
  TopoSpec s;
  s.kind = k;
  s.radix = radix;
  s.planes = 8;
  s.gpus_per_node = 8;
  return s;
}

std::vector<double> caps_with(const Network& n, double nic, double nvl) {
  std::vector<double> c(n.links.size());
  for (size_t i = 0; i < c.size(); ++i) {
    const Link& l = n.links[i];
    bool nv = l.kind == LinkKind::NvlUp || l.kind == LinkKind::NvlDown;
    c[i] = l.up ? (nv ? nvl : nic) : 0.0;
  }
  return c;
}

std::string size_name(double b) {
  return b >= GiB ? cat(fmt(b / GiB, 0), " GiB") : cat(fmt(b / MiB, 0), " MiB");
}

}  // namespace

ExperimentOutput experiment_e3(bool quick) {
  ExperimentOutput o;
  o.name = "E3";
  o.title = "E3: NCCL-style all-to-all (PXN), MPFT vs MRFT at 32-128 GPUs, and at scale vs FT3";
  o.table.headers = {"GPUs", "topology", "routing", "size/GPU", "model", "time ms", "busbw GB/s", "T/T*", "hot links",
                     "vs MPFT"};
  const int k = 64;
  std::vector<int> small = quick ? std::vector<int>{32, 64} : std::vector<int>{32, 64, 128};
  std::vector<double> sizes = {128 * MiB, 1 * GiB, 16 * GiB};
  Chart c1;
  c1.title = "All-to-all busbw at 32-128 GPUs (solid MPFT, dashed MRFT)";
  c1.xlabel = "bytes per GPU";
  c1.ylabel = "busbw GB/s";
  c1.logx = true;
  o.json["small"] = nlohmann::json::array();
  double worst_small = 0;
  for (size_t gi = 0; gi < small.size(); ++gi) {
    int g = small[gi];
    Series sm{cat("MPFT ", g)}, sr{cat("MRFT ", g)};
    sr.dashed = true;
    sm.color = sr.color = (int)gi;
    for (double S : sizes) {
      double bw[3];
      int idx = 0;
      for (auto [kind, pxn] : {std::pair{TopoKind::MPFT, true}, {TopoKind::MRFT, true}, {TopoKind::MRFT, false}}) {
        Network n = build_network(spec_of(kind, k), g);
        Router r(n, Routing::ECMP);
        FlowSet fs = all_to_all(n, r, S / g, pxn);
        SimSummary s = run_flows(n, fs, true);
        double busbw = S / s.total() * (g - 1) / g / 1e9;
        bw[idx++] = busbw;
        std::string name = cat(topo_name(kind), pxn ? "" : " (no PXN)");
        o.table.add({std::to_string(g), name, "ecmp", size_name(S), "dynamic", fmt(s.total() * 1e3, 3), fmt(busbw, 2),
                     fmt(s.makespan / s.lower_bound, 3), std::to_string(s.hot_links),
                     idx == 1 ? "-" : fmt((busbw / bw[0] - 1) * 100, 2) + "%"});
        o.json["small"].push_back({{"gpus", g}, {"topology", name}, {"bytes_per_gpu", S}, {"busbw_GBps", busbw},
                                   {"summary", s.json()}});
      }
      worst_small = std::max(worst_small, std::fabs(bw[1] / bw[0] - 1) * 100);
      sm.x.push_back(S), sm.y.push_back(bw[0]);
      sr.x.push_back(S), sr.y.push_back(bw[1]);
    }
    c1.series.push_back(sm);
    c1.series.push_back(sr);
  }
  o.json["small_worst_diff_pct"] = worst_small;
  o.notes.push_back(cat("32-128 GPUs: largest MPFT/MRFT busbw difference ", fmt(worst_small, 2),
                        "% (paper: 'very similar', within about 2%)"));
  // At scale.
  std::vector<int> large = quick ? std::vector<int>{256} : std::vector<int>{2048, 16384};
  Chart c2;
  c2.title = "All-to-all at scale (1 GiB per GPU): busbw";
  c2.ylabel = "busbw GB/s";
  c2.xlabel = "GPUs / routing";
  std::map<std::string, Series> by_topo;
  o.json["large"] = nlohmann::json::array();
  const double S = 1 * GiB;
  for (int g : large) {
    bool dyn = g <= 2048;
    int kk = quick ? 16 : k;
    for (Routing rt : {Routing::ECMP, Routing::Adaptive, Routing::Spray}) {
      if (rt != Routing::ECMP && g > 2048) continue;  // 16K: one static solve per topology (time)
      std::string cat_name = cat(g, " ", routing_name(rt));
      c2.xcats.push_back(cat_name);
      double base = 0;
      for (TopoKind kind : {TopoKind::MPFT, TopoKind::MRFT, TopoKind::FT3}) {
        if (rt == Routing::Spray && kind == TopoKind::FT3) continue;
        Network n = build_network(spec_of(kind, kk), g);
        Router r(n, rt);
        FlowSet fs = all_to_all(n, r, S / g, true);
        SimSummary s = run_flows(n, fs, dyn, 1e-2);
        double busbw = S / s.total() * (g - 1) / g / 1e9;
        if (kind == TopoKind::MPFT) base = busbw;
        std::string tn = topo_name(kind);
        if (kind == TopoKind::MRFT) tn += g * 1 > kk * kk / 2 ? " (3-tier)" : " (2-tier)";
        o.table.add({std::to_string(g), tn, routing_name(rt), size_name(S), dyn ? "dynamic" : "static bound",
                     fmt(s.total() * 1e3, 3), fmt(busbw, 2), fmt(s.makespan / s.lower_bound, 3),
                     std::to_string(s.hot_links), kind == TopoKind::MPFT ? "-" : fmt((busbw / base - 1) * 100, 2) + "%"});
        o.json["large"].push_back({{"gpus", g}, {"topology", tn}, {"routing", routing_name(rt)},
                                   {"dynamic", dyn}, {"busbw_GBps", busbw}, {"summary", s.json()}});
        auto& se = by_topo[topo_name(kind)];
        se.name = topo_name(kind);
        se.x.push_back((double)c2.xcats.size() - 1);
        se.y.push_back(busbw);
      }
    }
  }
  for (auto& [name, se] : by_topo) c2.series.push_back(se);
  o.notes.push_back("model: PXN all-to-all as two pipelined stages (NVLink to the rail-matched GPU, then IB inside "
                    "that plane/rail); per-NIC-pair flows; 50 GB/s NIC, 160 GB/s NVLink; latency from Table 5");
  o.notes.push_back("16,384 GPUs: static max-min bound (max size/rate); the dynamic run would only be faster");
  o.charts.push_back({"small", c1});
  o.charts.push_back({"scale", c2});
  return o;
}

ExperimentOutput experiment_e4(bool quick) {
  ExperimentOutput o;
  o.name = "E4";
  const int eps[3] = {16, 32, 64};
  const double pub_d[3] = {43, 58, 51}, pub_c[3] = {43, 57, 50};
  MoeParams mp;
  mp.experts = 256;
  if (quick) mp.tokens_per_gpu = 512;
  o.title = cat("E4: DeepEP normal kernels (", fmt_int(mp.tokens_per_gpu),
                " tokens/GPU, hidden 7,168, top-8, 4 nodes/token) on MPFT");
  struct Case {
    Network n;
    MoeFlows f;
  };
  std::vector<Case> cases;
  for (int ep : eps) {
    Network n = build_network(spec_of(TopoKind::MPFT, 64), ep);
    Router r(n, Routing::ECMP);
    MoeFlows f = moe_flows(n, r, mp);
    cases.push_back({std::move(n), std::move(f)});
  }
  auto model = [&](size_t i, double nic, double nvl, double* d, double* c) {
    const Case& cs = cases[i];
    SimOptions so;
    so.threads = 1;
    double td = simulate_fluid(cs.f.dispatch, caps_with(cs.n, nic, nvl), so).makespan;
    double tc = simulate_fluid(cs.f.combine, caps_with(cs.n, nic, nvl), so).makespan;
    *d = cs.f.rdma_bytes_per_gpu / td / 1e9;
    *c = cs.f.rdma_bytes_per_gpu * mp.combine_bytes() / mp.dispatch_bytes() / tc / 1e9;
  };
  // Calibrate only the NIC and NVLink bandwidths: grid search for the smallest worst relative error.
  double best = 1e9, bnic = 50, bnvl = 160;
  for (double nic = 30; nic <= 70.001; nic += quick ? 5 : 2)
    for (double nvl = 80; nvl <= 250.001; nvl += quick ? 20 : 10) {
      double worst = 0;
      for (size_t i = 0; i < 3; ++i) {
        double d, c;
        model(i, nic * 1e9, nvl * 1e9, &d, &c);
        worst = std::max({worst, std::fabs(d / pub_d[i] - 1), std::fabs(c / pub_c[i] - 1)});
      }
      if (worst < best) best = worst, bnic = nic, bnvl = nvl;
    }
  o.table.headers = {"EP", "bandwidths", "dispatch GB/s", "paper", "err %", "combine GB/s", "paper", "err %",
                     "remote nodes/token", "NVLink/IB bytes"};
  Chart c;
  c.title = "DeepEP RDMA bandwidth: model (calibrated) vs published";
  c.ylabel = "GB/s per GPU";
  c.xlabel = "EP size";
  Series md{"model dispatch"}, mc{"model combine"}, pd{"DeepEP dispatch"}, pc{"DeepEP combine"};
  pd.dashed = pc.dashed = true;
  md.color = pd.color = 0;
  mc.color = pc.color = 1;
  o.json["rows"] = nlohmann::json::array();
  for (auto [nic, nvl, label] : {std::tuple{50.0, 160.0, "nominal 50/160"}, std::tuple{bnic, bnvl, "calibrated"}}) {
    for (size_t i = 0; i < 3; ++i) {
      double d, cb;
      model(i, nic * 1e9, nvl * 1e9, &d, &cb);
      std::string lab = cat(label, " (", fmt(nic, 0), "/", fmt(nvl, 0), ")");
      o.table.add({cat("EP", eps[i]), lab, fmt(d, 1), fmt(pub_d[i], 0), fmt((d / pub_d[i] - 1) * 100, 1), fmt(cb, 1),
                   fmt(pub_c[i], 0), fmt((cb / pub_c[i] - 1) * 100, 1), fmt(cases[i].f.remote_nodes_per_token, 2),
                   fmt(cases[i].f.nvl_bytes_per_gpu / std::max(1.0, cases[i].f.rdma_bytes_per_gpu), 2)});
      o.json["rows"].push_back({{"ep", eps[i]}, {"nic_GBps", nic}, {"nvlink_GBps", nvl}, {"dispatch_GBps", d},
                                {"combine_GBps", cb}, {"paper_dispatch", pub_d[i]}, {"paper_combine", pub_c[i]},
                                {"calibrated", std::string(label) == "calibrated"}});
      if (std::string(label) == "calibrated") {
        c.xcats.push_back(cat("EP", eps[i]));
        md.x.push_back(i), md.y.push_back(d), mc.x.push_back(i), mc.y.push_back(cb);
        pd.x.push_back(i), pd.y.push_back(pub_d[i]), pc.x.push_back(i), pc.y.push_back(pub_c[i]);
      }
    }
  }
  o.json["calibrated"] = {{"nic_GBps", bnic}, {"nvlink_GBps", bnvl}, {"worst_rel_err", best}};
  o.notes.push_back(cat("calibrated NIC ", fmt(bnic, 0), " GB/s, NVLink ", fmt(bnvl, 0),
                        " GB/s; worst error over the six published values ", fmt(best * 100, 1), "% (target 15%)"));
  o.notes.push_back("calibration runs are exact (every completion re-solves); the extrapolation rows batch "
                    "completions within 0.1% of the phase's lower bound into one re-solve");
  o.notes.push_back("model: synthetic uniform node-limited routing (256 experts, 4 nodes/token), IB to the same rank "
                    "on each target node then NVLink forwarding, both stages pipelined; bandwidth = RDMA bytes per "
                    "GPU / phase time (DeepEP's bottleneck bandwidth)");
  c.series = {md, pd, mc, pc};
  o.charts.push_back({"", c});
  // Extrapolation with the calibrated bandwidths: MPFT vs FT3 at larger EP.
  std::vector<int> big = quick ? std::vector<int>{128} : std::vector<int>{128, 256, 1024, 2048};
  o.json["extrapolation"] = nlohmann::json::array();
  for (int ep : big)
    for (TopoKind kind : {TopoKind::MPFT, TopoKind::FT3}) {
      NetParams np;
      np.nic_bw = bnic * 1e9, np.nvlink_bw = bnvl * 1e9;
      Network n = build_network(spec_of(kind, 64), ep, np);
      Router r(n, Routing::ECMP);
      MoeParams m2 = mp;
      m2.experts = 0;
      MoeFlows f = moe_flows(n, r, m2);
      // Up to 2,048 GPUs (a million flows per phase): completions within 0.1% share a re-solve.
      SimOptions so;
      so.batch_tol = 1e-3;
      double td = simulate_fluid(f.dispatch, capacities(n), so).makespan;
      double tc = simulate_fluid(f.combine, capacities(n), so).makespan;
      double d = f.rdma_bytes_per_gpu / td / 1e9, cb = f.rdma_bytes_per_gpu * 2 * mp.hidden / mp.dispatch_bytes() / tc / 1e9;
      o.table.add({cat("EP", ep), cat(topo_name(kind), " calibrated"), fmt(d, 1), "-", "-", fmt(cb, 1), "-", "-",
                   fmt(f.remote_nodes_per_token, 2), fmt(f.nvl_bytes_per_gpu / std::max(1.0, f.rdma_bytes_per_gpu), 2)});
      o.json["extrapolation"].push_back({{"ep", ep}, {"topology", topo_name(kind)}, {"dispatch_GBps", d}, {"combine_GBps", cb}});
    }
  return o;
}

ExperimentOutput experiment_e8(bool quick) {
  ExperimentOutput o;
  o.name = "E8";
  o.title = "E8: all-to-all (PXN) throughput with random switch-switch link failures";
  const int k = quick ? 16 : 64, gpus = quick ? 256 : 2048, seeds = quick ? 1 : 2;
  const double fracs[4] = {0, 0.001, 0.01, 0.05};
  o.table.headers = {"topology", "routing", "failed %", "cables failed", "time ms", "rel. throughput", "worst seed",
                     "rerouted flows"};
  Chart c;
  c.title = cat("All-to-all throughput vs failed links (", gpus, " GPUs, k=", k, ")");
  c.xlabel = "switch-switch links failed (%)";
  c.ylabel = "throughput relative to no failures";
  for (double f : fracs) c.xcats.push_back(fmt(f * 100, 1));
  o.json["gpus"] = gpus;
  o.json["rows"] = nlohmann::json::array();
  const double S = 256 * MiB;
  int si = 0;
  for (TopoKind kind : {TopoKind::MPFT, TopoKind::MRFT, TopoKind::FT3})
    for (Routing rt : {Routing::ECMP, Routing::Adaptive}) {
      Series se{cat(topo_name(kind), " ", routing_name(rt))};
      se.color = si / 2;
      se.dashed = rt == Routing::Adaptive;
      ++si;
      double t0 = 0;
      for (int fi = 0; fi < 4; ++fi) {
        double sum = 0, worst = 1e9, tsum = 0;
        int failed = 0;
        int64_t rer = 0;
        for (int sd = 0; sd < (fi ? seeds : 1); ++sd) {
          Network n = build_network(spec_of(kind, k), gpus);
          failed = fail_random_links(n, fracs[fi], 100 + sd);
          Router r(n, rt);
          int64_t rr = 0;
          FlowSet fs = all_to_all(n, r, S / gpus, true, &rr);
          rer += rr;
          SimSummary s = run_flows(n, fs, true, 1e-2);
          if (fi == 0) t0 = s.total();
          double rel = t0 / s.total();
          sum += rel, worst = std::min(worst, rel), tsum += s.total();
        }
        int ns = fi ? seeds : 1;
        o.table.add({topo_name(kind), routing_name(rt), fmt(fracs[fi] * 100, 1), std::to_string(failed),
                     fmt(tsum / ns * 1e3, 3), fmt(sum / ns, 4), fmt(worst, 4), std::to_string(rer)});
        o.json["rows"].push_back({{"topology", topo_name(kind)}, {"routing", routing_name(rt)}, {"failed_fraction", fracs[fi]},
                                  {"cables_failed", failed}, {"rel_throughput", sum / ns}, {"worst", worst}});
        se.x.push_back(fi), se.y.push_back(sum / ns);
      }
      c.series.push_back(se);
    }
  o.notes.push_back("research notes' worst-leaf estimate for one 2-tier plane: +3.3%, +7.1%, +18.6% time at 0.1/1/5% "
                    "(relative throughput 0.968, 0.934, 0.843)");
  o.notes.push_back("routes are recomputed around failed links (after the subnet manager's reroute; reroute time not "
                    "modelled); dynamic fluid simulation, batch tolerance 1%");
  o.charts.push_back({"", c});
  return o;
}

ExperimentOutput experiment_e9(bool quick) {
  ExperimentOutput o;
  o.name = "E9";
  o.title = "E9: decode TPOT bound (ISCA'25 §2.3.2) by arithmetic, then with the simulated network";
  o.table.headers = {"case", "per layer us", "layer x2 us", "TPOT ms", "tok/s", "paper", "NVLink share"};
  // Arithmetic exactly as the paper writes it: (1 B + 2 B) × 32 tokens × 9 experts × 7K / 50 GB/s.
  const double tokens = 32, experts = 9, hidden = 7000, layers = 61;
  auto arith = [&](double bw) {
    double t = (1 + 2) * tokens * experts * hidden / bw;
    return std::tuple{t, 2 * t, 2 * t * layers};
  };
  auto [t_ib, l_ib, tpot_ib] = arith(50e9);
  auto [t_nv, l_nv, tpot_nv] = arith(900e9);
  o.table.add({"arithmetic, CX7 400G (50 GB/s)", fmt(t_ib * 1e6, 2), fmt(l_ib * 1e6, 2), fmt(tpot_ib * 1e3, 2),
               fmt(1 / tpot_ib, 2), "120.96 us, 241.92 us, 14.76 ms, 67 tok/s", "-"});
  o.table.add({"arithmetic, GB200 NVL72 (900 GB/s)", fmt(t_nv * 1e6, 2), fmt(l_nv * 1e6, 2), fmt(tpot_nv * 1e3, 2),
               fmt(1 / tpot_nv, 1), "6.72 us, 0.82 ms, ~1200 tok/s", "-"});
  o.json["arithmetic"] = {{"per_layer_us", t_ib * 1e6}, {"two_microbatch_us", l_ib * 1e6}, {"tpot_ms", tpot_ib * 1e3},
                          {"tok_per_s", 1 / tpot_ib}, {"nvl72_per_layer_us", t_nv * 1e6}, {"nvl72_tpot_ms", tpot_nv * 1e3},
                          {"nvl72_tok_per_s", 1 / tpot_nv}};
  // Simulated: every GPU holds one expert and sends 32 tokens to 9 distinct random expert GPUs.
  const int gpus = quick ? 64 : 256, G = 8;
  const double db = hidden * 1, cb = hidden * 2;
  enum Mode { SameRank, DirectPxn, MrftDirect };
  o.json["simulated"] = nlohmann::json::array();
  Chart ch;
  ch.title = "Decode TPOT: paper arithmetic vs simulated network";
  ch.ylabel = "TPOT ms (61 layers, 2 micro-batches)";
  ch.xlabel = "case";
  Series tp("TPOT ms");
  ch.xcats.push_back("arithmetic 50 GB/s");
  tp.x.push_back(0), tp.y.push_back(tpot_ib * 1e3);
  for (Mode mode : {DirectPxn, SameRank, MrftDirect}) {
    Network n = build_network(spec_of(mode == MrftDirect ? TopoKind::MRFT : TopoKind::MPFT, 64), gpus);
    Router r(n, Routing::ECMP);
    std::map<std::pair<int, int>, double> ib, nvl;  // token counts per (src, dst)
    for (int g = 0; g < gpus; ++g)
      for (int t = 0; t < tokens; ++t) {
        int tg[9], nt = 0;
        uint64_t ctr = 0;
        while (nt < experts) {
          int x = (int)(rng_u64(9, (uint64_t)g * 1000 + t, ctr++) % gpus);
          if (x != g && std::find(tg, tg + nt, x) == tg + nt) tg[nt++] = x;
        }
        for (int x : std::span(tg, nt)) {
          int i = g / G, rr = g % G, j = x / G, tr = x % G;
          if (i == j) nvl[{g, x}] += 1;
          else if (mode == MrftDirect || rr == tr) ib[{g, x}] += 1;
          else if (mode == DirectPxn) nvl[{g, i * G + tr}] += 1, ib[{i * G + tr, x}] += 1;
          else ib[{g, j * G + rr}] += 1, nvl[{j * G + rr, x}] += 1;
        }
      }
    double total = 0, share = 0;
    for (int phase = 0; phase < 2; ++phase) {
      FlowBuilder fb(n, r);
      double B = phase == 0 ? db : cb;
      for (auto& [k2, v] : ib) {
        int a = phase == 0 ? k2.first : k2.second, b = phase == 0 ? k2.second : k2.first;
        fb.ib(a, b, v * B, ((uint64_t)a << 32) | (uint32_t)b);
      }
      for (auto& [k2, v] : nvl) phase == 0 ? fb.nvl(k2.first, k2.second, v * B) : fb.nvl(k2.second, k2.first, v * B);
      SimSummary s = run_flows(n, fb.fs, true, 1e-3);
      total += s.total();
      share = s.nvl_bytes / (s.nvl_bytes + s.ib_bytes);
    }
    const char* names[] = {"simulated MPFT, same-rank rule (IB then NVLink)", "simulated MPFT, direct RDMA + PXN",
                           "simulated MRFT, direct RDMA (one plane)"};
    double tpot = 2 * total * layers;
    o.table.add({names[mode], fmt(total * 1e6, 2), fmt(2 * total * 1e6, 2), fmt(tpot * 1e3, 2), fmt(1 / tpot, 1), "-",
                 fmt(share * 100, 1) + "%"});
    const char* shortn[] = {"MPFT same-rank", "MPFT direct+PXN", "MRFT direct"};
    ch.xcats.push_back(shortn[mode]);
    tp.x.push_back((double)tp.x.size()), tp.y.push_back(tpot * 1e3);
    o.json["simulated"].push_back({{"case", names[mode]}, {"gpus", gpus}, {"per_layer_us", total * 1e6},
                                   {"tpot_ms", tpot * 1e3}, {"tok_per_s", 1 / tpot}, {"nvlink_byte_share", share}});
  }
  ch.series.push_back(tp);
  o.charts.push_back({"", ch});
  o.notes.push_back("120.96 us is exact with 7K = 7,000 (with 7,168 it would be 123.86 us); the paper rounds "
                    "14.757 ms to 14.76 and 67.76 tok/s down to 67");
  o.notes.push_back(cat("simulation: ", gpus, " GPUs, one expert each, 32 tokens per GPU to 9 distinct uniformly random "
                        "GPUs, FP8 7,000 B dispatch and BF16 14,000 B combine, dynamic fluid model (batch tolerance 0.1%) plus Table 5 "
                        "latency (IB 2.8/3.7 us, NVLink 3.33 us) per phase"));
  return o;
}

}  // namespace dsv3::net
