// ModelConfig: the HF `config.json` of a DeepSeek-V3 (or V2) model. Field names are exactly the hub's.
//
// Parsing accepts both spellings of the RoPE settings:
//   hub:            "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 40, ...} or null
//   transformers 5: "rope_parameters": {"rope_type": "yarn" | "default", "rope_theta": ..., ...}
// and model_type "deepseek_v3" or "deepseek_v2". Fields a hub config may omit take the default of the
// transformers config class for that model_type (DeepseekV3Config / DeepseekV2Config); the defaults are
// listed in config.cpp next to the code that applies them. Serialization always writes the hub spelling.
//
// Every error is an InputError "<source>: field '<name>': <what was wrong, what was expected>".
#pragma once
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace dsv3 {

// YaRN settings (the only RoPE scaling DeepSeek models use). Absent optional fields keep HF's
// meaning of "absent", which differs from any default value (see softmax_scale, rope_attention_factor).
struct RopeScaling {
  std::string type = "yarn";
  double factor = 1.0;
  int64_t original_max_position_embeddings = 4096;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  std::optional<double> mscale;
  std::optional<double> mscale_all_dim;
  std::optional<double> attention_factor;  // transformers 5 only; overrides the mscale ratio
  bool truncate = true;                    // transformers 5 only; floor/ceil of the correction range
};

struct QuantizationConfig {
  std::string quant_method = "fp8";
  std::string fmt = "e4m3";
  std::string activation_scheme = "dynamic";
  std::array<int64_t, 2> weight_block_size{128, 128};
};

struct ModelConfig {
  std::string model_type = "deepseek_v3";
  std::vector<std::string> architectures;  // informational; serialize writes DeepseekV3ForCausalLM / V2

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;      // dense MLP (layers below first_k_dense_replace)
  int64_t moe_intermediate_size = 0;  // one routed expert; shared experts use it × n_shared_experts
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // MLA: always equal to num_attention_heads
  int64_t max_position_embeddings = 0;

  // MLA
  std::optional<int64_t> q_lora_rank;  // nullopt ⇒ one q_proj instead of q_a_proj/q_a_layernorm/q_b_proj
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;

  // MoE
  int64_t n_routed_experts = 0;
  int64_t n_shared_experts = 0;  // 0 (or null in the file) ⇒ no shared expert
  int64_t num_experts_per_tok = 0;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  double routed_scaling_factor = 1.0;
  bool norm_topk_prob = true;
  std::string scoring_func = "sigmoid";  // sigmoid (V3) | softmax (V2)
  std::string topk_method = "noaux_tc";  // noaux_tc (V3) | greedy | group_limited_greedy (V2)
  int64_t first_k_dense_replace = 0;
  int64_t moe_layer_freq = 1;
  double aux_loss_alpha = 0.001;  // hub value; the paper's training α is 1e-4 (paper_facts §12.5)
  bool seq_aux = true;

  // MTP
  int64_t num_nextn_predict_layers = 0;

  bool tie_word_embeddings = false;
  double rms_norm_eps = 1e-6;
  double initializer_range = 0.02;
  std::string hidden_act = "silu";

  // RoPE
  double rope_theta = 10000.0;
  std::optional<RopeScaling> rope_scaling;  // nullopt ⇒ plain RoPE
  bool rope_interleave = true;
  bool attention_bias = false;

  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_id;  // HF allows an int or a list; one element is written as an int
  std::string torch_dtype = "bfloat16";  // also read from transformers 5's "dtype"

  std::optional<QuantizationConfig> quantization_config;

  // ---- derived queries ----
  bool is_v3() const { return model_type == "deepseek_v3"; }
  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  // Layer i (0-based, including MTP layers at index num_hidden_layers + k - 1) uses DeepSeekMoE.
  bool is_moe_layer(int64_t i) const {
    return i >= first_k_dense_replace && i % moe_layer_freq == 0;
  }
  bool has_mtp() const { return num_nextn_predict_layers > 0; }
  bool has_shared_experts() const { return n_shared_experts > 0; }
  // The router has e_score_correction_bias (V3's noaux_tc).
  bool has_router_bias() const { return topk_method == "noaux_tc"; }
  int64_t experts_per_group() const { return n_routed_experts / n_group; }
  // Layers with weights: the main model then the MTP modules.
  int64_t num_layers_total() const { return num_hidden_layers + num_nextn_predict_layers; }

  // The attention softmax scale exactly as HF transformers (5.17, V2 and V3 alike) computes it:
  // qk_head_dim^-0.5, times yarn_mscale(factor, mscale_all_dim)^2 with YaRN and a non-zero
  // mscale_all_dim. Checked against transformers 5.17 for the v3, v2-lite and tf5-small configs.
  double softmax_scale() const;
  // The factor HF's YaRN init multiplies cos/sin by ("attention_factor"); 1.0 without YaRN.
  double rope_attention_factor() const;
};

// yarn_get_mscale of HF/DeepSeek: 1 when scale ≤ 1, else 0.1·mscale·ln(scale) + 1.
double yarn_mscale(double scale, double mscale);

// Parse and validate config.json text. `source` names the file in error messages.
ModelConfig parse_model_config(std::string_view json_text, const std::string& source = "config.json");
// Read, parse and validate a config.json file.
ModelConfig load_model_config(const std::string& path);
// Check every rule; throws InputError naming `source` and the field.
void validate_model_config(const ModelConfig& c, const std::string& source = "config.json");
// config.json text in the hub's spelling (sorted keys, 2-space indent, trailing newline).
std::string serialize_model_config(const ModelConfig& c);
// Write serialize_model_config(c) to `path` atomically.
void save_model_config(const ModelConfig& c, const std::string& path);

}  // namespace dsv3
