#include "model/config.h"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "model/presets.h"

namespace dsv3 {
namespace {

using json = nlohmann::json;

std::string data_path(const std::string& name) {
  return std::string(DSV3_SOURCE_DIR) + "/tests/data/configs/" + name;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// A small valid V3 config in the hub spelling; tests mutate it to hit each rule.
json small_v3() {
  return json::parse(R"({
    "model_type": "deepseek_v3", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
    "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 4, "max_position_embeddings": 1024, "q_lora_rank": 48, "kv_lora_rank": 32,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8,
    "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
    "routed_scaling_factor": 2.5, "norm_topk_prob": true, "scoring_func": "sigmoid",
    "topk_method": "noaux_tc", "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": false, "rms_norm_eps": 1e-6,
    "rope_theta": 10000, "rope_scaling": null, "bos_token_id": 0, "eos_token_id": 1
  })");
}

ModelConfig parse(const json& j) { return parse_model_config(j.dump(), "test.json"); }

std::string error_of(const json& j) {
  try {
    parse(j);
  } catch (const InputError& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(Config, HubV3) {
  ModelConfig c = load_model_config(data_path("deepseek_v3_hub.json"));
  EXPECT_EQ(c.model_type, "deepseek_v3");
  EXPECT_EQ(c.vocab_size, 129280);
  EXPECT_EQ(c.hidden_size, 7168);
  EXPECT_EQ(c.intermediate_size, 18432);
  EXPECT_EQ(c.moe_intermediate_size, 2048);
  EXPECT_EQ(c.num_hidden_layers, 61);
  EXPECT_EQ(c.num_attention_heads, 128);
  ASSERT_TRUE(c.q_lora_rank.has_value());
  EXPECT_EQ(*c.q_lora_rank, 1536);
  EXPECT_EQ(c.kv_lora_rank, 512);
  EXPECT_EQ(c.qk_head_dim(), 192);
  EXPECT_EQ(c.n_routed_experts, 256);
  EXPECT_EQ(c.n_group, 8);
  EXPECT_EQ(c.topk_group, 4);
  EXPECT_EQ(c.num_experts_per_tok, 8);
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 2.5);
  EXPECT_TRUE(c.has_router_bias());
  EXPECT_TRUE(c.has_mtp());
  EXPECT_EQ(c.num_nextn_predict_layers, 1);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  ASSERT_TRUE(c.rope_scaling.has_value());
  EXPECT_DOUBLE_EQ(c.rope_scaling->factor, 40.0);
  EXPECT_EQ(c.rope_scaling->original_max_position_embeddings, 4096);
  EXPECT_DOUBLE_EQ(*c.rope_scaling->mscale_all_dim, 1.0);
  ASSERT_TRUE(c.quantization_config.has_value());
  EXPECT_EQ(c.quantization_config->weight_block_size[0], 128);
  EXPECT_EQ(c.bos_token_id, 0);
  ASSERT_EQ(c.eos_token_id.size(), 1u);
  EXPECT_EQ(c.eos_token_id[0], 1);
  // HF: 192^-0.5 · (0.1·1·ln 40 + 1)^2; the cos/sin factor is mscale/mscale_all_dim = 1.
  const double m = 0.1 * std::log(40.0) + 1.0;
  EXPECT_NEAR(c.softmax_scale(), m * m / std::sqrt(192.0), 1e-15);
  EXPECT_DOUBLE_EQ(c.rope_attention_factor(), 1.0);
  for (int i = 0; i < 3; ++i) EXPECT_FALSE(c.is_moe_layer(i)) << i;
  for (int i = 3; i <= 61; ++i) EXPECT_TRUE(c.is_moe_layer(i)) << i;
}

TEST(Config, PresetV3IsTheHubFile) {
  ModelConfig a = preset_config("v3");
  ModelConfig b = load_model_config(data_path("deepseek_v3_hub.json"));
  EXPECT_EQ(serialize_model_config(a), serialize_model_config(b));
  ModelConfig l = preset_config("v2-lite");
  EXPECT_EQ(serialize_model_config(l), serialize_model_config(load_model_config(data_path("deepseek_v2_lite_hub.json"))));
}

TEST(Config, Transformers5Spelling) {
  ModelConfig c = load_model_config(data_path("deepseek_v3_tf5_small.json"));
  EXPECT_FALSE(c.q_lora_rank.has_value());
  EXPECT_DOUBLE_EQ(c.rope_theta, 50000.0);
  ASSERT_TRUE(c.rope_scaling.has_value());
  EXPECT_DOUBLE_EQ(c.rope_scaling->factor, 8.0);
  EXPECT_DOUBLE_EQ(*c.rope_scaling->mscale, 1.0);
  EXPECT_DOUBLE_EQ(*c.rope_scaling->mscale_all_dim, 0.707);
  EXPECT_EQ(c.torch_dtype, "float32");
  EXPECT_EQ(c.eos_token_id, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(c.num_nextn_predict_layers, 2);
  EXPECT_EQ(c.n_shared_experts, 2);
  EXPECT_FALSE(c.norm_topk_prob);
  // Defaults for V3 fields the file leaves out: HF hard-wires sigmoid + noaux_tc.
  EXPECT_EQ(c.scoring_func, "sigmoid");
  EXPECT_EQ(c.topk_method, "noaux_tc");
  EXPECT_EQ(c.moe_layer_freq, 1);
  const double m_all = 0.1 * 0.707 * std::log(8.0) + 1.0;
  EXPECT_NEAR(c.softmax_scale(), m_all * m_all / std::sqrt(40.0), 1e-15);
  EXPECT_NEAR(c.rope_attention_factor(), (0.1 * std::log(8.0) + 1.0) / m_all, 1e-15);
}

// Values printed by transformers 5.17 on the GPU machine for these configs: the `scaling` of
// layer 0's attention module and the rotary embedding's `attention_scaling`.
TEST(Config, SoftmaxScaleEqualsTransformers517) {
  EXPECT_NEAR(preset_config("v3").softmax_scale(), 0.1352337788608801, 1e-15);
  EXPECT_NEAR(preset_config("v2-lite").softmax_scale(), 0.1147213867929261, 1e-15);
  EXPECT_NEAR(preset_config("bench-0.7b").softmax_scale(), 0.07216878364870322, 1e-15);
  EXPECT_NEAR(preset_config("tiny").softmax_scale(), 0.14433756729740643, 1e-15);
  ModelConfig s = load_model_config(data_path("deepseek_v3_tf5_small.json"));
  EXPECT_NEAR(s.softmax_scale(), 0.20802203848749565, 1e-15);
  EXPECT_NEAR(s.rope_attention_factor(), 1.053118360780668, 1e-14);
  EXPECT_DOUBLE_EQ(preset_config("v2-lite").rope_attention_factor(), 1.0);
}

TEST(Config, DefaultRopeInTransformers5SpellingMeansNoScaling) {
  json j = small_v3();
  j.erase("rope_theta");
  j.erase("rope_scaling");
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 20000.0}};
  ModelConfig c = parse(j);
  EXPECT_FALSE(c.rope_scaling.has_value());
  EXPECT_DOUBLE_EQ(c.rope_theta, 20000.0);
  EXPECT_DOUBLE_EQ(c.softmax_scale(), 1.0 / std::sqrt(24.0));
  EXPECT_DOUBLE_EQ(c.rope_attention_factor(), 1.0);
}

TEST(Config, YarnWithoutMscalesUsesHfDefaults) {
  json j = small_v3();
  j["rope_scaling"] = {{"type", "yarn"}, {"factor", 4}, {"original_max_position_embeddings", 256}};
  ModelConfig c = parse(j);
  // No mscale_all_dim → no softmax factor; attention_factor = get_mscale(factor) = 0.1 ln 4 + 1.
  EXPECT_DOUBLE_EQ(c.softmax_scale(), 1.0 / std::sqrt(24.0));
  EXPECT_NEAR(c.rope_attention_factor(), 0.1 * std::log(4.0) + 1.0, 1e-15);
  j["rope_scaling"]["attention_factor"] = 0.5;
  EXPECT_DOUBLE_EQ(parse(j).rope_attention_factor(), 0.5);
  // factor ≤ 1: get_mscale is 1.
  j["rope_scaling"] = {{"type", "yarn"}, {"factor", 1}, {"original_max_position_embeddings", 256},
                       {"mscale_all_dim", 1.0}};
  EXPECT_DOUBLE_EQ(parse(j).softmax_scale(), 1.0 / std::sqrt(24.0));
}

TEST(Config, HubV2Lite) {
  ModelConfig c = load_model_config(data_path("deepseek_v2_lite_hub.json"));
  EXPECT_EQ(c.model_type, "deepseek_v2");
  EXPECT_FALSE(c.q_lora_rank.has_value());
  EXPECT_EQ(c.scoring_func, "softmax");
  EXPECT_EQ(c.topk_method, "greedy");
  EXPECT_FALSE(c.has_router_bias());
  EXPECT_EQ(c.n_shared_experts, 2);
  EXPECT_EQ(c.num_experts_per_tok, 6);
  EXPECT_EQ(c.first_k_dense_replace, 1);
  EXPECT_EQ(c.num_nextn_predict_layers, 0);
  EXPECT_FALSE(c.has_mtp());
  EXPECT_EQ(c.bos_token_id, 100000);
  // transformers 5.17 DeepseekV2Attention: the same YaRN mscale² rule as V3 (here mscale_all_dim
  // 0.707); cos/sin are scaled by mscale/mscale_all_dim = 1.
  const double m = 0.1 * 0.707 * std::log(40.0) + 1.0;
  EXPECT_NEAR(c.softmax_scale(), m * m / std::sqrt(192.0), 1e-15);
  EXPECT_DOUBLE_EQ(c.rope_attention_factor(), 1.0);
}

TEST(Config, V2DefaultsForOmittedFields) {
  // A V2 hub config may lack the routing fields; DeepseekV2Config's defaults apply.
  json j = small_v3();
  j["model_type"] = "deepseek_v2";
  for (const char* k : {"n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "scoring_func",
                        "topk_method", "moe_layer_freq", "num_nextn_predict_layers", "bos_token_id",
                        "eos_token_id", "max_position_embeddings", "num_key_value_heads", "rope_theta",
                        "rope_scaling", "rms_norm_eps", "tie_word_embeddings"})
    j.erase(k);
  ModelConfig c = parse(j);
  EXPECT_EQ(c.scoring_func, "softmax");
  EXPECT_EQ(c.topk_method, "greedy");
  EXPECT_EQ(c.n_group, 1);
  EXPECT_EQ(c.topk_group, 1);
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 1.0);
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_EQ(c.moe_layer_freq, 1);
  EXPECT_EQ(c.num_nextn_predict_layers, 0);
  EXPECT_EQ(c.max_position_embeddings, 2048);
  EXPECT_EQ(c.num_key_value_heads, c.num_attention_heads);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_id, std::vector<int64_t>{2});
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_FALSE(c.rope_scaling.has_value());
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  // and the V3 class's defaults for a V3 file
  json k = small_v3();
  for (const char* f : {"n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "max_position_embeddings"})
    k.erase(f);
  k["n_routed_experts"] = 16;
  ModelConfig v3 = parse(k);
  EXPECT_EQ(v3.n_group, 8);
  EXPECT_EQ(v3.topk_group, 4);
  EXPECT_DOUBLE_EQ(v3.routed_scaling_factor, 2.5);
  EXPECT_TRUE(v3.norm_topk_prob);
  EXPECT_EQ(v3.max_position_embeddings, 4096);
}

TEST(Config, NullSharedExpertsMeansNone) {
  json j = small_v3();
  j["n_shared_experts"] = nullptr;
  EXPECT_FALSE(parse(j).has_shared_experts());
  j["n_shared_experts"] = 0;
  EXPECT_FALSE(parse(j).has_shared_experts());
}

TEST(Config, MoeLayerFreq) {
  json j = small_v3();
  j["num_hidden_layers"] = 6;
  j["moe_layer_freq"] = 2;
  ModelConfig c = parse(j);
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_FALSE(c.is_moe_layer(1));
  EXPECT_TRUE(c.is_moe_layer(2));
  EXPECT_FALSE(c.is_moe_layer(3));
  EXPECT_TRUE(c.is_moe_layer(4));
}

struct BadCase {
  const char* field;  // must appear in the message as "field '<field>'"
  std::function<void(json&)> mutate;
};

TEST(Config, EveryValidationErrorNamesTheField) {
  const std::vector<BadCase> cases = {
      {"model_type", [](json& j) { j.erase("model_type"); }},
      {"model_type", [](json& j) { j["model_type"] = "llama"; }},
      {"vocab_size", [](json& j) { j.erase("vocab_size"); }},
      {"vocab_size", [](json& j) { j["vocab_size"] = "256"; }},
      {"vocab_size", [](json& j) { j["vocab_size"] = 0; }},
      {"hidden_size", [](json& j) { j["hidden_size"] = 64.5; }},
      {"hidden_size", [](json& j) { j["hidden_size"] = -64; }},
      {"hidden_size", [](json& j) { j["hidden_size"] = 1ull << 40; }},
      {"hidden_size", [](json& j) { j["hidden_size"] = 18446744073709551615ull; }},
      {"intermediate_size", [](json& j) { j.erase("intermediate_size"); }},
      {"moe_intermediate_size", [](json& j) { j["moe_intermediate_size"] = 0; }},
      {"num_hidden_layers", [](json& j) { j["num_hidden_layers"] = 0; }},
      {"num_attention_heads", [](json& j) { j["num_attention_heads"] = nullptr; }},
      {"num_key_value_heads", [](json& j) { j["num_key_value_heads"] = 2; }},
      {"max_position_embeddings", [](json& j) { j["max_position_embeddings"] = 0; }},
      {"q_lora_rank", [](json& j) { j.erase("q_lora_rank"); }},
      {"q_lora_rank", [](json& j) { j["q_lora_rank"] = 0; }},
      {"kv_lora_rank", [](json& j) { j["kv_lora_rank"] = -1; }},
      {"qk_nope_head_dim", [](json& j) { j["qk_nope_head_dim"] = 0; }},
      {"qk_rope_head_dim", [](json& j) { j["qk_rope_head_dim"] = 0; }},
      {"qk_rope_head_dim", [](json& j) { j["qk_rope_head_dim"] = 7; }},
      {"v_head_dim", [](json& j) { j["v_head_dim"] = 0; }},
      {"n_routed_experts", [](json& j) { j["n_routed_experts"] = 0; }},
      {"n_shared_experts", [](json& j) { j.erase("n_shared_experts"); }},
      {"n_shared_experts", [](json& j) { j["n_shared_experts"] = -1; }},
      {"num_experts_per_tok", [](json& j) { j.erase("num_experts_per_tok"); }},
      {"num_experts_per_tok", [](json& j) { j["num_experts_per_tok"] = 9; }},
      {"n_group", [](json& j) { j["n_group"] = 3; }},  // 8 % 3 != 0
      {"n_group", [](json& j) { j["n_group"] = 8; j["topk_group"] = 4; }},  // 1 expert per group
      {"n_group", [](json& j) { j["n_group"] = 0; }},
      {"topk_group", [](json& j) { j["topk_group"] = 5; }},
      {"topk_group", [](json& j) { j["topk_group"] = 0; }},
      {"num_experts_per_tok", [](json& j) { j["topk_group"] = 1; j["num_experts_per_tok"] = 3; }},
      {"routed_scaling_factor", [](json& j) { j["routed_scaling_factor"] = 0; }},
      {"routed_scaling_factor", [](json& j) { j["routed_scaling_factor"] = "2.5"; }},
      {"norm_topk_prob", [](json& j) { j["norm_topk_prob"] = 1; }},
      {"scoring_func", [](json& j) { j["scoring_func"] = "softmax"; }},
      {"topk_method", [](json& j) { j["topk_method"] = "greedy"; }},
      {"scoring_func",
       [](json& j) { j["model_type"] = "deepseek_v2"; j["topk_method"] = "greedy"; }},  // V2 with sigmoid
      {"topk_method", [](json& j) { j["model_type"] = "deepseek_v2"; j["scoring_func"] = "softmax"; }},
      {"n_group", [](json& j) {
         j["model_type"] = "deepseek_v2"; j["scoring_func"] = "softmax";
         j["topk_method"] = "group_limited_greedy"; j.erase("n_group"); }},
      {"first_k_dense_replace", [](json& j) { j.erase("first_k_dense_replace"); }},
      {"first_k_dense_replace", [](json& j) { j["first_k_dense_replace"] = 4; }},
      {"moe_layer_freq", [](json& j) { j["moe_layer_freq"] = 0; }},
      {"num_nextn_predict_layers", [](json& j) { j["num_nextn_predict_layers"] = -1; }},
      {"tie_word_embeddings", [](json& j) { j["tie_word_embeddings"] = "false"; }},
      {"rms_norm_eps", [](json& j) { j["rms_norm_eps"] = 0; }},
      {"rope_theta", [](json& j) { j["rope_theta"] = -1; }},
      {"hidden_act", [](json& j) { j["hidden_act"] = "gelu"; }},
      {"rope_scaling", [](json& j) { j["rope_scaling"] = 40; }},
      {"rope_scaling.type", [](json& j) { j["rope_scaling"] = {{"type", "linear"}, {"factor", 2}}; }},
      {"rope_scaling.rope_type", [](json& j) { j["rope_scaling"] = {{"factor", 2}}; }},
      {"rope_scaling.factor",
       [](json& j) { j["rope_scaling"] = {{"type", "yarn"}, {"original_max_position_embeddings", 4096}}; }},
      {"rope_scaling.factor", [](json& j) {
         j["rope_scaling"] = {{"type", "yarn"}, {"factor", -2}, {"original_max_position_embeddings", 4096}}; }},
      {"rope_scaling.original_max_position_embeddings",
       [](json& j) { j["rope_scaling"] = {{"type", "yarn"}, {"factor", 4}}; }},
      {"rope_scaling.mscale_all_dim", [](json& j) {
         j["rope_scaling"] = {{"type", "yarn"}, {"factor", 4}, {"original_max_position_embeddings", 64},
                              {"mscale_all_dim", -1}}; }},
      {"rope_scaling.rope_type", [](json& j) {
         j["rope_scaling"] = {{"type", "yarn"}, {"rope_type", "default"}, {"factor", 4}}; }},
      {"rope_parameters", [](json& j) { j["rope_parameters"] = {{"rope_type", "default"}}; j["rope_scaling"] = {{"type", "yarn"}}; }},
      {"rope_parameters", [](json& j) { j["rope_parameters"] = "yarn"; }},
      {"rope_theta", [](json& j) { j["rope_theta"] = 500; j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1000}}; }},
      {"bos_token_id", [](json& j) { j["bos_token_id"] = 256; }},
      {"eos_token_id", [](json& j) { j["eos_token_id"] = json::array({1, -1}); }},
      {"eos_token_id", [](json& j) { j["eos_token_id"] = "1"; }},
      {"dtype", [](json& j) { j["torch_dtype"] = "bfloat16"; j["dtype"] = "float32"; }},
      {"torch_dtype", [](json& j) { j["torch_dtype"] = "int8"; }},
      {"quantization_config", [](json& j) { j["quantization_config"] = 1; }},
      {"quantization_config.quant_method", [](json& j) { j["quantization_config"] = {{"quant_method", "awq"}}; }},
      {"quantization_config.fmt", [](json& j) {
         j["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e5m2"}, {"weight_block_size", {128, 128}}}; }},
      {"quantization_config.weight_block_size", [](json& j) { j["quantization_config"] = {{"quant_method", "fp8"}}; }},
      {"quantization_config.weight_block_size",
       [](json& j) { j["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", {128, 0}}}; }},
      {"quantization_config.weight_block_size",
       [](json& j) { j["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", {128}}}; }},
      {"qk_head_dim", [](json& j) { j["qk_head_dim"] = 16; }},
      {"head_dim", [](json& j) { j["head_dim"] = 16; }},
      {"architectures", [](json& j) { j["architectures"] = json::array({1}); }},
      {"aux_loss_alpha", [](json& j) { j["aux_loss_alpha"] = -0.1; }},
      {"mlp_bias", [](json& j) { j["mlp_bias"] = true; }},
  };
  ASSERT_NO_THROW(parse(small_v3()));
  for (size_t i = 0; i < cases.size(); ++i) {
    json j = small_v3();
    cases[i].mutate(j);
    std::string msg = error_of(j);
    EXPECT_NE(msg.find(std::string("field '") + cases[i].field + "'"), std::string::npos)
        << "case " << i << " (" << cases[i].field << "): " << msg;
    EXPECT_EQ(msg.rfind("test.json: ", 0), 0u) << "case " << i << ": " << msg;
  }
}

TEST(Config, MalformedFilesAreInputErrors) {
  for (const char* text : {"", "[]", "{", "{\"model_type\": \"deepseek_v3\",}", "null", "\"x\"",
                           "{\"a\": 1, \"a\": 2}", "\xff\xfe{}"}) {
    try {
      parse_model_config(text, "bad.json");
      ADD_FAILURE() << "accepted: " << text;
    } catch (const InputError& e) {
      EXPECT_EQ(std::string(e.what()).rfind("bad.json", 0), 0u) << e.what();
    }
  }
  EXPECT_THROW(load_model_config(data_path("no_such_config.json")), InputError);
}

TEST(Config, TotalsThatOverflowAreRejected) {
  json j = small_v3();
  j["num_hidden_layers"] = 4000;
  j["n_routed_experts"] = 65536;
  j["n_group"] = 1;
  j["topk_group"] = 1;
  j["first_k_dense_replace"] = 1;
  EXPECT_NE(error_of(j).find("tensors"), std::string::npos) << error_of(j);
  j = small_v3();
  j["vocab_size"] = 1 << 24;
  j["hidden_size"] = 1 << 24;
  j["intermediate_size"] = 1 << 24;
  j["moe_intermediate_size"] = 1 << 24;
  j["num_hidden_layers"] = 4096;
  j["n_routed_experts"] = 1024;
  j["n_group"] = 1;
  j["topk_group"] = 1;
  EXPECT_NE(error_of(j).find("2^63"), std::string::npos) << error_of(j);
}

TEST(Config, RoundTrip) {
  std::vector<ModelConfig> configs;
  for (const auto& name : preset_names()) configs.push_back(preset_config(name));
  for (const char* f : {"deepseek_v3_hub.json", "deepseek_v3_tf5_small.json", "deepseek_v2_lite_hub.json",
                        "deepseek_v2_236b_hub.json"})
    configs.push_back(load_model_config(data_path(f)));
  json j = small_v3();
  j["attention_bias"] = true;
  j["tie_word_embeddings"] = true;
  j["bos_token_id"] = nullptr;
  j["rope_scaling"] = {{"type", "yarn"}, {"factor", 4}, {"original_max_position_embeddings", 64},
                       {"attention_factor", 0.9}, {"truncate", false}};
  configs.push_back(parse(j));
  for (const ModelConfig& c : configs) {
    const std::string text = serialize_model_config(c);
    ModelConfig back = parse_model_config(text, "roundtrip");
    EXPECT_EQ(serialize_model_config(back), text);
    EXPECT_EQ(back.q_lora_rank, c.q_lora_rank);
    EXPECT_EQ(back.rope_scaling.has_value(), c.rope_scaling.has_value());
    if (c.rope_scaling) {
      EXPECT_EQ(back.rope_scaling->mscale, c.rope_scaling->mscale);
      EXPECT_EQ(back.rope_scaling->attention_factor, c.rope_scaling->attention_factor);
      EXPECT_EQ(back.rope_scaling->truncate, c.rope_scaling->truncate);
    }
    EXPECT_EQ(back.eos_token_id, c.eos_token_id);
    EXPECT_EQ(back.bos_token_id, c.bos_token_id);
    EXPECT_EQ(back.softmax_scale(), c.softmax_scale());
    // The hub spelling: rope_theta + rope_scaling, architectures set.
    json out = json::parse(text);
    EXPECT_TRUE(out.contains("rope_theta"));
    EXPECT_TRUE(out.contains("rope_scaling"));
    EXPECT_FALSE(out.contains("rope_parameters"));
    EXPECT_EQ(out["architectures"][0], c.is_v3() ? "DeepseekV3ForCausalLM" : "DeepseekV2ForCausalLM");
  }
}

TEST(Config, SaveWritesAFileThatLoads) {
  const std::string dir = testing::TempDir() + "dsv3_config_save";
  std::filesystem::create_directories(dir);
  const std::string path = dir + "/config.json";
  ModelConfig c = preset_config("tiny");
  save_model_config(c, path);
  EXPECT_EQ(serialize_model_config(load_model_config(path)), serialize_model_config(c));
  EXPECT_EQ(read_text(path), serialize_model_config(c));
}

TEST(Presets, KnownAndUnknown) {
  EXPECT_EQ(preset_names().size(), 4u);
  try {
    preset_config("v4");
    FAIL();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("tiny"), std::string::npos) << e.what();
  }
}

TEST(Presets, TinyHasEveryFeature) {
  ModelConfig c = preset_config("tiny");
  EXPECT_TRUE(c.q_lora_rank.has_value());
  EXPECT_GE(c.n_group, 2);
  EXPECT_LT(c.topk_group, c.n_group);
  EXPECT_TRUE(c.has_shared_experts());
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(c.num_hidden_layers - 1));
  EXPECT_EQ(c.num_nextn_predict_layers, 1);
  EXPECT_NE(c.routed_scaling_factor, 1.0);
  EXPECT_TRUE(c.has_router_bias());
}

TEST(Presets, Bench07bAsSpecified) {
  ModelConfig c = preset_config("bench-0.7b");
  EXPECT_EQ(c.hidden_size, 1024);
  EXPECT_EQ(c.num_hidden_layers, 12);
  EXPECT_EQ(c.first_k_dense_replace, 1);
  EXPECT_EQ(c.intermediate_size, 2816);
  EXPECT_EQ(c.num_attention_heads, 16);
  EXPECT_EQ(c.qk_nope_head_dim, 128);
  EXPECT_EQ(c.qk_rope_head_dim, 64);
  EXPECT_EQ(c.v_head_dim, 128);
  EXPECT_EQ(c.q_lora_rank, 512);
  EXPECT_EQ(c.kv_lora_rank, 256);
  EXPECT_EQ(c.n_routed_experts, 32);
  EXPECT_EQ(c.num_experts_per_tok, 4);
  EXPECT_EQ(c.n_group, 4);
  EXPECT_EQ(c.topk_group, 2);
  EXPECT_EQ(c.n_shared_experts, 1);
  EXPECT_EQ(c.moe_intermediate_size, 512);
  EXPECT_EQ(c.vocab_size, 32768);
  EXPECT_EQ(c.num_nextn_predict_layers, 1);
}

}  // namespace
}  // namespace dsv3
