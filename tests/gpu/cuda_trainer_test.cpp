// `dsv3 train --device cuda`: the Trainer with master weights, gradients and AdamW moments on the
// GPU follows the CPU run of the same options step by step (loss of every step and the validation
// loss within the training-parity tolerance), writes checkpoints that the CPU trainer can resume, and
// resumes from its own checkpoint to the same numbers as a straight run (the GPU kernels are
// deterministic: no floating-point atomics).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "backend/cuda/cuda_backend.h"
#include "backend/tolerance.h"
#include "core/error.h"
#include "io/tokenizer.h"
#include "io/tokenizer_train.h"
#include "model/config.h"
#include "train/data_prepare.h"
#include "train/trainer.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

const char* kConfig = R"({
  "model_type": "deepseek_v3", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 48,
  "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
  "q_lora_rank": 16, "kv_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
  "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
  "routed_scaling_factor": 2.5, "norm_topk_prob": true, "first_k_dense_replace": 1,
  "num_nextn_predict_layers": 1, "max_position_embeddings": 64, "rope_theta": 10000.0,
  "tie_word_embeddings": false
})";

struct Data {
  fs::path root;
  std::string data, tokenizer;
  Data() {
    root = fs::temp_directory_path() / cat("dsv3_cuda_trainer_test_", ::getpid());
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
  ~Data() { fs::remove_all(root); }
};

TrainOptions options(const Data& d, const std::string& out, const std::string& device) {
  TrainOptions o;
  o.steps = 6;
  o.batch = 2;
  o.seq_len = 16;
  o.grad_accum = 2;
  o.eval_every = 3;
  o.eval_batches = 2;
  o.sample_tokens = 4;
  o.checkpoint_every = 3;
  o.data_dir = d.data;
  o.tokenizer_path = d.tokenizer;
  o.out_dir = (d.root / out).string();
  o.quiet = true;
  o.plot = false;
  o.balance_alpha = ScalarSchedule(1e-2);
  o.device = device;
  return o;
}

std::vector<double> losses(const std::string& out_dir) {
  std::vector<double> v;
  std::ifstream f(out_dir + "/metrics.jsonl");
  std::string line;
  while (std::getline(f, line)) v.push_back(nlohmann::json::parse(line).at("loss").get<double>());
  return v;
}

TEST(CudaTrainer, FollowsCpuAndResumes) {
  ASSERT_GT(cuda_device_count(), 0);
  Data d;
  ModelConfig cfg = parse_model_config(kConfig);
  TrainSummary cpu = Trainer(cfg, options(d, "cpu", "cpu")).run();
  TrainSummary gpu = Trainer(cfg, options(d, "gpu", "cuda")).run();
  std::vector<double> lc = losses((d.root / "cpu").string()), lg = losses((d.root / "gpu").string());
  ASSERT_EQ(lc.size(), 6u);
  ASSERT_EQ(lg.size(), 6u);
  for (size_t i = 0; i < lc.size(); ++i)
    EXPECT_LE(std::fabs(lg[i] - lc[i]), tol::kTrainParity * lc[i]) << "step " << i + 1;
  EXPECT_LE(std::fabs(gpu.last_val_loss - cpu.last_val_loss), tol::kTrainParity * cpu.last_val_loss);
  EXPECT_LT(lc.back(), lc.front());

  // Resume on the GPU from its step-3 checkpoint: the same numbers as the straight run.
  TrainOptions half = options(d, "gpu_resume", "cuda");
  Trainer(cfg, half).run(3);
  TrainSummary resumed = Trainer(cfg, half).run();
  EXPECT_EQ(resumed.steps_done, 6);
  EXPECT_EQ(resumed.last_loss, gpu.last_loss);
  // The CPU resumes a GPU checkpoint (the files are the same host format).
  TrainOptions cross = options(d, "gpu_resume", "cpu");
  cross.steps = 7;
  TrainSummary on_cpu = Trainer(cfg, cross).run();
  EXPECT_EQ(on_cpu.steps_done, 7);
  EXPECT_TRUE(std::isfinite(on_cpu.last_loss));
}

TEST(CudaTrainer, RejectsPrecisionsTheGpuLacks) {
  TrainOptions o;
  o.data_dir = "unused";
  o.device = "cuda";
  o.precision = "fp8";
  try {
    o.validate();
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("--device cuda"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace dsv3
