// Sampling: logits row → next token, per sequence.
//
// Order (as HF generation applies its warpers): repetition penalty (every distinct token of the
// history: logit/penalty when positive, logit·penalty otherwise) → temperature → top-k → top-p
// (smallest set of most likely tokens whose mass reaches top_p; the token that crosses it is kept)
// → min-p (keep p ≥ min_p · p_max) → renormalise → draw with the sequence's own Rng. temperature 0
// is greedy: the argmax after the penalty (the lowest id on ties), no random draw.
// Rows past `n_valid` (the tokenizer's last real id + 1: padding rows of the head) are never
// sampled, whatever their logits.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/rng.h"

namespace dsv3 {

struct SamplingParams {
  float temperature = 0.0f;    // 0 = greedy
  int64_t top_k = 0;           // 0 = off
  float top_p = 1.0f;          // 1 = off
  float min_p = 0.0f;          // 0 = off
  float repeat_penalty = 1.0f;  // 1 = off
  uint64_t seed = 0;
  bool greedy() const { return temperature <= 0.0f; }
  // Greedy without a repetition penalty: the plain argmax of the logits (a GPU can take it).
  bool plain_argmax() const { return greedy() && repeat_penalty == 1.0f; }
  // InputError naming the flag (e.g. "--top-p") and the accepted range.
  void validate() const;
};

// The distribution the sampler draws from, over the full vocabulary (zeros where masked). For
// greedy parameters: one-hot at the argmax. `history` is the sequence so far (prompt + output).
void sampling_probs(std::span<const float> logits, int64_t n_valid, std::span<const int32_t> history,
                    const SamplingParams& p, std::vector<float>& probs);
// Draw from probs with one uniform of `rng` (inverse CDF in id order).
int32_t sample_from(std::span<const float> probs, Rng& rng);
// sampling_probs + sample_from; greedy skips the draw.
int32_t sample_token(std::span<const float> logits, int64_t n_valid, std::span<const int32_t> history,
                     const SamplingParams& p, Rng& rng);
// Argmax over ids [0, n_valid) (lowest id on ties), after the repetition penalty.
int32_t greedy_token(std::span<const float> logits, int64_t n_valid, std::span<const int32_t> history,
                     float repeat_penalty);

// Stop strings on streamed text: the earliest match ends the output before it, and text that
// might still become a match is held back.
class StopStrings {
 public:
  StopStrings() = default;
  explicit StopStrings(std::vector<std::string> stops);
  bool empty() const { return stops_.empty(); }
  // Byte offset of the earliest stop string in `text` at or after `from`, or npos.
  size_t find(std::string_view text, size_t from = 0) const;
  // Length of the longest prefix of `text` that cannot be the start of a stop string match.
  size_t safe_prefix(std::string_view text) const;
  size_t max_len() const { return max_len_; }

 private:
  std::vector<std::string> stops_;
  size_t max_len_ = 0;
};

}  // namespace dsv3
