// dsv3 checkpoint verify|stress
//   verify DIR:  DIR is a run directory (step-N/ and latest) or one checkpoint. Prints the newest
//                complete checkpoint and every newer one that is not complete (and why); with
//                --load also reads every tensor and the trainer state. Exit 0 when a complete
//                checkpoint is found, 2 when none is.
//   stress:      the save path of training without the model: AdamW steps on model-sized random
//                tensors with a checkpoint after every step, resuming from the newest complete
//                checkpoint at start. tools/kill_test.sh SIGKILLs it during saves.
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <iostream>

#include "cli/command.h"
#include "core/error.h"
#include "core/rng.h"
#include "io/checkpoint_index.h"
#include "io/checksum.h"
#include "train/checkpoint.h"
#include "train/optimizer.h"

namespace dsv3::cli {
namespace {

namespace fs = std::filesystem;

struct CkptOptions {
  std::string dir;
  bool load = false;
  bool quick = false;
  std::string out;
  int64_t steps = 0;
  double mb = 8;
  int keep = 2;
  uint64_t seed = 1;
};

// Read every byte of every tensor and the trainer state: what a resume would touch.
void load_everything(const std::string& dir) {
  SafetensorsDir w = SafetensorsDir::open(dir);
  uint32_t crc = 0;
  for (const auto& [name, t] : w.tensors()) {
    const auto& shard = w.shard(t.shard);
    crc = crc32_update(crc, shard.bytes(*t.info), t.info->nbytes());
  }
  nlohmann::json st = read_json_file(dir + "/" + kTrainerStateFileName);
  if (!st.contains("step")) input_error(dir, "/", kTrainerStateFileName, ": no step");
  SafetensorsFile opt = SafetensorsFile::open(dir + "/" + kOptimizerFileName);
  std::cout << "loaded " << w.size() << " tensors (" << w.tensor_bytes() << " bytes, CRC-32 "
            << crc_hex(crc) << "), trainer state at step " << st["step"] << ", " << opt.size()
            << " optimizer tensors\n";
}

int run_verify(const CkptOptions& o) {
  if (fs::exists(o.dir + "/" + kManifestFileName)) {
    verify_checkpoint(o.dir, !o.quick);
    std::cout << "complete: " << o.dir << "\n";
    if (o.load) load_everything(o.dir);
    return 0;
  }
  if (!fs::is_directory(o.dir)) input_error(o.dir, ": not a directory");
  CheckpointManager m(o.dir, 1);
  CheckpointScan s = m.scan(!o.quick);
  for (const auto& r : s.rejected) std::cout << "incomplete: " << r << "\n";
  if (!s.newest) input_error(o.dir, ": no complete checkpoint");
  std::cout << "newest complete: " << s.newest->dir << " (step " << s.newest->step << ")\n";
  const std::string link = o.dir + "/" + kLatestLinkName;
  std::error_code ec;
  if (fs::is_symlink(link, ec)) {
    std::string target = fs::read_symlink(link).string();
    verify_checkpoint(o.dir + "/" + target, !o.quick);  // `latest` must always name a complete one
    std::cout << "latest -> " << target << " (complete)\n";
  } else {
    input_error(link, ": missing, although a complete checkpoint exists");
  }
  if (o.load) load_everything(s.newest->dir);
  return 0;
}

int run_stress(const CkptOptions& o) {
  if (!(o.mb > 0)) input_error("--mb ", o.mb, " must be > 0");
  CheckpointManager m(o.out, o.keep);
  // Model-like tensors: a large embedding, a matrix, a norm vector; their sizes add up to --mb.
  const int64_t cols = 256;
  const int64_t rows = std::max<int64_t>(1, int64_t(o.mb * 1e6 / 4 / cols * 0.8));
  std::vector<NamedTensor> weights = {
      {"model.embed_tokens.weight", Tensor::zeros(DType::F32, {rows, cols})},
      {"model.layers.0.mlp.gate_proj.weight", Tensor::zeros(DType::F32, {rows / 4 + 1, cols})},
      {"model.norm.weight", Tensor::zeros(DType::F32, {cols})}};
  std::vector<ParamSlot> slots;
  for (auto& w : weights) {
    for (int64_t i = 0; i < w.tensor.numel(); ++i)
      w.tensor.data<float>()[i] = 0.02f * rng_normal(o.seed, 1, uint64_t(i));
    slots.push_back({w.name, w.tensor, Tensor::zeros(DType::F32, w.tensor.shape()), is_matrix(w.tensor.shape())});
  }
  OptimizerConfig oc;
  oc.moment_dtype = DType::BF16;
  AdamW opt(slots, oc);
  int64_t step = 0;
  CheckpointScan s = m.resume(/*full=*/true);
  for (const auto& r : s.rejected) note(cat("ignoring ", r));
  if (s.newest) {
    SafetensorsDir w = SafetensorsDir::open(s.newest->dir);
    for (auto& nt : weights) {
      Tensor t = w.tensor(nt.name);
      if (!(t.shape() == nt.tensor.shape()))
        input_error(s.newest->dir, ": tensor ", nt.name, " has shape ", t.shape().str(),
                    ", this stress run uses ", nt.tensor.shape().str(), " (another --mb?)");
      std::memcpy(nt.tensor.raw(), t.raw(), t.nbytes());
    }
    TrainerState st = read_trainer_state(s.newest->dir, opt);
    step = st.step;
    note(cat("resumed from ", s.newest->dir, " at step ", step));
  }
  const std::string config = "{\n  \"model_type\": \"deepseek_v3\",\n  \"architectures\": [\"DeepseekV3ForCausalLM\"]\n}\n";
  for (; o.steps == 0 || step < o.steps;) {
    for (auto& p : slots)
      for (int64_t i = 0; i < p.grad.numel(); ++i)
        p.grad.data<float>()[i] = 0.01f * rng_normal(o.seed, 1000 + uint64_t(step), uint64_t(i));
    opt.step(1e-3, 1.0);
    ++step;
    TrainerState st;
    st.step = step;
    st.data = {o.seed, 0, uint64_t(step)};
    std::string dir = m.save(step, [&](const std::string& d) {
      ModelFiles mf;
      mf.config_json = config;
      mf.weights = weights;
      mf.max_shard_bytes = uint64_t(o.mb * 1e6 / 2);  // two shards and an index, as big models have
      write_model_files(d, mf);
      write_trainer_state(d, st, opt);
    });
    std::cout << "saved " << dir << std::endl;
  }
  return 0;
}

RunFn setup_checkpoint(CLI::App& app) {
  auto o = std::make_shared<CkptOptions>();
  app.require_subcommand(1, 1);
  auto* ver = app.add_subcommand("verify", "Find and verify the newest complete checkpoint");
  ver->add_option("DIR", o->dir, "Run directory (with step-N/ and latest) or one checkpoint")->required();
  ver->add_flag("--load", o->load, "Also read every tensor and the trainer state");
  ver->add_flag("--quick", o->quick, "Check sizes only, not the CRC-32 of every byte");
  auto* st = app.add_subcommand("stress", "Write checkpoints in a loop (for tools/kill_test.sh)");
  st->add_option("--out", o->out, "Run directory")->required();
  st->add_option("--steps", o->steps, "Stop after this many steps (0: run until killed)");
  st->add_option("--mb", o->mb, "Approximate size of the weights in MB");
  st->add_option("--keep", o->keep, "Complete checkpoints to keep");
  st->add_option("--seed", o->seed, "Seed of the random weights and gradients");
  return [o, ver, st]() -> int {
    if (ver->parsed()) return run_verify(*o);
    if (st->parsed()) return run_stress(*o);
    return 2;
  };
}

}  // namespace
}  // namespace dsv3::cli

DSV3_COMMAND(checkpoint, "Verify training checkpoints; stress the crash-safe save path",
             dsv3::cli::setup_checkpoint);
