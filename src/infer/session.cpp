#include "infer/session.h"

#include <cstdio>
#include <filesystem>

namespace dsv3 {

std::optional<Tokenizer> load_model_tokenizer(const std::string& model_dir, const std::string& path,
                                              int64_t model_vocab, bool required, const std::string& why) {
  namespace fs = std::filesystem;
  const std::string p = path.empty() ? (fs::path(model_dir) / "tokenizer.json").string() : path;
  if (!fs::exists(p)) {
    if (!required) return std::nullopt;
    input_error("no tokenizer for the model in ", model_dir, ": ", p, " does not exist (", why,
                "; pass --tokenizer PATH)");
  }
  Tokenizer tok = Tokenizer::load(p);
  if (int64_t(tok.last_real_id()) >= model_vocab)
    input_error("tokenizer ", p, " has token ids up to ", tok.last_real_id(), " but the model in ", model_dir,
                " has vocab_size ", model_vocab, " (config.json): they do not belong together");
  return tok;
}

static std::string line(const char* label, double s, int64_t n, const char* unit) {
  char buf[256];
  const double ms = s * 1e3;
  std::snprintf(buf, sizeof buf, "%16s = %10.2f ms / %5lld %s (%8.2f ms per token, %8.2f tokens per second)\n",
                label, ms, (long long)n, unit, n ? ms / double(n) : 0.0, s > 0 ? double(n) / s : 0.0);
  return buf;
}

std::string timing_lines(const GenerationTimes& t, const EngineStats& s, int draft_tokens) {
  std::string out = line("prompt eval time", t.prompt_s, t.prompt_tokens, "tokens");
  out += line("eval time", t.gen_s, t.gen_tokens, "tokens");
  char buf[256];
  std::snprintf(buf, sizeof buf, "%16s = %10.2f ms / %5lld tokens\n", "total time", (t.prompt_s + t.gen_s) * 1e3,
                (long long)(t.prompt_tokens + t.gen_tokens));
  out += buf;
  if (s.preemptions) out += cat("      preemptions = ", s.preemptions, " (", s.recomputed_tokens, " tokens recomputed)\n");
  if (draft_tokens > 0) {
    out += cat("      speculation = ", draft_tokens, " MTP draft(s) per step, ", s.spec.rounds, " verifications, ");
    std::snprintf(buf, sizeof buf, "%.2f tokens per verification\n", s.spec.tokens_per_round());
    out += buf;
    for (size_t i = 0; i < s.spec.proposed.size(); ++i) {
      std::snprintf(buf, sizeof buf, "%16s %zu = %6.2f %% (%lld / %lld)\n", "accepted draft", i + 1,
                    100.0 * s.spec.rate(i), (long long)s.spec.accepted[i], (long long)s.spec.proposed[i]);
      out += buf;
    }
  }
  return out;
}

EngineStats stats_since(EngineStats now, const EngineStats& before) {
  now.steps -= before.steps;
  now.prompt_tokens -= before.prompt_tokens;
  now.generated_tokens -= before.generated_tokens;
  now.forward_rows -= before.forward_rows;
  now.preemptions -= before.preemptions;
  now.recomputed_tokens -= before.recomputed_tokens;
  // Draft positions only ever get added, so `now` has every one `before` has.
  for (size_t s = 0; s < before.spec.proposed.size() && s < now.spec.proposed.size(); ++s) {
    now.spec.proposed[s] -= before.spec.proposed[s];
    now.spec.accepted[s] -= before.spec.accepted[s];
  }
  now.spec.rounds -= before.spec.rounds;
  now.spec.tokens -= before.spec.tokens;
  return now;
}

}  // namespace dsv3
