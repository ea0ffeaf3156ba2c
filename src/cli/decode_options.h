// The options `dsv3 generate` and `dsv3 chat` share: sampling, MTP speculation, KV cache and
// threads, with one set of flag names, help strings, defaults and checks.
#pragma once
#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>
#include <vector>

#include "infer/engine.h"
#include "infer/sampler.h"
#include "model/weights.h"

namespace dsv3::cli {

struct DecodeOptions {
  int64_t top_k = 40, ctx_size = 0, block_size = 64;
  float temp = 0.8f, top_p = 0.95f, min_p = 0.05f, repeat_penalty = 1.0f;
  uint64_t seed = 0;
  int mtp = 0, threads = 0;
  double cache_mb = 256;
  std::string cache_type = "f32";
  std::string device = "cpu";
  std::string weights = "stored";

  // --weights bf16: the F32 matrices rounded to BF16 in place (norms, the router bias and FP8/BF16
  // tensors as stored); checked with the other engine options.
  void apply_weights(Weights& w) const;

  // Checked values (InputError naming the flag).
  SamplingParams sampling() const;
  // Cache, speculation and context settings for one sequence at a time; checked.
  EngineOptions engine() const;
};

// The ids of --prompt-ids "ID ID ..." (model/model.h parse_token_ids, whose errors name dsv3
// forward's --tokens; these name --prompt-ids).
std::vector<int32_t> parse_prompt_ids(const std::string& text, int64_t vocab_size);

// --temp --top-k --top-p --min-p --repeat-penalty -s/--seed (`seed_help` says how the seed is used).
void add_sampling_options(CLI::App& app, DecodeOptions& o, const std::string& seed_help);
// --mtp, -c/--ctx-size, --cache-mb, --cache-type, --block-size when `with_block_size`, -t/--threads,
// --device, --weights.
void add_engine_options(CLI::App& app, DecodeOptions& o, bool with_block_size);

}  // namespace dsv3::cli
