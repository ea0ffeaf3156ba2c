#include "train/trainer_io.h"

#include <filesystem>

#include "core/error.h"

namespace dsv3 {

std::vector<ParamSlot> make_param_slots(Weights& w) {
  std::vector<ParamSlot> out;
  for (Param& p : w.params()) {
    if (!p.spec.trainable) continue;
    if (p.w.dtype() != DType::F32 || p.w.device() != Device::CPU)
      input_error("training needs F32 master weights on the CPU; ", p.spec.name, " is ",
                  dtype_name(p.w.dtype()), " on ", device_name(p.w.device()));
    out.push_back({p.spec.name, p.w, Tensor::zeros(DType::F32, p.w.shape()), p.spec.weight_decay});
  }
  return out;
}

std::string save_training_checkpoint(CheckpointManager& mgr, const Weights& w,
                                     const std::string& tokenizer_path, const TrainerState& st,
                                     const AdamW& opt, int64_t bos_token_id, int64_t eos_token_id) {
  return mgr.save(st.step, [&](const std::string& dir) {
    SaveOptions so;
    so.dtype = DType::F32;  // the master weights themselves: resume is bitwise
    w.save(dir, so);
    if (!tokenizer_path.empty()) {
      std::string src = tokenizer_path;
      if (std::filesystem::is_directory(src)) src += "/tokenizer.json";
      copy_file_atomic(src, dir + "/tokenizer.json");
    }
    write_json_file(dir + "/generation_config.json", {{"_from_model_config", true},
                                                      {"bos_token_id", bos_token_id},
                                                      {"eos_token_id", eos_token_id},
                                                      {"do_sample", false}});
    write_trainer_state(dir, st, opt);
  });
}

LoadedTraining load_training_checkpoint(const std::string& dir,
                                        const std::function<AdamW&(Weights&)>& make_optimizer) {
  verify_checkpoint(dir, /*full=*/true);
  LoadOptions lo;
  lo.progress = false;
  Weights mapped = Weights::load(dir, lo);
  // Owned F32 copies: mapped tensors are copy-on-write views of the file, not training storage.
  std::map<std::string, Tensor> owned;
  for (const Param& p : mapped.params()) {
    if (p.fp8()) input_error(dir, ": ", p.spec.name, " is FP8; training resumes from F32 checkpoints");
    owned[p.spec.name] = p.w.to(DType::F32);
  }
  LoadedTraining r{Weights::from_tensors(mapped.config(), std::move(owned), dir), {}};
  AdamW& opt = make_optimizer(r.weights);
  r.state = read_trainer_state(dir, opt);
  return r;
}

}  // namespace dsv3
