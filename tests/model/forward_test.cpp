// The model forward: parity with the HF fixtures (tests/data/fixtures/*), invariants on random
// models (causality, batching, MTP shapes, FP8 vs dequantized, sharded vs single file), and the
// errors a bad checkpoint produces.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>

#include "backend/ops.h"
#include "io/checkpoint_index.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/model.h"
#include "model/presets.h"
#include "model/weights.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

// max|a − b| / max|b| over all elements.
double rel_err(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  if (!(a.shape() == b.shape())) return INFINITY;
  Tensor fa = a.to(DType::F32), fb = b.to(DType::F32);
  const float* x = fa.data<float>();
  const float* y = fb.data<float>();
  double num = 0, den = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    if (!std::isfinite(x[i])) return INFINITY;
    num = std::max(num, double(std::fabs(x[i] - y[i])));
    den = std::max(den, double(std::fabs(y[i])));
  }
  return den > 0 ? num / den : num;
}

struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& tag) {
    path = fs::temp_directory_path() / cat("dsv3_forward_test_", tag, "_", ::getpid());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string str() const { return path.string(); }
};

// A small V3 config with every feature on, and hidden > 128 (not a multiple) for FP8 edge blocks.
const char* kSmallV3 = R"({
  "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
  "vocab_size": 97, "hidden_size": 136, "intermediate_size": 144, "moe_intermediate_size": 40,
  "num_hidden_layers": 2, "num_attention_heads": 3, "num_key_value_heads": 3,
  "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12,
  "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
  "routed_scaling_factor": 2.5, "norm_topk_prob": true, "first_k_dense_replace": 1,
  "topk_method": "noaux_tc", "scoring_func": "sigmoid", "num_nextn_predict_layers": 2,
  "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
  "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                   "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
  "tie_word_embeddings": false, "torch_dtype": "float32"
})";

ModelConfig small_v3() { return parse_model_config(kSmallV3, "small_v3"); }

// Random weights large enough that routing and attention are far from uniform.
Weights random_weights(const ModelConfig& c, uint64_t seed = 7) {
  Weights w = Weights::random(c, seed, 0.08f);
  // Norm weights away from 1 and a non-zero router bias, so those paths matter.
  for (Param& p : w.params()) {
    if (p.spec.shape.n != 1) continue;
    float* d = p.w.data<float>();
    for (int64_t i = 0; i < p.w.numel(); ++i)
      d[i] = p.spec.kind == TensorKind::router_bias ? 0.01f * float(i % 5) : 0.7f + 0.05f * float(i % 13);
  }
  return w;
}

std::vector<int32_t> some_ids(int64_t T, int64_t V, int salt = 0) {
  std::vector<int32_t> ids;
  for (int64_t i = 0; i < T; ++i) ids.push_back(int32_t((i * 37 + 11 + salt * 13) % V));
  return ids;
}

std::map<std::string, Tensor> read_all(const std::string& dir) {
  SafetensorsDir d = SafetensorsDir::open(dir);
  std::map<std::string, Tensor> m;
  for (const auto& [name, ct] : d.tensors()) m[name] = d.tensor(name);
  return m;
}

void write_dir(const std::string& dir, const ModelConfig& c, const std::map<std::string, Tensor>& tensors) {
  fs::create_directories(dir);
  std::vector<NamedTensor> v;
  for (const auto& [n, t] : tensors) v.push_back({n, t});
  write_safetensors_dir(dir, v);
  save_model_config(c, (fs::path(dir) / "config.json").string());
}

// ------------------------------------------------------------------------------------------------
// Fixtures from tools/gen_fixtures.py (HF transformers in float64): the parity bar is 1e-4.

std::vector<std::string> fixture_dirs() {
  std::vector<std::string> out;
  const fs::path root = fs::path(DSV3_SOURCE_DIR) / "tests" / "data" / "fixtures";
  if (!fs::is_directory(root)) return out;
  for (const auto& e : fs::directory_iterator(root))
    if (fs::exists(e.path() / "expected.safetensors")) out.push_back(e.path().string());
  std::sort(out.begin(), out.end());
  return out;
}

TEST(ForwardFixtures, MatchHuggingFace) {
  const auto dirs = fixture_dirs();
  // tools/gen_fixtures.py writes six (four V3, two V2); they are committed, so fewer is a failure.
  ASSERT_GE(dirs.size(), 6u) << "fixtures missing under tests/data/fixtures";
  for (const std::string& dir : dirs) {
    SCOPED_TRACE(dir);
    Weights w = Weights::load(dir);
    SafetensorsFile exp = SafetensorsFile::open(dir + "/expected.safetensors");
    Tensor ids64 = exp.tensor("input_ids");
    std::vector<int32_t> ids;
    for (int64_t i = 0; i < ids64.numel(); ++i) ids.push_back(int32_t(ids64.data<int64_t>()[i]));
    Model m(w, cpu_backend());
    ForwardOutput out = m.forward(ids, 1, int64_t(ids.size()));
    const double e = rel_err(out.logits, exp.tensor("logits"));
    std::printf("  %-32s logits rel err %.3e\n", fs::path(dir).filename().c_str(), e);
    EXPECT_LE(e, 1e-4) << "logits";
    ASSERT_NE(exp.find("hidden_final"), nullptr);
    EXPECT_LE(rel_err(m.acts().h0, exp.tensor("hidden_final")), 1e-4) << "h0 (after model.norm)";
    const int64_t D = w.config().num_nextn_predict_layers;
    ASSERT_EQ(int64_t(out.mtp_logits.size()), D);
    for (int64_t k = 1; k <= D; ++k) {
      const std::string key = cat("mtp_logits_", k);
      ASSERT_NE(exp.find(key), nullptr) << key;
      const double ek = rel_err(out.mtp_logits[size_t(k - 1)], exp.tensor(key));
      std::printf("  %-32s %s rel err %.3e\n", fs::path(dir).filename().c_str(), key.c_str(), ek);
      EXPECT_LE(ek, 1e-4) << key;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Invariants on random models.

TEST(Forward, ShapesAndMtpRows) {
  ModelConfig c = small_v3();
  Weights w = random_weights(c);
  Model m(w, cpu_backend());
  const int64_t T = 9;
  ForwardOutput out = m.forward(some_ids(T, c.vocab_size), 1, T);
  EXPECT_EQ(out.logits.shape(), Shape({T, c.vocab_size}));
  ASSERT_EQ(out.mtp_logits.size(), 2u);
  EXPECT_EQ(out.mtp_logits[0].shape(), Shape({T - 1, c.vocab_size}));
  EXPECT_EQ(out.mtp_logits[1].shape(), Shape({T - 2, c.vocab_size}));
  // A sequence of 2 tokens has one MTP-1 row and no MTP-2 rows.
  ForwardOutput two = m.forward(some_ids(2, c.vocab_size), 1, 2);
  ASSERT_EQ(two.mtp_logits.size(), 1u);
  EXPECT_EQ(two.mtp_logits[0].shape(), Shape({1, c.vocab_size}));
}

TEST(Forward, CausalLaterTokensDoNotChangeEarlierRows) {
  ModelConfig c = small_v3();
  Weights w = random_weights(c);
  Model m(w, cpu_backend());
  const int64_t T = 12, j = 7;
  std::vector<int32_t> a = some_ids(T, c.vocab_size), b = a;
  for (int64_t i = j; i < T; ++i) b[size_t(i)] = int32_t((b[size_t(i)] + 5) % c.vocab_size);
  ForwardOutput oa = m.forward(a, 1, T), ob = m.forward(b, 1, T);
  EXPECT_LE(rel_err(ob.logits.rows(0, j), oa.logits.rows(0, j)), 1e-6);
  EXPECT_GT(rel_err(ob.logits.rows(j, T), oa.logits.rows(j, T)), 1e-3);  // and the rest did change
  // MTP-k row i reads tokens up to i+k: rows i < j−k are unchanged.
  for (int k = 1; k <= 2; ++k)
    EXPECT_LE(rel_err(ob.mtp_logits[size_t(k - 1)].rows(0, j - k), oa.mtp_logits[size_t(k - 1)].rows(0, j - k)), 1e-6)
        << "mtp " << k;
}

TEST(Forward, BatchEqualsSeparateSequences) {
  ModelConfig c = small_v3();
  Weights w = random_weights(c);
  Model m(w, cpu_backend());
  const int64_t T = 8;
  std::vector<int32_t> a = some_ids(T, c.vocab_size, 0), b = some_ids(T, c.vocab_size, 3), ab = a;
  ab.insert(ab.end(), b.begin(), b.end());
  ForwardOutput oa = m.forward(a, 1, T), ob = m.forward(b, 1, T), oab = m.forward(ab, 2, T);
  EXPECT_LE(rel_err(oab.logits.rows(0, T), oa.logits), 1e-5);
  EXPECT_LE(rel_err(oab.logits.rows(T, 2 * T), ob.logits), 1e-5);
  for (int k = 1; k <= 2; ++k) {
    const int64_t S = T - k;
    EXPECT_LE(rel_err(oab.mtp_logits[size_t(k - 1)].rows(0, S), oa.mtp_logits[size_t(k - 1)]), 1e-5);
    EXPECT_LE(rel_err(oab.mtp_logits[size_t(k - 1)].rows(S, 2 * S), ob.mtp_logits[size_t(k - 1)]), 1e-5);
  }
}

TEST(Forward, KeepActivationsGivesTheSameLogits) {
  ModelConfig c = small_v3();
  Weights w = random_weights(c);
  Model m(w, cpu_backend());
  const auto ids = some_ids(6, c.vocab_size);
  ForwardOutput plain = m.forward(ids, 1, 6);
  ForwardOptions keep;
  keep.keep_activations = true;
  ForwardOutput kept = m.forward(ids, 1, 6, keep);
  EXPECT_EQ(rel_err(kept.logits, plain.logits), 0.0);
  ASSERT_EQ(m.acts().layers.size(), size_t(c.num_hidden_layers));
  ASSERT_EQ(m.acts().mtp.size(), 2u);
  EXPECT_EQ(m.acts().layers[1].moe.ids.shape(), Shape({6, c.num_experts_per_tok}));
  EXPECT_EQ(m.acts().mtp[1].h.shape(), Shape({4, c.hidden_size}));
}

TEST(Forward, Fp8StoredEqualsDequantizedF32) {
  ModelConfig c = small_v3();
  Weights w = random_weights(c);
  TempDir dir("fp8");
  SaveOptions so;
  so.fp8 = true;
  w.save(dir.str(), so);
  Weights q = Weights::load(dir.str());
  int fp8 = 0;
  std::map<std::string, Tensor> deq;
  for (const Param& p : q.params()) {
    fp8 += p.fp8();
    deq[p.spec.name] = p.fp8() ? dequantize_fp8_blocks(p.w, p.scale_inv) : p.w;
  }
  EXPECT_GT(fp8, 10);
  ModelConfig plain = q.config();
  plain.quantization_config.reset();
  Weights f = Weights::from_tensors(plain, deq);
  const auto ids = some_ids(10, c.vocab_size);
  Model mq(q, cpu_backend()), mf(f, cpu_backend());
  ForwardOutput oq = mq.forward(ids, 1, 10), of = mf.forward(ids, 1, 10);
  EXPECT_LE(rel_err(oq.logits, of.logits), 1e-5);
  for (size_t k = 0; k < oq.mtp_logits.size(); ++k) EXPECT_LE(rel_err(oq.mtp_logits[k], of.mtp_logits[k]), 1e-5);
  // The FP8 model keeps one byte per weight element, not four.
  EXPECT_LT(q.resident_bytes(), w.resident_bytes() / 2);
}

TEST(Forward, ShardedEqualsSingleFile) {
  ModelConfig c = small_v3();
  Weights w = random_weights(c);
  TempDir one("single"), many("sharded");
  SaveOptions so;
  so.dtype = DType::BF16;
  w.save(one.str(), so);
  so.max_shard_bytes = 200'000;
  w.save(many.str(), so);
  ASSERT_TRUE(fs::exists(many.path / kIndexFileName));
  ASSERT_FALSE(fs::exists(one.path / kIndexFileName));
  Weights a = Weights::load(one.str()), b = Weights::load(many.str());
  const auto ids = some_ids(7, c.vocab_size);
  Model ma(a, cpu_backend()), mb(b, cpu_backend());
  ForwardOutput oa = ma.forward(ids, 1, 7), ob = mb.forward(ids, 1, 7);
  EXPECT_EQ(rel_err(oa.logits, ob.logits), 0.0);
  EXPECT_EQ(rel_err(oa.mtp_logits[1], ob.mtp_logits[1]), 0.0);
  // Stored as BF16 and memory-mapped: half the F32 size.
  EXPECT_LT(double(a.resident_bytes()), 0.51 * double(w.resident_bytes()));
  for (const Param& p : a.params())
    if (p.spec.kind != TensorKind::router_bias) {
      EXPECT_EQ(p.w.dtype(), DType::BF16) << p.spec.name;
    }
}

TEST(Forward, SavedCheckpointHasTheHubCopiesOfSharedTensors) {
  ModelConfig c = small_v3();
  Weights w = random_weights(c);
  TempDir dir("copies");
  w.save(dir.str());
  auto t = read_all(dir.str());
  const std::string pre = cat("model.layers.", c.num_hidden_layers + 1, ".");
  ASSERT_TRUE(t.count(pre + "embed_tokens.weight"));
  ASSERT_TRUE(t.count(pre + "shared_head.head.weight"));
  EXPECT_EQ(rel_err(t[pre + "shared_head.head.weight"], t["lm_head.weight"]), 0.0);
  EXPECT_EQ(rel_err(t[pre + "embed_tokens.weight"], t["model.embed_tokens.weight"]), 0.0);
}

TEST(Forward, V2SoftmaxRoutingRuns) {
  ModelConfig c = small_v3();
  c.model_type = "deepseek_v2";
  c.scoring_func = "softmax";
  c.topk_method = "group_limited_greedy";
  c.q_lora_rank.reset();
  c.num_nextn_predict_layers = 0;
  c.norm_topk_prob = false;
  validate_model_config(c, "v2 test");
  Weights w = random_weights(c);
  EXPECT_EQ(w.find("model.layers.1.mlp.gate.e_score_correction_bias"), nullptr);
  Model m(w, cpu_backend());
  ForwardOutput o = m.forward(some_ids(5, c.vocab_size), 1, 5);
  EXPECT_EQ(o.logits.shape(), Shape({5, c.vocab_size}));
  EXPECT_TRUE(o.mtp_logits.empty());
}

TEST(Forward, BadTokensAreInputErrors) {
  ModelConfig c = small_v3();
  Weights w = random_weights(c);
  Model m(w, cpu_backend());
  std::vector<int32_t> bad{1, 2, int32_t(c.vocab_size)};
  EXPECT_THROW(m.forward(bad, 1, 3), InputError);
  std::vector<int32_t> longer(size_t(c.max_position_embeddings + 1), 1);
  EXPECT_THROW(m.forward(longer, 1, int64_t(longer.size())), InputError);
  EXPECT_THROW(parse_token_ids("1 2 x", c.vocab_size), InputError);
  EXPECT_THROW(parse_token_ids("1 -2", c.vocab_size), InputError);
  EXPECT_THROW(parse_token_ids("  ", c.vocab_size), InputError);
  EXPECT_EQ(parse_token_ids(" 3\t4\n5 ", c.vocab_size), (std::vector<int32_t>{3, 4, 5}));
}

// ------------------------------------------------------------------------------------------------
// Bad checkpoints: one InputError listing every problem by name.

std::string load_error(const std::string& dir) {
  try {
    Weights::load(dir);
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

struct BadCheckpoint : ::testing::Test {
  ModelConfig c = small_v3();
  std::map<std::string, Tensor> good;
  TempDir dir{"bad"};
  void SetUp() override {
    Weights w = random_weights(c);
    TempDir tmp("good");
    w.save(tmp.str());
    for (auto& [n, t] : read_all(tmp.str())) good[n] = t.clone();
  }
};

TEST_F(BadCheckpoint, GoodOneLoads) {
  write_dir(dir.str(), c, good);
  EXPECT_EQ(load_error(dir.str()), "");
}

TEST_F(BadCheckpoint, MissingTensor) {
  auto t = good;
  t.erase("model.layers.1.mlp.experts.3.up_proj.weight");
  write_dir(dir.str(), c, t);
  const std::string e = load_error(dir.str());
  EXPECT_NE(e.find("missing tensor 'model.layers.1.mlp.experts.3.up_proj.weight' (expected shape [40, 136])"),
            std::string::npos)
      << e;
}

TEST_F(BadCheckpoint, UnexpectedTensor) {
  auto t = good;
  t["model.layers.1.mlp.experts.8.up_proj.weight"] = Tensor::zeros(DType::F32, {40, 136});
  write_dir(dir.str(), c, t);
  const std::string e = load_error(dir.str());
  EXPECT_NE(e.find("unexpected tensor 'model.layers.1.mlp.experts.8.up_proj.weight' F32 [40, 136]"),
            std::string::npos)
      << e;
}

TEST_F(BadCheckpoint, MisShapedTensor) {
  auto t = good;
  t["model.norm.weight"] = Tensor::zeros(DType::F32, {135});
  write_dir(dir.str(), c, t);
  const std::string e = load_error(dir.str());
  EXPECT_NE(e.find("tensor 'model.norm.weight' has shape [135], expected [136]"), std::string::npos) << e;
}

TEST_F(BadCheckpoint, WrongDtype) {
  auto t = good;
  t["model.layers.0.input_layernorm.weight"] = Tensor::zeros(DType::I32, {136});
  t["model.embed_tokens.weight"] = good["model.embed_tokens.weight"].to(DType::F8_E4M3);
  write_dir(dir.str(), c, t);
  const std::string e = load_error(dir.str());
  EXPECT_NE(e.find("tensor 'model.layers.0.input_layernorm.weight' has dtype I32, expected F32, BF16 or F16"),
            std::string::npos)
      << e;
  EXPECT_NE(e.find("tensor 'model.embed_tokens.weight' has dtype F8_E4M3"), std::string::npos) << e;
}

TEST_F(BadCheckpoint, Fp8WithoutScales) {
  auto t = good;
  t["model.layers.0.self_attn.o_proj.weight"] = good["model.layers.0.self_attn.o_proj.weight"].to(DType::F8_E4M3);
  write_dir(dir.str(), c, t);
  const std::string e = load_error(dir.str());
  EXPECT_NE(e.find("'model.layers.0.self_attn.o_proj.weight' is F8_E4M3 but its block scales "
                   "'model.layers.0.self_attn.o_proj.weight_scale_inv' are missing"),
            std::string::npos)
      << e;
}

TEST_F(BadCheckpoint, EveryProblemInOneError) {
  auto t = good;
  t.erase("lm_head.weight");
  t.erase("model.layers.0.self_attn.kv_b_proj.weight");
  t["extra.weight"] = Tensor::zeros(DType::BF16, {2, 2});
  t["model.layers.2.enorm.weight"] = Tensor::zeros(DType::F32, {2});
  write_dir(dir.str(), c, t);
  const std::string e = load_error(dir.str());
  EXPECT_NE(e.find("4 problems"), std::string::npos) << e;
  for (const char* name : {"'lm_head.weight'", "'model.layers.0.self_attn.kv_b_proj.weight'", "'extra.weight'",
                           "'model.layers.2.enorm.weight'"})
    EXPECT_NE(e.find(name), std::string::npos) << name << "\n" << e;
  EXPECT_NE(e.find(dir.str()), std::string::npos) << "the error names the checkpoint";
}

TEST_F(BadCheckpoint, DuplicatedAcrossShards) {
  // The same tensor in two shards: the index can send it to only one, so the other shard holds a
  // tensor the index does not describe.
  auto t = good;
  write_dir(dir.str(), c, t);
  fs::remove(dir.path / kSingleFileName);
  std::vector<NamedTensor> a, b;
  for (const auto& [n, x] : t) a.push_back({n, x});
  b.push_back({"model.norm.weight", t["model.norm.weight"]});
  write_safetensors((dir.path / "model-00001-of-00002.safetensors").string(), a, {{"format", "pt"}});
  write_safetensors((dir.path / "model-00002-of-00002.safetensors").string(), b, {{"format", "pt"}});
  CheckpointIndex idx;
  for (const auto& [n, x] : t) idx.weight_map[n] = "model-00001-of-00002.safetensors";
  idx.weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors";
  {
    std::FILE* f = std::fopen((dir.path / kIndexFileName).c_str(), "w");
    const std::string j = checkpoint_index_json(idx);
    std::fwrite(j.data(), 1, j.size(), f);
    std::fclose(f);
  }
  const std::string e = load_error(dir.str());
  EXPECT_NE(e.find("model.norm.weight"), std::string::npos) << e;
}

TEST_F(BadCheckpoint, NotADirectoryOrNoConfig) {
  EXPECT_NE(load_error((dir.path / "nope").string()).find("not a directory"), std::string::npos);
  EXPECT_NE(load_error(dir.str()).find("no config.json"), std::string::npos);
}

}  // namespace
}  // namespace dsv3
