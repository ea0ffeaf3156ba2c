// MTP speculative decoding (DESIGN §3 "MTP"; Leviathan et al. / Chen et al. rejection sampling).
//
// Drafting, per sequence with n tokens in the main cache and t_n sampled (not yet fed):
//   step s ≤ D (D = MTP modules): module s at position n−1 on (h^{s−1}_{n−1}, d_{s−1}), d_0 = t_n —
//     the paper's chain, module k predicting token i+k+1 from position i;
//   step s > D: the last module again, one position further each step, on its own previous output
//     hidden state and the previous draft (the reuse vLLM applies beyond num_nextn_predict_layers).
//   Before drafting, each module re-runs the positions whose inputs became known since the last
//   round (true tokens, true hidden states), so its cache holds the entries training defines; its
//   speculative entries are overwritten next round.
// Verification: one main-model forward over [t_n, d_1..d_N] at positions n..n+N. Draft d_i is kept
// with probability min(1, p_i(d_i)/q_i(d_i)); the first rejection draws from norm(max(0, p_i − q_i));
// when all are kept, a bonus token comes from p_{N+1}. The output is distributed exactly as the
// target model's; with greedy parameters p and q are one-hot and the output equals plain greedy
// decoding token for token.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "core/rng.h"

namespace dsv3 {

struct SpecVerdict {
  int accepted = 0;  // drafts kept (a prefix)
  int32_t next = -1;  // the token after them: the correction or the bonus
};

// drafts d_1..d_N; q[i] the distribution d_{i+1} was drawn from; p[i] (i = 0..N) the target's
// distribution after [t_n, d_1..d_i]. Distributions are over the full vocabulary.
SpecVerdict speculative_verify(std::span<const int32_t> drafts, const std::vector<std::vector<float>>& q,
                               const std::vector<std::vector<float>>& p, Rng& rng);

// Acceptance counts per draft position (1-based position s: drafts proposed at s, kept at s).
struct SpecStats {
  std::vector<int64_t> proposed, accepted;
  int64_t rounds = 0, tokens = 0;  // verification rounds, tokens produced by them
  void record(int n_drafts, int n_accepted, int produced);
  double rate(size_t s) const { return proposed.size() > s && proposed[s] ? double(accepted[s]) / double(proposed[s]) : 0.0; }
  // Mean tokens produced per verification round.
  double tokens_per_round() const { return rounds ? double(tokens) / double(rounds) : 0.0; }
};

}  // namespace dsv3
