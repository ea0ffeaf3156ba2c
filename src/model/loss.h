// The training loss (DeepSeek-V3 §2.2, eqs. 17–20, 25) and its gradient at the logits and router:
//   L = CE(main) + (λ/D)·Σ_k CE(MTP k) + α·Σ_layers mean_b Σ_i f_i·P_i
// CE terms are means over the positions that have a target. Labels are B rows of Lb ≥ T tokens
// ([B, Lb] row-major; the model saw labels[:, :T]): the main logits at (b, t) predict
// labels[b, t+1] and MTP module k's row (b, i) predicts labels[b, i+k+1]; a position whose target
// lies past Lb is ignored. A data window of T+1 tokens therefore gives every row a target, and a
// plain sequence (Lb = T, the HF fixtures) drops the last row of each head.
//
// Complementary sequence-wise balance loss, per MoE layer (main and MTP blocks) and sequence of
// T' rows: f_i = E/(K·T')·#{t : i ∈ TopK(s_t)} with the UNBIASED scores s (constant: no gradient),
// P_i = (1/T')·Σ_t s_{t,i}/Σ_j s_{t,j}. Its gradient flows into the gate logits through P.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "model/model.h"

namespace dsv3 {

struct LossOptions {
  double mtp_lambda = 0.3;     // λ
  double balance_alpha = 0.0;  // α (DeepSeek-V3 trains with 1e-4 next to the aux-loss-free bias)
  bool need_grad = true;       // fill LossResult::grad (dlogits overwrite the logits in place)
};

struct LossResult {
  double total = 0, main = 0, balance = 0;
  std::vector<double> mtp;  // CE of module k = 1..D (NaN when it has no target)
  int64_t main_targets = 0;
  BackwardInput grad;       // for Model::backward
};

// `out` is the forward of `m` (with keep_activations when α > 0) on labels[:, :T].
LossResult compute_loss(Backend& be, const Model& m, ForwardOutput& out, std::span<const int32_t> labels,
                        int64_t B, int64_t T, int64_t Lb, const LossOptions& o);

// The sequence-wise balance loss of one layer: scores [B·T', E] (F32 host), its value
// α·mean_b Σ_i f_i P_i, and (when dlogits is defined, [B·T', E] F32 host) the gradient on the gate
// logits added into it.
double sequence_balance_loss(const Tensor& scores, int64_t B, int64_t top_k, RouterScoring scoring, double alpha,
                             const Tensor& dlogits);

}  // namespace dsv3
