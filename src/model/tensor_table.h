// The one table of parameters (DESIGN §2.3): every parameter of a model config, listed once, with its
// hub name and shape. Loading, saving, parameter counting and tests read this table.
//
// Names are the hub checkpoint's. Per decoder layer i (main model 0..L-1, MTP module k at i = L+k-1):
//   model.layers.i.input_layernorm.weight, .post_attention_layernorm.weight
//   model.layers.i.self_attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj}.weight
//   model.layers.i.self_attn.{kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}.weight
//   (+ q_a_proj.bias, kv_a_proj_with_mqa.bias, o_proj.bias when attention_bias)
//   dense layers:  model.layers.i.mlp.{gate_proj,up_proj,down_proj}.weight
//   MoE layers:    model.layers.i.mlp.gate.weight, mlp.gate.e_score_correction_bias (noaux_tc only),
//                  mlp.experts.E.{gate_proj,up_proj,down_proj}.weight,
//                  mlp.shared_experts.{gate_proj,up_proj,down_proj}.weight (when n_shared_experts > 0)
//   MTP module k also: model.layers.i.{enorm,hnorm,eh_proj,shared_head.norm}.weight, and the two
//                  copies the hub stores: model.layers.i.embed_tokens.weight, shared_head.head.weight
// plus model.embed_tokens.weight, model.norm.weight, lm_head.weight (absent when tie_word_embeddings).
//
// The MTP embedding and output head are the main model's, shared (paper §2.2); the hub release
// nevertheless stores a copy of each under the MTP layer. The table lists those copies as entries
// with `shared_with` set to the main tensor's name: a loader may read or skip them (the main tensor
// is authoritative), a saver writes the main tensor's values under that name so vLLM/SGLang-style
// MTP loaders find them, and "unique" parameter counts skip them.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"
#include "model/config.h"

namespace dsv3 {

enum class TensorKind : uint8_t {
  embed_tokens,       // model.embed_tokens.weight [vocab, hidden]
  final_norm,         // model.norm.weight [hidden]
  lm_head,            // lm_head.weight [vocab, hidden]
  input_layernorm,    // [hidden]
  post_attention_layernorm,
  q_proj,             // [heads·qk_head_dim, hidden] (q_lora_rank null)
  q_a_proj,           // [q_lora_rank, hidden]
  q_a_layernorm,      // [q_lora_rank]
  q_b_proj,           // [heads·qk_head_dim, q_lora_rank]; per head rows [nope ; rope]
  kv_a_proj_with_mqa, // [kv_lora_rank + qk_rope_head_dim, hidden]; rows [latent ; k_rope]
  kv_a_layernorm,     // [kv_lora_rank]
  kv_b_proj,          // [heads·(qk_nope_head_dim + v_head_dim), kv_lora_rank]; per head rows [k_nope ; v]
  o_proj,             // [hidden, heads·v_head_dim]
  q_a_proj_bias,      // attention_bias only
  kv_a_proj_bias,
  o_proj_bias,
  mlp_gate_proj,      // dense MLP [intermediate, hidden]
  mlp_up_proj,
  mlp_down_proj,      // [hidden, intermediate]
  router_gate,        // mlp.gate.weight [n_routed_experts, hidden]
  router_bias,        // mlp.gate.e_score_correction_bias [n_routed_experts], F32, not trained by the optimizer
  expert_gate_proj,   // [moe_intermediate, hidden]
  expert_up_proj,
  expert_down_proj,   // [hidden, moe_intermediate]
  shared_gate_proj,   // [moe_intermediate·n_shared_experts, hidden]
  shared_up_proj,
  shared_down_proj,
  mtp_enorm,          // [hidden]
  mtp_hnorm,          // [hidden]
  mtp_eh_proj,        // [hidden, 2·hidden], input [enorm(emb) ; hnorm(h)]
  mtp_head_norm,      // shared_head.norm.weight [hidden]
  mtp_embed_tokens,   // copy of model.embed_tokens.weight (shared_with)
  mtp_head,           // shared_head.head.weight, copy of lm_head.weight (shared_with)
};
const char* tensor_kind_name(TensorKind k);

struct TensorSpec {
  std::string name;   // hub name
  Shape shape;        // [out, in] for linear weights, as stored
  TensorKind kind;
  int layer = -1;     // decoder layer index (MTP modules: num_hidden_layers + k - 1); -1 for global tensors
  int expert = -1;    // routed expert index; -1 otherwise
  int mtp = 0;        // MTP module number k ≥ 1; 0 for the main model
  bool weight_decay = false;  // a matrix (2-D weight): AdamW decays it; norms and biases are not decayed
  bool trainable = true;      // false for the router bias (moved by the load-balancing rule, not by AdamW)
  bool fp8 = false;           // in the hub FP8 release: stored as F8_E4M3 with a `<name>_scale_inv` F32 companion
  DType dtype = DType::BF16;  // dtype in an unquantized hub checkpoint (BF16; F32 for the router bias)
  std::string shared_with;    // non-empty: a stored copy of this main-model tensor (MTP embed/head)

  bool is_mtp() const { return mtp > 0; }
  bool is_expert() const { return expert >= 0; }
  int64_t numel() const { return shape.numel(); }
};

// Visit every parameter once, in a fixed order (global embed, layers in order, MTP modules, final
// norm, lm_head). Builds nothing else, so it suits counting.
void for_each_tensor(const ModelConfig& c, const std::function<void(const TensorSpec&)>& fn);

struct TensorTable {
  std::vector<TensorSpec> tensors;
  std::unordered_map<std::string, size_t> by_name;
  const TensorSpec* find(const std::string& name) const;
  size_t size() const { return tensors.size(); }
};
TensorTable build_tensor_table(const ModelConfig& c);

// FP8 block-scale companion of an fp8 tensor: name "<name>_scale_inv", shape [ceil(out/b0), ceil(in/b1)].
std::string scale_inv_name(const TensorSpec& t);
Shape scale_inv_shape(const TensorSpec& t, int64_t block_out = 128, int64_t block_in = 128);

}  // namespace dsv3
