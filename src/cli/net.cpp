// dsv3 net: topology cost tables, validation, flow-level simulation and the paper experiments.
#include <cmath>
#include <iostream>
#include <memory>

#include "cli/command.h"
#include "core/error.h"
#include "net/cost.h"
#include "net/experiments.h"
#include "net/sim.h"
#include "net/workload.h"

namespace {

using namespace dsv3;
using namespace dsv3::net;

const char* kNetFooter = R"(Topologies (--topology):
  ft2   two-tier fat tree (leaf-spine) of k-port switches: k^2/2 endpoints, 3k/2 switches
  mpft  multi-plane fat tree: --planes P independent FT2 planes; GPU rank r of every node uses the
        NIC in plane r mod P; traffic between planes is forwarded inside the node over NVLink (PXN)
  mrft  multi-rail fat tree: one plane, NIC r of every node on rail-r leaves; 3 tiers past k^2/2
  ft3   three-tier k-ary fat tree: k^3/4 endpoints, 5k^2/4 switches
  sf    Slim Fly (MMS graph): --q prime power (q = 4w + d, d in {-1,0,1}); q = 28 as in the paper is
        accepted for counts with a warning (not constructible); --exact rejects it
  df    Dragonfly: --df-p endpoints/router, --df-a routers/group, --df-h global links/router,
        --df-g groups (<= a*h + 1; default balanced a = 2p = 2h from the radix, g = a*h + 1)
Workloads (net sim --workload):
  a2a       every GPU sends --bytes/(GPUs) to every other GPU, each GPU pair its own flow
  a2a-pxn   NCCL all-to-all with PXN: NVLink hop to the GPU on the destination's rail, then IB
  perm      random NIC permutation, --bytes per flow
  allreduce ring all-reduce of --bytes per GPU, one ring per rank (channel)
  moe       DeepEP-style dispatch (FP8: hidden + hidden/32 bytes) then combine (BF16), node-limited
            to --node-limit nodes, IB to the same rank then NVLink forwarding; synthetic routing
            (--zipf skew) or --trace FILE (docs/network.md: JSON dsv3-routing-v1 or binary DSV3RTE1)
Routing (--routing): ecmp (per-flow hash), adaptive (least-loaded next hop), spray (even split).
Failures: --fail-links FRACTION, --fail-switch ID, --fail-plane P.
Experiments (net experiment ID): E1 Table 3, E2 cost sweep, E3 MPFT vs MRFT all-to-all, E4 DeepEP,
  E7 ECMP collisions, E8 link failures, E9 TPOT arithmetic + simulated decode.)";

struct TopoOpts {
  std::string topology = "mpft";
  int radix = 64, planes = 8, gpus_per_node = 8, q = 0, df_p = 0, df_a = 0, df_h = 0, df_g = 0;
  long long endpoints = 0;
  bool exact = false;
  void add(CLI::App* a) {
    a->add_option("--topology", topology, "ft2|mpft|mrft|ft3|sf|df");
    a->add_option("--radix", radix, "Switch ports (k)");
    a->add_option("--planes", planes, "MPFT planes (one NIC per GPU per plane)");
    a->add_option("--gpus-per-node", gpus_per_node, "GPUs (and NICs) per node");
    a->add_option("--endpoints", endpoints, "Endpoints for the cost row (0 = the topology's maximum)");
    a->add_option("--q", q, "Slim Fly q (0 = largest that fits the radix)");
    a->add_flag("--exact", exact, "Slim Fly: require q to be a prime power (a real MMS graph)");
    a->add_option("--df-p", df_p, "Dragonfly endpoints per router (0 = balanced)");
    a->add_option("--df-a", df_a, "Dragonfly routers per group (0 = balanced)");
    a->add_option("--df-h", df_h, "Dragonfly global links per router (0 = balanced)");
    a->add_option("--df-g", df_g, "Dragonfly groups (0 = a*h + 1)");
  }
  TopoSpec spec() const {
    TopoSpec s;
    s.kind = parse_topo(topology);
    s.radix = radix, s.planes = planes, s.gpus_per_node = gpus_per_node, s.endpoints = endpoints;
    s.q = q, s.exact = exact, s.df_p = df_p, s.df_a = df_a, s.df_h = df_h, s.df_g = df_g;
    return s;
  }
};

struct CostOpts {
  TopoOpts t;
  std::string preset = "isca25";
  bool one = false, json = false, csv = false;
};

int run_cost(const CostOpts& o) {
  CostPreset p = cost_preset(o.preset);
  std::vector<CostRow> rows;
  if (o.one) rows.push_back(cost_row(o.t.spec(), p));
  else
    for (auto& r : table3_reference()) rows.push_back(cost_row(r.spec, p));
  for (auto& r : rows)
    for (auto& w : r.counts.warnings) cli::note("warning: " + w);
  if (o.json) {
    if (o.one) std::cout << to_json(rows[0]).dump(2) << "\n";
    else {
      nlohmann::json a = nlohmann::json::array();
      for (auto& r : rows) a.push_back(to_json(r));
      std::cout << a.dump(2) << "\n";
    }
    return 0;
  }
  Table t;
  t.headers = {"topology", "params", "endpoints", "switches", "links", "cost M$", "k$/endpoint"};
  for (auto& r : rows)
    t.add({r.topology, r.params, fmt_int(r.counts.endpoints), fmt_int(r.counts.switches), fmt_int(r.counts.links),
           fmt(r.cost_musd, 1), fmt(r.cost_per_endpoint_kusd, 3)});
  std::cout << (o.csv ? t.csv() : t.text());
  if (!o.csv) std::cout << "preset " << p.name << ": " << p.description << "\n";
  return 0;
}

struct SimOpts {
  TopoOpts t;
  int gpus = 2048;
  std::string workload = "a2a-pxn", routing = "ecmp", trace;
  double bytes = 1073741824.0, nic_gbps = 50, nvlink_gbps = 160, fail_links = 0, batch_tol = 1e-3;
  std::vector<int> fail_switch;
  int fail_plane = -1, trace_layer = 0;
  uint64_t seed = 1;
  bool static_only = false, json = false, roce = false;
  MoeParams moe;
};

int run_sim(const SimOpts& o) {
  NetParams np;
  np.nic_bw = o.nic_gbps * 1e9, np.nvlink_bw = o.nvlink_gbps * 1e9;
  if (!(o.nic_gbps > 0 && std::isfinite(o.nic_gbps)) || !(o.nvlink_gbps > 0 && std::isfinite(o.nvlink_gbps)))
    input_error("--nic-gbps/--nvlink-gbps: must be positive and finite");
  if (!(o.bytes > 0 && std::isfinite(o.bytes))) input_error("--bytes ", o.bytes, ": must be positive and finite");
  // A negative or NaN tolerance retires no flow in the fluid simulation, which then never ends.
  if (!(o.batch_tol >= 0 && std::isfinite(o.batch_tol)))
    input_error("--batch-tol ", o.batch_tol, ": must be finite and at least 0");
  if (!(o.fail_links >= 0 && o.fail_links <= 1))
    input_error("--fail-links ", o.fail_links, ": must be a fraction in [0, 1]");
  Network n = build_network(o.t.spec(), o.gpus, np);
  int failed = o.fail_links > 0 ? fail_random_links(n, o.fail_links, o.seed) : 0;
  for (int s : o.fail_switch) fail_switch(n, s);
  if (o.fail_plane >= 0) fail_plane(n, o.fail_plane);
  Router r(n, parse_routing(o.routing), o.seed);
  LatencyModel lat;
  lat.roce = o.roce;
  nlohmann::json out{{"topology", topo_name(n.spec.kind)}, {"gpus", n.gpus}, {"nics", n.nics},
                     {"switches", n.switches}, {"workload", o.workload}, {"routing", o.routing},
                     {"cables_failed", failed}};
  auto report = [&](const std::string& phase, const FlowSet& fs, double payload) {
    SimSummary s = run_flows(n, fs, !o.static_only, o.batch_tol, lat);
    out[phase] = s.json();
    out[phase]["algbw_GBps"] = payload / s.total() / 1e9;
    return s;
  };
  int64_t rer = 0;
  if (o.workload == "a2a" || o.workload == "a2a-pxn") {
    FlowSet fs = all_to_all(n, r, o.bytes / n.gpus, o.workload == "a2a-pxn", &rer);
    SimSummary s = report("all_to_all", fs, o.bytes);
    out["all_to_all"]["busbw_GBps"] = o.bytes / s.total() * (n.gpus - 1) / n.gpus / 1e9;
  } else if (o.workload == "perm") {
    report("permutation", permutation(n, r, o.bytes, o.seed), o.bytes);
  } else if (o.workload == "allreduce") {
    SimSummary s = report("allreduce", ring_allreduce(n, r, o.bytes), o.bytes);
    out["allreduce"]["busbw_GBps"] = o.bytes / s.total() * 2 * (n.gpus - 1) / n.gpus / 1e9;
  } else if (o.workload == "moe") {
    std::vector<ExpertRouting> tr;
    if (!o.trace.empty()) {
      tr = load_routing_trace(o.trace);
      if (o.trace_layer < 0 || o.trace_layer >= (int)tr.size())
        input_error("--trace-layer ", o.trace_layer, ": the trace has ", tr.size(), " layers");
    }
    MoeFlows f = moe_flows(n, r, o.moe, tr.empty() ? nullptr : &tr[o.trace_layer]);
    SimSummary d = report("dispatch", f.dispatch, f.rdma_bytes_per_gpu);
    SimSummary c = report("combine", f.combine, f.rdma_bytes_per_gpu * o.moe.combine_bytes() / o.moe.dispatch_bytes());
    out["rdma_bytes_per_gpu"] = f.rdma_bytes_per_gpu;
    out["remote_nodes_per_token"] = f.remote_nodes_per_token;
    out["recv_imbalance"] = f.recv_imbalance;
    out["dispatch"]["rdma_GBps"] = f.rdma_bytes_per_gpu / d.total() / 1e9;
    out["combine"]["rdma_GBps"] = f.rdma_bytes_per_gpu * o.moe.combine_bytes() / o.moe.dispatch_bytes() / c.total() / 1e9;
  } else {
    input_error("--workload '", o.workload, "': expected a2a, a2a-pxn, perm, allreduce or moe");
  }
  out["rerouted_flows"] = rer;
  if (o.json) {
    std::cout << out.dump(2) << "\n";
    return 0;
  }
  Table t;
  t.headers = {"phase", "flows", "time ms", "T/T*", "GB/s", "max/mean sw load", "hot links", "stalled"};
  for (auto& [k, v] : out.items()) {
    if (!v.is_object()) continue;
    double bw = v.contains("busbw_GBps") ? v["busbw_GBps"].get<double>()
                                         : (v.contains("rdma_GBps") ? v["rdma_GBps"].get<double>() : v["algbw_GBps"].get<double>());
    t.add({k, fmt_int(v["flows"].get<long long>()), fmt(v["total_s"].get<double>() * 1e3, 3),
           fmt(v["t_over_tstar"].get<double>(), 3), fmt(bw, 2), fmt(v["swsw_max_over_mean"].get<double>(), 3),
           std::to_string(v["hot_links"].get<long long>()), std::to_string(v["stalled"].get<long long>())});
  }
  std::cout << topo_name(n.spec.kind) << ", " << n.gpus << " GPUs, " << n.switches << " switches, " << o.workload
            << ", " << o.routing << (failed ? cat(", ", failed, " cables failed") : "") << "\n"
            << t.text();
  return 0;
}

struct ValidateOpts {
  TopoOpts t;
  int gpus = 0;
};

int run_validate(const ValidateOpts& o) {
  TopoSpec s = o.t.spec();
  TopoCounts c = topo_counts(s);
  for (auto& w : c.warnings) cli::note("warning: " + w);
  if (s.gpus_per_node < 1) input_error("--gpus-per-node ", s.gpus_per_node, ": must be at least 1");
  int gpus = o.gpus ? o.gpus : (int)(c.endpoints - c.endpoints % s.gpus_per_node);
  Network n = build_network(s, gpus);
  Validation v = validate(n);
  nlohmann::json j{{"topology", topo_name(s.kind)}, {"gpus", gpus}, {"switches", n.switches},
                   {"switch_links", n.swsw_links}, {"degree_min", v.min_degree}, {"degree_max", v.max_degree},
                   {"radix", s.radix}, {"diameter", v.diameter}, {"bisection_links_natural_cut", v.bisection_links},
                   {"connected", v.connected}, {"formula_switches", c.switches}, {"formula_links", c.links},
                   {"formula_diameter", c.diameter}};
  std::cout << j.dump(2) << "\n";
  return v.connected ? 0 : 1;
}

struct ExpOpts {
  std::string id, out = std::string(DSV3_SOURCE_DIR) + "/bench/results";
  bool quick = false, no_write = false;
};

int run_exp(const ExpOpts& o) {
  ExperimentOutput e = run_experiment(o.id, o.quick);
  std::cout << e.title << "\n\n" << e.table.text();
  for (auto& n : e.notes) std::cout << "- " << n << "\n";
  if (!o.no_write)
    for (auto& p : write_experiment(e, o.out)) cli::note("wrote " + p);
  return 0;
}

struct SweepOpts {
  std::vector<int> radix{64, 128};
  long long min = 1024, max = 262144;
  std::string out = std::string(DSV3_SOURCE_DIR) + "/bench/results";
  bool no_write = false;
};

int run_sweep(const SweepOpts& o) {
  if (o.min < 1 || o.max < o.min) input_error("--min/--max: need 1 <= min <= max");
  for (int k : o.radix)
    if (k < 4 || k % 2) input_error("--radix ", k, ": sweep radices must be even and at least 4");
  ExperimentOutput e = experiment_sweep(o.radix, o.min, o.max);
  std::cout << e.title << "\n\n" << e.table.text();
  if (!o.no_write)
    for (auto& p : write_experiment(e, o.out)) cli::note("wrote " + p);
  return 0;
}

}  // namespace

DSV3_COMMAND(net, "Network planner and flow-level simulator (multi-plane fat tree, FT3, Slim Fly, Dragonfly)",
             [](CLI::App& app) {
               app.footer(kNetFooter);
               app.require_subcommand(1, 1);
               auto co = std::make_shared<CostOpts>();
               auto* cost = app.add_subcommand("cost", "Cost table (Table 3 rows, or one row with --topology)");
               cost->option_defaults()->always_capture_default();
               co->t.add(cost);
               cost->get_option("--topology")->description("ft2|mpft|mrft|ft3|sf|df (given: print one row)");
               cost->add_option("--preset", co->preset, "Unit-cost preset (isca25)");
               cost->add_flag("--json", co->json, "Print JSON");
               cost->add_flag("--csv", co->csv, "Print CSV");

               auto so = std::make_shared<SimOpts>();
               auto* sim = app.add_subcommand("sim", "Simulate one workload on one topology");
               sim->option_defaults()->always_capture_default();
               so->t.add(sim);
               sim->add_option("--gpus", so->gpus, "GPUs (multiple of --gpus-per-node)");
               sim->add_option("--workload", so->workload, "a2a|a2a-pxn|perm|allreduce|moe");
               sim->add_option("--bytes", so->bytes, "Bytes per GPU (a2a total send, allreduce buffer; perm per flow)");
               sim->add_option("--routing", so->routing, "ecmp|adaptive|spray");
               sim->add_option("--nic-gbps", so->nic_gbps, "NIC and switch port bandwidth, GB/s");
               sim->add_option("--nvlink-gbps", so->nvlink_gbps, "NVLink bandwidth per GPU and direction, GB/s");
               sim->add_option("--fail-links", so->fail_links, "Fraction of switch-switch cables to fail at random");
               sim->add_option("--fail-switch", so->fail_switch, "Switch index to fail (repeatable)");
               sim->add_option("--fail-plane", so->fail_plane, "Plane to fail (-1 = none)");
               sim->add_option("--seed", so->seed, "Seed for failures, hashing and synthetic routing");
               sim->add_option("--batch-tol", so->batch_tol, "Relative window of completions served by one re-solve");
               sim->add_flag("--static", so->static_only, "One static max-min solve (bound max size/rate)");
               sim->add_flag("--roce", so->roce, "RoCE latency (Table 5: 3.6/5.6 us) instead of InfiniBand (2.8/3.7)");
               sim->add_option("--tokens", so->moe.tokens_per_gpu, "MoE tokens per GPU");
               sim->add_option("--hidden", so->moe.hidden, "MoE hidden size");
               sim->add_option("--experts", so->moe.experts, "MoE routed experts (0 = max(256, GPUs))");
               sim->add_option("--topk", so->moe.topk, "MoE experts per token");
               sim->add_option("--node-limit", so->moe.node_limit, "MoE nodes per token (M)");
               sim->add_option("--zipf", so->moe.zipf, "MoE expert-popularity skew (Zipf exponent; 0 = uniform)");
               sim->add_option("--trace", so->trace, "MoE routing trace (JSON dsv3-routing-v1 or binary DSV3RTE1)");
               sim->add_option("--trace-layer", so->trace_layer, "Layer of the trace to simulate");
               sim->add_flag("--json", so->json, "Print JSON");

               auto vo = std::make_shared<ValidateOpts>();
               auto* val = app.add_subcommand("validate", "Build a topology and check ports, degrees, diameter, bisection");
               val->option_defaults()->always_capture_default();
               vo->t.add(val);
               val->add_option("--gpus", vo->gpus, "GPUs to attach (0 = all endpoints)");

               auto eo = std::make_shared<ExpOpts>();
               auto* exp = app.add_subcommand("experiment", "Run a paper experiment: E1 E2 E3 E4 E7 E8 E9");
               exp->option_defaults()->always_capture_default();
               exp->add_option("id", eo->id, "Experiment id")->required();
               exp->add_option("--out", eo->out, "Directory for net_<id>.{json,csv,txt,svg}");
               exp->add_flag("--quick", eo->quick, "Smaller instances (seconds)");
               exp->add_flag("--no-write", eo->no_write, "Print only");

               auto wo = std::make_shared<SweepOpts>();
               auto* sw = app.add_subcommand("sweep", "Cost per endpoint from --min to --max endpoints (table and SVG plot)");
               sw->option_defaults()->always_capture_default();
               sw->add_option("--radix", wo->radix, "Switch radices")->delimiter(',');
               sw->add_option("--min", wo->min, "Smallest endpoint count (doubles up to --max)");
               sw->add_option("--max", wo->max, "Largest endpoint count");
               sw->add_option("--out", wo->out, "Directory for net_E2_sweep.{json,csv,txt,svg}");
               sw->add_flag("--no-write", wo->no_write, "Print only");

               return [=]() -> int {
                 if (cost->parsed()) {
                   co->one = cost->count("--topology") > 0;
                   return run_cost(*co);
                 }
                 if (sim->parsed()) return run_sim(*so);
                 if (val->parsed()) return run_validate(*vo);
                 if (exp->parsed()) return run_exp(*eo);
                 if (sw->parsed()) return run_sweep(*wo);
                 return 2;
               };
             });
