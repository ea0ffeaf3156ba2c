#include "model/model_stats.h"

#include "core/error.h"
#include "model/tensor_table.h"

namespace dsv3 {

namespace {

// Activated share of one tensor: a routed expert is read by num_experts_per_tok of n_routed_experts
// tokens' picks; summing whole experts with index < num_experts_per_tok gives exactly that count.
bool activated(const ModelConfig& c, const TensorSpec& t) {
  return !t.is_expert() || t.expert < c.num_experts_per_tok;
}

bool is_matmul(const TensorSpec& t) {
  return t.shape.n == 2 && t.kind != TensorKind::embed_tokens && t.kind != TensorKind::mtp_embed_tokens;
}

}  // namespace

ParamCounts count_params(const ModelConfig& c) {
  ParamCounts p;
  const std::array<int64_t, 2> block =
      c.quantization_config ? c.quantization_config->weight_block_size : std::array<int64_t, 2>{128, 128};
  for_each_tensor(c, [&](const TensorSpec& t) {
    const int64_t n = t.numel();
    ++p.tensors;
    if (t.fp8) {
      p.fp8_params += n;
      p.fp8_scales += scale_inv_shape(t, block[0], block[1]).numel();
    }
    if (!t.shared_with.empty()) {
      p.mtp_shared += n;
    } else if (t.kind == TensorKind::embed_tokens) {
      p.embed += n;
    } else if (t.kind == TensorKind::lm_head) {
      p.head += n;
    } else if (t.is_mtp()) {
      p.mtp_total += n;
      if (activated(c, t)) p.mtp_active += n;
    } else {
      p.body_total += n;
      if (activated(c, t)) p.body_active += n;
    }
  });
  return p;
}

KvBytesPerToken kv_bytes_per_token(const ModelConfig& c) {
  KvBytesPerToken k;
  const int64_t latent = c.kv_lora_rank + c.qk_rope_head_dim;
  k.latent_bf16 = latent * 2 * c.num_hidden_layers;
  k.latent_fp8 = latent * 1 * c.num_hidden_layers;
  k.naive_bf16 = c.num_key_value_heads * (c.qk_head_dim() + c.v_head_dim) * 2 * c.num_hidden_layers;
  k.mtp_latent_bf16 = latent * 2 * c.num_nextn_predict_layers;
  return k;
}

FlopsPerToken flops_per_token(const ModelConfig& c, int64_t seq_len) {
  if (seq_len < 1) input_error("sequence length must be ≥ 1, got ", seq_len);
  FlopsPerToken f;
  for_each_tensor(c, [&](const TensorSpec& t) {
    if (!is_matmul(t) || !activated(c, t)) return;
    (t.is_mtp() ? f.mtp_matmul_params_active : f.matmul_params_active) += double(t.numel());
  });
  const double mean_ctx = (double(seq_len) + 1.0) / 2.0;
  const double attn_per_layer_fwd =
      2.0 * double(c.num_attention_heads) * double(c.qk_head_dim() + c.v_head_dim) * mean_ctx;
  f.attention_train = 3.0 * attn_per_layer_fwd * double(c.num_hidden_layers);
  f.forward = 2.0 * f.matmul_params_active + attn_per_layer_fwd * double(c.num_hidden_layers);
  f.train = 6.0 * f.matmul_params_active + f.attention_train;
  f.train_with_mtp = f.train + 6.0 * f.mtp_matmul_params_active +
                     3.0 * attn_per_layer_fwd * double(c.num_nextn_predict_layers);
  return f;
}

}  // namespace dsv3
