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
#include "model/config.h"
#include "train/trainer.h"
#include "../train/train_test_util.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

using Data = train_test::SmallTextData;

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

TEST(CudaTrainer, FollowsCpuAndResumes) {
  ASSERT_GT(cuda_device_count(), 0);
  Data d("cuda_trainer_test");
  // qk_rope_head_dim 8: head dims 16 / 8, multiples of 8, so attention takes the tiled GPU kernels.
  ModelConfig cfg = parse_model_config(train_test::small_model_config(8));
  TrainSummary cpu = Trainer(cfg, options(d, "cpu", "cpu")).run();
  TrainSummary gpu = Trainer(cfg, options(d, "gpu", "cuda")).run();
  std::vector<double> lc = train_test::metrics_column((d.root / "cpu").string(), "loss"),
                      lg = train_test::metrics_column((d.root / "gpu").string(), "loss");
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

}  // namespace
}  // namespace dsv3
