// Routing (ECMP determinism, failures), workloads (byte accounting, node limit), routing traces,
// the latency model, and the dsv3 net command line.
#include "net/workload.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>

#include <unistd.h>

#include "core/error.h"
#include "core/threads.h"
#include "net/sim.h"

using namespace dsv3;
using namespace dsv3::net;

namespace {
TopoSpec spec(TopoKind k, int radix) {
  TopoSpec s;
  s.kind = k;
  s.radix = radix;
  return s;
}
std::vector<int32_t> links_of(const FlowSet& fs) { return fs.link; }
}  // namespace

TEST(Routing, EcmpIsDeterministicPerSeedAndKey) {
  Network n = build_network(spec(TopoKind::FT2, 16), 128);
  Router a(n, Routing::ECMP, 7), b(n, Routing::ECMP, 7), c(n, Routing::ECMP, 8);
  FlowSet fa = permutation(n, a, 1, 3), fb = permutation(n, b, 1, 3), fc = permutation(n, c, 1, 3);
  EXPECT_EQ(links_of(fa), links_of(fb));
  EXPECT_NE(links_of(fa), links_of(fc));
  // Every routed path is minimal: NIC up, leaf-spine, spine-leaf, NIC down (or 2 links inside a leaf).
  for (size_t f = 0; f < fa.count(); ++f) {
    size_t len = fa.off[f + 1] - fa.off[f];
    EXPECT_TRUE(len == 2 || len == 4) << len;
  }
}

TEST(Routing, FailedLinksAreAvoidedAndCutPlanesForwarded) {
  TopoSpec s = spec(TopoKind::MPFT, 8);
  s.planes = 8;
  Network n = build_network(s, 256);
  fail_random_links(n, 0.2, 5);
  fail_plane(n, 2);
  Router r(n, Routing::ECMP);
  int64_t rerouted = 0;
  FlowSet fs = all_to_all(n, r, 1e6, true, &rerouted);
  for (int32_t l : fs.link) ASSERT_TRUE(n.links[l].up);
  EXPECT_GT(rerouted, 0);  // plane 2 traffic leaves through another plane after an NVLink hop
  SimSummary sm = run_flows(n, fs, true);
  EXPECT_EQ(sm.stalled, 0);
  // A failed leaf in a single-plane fat tree cuts its NICs off: their flows stall.
  Network f2 = build_network(spec(TopoKind::FT2, 8), 32);
  fail_switch(f2, 0);
  Router r2(f2, Routing::ECMP);
  EXPECT_GT(run_flows(f2, all_to_all(f2, r2, 1e6, false), true).stalled, 0);
  // Every spine link failed: pairs on different leaves are cut off although their NICs' own links
  // are up. Their flows stall (they used to be put on the sender's healthy uplink and finish at
  // line rate), in the fluid simulation and in the static bound.
  Network cut = build_network(spec(TopoKind::FT2, 8), 32);
  fail_random_links(cut, 1.0, 1);
  Router r3(cut, Routing::ECMP);
  FlowBuilder fb(cut, r3);
  fb.ib(0, 31, 1e6, 0);  // NIC 0 and NIC 31 sit on different leaves
  ASSERT_EQ(fb.unroutable, 1);
  for (int32_t l : fb.fs.link) EXPECT_FALSE(cut.links[size_t(l)].up);
  EXPECT_EQ(run_flows(cut, fb.fs, true).stalled, 1);
  EXPECT_EQ(run_flows(cut, fb.fs, false).stalled, 1);
}

TEST(Workload, AllToAllBytesAndPxnStages) {
  TopoSpec s = spec(TopoKind::MPFT, 16);
  s.planes = 8;
  Network n = build_network(s, 64);  // 8 nodes
  Router r(n, Routing::ECMP);
  const double b = 1000;
  FlowSet fs = all_to_all(n, r, b, true);
  double ib = 0, nvl = 0;
  for (size_t f = 0; f < fs.count(); ++f) (fs.tag[f] == TagIB ? ib : nvl) += fs.size[f];
  // Every inter-node byte crosses IB once: 64 GPUs × 56 remote peers × b.
  EXPECT_DOUBLE_EQ(ib, 64.0 * 56 * b);
  // NVLink: per node, 8 × 7 (rank, rail) pairs carry b per node (7 forwarded + 1 local).
  EXPECT_DOUBLE_EQ(nvl, 8.0 * 56 * 8 * b);
  for (size_t f = 0; f < fs.count(); ++f) {
    if (fs.tag[f] == TagIB) {
      EXPECT_EQ(n.plane_of_nic(fs.src[f]), n.plane_of_nic(fs.dst[f]));
    }
  }
}

TEST(Workload, RingAllReduceBytes) {
  Network n = build_network(spec(TopoKind::FT2, 16), 32);  // 4 nodes
  Router r(n, Routing::ECMP);
  FlowSet fs = ring_allreduce(n, r, 800);
  double ib = 0;
  for (size_t f = 0; f < fs.count(); ++f) ib += fs.tag[f] == TagIB ? fs.size[f] : 0;
  // 8 rings × 4 inter-node hops, each 2 (n-1)/n × 800 / 8 with n = 32.
  EXPECT_DOUBLE_EQ(ib, 8 * 4 * (2.0 * 31 / 32 * 800 / 8));
}

TEST(Workload, SyntheticRoutingIsNodeLimited) {
  MoeParams p;
  p.tokens_per_gpu = 64;
  p.experts = 256;
  p.zipf = 1.0;
  ExpertRouting r = synthetic_routing(p, 64, 8);
  const int per_node = 256 / 8;
  for (int t = 0; t < r.tokens; ++t) {
    std::set<int> e(r.ids.begin() + t * 8, r.ids.begin() + t * 8 + 8), nodes;
    ASSERT_EQ(e.size(), 8u);
    for (int x : e) nodes.insert(x / per_node);
    ASSERT_LE(nodes.size(), 4u);
  }
}

TEST(Workload, MoeFlowsDoNotDependOnTheThreadCount) {
  // Tokens are routed in parallel and, except with adaptive routing, so are the IB flows; either
  // way the flow sets (links, sizes, order) must be the same as with one thread. 1,024 GPUs: four
  // chunks of source GPUs, and 4 leaves per plane, so flows cross the spines.
  TopoSpec s = spec(TopoKind::MPFT, 64);
  s.planes = 8;
  Network n = build_network(s, 1024);
  MoeParams p;
  p.tokens_per_gpu = 16;
  p.zipf = 1.0;
  const int saved = num_threads();
  for (Routing rt : {Routing::ECMP, Routing::Adaptive, Routing::Spray}) {
    std::vector<MoeFlows> out;
    for (int t : {1, 2, 3}) {
      set_num_threads(t);
      Router r(n, rt);
      out.push_back(moe_flows(n, r, p));
    }
    for (size_t i = 1; i < out.size(); ++i) {
      EXPECT_EQ(out[i].dispatch.link, out[0].dispatch.link) << routing_name(rt);
      EXPECT_EQ(out[i].dispatch.coef, out[0].dispatch.coef) << routing_name(rt);
      EXPECT_EQ(out[i].dispatch.size, out[0].dispatch.size) << routing_name(rt);
      EXPECT_EQ(out[i].combine.link, out[0].combine.link) << routing_name(rt);
      EXPECT_EQ(out[i].combine.size, out[0].combine.size) << routing_name(rt);
      EXPECT_EQ(out[i].recv_imbalance, out[0].recv_imbalance) << routing_name(rt);
    }
    EXPECT_GT(out[0].dispatch.count(), 1024u * 8);
  }
  set_num_threads(saved);
}

TEST(Workload, MoeFlowsFromTraceMatchSynthetic) {
  TopoSpec s = spec(TopoKind::MPFT, 16);
  s.planes = 8;
  Network n = build_network(s, 32);
  MoeParams p;
  p.tokens_per_gpu = 32;
  p.experts = 64;
  ExpertRouting syn = synthetic_routing(p, 32, 8);
  Router r1(n, Routing::ECMP), r2(n, Routing::ECMP);
  MoeFlows a = moe_flows(n, r1, p), b = moe_flows(n, r2, p, &syn);
  EXPECT_EQ(a.dispatch.size, b.dispatch.size);
  EXPECT_EQ(a.combine.size, b.combine.size);
  double ib = 0;
  for (size_t f = 0; f < a.dispatch.count(); ++f) ib += a.dispatch.tag[f] == TagIB ? a.dispatch.size[f] : 0;
  EXPECT_DOUBLE_EQ(ib / 32, a.rdma_bytes_per_gpu);
  EXPECT_LE(a.remote_nodes_per_token, 3.0 + 1e-12);  // 4 nodes at most, one may be the source's own
  // Trace files: JSON and binary round trips.
  auto dir = std::filesystem::temp_directory_path() / "dsv3_net_trace_test";
  std::filesystem::create_directories(dir);
  for (bool bin : {false, true}) {
    std::string path = (dir / (bin ? "t.bin" : "t.json")).string();
    save_routing_trace(path, {syn, syn}, bin);
    auto back = load_routing_trace(path);
    ASSERT_EQ(back.size(), 2u);
    EXPECT_EQ(back[1].ids, syn.ids);
    EXPECT_EQ(back[0].experts, 64);
  }
  std::string bad = (dir / "bad.json").string();
  std::ofstream(bad) << R"({"format":"dsv3-routing-v1","experts":4,"topk":2,"layers":[[[0,9]]]})";
  EXPECT_THROW(load_routing_trace(bad), InputError);
  std::ofstream(bad, std::ios::trunc) << "DSV3RTE1xx";
  EXPECT_THROW(load_routing_trace(bad), InputError);
  std::filesystem::remove_all(dir);
}

TEST(Latency, ReproducesTable5) {
  LatencyModel ib;
  EXPECT_NEAR(ib.network(1), 2.8e-6, 1e-15);  // same leaf: one switch
  EXPECT_NEAR(ib.network(3), 3.7e-6, 1e-15);  // cross leaf: leaf, spine, leaf
  LatencyModel roce;
  roce.roce = true;
  EXPECT_NEAR(roce.network(1), 3.6e-6, 1e-15);
  EXPECT_NEAR(roce.network(3), 5.6e-6, 1e-15);
}

namespace {
struct CliRun {
  int rc;
  std::string out, err;
};
CliRun dsv3_run(const std::string& args) {
  // Per process and call: ctest runs the Cli tests in parallel, and a shared name let one test read
  // another's half-written output (an empty parse, seen once in CI).
  static int calls = 0;
  const auto dir = std::filesystem::temp_directory_path();
  const std::string tag = "dsv3_net_cli." + std::to_string(getpid()) + "." + std::to_string(++calls);
  const std::string o = (dir / (tag + ".out")).string(), e = (dir / (tag + ".err")).string();
  int st = std::system((std::string(DSV3_BINARY_DIR) + "/dsv3 " + args + " >" + o + " 2>" + e).c_str());
  auto slurp = [](const std::string& p) {
    std::ifstream f(p);
    return std::string(std::istreambuf_iterator<char>(f), {});
  };
  CliRun r{WEXITSTATUS(st), slurp(o), slurp(e)};
  std::filesystem::remove(o);
  std::filesystem::remove(e);
  return r;
}
}  // namespace

TEST(Cli, CostTableAndOneRow) {
  CliRun r = dsv3_run("net cost --preset isca25 --json");
  ASSERT_EQ(r.rc, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j.size(), 5u);
  EXPECT_EQ(j[2]["topology"], "FT3");
  EXPECT_EQ(j[2]["links"], 131072);
  for (auto& row : j)
    for (auto* k : {"topology", "endpoints", "switches", "links", "cost_musd", "cost_per_endpoint_kusd"})
      EXPECT_TRUE(row.contains(k)) << k;
  r = dsv3_run("net cost --topology df --radix 64 --df-p 16 --df-a 32 --df-h 16 --df-g 511 --json");
  ASSERT_EQ(r.rc, 0) << r.err;
  j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["switches"], 16352);
}

TEST(Cli, ImpossibleRequestsExitTwoNamingTheParameter) {
  CliRun r = dsv3_run("net cost --topology ft2 --radix 3 --json");
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("--radix"), std::string::npos) << r.err;
  r = dsv3_run("net cost --topology sf --q 28 --exact --json");
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("--q"), std::string::npos) << r.err;
  r = dsv3_run("net cost --topology ft2 --radix 64 --endpoints 4096");
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("--endpoints"), std::string::npos) << r.err;
  r = dsv3_run("net experiment E5 --no-write");
  EXPECT_EQ(r.rc, 2);
  // Found by a review: a hang (the fluid simulation retired no flow), a division by zero, and
  // values that passed the checks as inf or NaN. Each exits 2 naming the flag.
  for (const std::string bad : {"--batch-tol -0.5", "--batch-tol nan", "--bytes inf", "--nic-gbps inf",
                                "--fail-links nan", "--fail-links 2"}) {
    r = dsv3_run("net sim --topology ft2 --radix 4 --gpus 8 --workload perm " + bad);
    EXPECT_EQ(r.rc, 2) << bad << "\n" << r.err;
    EXPECT_NE(r.err.find(bad.substr(0, bad.find(' '))), std::string::npos) << bad << "\n" << r.err;
  }
  r = dsv3_run("net validate --gpus-per-node 0");
  EXPECT_EQ(r.rc, 2) << r.err;
  EXPECT_NE(r.err.find("--gpus-per-node"), std::string::npos) << r.err;
  r = dsv3_run("net sim --topology mpft --gpus 64 --workload a2a-pxn --routing spray --static --json");
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_GT(nlohmann::json::parse(r.out)["all_to_all"]["busbw_GBps"].get<double>(), 0);
}
