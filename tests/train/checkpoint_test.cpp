#include "train/checkpoint.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "core/rng.h"
#include "io/atomic_file.h"
#include "io/checkpoint_index.h"
#include "train/optimizer.h"
#include "train_test_util.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

using train_test::TmpDir;
using train_test::spit;
using train_test::slurp;


// A writer producing a few files whose contents depend on the step.
auto small_writer(int64_t step) {
  return [step](const std::string& dir) {
    write_file_atomic(dir + "/config.json", std::string("{\"step\": ") + std::to_string(step) + "}\n");
    write_file_atomic(dir + "/weights.bin", std::string(1000 + size_t(step), char('a' + step % 26)));
  };
}

TEST(Checkpoint, SaveWritesManifestLastAndLatest) {
  TmpDir d("ckpt");
  CheckpointManager m(d.file("run"), 3);
  std::string dir = m.save(5, small_writer(5));
  EXPECT_EQ(dir, d.file("run/step-00000005"));
  auto man = verify_checkpoint(dir);
  EXPECT_EQ(man["step"], 5);
  ASSERT_EQ(man["files"].size(), 2u);
  EXPECT_EQ(man["files"][1]["file"], "weights.bin");
  EXPECT_EQ(man["files"][1]["bytes"], 1005);
  EXPECT_EQ(fs::read_symlink(d.file("run/latest")).string(), "step-00000005");
  auto s = m.scan();
  ASSERT_TRUE(s.newest);
  EXPECT_EQ(s.newest->step, 5);
  EXPECT_TRUE(s.rejected.empty());
  for (auto& e : fs::directory_iterator(d.file("run")))
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
}

TEST(Checkpoint, IncompleteOrDamagedCheckpointsAreNeverChosen) {
  TmpDir d("ckpt");
  const std::string run = d.file("run");
  CheckpointManager m(run, 10);
  m.save(1, small_writer(1));
  m.save(2, small_writer(2));
  // Damage step 2 in every way a crash or a disk could; each time step 1 must be chosen.
  const std::string s2 = run + "/step-00000002";
  const std::string good_weights = slurp(s2 + "/weights.bin");
  const std::string good_manifest = slurp(s2 + "/manifest.json");
  struct Case {
    const char* name;
    std::function<void()> damage;
    bool caught_by_size_check;
  };
  std::vector<Case> cases = {
      {"no manifest", [&] { fs::remove(s2 + "/manifest.json"); }, true},
      {"truncated file", [&] { spit(s2 + "/weights.bin", good_weights.substr(0, 10)); }, true},
      {"missing file", [&] { fs::remove(s2 + "/weights.bin"); }, true},
      {"flipped byte", [&] { auto w = good_weights; w[3] ^= 1; spit(s2 + "/weights.bin", w); }, false},
      {"extra file", [&] { spit(s2 + "/stray.bin", "x"); }, true},
      {"manifest for another step",
       [&] {
         auto j = nlohmann::json::parse(good_manifest);
         j["step"] = 7;
         spit(s2 + "/manifest.json", j.dump());
       },
       true},
      {"truncated manifest", [&] { spit(s2 + "/manifest.json", good_manifest.substr(0, 30)); }, true},
      {"manifest escaping the dir",
       [&] {
         auto j = nlohmann::json::parse(good_manifest);
         j["files"][0]["file"] = "../step-00000001/config.json";
         spit(s2 + "/manifest.json", j.dump());
       },
       true},
  };
  for (auto& c : cases) {
    c.damage();
    auto s = m.scan(/*full=*/true);
    ASSERT_TRUE(s.newest) << c.name;
    EXPECT_EQ(s.newest->step, 1) << c.name;
    ASSERT_EQ(s.rejected.size(), 1u) << c.name;
    EXPECT_NE(s.rejected[0].find("step-00000002"), std::string::npos) << s.rejected[0];
    auto quick = m.scan(/*full=*/false);
    EXPECT_EQ(quick.newest->step, c.caught_by_size_check ? 1 : 2) << c.name;
    // Restore step 2.
    fs::remove(s2 + "/stray.bin");
    spit(s2 + "/weights.bin", good_weights);
    spit(s2 + "/manifest.json", good_manifest);
    ASSERT_EQ(m.scan().newest->step, 2) << c.name;
  }
  // A leftover .tmp directory (a save killed before its rename) is ignored, then swept.
  fs::create_directory(run + "/step-00000009.tmp");
  spit(run + "/step-00000009.tmp/config.json", "{}");
  EXPECT_EQ(m.scan().newest->step, 2);
  m.save(3, small_writer(3));
  EXPECT_FALSE(fs::exists(run + "/step-00000009.tmp"));
}

TEST(Checkpoint, ResumeRepairsLatest) {
  TmpDir d("ckpt");
  const std::string run = d.file("run");
  CheckpointManager m(run, 5);
  m.save(1, small_writer(1));
  m.save(2, small_writer(2));
  // As if the process died after renaming step 2 but before moving the link.
  fs::remove(run + "/latest");
  fs::create_directory_symlink("step-00000001", run + "/latest");
  auto s = m.resume();
  EXPECT_EQ(s.newest->step, 2);
  EXPECT_EQ(fs::read_symlink(run + "/latest").string(), "step-00000002");
}

TEST(Checkpoint, RotationKeepsNewestN) {
  TmpDir d("ckpt");
  CheckpointManager m(d.file("run"), 2);
  for (int s = 10; s <= 50; s += 10) m.save(s, small_writer(s));
  EXPECT_EQ(m.steps_present(), (std::vector<int64_t>{40, 50}));
  // An incomplete directory is not counted as one of the kept ones.
  fs::remove(d.file("run/step-00000050/manifest.json"));
  m.save(60, small_writer(60));
  EXPECT_EQ(m.steps_present(), (std::vector<int64_t>{40, 60}));
}

TEST(Checkpoint, FailingWriterLeavesNothingAndSameStepReplaces) {
  TmpDir d("ckpt");
  CheckpointManager m(d.file("run"), 3);
  m.save(1, small_writer(1));
  EXPECT_THROW(m.save(2, [](const std::string& dir) {
    write_file_atomic(dir + "/a.json", "{}");
    input_error("disk says no");
  }),
               InputError);
  EXPECT_EQ(m.steps_present(), (std::vector<int64_t>{1}));
  EXPECT_FALSE(fs::exists(d.file("run/step-00000002.tmp")));
  EXPECT_EQ(fs::read_symlink(d.file("run/latest")).string(), "step-00000001");
  m.save(1, small_writer(27));  // same step again: replaced by the new contents
  EXPECT_EQ(fs::file_size(d.file("run/step-00000001/weights.bin")), 1027u);
  EXPECT_EQ(m.scan().newest->step, 1);
  EXPECT_THROW(CheckpointManager(d.file("no/such/parent/run"), 3), InputError);
  EXPECT_THROW(CheckpointManager(d.file("run"), 0), InputError);
}

TEST(Checkpoint, TrainerStateAndModelFilesRoundTrip) {
  TmpDir d("ckpt");
  Tensor w = Tensor::empty(DType::F32, {4, 3}), g = Tensor::empty(DType::F32, {4, 3});
  for (int i = 0; i < 12; ++i) w.data<float>()[i] = float(i), g.data<float>()[i] = rng_normal(1, 2, uint64_t(i));
  OptimizerConfig oc;
  AdamW opt({{"model.embed_tokens.weight", w, g, true}}, oc);
  opt.step(1e-3, 1.0);
  spit(d.file("tokenizer.json"), "{\"model\": {}}");
  CheckpointManager m(d.file("run"), 2);
  TrainerState st;
  st.step = 1;
  st.data = {9, 0, 4};
  st.extra = {{"lr_schedule", {{"peak_lr", 1e-3}}}, {"mtp_lambda", "0.3"}};
  std::string dir = m.save(1, [&](const std::string& dir) {
    ModelFiles mf;
    mf.config_json = "{\"model_type\": \"deepseek_v3\"}\n";
    mf.weights = {{"model.embed_tokens.weight", w}};
    mf.tokenizer_path = d.file("tokenizer.json");
    write_model_files(dir, mf);
    write_trainer_state(dir, st, opt);
  });
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
                        "trainer_state.json", "optimizer.safetensors", "manifest.json"})
    EXPECT_TRUE(fs::exists(dir + "/" + f)) << f;
  auto gen = read_json_file(dir + "/generation_config.json");
  EXPECT_EQ(gen["eos_token_id"], 1);
  auto weights = SafetensorsDir::open(dir);
  Tensor back = weights.tensor("model.embed_tokens.weight");
  EXPECT_EQ(std::memcmp(back.raw(), w.raw(), w.nbytes()), 0);

  Tensor w2 = Tensor::zeros(DType::F32, {4, 3});
  AdamW opt2({{"model.embed_tokens.weight", w2, g, true}}, oc);
  TrainerState got = read_trainer_state(dir, opt2);
  EXPECT_EQ(got.step, 1);
  EXPECT_EQ(got.data.index, 4u);
  EXPECT_EQ(got.extra["mtp_lambda"], "0.3");
  EXPECT_EQ(opt2.updates(), 1);
  auto a = opt.state_tensors(), b = opt2.state_tensors();
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_EQ(std::memcmp(a[i].tensor.raw(), b[i].tensor.raw(), a[i].tensor.nbytes()), 0);

  // Another model's optimizer does not load it.
  Tensor w3 = Tensor::zeros(DType::F32, {4, 3}), g3 = Tensor::zeros(DType::F32, {4, 3});
  AdamW other({{"model.norm.weight", w3, g3, false}}, oc);
  EXPECT_THROW(read_trainer_state(dir, other), InputError);

  // Sharded weights: several files plus the index, all in the manifest.
  std::string dir2 = m.save(2, [&](const std::string& dir) {
    ModelFiles mf;
    mf.config_json = "{}";
    mf.weights = {{"a.weight", w}, {"b.weight", w.clone()}};
    mf.max_shard_bytes = 48;
    write_model_files(dir, mf);
  });
  EXPECT_TRUE(fs::exists(dir2 + "/" + std::string(kIndexFileName)));
  EXPECT_EQ(SafetensorsDir::open(dir2).size(), 2u);
  EXPECT_EQ(verify_checkpoint(dir2)["files"].size(), 5u);  // config, 2 shards, index, generation
}

// SIGKILL a child that saves checkpoints in a loop, at spread-out moments; after each kill the
// newest complete checkpoint must verify in full and `latest` must name a complete one.
// (tools/kill_test.sh does the same against the real binary, more times and for longer.)
TEST(Checkpoint, SurvivesSigkillDuringSaves) {
  TmpDir d("ckpt");
  const std::string run = d.file("run");
  for (int round = 0; round < 8; ++round) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      CheckpointManager m(run, 2);
      auto s = m.resume(false);
      int64_t step = s.newest ? s.newest->step + 1 : 0;
      for (;; ++step) m.save(step, [&](const std::string& dir) {
        small_writer(step)(dir);
        write_file_atomic(dir + "/big.bin", std::string(size_t(200000 + step * 7), 'z'));
      });
    }
    usleep(useconds_t(20000 + 13000 * round));
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    CheckpointManager m(run, 2);
    auto s = m.scan(true);
    if (!s.newest) continue;  // killed before the very first save finished
    EXPECT_NO_THROW(verify_checkpoint(s.newest->dir, true));
    // A kill between the first checkpoint's rename and the creation of `latest` leaves no link;
    // a link that exists must name a complete checkpoint, and resume() restores a missing one.
    if (fs::is_symlink(run + "/latest")) {
      std::string target = fs::read_symlink(run + "/latest").string();
      EXPECT_NO_THROW(verify_checkpoint(run + "/" + target, true)) << "latest -> " << target;
    } else {
      m.resume(false);
      ASSERT_TRUE(fs::is_symlink(run + "/latest")) << "resume() did not restore latest";
      EXPECT_EQ(fs::read_symlink(run + "/latest").filename(), fs::path(s.newest->dir).filename());
    }
  }
  EXPECT_TRUE(CheckpointManager(run, 2).scan().newest.has_value());
}

}  // namespace
}  // namespace dsv3
