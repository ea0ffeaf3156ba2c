#include "model/tensor_table.h"

#include <gtest/gtest.h>

#include <set>

#include "core/error.h"
#include "model/model_stats.h"
#include "model/presets.h"

namespace dsv3 {
namespace {

std::string data_path(const std::string& name) {
  return std::string(DSV3_SOURCE_DIR) + "/tests/data/configs/" + name;
}

ModelConfig small() {
  ModelConfig c = preset_config("tiny");
  c.num_hidden_layers = 3;
  c.first_k_dense_replace = 1;
  c.n_routed_experts = 4;
  c.n_group = 2;
  c.topk_group = 1;
  c.num_experts_per_tok = 2;
  c.num_nextn_predict_layers = 1;
  validate_model_config(c, "small");
  return c;
}

TEST(TensorTable, NamesAndShapesOfASmallConfig) {
  const ModelConfig c = small();  // hidden 128, vocab 4096, 4 heads, q_lora 64, kv_lora 32, qk 32+16, v 32
  const TensorTable t = build_tensor_table(c);
  auto shape = [&](const std::string& n) {
    const TensorSpec* s = t.find(n);
    EXPECT_NE(s, nullptr) << n;
    return s ? s->shape : Shape{};
  };
  EXPECT_EQ(shape("model.embed_tokens.weight"), (Shape{4096, 128}));
  EXPECT_EQ(shape("model.norm.weight"), (Shape{128}));
  EXPECT_EQ(shape("lm_head.weight"), (Shape{4096, 128}));
  EXPECT_EQ(shape("model.layers.0.input_layernorm.weight"), (Shape{128}));
  EXPECT_EQ(shape("model.layers.0.self_attn.q_a_proj.weight"), (Shape{64, 128}));
  EXPECT_EQ(shape("model.layers.0.self_attn.q_a_layernorm.weight"), (Shape{64}));
  EXPECT_EQ(shape("model.layers.0.self_attn.q_b_proj.weight"), (Shape{4 * 48, 64}));
  EXPECT_EQ(shape("model.layers.0.self_attn.kv_a_proj_with_mqa.weight"), (Shape{32 + 16, 128}));
  EXPECT_EQ(shape("model.layers.0.self_attn.kv_a_layernorm.weight"), (Shape{32}));
  EXPECT_EQ(shape("model.layers.0.self_attn.kv_b_proj.weight"), (Shape{4 * (32 + 32), 32}));
  EXPECT_EQ(shape("model.layers.0.self_attn.o_proj.weight"), (Shape{128, 4 * 32}));
  EXPECT_EQ(shape("model.layers.0.post_attention_layernorm.weight"), (Shape{128}));
  EXPECT_EQ(shape("model.layers.0.mlp.gate_proj.weight"), (Shape{384, 128}));
  EXPECT_EQ(shape("model.layers.0.mlp.up_proj.weight"), (Shape{384, 128}));
  EXPECT_EQ(shape("model.layers.0.mlp.down_proj.weight"), (Shape{128, 384}));
  EXPECT_EQ(t.find("model.layers.0.mlp.gate.weight"), nullptr);
  EXPECT_EQ(shape("model.layers.1.mlp.gate.weight"), (Shape{4, 128}));
  EXPECT_EQ(shape("model.layers.1.mlp.gate.e_score_correction_bias"), (Shape{4}));
  EXPECT_EQ(shape("model.layers.2.mlp.experts.3.gate_proj.weight"), (Shape{96, 128}));
  EXPECT_EQ(shape("model.layers.2.mlp.experts.3.up_proj.weight"), (Shape{96, 128}));
  EXPECT_EQ(shape("model.layers.2.mlp.experts.3.down_proj.weight"), (Shape{128, 96}));
  EXPECT_EQ(t.find("model.layers.2.mlp.experts.4.gate_proj.weight"), nullptr);
  EXPECT_EQ(t.find("model.layers.1.mlp.gate_proj.weight"), nullptr);
  EXPECT_EQ(shape("model.layers.1.mlp.shared_experts.gate_proj.weight"), (Shape{96, 128}));
  EXPECT_EQ(shape("model.layers.1.mlp.shared_experts.down_proj.weight"), (Shape{128, 96}));
  // MTP module 1 at layer index 3: its own tensors, a full MoE block, and the two stored copies.
  EXPECT_EQ(shape("model.layers.3.enorm.weight"), (Shape{128}));
  EXPECT_EQ(shape("model.layers.3.hnorm.weight"), (Shape{128}));
  EXPECT_EQ(shape("model.layers.3.eh_proj.weight"), (Shape{128, 256}));
  EXPECT_EQ(shape("model.layers.3.shared_head.norm.weight"), (Shape{128}));
  EXPECT_EQ(shape("model.layers.3.shared_head.head.weight"), (Shape{4096, 128}));
  EXPECT_EQ(shape("model.layers.3.embed_tokens.weight"), (Shape{4096, 128}));
  EXPECT_EQ(shape("model.layers.3.self_attn.kv_b_proj.weight"), (Shape{256, 32}));
  EXPECT_EQ(shape("model.layers.3.mlp.experts.0.gate_proj.weight"), (Shape{96, 128}));
  EXPECT_EQ(t.find("model.layers.4.input_layernorm.weight"), nullptr);

  // Count by construction: 4 globals-or-copies + per layer.
  const size_t attn = 2 /*layer norms*/ + 7, dense_mlp = 3, moe = 2 + 4 * 3 + 3;
  const size_t expected = 3 /*embed, norm, head*/ + (attn + dense_mlp) + 2 * (attn + moe) +
                          (attn + moe + 4 /*enorm hnorm eh_proj head_norm*/ + 2 /*copies*/);
  EXPECT_EQ(t.size(), expected);
  std::set<std::string> names;
  for (const auto& s : t.tensors) EXPECT_TRUE(names.insert(s.name).second) << s.name;
}

TEST(TensorTable, DescriptiveFields) {
  const TensorTable t = build_tensor_table(small());
  const TensorSpec* bias = t.find("model.layers.1.mlp.gate.e_score_correction_bias");
  ASSERT_NE(bias, nullptr);
  EXPECT_EQ(bias->kind, TensorKind::router_bias);
  EXPECT_EQ(bias->dtype, DType::F32);
  EXPECT_FALSE(bias->trainable);
  EXPECT_FALSE(bias->weight_decay);
  EXPECT_FALSE(bias->fp8);
  EXPECT_EQ(bias->layer, 1);

  const TensorSpec* ex = t.find("model.layers.2.mlp.experts.3.down_proj.weight");
  ASSERT_NE(ex, nullptr);
  EXPECT_EQ(ex->kind, TensorKind::expert_down_proj);
  EXPECT_EQ(ex->expert, 3);
  EXPECT_EQ(ex->layer, 2);
  EXPECT_TRUE(ex->fp8);
  EXPECT_TRUE(ex->weight_decay);
  EXPECT_FALSE(ex->is_mtp());
  EXPECT_EQ(ex->dtype, DType::BF16);

  for (const char* n : {"model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                        "model.layers.3.eh_proj.weight", "model.layers.3.shared_head.head.weight",
                        "model.norm.weight", "model.layers.0.self_attn.kv_a_layernorm.weight"})
    EXPECT_FALSE(t.find(n)->fp8) << n;
  for (const char* n : {"model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.q_b_proj.weight",
                        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                        "model.layers.0.self_attn.kv_b_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                        "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight",
                        "model.layers.3.mlp.experts.1.up_proj.weight", "model.layers.3.self_attn.o_proj.weight"})
    EXPECT_TRUE(t.find(n)->fp8) << n;

  const TensorSpec* copy = t.find("model.layers.3.embed_tokens.weight");
  EXPECT_EQ(copy->shared_with, "model.embed_tokens.weight");
  EXPECT_EQ(copy->mtp, 1);
  EXPECT_EQ(t.find("model.layers.3.shared_head.head.weight")->shared_with, "lm_head.weight");
  EXPECT_EQ(t.find("model.layers.3.self_attn.o_proj.weight")->mtp, 1);
  EXPECT_TRUE(t.find("model.layers.3.self_attn.o_proj.weight")->shared_with.empty());
  EXPECT_EQ(t.find("model.norm.weight")->layer, -1);
  EXPECT_FALSE(t.find("model.norm.weight")->weight_decay);

  const TensorSpec* kv = t.find("model.layers.0.self_attn.kv_a_proj_with_mqa.weight");
  EXPECT_EQ(scale_inv_name(*kv), "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv");
  EXPECT_EQ(scale_inv_shape(*kv), (Shape{1, 1}));
}

TEST(TensorTable, VariantsQProjBiasTiedV2) {
  ModelConfig c = small();
  c.q_lora_rank.reset();
  c.attention_bias = true;
  c.tie_word_embeddings = true;
  TensorTable t = build_tensor_table(c);
  EXPECT_EQ(t.find("model.layers.0.self_attn.q_proj.weight")->shape, (Shape{4 * 48, 128}));
  EXPECT_EQ(t.find("model.layers.0.self_attn.q_a_proj.weight"), nullptr);
  EXPECT_EQ(t.find("model.layers.0.self_attn.q_a_layernorm.weight"), nullptr);
  EXPECT_EQ(t.find("model.layers.0.self_attn.q_a_proj.bias"), nullptr);  // q_proj has no bias in HF
  EXPECT_EQ(t.find("model.layers.0.self_attn.kv_a_proj_with_mqa.bias")->shape, (Shape{48}));
  EXPECT_EQ(t.find("model.layers.0.self_attn.o_proj.bias")->shape, (Shape{128}));
  EXPECT_EQ(t.find("lm_head.weight"), nullptr);
  EXPECT_EQ(t.find("model.layers.3.shared_head.head.weight")->shared_with, "model.embed_tokens.weight");
  c.q_lora_rank = 64;
  t = build_tensor_table(c);
  EXPECT_EQ(t.find("model.layers.0.self_attn.q_a_proj.bias")->shape, (Shape{64}));

  const ModelConfig v2 = load_model_config(data_path("deepseek_v2_lite_hub.json"));
  t = build_tensor_table(v2);
  EXPECT_EQ(t.find("model.layers.1.mlp.gate.e_score_correction_bias"), nullptr);
  EXPECT_NE(t.find("model.layers.1.mlp.gate.weight"), nullptr);
  EXPECT_EQ(t.find("model.layers.1.mlp.shared_experts.gate_proj.weight")->shape, (Shape{2 * 1408, 2048}));
  EXPECT_EQ(t.find("model.layers.0.self_attn.q_proj.weight")->shape, (Shape{16 * 192, 2048}));
  EXPECT_EQ(t.find("model.layers.27.enorm.weight"), nullptr);
}

// Independent arithmetic from the config formula (not the table walk), DeepSeek-V3.
struct V3Arith {
  static constexpr int64_t H = 7168, V = 129280, L = 61, dense = 3, nh = 128;
  static constexpr int64_t attn = 1536 * H + 1536 + nh * 192 * 1536 + 576 * H + 512 + nh * 256 * 512 + H * nh * 128;
  static constexpr int64_t norms = 2 * H;
  static constexpr int64_t expert = 3 * H * 2048;
  static constexpr int64_t dense_mlp = 3 * H * 18432;
  static constexpr int64_t router = 256 * H + 256;
  static constexpr int64_t moe_total = 256 * expert + expert + router;
  static constexpr int64_t moe_active = 8 * expert + expert + router;
  static constexpr int64_t embed = V * H;
  static constexpr int64_t main_total =
      embed * 2 + H + dense * (attn + norms + dense_mlp) + (L - dense) * (attn + norms + moe_total);
  static constexpr int64_t main_active =
      embed * 2 + H + dense * (attn + norms + dense_mlp) + (L - dense) * (attn + norms + moe_active);
  static constexpr int64_t mtp = attn + norms + moe_total + 2 * H + H * 2 * H + H;
};

TEST(ModelStats, V3CountsMatchArithmeticAndRelease) {
  const ModelConfig c = preset_config("v3");
  const ParamCounts p = count_params(c);
  EXPECT_EQ(p.embed, V3Arith::embed);
  EXPECT_EQ(p.head, V3Arith::embed);
  EXPECT_EQ(p.main_total(), V3Arith::main_total);
  EXPECT_EQ(p.main_active(), V3Arith::main_active);
  EXPECT_EQ(p.mtp_total, V3Arith::mtp);
  EXPECT_EQ(p.mtp_shared, 2 * V3Arith::embed);
  // The release: "671B of the Main Model weights and 14B of the MTP Module weights" (README), "37B
  // activated" (paper); the MTP module has "11.5B unique parameters" (README_WEIGHTS).
  EXPECT_NEAR(double(p.main_total()) / 1e9, 671.0, 0.5);
  EXPECT_NEAR(double(p.main_active()) / 1e9, 37.0, 1.0);
  EXPECT_NEAR(double(p.mtp_total + p.mtp_shared) / 1e9, 14.0, 1.0);
  EXPECT_NEAR(double(p.mtp_total) / 1e9, 11.5, 0.2);
  // Hub total size "685B": every stored element, FP8 block scales included.
  EXPECT_NEAR(double(p.stored_total() + p.fp8_scales) / 1e9, 685.0, 0.5);
}

TEST(ModelStats, KvCachePublishedFigures) {
  const KvBytesPerToken k = kv_bytes_per_token(preset_config("v3"));
  EXPECT_EQ(k.latent_bf16, 70272);  // ISCA Table 1: 70.272 KB
  EXPECT_EQ(k.latent_fp8, 35136);
  EXPECT_EQ(k.naive_bf16, 128 * (192 + 128) * 2 * 61);
  EXPECT_EQ(k.mtp_latent_bf16, 576 * 2);
  // V2 paper: (d_c + d_h^R)·l elements.
  EXPECT_EQ(kv_bytes_per_token(preset_config("v2-lite")).latent_bf16, (512 + 64) * 27 * 2);
}

TEST(ModelStats, TrainingFlopsMatchIscaTable2) {
  // ISCA '25 Table 2, "Computational cost per token ... assuming a sequence length of 4096":
  // DeepSeek-V3 250 GFLOPS/Token, DeepSeek-V2 155 GFLOPS/Token.
  const FlopsPerToken v3 = flops_per_token(preset_config("v3"), 4096);
  EXPECT_NEAR(v3.train / 1e9, 250.0, 2.5);
  const FlopsPerToken v2 = flops_per_token(load_model_config(data_path("deepseek_v2_236b_hub.json")), 4096);
  EXPECT_NEAR(v2.train / 1e9, 155.0, 1.55);
  // The formula's parts, from the arithmetic above.
  const double nmm = double(V3Arith::main_active - V3Arith::embed - 61 * V3Arith::norms - 7168 - 58 * 256 -
                            61 * (1536 + 512));
  EXPECT_DOUBLE_EQ(v3.matmul_params_active, nmm);
  EXPECT_DOUBLE_EQ(v3.train, 6 * nmm + 6.0 * 61 * 128 * (192 + 128) * (4096 + 1) / 2.0);
  EXPECT_GT(v3.train_with_mtp, v3.train);
  EXPECT_THROW(flops_per_token(preset_config("tiny"), 0), InputError);
}

TEST(ModelStats, V2Sizes) {
  // V2 paper: 236B total, 21B activated; V2-Lite 15.7B total, 2.4B activated.
  const ParamCounts v2 = count_params(load_model_config(data_path("deepseek_v2_236b_hub.json")));
  EXPECT_NEAR(double(v2.main_total()) / 1e9, 236.0, 0.5);
  EXPECT_NEAR(double(v2.main_active()) / 1e9, 21.0, 1.0);
  const ParamCounts lite = count_params(preset_config("v2-lite"));
  EXPECT_NEAR(double(lite.main_total()) / 1e9, 15.7, 0.05);
  EXPECT_NEAR(double(lite.main_active() - lite.embed) / 1e9, 2.4, 0.1);
  EXPECT_EQ(lite.mtp_total, 0);
}

// sum(p.numel() for p in DeepseekV{3,2}ForCausalLM(config).parameters()) in transformers 5.17 (built on
// the meta device from our serialized presets). HF keeps e_score_correction_bias as a buffer and has
// no MTP layers, so its count is our main-model total less the router biases.
TEST(ModelStats, MainTotalsEqualTransformers517) {
  const std::vector<std::pair<std::string, int64_t>> hf = {
      {"v3", 671026404352}, {"v2-lite", 15706484224}, {"bench-0.7b", 713951232}, {"tiny", 2400768}};
  for (const auto& [name, n] : hf) {
    const ModelConfig c = preset_config(name);
    int64_t biases = 0;
    for (int64_t i = 0; i < c.num_hidden_layers; ++i)
      if (c.is_moe_layer(i) && c.has_router_bias()) biases += c.n_routed_experts;
    EXPECT_EQ(count_params(c).main_total() - biases, n) << name;
  }
}

TEST(ModelStats, TableAndCountsAgree) {
  for (const auto& name : preset_names()) {
    const ModelConfig c = preset_config(name);
    const ParamCounts p = count_params(c);
    int64_t sum = 0;
    if (name == "v3") continue;  // 46k tensors: covered by the arithmetic test
    for (const auto& t : build_tensor_table(c).tensors) sum += t.numel();
    EXPECT_EQ(sum, p.stored_total()) << name;
    EXPECT_EQ(int64_t(build_tensor_table(c).size()), p.tensors) << name;
  }
}

}  // namespace
}  // namespace dsv3
