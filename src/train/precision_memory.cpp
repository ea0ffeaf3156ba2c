#include "train/precision_memory.h"

namespace dsv3 {
namespace {

struct Counts {
  int64_t linear = 0, swiglu = 0;
};

void add_layer(const ModelConfig& c, int64_t i, Counts& n) {
  const int64_t H = c.hidden_size;
  n.linear += H;  // x of q_a (or q) and kv_a_proj_with_mqa
  if (c.q_lora_rank) n.linear += *c.q_lora_rank;
  n.linear += c.kv_lora_rank;                           // kv_b_proj input
  n.linear += c.num_attention_heads * c.v_head_dim;     // o_proj input
  auto mlp = [&](int64_t rows, int64_t inter) {         // per token: `rows` MLP rows of width `inter`
    n.linear += rows * H;                               // gate/up input (down_proj input: recomputed)
    n.swiglu += rows * 2 * inter;                       // gate and up outputs
  };
  if (!c.is_moe_layer(i)) {
    mlp(1, c.intermediate_size);
    return;
  }
  mlp(c.num_experts_per_tok, c.moe_intermediate_size);  // routed: one gathered copy of x per pick
  if (c.has_shared_experts()) mlp(1, c.moe_intermediate_size * c.n_shared_experts);
}

}  // namespace

std::vector<PrecisionActivationBytes> activation_bytes_per_token(const ModelConfig& c) {
  Counts n;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) add_layer(c, i, n);
  for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) {
    n.linear += 2 * c.hidden_size;  // eh_proj input [enorm(e) ; hnorm(h)]
    add_layer(c, c.num_hidden_layers + k, n);
  }
  std::vector<PrecisionActivationBytes> out;
  for (auto [name, b] : {std::pair<const char*, double>{"fp32", 4.0}, {"bf16", 2.0}, {"fp8", 1.0 + 4.0 / 128}}) {
    PrecisionActivationBytes p;
    p.precision = name;
    p.bytes_per_elem = b;
    p.elements = n.linear + n.swiglu;
    p.linear_inputs = double(n.linear) * b;
    p.swiglu_inputs = double(n.swiglu) * b;
    out.push_back(p);
  }
  return out;
}

}  // namespace dsv3
