// Decode speed of the absorbed latent-cache path against the plain per-head K/V path, in the same
// run on the same weights: tok/s at batch 1 and 16, at two cache depths, for the tiny and
// bench-0.7b presets (random weights; speed does not depend on the values). Cache rows before the
// depth are filled with random values instead of a prefill (as llama-bench's -d measures at a
// depth; only the decode steps are timed; each figure is the median of three runs). Bytes per token of both caches. Then MTP speculative
// decoding at batch 1 through the engine (greedy, output checked equal to plain decoding):
// acceptance per draft position and the speed-up over the same engine without drafts.
//
//   dsv3_bench_decode [--quick] [--spec-only] [--preset NAME] [--small-rows N] [--no-spec] [--threads N]
//                     [--spec-model DIR [--spec-prompt TEXT | --spec-prompt-ids "ID ..."]]
//                     [--device cpu|cuda] [--weights stored|bf16] [--spec-reps N]
// --small-rows: the runner's lean-path row limit for the decode table (runner.h; 0: general path).
// (bench/spec_model.py trains a small model with an MTP module for --spec-model.)
// --device cuda runs only the speculation part, on the GPU engine, with and without CUDA graphs
// (in place of the CPU's lean and general step paths); DSV3_HOST_PROFILE=PREFIX then samples the
// host's stack over each first turn into PREFIX.<path>.d<drafts> (tools/host_profile.py).
// Writes bench/results/decode.json (decode_spec.json with --spec-only, gpu_spec.json on CUDA).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>

#include "common/bench_util.h"
#include "common/host_profile.h"
#include "core/rng.h"
#include "core/threads.h"
#include "infer/engine.h"
#include "io/tokenizer.h"
#include "model/presets.h"

using namespace dsv3;
using bench::now_s;

namespace {

// Cheap deterministic values in [-1, 1) for cache rows before the depth (their values do not
// change the work done).
float fill_value(uint64_t i) { return float(splitmix64(i) >> 40) * (2.0f / 16777216.0f) - 1.0f; }

// Median of three runs.
template <class F>
double median3(F f) {
  double a = f(), b = f(), c = f();
  return std::max(std::min(a, b), std::min(std::max(a, b), c));
}

struct Result {
  double absorbed_tps = 0, plain_tps = 0;
};

// B sequences at depth `depth`, `steps` greedy decode steps through the runner with the given cache.
double decode_tps(ModelRunner& runner, AttentionCache& cache, int64_t B, int64_t depth, int64_t steps) {
  const int64_t V = runner.config().vocab_size;
  std::vector<int32_t> toks(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) toks[size_t(b)] = int32_t((b * 131 + 7) % V);
  double t0 = 0;
  for (int64_t s = 0; s <= steps; ++s) {
    if (s == 1) t0 = now_s();  // step 0 is warm-up
    StepRows rows;
    std::vector<int32_t> lr;
    for (int64_t b = 0; b < B; ++b) {
      rows.seq.push_back(int32_t(b));
      rows.pos.push_back(depth + s);
      lr.push_back(int32_t(b));
    }
    auto o = runner.forward(cache, rows, toks, lr);
    for (int64_t b = 0; b < B; ++b) {
      const float* l = o.logits.data<float>() + b * V;
      toks[size_t(b)] = int32_t(std::max_element(l, l + V) - l);
    }
  }
  return double(B * steps) / (now_s() - t0);
}

Result measure(ModelRunner& runner, int64_t B, int64_t depth, int64_t steps, uint64_t* latent_bpt, uint64_t* plain_bpt) {
  const ModelConfig& c = runner.config();
  const ModelDims& d = runner.dims();
  const int64_t L = c.num_hidden_layers, W = d.kv_lora + d.rope, total = depth + steps + 1;
  Result r;
  {
    KvCacheOptions o;
    o.block_size = 64;
    LatentKvPool probe(L, d.kv_lora, d.rope, KvCacheOptions{64, uint64_t(1) << 30, DType::F32});
    o.budget_bytes = probe.bytes_per_token() * uint64_t(B * ((total + 63) / 64) * 64);
    LatentKvPool pool(L, d.kv_lora, d.rope, o);
    *latent_bpt = pool.bytes_per_token();
    std::vector<BlockTable> tables(static_cast<size_t>(B));
    LatentAttention cache(pool, runner.absorbed(), d);
    std::vector<float> row(static_cast<size_t>(W));
    for (int64_t b = 0; b < B; ++b) {
      pool.reserve(tables[size_t(b)], total);
      cache.tables.push_back(&tables[size_t(b)]);
      for (int64_t l = 0; l < L; ++l)
        for (int64_t p = 0; p < depth; ++p) {
          for (int64_t i = 0; i < W; ++i) row[size_t(i)] = fill_value(uint64_t((b * L + l) * total + p) * uint64_t(W) + uint64_t(i));
          pool.write(tables[size_t(b)], l, p, row.data(), row.data() + d.kv_lora);
        }
    }
    r.absorbed_tps = median3([&] { return decode_tps(runner, cache, B, depth, steps); });
  }
  {
    PlainAttention cache(cpu_backend(), d, L);
    *plain_bpt = cache.bytes_per_token();
    std::vector<PlainSeqCache> seqs(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) {
      PlainSeqCache& s = seqs[size_t(b)];
      s.k.resize(size_t(L));
      s.v.resize(size_t(L));
      for (int64_t l = 0; l < L; ++l) {
        s.k[size_t(l)].resize(size_t(total * d.nh * d.qk));
        s.v[size_t(l)].resize(size_t(total * d.nh * d.vd));
        for (size_t i = 0; i < size_t(depth * d.nh * d.qk); ++i) s.k[size_t(l)][i] = fill_value(i * 3 + uint64_t(b + l));
        for (size_t i = 0; i < size_t(depth * d.nh * d.vd); ++i) s.v[size_t(l)][i] = fill_value(i * 5 + uint64_t(b + l));
      }
      cache.seqs.push_back(&s);
    }
    r.plain_tps = median3([&] { return decode_tps(runner, cache, B, depth, steps); });
  }
  return r;
}

}  // namespace

int run(int argc, char** argv) {
  bool quick = false, spec_only = false, no_spec = false;
  std::string spec_model, spec_prompt, spec_text, only_preset, device = "cpu", weights = "stored";
  int64_t small_rows = EngineOptions().small_rows;
  int spec_reps = 0;  // 0: 7 (1 with --quick)
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--spec-only")) spec_only = true;
    else if (!std::strcmp(argv[i], "--spec-model") && i + 1 < argc) spec_model = argv[++i];
    else if (!std::strcmp(argv[i], "--spec-prompt-ids") && i + 1 < argc) spec_prompt = argv[++i];
    else if (!std::strcmp(argv[i], "--spec-prompt") && i + 1 < argc) spec_text = argv[++i];
    else if (!std::strcmp(argv[i], "--threads") && i + 1 < argc) set_num_threads(std::atoi(argv[++i]));
    else if (!std::strcmp(argv[i], "--small-rows") && i + 1 < argc) small_rows = std::atoll(argv[++i]);
    else if (!std::strcmp(argv[i], "--preset") && i + 1 < argc) only_preset = argv[++i];
    else if (!std::strcmp(argv[i], "--no-spec")) no_spec = true;
    else if (!std::strcmp(argv[i], "--device") && i + 1 < argc) device = argv[++i];
    else if (!std::strcmp(argv[i], "--weights") && i + 1 < argc) weights = argv[++i];
    else if (!std::strcmp(argv[i], "--spec-reps") && i + 1 < argc) {
      const std::string v = argv[++i];
      if (v.empty() || v.size() > 6 || v.find_first_not_of("0123456789") != std::string::npos)
        input_error("--spec-reps: '", v, "' (expected a whole number >= 1, or 0 for the default)");
      spec_reps = std::stoi(v);
    }
    else {
      std::fprintf(stderr,
                   "usage: %s [--quick] [--spec-only | --no-spec] [--preset NAME] [--small-rows N] [--threads N]\n"
                   "          [--spec-model DIR [--spec-prompt TEXT | --spec-prompt-ids \"ID ...\"]]\n"
                   "          [--device cpu|cuda] [--weights stored|bf16] [--spec-reps N]\n",
                   argv[0]);
      return 2;
    }
  }
  if (weights != "stored" && weights != "bf16") input_error("--weights: '", weights, "' (expected stored or bf16)");
  Backend& be = backend_named(device);
  const bool gpu = be.device() == Device::CUDA;
  if (gpu && no_spec) input_error("--device cuda measures speculation only; --no-spec leaves nothing to run");
  if (gpu) spec_only = true;
  nlohmann::json out;
  out["threads"] = num_threads();
  out["device"] = device;
  out["weights"] = weights;
  out["small_rows"] = small_rows;
  out["decode"] = nlohmann::json::array();

  struct P {
    const char* name;
    std::vector<int64_t> depths;
    int64_t steps;
  };
  std::vector<P> presets = {{"tiny", {128, 448}, 32}, {"bench-0.7b", {128, 2048}, 12}};
  if (quick) presets = {{"tiny", {64}, 4}};
  if (!only_preset.empty())
    presets.erase(std::remove_if(presets.begin(), presets.end(), [&](const P& p) { return only_preset != p.name; }),
                  presets.end());
  if (spec_only) presets.clear();
  if (!presets.empty()) {
    std::printf("| preset | batch | depth | absorbed tok/s | plain tok/s | speed-up | latent B/token | plain B/token | ratio |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|\n");
  }
  for (const P& p : presets) {
    const ModelConfig c = preset_config(p.name);
    Weights w = Weights::random(c, 1);
    ModelRunner runner(w);
    runner.set_small_rows(small_rows);
    for (int64_t B : {int64_t(1), int64_t(16)})
      for (int64_t depth : p.depths) {
        uint64_t lb = 0, pb = 0;
        const Result r = measure(runner, B, depth, p.steps, &lb, &pb);
        std::printf("| %s | %lld | %lld | %.1f | %.1f | %.2fx | %llu | %llu | %.1fx |\n", p.name, (long long)B,
                    (long long)depth, r.absorbed_tps, r.plain_tps, r.absorbed_tps / r.plain_tps,
                    (unsigned long long)lb, (unsigned long long)pb, double(pb) / double(lb));
        std::fflush(stdout);
        out["decode"].push_back({{"preset", p.name}, {"batch", B}, {"depth", depth}, {"steps", p.steps},
                                 {"absorbed_tok_s", r.absorbed_tps}, {"plain_tok_s", r.plain_tps},
                                 {"latent_cache_bytes_per_token", lb}, {"plain_cache_bytes_per_token", pb}});
      }
  }

  if (no_spec) {
    const std::string name = "decode_" + (only_preset.empty() ? std::string("all") : only_preset);
    const std::string path = bench::write_result(name, out);
    std::printf("\nwrote %s\n", path.c_str());
    return 0;
  }
  // Speculative decoding at batch 1 through the engine. Plain decoding (the same engine without
  // drafts, i.e. the engine's normal decode path) and every draft count run in turns, `reps` times;
  // each figure is the median of its turns, so both sides of a ratio see the same machine load.
  Weights w = spec_model.empty() ? Weights::random(preset_config("tiny"), 1) : Weights::load(spec_model);
  if (weights == "bf16") round_matrices_to_bf16(w);
  const std::string model_name = spec_model.empty() ? "tiny (random weights, untrained)" : spec_model;
  const int64_t n_gen = quick ? 16 : 96;
  const int reps = spec_reps > 0 ? spec_reps : quick ? 1 : 7;
  std::vector<int32_t> prompt = {0, 17, 42, 99, 7, 255, 31, 12};
  if (!spec_prompt.empty()) prompt = parse_token_ids(spec_prompt, w.config().vocab_size);
  if (!spec_text.empty()) {
    if (spec_model.empty()) input_error("--spec-prompt needs --spec-model (its tokenizer.json)");
    prompt = Tokenizer::load(spec_model + "/tokenizer.json").encode(spec_text);
  }
  // CPU: the lean step path or the general one; CUDA: steps replayed from graphs or launched eagerly.
  const char* prof_prefix = std::getenv("DSV3_HOST_PROFILE");
  auto gen = [&](bool first_path, int mtp, EngineStats* st, double* secs, const std::string& profile_to) {
    EngineOptions o;
    o.draft_tokens = mtp;
    if (!first_path && !gpu) o.small_rows = 0;
    if (!first_path && gpu) o.cuda_graphs = false;
    Engine eng(w, o, be);
    Request r;
    r.prompt = prompt;
    r.max_tokens = n_gen;
    eng.add(r);
    std::vector<int32_t> toks;
    eng.step();  // prefill (not timed)
    std::optional<bench::HostProfiler> prof;
    if (!profile_to.empty()) prof.emplace().start(100);
    const double t0 = now_s();
    while (eng.has_work())
      for (const SeqEvent& e : eng.step()) toks.insert(toks.end(), e.tokens.begin(), e.tokens.end());
    *secs = now_s() - t0;
    if (prof) {
      prof->stop();
      std::printf("host profile: %zu samples -> %s\n", prof->samples(), profile_to.c_str());
      if (!prof->write(profile_to)) std::fprintf(stderr, "host profile: cannot write %s\n", profile_to.c_str());
    }
    *st = eng.stats();
    return toks;
  };
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  double load0[3] = {0, 0, 0}, load1[3] = {0, 0, 0};
  getloadavg(load0, 3);
  // Both step paths of the runner (runner.h): the lean one the engine uses for steps of a few rows,
  // and the general one (backend ops throughout) for comparison.
  const std::vector<int> drafts = {0, 1, 2, 3};
  const char* path_names[2] = {gpu ? "graphs" : "lean", gpu ? "eager" : "general"};
  const size_t C = 2 * drafts.size();
  std::vector<std::vector<double>> secs(C);
  std::vector<EngineStats> stats(C);
  std::vector<std::vector<int32_t>> outs(C);
  bool identical = true;
  for (int rep = 0; rep < reps; ++rep)
    for (size_t c = 0; c < C; ++c) {
      double t = 0;
      std::string profile_to;
      if (prof_prefix && rep == 0)
        profile_to = std::string(prof_prefix) + "." + path_names[c < drafts.size() ? 0 : 1] + ".d" +
                     std::to_string(drafts[c % drafts.size()]);
      const auto toks = gen(c < drafts.size(), drafts[c % drafts.size()], &stats[c], &t, profile_to);
      secs[c].push_back(t);
      if (rep == 0) outs[c] = toks;
      identical = identical && toks == outs[c];
    }
  getloadavg(load1, 3);
  out["speculative"] = nlohmann::json::array();
  out["spec_prompt_tokens"] = prompt.size();
  out["spec_prompt"] = spec_text.empty() ? nlohmann::json(prompt) : nlohmann::json(spec_text);
  out["spec_generated_tokens"] = n_gen;
  out["spec_repetitions"] = reps;
  out["load_average_1min"] = {load0[0], load1[0]};
  std::printf("\nMTP speculative decoding, batch 1, greedy, %zu prompt + %lld generated tokens, model %s (%s weights),"
              " on %s, %d threads, median of %d turns, load average %.1f -> %.1f\n",
              prompt.size(), (long long)n_gen, model_name.c_str(), weights.c_str(), device.c_str(), num_threads(), reps,
              load0[0], load1[0]);
  std::printf("| step path | drafts | tok/s | plain tok/s | speed-up | tokens/verification | acceptance per position"
              " | output == plain |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  for (size_t c = 0; c < C; ++c) {
    const size_t base = c < drafts.size() ? 0 : drafts.size();
    const char* path_name = path_names[c < drafts.size() ? 0 : 1];
    // Tokens after the prefill's first one, per second.
    const double tps0 = double(outs[base].size() - 1) / median(secs[base]);
    const double tps = double(outs[c].size() - 1) / median(secs[c]);
    const bool same = outs[c] == outs[0] && identical;
    if (c == base) {
      std::printf("| %s | 0 | %.1f | %.1f | 1.00x | 1.00 | - | %s |\n", path_name, tps, tps0, same ? "yes" : "NO");
      out["plain"].push_back(
          {{"step_path", path_name}, {"tok_s", tps}, {"seconds", secs[c]}, {std::string("output_identical_to_") + path_names[0], same}});
      continue;
    }
    const SpecStats& sp = stats[c].spec;
    std::string acc;
    nlohmann::json rates = nlohmann::json::array();
    for (size_t j = 0; j < sp.proposed.size(); ++j) {
      char b[64];
      std::snprintf(b, sizeof b, "%s%.1f%%", j ? " / " : "", 100 * sp.rate(j));
      acc += b;
      rates.push_back(sp.rate(j));
    }
    std::printf("| %s | %d | %.1f | %.1f | %.2fx | %.2f | %s | %s |\n", path_name, drafts[c % drafts.size()], tps,
                tps0, tps / tps0, sp.tokens_per_round(), acc.c_str(), same ? "yes" : "NO");
    out["speculative"].push_back({{"model", model_name},
                                  {"step_path", path_name},
                                  {"draft_tokens", drafts[c % drafts.size()]},
                                  {"tok_s", tps},
                                  {"plain_tok_s", tps0},
                                  {"speedup", tps / tps0},
                                  {"tokens_per_verification", sp.tokens_per_round()},
                                  {"acceptance_per_position", rates},
                                  {"greedy_output_identical", same},
                                  {"seconds", secs[c]}});
  }
  const std::string path = bench::write_result(gpu ? "gpu_spec" : spec_only ? "decode_spec" : "decode", out);
  std::printf("\nwrote %s\n", path.c_str());
  return 0;
}

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const InputError& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
