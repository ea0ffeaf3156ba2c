// Expert-parallel MoE layer on simulated ranks (threads of this process, the communicator the unit
// tests use): bytes moved by dispatch and combine per step against the formula, and tokens/s of
// forward + backward from 1 to 2 ranks. The 2-core CI machine has no spare cores, so the
// 2-rank run mostly measures the extra packing and copying (expect little; see docs/distributed.md).
//
//   dsv3_bench_dist [--tokens N] [--steps S]     → table + bench/results/dist.json
//
// --train: `dsv3 train`'s loop on the tiny preset (Trainer + TrainParallel) on a small generated
// corpus, per-rank micro-batch 4 × 64 tokens, the global batch fixed to 4 × ranks sequences:
//   dsv3_bench_dist --train [--steps S]                 → 1 process (grad-accum 2, 1 and 2 threads)
//   mpirun -np 2 dsv3_bench_dist --train [--steps S]    → 2 ranks: DP, DP + ZeRO-1, DP + EP 2
// Step times come from the trainer's own metrics (first step excluded). Writes
// bench/results/dist_train_<N>rank.json; ZeRO-1's optimizer bytes per rank are recorded too.
//
// Under mpirun without --train: the layer step on MPI ranks, forward and backward timed apart
// (medians over S steps after one warm-up), with the collectives and bytes of one step:
//   mpirun -np 2 dsv3_bench_dist [--tokens N] [--steps S] → bench/results/dist_layer_<P>rank_<N>tok.json
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "common/bench_util.h"
#include "core/rng.h"
#include "core/threads.h"
#include "dist/expert_parallel.h"
#include "dist/train_parallel.h"
#include "io/tokenizer.h"
#include "io/tokenizer_train.h"
#include "model/config.h"
#include "model/presets.h"
#include "train/data_prepare.h"

using namespace dsv3;

namespace {

ModelConfig bench_config() {
  // A V3-shaped layer at CPU scale: 16 experts, 4 picks, 1 shared expert.
  return parse_model_config(R"({
    "model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 256, "intermediate_size": 512,
    "moe_intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
    "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 1, "topk_group": 1,
    "routed_scaling_factor": 2.5, "norm_topk_prob": true, "first_k_dense_replace": 1,
    "num_nextn_predict_layers": 0, "max_position_embeddings": 64, "rope_theta": 10000.0,
    "tie_word_embeddings": false})",
                            "bench_dist");
}

struct RunResult {
  double seconds = 0;
  int64_t dispatch_bytes = 0, combine_bytes = 0, formula_dispatch = 0, formula_combine = 0;
  int64_t dispatch_rows = 0;
};

// P ranks × N tokens each, `steps` forward+backward steps, omp threads per rank.
RunResult run(const ModelConfig& cfg, int P, int64_t N, int steps, int threads_per_rank, bool fp8) {
  Backend& be = cpu_backend();
  Weights w = Weights::random(cfg, 1, 0.05f);
  ModelParams mp = bind_params(w);
  const MoeParams& p = mp.layers[1].moe;
  const ModelDims d = model_dims(cfg);
  const int64_t H = d.H, K = d.top_k;
  Tensor x = Tensor::empty(DType::F32, {P * N, H}), dout = Tensor::empty(DType::F32, {P * N, H});
  for (int64_t i = 0; i < x.numel(); ++i) {
    x.data<float>()[i] = rng_normal(2, 0, uint64_t(i));
    dout.data<float>()[i] = 1e-3f * rng_normal(3, 0, uint64_t(i));
  }
  auto world = make_thread_world(P);
  std::vector<RunResult> per(static_cast<size_t>(P));
  std::vector<std::thread> th;
  for (int r = 0; r < P; ++r)
    th.emplace_back([&, r] {
      set_num_threads(threads_per_rank);
      EpOptions o;
      o.fp8_dispatch = fp8;
      ExpertParallelMoe ep(*world[size_t(r)], d, o);
      Grads g(cfg);
      world[size_t(r)]->barrier();
      const double t0 = bench::now_s();
      for (int s = 0; s < steps; ++s) {
        EpMoeActs a;
        ep.forward(be, p, x.rows(r * N, (r + 1) * N), a);
        Tensor dx = be.alloc(DType::F32, {N, H});
        ep.backward(be, p, g.p.layers[1].moe, a, dout.rows(r * N, (r + 1) * N), Tensor(), dx, false);
        if (s == 0) {
          // Formula: one row per (token, other rank holding ≥ 1 of its experts), each
          // 8 + 8K bytes of metadata plus the payload (F32 4H, or FP8 H + 4⌈H/128⌉); combine
          // returns 4H of partial sums per row and no metadata (the direct path: the source knows
          // which tokens it sent where).
          const Tensor ids = be.to_host(a.local.ids);
          int64_t rows = 0;
          for (int64_t t = 0; t < N; ++t) {
            std::vector<char> hit(static_cast<size_t>(P), 0);
            for (int64_t j = 0; j < K; ++j) hit[size_t(ep.owner(ids.data<int32_t>()[t * K + j]))] = 1;
            for (int q = 0; q < P; ++q) rows += (hit[size_t(q)] && q != r) ? 1 : 0;
          }
          const int64_t meta = 8 + 8 * K, payload = fp8 ? H + 4 * ((H + 127) / 128) : 4 * H;
          per[size_t(r)].formula_dispatch = rows * (meta + payload);
          per[size_t(r)].formula_combine = rows * 4 * H;  // rows come back from those ranks
          per[size_t(r)].dispatch_bytes = ep.stats().dispatch_bytes;
          per[size_t(r)].combine_bytes = ep.stats().combine_bytes;
          per[size_t(r)].dispatch_rows = rows;
        }
      }
      world[size_t(r)]->barrier();
      per[size_t(r)].seconds = bench::now_s() - t0;
    });
  for (auto& t : th) t.join();
  RunResult tot;
  for (auto& q : per) {
    tot.seconds = std::max(tot.seconds, q.seconds);
    tot.dispatch_bytes += q.dispatch_bytes;
    tot.combine_bytes += q.combine_bytes;
    tot.formula_dispatch += q.formula_dispatch;
    tot.formula_combine += q.formula_combine;
    tot.dispatch_rows += q.dispatch_rows;
  }
  return tot;
}

// ---- under mpirun: the layer step on MPI ranks (one process per rank, 1 thread each) ------------

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// Each rank times its forward and backward separately (barriers around each, so the slowest rank
// sets the time) and counts the transport calls and bytes of one step.
int layer_mpi_bench(int64_t N, int steps) {
  std::unique_ptr<Communicator> world = make_world_communicator();
  CountingCommunicator c(*world);
  const int P = c.size(), r = c.rank();
  set_num_threads(1);
  const ModelConfig cfg = bench_config();
  Backend& be = cpu_backend();
  Weights w = Weights::random(cfg, 1, 0.05f);
  ModelParams mp = bind_params(w);
  const MoeParams& p = mp.layers[1].moe;
  const ModelDims d = model_dims(cfg);
  const int64_t H = d.H;
  Tensor x = Tensor::empty(DType::F32, {N, H}), dout = Tensor::empty(DType::F32, {N, H});
  for (int64_t i = 0; i < x.numel(); ++i) {  // rank r's rows of the thread benchmark's global batch
    x.data<float>()[i] = rng_normal(2, 0, uint64_t(r * N * H + i));
    dout.data<float>()[i] = 1e-3f * rng_normal(3, 0, uint64_t(r * N * H + i));
  }
  ExpertParallelMoe ep(c, d);
  Grads g(cfg);
  std::vector<double> fwd, bwd;
  CountingCommunicator::Counts calls_fwd, calls_bwd;
  EpStats st;
  for (int s = 0; s <= steps; ++s) {  // step 0: warm-up
    EpMoeActs a;
    Tensor dx = be.alloc(DType::F32, {N, H});
    ep.reset_stats();
    world->barrier();
    c.reset_counts();
    const double t0 = bench::now_s();
    ep.forward(be, p, x, a);
    const CountingCommunicator::Counts cf = c.counts();
    world->barrier();
    const double t1 = bench::now_s();
    c.reset_counts();
    ep.backward(be, p, g.p.layers[1].moe, a, dout, Tensor(), dx, false);
    const CountingCommunicator::Counts cb = c.counts();
    world->barrier();
    const double t2 = bench::now_s();
    if (s == 0) continue;
    fwd.push_back(1e3 * (t1 - t0));
    bwd.push_back(1e3 * (t2 - t1));
    calls_fwd = cf;
    calls_bwd = cb;
    st = ep.stats();
  }
  std::vector<double> step(fwd.size());
  for (size_t i = 0; i < fwd.size(); ++i) step[i] = fwd[i] + bwd[i];
  if (r != 0) return 0;
  nlohmann::json out;
  out["config"] = {{"hidden_size", 256}, {"n_routed_experts", 16}, {"num_experts_per_tok", 4},
                   {"moe_intermediate_size", 128}, {"tokens_per_rank", N}, {"steps", steps}, {"ranks", P},
                   {"transport", c.name()}, {"threads_per_rank", 1}};
  out["rank0"] = {{"forward_ms_median", median(fwd)}, {"backward_ms_median", median(bwd)},
                  {"step_ms_median", median(step)}, {"tokens_per_s", double(P * N) / (median(step) / 1e3)},
                  {"all_to_all_v_forward", calls_fwd.all_to_all_v}, {"all_to_all_v_backward", calls_bwd.all_to_all_v},
                  {"collectives_forward", calls_fwd.total()}, {"collectives_backward", calls_bwd.total()},
                  {"dispatch_bytes", st.dispatch_bytes}, {"combine_bytes", st.combine_bytes},
                  {"backward_bytes", st.backward_bytes}};
  std::printf("%d ranks (%s), %lld tokens/rank, %d steps, rank 0, medians:\n", P, c.name().c_str(), (long long)N, steps);
  std::printf("  forward %.3f ms  backward %.3f ms  step %.3f ms  (%.0f tokens/s)\n", median(fwd), median(bwd),
              median(step), double(P * N) / (median(step) / 1e3));
  std::printf("  collectives: forward %lld, backward %lld;  bytes sent: dispatch %lld, combine %lld, backward %lld\n",
              (long long)calls_fwd.total(), (long long)calls_bwd.total(), (long long)st.dispatch_bytes,
              (long long)st.combine_bytes, (long long)st.backward_bytes);
  std::printf("wrote %s\n", bench::write_result(cat("dist_layer_", P, "rank_", N, "tok"), out).c_str());
  return 0;
}

// ---- --train: the whole training loop on 1 or several ranks ----------------------------------

namespace fs = std::filesystem;

// A generated corpus (BPE of 512 ids) prepared by rank 0 into a directory every rank reads.
std::string prepare_corpus(Communicator& c, const std::string& dir) {
  if (c.rank() == 0) {
    fs::remove_all(dir);
    fs::create_directories(dir);
    const char* words[] = {"the", "cat", "sat", "on", "mat", "and", "dog", "ran", "far", "away", "bird", "sang",
                           "in", "a", "tree", "while", "fox", "jumps", "over", "lazy", "river", "stone"};
    std::ofstream f(dir + "/text.txt");
    for (uint64_t i = 0; i < 60000; ++i) {
      const uint64_t w = uint64_t(std::fabs(rng_normal(11, 0, i)) * 7.0) % 22;
      f << words[w] << ((i % 17 == 16) ? ".\n" : " ") << ((i % 340 == 339) ? "\n" : "");  // documents
    }
    f.close();
    train_bpe_files({dir + "/text.txt"}, 512, dir + "/tokenizer.json");
    Tokenizer tok = Tokenizer::load(dir + "/tokenizer.json");
    PrepareOptions p;
    p.tokenizer_path = dir + "/tokenizer.json";
    p.output_dir = dir + "/data";
    p.inputs = {dir + "/text.txt"};
    p.val_fraction = 0.05;
    prepare_token_dataset(tok, p);
  }
  c.barrier();
  return dir + "/data";
}

struct TrainRow {
  std::string name;
  int grad_accum, threads;
  TrainParallelOptions par;
  bool parallel;
};

int train_bench(int steps) {
  std::unique_ptr<Communicator> world = make_world_communicator();
  Communicator& c = *world;
  const int P = c.size();
  std::string dir = c.rank() == 0 ? (fs::temp_directory_path() / cat("dsv3_bench_dist_", ::getpid())).string() : "";
  int64_t n = int64_t(dir.size());
  c.broadcast(&n, sizeof n, 0);
  dir.resize(size_t(n));
  c.broadcast(dir.data(), n, 0);
  const std::string data = prepare_corpus(c, dir);
  const ModelConfig cfg = preset_config("tiny");
  std::vector<TrainRow> rows;
  if (P == 1) {
    rows = {{"1 process, 1 thread, grad-accum 2", 2, 1, {}, false},
            {"1 process, 2 threads, grad-accum 2", 2, 2, {}, false}};
  } else {
    TrainParallelOptions z, ep;
    z.zero1 = true;
    ep.ep = P;
    rows = {{cat(P, " ranks, data parallel"), 1, 1, {}, true},
            {cat(P, " ranks, data parallel + ZeRO-1"), 1, 1, z, true},
            {cat(P, " ranks, expert parallel ", P), 1, 1, ep, true}};
  }
  nlohmann::json out;
  out["config"] = {{"preset", "tiny"}, {"batch_per_rank", 4}, {"seq_len", 64}, {"global_batch", 4 * (P == 1 ? 2 : P)},
                   {"steps", steps}, {"ranks", P}};
  out["runs"] = nlohmann::json::array();
  if (c.rank() == 0) std::printf("%-40s %10s %10s %16s %16s\n", "run", "ms/step", "tokens/s", "moments B/rank", "unsharded B");
  for (size_t ri = 0; ri < rows.size(); ++ri) {
    const TrainRow& r = rows[ri];
    set_num_threads(r.threads);
    TrainOptions o;
    o.steps = steps;
    o.batch = 4;
    o.seq_len = 64;
    o.grad_accum = r.grad_accum;
    o.data_dir = data;
    o.out_dir = cat(dir, "/run", ri);
    o.eval_every = 0;
    o.checkpoint_every = 0;
    o.plot = false;
    o.quiet = true;
    o.resume = false;
    std::unique_ptr<TrainParallel> par = r.parallel ? make_train_parallel(c, r.par, cfg) : nullptr;
    int64_t moments = 0, full = 0;
    {
      Trainer t(cfg, o, par.get());
      t.run();
      if (par)
        if (const ZeroAdamW* z = train_parallel_info(*par).zero) moments = z->moment_bytes(), full = z->full_moment_bytes();
    }
    if (c.rank() != 0) continue;
    // The trainer's own step times, without the first (warm-up) step.
    std::ifstream f(o.out_dir + "/metrics.jsonl");
    std::vector<double> ms;
    for (std::string line; std::getline(f, line);) ms.push_back(nlohmann::json::parse(line)["ms"].get<double>());
    double mean = 0;
    for (size_t i = 1; i < ms.size(); ++i) mean += ms[i] / double(ms.size() - 1);
    const double tps = double(4 * 64 * r.grad_accum * P) / (mean / 1e3);
    std::printf("%-40s %10.1f %10.0f %16lld %16lld\n", r.name.c_str(), mean, tps, (long long)moments, (long long)full);
    out["runs"].push_back({{"name", r.name}, {"ranks", P}, {"threads_per_rank", r.threads}, {"grad_accum", r.grad_accum},
                           {"ep", r.par.ep}, {"zero1", r.par.zero1}, {"ms_per_step", mean}, {"tokens_per_s", tps},
                           {"optimizer_moment_bytes_per_rank", moments}, {"optimizer_moment_bytes_unsharded", full}});
  }
  if (c.rank() == 0) {
    std::printf("wrote %s\n", bench::write_result(cat("dist_train_", P, "rank"), out).c_str());
    fs::remove_all(dir);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t N = 512;
  int steps = 5;
  bool train = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--train")) train = true;
    else if (i + 1 < argc && !std::strcmp(argv[i], "--tokens")) N = std::stoll(argv[++i]);
    else if (i + 1 < argc && !std::strcmp(argv[i], "--steps")) steps = std::stoi(argv[++i]);
  }
  if (train) return train_bench(std::max(steps, 2));
  if (launched_by_mpi()) return layer_mpi_bench(N, std::max(steps, 1));
  const ModelConfig cfg = bench_config();
  struct Row {
    std::string name;
    int P, threads;
    bool fp8;
  };
  const std::vector<Row> rows{{"1 rank, 1 thread", 1, 1, false},
                              {"1 rank, 2 threads", 1, 2, false},
                              {"2 ranks, 1 thread each", 2, 1, false},
                              {"2 ranks, FP8 dispatch", 2, 1, true},
                              {"4 ranks (oversubscribed)", 4, 1, false}};
  nlohmann::json out;
  out["config"] = {{"hidden_size", 256}, {"n_routed_experts", 16}, {"num_experts_per_tok", 4},
                   {"moe_intermediate_size", 128}, {"tokens_per_rank", N}, {"steps", steps}};
  out["runs"] = nlohmann::json::array();
  std::printf("%-26s %12s %14s %14s %14s %14s\n", "run", "tokens/s", "dispatch B", "formula B", "combine B",
              "formula B");
  double base = 0;
  for (const Row& r : rows) {
    run(cfg, r.P, N, 1, r.threads, r.fp8);  // warm-up
    const RunResult res = run(cfg, r.P, N, steps, r.threads, r.fp8);
    const double tps = double(r.P * N * steps) / res.seconds;
    if (base == 0) base = tps;
    std::printf("%-26s %12.0f %14lld %14lld %14lld %14lld\n", r.name.c_str(), tps, (long long)res.dispatch_bytes,
                (long long)res.formula_dispatch, (long long)res.combine_bytes, (long long)res.formula_combine);
    out["runs"].push_back({{"name", r.name}, {"ranks", r.P}, {"threads_per_rank", r.threads}, {"fp8_dispatch", r.fp8},
                           {"tokens_per_s", tps}, {"speedup_vs_1rank_1thread", tps / base},
                           {"dispatch_bytes_per_step", res.dispatch_bytes}, {"dispatch_bytes_formula", res.formula_dispatch},
                           {"combine_bytes_per_step", res.combine_bytes}, {"combine_bytes_formula", res.formula_combine},
                           {"dispatch_rows_per_step", res.dispatch_rows}});
  }
  std::printf("wrote %s\n", bench::write_result("dist", out).c_str());
  return 0;
}
