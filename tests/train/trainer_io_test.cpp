#include "train/trainer_io.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>

#include "core/rng.h"
#include "model/presets.h"
#include "train_test_util.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

using train_test::TmpDir;

void fake_grads(std::vector<ParamSlot>& slots, int64_t step) {
  for (size_t k = 0; k < slots.size(); ++k)
    for (int64_t i = 0; i < slots[k].grad.numel(); ++i)
      slots[k].grad.data<float>()[i] = 0.01f * rng_normal(3, uint64_t(step) * 1000 + k, uint64_t(i));
}

// A tiny model's full training state survives save + load bitwise, and training continues from it
// exactly as it would have without the interruption.
TEST(TrainerIo, TinyModelCheckpointResumesBitwise) {
  TmpDir d("trio");
  ModelConfig cfg = preset_config("tiny");
  Weights w = Weights::random(cfg, 11);
  auto slots = make_param_slots(w);
  ASSERT_FALSE(slots.empty());
  for (const auto& s : slots) {
    EXPECT_EQ(s.name.find("e_score_correction_bias"), std::string::npos) << "router bias is not trained";
    EXPECT_EQ(s.decay, s.param.ndim() >= 2) << s.name;
  }
  OptimizerConfig oc;
  AdamW opt(slots, oc);
  for (int64_t s = 0; s < 2; ++s) fake_grads(slots, s), opt.step(1e-3, 1.0);

  std::ofstream(d.file("tokenizer.json")) << "{}";
  CheckpointManager mgr(d.file("run"), 2);
  TrainerState st;
  st.step = 2;
  st.data = {5, 0, 17};
  std::string dir = save_training_checkpoint(mgr, w, d.file("tokenizer.json"), st, opt);
  for (const char* f : {"config.json", "tokenizer.json", "generation_config.json", "trainer_state.json",
                        "optimizer.safetensors", "manifest.json"})
    EXPECT_TRUE(fs::exists(dir + "/" + f)) << f;

  std::unique_ptr<AdamW> opt2;
  std::vector<ParamSlot> slots2;
  LoadedTraining lt = load_training_checkpoint(mgr.scan().newest->dir, [&](Weights& lw) -> AdamW& {
    slots2 = make_param_slots(lw);
    opt2 = std::make_unique<AdamW>(slots2, oc);
    return *opt2;
  });
  EXPECT_EQ(lt.state.step, 2);
  EXPECT_EQ(lt.state.data.index, 17u);
  ASSERT_EQ(slots2.size(), slots.size());
  for (int64_t s = 2; s < 4; ++s) {
    fake_grads(slots, s);
    opt.step(1e-3, 1.0);
    fake_grads(slots2, s);
    opt2->step(1e-3, 1.0);
  }
  for (size_t k = 0; k < slots.size(); ++k)
    ASSERT_EQ(std::memcmp(slots[k].param.raw(), slots2[k].param.raw(), slots[k].param.nbytes()), 0)
        << slots[k].name;
}

}  // namespace
}  // namespace dsv3
