// Network simulator speed: MPFT (k = 64, 8 planes) from 1K to 16K GPUs.
//   1. NCCL-style all-to-all with PXN, ECMP: build the flows, one static max-min solve.
//   2. Skewed MoE dispatch + combine (DeepEP normal kernels, 4,096 tokens/GPU, Zipf 1.0 expert
//      popularity): token routing and flows, then the event-driven fluid simulation of both phases.
// Usage: dsv3_bench_net [max_gpus (16384)] [threads (2)] [moe_max_gpus (= max_gpus)]. Prints a table
// and writes bench/results/net.json. Every step reports wall seconds and CPU seconds (user + sys of
// the process, all threads); the machine may be shared, so the load average is recorded too.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <sys/resource.h>

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

double cpu_s() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return (double)u.ru_utime.tv_sec + u.ru_utime.tv_usec * 1e-6 + (double)u.ru_stime.tv_sec + u.ru_stime.tv_usec * 1e-6;
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
  t.headers = {"GPUs",       "a2a flows", "build s (cpu)", "solve s (cpu)", "levels", "moe flows", "moe gen s (cpu)",
               "moe sim s (cpu)", "events", "imbalance", "load avg"};
  auto pair = [](double w, double c) { return fmt(w, 2) + " (" + fmt(c, 2) + ")"; };
  for (int g = 1024; g <= max_gpus; g *= 2) {
    TopoSpec s;
    s.kind = TopoKind::MPFT;
    s.radix = 64;
    s.planes = 8;
    Network n = build_network(s, g);
    double t0 = bench::now_s(), c0 = cpu_s();
    Router r(n, Routing::ECMP);
    FlowSet fs = all_to_all(n, r, 1e6, true);
    double t1 = bench::now_s(), c1 = cpu_s();
    MaxMinStats st;
    auto rate = max_min_rates(fs, capacities(n), &st);
    double t2 = bench::now_s(), c2 = cpu_s();
    size_t a2a_flows = fs.count();
    fs = FlowSet();
    nlohmann::json row{{"gpus", g},
                       {"a2a_flows", a2a_flows},
                       {"a2a_build_s", t1 - t0},
                       {"a2a_build_cpu_s", c1 - c0},
                       {"a2a_solve_s", t2 - t1},
                       {"a2a_solve_cpu_s", c2 - c1},
                       {"a2a_rounds", st.rounds}};
    std::vector<std::string> cells = {std::to_string(g), fmt_int((long long)a2a_flows), pair(t1 - t0, c1 - c0),
                                      pair(t2 - t1, c2 - c1), fmt_int(st.rounds)};
    if (g <= moe_max) {
      MoeParams mp;
      mp.zipf = 1.0;
      Router r2(n, Routing::ECMP);
      double t3 = bench::now_s(), c3 = cpu_s();
      MoeFlows mf = moe_flows(n, r2, mp);
      double t4 = bench::now_s(), c4 = cpu_s();
      SimOptions so;
      so.batch_tol = 1e-2;
      SimResult d = simulate_fluid(mf.dispatch, capacities(n), so);
      SimResult c = simulate_fluid(mf.combine, capacities(n), so);
      double t5 = bench::now_s(), c5 = cpu_s();
      size_t moe_flows_n = mf.dispatch.count() + mf.combine.count();
      cells.insert(cells.end(), {fmt_int((long long)moe_flows_n), pair(t4 - t3, c4 - c3), pair(t5 - t4, c5 - c4),
                                 std::to_string(d.events + c.events), fmt(mf.recv_imbalance, 2)});
      row.update({{"moe_flows", moe_flows_n},
                  {"moe_generate_s", t4 - t3},
                  {"moe_generate_cpu_s", c4 - c3},
                  {"moe_simulate_s", t5 - t4},
                  {"moe_simulate_cpu_s", c5 - c4},
                  {"moe_events", d.events + c.events},
                  {"moe_dispatch_ms", d.makespan * 1e3},
                  {"moe_combine_ms", c.makespan * 1e3},
                  {"moe_recv_imbalance", mf.recv_imbalance}});
    } else {
      cells.insert(cells.end(), {"-", "-", "-", "-", "-"});
    }
    std::string load = loadavg();
    cells.push_back(load);
    t.add(cells);
    row.update({{"loadavg", load}, {"peak_rss_gb", peak_rss_gb()}});
    res["rows"].push_back(row);
    std::cerr << "gpus " << g << " done: " << row.dump() << "\n";
  }
  res["peak_rss_gb"] = peak_rss_gb();
  res["load_after"] = loadavg();
  std::cout << t.text() << "peak RSS " << fmt(peak_rss_gb(), 2) << " GB\n";
  std::cout << "wrote " << bench::write_result("net", res) << "\n";
  return 0;
}
