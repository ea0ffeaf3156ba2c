#include "train/precision_memory.h"

namespace dsv3 {
namespace {

struct Counts {
  int64_t linear = 0, swiglu = 0;
  int64_t linear_tiles = 0, swiglu_tiles = 0;  // 1×128 tiles (one FP32 scale each in FP8)
  void add_linear(int64_t rows, int64_t width) {
    linear += rows * width;
    linear_tiles += rows * ((width + 127) / 128);
  }
  void add_swiglu(int64_t rows, int64_t width) {
    swiglu += rows * width;
    swiglu_tiles += rows * ((width + 127) / 128);
  }
};

void add_layer(const ModelConfig& c, int64_t i, Counts& n) {
  const int64_t H = c.hidden_size;
  n.add_linear(1, H);  // x of q_a (or q) and kv_a_proj_with_mqa
  if (c.q_lora_rank) n.add_linear(1, *c.q_lora_rank);
  n.add_linear(1, c.kv_lora_rank);                            // kv_b_proj input
  n.add_linear(1, c.num_attention_heads * c.v_head_dim);      // o_proj input
  auto mlp = [&](int64_t rows, int64_t inter) {               // per token: `rows` MLP rows of width `inter`
    n.add_linear(rows, H);                                    // gate/up input (down_proj input: recomputed)
    n.add_swiglu(rows, inter);                                // gate and up outputs, cached separately
    n.add_swiglu(rows, inter);
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
    n.add_linear(1, 2 * c.hidden_size);  // eh_proj input [enorm(e) ; hnorm(h)]
    add_layer(c, c.num_hidden_layers + k, n);
  }
  std::vector<PrecisionActivationBytes> out;
  for (auto [name, b] : {std::pair<const char*, double>{"fp32", 4.0}, {"bf16", 2.0}, {"fp8", 1.0}}) {
    const bool fp8 = b == 1.0;
    PrecisionActivationBytes p;
    p.precision = name;
    p.elements = n.linear + n.swiglu;
    p.linear_inputs = double(n.linear) * b + (fp8 ? 4.0 * double(n.linear_tiles) : 0.0);
    p.swiglu_inputs = double(n.swiglu) * b + (fp8 ? 4.0 * double(n.swiglu_tiles) : 0.0);
    p.bytes_per_elem = p.total() / double(p.elements);
    out.push_back(p);
  }
  return out;
}

}  // namespace dsv3
