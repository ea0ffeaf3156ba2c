// Training throughput on the GPU (bench/gpu.sh runs it on the H200): the bench-0.7b preset, B = 8,
// T = 2048, random weights and tokens, forward + loss + backward + AdamW entirely on the CUDA
// backend, timed with the device synchronised, in each of --precisions (default fp32,bf16,fp8) as
// `dsv3 train --device cuda --precision P` runs it: FP32 master weights, gradients and moments
// (--moments bf16: the moments in BF16, V3's recipe and dsv3 train's option); bf16/fp8 read BF16
// weight copies that the optimizer's pass rewrites, run the eligible linear layers through the
// GPU's linear_lowp (BF16 tensor cores / cuBLASLt block-scaled FP8) and the attention core on BF16
// tensor cores. FLOPs per token are the ones transformers' baseline
// (tools/hf_gpu_bench.py) is credited with: 6·N_mm(active) + causal attention, no MTP (its MTP
// modules are skipped here too, so both sides do the same work). With --hf FILE (that script's
// JSON from the same machine) it records our BF16 speed over transformers' BF16
// (train_speedup_vs_hf_bf16) and train_fp8_over_bf16. Per precision it also prints where a step's
// time goes: phases, the attention core per layer, and the linear layers timed alone at the
// model's shapes. Writes bench/results/gpu_train.json (top-level fields: the fp32 run, as before).
#include <cstdio>
#include <cstdlib>
#include <string>

#include "common/bench_util.h"

#ifndef DSV3_HAVE_CUDA
int main() {
  std::puts("gpu_train: built without CUDA");
  return 1;
}
#else
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <chrono>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <sstream>
#include <tuple>

#include "backend/cuda/attention_bf16.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/linear_lowp.h"
#include "common/blocking_calls.h"
#include "common/host_profile.h"
#include "backend/fp8.h"
#include "model/loss.h"
#include "model/model.h"
#include "model/model_stats.h"
#include "model/output_head.h"
#include "model/presets.h"
#include "train/optimizer.h"

using namespace dsv3;

namespace {

using Clock = std::chrono::steady_clock;
double secs(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

void set_precision(const std::string& prec) {
  LinearPrecision& lp = linear_precision();
  lp = LinearPrecision{};
  if (prec == "bf16") lp.mode = LinearPrecisionMode::Bf16;
  if (prec == "fp8") lp.mode = LinearPrecisionMode::Fp8;
  cuda_set_attention_bf16(prec != "fp32");
}

// The attention core alone at the model's shape (MLA heads: qk 192, v 128), forward and backward,
// the backward reading the forward's kept operands as in a training step.
std::pair<double, double> time_attention(CudaBackend& be, const ModelConfig& cfg, int64_t B, int64_t T) {
  const int64_t H = cfg.num_attention_heads, dq = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, dv = cfg.v_head_dim;
  Tensor q = be.alloc(DType::F32, {B, T, H, dq}), k = be.alloc(DType::F32, {B, T, H, dq});
  Tensor v = be.alloc(DType::F32, {B, T, H, dv}), o = be.alloc(DType::F32, {B, T, H, dv});
  Tensor lse = be.alloc(DType::F32, {B, H, T}), dqt = be.alloc(DType::F32, {B, T, H, dq});
  Tensor dkt = be.alloc(DType::F32, {B, T, H, dq}), dvt = be.alloc(DType::F32, {B, T, H, dv});
  for (Tensor* t : {&q, &k, &v, &o}) be.fill({*t, 0.01f});
  AttentionArgs fa;
  fa.q = q;
  fa.k = k;
  fa.v = v;
  fa.out = o;
  fa.lse = lse;
  fa.scale = 0.07f;
  fa.causal = true;
  Tensor kept;
  fa.keep = &kept;
  AttentionBackwardArgs ba;
  ba.q = q;
  ba.k = k;
  ba.v = v;
  ba.out = o;
  ba.lse = lse;
  ba.dout = o;
  ba.dq = dqt;
  ba.dk = dkt;
  ba.dv = dvt;
  ba.scale = 0.07f;
  ba.causal = true;
  be.attention(fa);
  ba.kept = kept;
  be.attention_backward(ba);
  be.synchronize();
  auto a0 = Clock::now();
  be.attention(fa);
  be.synchronize();
  auto a1 = Clock::now();
  ba.kept = kept;
  be.attention_backward(ba);
  be.synchronize();
  return {secs(a0, a1), secs(a1, Clock::now())};
}

// The second call of f alone (the first one sees the shapes: plans, scratch), device synchronised.
double time_second_call(CudaBackend& be, const std::function<void()>& f) {
  f();
  be.synchronize();
  auto t0 = Clock::now();
  f();
  be.synchronize();
  return secs(t0, Clock::now());
}

// One eligible linear layer [M, K] → [M, N] forward + backward (dx and dW) as the model calls it
// (BF16 weight copy unless fp32), timed alone.
double time_linear(CudaBackend& be, const std::string& prec, int64_t M, int64_t K, int64_t N) {
  Tensor x = be.alloc(DType::F32, {M, K}), y = be.alloc(DType::F32, {M, N}), dx = be.alloc(DType::F32, {M, K});
  Tensor w = be.alloc(prec == "fp32" ? DType::F32 : DType::BF16, {N, K}), dw = be.alloc(DType::F32, {N, K});
  be.fill({x, 0.5f});
  be.fill({w, 0.01f});
  be.fill({y, 0.25f});
  return time_second_call(be, [&] {
    Fp8Tiles cache;
    linear_lowp(linear_precision(), {x, w, {}, y}, &cache);
    linear_backward_lowp(linear_precision(), {y, x, w, {}, dx, dw, false, true}, &cache);
  });
}

// One projection of E routed experts of `rows` rows each, [E·rows, K] → [E·rows, N], forward +
// backward through the grouped calls as the MoE makes them in bf16 / fp8 (x's low-precision copy
// made once; bf16 batches the blocks, fp8 runs them on lanes), timed alone.
double time_experts(CudaBackend& be, int64_t E, int64_t rows, int64_t K, int64_t N) {
  const int64_t M = E * rows;
  Tensor x = be.alloc(DType::F32, {M, K}), y = be.alloc(DType::F32, {M, N}), dx = be.alloc(DType::F32, {M, K});
  be.fill({x, 0.5f});
  be.fill({y, 0.25f});
  std::vector<Tensor> w, dw;
  std::vector<int64_t> offsets;
  for (int64_t e = 0; e < E; ++e) {
    w.push_back(be.alloc(DType::BF16, {N, K}));
    dw.push_back(be.alloc(DType::F32, {N, K}));
    be.fill({w.back(), 0.01f});
    be.fill({dw.back(), 0.0f});
    offsets.push_back(e * rows);
  }
  offsets.push_back(M);
  return time_second_call(be, [&] {
    const Fp8Tiles xc = lowp_input_copy(linear_precision(), x, "experts' x");
    linear_lowp_grouped(linear_precision(), {x, w, {}, offsets, y, false}, xc);
    linear_backward_lowp_grouped(linear_precision(), {x, y, w, {}, dw, offsets, dx, false}, xc);
  });
}

struct Run {
  std::string precision;
  double step_s = 0, tok_s = 0, tflops = 0, loss = 0;
  double ph[4] = {0, 0, 0, 0};  // forward, loss, backward, optimizer (which rewrites the BF16 copies)
  double attn_f = 0, attn_b = 0, linear_s = 0, lm_head_s = 0, mem_gib = 0, peak_gib = 0, held_gib = 0,
         host_s = 0, blocking = 0;
  double layers_f = 0, layers_b = 0;  // every decoder layer, synchronised one by one
  int lanes = 0;                      // lane streams of the timed steps (0: none)
  double step_s_no_lanes = 0;         // the same steps with lanes off
  double step_s_dq_kernel = 0;        // the same steps with the attention's dQ by its own kernel
  double step_s_attn_before = 0;      // with the mma.sync forward and dk/dv, the dQ matmul in one block
  double step_s_wgrad_per_block = 0;  // with the experts' BF16 Wgrad as one cuBLASLt matmul per expert
  double step_s_fp8_per_expert = 0;   // with the experts' FP8 matmuls as one cuBLASLt matmul per expert
  double step_s_fp8_rows64 = 0;       // with the grouped FP8 matmuls in 64-row tiles
  double step_s_fp8_ws = 0;           // with them on the warp-specialised kernel (DSV3_GROUPED_FP8_WS)
  double step_s_fp8_bulk = 0;         // with their tiles out by bulk copies (DSV3_GROUPED_FP8_BULK), or without
  std::map<std::string, double> linears;  // per group, per step
  std::map<std::string, double> modules;  // one layer's module, forward / backward (s)
};

// One decoder layer's modules run again on the last step's activations (device synchronised around
// each): what a layer of each kind costs, forward and backward, with everything it launches.
void time_modules(CudaBackend& be, Model& model, Grads& g, int64_t B, int64_t T, Run& r) {
  const ModelParams& P = model.params();
  const ModelActs& A = model.acts();
  const ModelDims& d = model.dims();
  const int64_t N = B * T;
  RopeInput rope{&model.rope_tables_for(T), A.positions};
  Tensor dout = be.alloc(DType::F32, {N, d.H}), dx = be.alloc(DType::F32, {N, d.H});
  be.fill({dout, 1e-3f});
  auto timed = [&](const std::string& name, const std::function<void()>& f) {
    r.modules[name] = time_second_call(be, f);
  };
  // Every decoder layer forward and backward on the step's activations, one at a time.
  for (size_t l = 0; l < A.layers.size(); ++l) {
    LayerActs la;
    be.synchronize();
    auto t0 = Clock::now();
    decoder_layer_forward(be, d, P.layers[l], rope, l ? A.layers[l - 1].out : A.emb, B, T, la);
    be.synchronize();
    auto t1 = Clock::now();
    decoder_layer_backward(be, d, P.layers[l], g.p.layers[l], rope, la, B, T, dout, Tensor(), dx);
    be.synchronize();
    r.layers_f += secs(t0, t1);
    r.layers_b += secs(t1, Clock::now());
  }
  for (size_t l = 0; l < A.layers.size() && l < P.layers.size(); ++l) {
    const LayerParams& lp = P.layers[l];
    const LayerActs& la = A.layers[l];
    if (l == 0 || (lp.is_moe && !r.modules.count("moe_forward"))) {
      if (!r.modules.count("mla_forward")) {
        MlaActs ma;
        timed("mla_forward", [&] { mla_forward(be, d, lp.attn, rope, la.h1, B, T, ma); });
        timed("mla_backward", [&] { mla_backward(be, d, lp.attn, g.p.layers[l].attn, rope, ma, B, T, dout, dx, false); });
      }
      if (lp.is_moe) {
        MoeActs mo;
        timed("moe_forward", [&] { moe_forward(be, d, lp.moe, la.h2, mo); });
        timed("moe_backward", [&] { moe_backward(be, d, lp.moe, g.p.layers[l].moe, mo, dout, Tensor(), dx, false); });
      } else {
        MlpActs mp;
        timed("dense_mlp_forward", [&] { mlp_forward(be, lp.mlp, la.h2, mp); });
        timed("dense_mlp_backward", [&] { mlp_backward(be, lp.mlp, g.p.layers[l].mlp, mp, dout, dx, false); });
      }
    }
  }
}

Run measure(CudaBackend& be, const ModelConfig& cfg, const Weights& host, const std::string& prec, int64_t B,
            int64_t T, int steps, int warmup, const std::vector<int32_t>& ids, const std::vector<int32_t>& lab,
            double fpt, DType moments) {
  Run r;
  r.precision = prec;
  set_precision(prec);
  Weights master = host;
  for (Param& p : master.params()) p.w = be.to_device(p.w);
  std::optional<Weights> compute;
  if (prec != "fp32") {
    std::map<std::string, Tensor> t;
    for (const Param& p : master.params()) {
      if (p.spec.kind == TensorKind::router_bias) {
        t[p.spec.name] = p.w;
        continue;
      }
      Tensor b = be.alloc(DType::BF16, p.w.shape());
      be.copy(CopyArgs{p.w, b});
      t[p.spec.name] = b;
    }
    compute = Weights::from_tensors(cfg, std::move(t), "bf16 copies");
  }
  Model model(compute ? *compute : master, be);
  Grads g(cfg, &be);
  std::vector<ParamSlot> slots;
  for (Param& p : master.params())
    if (p.spec.trainable) slots.push_back({p.spec.name, p.w, g.get(p.spec.name), p.spec.weight_decay});
  OptimizerConfig oc;
  oc.moment_dtype = moments;
  AdamW opt(slots, oc, &be);
  if (compute)  // as the trainer: the optimizer's pass rewrites the BF16 copies
    opt.set_copies([&](const std::string& name) { return compute->get(name).w; });
  LossOptions lo;
  lo.mtp_lambda = 0.0;
  bool phases = false;
  auto now = [&] {
    if (phases) be.synchronize();
    return Clock::now();
  };
  auto step = [&] {
    auto t0 = now();
    g.zero();
    ForwardOptions fo;
    fo.keep_activations = true;
    fo.mtp = false;
    ForwardOutput out = model.forward(ids, B, T, fo);
    auto t1 = now();
    LossResult l = compute_loss(be, model, out, lab, B, T, T + 1, lo);
    auto t2 = now();
    model.backward(l.grad, g);
    auto t3 = now();
    opt.step(1e-4, l.total, 1.0);
    auto t4 = now();
    r.loss = l.total;
    if (phases) {
      r.ph[0] += secs(t0, t1);
      r.ph[1] += secs(t1, t2);
      r.ph[2] += secs(t2, t3);
      r.ph[3] += secs(t3, t4);
    }
  };
  for (int i = 0; i < warmup; ++i) step();
  phases = true;
  step();
  phases = false;
  be.synchronize();
  // The timed steps inside cudaProfilerStart/Stop: `ncu --profile-from-start off` sees only them.
  // DSV3_HOST_PROFILE=PREFIX samples the host's stack over the timed steps into PREFIX.<precision>
  // (tools/host_profile.py reads it).
  const char* prof_prefix = std::getenv("DSV3_HOST_PROFILE");
  std::optional<bench::HostProfiler> prof;
  if (prof_prefix) prof.emplace();
  cudaProfilerStart();
  cuda_reset_peak_memory();
  const long b0 = bench::blocking_calls();
  if (prof) prof->start(200);
  auto t0 = Clock::now();
  for (int i = 0; i < steps; ++i) step();
  r.host_s = secs(t0, Clock::now()) / steps;  // until the host has queued the last step's work
  r.blocking = double(bench::blocking_calls() - b0) / steps;
  be.synchronize();
  if (prof) prof->stop();
  cudaProfilerStop();
  if (prof) {
    const std::string path = std::string(prof_prefix) + "." + prec;
    std::printf("host profile: %zu samples -> %s\n", prof->samples(), path.c_str());
    if (!prof->write(path)) std::fprintf(stderr, "host profile: cannot write %s\n", path.c_str());
  }
  r.step_s = secs(t0, Clock::now()) / steps;
  r.tok_s = double(B * T) / r.step_s;
  const CudaMemoryStats ms = cuda_memory_stats();
  r.peak_gib = double(ms.peak) / double(1ull << 30);
  r.held_gib = double(ms.reserved) / double(1ull << 30);
  // The same timed steps (after one untimed) with a setting changed, then restored: what it saves.
  auto steps_with = [&](const std::function<void()>& change, const std::function<void()>& restore) {
    change();
    step();
    be.synchronize();
    auto s0 = Clock::now();
    for (int i = 0; i < steps; ++i) step();
    be.synchronize();
    const double t = secs(s0, Clock::now()) / steps;
    restore();
    return t;
  };
  // The experts' GEMMs in issue order (no lane streams): what the lanes save.
  r.lanes = cuda_lanes();
  if (r.lanes > 0)
    r.step_s_no_lanes = steps_with([] { cuda_set_lanes(1); }, [&] { cuda_set_lanes(r.lanes); });
  // The BF16 attention's dQ by the dq kernel instead of the matmul from dSᵀ.
  if (cuda_attention_bf16() && cuda_attention_dq_matmul())
    r.step_s_dq_kernel = steps_with([] { cuda_set_attention_dq_matmul(false); },
                                    [] { cuda_set_attention_dq_matmul(true); });
  // The BF16 attention as before 2026-12-02: mma.sync forward and dk/dv, the dQ matmul over the whole square.
  if (cuda_attention_bf16() && cuda_attention_dq_matmul()) {
    const int blocks = cuda_attention_dq_blocks();
    const bool wgmma = cuda_attention_wgmma();
    r.step_s_attn_before = steps_with(
        [] {
          cuda_set_attention_wgmma(false);
          cuda_set_attention_dq_blocks(1);
        },
        [&] {
          cuda_set_attention_wgmma(wgmma);
          cuda_set_attention_dq_blocks(blocks);
        });
  }
  // The experts' Wgrad per expert (cuBLASLt) instead of the grouped launch (bf16 only).
  if (prec == "bf16" && cuda_grouped_wgrad())
    r.step_s_wgrad_per_block = steps_with([] { cuda_set_grouped_wgrad(false); }, [] { cuda_set_grouped_wgrad(true); });
  // The experts' FP8 matmuls per expert (cuBLASLt on the lanes) instead of the grouped kernel (fp8 only).
  if (prec == "fp8" && cuda::grouped_fp8()) {
    r.step_s_fp8_per_expert = steps_with([] { cuda::set_grouped_fp8(false); }, [] { cuda::set_grouped_fp8(true); });
    const int rows = cuda::grouped_fp8_rows();
    if (rows != 64)
      r.step_s_fp8_rows64 = steps_with([] { cuda::set_grouped_fp8_rows(64); }, [&] { cuda::set_grouped_fp8_rows(rows); });
    if (!cuda::grouped_fp8_ws()) {  // the ws kernel, and the block kernels' other epilogue
      r.step_s_fp8_ws = steps_with([] { cuda::set_grouped_fp8_ws(true); }, [] { cuda::set_grouped_fp8_ws(false); });
      const bool bulk = cuda::grouped_fp8_bulk();
      r.step_s_fp8_bulk = steps_with([&] { cuda::set_grouped_fp8_bulk(!bulk); }, [&] { cuda::set_grouped_fp8_bulk(bulk); });
    }
  }
  r.tflops = r.tok_s * fpt / 1e12;
  size_t free_b = 0, total_b = 0;
  cudaMemGetInfo(&free_b, &total_b);
  r.mem_gib = double(total_b - free_b) / double(1ull << 30);

  // Where the time goes: each module of a layer, the attention core and the linear layers, each
  // alone at the model's shapes.
  time_modules(be, model, g, B, T, r);
  std::tie(r.attn_f, r.attn_b) = time_attention(be, cfg, B, T);
  const int64_t N = B * T, H = cfg.hidden_size, nh = cfg.num_attention_heads;
  const int64_t qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, L = cfg.num_hidden_layers;
  const int64_t moe_layers = L - cfg.first_k_dense_replace, E = cfg.n_routed_experts;
  const int64_t rows = E > 0 ? N * cfg.num_experts_per_tok / E : 0, I = cfg.moe_intermediate_size;
  const int64_t ql = cfg.q_lora_rank.value_or(0);
  double mla = (ql > 0 ? time_linear(be, prec, N, H, ql) + time_linear(be, prec, N, ql, nh * qk)
                       : time_linear(be, prec, N, H, nh * qk)) +
               time_linear(be, prec, N, H, cfg.kv_lora_rank + cfg.qk_rope_head_dim) +
               time_linear(be, prec, N, cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim)) +
               time_linear(be, prec, N, nh * cfg.v_head_dim, H);
  double dense = 2 * time_linear(be, prec, N, H, cfg.intermediate_size) + time_linear(be, prec, N, cfg.intermediate_size, H);
  const int64_t Is = I * std::max<int64_t>(cfg.n_shared_experts, 1);
  double shared = cfg.n_shared_experts > 0 ? 2 * time_linear(be, prec, N, H, Is) + time_linear(be, prec, N, Is, H) : 0;
  // All of a layer's routed experts: the grouped calls in bf16 / fp8, one linear per expert in fp32.
  double expert = 0;
  if (rows > 0 && prec == "fp32")
    expert = double(E) * (2 * time_linear(be, prec, rows, H, I) + time_linear(be, prec, rows, I, H));
  else if (rows > 0)
    expert = 2 * time_experts(be, E, rows, H, I) + time_experts(be, E, rows, I, H);
  r.linears["attention projections"] = mla * double(L);
  r.linears["dense MLP"] = dense * double(cfg.first_k_dense_replace);
  r.linears["shared experts"] = shared * double(moe_layers);
  r.linears["routed experts (even load)"] = expert * double(moe_layers);
  for (const auto& [k, v] : r.linears) r.linear_s += v;
  {  // lm_head as the step runs it (model/output_head.h): FP32, or BF16 operands in bf16 and fp8
    Tensor x = be.alloc(DType::F32, {N, H}), y = be.alloc(DType::F32, {N, cfg.vocab_size});
    LinearParam w, g;
    w.w = be.alloc(DType::F32, {cfg.vocab_size, H});
    g.w = be.alloc(DType::F32, {cfg.vocab_size, H});
    Tensor dx = be.alloc(DType::F32, {N, H});
    be.fill({x, 0.5f});
    be.fill({w.w, 0.01f});
    be.fill({g.w, 0.0f});
    be.synchronize();
    auto a = Clock::now();
    head_forward(be, w, x, y);
    head_backward(be, w, g, x, y, dx, false);
    be.synchronize();
    r.lm_head_s = secs(a, Clock::now());
  }
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  std::string preset = "bench-0.7b", hf_path, precisions = "fp32,bf16,fp8", moments = "f32";
  int64_t B = 8, T = 2048;
  int steps = 5, warmup = 2;
  const char* usage = "usage: dsv3_bench_gpu_train [--preset bench-0.7b] [--batch 8] [--seq 2048] [--steps 5] "
                      "[--warmup 2] [--precisions fp32,bf16,fp8] [--moments f32|bf16] [--hf hf_gpu.json]\n";
  if (const int rc = bench::check_pair_args(argc, argv, usage); rc >= 0) return rc;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--preset") preset = v;
    else if (k == "--batch") B = std::stoll(v);
    else if (k == "--seq") T = std::stoll(v);
    else if (k == "--steps") steps = std::stoi(v);
    else if (k == "--warmup") warmup = std::stoi(v);
    else if (k == "--precisions") precisions = v;
    else if (k == "--moments") moments = v;
    else if (k == "--hf") hf_path = v;
    else {
      std::fputs(usage, stderr);
      return 2;
    }
  }
  if (moments != "f32" && moments != "bf16") {
    std::fprintf(stderr, "--moments: '%s' is not f32 or bf16 (the AdamW moments' storage, as dsv3 train's)\n",
                 moments.c_str());
    return 2;
  }
  std::vector<std::string> precs;
  {
    std::stringstream ss(precisions);
    for (std::string p; std::getline(ss, p, ',');) {
      if (p != "fp32" && p != "bf16" && p != "fp8") {
        std::fprintf(stderr, "--precisions: '%s' is not fp32, bf16 or fp8\n", p.c_str());
        return 2;
      }
      precs.push_back(p);
    }
  }
  CudaBackend& be = cuda_backend();
  ModelConfig cfg = preset_config(preset);
  std::printf("gpu_train: preset %s, B=%ld, T=%ld, %d timed steps after %d warm-up\n", preset.c_str(), long(B), long(T),
              steps, warmup + 1);
  Weights host = Weights::random(cfg, 1, 0.02f);
  std::vector<int32_t> lab(size_t(B * (T + 1))), ids;
  for (size_t i = 0; i < lab.size(); ++i) lab[i] = int32_t((uint64_t(i) * 2654435761u >> 5) % uint64_t(cfg.vocab_size));
  for (int64_t b = 0; b < B; ++b) ids.insert(ids.end(), lab.begin() + b * (T + 1), lab.begin() + b * (T + 1) + T);
  FlopsPerToken f = flops_per_token(cfg, T);
  // transformers' credit: 6·N_mm + the attention term at T (tools/hf_gpu_bench.py).
  const double fpt = 6.0 * f.matmul_params_active + f.attention_train;

  std::map<std::string, Run> runs;
  for (const std::string& p : precs) {
    Run r = measure(be, cfg, host, p, B, T, steps, warmup, ids, lab, fpt, moments == "bf16" ? DType::BF16 : DType::F32);
    std::printf("[%s] one step by phase (s): forward %.3f  loss %.3f  backward %.3f  optimizer %.3f\n", p.c_str(),
                r.ph[0], r.ph[1], r.ph[2], r.ph[3]);
    std::printf("[%s] timed steps: %.3f s each, of which the host had queued its work after %.3f s; every decoder "
                "layer one by one (synchronised): forward %.3f s, backward %.3f s\n",
                p.c_str(), r.step_s, r.host_s, r.layers_f, r.layers_b);
    std::printf("[%s] blocking copies and synchronisations per step: %.0f\n", p.c_str(), r.blocking);
    std::printf("[%s] device memory over the timed steps: %.2f GiB at most in tensors and scratch (weights, "
                "gradients, optimizer state, activations); the caching allocator holds %.2f GiB after them\n",
                p.c_str(), r.peak_gib, r.held_gib);
    if (r.lanes > 0)
      std::printf("[%s] experts' GEMMs on %d lane streams: %.3f s per step; in issue order: %.3f s (%.2fx)\n", p.c_str(),
                  r.lanes, r.step_s, r.step_s_no_lanes, r.step_s_no_lanes / r.step_s);
    if (r.step_s_dq_kernel > 0)
      std::printf("[%s] attention dQ as a matmul from dS: %.3f s per step; by the dq kernel: %.3f s (%.2fx)\n",
                  p.c_str(), r.step_s, r.step_s_dq_kernel, r.step_s_dq_kernel / r.step_s);
    if (r.step_s_attn_before > 0)
      std::printf("[%s] attention forward and dk/dv on wgmma, causal dQ matmul in blocks: %.3f s per step; on mma.sync, "
                  "dQ over the whole square: %.3f s (%.2fx)\n",
                  p.c_str(), r.step_s, r.step_s_attn_before, r.step_s_attn_before / r.step_s);
    if (r.step_s_wgrad_per_block > 0)
      std::printf("[%s] experts' Wgrad in one grouped launch per projection: %.3f s per step; one cuBLASLt matmul per "
                  "expert: %.3f s (%.2fx)\n",
                  p.c_str(), r.step_s, r.step_s_wgrad_per_block, r.step_s_wgrad_per_block / r.step_s);
    if (r.step_s_fp8_per_expert > 0)
      std::printf("[%s] experts' FP8 matmuls in one grouped launch per pass: %.3f s per step; one cuBLASLt matmul per "
                  "expert on the lanes: %.3f s (%.2fx)\n",
                  p.c_str(), r.step_s, r.step_s_fp8_per_expert, r.step_s_fp8_per_expert / r.step_s);
    if (r.step_s_fp8_rows64 > 0)
      std::printf("[%s] grouped FP8 matmuls in tiles of %d rows: %.3f s per step; of 64 rows: %.3f s (%.2fx)\n",
                  p.c_str(), cuda::grouped_fp8_rows(), r.step_s, r.step_s_fp8_rows64, r.step_s_fp8_rows64 / r.step_s);
    if (r.step_s_fp8_ws > 0)
      std::printf("[%s] grouped FP8 matmuls by fp8_gemm_kernel: %.3f s per step; by the warp-specialised kernel: %.3f s "
                  "(%.2fx)\n",
                  p.c_str(), r.step_s, r.step_s_fp8_ws, r.step_s_fp8_ws / r.step_s);
    if (r.step_s_fp8_bulk > 0)
      std::printf("[%s] grouped FP8 tiles out %s: %.3f s per step; %s: %.3f s (%.2fx)\n", p.c_str(),
                  cuda::grouped_fp8_bulk() ? "by bulk copies" : "from registers", r.step_s,
                  cuda::grouped_fp8_bulk() ? "from registers" : "by bulk copies", r.step_s_fp8_bulk,
                  r.step_s_fp8_bulk / r.step_s);
    std::printf("[%s] attention core per layer: forward %.4f s, backward %.4f s; x%ld layers = %.3f s per step\n",
                p.c_str(), r.attn_f, r.attn_b, long(cfg.num_hidden_layers),
                (r.attn_f + r.attn_b) * double(cfg.num_hidden_layers));
    std::printf("[%s] linear layers alone (forward + backward, per step): %.3f s =", p.c_str(), r.linear_s);
    for (const auto& [k, v] : r.linears) std::printf(" %s %.3f;", k.c_str(), v);
    std::printf(" lm_head (%s) %.3f s\n", p == "fp32" ? "FP32 SGEMM" : "BF16 operands", r.lm_head_s);
    std::printf("[%s] one layer's modules (s):", p.c_str());
    for (const auto& [k, v] : r.modules) std::printf(" %s %.4f;", k.c_str(), v);
    const double L = double(cfg.num_hidden_layers), Ld = double(cfg.first_k_dense_replace);
    auto mod = [&](const char* k) { return r.modules.count(k) ? r.modules.at(k) : 0.0; };
    std::printf(" x layers: MLA %.3f, MoE %.3f, dense MLP %.3f s per step\n",
                L * (mod("mla_forward") + mod("mla_backward")), (L - Ld) * (mod("moe_forward") + mod("moe_backward")),
                Ld * (mod("dense_mlp_forward") + mod("dense_mlp_backward")));
    runs[p] = r;
  }
  std::printf("%-28s %10s %12s %10s %8s\n", "", "step s", "tokens/s", "TFLOP/s", "MFU");
  for (const std::string& p : precs) {
    const Run& r = runs[p];
    std::printf("%-28s %10.3f %12.0f %10.1f %8.3f\n", ("dsv3 CUDA (" + p + ")").c_str(), r.step_s, r.tok_s, r.tflops,
                r.tflops / 989.0);
  }
  nlohmann::json res = {{"bench", "gpu_train"}, {"preset", preset}, {"batch", B}, {"seq", T}, {"steps", steps},
                        {"flops_per_token", fpt}, {"moments", moments}};
  nlohmann::json rj = nlohmann::json::object();
  for (const std::string& p : precs) {
    const Run& r = runs[p];
    nlohmann::json lin = nlohmann::json::object();
    for (const auto& [k, v] : r.linears) lin[k] = v;
    rj[p] = {{"step_s", r.step_s},
             {"tokens_per_s", r.tok_s},
             {"tflops", r.tflops},
             {"mfu_vs_989", r.tflops / 989.0},
             {"final_loss", r.loss},
             {"device_memory_used_gib", r.mem_gib},
             {"peak_in_use_gib", r.peak_gib},
             {"allocator_held_gib", r.held_gib},
             {"phases_s", {{"forward", r.ph[0]}, {"loss", r.ph[1]}, {"backward", r.ph[2]}, {"optimizer", r.ph[3]}}},
             {"attention_per_layer_s", {{"forward", r.attn_f}, {"backward", r.attn_b}}},
             {"linear_alone_per_step_s", lin},
             {"lm_head_alone_s", r.lm_head_s},
             {"one_layer_modules_s", r.modules},
             {"host_queue_s", r.host_s},
             {"lane_streams", r.lanes},
             {"step_s_experts_in_issue_order", r.lanes > 0 ? nlohmann::json(r.step_s_no_lanes) : nlohmann::json()},
             {"step_s_attention_dq_kernel", r.step_s_dq_kernel > 0 ? nlohmann::json(r.step_s_dq_kernel) : nlohmann::json()},
             {"step_s_experts_wgrad_per_block",
              r.step_s_wgrad_per_block > 0 ? nlohmann::json(r.step_s_wgrad_per_block) : nlohmann::json()},
             {"step_s_experts_fp8_per_expert",
              r.step_s_fp8_per_expert > 0 ? nlohmann::json(r.step_s_fp8_per_expert) : nlohmann::json()},
             {"step_s_experts_fp8_tiles_64_rows",
              r.step_s_fp8_rows64 > 0 ? nlohmann::json(r.step_s_fp8_rows64) : nlohmann::json()},
             {"step_s_experts_fp8_warp_specialised",
              r.step_s_fp8_ws > 0 ? nlohmann::json(r.step_s_fp8_ws) : nlohmann::json()},
             {"grouped_fp8_bulk_out", cuda::grouped_fp8_bulk()},
             {"step_s_experts_fp8_bulk_out_toggled",
              r.step_s_fp8_bulk > 0 ? nlohmann::json(r.step_s_fp8_bulk) : nlohmann::json()},
             {"step_s_attention_mma_sync_whole_dq",
              r.step_s_attn_before > 0 ? nlohmann::json(r.step_s_attn_before) : nlohmann::json()},
             {"blocking_calls_per_step", r.blocking},
             {"decoder_layers_synchronised_s", {{"forward", r.layers_f}, {"backward", r.layers_b}}}};
  }
  res["runs"] = rj;
  if (runs.count("fp32")) {  // the fields of the fp32-only version of this bench
    const Run& r = runs["fp32"];
    res["precision"] = "fp32";
    res["step_s"] = r.step_s;
    res["tokens_per_s"] = r.tok_s;
    res["tflops"] = r.tflops;
    res["mfu_vs_989"] = r.tflops / 989.0;
    res["final_loss"] = r.loss;
    res["device_memory_used_gib"] = r.mem_gib;
  }
  if (runs.count("fp8") && runs.count("bf16")) {
    res["train_fp8_over_bf16"] = runs["fp8"].tok_s / runs["bf16"].tok_s;
    std::printf("fp8 over bf16: %.2fx\n", runs["fp8"].tok_s / runs["bf16"].tok_s);
  }
  if (!hf_path.empty()) {
    std::ifstream in(hf_path);
    if (in) {
      nlohmann::json hf = nlohmann::json::parse(in);
      const double hf_tok = hf["train"]["tokens_per_s"].get<double>();
      std::printf("%-28s %10.3f %12.0f %10.1f %8.3f\n", "transformers BF16 (same GPU)", hf["train"]["step_s"].get<double>(),
                  hf_tok, hf["train"]["tflops"].get<double>(), hf["train"]["mfu"].get<double>());
      res["hf_tokens_per_s"] = hf_tok;
      for (const std::string& p : precs) {
        const double s = runs[p].tok_s / hf_tok;
        std::printf("speed-up over transformers BF16, ours in %s: %.2fx\n", p.c_str(), s);
        res["runs"][p]["speedup_vs_hf_bf16"] = s;
      }
      if (runs.count("bf16")) res["train_speedup_vs_hf_bf16"] = runs["bf16"].tok_s / hf_tok;
      if (runs.count("fp32")) res["train_speedup_vs_hf_bf16_ours_fp32"] = runs["fp32"].tok_s / hf_tok;
    } else {
      std::printf("no transformers baseline at %s: speed-ups not recorded\n", hf_path.c_str());
    }
  }
  std::printf("wrote %s\n", dsv3::bench::write_result("gpu_train", res).c_str());
  return 0;
}
#endif
