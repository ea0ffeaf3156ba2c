#include "model/presets.h"

#include "core/error.h"

namespace dsv3 {

namespace {

// The hub configs, verbatim apart from "auto_map" (remote-code class names we do not use).
// deepseek-ai/DeepSeek-V3/config.json
constexpr const char* kV3 = R"json({
  "architectures": ["DeepseekV3ForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "aux_loss_alpha": 0.001,
  "bos_token_id": 0,
  "eos_token_id": 1,
  "ep_size": 1,
  "first_k_dense_replace": 3,
  "hidden_act": "silu",
  "hidden_size": 7168,
  "initializer_range": 0.02,
  "intermediate_size": 18432,
  "kv_lora_rank": 512,
  "max_position_embeddings": 163840,
  "model_type": "deepseek_v3",
  "moe_intermediate_size": 2048,
  "moe_layer_freq": 1,
  "n_group": 8,
  "n_routed_experts": 256,
  "n_shared_experts": 1,
  "norm_topk_prob": true,
  "num_attention_heads": 128,
  "num_experts_per_tok": 8,
  "num_hidden_layers": 61,
  "num_key_value_heads": 128,
  "num_nextn_predict_layers": 1,
  "pretraining_tp": 1,
  "q_lora_rank": 1536,
  "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64,
  "quantization_config": {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128]
  },
  "rms_norm_eps": 1e-06,
  "rope_scaling": {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096,
    "type": "yarn"
  },
  "rope_theta": 10000,
  "routed_scaling_factor": 2.5,
  "scoring_func": "sigmoid",
  "seq_aux": true,
  "tie_word_embeddings": false,
  "topk_group": 4,
  "topk_method": "noaux_tc",
  "torch_dtype": "bfloat16",
  "transformers_version": "4.46.3",
  "use_cache": true,
  "v_head_dim": 128,
  "vocab_size": 129280
})json";

// deepseek-ai/DeepSeek-V2-Lite/config.json
constexpr const char* kV2Lite = R"json({
  "architectures": ["DeepseekV2ForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "aux_loss_alpha": 0.001,
  "bos_token_id": 100000,
  "eos_token_id": 100001,
  "first_k_dense_replace": 1,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 10944,
  "kv_lora_rank": 512,
  "max_position_embeddings": 163840,
  "model_type": "deepseek_v2",
  "moe_intermediate_size": 1408,
  "moe_layer_freq": 1,
  "n_group": 1,
  "n_routed_experts": 64,
  "n_shared_experts": 2,
  "norm_topk_prob": false,
  "num_attention_heads": 16,
  "num_experts_per_tok": 6,
  "num_hidden_layers": 27,
  "num_key_value_heads": 16,
  "pretraining_tp": 1,
  "q_lora_rank": null,
  "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64,
  "rms_norm_eps": 1e-06,
  "rope_scaling": {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "original_max_position_embeddings": 4096,
    "type": "yarn"
  },
  "rope_theta": 10000,
  "routed_scaling_factor": 1.0,
  "scoring_func": "softmax",
  "seq_aux": true,
  "tie_word_embeddings": false,
  "topk_group": 1,
  "topk_method": "greedy",
  "torch_dtype": "bfloat16",
  "transformers_version": "4.33.1",
  "use_cache": true,
  "v_head_dim": 128,
  "vocab_size": 102400
})json";

ModelConfig v3_shaped_base() {
  ModelConfig c;
  c.model_type = "deepseek_v3";
  c.architectures = {"DeepseekV3ForCausalLM"};
  c.scoring_func = "sigmoid";
  c.topk_method = "noaux_tc";
  c.norm_topk_prob = true;
  c.rope_theta = 10000.0;
  c.rope_interleave = true;
  c.bos_token_id = 0;
  c.eos_token_id = {1};
  return c;
}

// The sizes the Foundation issue gives for the speed-measurement model.
ModelConfig bench_07b() {
  ModelConfig c = v3_shaped_base();
  c.vocab_size = 32768;
  c.hidden_size = 1024;
  c.num_hidden_layers = 12;
  c.first_k_dense_replace = 1;
  c.intermediate_size = 2816;
  c.num_attention_heads = 16;
  c.num_key_value_heads = 16;
  c.q_lora_rank = 512;
  c.kv_lora_rank = 256;
  c.qk_nope_head_dim = 128;
  c.qk_rope_head_dim = 64;
  c.v_head_dim = 128;
  c.n_routed_experts = 32;
  c.num_experts_per_tok = 4;
  c.n_group = 4;
  c.topk_group = 2;
  c.n_shared_experts = 1;
  c.moe_intermediate_size = 512;
  c.routed_scaling_factor = 2.5;
  c.num_nextn_predict_layers = 1;
  c.max_position_embeddings = 4096;
  return c;
}

// The CPU default: every V3 feature at toy size (q compression, 4 groups of which 2 are kept, a
// shared expert, one dense layer before the MoE layers, one MTP layer, routed_scaling_factor ≠ 1).
// Sized so two CPU cores train it in minutes; the training work may retune these numbers.
ModelConfig tiny() {
  ModelConfig c = v3_shaped_base();
  c.vocab_size = 4096;
  c.hidden_size = 128;
  c.num_hidden_layers = 4;
  c.first_k_dense_replace = 1;
  c.intermediate_size = 384;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 4;
  c.q_lora_rank = 64;
  c.kv_lora_rank = 32;
  c.qk_nope_head_dim = 32;
  c.qk_rope_head_dim = 16;
  c.v_head_dim = 32;
  c.n_routed_experts = 8;
  c.num_experts_per_tok = 2;
  c.n_group = 4;
  c.topk_group = 2;
  c.n_shared_experts = 1;
  c.moe_intermediate_size = 96;
  c.routed_scaling_factor = 2.5;
  c.num_nextn_predict_layers = 1;
  c.max_position_embeddings = 512;
  c.initializer_range = 0.02;
  return c;
}

}  // namespace

std::vector<std::string> preset_names() { return {"v3", "v2-lite", "bench-0.7b", "tiny"}; }

ModelConfig preset_config(const std::string& name) {
  ModelConfig c;
  if (name == "v3") return parse_model_config(kV3, "preset v3");
  if (name == "v2-lite") return parse_model_config(kV2Lite, "preset v2-lite");
  if (name == "bench-0.7b")
    c = bench_07b();
  else if (name == "tiny")
    c = tiny();
  else {
    std::string known;
    for (const auto& n : preset_names()) known += (known.empty() ? "" : ", ") + n;
    input_error("unknown preset '", name, "' (known: ", known, ")");
  }
  validate_model_config(c, "preset " + name);
  return c;
}

}  // namespace dsv3
