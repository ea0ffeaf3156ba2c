// What `dsv3 generate`, `dsv3 chat` (and a server) share: loading a model directory with its
// tokenizer, checking that the two agree, and the llama.cpp-style timing lines.
#pragma once
#include <memory>
#include <optional>
#include <string>

#include "infer/engine.h"
#include "io/tokenizer.h"
#include "model/weights.h"

namespace dsv3 {

// The tokenizer for a model: `path` when given (a tokenizer.json or its directory), else
// <model_dir>/tokenizer.json. nullopt when none exists and `required` is false; otherwise an
// InputError naming the model directory and the path tried. A tokenizer with ids the model's
// vocabulary cannot hold is an InputError naming both files and both numbers.
std::optional<Tokenizer> load_model_tokenizer(const std::string& model_dir, const std::string& path,
                                              int64_t model_vocab, bool required, const std::string& why);

struct GenerationTimes {
  double prompt_s = 0.0, gen_s = 0.0;
  int64_t prompt_tokens = 0, gen_tokens = 0;
};
// "prompt eval time = … ms / N tokens (… ms per token, … tokens per second)", "eval time = …",
// "total time = …", and with speculation the acceptance rate per draft position.
std::string timing_lines(const GenerationTimes& t, const EngineStats& s, int draft_tokens);
// The counters of what an engine did since `before` (an earlier stats() of the same engine): one
// chat turn's, from the engine's running totals.
EngineStats stats_since(EngineStats now, const EngineStats& before);

}  // namespace dsv3
