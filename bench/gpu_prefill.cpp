// Prefill on the GPU engine at growing prompt lengths: the latent attention's prefill kernel (one
// CTA per 4 or 2 consecutive query rows, cuda_latent_prefill.h) against the row kernel (one CTA per
// query row) in the same process, on the bench-0.7b preset with random weights (BF16 matrices by
// default, as transformers runs; --weights fp8 for V3's layout). Each case is one engine step that
// prefills every prompt (one chunk each) and samples the first token, timed on the host after a
// warm-up call of the same shape; the median of --reps calls is reported, settings interleaved.
//
// Roofline beside each time: the step's FLOPs — 2 per weight element each token passes through
// (attention and dense matrices, the shared expert, top-k of the routed experts; the head for each
// sequence's last row only) plus the absorbed attention's 2·(W + R) per head per attended position
// (W = kv_lora_rank + qk_rope_head_dim, R = kv_lora_rank; causal) — at 989 TFLOP/s dense BF16. The
// engine computes in F32-class arithmetic (x as two BF16 terms on the tensor cores: three products
// for FP8 weights, two for BF16), so that figure is not reachable by it; it says how far off it is.
//
//   dsv3_bench_gpu_prefill [--prompts 512,1024,2048,4000] [--batch 1] [--rows 0,2,4] [--reps 3]
//                          [--weights bf16|fp8] [--out gpu_prefill]
// Writes bench/results/<out>.json (commit, date, machine).
#include <cstdio>
#include <cstdlib>
#include <string>

#include "common/bench_util.h"

#ifndef DSV3_HAVE_CUDA
int main() {
  std::puts("gpu_prefill: built without CUDA");
  return 1;
}
#else
#include <algorithm>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "infer/cuda_latent_attention.h"
#include "infer/engine.h"
#include "model/presets.h"

using namespace dsv3;

namespace {

std::vector<int64_t> numbers(const std::string& v) {
  std::vector<int64_t> out;
  for (const std::string& s : bench::split_list(v)) out.push_back(std::stoll(s));
  return out;
}

// Seconds of one engine step prefilling B prompts of `prompt` tokens (and sampling one token each;
// the sequences end there, so their cache blocks come back).
double prefill_s(Engine& eng, int64_t B, int64_t prompt, uint64_t seed) {
  const int64_t vocab = eng.runner().config().vocab_size;
  for (int64_t b = 0; b < B; ++b) {
    Request r;
    for (int64_t i = 0; i < prompt; ++i)
      r.prompt.push_back(int32_t((uint64_t(seed + b * prompt + i) * 2654435761u >> 7) % uint64_t(vocab)));
    r.sampling.temperature = 0.0f;
    r.max_tokens = 1;
    eng.add(r);
  }
  cuda_backend().synchronize();
  const double t0 = bench::now_s();
  eng.step();
  cuda_backend().synchronize();
  const double s = bench::now_s() - t0;
  eng.run_all();
  return s;
}

// FLOPs of that step (see the header).
double prefill_flops(const Weights& w, int64_t B, int64_t prompt) {
  const ModelConfig& c = w.config();
  const double frac = double(c.num_experts_per_tok) / double(c.n_routed_experts);
  double per_token = 0, head = 0;
  for (const Param& p : w.params()) {
    const std::string& n = p.spec.name;
    if (p.w.ndim() != 2 || n == "model.embed_tokens.weight" || n.find("norm") != std::string::npos) continue;
    if (n.rfind("model.layers.", 0) == 0 && std::stoll(n.substr(13, n.find('.', 13) - 13)) >= c.num_hidden_layers)
      continue;  // MTP modules
    const double e = double(p.w.numel());
    if (n == "lm_head.weight")
      head += e;
    else
      per_token += n.find(".mlp.experts.") != std::string::npos ? e * frac : e;
  }
  const double W = double(c.kv_lora_rank + c.qk_rope_head_dim), R = double(c.kv_lora_rank);
  const double positions = double(prompt) * double(prompt + 1) / 2;  // causal, per sequence
  const double attn = 2 * (W + R) * double(c.num_attention_heads) * positions * double(c.num_hidden_layers);
  return double(B) * (2 * per_token * double(prompt) + 2 * head + attn);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> prompts = {512, 1024, 2048, 4000}, settings = {0, 2, 4};
  int64_t B = 1, reps = 3;
  std::string weights = "bf16", out_name = "gpu_prefill";
  const char* usage =
      "usage: dsv3_bench_gpu_prefill [--prompts 512,1024,2048,4000] [--batch 1] [--rows 0,2,4 (query rows per CTA of "
      "the latent attention's prefill kernel; 0 = the row kernel)] [--reps 3] [--weights bf16|fp8] [--out gpu_prefill]\n";
  if (const int rc = bench::check_pair_args(argc, argv, usage); rc >= 0) return rc;
  try {
    for (int i = 1; i + 1 < argc; i += 2) {
      const std::string k = argv[i], v = argv[i + 1];
      if (k == "--prompts") prompts = numbers(v);
      else if (k == "--batch") B = std::stoll(v);
      else if (k == "--rows") settings = numbers(v);
      else if (k == "--reps") reps = std::stoll(v);
      else if (k == "--weights" && (v == "bf16" || v == "fp8")) weights = v;
      else if (k == "--out" && !v.empty() && v.find('/') == std::string::npos) out_name = v;
      else {
        std::fprintf(stderr, "gpu_prefill: unknown flag or value %s %s\n%s", k.c_str(), v.c_str(), usage);
        return 2;
      }
    }
  } catch (const std::exception&) {
    std::fprintf(stderr, "gpu_prefill: a number was expected\n%s", usage);
    return 2;
  }
  const ModelConfig cfg = preset_config("bench-0.7b");
  for (int64_t p : prompts)
    if (p < 1 || p + 1 > cfg.max_position_embeddings) {
      std::fprintf(stderr, "gpu_prefill: prompt %ld is outside 1..%ld (max_position_embeddings - 1)\n", long(p),
                   long(cfg.max_position_embeddings - 1));
      return 2;
    }
  if (B < 1 || reps < 1) {
    std::fprintf(stderr, "gpu_prefill: --batch and --reps must be at least 1\n");
    return 2;
  }
  for (int64_t s : settings)
    if (s != 0 && s != 2 && s != 4) {
      std::fprintf(stderr, "gpu_prefill: --rows takes 0, 2 or 4, not %ld\n", long(s));
      return 2;
    }
  std::printf("gpu_prefill: bench-0.7b, %s weights, batch %ld, median of %ld prefills per case\n", weights.c_str(),
              long(B), long(reps));
  Weights w = Weights::random(cfg, 1, 0.02f);
  if (weights == "bf16") round_matrices_to_bf16(w);
  else quantize_matrices_to_fp8(w);
  const int64_t longest = *std::max_element(prompts.begin(), prompts.end());
  EngineOptions opt;
  opt.cache.budget_bytes = uint64_t(B) * uint64_t(longest + 64) * uint64_t(cfg.kv_lora_rank + cfg.qk_rope_head_dim) *
                           uint64_t(cfg.num_hidden_layers) * 2 + (uint64_t(64) << 20);
  opt.max_running = std::max<int64_t>(64, B);
  opt.prefill_chunk = longest;
  opt.max_step_tokens = B * longest;
  Engine eng(w, opt, cuda_backend());
  const int saved = cuda_latent_prefill_rows();
  nlohmann::json res = {{"bench", "gpu_prefill"}, {"preset", "bench-0.7b"}, {"weights", weights}, {"batch", B},
                        {"reps", reps}, {"roofline_tflops", 989.0}};
  res["runs"] = nlohmann::json::array();
  std::printf("\n%7s %6s %11s %11s %12s %10s %14s\n", "prompt", "rows", "prefill ms", "tok/s", "vs rows=0",
              "TFLOP/s", "of 989 TFLOP/s");
  for (int64_t p : prompts) {
    std::vector<std::vector<double>> t(settings.size());
    for (size_t i = 0; i < settings.size(); ++i) {  // warm-up of this shape per setting
      cuda_set_latent_prefill_rows(int(settings[i]));
      prefill_s(eng, B, p, 7);
    }
    for (int64_t r = 0; r < reps; ++r)
      for (size_t i = 0; i < settings.size(); ++i) {
        cuda_set_latent_prefill_rows(int(settings[i]));
        t[i].push_back(prefill_s(eng, B, p, 100 + uint64_t(r)) * 1e3);
      }
    const double flops = prefill_flops(w, B, p);
    double base = 0;
    for (size_t i = 0; i < settings.size(); ++i) {
      std::sort(t[i].begin(), t[i].end());
      const double s = t[i][t[i].size() / 2] / 1e3;
      if (settings[i] == 0) base = s;
      const double tf = flops / s / 1e12;
      std::printf("%7ld %6ld %11.2f %11.0f %12s %10.1f %14.3f\n", long(p), long(settings[i]), s * 1e3,
                  double(B * p) / s, base > 0 ? cat(base / s, "x").c_str() : "-", tf, tf / 989.0);
      nlohmann::json j = {{"prompt", p},           {"rows_per_cta", settings[i]}, {"prefill_ms", s * 1e3},
                          {"prefill_ms_each", t[i]}, {"tokens_per_s", double(B * p) / s}, {"flops", flops},
                          {"tflops", tf},           {"roofline_fraction", tf / 989.0}};
      if (base > 0) j["speedup_vs_row_kernel"] = base / s;
      res["runs"].push_back(j);
    }
  }
  cuda_set_latent_prefill_rows(saved);
  std::printf("wrote %s\n", bench::write_result(out_name, res).c_str());
  return 0;
}
#endif
