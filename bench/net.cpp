// Network simulator speed: MPFT (k = 64, 8 planes) from 1K to 16K GPUs.
//   1. NCCL-style all-to-all with PXN, ECMP: build the flows, one static max-min solve.
//   2. Skewed MoE dispatch + combine (DeepEP normal kernels, 4,096 tokens/GPU, Zipf 1.0 expert
//      popularity): event-driven fluid simulation of both phases.
// Usage: dsv3_bench_net [max_gpus (16384)] [threads (2)] [moe_max_gpus (= max_gpus)]. Prints a table and writes
// bench/results/net.json. The machine is shared, so the load average is recorded beside the times.
#include <cstdio>
#include <ctime>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>

#include "common/bench_util.h"
#include "core/threads.h"
#include "net/maxmin.h"
#include "net/report.h"
#include "net/sim.h"
#include "net/workload.h"

using namespace dsv3;
using namespace dsv3::net;

namespace {

std::string loadavg() {
  std::ifstream f("/proc/loadavg");
  std::string a, b, c;
  f >> a >> b >> c;
  return a + " " + b + " " + c;
}

double peak_rss_gb() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::atof(line.c_str() + 6) / 1024.0 / 1024.0;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int max_gpus = argc > 1 ? std::atoi(argv[1]) : 16384;
  int threads = argc > 2 ? std::atoi(argv[2]) : 2;
  int moe_max = argc > 3 ? std::atoi(argv[3]) : max_gpus;
  set_num_threads(threads);
  nlohmann::json res;
  res["config"] = {{"topology", "MPFT k=64 P=8"}, {"threads", threads}, {"a2a", "PXN, ECMP, static max-min"},
                   {"moe", "4096 tokens/GPU, hidden 7168, top-8, 4 nodes/token, zipf 1.0, dynamic, batch_tol 0.01"}};
  res["load_before"] = loadavg();
  res["rows"] = nlohmann::json::array();
  Table t;
  t.headers = {"GPUs", "a2a flows", "build s", "solve s", "solve cpu s", "rounds", "moe flows", "moe gen s",
               "moe sim s", "sim cpu s", "events", "imbalance", "load avg"};
  for (int g = 1024; g <= max_gpus; g *= 2) {
    TopoSpec s;
    s.kind = TopoKind::MPFT;
    s.radix = 64;
    s.planes = 8;
    Network n = build_network(s, g);
    double t0 = bench::now_s();
    Router r(n, Routing::ECMP);
    FlowSet fs = all_to_all(n, r, 1e6, true);
    double t1 = bench::now_s();
    MaxMinStats st;
    std::clock_t c0 = std::clock();
    auto rate = max_min_rates(fs, capacities(n), &st);
    double t2 = bench::now_s(), cpu_solve = double(std::clock() - c0) / CLOCKS_PER_SEC;
    size_t a2a_flows = fs.count();
    fs = FlowSet();
    if (g > moe_max) {
      std::string load = loadavg();
      t.add({std::to_string(g), fmt_int((long long)a2a_flows), fmt(t1 - t0, 2), fmt(t2 - t1, 2), fmt(cpu_solve, 2),
             fmt_int(st.rounds), "-", "-", "-", "-", "-", "-", load});
      res["rows"].push_back({{"gpus", g}, {"a2a_flows", a2a_flows}, {"a2a_build_s", t1 - t0}, {"a2a_solve_s", t2 - t1},
                             {"a2a_solve_cpu_s", cpu_solve},
                             {"a2a_rounds", st.rounds}, {"loadavg", load}, {"peak_rss_gb", peak_rss_gb()}});
      std::cerr << "gpus " << g << " done (a2a solve " << fmt(t2 - t1, 2) << " s, moe skipped)\n";
      continue;
    }
    MoeParams mp;
    mp.zipf = 1.0;
    Router r2(n, Routing::ECMP);
    MoeFlows mf = moe_flows(n, r2, mp);
    double t3 = bench::now_s();
    SimOptions so;
    so.batch_tol = 1e-2;
    std::clock_t c1 = std::clock();
    SimResult d = simulate_fluid(mf.dispatch, capacities(n), so);
    SimResult c = simulate_fluid(mf.combine, capacities(n), so);
    double t4 = bench::now_s(), cpu_sim = double(std::clock() - c1) / CLOCKS_PER_SEC;
    std::string load = loadavg();
    size_t moe_flows_n = mf.dispatch.count() + mf.combine.count();
    t.add({std::to_string(g), fmt_int((long long)a2a_flows), fmt(t1 - t0, 2), fmt(t2 - t1, 2), fmt(cpu_solve, 2),
           fmt_int(st.rounds), fmt_int((long long)moe_flows_n), fmt(t3 - t2, 2), fmt(t4 - t3, 2), fmt(cpu_sim, 2),
           std::to_string(d.events + c.events),
           fmt(mf.recv_imbalance, 2), load});
    res["rows"].push_back({{"gpus", g},
                           {"a2a_flows", a2a_flows},
                           {"a2a_build_s", t1 - t0},
                           {"a2a_solve_s", t2 - t1},
                           {"a2a_solve_cpu_s", cpu_solve},
                           {"a2a_rounds", st.rounds},
                           {"moe_flows", moe_flows_n},
                           {"moe_generate_s", t3 - t2},
                           {"moe_simulate_s", t4 - t3},
                           {"moe_simulate_cpu_s", cpu_sim},
                           {"moe_events", d.events + c.events},
                           {"moe_dispatch_ms", d.makespan * 1e3},
                           {"moe_combine_ms", c.makespan * 1e3},
                           {"moe_recv_imbalance", mf.recv_imbalance},
                           {"loadavg", load},
                           {"peak_rss_gb", peak_rss_gb()}});
    std::cerr << "gpus " << g << " done (a2a solve " << fmt(t2 - t1, 2) << " s, moe " << fmt(t4 - t2, 2) << " s)\n";
  }
  res["peak_rss_gb"] = peak_rss_gb();
  res["load_after"] = loadavg();
  std::cout << t.text() << "peak RSS " << fmt(peak_rss_gb(), 2) << " GB\n";
  std::cout << "wrote " << bench::write_result("net", res) << "\n";
  return 0;
}
