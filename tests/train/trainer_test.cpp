// The training loop: resume is bitwise (1 and 2 threads), non-finite steps are skipped and counted
// and K in a row stop the run, the aux-loss-free bias rule (and that AdamW never touches the bias),
// and that a tiny model overfits a small text.
#include "train/trainer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include "core/threads.h"
#include "io/tokenizer.h"
#include "io/tokenizer_train.h"
#include "model/config.h"
#include "model/model.h"
#include "io/safetensors.h"
#include "train/data_prepare.h"
#include "train_test_util.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;
using train_test::read_metrics;

const train_test::SmallTextData& fixture() {
  static train_test::SmallTextData f("trainer_test");
  return f;
}

TrainOptions options(const std::string& out) {
  TrainOptions o;
  o.steps = 6;
  o.batch = 2;
  o.seq_len = 16;
  o.grad_accum = 2;
  o.lr = 5e-3;
  o.min_lr = 5e-4;
  o.warmup_frac = 0.2;
  o.decay_start_frac = 0.5;
  o.balance_alpha = ScalarSchedule(1e-2);
  o.bias_gamma = ScalarSchedule(1e-2);
  o.init_std = 0.05;
  o.data_dir = fixture().data;
  o.tokenizer_path = fixture().tokenizer;
  o.out_dir = (fixture().root / out).string();
  o.eval_every = 3;
  o.eval_batches = 2;
  o.sample_tokens = 4;
  o.checkpoint_every = 0;
  o.plot = false;
  o.quiet = true;
  o.resume = true;
  return o;
}

ModelConfig config() { return parse_model_config(train_test::small_model_config(), "trainer_test"); }

std::vector<std::vector<float>> snapshot(const Trainer& t) {
  std::vector<std::vector<float>> out;
  const auto sizes = t.parameter_sizes();
  const auto ptrs = t.parameters();
  for (size_t i = 0; i < ptrs.size(); ++i)
    out.emplace_back(ptrs[i].second, ptrs[i].second + sizes[i].second);
  return out;
}

void resume_is_bitwise(int threads) {
  set_num_threads(threads);
  const std::string tag = cat("t", threads);
  TrainOptions a = options("straight_" + tag);
  fs::remove_all(a.out_dir);
  std::vector<std::vector<float>> straight;
  {
    Trainer t(config(), a);
    t.run();
    straight = snapshot(t);
  }
  TrainOptions b = options("resumed_" + tag);
  fs::remove_all(b.out_dir);
  {
    Trainer t(config(), b);
    t.run(3);  // checkpoint at the stop
    EXPECT_EQ(t.step(), 3);
  }
  Trainer t(config(), b);  // a new process would do exactly this
  EXPECT_EQ(t.step(), 3);
  t.run();
  const auto resumed = snapshot(t);
  ASSERT_EQ(resumed.size(), straight.size());
  const auto names = t.parameter_sizes();
  for (size_t i = 0; i < resumed.size(); ++i)
    EXPECT_EQ(0, std::memcmp(resumed[i].data(), straight[i].data(), resumed[i].size() * sizeof(float)))
        << names[i].first;
  const auto ma = read_metrics(a.out_dir + "/metrics.jsonl"), mb = read_metrics(b.out_dir + "/metrics.jsonl");
  EXPECT_EQ(ma.size(), 6u);
  EXPECT_EQ(ma, mb);
  EXPECT_TRUE(fs::exists(b.out_dir + "/latest/config.json"));
  set_num_threads(0);
}

TEST(Trainer, ResumeIsBitwiseOneThread) { resume_is_bitwise(1); }
TEST(Trainer, ResumeIsBitwiseTwoThreads) { resume_is_bitwise(2); }

TEST(Trainer, NonFiniteGradientSkipsTheStep) {
  TrainOptions o = options("nan_once");
  fs::remove_all(o.out_dir);
  o.steps = 3;
  o.eval_every = 0;
  Trainer t(config(), o);
  t.set_grad_hook([](int64_t step, Grads& g) {
    if (step == 1) g.get("model.layers.0.mlp.up_proj.weight").data<float>()[3] = std::numeric_limits<float>::quiet_NaN();
  });
  t.run(1);
  const auto before = snapshot(t);
  const TrainSummary s = t.run(2);
  EXPECT_EQ(s.skipped, 1);
  const auto after = snapshot(t);
  for (size_t i = 0; i < after.size(); ++i)  // weights and biases untouched by the skipped step
    EXPECT_EQ(0, std::memcmp(after[i].data(), before[i].data(), after[i].size() * sizeof(float)));
  const TrainSummary s3 = t.run(3);
  EXPECT_EQ(s3.skipped, 1);
}

TEST(Trainer, ConsecutiveNonFiniteStepsStopTheRun) {
  TrainOptions o = options("nan_always");
  fs::remove_all(o.out_dir);
  o.steps = 10;
  o.eval_every = 0;
  o.opt.max_consecutive_skips = 3;
  Trainer t(config(), o);
  t.set_grad_hook([](int64_t, Grads& g) {
    g.get("lm_head.weight").data<float>()[0] = std::numeric_limits<float>::infinity();
  });
  try {
    t.run();
    FAIL() << "expected TrainingStopped";
  } catch (const TrainingStopped& e) {
    EXPECT_NE(std::string(e.what()).find("3"), std::string::npos) << e.what();
  }
  EXPECT_LE(t.step(), 3);
}

// b_i += γ·sign(mean − load_i) from the step's loads; AdamW (with weight decay) never moves it.
TEST(Trainer, BiasFollowsTheLoadsAndNotTheOptimizer) {
  TrainOptions o = options("bias");
  fs::remove_all(o.out_dir);
  o.eval_every = 0;
  o.opt.weight_decay = 0.5;
  const ModelConfig c = config();
  const std::vector<std::string> bias_names = {"model.layers.1.mlp.gate.e_score_correction_bias",
                                               "model.layers.2.mlp.gate.e_score_correction_bias"};
  auto bias_of = [&](const Trainer& t, const std::string& n) {
    for (size_t i = 0; i < t.parameters().size(); ++i)
      if (t.parameters()[i].first == n)
        return std::vector<float>(t.parameters()[i].second, t.parameters()[i].second + c.n_routed_experts);
    ADD_FAILURE() << n;
    return std::vector<float>();
  };
  Trainer t(c, o);
  for (int64_t step = 1; step <= 3; ++step) {
    std::vector<std::vector<float>> before;
    for (const auto& n : bias_names) before.push_back(bias_of(t, n));
    const TrainSummary s = t.run(step);
    ASSERT_EQ(s.loads.size(), bias_names.size());  // main MoE layer 1 and the MTP block (layer 2)
    for (size_t l = 0; l < bias_names.size(); ++l) {
      const auto after = bias_of(t, bias_names[l]);
      double mean = 0;
      for (int64_t x : s.loads[l]) mean += double(x);
      mean /= double(c.n_routed_experts);
      EXPECT_EQ(mean, double(o.batch * o.grad_accum * (l == 0 ? o.seq_len : o.seq_len - 1) * 2) / 8.0);  // k = 2, E = 8
      for (int64_t e = 0; e < c.n_routed_experts; ++e) {
        const double load = double(s.loads[l][size_t(e)]);
        const float want = before[l][size_t(e)] + float(0.01 * double((mean > load) - (mean < load)));
        EXPECT_EQ(after[size_t(e)], want) << bias_names[l] << " expert " << e;
      }
    }
  }
  // γ = 0: the bias stays exactly as it was, whatever the optimizer does.
  TrainOptions z = options("bias_zero");
  fs::remove_all(z.out_dir);
  z.eval_every = 0;
  z.bias_gamma = ScalarSchedule(0.0);
  z.opt.weight_decay = 0.5;
  Trainer tz(c, z);
  tz.run();
  for (const auto& n : bias_names)
    for (float b : bias_of(tz, n)) EXPECT_EQ(b, 0.0f) << n;
}

// `--moments bf16` (the paper's storage of the AdamW moments, offered for FP8 runs): the moments are
// kept and checkpointed in BF16, the run trains, and a resume reads them back.
TEST(Trainer, Bf16MomentsForAnFp8Run) {
  TrainOptions o = options("fp8_bf16_moments");
  fs::remove_all(o.out_dir);
  o.precision = "fp8";
  o.opt.moment_dtype = DType::BF16;
  o.steps = 4;
  o.checkpoint_every = 2;
  const TrainSummary s = Trainer(config(), o).run();
  EXPECT_EQ(s.skipped, 0);
  EXPECT_TRUE(std::isfinite(s.last_loss));
  SafetensorsFile opt = SafetensorsFile::open(o.out_dir + "/latest/optimizer.safetensors");
  const Tensor m = opt.tensor("model.layers.0.self_attn.o_proj.weight.exp_avg");
  const Tensor v = opt.tensor("model.layers.0.self_attn.o_proj.weight.exp_avg_sq");
  EXPECT_EQ(m.dtype(), DType::BF16);
  EXPECT_EQ(v.dtype(), DType::BF16);
  bool nonzero = false;
  for (int64_t i = 0; i < m.numel(); ++i) nonzero |= m.data<bf16>()[i].bits != 0;
  EXPECT_TRUE(nonzero) << "the moments were never updated";
  o.steps = 5;
  EXPECT_EQ(Trainer(config(), o).run().steps_done, 5);
  // The options every rank must agree on (check_same) name the moments' dtype: ZeRO-1 shards of
  // ranks with different --moments would be gathered with different sizes.
  TrainOptions f32 = o;
  f32.opt.moment_dtype = DType::F32;
  EXPECT_EQ(o.to_json().at("moments"), "bf16");
  EXPECT_NE(o.to_json().dump(), f32.to_json().dump());
}

TEST(Trainer, TinyModelOverfitsSmallText) {
  TrainOptions o = options("overfit");
  fs::remove_all(o.out_dir);
  o.steps = 40;
  o.grad_accum = 1;
  o.batch = 4;
  o.lr = 1e-2;
  o.min_lr = 1e-3;
  o.warmup_frac = 0.05;
  o.eval_every = 40;
  Trainer t(config(), o);
  const TrainSummary s = t.run();
  std::ifstream f(o.out_dir + "/metrics.jsonl");
  std::string first;
  std::getline(f, first);
  const double l0 = nlohmann::json::parse(first)["loss"].get<double>();
  EXPECT_LT(s.last_loss, l0 - 2.0) << "first " << l0 << " last " << s.last_loss;
  EXPECT_GT(s.last_val_loss, 0.0);
  EXPECT_LT(s.last_val_loss, std::log(320.0) - 2.0);
  EXPECT_FALSE(t.greedy_sample(4).empty());
}

}  // namespace
}  // namespace dsv3
