// Glue between the model's Weights (model/weights.h) and the training infrastructure: the
// optimizer's parameter list from the tensor table, and whole training checkpoints.
#pragma once
#include <string>
#include <vector>

#include "model/weights.h"
#include "train/checkpoint.h"
#include "train/optimizer.h"

namespace dsv3 {

// One ParamSlot per trainable parameter of `w` (TensorSpec::trainable; the router bias is left
// out), with a fresh F32 zero gradient; decay from TensorSpec::weight_decay (matrices only).
// Every trainable parameter must be an F32 CPU tensor (master weights): InputError otherwise.
std::vector<ParamSlot> make_param_slots(Weights& w);

// Write checkpoint `st.step` of a training run: the HF directory (config.json, safetensors in
// F32, tokenizer.json copied from tokenizer_path, generation_config.json) and the trainer state.
std::string save_training_checkpoint(CheckpointManager& mgr, const Weights& w,
                                     const std::string& tokenizer_path, const TrainerState& st,
                                     const AdamW& opt, int64_t bos_token_id = 0,
                                     int64_t eos_token_id = 1);

// Load a checkpoint written by save_training_checkpoint: the weights (owned F32 copies, so they
// can be trained), and the trainer state restored into the optimizer built over them by
// `make_optimizer` (called with the loaded weights).
struct LoadedTraining {
  Weights weights;
  TrainerState state;
};
LoadedTraining load_training_checkpoint(const std::string& dir,
                                        const std::function<AdamW&(Weights&)>& make_optimizer);

}  // namespace dsv3
