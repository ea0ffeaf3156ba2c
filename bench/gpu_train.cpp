// Training throughput on the GPU (bench/gpu.sh runs it on the H200): the bench-0.7b preset, B = 8,
// T = 2048, random weights and tokens, forward + loss + backward + AdamW entirely on the CUDA
// backend, timed with the device synchronised. FLOPs per token are the ones transformers'
// baseline (tools/hf_gpu_bench.py) is credited with: 6·N_mm(active) + causal attention, no MTP
// (its MTP modules are skipped here too, so both sides do the same work). With --hf FILE (that
// script's JSON from the same machine) it prints and records our speed over transformers'.
// Writes bench/results/gpu_train.json.
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
#include <cuda_runtime.h>

#include <chrono>
#include <fstream>

#include "backend/cuda/cuda_backend.h"
#include "model/loss.h"
#include "model/model.h"
#include "model/model_stats.h"
#include "model/presets.h"
#include "train/optimizer.h"

using namespace dsv3;

int main(int argc, char** argv) {
  std::string preset = "bench-0.7b", hf_path;
  int64_t B = 8, T = 2048;
  int steps = 5, warmup = 2;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--preset") preset = v;
    else if (k == "--batch") B = std::stoll(v);
    else if (k == "--seq") T = std::stoll(v);
    else if (k == "--steps") steps = std::stoi(v);
    else if (k == "--hf") hf_path = v;
    else {
      std::fprintf(stderr, "usage: dsv3_bench_gpu_train [--preset bench-0.7b] [--batch 8] [--seq 2048] [--steps 5] "
                           "[--hf hf_gpu.json]\n");
      return 2;
    }
  }
  CudaBackend& be = cuda_backend();
  ModelConfig cfg = preset_config(preset);
  std::printf("gpu_train: preset %s, B=%ld, T=%ld, FP32 weights and activations (cuBLAS SGEMM, no TF32)\n",
              preset.c_str(), long(B), long(T));
  Weights host = Weights::random(cfg, 1, 0.02f);
  Weights w = host;
  for (Param& p : w.params()) p.w = be.to_device(p.w);
  Model model(w, be);
  Grads g(cfg, &be);
  std::vector<ParamSlot> slots;
  for (Param& p : w.params())
    if (p.spec.trainable) slots.push_back({p.spec.name, p.w, g.get(p.spec.name), p.spec.weight_decay});
  AdamW opt(slots, OptimizerConfig{}, &be);
  LossOptions lo;
  lo.mtp_lambda = 0.0;
  std::vector<int32_t> lab(size_t(B * (T + 1))), ids;
  for (size_t i = 0; i < lab.size(); ++i) lab[i] = int32_t((uint64_t(i) * 2654435761u >> 5) % uint64_t(cfg.vocab_size));
  for (int64_t b = 0; b < B; ++b) ids.insert(ids.end(), lab.begin() + b * (T + 1), lab.begin() + b * (T + 1) + T);
  double loss = 0;
  // Phase times (device synchronised at each boundary; the timed steps below run without them).
  double ph[4] = {0, 0, 0, 0};
  bool phases = false;
  auto now = [&] {
    if (phases) be.synchronize();
    return std::chrono::steady_clock::now();
  };
  auto step = [&] {
    auto t0 = now();
    g.zero();
    ForwardOptions fo;
    fo.keep_activations = true;
    fo.mtp = false;
    ForwardOutput out = model.forward(ids, B, T, fo);
    auto t1 = now();
    LossResult r = compute_loss(be, model, out, lab, B, T, T + 1, lo);
    auto t2 = now();
    model.backward(r.grad, g);
    auto t3 = now();
    opt.step(1e-4, r.total, 1.0);
    auto t4 = now();
    loss = r.total;
    if (phases) {
      ph[0] += std::chrono::duration<double>(t1 - t0).count();
      ph[1] += std::chrono::duration<double>(t2 - t1).count();
      ph[2] += std::chrono::duration<double>(t3 - t2).count();
      ph[3] += std::chrono::duration<double>(t4 - t3).count();
    }
  };
  for (int i = 0; i < warmup; ++i) step();
  phases = true;
  step();
  phases = false;
  std::printf("one step by phase (s): forward %.3f  loss %.3f  backward %.3f  optimizer %.3f\n", ph[0], ph[1], ph[2],
              ph[3]);
  {
    // The attention core alone at this shape (MLA heads: qk 192, v 128), forward and backward.
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
    be.synchronize();
    auto a0 = std::chrono::steady_clock::now();
    be.attention(fa);
    be.synchronize();
    auto a1 = std::chrono::steady_clock::now();
    be.attention_backward(ba);
    be.synchronize();
    auto a2 = std::chrono::steady_clock::now();
    double f = 4.0 * double(B * H) * double(T) * double(T) / 2 * double(dq + dv) / 2;  // causal
    double tf = std::chrono::duration<double>(a1 - a0).count(), tb = std::chrono::duration<double>(a2 - a1).count();
    std::printf("attention per layer: forward %.4f s (%.1f TFLOP/s), backward %.4f s; x%ld layers\n", tf, f / tf / 1e12,
                tb, long(cfg.num_hidden_layers));
  }
  be.synchronize();
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < steps; ++i) step();
  be.synchronize();
  double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / steps;
  size_t free_b = 0, total_b = 0;
  cudaMemGetInfo(&free_b, &total_b);
  FlopsPerToken f = flops_per_token(cfg, T);
  // transformers' credit: 6·N_mm + the attention term at T (tools/hf_gpu_bench.py).
  double fpt = 6.0 * f.matmul_params_active + f.attention_train;
  double tok_s = double(B * T) / dt, tflops = tok_s * fpt / 1e12;
  std::printf("%-28s %10s %12s %10s %8s\n", "", "step s", "tokens/s", "TFLOP/s", "MFU");
  std::printf("%-28s %10.3f %12.0f %10.1f %8.3f\n", "dsv3 CUDA (FP32)", dt, tok_s, tflops, tflops / 989.0);
  nlohmann::json res = {{"bench", "gpu_train"}, {"preset", preset},   {"batch", B},
                        {"seq", T},            {"precision", "fp32"}, {"step_s", dt},
                        {"tokens_per_s", tok_s}, {"flops_per_token", fpt}, {"tflops", tflops},
                        {"mfu_vs_989", tflops / 989.0}, {"final_loss", loss},
                        {"device_memory_used_gib", double(total_b - free_b) / double(1ull << 30)}};
  if (!hf_path.empty()) {
    std::ifstream in(hf_path);
    if (in) {
      nlohmann::json hf = nlohmann::json::parse(in);
      double hf_tok = hf["train"]["tokens_per_s"].get<double>();
      std::printf("%-28s %10.3f %12.0f %10.1f %8.3f\n", "transformers BF16 (same GPU)", hf["train"]["step_s"].get<double>(),
                  hf_tok, hf["train"]["tflops"].get<double>(), hf["train"]["mfu"].get<double>());
      std::printf("speed-up over transformers: %.2fx\n", tok_s / hf_tok);
      res["hf_tokens_per_s"] = hf_tok;
      res["train_speedup_vs_hf_bf16"] = tok_s / hf_tok;
    }
  }
  if (const char* c = std::getenv("DSV3_COMMIT")) res["commit"] = c;
  std::printf("wrote %s\n", dsv3::bench::write_result("gpu_train", res).c_str());
  return 0;
}
#endif
