// Sizes of a model derived from its config through the tensor table: parameter counts (total and
// activated per token), KV-cache bytes per token, and training FLOPs per token.
//
// Conventions (written once here; `dsv3 info` prints them):
// - "activated per token": every tensor a token's forward pass reads, with the routed experts counted
//   num_experts_per_tok times out of n_routed_experts (and the embedding row counted as the whole table,
//   as the release's "37B activated" does).
// - Main model = embedding + decoder layers 0..L-1 + final norm + lm_head. MTP modules are counted
//   apart; their stored embed/head copies are listed separately (`mtp_shared`), not in `mtp_total`.
// - KV cache per token (main model layers; MTP layers separately):
//     latent BF16 = (kv_lora_rank + qk_rope_head_dim) · 2 B · L      (70,272 for V3)
//     latent FP8  = (kv_lora_rank + qk_rope_head_dim) · 1 B · L      (block scales not included)
//     naive BF16  = num_key_value_heads · (qk_head_dim + v_head_dim) · 2 B · L   (per-head K and V)
// - Training FLOPs per token at sequence length T (forward + backward = 3 × forward):
//     6 · N_mm + 6 · L · heads · (qk_head_dim + v_head_dim) · (T+1)/2
//   N_mm = activated parameters of matrix multiplies (every 2-D weight except the embedding lookup,
//   lm_head included; norms and biases left out); the second term is QKᵀ and PV under a causal mask,
//   whose mean context is (T+1)/2. For V3 at T = 4096 this gives 250 GFLOP, the ISCA paper's Table 2.
#pragma once
#include <cstdint>
#include <string>

#include "model/config.h"

namespace dsv3 {

struct ParamCounts {
  int64_t embed = 0;        // model.embed_tokens.weight
  int64_t head = 0;         // lm_head.weight (0 when tied)
  int64_t body_total = 0;   // main decoder layers + model.norm
  int64_t body_active = 0;
  int64_t mtp_total = 0;    // MTP modules' own tensors (without the embed/head copies)
  int64_t mtp_active = 0;
  int64_t mtp_shared = 0;   // the embed/head copies stored under the MTP layers
  int64_t tensors = 0;      // entries in the tensor table (including the MTP copies)
  int64_t fp8_params = 0;   // parameters stored as FP8 in the hub release (main + MTP)
  int64_t fp8_scales = 0;   // their F32 `_scale_inv` block scales (128×128 blocks unless configured)

  int64_t main_total() const { return embed + head + body_total; }
  int64_t main_active() const { return embed + head + body_active; }
  // Everything a hub checkpoint stores (the "685B" of the release).
  int64_t stored_total() const { return main_total() + mtp_total + mtp_shared; }
};

ParamCounts count_params(const ModelConfig& c);

struct KvBytesPerToken {
  int64_t latent_bf16 = 0;
  int64_t latent_fp8 = 0;
  int64_t naive_bf16 = 0;
  int64_t mtp_latent_bf16 = 0;  // the MTP layers' own latent cache (speculative decoding)
};
KvBytesPerToken kv_bytes_per_token(const ModelConfig& c);

struct FlopsPerToken {
  double matmul_params_active = 0;      // N_mm of the main model
  double mtp_matmul_params_active = 0;  // N_mm of the MTP modules (their shared head included)
  double attention_train = 0;           // the attention term of the main model, training
  double train = 0;                     // main model, training (forward + backward)
  double train_with_mtp = 0;            // plus every MTP module
  double forward = 0;                   // main model, one forward pass
};
FlopsPerToken flops_per_token(const ModelConfig& c, int64_t seq_len);

}  // namespace dsv3
