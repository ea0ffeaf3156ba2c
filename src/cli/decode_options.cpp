#include "cli/decode_options.h"

#include "core/error.h"
#include "model/model.h"

namespace dsv3::cli {

std::vector<int32_t> parse_prompt_ids(const std::string& text, int64_t vocab_size) {
  try {
    return parse_token_ids(text, vocab_size);
  } catch (const InputError& e) {
    const std::string m = e.what(), from = "--tokens";
    if (m.compare(0, from.size(), from) != 0) throw;
    throw InputError("--prompt-ids" + m.substr(from.size()));
  }
}

SamplingParams DecodeOptions::sampling() const {
  SamplingParams sp;
  sp.temperature = temp;
  sp.top_k = top_k;
  sp.top_p = top_p;
  sp.min_p = min_p;
  sp.repeat_penalty = repeat_penalty;
  sp.seed = seed;
  sp.validate();
  return sp;
}

EngineOptions DecodeOptions::engine() const {
  // Bounded before the conversion to bytes, which is undefined past 2^64 (inf, 1e30).
  constexpr double kMaxCacheMb = double(1 << 30);  // 1 PiB: far past any machine
  if (!(cache_mb > 0) || !(cache_mb <= kMaxCacheMb))
    input_error("--cache-mb: ", cache_mb, " is invalid (expected a size in MiB, > 0 and <= ", kMaxCacheMb, ")");
  EngineOptions eo;
  if (cache_type == "f32") eo.cache.dtype = DType::F32;
  else if (cache_type == "bf16") eo.cache.dtype = DType::BF16;
  else input_error("--cache-type: '", cache_type, "' (expected f32 or bf16)");
  if (weights != "stored" && weights != "bf16" && weights != "fp8")
    input_error("--weights: '", weights, "' (expected stored, bf16 or fp8)");
  eo.cache.block_size = block_size;
  eo.cache.budget_bytes = uint64_t(cache_mb * double(1 << 20));
  eo.draft_tokens = mtp;
  eo.max_context = ctx_size;
  eo.max_running = 1;
  return eo;
}

void DecodeOptions::apply_weights(Weights& w) const {
  if (weights == "bf16") round_matrices_to_bf16(w);
  if (weights == "fp8") quantize_matrices_to_fp8(w);
}

void add_sampling_options(CLI::App& app, DecodeOptions& o, const std::string& seed_help) {
  app.add_option("--temp", o.temp, "temperature (0 = greedy)")->capture_default_str();
  app.add_option("--top-k", o.top_k, "keep the k most likely tokens (0 = off)")->capture_default_str();
  app.add_option("--top-p", o.top_p, "nucleus sampling mass (1 = off)")->capture_default_str();
  app.add_option("--min-p", o.min_p, "drop tokens below min_p x the top probability (0 = off)")->capture_default_str();
  app.add_option("--repeat-penalty", o.repeat_penalty, "penalty on tokens already in the sequence (1 = off)")
      ->capture_default_str();
  app.add_option("-s,--seed", o.seed, seed_help)->capture_default_str();
}

void add_engine_options(CLI::App& app, DecodeOptions& o, bool with_block_size) {
  app.add_option("--mtp", o.mtp, "MTP speculative decoding: draft tokens per step (0 = off)")->capture_default_str();
  app.add_option("-c,--ctx-size", o.ctx_size, "context length (0 = max_position_embeddings)")->capture_default_str();
  app.add_option("--cache-mb", o.cache_mb, "KV cache pool size in MiB")->capture_default_str();
  app.add_option("--cache-type", o.cache_type, "KV cache storage: f32 or bf16")->capture_default_str();
  if (with_block_size)
    app.add_option("--block-size", o.block_size, "KV cache block size in tokens")->capture_default_str();
  app.add_option("-t,--threads", o.threads, "CPU threads (0 = all cores)")->capture_default_str();
  app.add_option("--device", o.device, "where the engine runs: cpu or cuda (the CUDA cache is always bf16)")
      ->capture_default_str();
  app.add_option("--weights", o.weights,
                 "stored: the checkpoint's dtypes; bf16: F32 matrices rounded to BF16 at load (half the bytes "
                 "a decode step reads on the GPU; math stays F32); fp8: as DeepSeek-V3's release at load, its FP8 "
                 "matrices quantized to E4M3 with 128x128 block scales, the other matrices rounded to BF16")
      ->capture_default_str();
}

}  // namespace dsv3::cli
