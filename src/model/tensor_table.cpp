#include "model/tensor_table.h"

#include "core/error.h"

namespace dsv3 {

const char* tensor_kind_name(TensorKind k) {
  switch (k) {
    case TensorKind::embed_tokens: return "embed_tokens";
    case TensorKind::final_norm: return "final_norm";
    case TensorKind::lm_head: return "lm_head";
    case TensorKind::input_layernorm: return "input_layernorm";
    case TensorKind::post_attention_layernorm: return "post_attention_layernorm";
    case TensorKind::q_proj: return "q_proj";
    case TensorKind::q_a_proj: return "q_a_proj";
    case TensorKind::q_a_layernorm: return "q_a_layernorm";
    case TensorKind::q_b_proj: return "q_b_proj";
    case TensorKind::kv_a_proj_with_mqa: return "kv_a_proj_with_mqa";
    case TensorKind::kv_a_layernorm: return "kv_a_layernorm";
    case TensorKind::kv_b_proj: return "kv_b_proj";
    case TensorKind::o_proj: return "o_proj";
    case TensorKind::q_a_proj_bias: return "q_a_proj_bias";
    case TensorKind::kv_a_proj_bias: return "kv_a_proj_bias";
    case TensorKind::o_proj_bias: return "o_proj_bias";
    case TensorKind::mlp_gate_proj: return "mlp_gate_proj";
    case TensorKind::mlp_up_proj: return "mlp_up_proj";
    case TensorKind::mlp_down_proj: return "mlp_down_proj";
    case TensorKind::router_gate: return "router_gate";
    case TensorKind::router_bias: return "router_bias";
    case TensorKind::expert_gate_proj: return "expert_gate_proj";
    case TensorKind::expert_up_proj: return "expert_up_proj";
    case TensorKind::expert_down_proj: return "expert_down_proj";
    case TensorKind::shared_gate_proj: return "shared_gate_proj";
    case TensorKind::shared_up_proj: return "shared_up_proj";
    case TensorKind::shared_down_proj: return "shared_down_proj";
    case TensorKind::mtp_enorm: return "mtp_enorm";
    case TensorKind::mtp_hnorm: return "mtp_hnorm";
    case TensorKind::mtp_eh_proj: return "mtp_eh_proj";
    case TensorKind::mtp_head_norm: return "mtp_head_norm";
    case TensorKind::mtp_embed_tokens: return "mtp_embed_tokens";
    case TensorKind::mtp_head: return "mtp_head";
  }
  return "?";
}

namespace {

struct Emitter {
  const std::function<void(const TensorSpec&)>& fn;
  int layer = -1, mtp = 0;

  void emit(std::string name, Shape shape, TensorKind kind, bool fp8 = false, int expert = -1) {
    TensorSpec t;
    t.name = std::move(name);
    t.shape = shape;
    t.kind = kind;
    t.layer = layer;
    t.expert = expert;
    t.mtp = mtp;
    t.weight_decay = shape.n == 2;
    t.fp8 = fp8;
    if (kind == TensorKind::router_bias) {
      t.trainable = false;
      t.dtype = DType::F32;
    }
    fn(t);
  }
  void shared(std::string name, Shape shape, TensorKind kind, std::string main_name) {
    TensorSpec t;
    t.name = std::move(name);
    t.shape = shape;
    t.kind = kind;
    t.layer = layer;
    t.mtp = mtp;
    t.weight_decay = true;
    t.shared_with = std::move(main_name);
    fn(t);
  }
};

// One decoder block (attention + dense MLP or MoE) at layer index i.
void decoder_block(const ModelConfig& c, Emitter& e, int64_t i) {
  const std::string p = cat("model.layers.", i, ".");
  const int64_t H = c.hidden_size, nh = c.num_attention_heads;
  e.emit(p + "input_layernorm.weight", {H}, TensorKind::input_layernorm);
  const std::string a = p + "self_attn.";
  if (c.q_lora_rank) {
    const int64_t r = *c.q_lora_rank;
    e.emit(a + "q_a_proj.weight", {r, H}, TensorKind::q_a_proj, true);
    if (c.attention_bias) e.emit(a + "q_a_proj.bias", {r}, TensorKind::q_a_proj_bias);
    e.emit(a + "q_a_layernorm.weight", {r}, TensorKind::q_a_layernorm);
    e.emit(a + "q_b_proj.weight", {nh * c.qk_head_dim(), r}, TensorKind::q_b_proj, true);
  } else {
    e.emit(a + "q_proj.weight", {nh * c.qk_head_dim(), H}, TensorKind::q_proj, true);
  }
  e.emit(a + "kv_a_proj_with_mqa.weight", {c.kv_lora_rank + c.qk_rope_head_dim, H},
         TensorKind::kv_a_proj_with_mqa, true);
  if (c.attention_bias)
    e.emit(a + "kv_a_proj_with_mqa.bias", {c.kv_lora_rank + c.qk_rope_head_dim}, TensorKind::kv_a_proj_bias);
  e.emit(a + "kv_a_layernorm.weight", {c.kv_lora_rank}, TensorKind::kv_a_layernorm);
  e.emit(a + "kv_b_proj.weight", {nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank},
         TensorKind::kv_b_proj, true);
  e.emit(a + "o_proj.weight", {H, nh * c.v_head_dim}, TensorKind::o_proj, true);
  if (c.attention_bias) e.emit(a + "o_proj.bias", {H}, TensorKind::o_proj_bias);
  e.emit(p + "post_attention_layernorm.weight", {H}, TensorKind::post_attention_layernorm);

  const std::string m = p + "mlp.";
  if (!c.is_moe_layer(i)) {
    const int64_t I = c.intermediate_size;
    e.emit(m + "gate_proj.weight", {I, H}, TensorKind::mlp_gate_proj, true);
    e.emit(m + "up_proj.weight", {I, H}, TensorKind::mlp_up_proj, true);
    e.emit(m + "down_proj.weight", {H, I}, TensorKind::mlp_down_proj, true);
    return;
  }
  const int64_t E = c.n_routed_experts, I = c.moe_intermediate_size;
  e.emit(m + "gate.weight", {E, H}, TensorKind::router_gate);
  if (c.has_router_bias()) e.emit(m + "gate.e_score_correction_bias", {E}, TensorKind::router_bias);
  for (int64_t x = 0; x < E; ++x) {
    const std::string q = cat(m, "experts.", x, ".");
    e.emit(q + "gate_proj.weight", {I, H}, TensorKind::expert_gate_proj, true, int(x));
    e.emit(q + "up_proj.weight", {I, H}, TensorKind::expert_up_proj, true, int(x));
    e.emit(q + "down_proj.weight", {H, I}, TensorKind::expert_down_proj, true, int(x));
  }
  if (c.has_shared_experts()) {
    const int64_t S = I * c.n_shared_experts;
    e.emit(m + "shared_experts.gate_proj.weight", {S, H}, TensorKind::shared_gate_proj, true);
    e.emit(m + "shared_experts.up_proj.weight", {S, H}, TensorKind::shared_up_proj, true);
    e.emit(m + "shared_experts.down_proj.weight", {H, S}, TensorKind::shared_down_proj, true);
  }
}

}  // namespace

void for_each_tensor(const ModelConfig& c, const std::function<void(const TensorSpec&)>& fn) {
  Emitter e{fn};
  const int64_t H = c.hidden_size, V = c.vocab_size;
  const std::string head_name = c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  e.emit("model.embed_tokens.weight", {V, H}, TensorKind::embed_tokens);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    e.layer = int(i);
    decoder_block(c, e, i);
  }
  for (int64_t k = 1; k <= c.num_nextn_predict_layers; ++k) {
    const int64_t i = c.num_hidden_layers + k - 1;
    const std::string p = cat("model.layers.", i, ".");
    e.layer = int(i);
    e.mtp = int(k);
    e.shared(p + "embed_tokens.weight", {V, H}, TensorKind::mtp_embed_tokens, "model.embed_tokens.weight");
    e.emit(p + "enorm.weight", {H}, TensorKind::mtp_enorm);
    e.emit(p + "hnorm.weight", {H}, TensorKind::mtp_hnorm);
    // BF16 in the hub release (no _scale_inv); vLLM and SGLang build it as an unquantized linear.
    e.emit(p + "eh_proj.weight", {H, 2 * H}, TensorKind::mtp_eh_proj);
    decoder_block(c, e, i);
    e.emit(p + "shared_head.norm.weight", {H}, TensorKind::mtp_head_norm);
    e.shared(p + "shared_head.head.weight", {V, H}, TensorKind::mtp_head, head_name);
  }
  e.layer = -1;
  e.mtp = 0;
  e.emit("model.norm.weight", {H}, TensorKind::final_norm);
  if (!c.tie_word_embeddings) e.emit("lm_head.weight", {V, H}, TensorKind::lm_head);
}

const TensorSpec* TensorTable::find(const std::string& name) const {
  auto it = by_name.find(name);
  return it == by_name.end() ? nullptr : &tensors[it->second];
}

TensorTable build_tensor_table(const ModelConfig& c) {
  TensorTable t;
  for_each_tensor(c, [&](const TensorSpec& s) {
    DSV3_CHECK(t.by_name.emplace(s.name, t.tensors.size()).second, "duplicate tensor name ", s.name);
    t.tensors.push_back(s);
  });
  return t;
}

std::string scale_inv_name(const TensorSpec& t) { return t.name + "_scale_inv"; }

Shape scale_inv_shape(const TensorSpec& t, int64_t block_out, int64_t block_in) {
  DSV3_CHECK(t.shape.n == 2 && block_out > 0 && block_in > 0, t.name);
  return {(t.shape[0] + block_out - 1) / block_out, (t.shape[1] + block_in - 1) / block_in};
}

}  // namespace dsv3
