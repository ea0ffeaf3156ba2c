// Helpers shared by the train tests (and the GPU trainer tests): a per-test temporary
// directory, whole-file reads/writes, a run's metrics.jsonl, and a small model with a prepared dataset
// for running the Trainer.
#pragma once
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/tokenizer.h"
#include "io/tokenizer_train.h"
#include "train/data_prepare.h"

namespace dsv3::train_test {

// /tmp/dsv3_<prefix>_<pid>_<test name>, fresh at construction, removed with its contents at scope exit.
struct TmpDir {
  std::filesystem::path p;
  explicit TmpDir(const std::string& prefix) {
    p = std::filesystem::temp_directory_path() /
        ("dsv3_" + prefix + "_" + std::to_string(getpid()) + "_" +
         ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(p);
    std::filesystem::create_directories(p);
  }
  ~TmpDir() { std::filesystem::remove_all(p); }
  std::string file(const std::string& n) const { return (p / n).string(); }
};

inline void spit(const std::string& path, const std::string& s) { std::ofstream(path, std::ios::binary) << s; }
inline std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}

// metrics.jsonl (one object per step) without its wall-clock fields, so two runs compare exactly.
inline std::vector<nlohmann::json> read_metrics(const std::string& path) {
  std::ifstream f(path);
  std::vector<nlohmann::json> out;
  for (std::string line; std::getline(f, line);) {
    nlohmann::json j = nlohmann::json::parse(line);
    j.erase("ms");
    j.erase("tok_per_s");
    j.erase("reduce_ms");
    out.push_back(j);
  }
  return out;
}

// One field of every step of the run in out_dir.
inline std::vector<double> metrics_column(const std::string& out_dir, const char* key) {
  std::vector<double> v;
  for (const nlohmann::json& j : read_metrics(out_dir + "/metrics.jsonl")) v.push_back(j.at(key).get<double>());
  return v;
}

// A 2-layer V3 model with every feature (q compression, grouped routing, a shared expert, a dense
// first layer, one MTP module), small enough for Trainer tests. Head dims 8 / qk_rope_head_dim.
inline std::string small_model_config(int qk_rope_head_dim = 4) {
  return cat(R"({
  "model_type": "deepseek_v3", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 48,
  "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
  "q_lora_rank": 16, "kv_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": )",
             qk_rope_head_dim, R"(, "v_head_dim": 8,
  "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
  "routed_scaling_factor": 2.5, "norm_topk_prob": true, "first_k_dense_replace": 1,
  "num_nextn_predict_layers": 1, "max_position_embeddings": 64, "rope_theta": 10000.0,
  "tie_word_embeddings": false
})");
}

// A small prepared dataset (a 300-id BPE trained on three repeated sentences, 10% validation) under
// /tmp/dsv3_<prefix>_<pid>, removed at destruction.
struct SmallTextData {
  std::filesystem::path root;
  std::string data, tokenizer;
  explicit SmallTextData(const std::string& prefix) {
    namespace fs = std::filesystem;
    root = fs::temp_directory_path() / cat("dsv3_", prefix, "_", ::getpid());
    fs::remove_all(root);
    fs::create_directories(root);
    const std::string text = (root / "text.txt").string();
    {
      std::ofstream f(text);
      const char* lines[] = {"the cat sat on the mat and the dog sat on the log.",
                             "a bird in the hand is worth two in the bush.",
                             "the quick brown fox jumps over the lazy dog again and again."};
      for (int doc = 0; doc < 40; ++doc) {
        for (int i = 0; i < 6; ++i) f << lines[(doc + i) % 3] << " ";
        f << "\n\n";
      }
    }
    tokenizer = (root / "tokenizer.json").string();
    train_bpe_files({text}, 300, tokenizer);
    Tokenizer tok = Tokenizer::load(tokenizer);
    PrepareOptions p;
    p.tokenizer_path = tokenizer;
    p.output_dir = (root / "data").string();
    p.inputs = {text};
    p.val_fraction = 0.1;
    prepare_token_dataset(tok, p);
    data = p.output_dir;
  }
  ~SmallTextData() { std::filesystem::remove_all(root); }
  SmallTextData(const SmallTextData&) = delete;
  SmallTextData& operator=(const SmallTextData&) = delete;
};

}  // namespace dsv3::train_test
