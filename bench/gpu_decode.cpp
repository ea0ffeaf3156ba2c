// Decode throughput of the inference engine on the GPU (bench/gpu.sh runs it on the H200): the
// bench-0.7b preset with random weights (as gpu_train builds them), prompt 128, 128 new tokens,
// greedy, batch 1 and 32, the whole engine (scheduler, runner, BF16 latent cache, device argmax) on
// the CUDA backend. Three weight formats: F32 (as trained), BF16 matrices (a BF16 checkpoint, the
// precision transformers runs in; the kernels read BF16 and compute in F32) and FP8 (as
// DeepSeek-V3's release: the matrices it stores in E4M3 with 128×128 block scales quantized so, the
// others BF16; the kernels widen FP8 to BF16 on tensor cores and compute in F32). The ratios against transformers are those of
// the BF16 run; the others' are recorded beside them (the comparison variants run for F32 and BF16).
// Tokens/s are counted as transformers' `generate` is (tools/hf_gpu_bench.py):
// B·128 new tokens over the whole call, prefill included; the decode-only rate and the median step
// time are printed beside it. With --hf FILE (that script's JSON from the same GPU) it records
// decode_bs1_speedup_vs_hf / decode_bs32_speedup_vs_hf. Each batch is also run without the
// tensor-core GEMV/expert path (cuda_set_decode_mma_rows(0)) and, the path before it, without it
// and with W_UK / W_UV on cuBLAS beyond 8 rows: the main run's ratio to the latter is
// speedup_vs_no_tensor_cores_cublas_absorbed (--variants mma runs only those two; --mma-rows N sets
// the tensor-core threshold of the main run). The main run replays its decode steps from CUDA
// graphs (ModelRunner::set_cuda_graphs); every batch is also run with eager launches, the same
// path otherwise, and the ratio is recorded as speedup_graphs_vs_eager (the other variants run
// eagerly). Unless --variants none (or DSV3_LATENT_ATTN_MMA=0), the main run is repeated with the
// generic latent attention's FP32 path (cuda_set_latent_attention_mma(false)):
// speedup_latent_attention_mma. Batches of 33–128 (--batch 64,128) are also run with steps beyond 32
// rows (--base-gemv-rows) on the backend's linears without graphs (device_gemv_rows 32, the limit
// before 2026-12-02): speedup_vs_base_gemv_rows. --out NAME writes bench/results/NAME.json instead.
//
// Roofline: bytes a step must read — the weights it touches (attention, norms, dense MLP, router,
// shared expert, the routed experts picked: top-k of them at batch 1, all at batch 32, lm_head, the
// batch's embedding rows) plus the latent cache read at the mean depth — over the device-to-device
// copy bandwidth the bench measures first (copy_bw_tb_s; a fixed 4.19 TB/s, an H200's, before
// 2026-12-07, which overstated the roofline on an H100 by ~1.4×).
//
// Host synchronisations per decode step are counted by bench/common/blocking_calls.h (every blocking
// copy and range check; kernel launches are counted by a profiler, see docs/cuda.md). Writes
// bench/results/gpu_decode.json.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "common/bench_util.h"

#ifndef DSV3_HAVE_CUDA
int main() {
  std::puts("gpu_decode: built without CUDA");
  return 1;
}
#else
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <fstream>
#include <optional>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "common/blocking_calls.h"
#include "common/gpu_bench.h"
#include "common/host_profile.h"
#include "backend/cuda/pdl.h"
#include "infer/cuda_decode_ops.h"
#include "infer/cuda_latent_attention.h"
#include "infer/engine.h"
#include "model/presets.h"

namespace {
int g_profile_steps = 0;       // --profile-steps: decode steps of the main run inside cudaProfilerStart/Stop
bool g_profile_prefill = false;  // --profile-prefill 1: the main run's prefill step instead (and its host profile)
int64_t g_small_rows = 8;  // --small-rows: the engine's small_rows in the main and eager runs (RMSNorms fused up to it)
int64_t g_gemv_rows = dsv3::ModelRunner::kDeviceGemvMaxRows;  // --gemv-rows: EngineOptions::device_gemv_rows of every run
int64_t g_base_rows = 32;  // --base-gemv-rows: the comparison run's device_gemv_rows (batches beyond it)
double g_copy_bw = 0;  // bytes/s read + write, measured by main before any run (bench::copy_bandwidth)
}  // namespace

using namespace dsv3;

namespace {

struct Result {
  int64_t batch = 0;
  double seconds = 0, tok_s = 0, decode_tok_s = 0, step_ms_median = 0, prefill_ms = 0;
  double memcpy_per_step = 0;
  ModelRunner::GraphStats graphs;
  double roofline_bytes = 0, roofline_step_ms = 0, roofline_tok_s = 0;
};

// Bytes of weights one decode step of B sequences touches, as stored (F32 or BF16).
double weight_bytes(const Weights& w, const ModelConfig& c, int64_t B) {
  const double E = double(c.n_routed_experts);
  const double frac = std::min(1.0, double(B * c.num_experts_per_tok) / E);
  double bytes = 0;
  for (const Param& p : w.params()) {
    const std::string& n = p.spec.name;
    const double b = double(p.w.nbytes()) + (present(p.scale_inv) ? double(p.scale_inv.nbytes()) : 0.0);
    const bool mtp = n.rfind("model.layers.", 0) == 0 &&
                     std::stoll(n.substr(13, n.find('.', 13) - 13)) >= c.num_hidden_layers;
    if (mtp) continue;
    if (n == "model.embed_tokens.weight")
      bytes += b / double(c.vocab_size) * double(B);
    else if (n.find(".mlp.experts.") != std::string::npos)
      bytes += b * frac;
    else
      bytes += b;
  }
  return bytes;
}

Result run(const Weights& w, int64_t B, int64_t prompt, int64_t n_new, uint64_t seed, bool sync_free,
           int64_t small_rows, bool graphs, bool profile = false, int64_t gemv_rows = -1) {
  const ModelConfig& c = w.config();
  EngineOptions opt;
  opt.device_gemv_rows = gemv_rows >= 0 ? gemv_rows : g_gemv_rows;
  opt.sync_free = sync_free;
  opt.cuda_graphs = graphs;
  opt.small_rows = small_rows;
  opt.cache.budget_bytes = uint64_t(512) << 20;
  opt.max_running = std::max<int64_t>(64, B);
  opt.prefill_chunk = prompt;
  opt.max_step_tokens = std::max<int64_t>(2048, B * prompt);
  Engine eng(w, opt, cuda_backend());
  auto add_all = [&](int64_t n) {
    for (int64_t b = 0; b < B; ++b) {
      Request r;
      for (int64_t i = 0; i < prompt; ++i)
        r.prompt.push_back(int32_t((uint64_t(seed + b * prompt + i) * 2654435761u >> 7) % uint64_t(c.vocab_size)));
      r.sampling.temperature = 0.0f;
      r.max_tokens = n;
      eng.add(r);
    }
  };
  add_all(8);  // warm-up: cuBLAS plans, the caching allocator, the device cache
  eng.run_all();
  cuda_backend().synchronize();

  add_all(n_new);
  Result res;
  res.batch = B;
  std::vector<double> steps;
  // DSV3_HOST_PROFILE=PATH samples the host's stack over the main run's decode steps into
  // PATH.b<batch>, or with --profile-prefill over its prefill into PATH.prefill.b<batch>
  // (tools/host_profile.py reads it).
  const char* prof_prefix = profile ? std::getenv("DSV3_HOST_PROFILE") : nullptr;
  const bool prof_prefill = profile && g_profile_prefill;
  std::optional<bench::HostProfiler> hprof;
  auto host_profile_start = [&] {
    if (!prof_prefix) return;
    hprof.emplace();
    hprof->start(100);
  };
  auto host_profile_write = [&](const char* what) {
    if (!hprof) return;
    hprof->stop();
    const std::string path = std::string(prof_prefix) + what + std::to_string(B);
    std::printf("host profile: %zu samples -> %s\n", hprof->samples(), path.c_str());
    if (!hprof->write(path)) std::fprintf(stderr, "host profile: cannot write %s\n", path.c_str());
    hprof.reset();
  };
  if (prof_prefill) {
    cudaProfilerStart();
    host_profile_start();
  }
  const double t0 = bench::now_s();
  eng.step();  // prefill of every prompt, first token
  const double t1 = bench::now_s();
  if (prof_prefill) {
    cudaProfilerStop();
    host_profile_write(".prefill.b");
  }
  const long m0 = bench::blocking_calls();
  if (!prof_prefill) host_profile_start();
  int64_t produced = 0;
  while (eng.has_work()) {
    const bool prof = profile && g_profile_steps > 0 && steps.size() >= 4 && steps.size() < 4 + size_t(g_profile_steps);
    if (prof) cudaProfilerStart();
    const double s0 = bench::now_s();
    for (const SeqEvent& e : eng.step()) produced += int64_t(e.tokens.size());
    steps.push_back(bench::now_s() - s0);
    if (prof) cudaProfilerStop();
  }
  const double t2 = bench::now_s();
  host_profile_write(".b");
  res.seconds = t2 - t0;
  res.prefill_ms = (t1 - t0) * 1e3;
  res.tok_s = double(B * n_new) / res.seconds;
  res.decode_tok_s = double(produced) / (t2 - t1);
  std::sort(steps.begin(), steps.end());
  res.step_ms_median = steps.empty() ? 0 : steps[steps.size() / 2] * 1e3;
  res.memcpy_per_step = steps.empty() ? 0 : double(bench::blocking_calls() - m0) / double(steps.size());
  res.graphs = eng.runner().graph_stats();
  const double depth = double(prompt) + double(n_new) / 2;
  const double cache = double(B) * depth * double(c.kv_lora_rank + c.qk_rope_head_dim) *
                       double(c.num_hidden_layers) * 2.0;
  res.roofline_bytes = weight_bytes(w, c, B) + cache;
  res.roofline_step_ms = res.roofline_bytes / g_copy_bw * 1e3;
  res.roofline_tok_s = double(B) / (res.roofline_step_ms / 1e3);
  return res;
}

}  // namespace

int main(int argc, char** argv) {
  std::string preset = "bench-0.7b", hf_path, out_name = "gpu_decode";
  int64_t prompt = 128, n_new = 128;
  std::vector<int64_t> batches = {1, 32};
  std::string variants_on = "all";
  int mma_rows = -1;  // -1: the library's default
  std::vector<std::string> formats = {"bf16", "f32", "fp8"};
  const char* usage =
      "usage: dsv3_bench_gpu_decode [--preset bench-0.7b] [--prompt 128] [--new 128] [--batch B[,B...] (default "
      "1,32)] [--weights f32|bf16|fp8[,...] (default all three)] [--hf hf_gpu.json] [--variants all|mma|none (default all; "
      "1 = all, 0 = none)] [--mma-rows N (tensor cores from N rows; 0 off; default the library's)] [--profile-steps K] "
      "[--profile-prefill 1] [--small-rows N (default 8)] [--gemv-rows N (steps of up to N rows on the GEMV kernels and graphs; "
      "default and most 128)] [--base-gemv-rows N (the comparison run's; default 32)] [--out NAME (bench/results/NAME.json; default gpu_decode)]\n";
  if (const int rc = bench::check_pair_args(argc, argv, usage); rc >= 0) return rc;
  const auto items = bench::split_list;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--preset") preset = v;
    else if (k == "--prompt") prompt = std::stoll(v);
    else if (k == "--new") n_new = std::stoll(v);
    else if (k == "--batch") {
      batches.clear();
      for (const std::string& b : items(v)) batches.push_back(std::stoll(b));
    }
    else if (k == "--mma-rows") mma_rows = std::stoi(v);
    else if (k == "--hf") hf_path = v;
    else if (k == "--profile-steps") g_profile_steps = std::stoi(v);
    else if (k == "--profile-prefill" && (v == "0" || v == "1")) g_profile_prefill = v == "1";
    else if (k == "--small-rows") g_small_rows = std::stoll(v);
    else if ((k == "--gemv-rows" || k == "--base-gemv-rows") && std::stoll(v) >= 0 &&
             std::stoll(v) <= ModelRunner::kDeviceGemvMaxRows)
      (k == "--gemv-rows" ? g_gemv_rows : g_base_rows) = std::stoll(v);
    else if (k == "--out" && !v.empty() && v.find('/') == std::string::npos) out_name = v;
    else if (k == "--variants" && (v == "all" || v == "none" || v == "mma" || v == "0" || v == "1"))
      variants_on = v == "0" ? "none" : v == "1" ? "all" : v;
    else if (k == "--weights") {
      formats = items(v);
      for (const std::string& f : formats)
        if (f != "f32" && f != "bf16" && f != "fp8") {
          std::fprintf(stderr, "gpu_decode: --weights %s: %s is not f32, bf16 or fp8\n%s", v.c_str(), f.c_str(), usage);
          return 2;
        }
    }
    else {
      std::fputs(usage, stderr);
      return 2;
    }
  }
  if (mma_rows >= 0) cuda_set_decode_mma_rows(mma_rows);
  const int mma_default = cuda_decode_mma_rows();
  const int64_t absorbed_default = cuda_absorbed_gemv_rows();
  const ModelConfig cfg = preset_config(preset);
  std::printf("gpu_decode: preset %s, prompt %ld, %ld new tokens, greedy, BF16 latent cache\n", preset.c_str(),
              long(prompt), long(n_new));
  const Weights w32 = Weights::random(cfg, 1, 0.02f);
  g_copy_bw = bench::copy_bandwidth();
  std::printf("device-to-device copy: %.0f GB/s (read + write; the rooflines' bandwidth)\n", g_copy_bw / 1e9);
  nlohmann::json hf;
  if (!hf_path.empty()) {
    std::ifstream in(hf_path);
    if (in) hf = nlohmann::json::parse(in);
    else std::fprintf(stderr, "gpu_decode: cannot read %s; no ratios\n", hf_path.c_str());
  }
  auto hf_tok = [&](int64_t B) -> double {
    if (hf.is_null() || !hf.contains("decode")) return 0;
    for (const auto& d : hf["decode"])
      if (d["batch"].get<int64_t>() == B) return d["tokens_per_s"].get<double>();
    return 0;
  };
  nlohmann::json res = {{"bench", "gpu_decode"}, {"preset", preset}, {"prompt", prompt}, {"new_tokens", n_new},
                        {"cache", "bf16"}, {"copy_bw_tb_s", g_copy_bw / 1e12}};
  res["runs"] = nlohmann::json::array();
  for (const std::string& fmt : formats) {
    Weights w = w32;
    if (fmt == "bf16") round_matrices_to_bf16(w);
    if (fmt == "fp8") quantize_matrices_to_fp8(w);
    // FP8 weights take the tensor-core kernels whatever the variant, and the backend's linear widens
    // them to F32 per call: the comparison variants are for F32 and BF16.
    const std::string fmt_variants = fmt == "fp8" ? "none" : variants_on;
    std::printf("\n%s weights\n%5s %10s %12s %10s %10s %9s %14s %10s %8s\n", fmt.c_str(), "batch", "tok/s",
                "decode tok/s", "step ms", "prefill ms", "syncs/st", "roofline tok/s", "hf tok/s", "vs hf");
    for (int64_t B : batches) {
      // For comparison: the backend ops throughout (range checks and expert counts read back), the
      // synchronisation-free path with cuBLAS for every linear (no GEMV kernel), the main path
      // without programmatic dependent launch, without the tensor-core GEMV/expert path (F32 FMAs),
      // and without it with W_UK / W_UV on cuBLAS beyond 8 rows (the path before both).
      nlohmann::json variants = nlohmann::json::array();
      double old_path_tok_s = 0;
      for (int v = fmt_variants == "all" ? 0 : 3; fmt_variants != "none" && v < 5; ++v) {
        if (v == 2) cuda_set_pdl(false);
        if (v >= 3) cuda_set_decode_mma_rows(0);
        if (v == 4) cuda_set_absorbed_gemv_rows(8);
        const Result ref = run(w, B, prompt, n_new, 1000 + uint64_t(B), v != 0, v >= 2 ? 8 : 0, false);
        cuda_set_pdl(true);
        cuda_set_decode_mma_rows(mma_default);
        cuda_set_absorbed_gemv_rows(absorbed_default);
        if (v == 4) old_path_tok_s = ref.tok_s;
        const char* what = v == 0   ? "backend ops (RoPE/MoE synchronise), cuBLAS linears"
                           : v == 1 ? "sync-free, cuBLAS linears"
                           : v == 2 ? "sync-free, GEMV kernels, no programmatic dependent launch"
                           : v == 3 ? "sync-free, GEMV kernels, PDL, no tensor cores (F32 FMAs)"
                                    : "sync-free, GEMV kernels, PDL, no tensor cores, W_UK/W_UV on cuBLAS beyond 8 rows";
        std::printf("%5ld %10.1f %12.1f %10.3f %10.2f %9.1f   (%s)\n", long(B), ref.tok_s, ref.decode_tok_s,
                    ref.step_ms_median, ref.prefill_ms, ref.memcpy_per_step, what);
        variants.push_back({{"variant", what},
                            {"tokens_per_s", ref.tok_s},
                            {"decode_tokens_per_s", ref.decode_tok_s},
                            {"step_ms_median", ref.step_ms_median},
                            {"host_syncs_per_step", ref.memcpy_per_step}});
      }
      // The main path with eager launches, then with CUDA graphs.
      const Result eager = run(w, B, prompt, n_new, 1000 + uint64_t(B), true, g_small_rows, false);
      std::printf("%5ld %10.1f %12.1f %10.3f %10.2f %9.1f   (eager launches, no CUDA graphs)\n", long(B), eager.tok_s,
                  eager.decode_tok_s, eager.step_ms_median, eager.prefill_ms, eager.memcpy_per_step);
      variants.push_back({{"variant", "eager launches (no CUDA graphs), otherwise the main path"},
                          {"tokens_per_s", eager.tok_s},
                          {"decode_tokens_per_s", eager.decode_tok_s},
                          {"step_ms_median", eager.step_ms_median},
                          {"host_syncs_per_step", eager.memcpy_per_step}});
      const Result r = run(w, B, prompt, n_new, 1000 + uint64_t(B), true, g_small_rows, true, true);
      // The same with the generic latent attention's FP32 path instead of its tensor-core one.
      Result attn_fp32;
      if (fmt_variants != "none" && cuda_latent_attention_mma()) {
        cuda_set_latent_attention_mma(false);
        attn_fp32 = run(w, B, prompt, n_new, 1000 + uint64_t(B), true, g_small_rows, true, true);
        cuda_set_latent_attention_mma(true);
      }
      // Batches beyond --base-gemv-rows (32: the limit before 2026-12-02) up to --gemv-rows: also
      // with that limit (those steps on the backend's linears (cuBLASLt), no graphs), the main
      // path otherwise.
      Result narrow;
      if (B > g_base_rows && B <= g_gemv_rows)
        narrow = run(w, B, prompt, n_new, 1000 + uint64_t(B), true, g_small_rows, true, false, g_base_rows);
      const ModelRunner::GraphStats& g = r.graphs;
      const double graph_speedup = r.step_ms_median > 0 ? eager.step_ms_median / r.step_ms_median : 0.0;
      const double h = hf_tok(B);
      std::printf("%5ld %10.1f %12.1f %10.3f %10.2f %9.1f %14.1f %10.1f %8.2f   (main: tensor cores from %d rows)\n",
                  long(B), r.tok_s, r.decode_tok_s, r.step_ms_median, r.prefill_ms, r.memcpy_per_step,
                  r.roofline_tok_s, h, h > 0 ? r.tok_s / h : 0.0, mma_default);
      std::printf("      CUDA graphs: %.2fx the eager step time, %.2fx its tokens/s (same run); %ld replays, %ld "
                  "captures, %ld eager steps, %zu nodes, %.1f MB kept%s%s\n",
                  graph_speedup, r.tok_s / eager.tok_s, long(g.replays), long(g.captures), long(g.eager), g.nodes,
                  double(g.memory_bytes) / 1e6, g.disabled ? "; DISABLED: " : g.error.empty() ? "" : "; ",
                  g.error.c_str());
      if (old_path_tok_s > 0)
        std::printf("      %.2fx the path without tensor cores and W_UK/W_UV on cuBLAS (same run)\n",
                    r.tok_s / old_path_tok_s);
      if (narrow.tok_s > 0)
        std::printf("      GEMV kernels and graphs up to %ld rows: %.2fx the tokens/s of the backend's linears beyond %ld "
                    "rows (%.1f tok/s, step %.3f ms, prefill %.2f ms; same run)\n",
                    long(g_gemv_rows), r.tok_s / narrow.tok_s, long(g_base_rows), narrow.tok_s, narrow.step_ms_median,
                    narrow.prefill_ms);
      if (attn_fp32.tok_s > 0)
        std::printf("      latent attention on tensor cores: %.2fx the tokens/s of its FP32 path (step %.3f against "
                    "%.3f ms, prefill %.2f against %.2f ms; same run)\n",
                    r.tok_s / attn_fp32.tok_s, r.step_ms_median, attn_fp32.step_ms_median, r.prefill_ms,
                    attn_fp32.prefill_ms);
      nlohmann::json j = {{"batch", B},
                          {"weights", fmt},
                          {"seconds", r.seconds},
                          {"tokens_per_s", r.tok_s},
                          {"decode_tokens_per_s", r.decode_tok_s},
                          {"step_ms_median", r.step_ms_median},
                          {"prefill_ms", r.prefill_ms},
                          {"host_syncs_per_step", r.memcpy_per_step},
                          {"roofline_bytes_per_step", r.roofline_bytes},
                          {"roofline_step_ms", r.roofline_step_ms},
                          {"roofline_tokens_per_s", r.roofline_tok_s},
                          {"fraction_of_roofline", r.step_ms_median > 0 ? r.roofline_step_ms / r.step_ms_median : 0},
                          {"variant", cat("CUDA graphs, sync-free, GEMV kernels (up to ", g_gemv_rows,
                                          " rows), PDL, tensor cores from ",
                                          mma_default, " rows (BF16 weights), W_UK/W_UV GEMV up to ",
                                          absorbed_default, " rows")},
                          {"mma_rows", mma_default},
                          {"cuda_graphs",
                           {{"replays", g.replays},
                            {"captures", g.captures},
                            {"eager_steps", g.eager},
                            {"kernel_nodes", g.nodes},
                            {"memory_bytes", g.memory_bytes},
                            {"disabled", g.disabled},
                            {"error", g.error}}},
                          {"eager_step_ms_median", eager.step_ms_median},
                          {"eager_tokens_per_s", eager.tok_s},
                          {"speedup_graphs_vs_eager", graph_speedup},
                          {"other_variants", variants}};
      if (old_path_tok_s > 0) j["speedup_vs_no_tensor_cores_cublas_absorbed"] = r.tok_s / old_path_tok_s;
      j["device_gemv_rows"] = g_gemv_rows;
      if (narrow.tok_s > 0) {
        j["base_gemv_rows"] = g_base_rows;
        j["base_gemv_rows_tokens_per_s"] = narrow.tok_s;
        j["base_gemv_rows_step_ms_median"] = narrow.step_ms_median;
        j["base_gemv_rows_prefill_ms"] = narrow.prefill_ms;
        j["speedup_vs_base_gemv_rows"] = r.tok_s / narrow.tok_s;
      }
      if (attn_fp32.tok_s > 0) {
        j["latent_attention_fp32_step_ms_median"] = attn_fp32.step_ms_median;
        j["latent_attention_fp32_prefill_ms"] = attn_fp32.prefill_ms;
        j["speedup_latent_attention_mma"] = r.tok_s / attn_fp32.tok_s;
      }
      if (h > 0) {
        j["hf_tokens_per_s"] = h;
        const std::string key = cat("decode_bs", B, "_speedup_vs_hf", fmt == "bf16" ? "" : "_" + fmt + "_weights");
        res[key] = r.tok_s / h;
      }
      res["runs"].push_back(j);
    }
  }
  std::printf("wrote %s\n", bench::write_result(out_name, res).c_str());
  return 0;
}
#endif
