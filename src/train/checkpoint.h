// Crash-safe training checkpoints.
//
// Layout under the run directory OUT:
//   OUT/step-00000120/                 one complete checkpoint (8-digit optimizer step)
//       config.json                    HF model config
//       model.safetensors              or model-0000i-of-0000n.safetensors + model.safetensors.index.json
//       tokenizer.json                 copied from the tokenizer the data was prepared with
//       generation_config.json
//       trainer_state.json             step, data position, schedules, counters, resolved options
//       optimizer.safetensors          AdamW moments "<param>.exp_avg", "<param>.exp_avg_sq"
//       manifest.json                  written LAST: every other file with its size and CRC-32
//   OUT/latest -> step-00000120        symlink to the newest complete checkpoint
//
// Save: files go into OUT/step-N.tmp/ (each through an AtomicFile: temp, fsync, rename, fsync of
// the directory), then the manifest, then the directory is renamed to step-N and OUT is fsync'ed,
// then `latest` is replaced atomically (new symlink + rename), then old checkpoints beyond `keep`
// are renamed to *.tmp and removed. A crash at any moment leaves every step-N either complete or
// absent, and `latest` pointing at a complete one (once the first save has finished).
//
// Resume: the newest step-N whose manifest verifies (sizes always; CRC-32 of every byte with
// full=true). Directories ending in .tmp are leftovers of interrupted saves or deletions; they are
// never chosen and are removed by the next save.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "train/data_loader.h"

namespace dsv3 {

class AdamW;

constexpr const char* kManifestFileName = "manifest.json";
constexpr const char* kTrainerStateFileName = "trainer_state.json";
constexpr const char* kOptimizerFileName = "optimizer.safetensors";
constexpr const char* kLatestLinkName = "latest";

std::string checkpoint_dir_name(int64_t step);  // "step-00000120"

// Verify one checkpoint directory against its manifest: the manifest parses, names its own step
// and only plain files, every listed file has the listed size (and CRC-32 when full), and no
// unlisted file is present. Throws InputError naming the directory, the file and the problem.
nlohmann::json verify_checkpoint(const std::string& dir, bool full = true);

struct FoundCheckpoint {
  std::string dir;  // OUT/step-N
  int64_t step = 0;
};

struct CheckpointScan {
  std::optional<FoundCheckpoint> newest;  // the newest complete checkpoint
  std::vector<std::string> rejected;      // "step-N: why" for each newer one that is not complete
};

class CheckpointManager {
 public:
  // `root` is created if missing (its parent must exist). keep ≥ 1 complete checkpoints are kept.
  CheckpointManager(std::string root, int keep);

  // Write checkpoint `step`: `write(dir)` puts the files into the temporary directory (each file
  // written atomically); then the manifest, the rename, `latest`, and rotation. Returns the final
  // directory. An exception from `write` leaves no step-N behind (the .tmp is removed).
  std::string save(int64_t step, const std::function<void(const std::string& dir)>& write);

  // Newer checkpoints that fail verification are listed in `rejected` and skipped.
  CheckpointScan scan(bool full = true) const;
  // scan(), then point `latest` at the checkpoint found (repairing it after a crash between the
  // rename and the link update).
  CheckpointScan resume(bool full = true);
  // Steps of every step-N directory (complete or not), ascending.
  std::vector<int64_t> steps_present() const;
  const std::string& root() const { return root_; }

 private:
  void rotate();
  void remove_leftovers();
  void point_latest(const std::string& name);
  std::string root_;
  int keep_;
};

// ---- contents of a training checkpoint -------------------------------------------------------

// The Hugging Face part: config.json (text from serialize_model_config), the weights
// (model.safetensors, or shards + index above max_shard_bytes), tokenizer.json (copied from
// tokenizer_path when not empty) and generation_config.json.
struct ModelFiles {
  std::string config_json;
  std::vector<NamedTensor> weights;
  std::string tokenizer_path;
  int64_t bos_token_id = 0, eos_token_id = 1;
  uint64_t max_shard_bytes = uint64_t(5) << 30;
};
void write_model_files(const std::string& dir, const ModelFiles& m);

// The trainer's part. `step` counts finished optimizer steps (the next step to run).
struct TrainerState {
  int64_t step = 0;
  SamplerState data;
  nlohmann::json extra = nlohmann::json::object();  // schedules, options, RNG, metrics summary
};
// trainer_state.json + optimizer.safetensors (moments of CPU tensors).
void write_trainer_state(const std::string& dir, const TrainerState& st, const AdamW& opt);
// Reads both and restores `opt`; InputError naming the file for anything missing or mismatched.
TrainerState read_trainer_state(const std::string& dir, AdamW& opt);

// Small helpers, all atomic.
void write_json_file(const std::string& path, const nlohmann::json& j);
void copy_file_atomic(const std::string& from, const std::string& to);
nlohmann::json read_json_file(const std::string& path);
// fsync a directory so renames inside it are durable.
void fsync_dir(const std::string& dir);

}  // namespace dsv3
