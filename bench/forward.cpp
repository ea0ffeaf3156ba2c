// Prefill speed of the whole model forward on the CPU: tokens/s of the `tiny` and `bench-0.7b`
// presets with random F32 weights, on 2 threads by default, and the achieved FLOP rate as a fraction
// of what a bare OpenBLAS sgemm reaches on the same machine in the same run (the baseline).
//   dsv3_bench_forward [--quick] [--threads N] [--json PATH]
// (--json writes the result there instead of bench/results/forward.json, e.g. when run on another
// machine from a copy of the tree.)
// FLOPs are counted analytically (2 per multiply-add) over every linear (router gate and lm_head
// included) and the causal attention products; norms, RoPE, softmax and data movement add time
// but are not counted. Writes bench/results/forward.json.
#include <cblas.h>
#include <sched.h>

#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "backend/ops.h"
#include "common/bench_util.h"
#include "core/rng.h"
#include "core/threads.h"
#include "model/model.h"
#include "model/presets.h"
#include "model/weights.h"

using namespace dsv3;

namespace {

// Multiply-adds per token of one decoder layer i for a causal sequence of T tokens.
double layer_macs(const ModelConfig& c, int64_t i, int64_t T) {
  const double H = double(c.hidden_size), nh = double(c.num_attention_heads), qk = double(c.qk_head_dim());
  double m = 0;
  if (c.q_lora_rank)
    m += H * double(*c.q_lora_rank) + double(*c.q_lora_rank) * nh * qk;
  else
    m += H * nh * qk;
  m += H * double(c.kv_lora_rank + c.qk_rope_head_dim);
  m += double(c.kv_lora_rank) * nh * double(c.qk_nope_head_dim + c.v_head_dim);
  m += nh * double(c.v_head_dim) * H;
  // Causal: query t sees t+1 keys; averaged over the sequence, (T+1)/2 keys per query.
  m += double(T + 1) / 2.0 * nh * (qk + double(c.v_head_dim));
  if (c.is_moe_layer(i)) {
    const double I = double(c.moe_intermediate_size);
    m += H * double(c.n_routed_experts);
    m += double(c.num_experts_per_tok + c.n_shared_experts) * 3.0 * H * I;
  } else {
    m += 3.0 * H * double(c.intermediate_size);
  }
  return m;
}

double flops_per_token(const ModelConfig& c, int64_t T) {
  double m = double(c.hidden_size) * double(c.vocab_size);  // lm_head
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) m += layer_macs(c, i, T);
  return 2.0 * m;
}

// GFLOP/s of cblas_sgemm C[n,n] = A·Bᵀ, the baseline for "what the BLAS reaches here".
double sgemm_gflops(int64_t n, int reps) {
  std::vector<float> a(size_t(n * n)), b(size_t(n * n)), c(size_t(n * n));
  for (size_t i = 0; i < a.size(); ++i) {
    a[i] = rng_normal(3, 1, i);
    b[i] = rng_normal(3, 2, i);
  }
  openblas_set_num_threads(num_threads());
  auto run = [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n), int(n), int(n), 1.0f, a.data(), int(n), b.data(),
                int(n), 0.0f, c.data(), int(n));
  };
  run();
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    double t0 = bench::now_s();
    run();
    best = std::min(best, bench::now_s() - t0);
  }
  return 2.0 * double(n) * double(n) * double(n) / best / 1e9;
}

struct Case {
  std::string preset;
  int64_t T;
  int reps;
};

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  int threads = 2;
  std::string json_path;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) quick = true;
    else if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (std::strcmp(argv[i], "--json") == 0 && i + 1 < argc) json_path = argv[++i];
    else {
      std::fprintf(stderr, "usage: dsv3_bench_forward [--quick] [--threads N] [--json PATH]\n");
      return 2;
    }
  }
  set_num_threads(threads);

  // The baseline is measured before and after the model runs; the better figure is used, so a
  // slow first measurement (cold machine, clock ramp) cannot flatter the ratio.
  const int64_t gemm_n = quick ? 512 : 2048;
  const double blas_before = sgemm_gflops(gemm_n, quick ? 2 : 5);
  std::printf("threads %d; OpenBLAS sgemm %lld^3 (A·Bᵀ) before: %.1f GFLOP/s\n\n", threads, (long long)gemm_n,
              blas_before);
  std::printf("%-12s %6s %10s %10s %12s %10s\n", "preset", "T", "params(M)", "s/forward", "tokens/s", "GFLOP/s");

  std::vector<Case> cases = {{"tiny", quick ? 128 : 512, quick ? 2 : 5}, {"bench-0.7b", quick ? 64 : 512, quick ? 1 : 3}};
  nlohmann::json rows = nlohmann::json::array();
  for (const Case& cs : cases) {
    const ModelConfig cfg = preset_config(cs.preset);
    const Weights w = Weights::random(cfg, 1234, 0.02f);
    Model m(w, cpu_backend());
    std::vector<int32_t> ids(size_t(cs.T));
    for (int64_t i = 0; i < cs.T; ++i) ids[size_t(i)] = int32_t(rng_u64(5, 0, uint64_t(i)) % uint64_t(cfg.vocab_size));
    ForwardOptions fo;
    fo.mtp = false;  // prefill: the main model only
    m.forward(ids, 1, cs.T, fo);  // warm-up (page in weights, grow scratch)
    double best = 1e30, total = 0;
    for (int r = 0; r < cs.reps; ++r) {
      double t0 = bench::now_s();
      m.forward(ids, 1, cs.T, fo);
      double dt = bench::now_s() - t0;
      best = std::min(best, dt);
      total += dt;
    }
    int64_t params = 0;
    for (const Param& p : w.params()) params += p.w.numel();
    const double flop = flops_per_token(cfg, cs.T) * double(cs.T);
    const double gflops = flop / best / 1e9, tps = double(cs.T) / best;
    std::printf("%-12s %6lld %10.1f %10.3f %12.1f %10.1f\n", cs.preset.c_str(), (long long)cs.T,
                double(params) / 1e6, best, tps, gflops);
    rows.push_back({{"preset", cs.preset},
                    {"tokens", cs.T},
                    {"params", params},
                    {"reps", cs.reps},
                    {"best_s", best},
                    {"mean_s", total / cs.reps},
                    {"tokens_per_s", tps},
                    {"gflop_per_forward", flop / 1e9},
                    {"gflops", gflops}});
  }
  const double blas_after = sgemm_gflops(gemm_n, quick ? 2 : 5);
  const double blas = std::max(blas_before, blas_after);
  for (auto& r : rows) r["fraction_of_sgemm"] = r["gflops"].get<double>() / blas;
  std::printf("\nOpenBLAS sgemm after: %.1f GFLOP/s; baseline = max = %.1f GFLOP/s\n", blas_after, blas);
  for (const auto& r : rows)
    std::printf("  %-12s %.1f%% of the sgemm baseline\n", r["preset"].get<std::string>().c_str(),
                100.0 * r["fraction_of_sgemm"].get<double>());
  const char* wait = std::getenv("OMP_WAIT_POLICY");
  nlohmann::json result = {{"benchmark", "forward"},
                           {"what", "prefill (main model, no MTP) with random F32 weights; FLOPs counted "
                                    "analytically over linears and causal attention products"},
                           {"threads", threads},
                           {"quick", quick},
                           {"omp_wait_policy", wait ? wait : "(unset)"},
                           {"sgemm_baseline",
                            {{"shape", cat(gemm_n, "^3 A*B^T")},
                             {"gflops", blas},
                             {"gflops_before", blas_before},
                             {"gflops_after", blas_after}}},
                           {"cases", rows}};
  // Other processes on a shared machine distort every figure; record how busy it was.
  double load[3] = {0, 0, 0};
  if (getloadavg(load, 3) == 3) result["load_average_1_5_15"] = {load[0], load[1], load[2]};
  cpu_set_t allowed;
  if (sched_getaffinity(0, sizeof allowed, &allowed) == 0) result["cpus_allowed"] = CPU_COUNT(&allowed);
  if (!json_path.empty()) {
    nlohmann::json out = bench::provenance();
    out.update(result);
    std::ofstream(json_path) << out.dump(2) << "\n";
    std::printf("\nwrote %s\n", json_path.c_str());
  } else if (!quick) {
    std::printf("\nwrote %s\n", bench::write_result("forward", result).c_str());
  }
  return 0;
}
