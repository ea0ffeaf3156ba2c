// AdamW over the model's parameter list, with the bookkeeping around it:
//   - FP32 master weights (the parameters themselves), moments m and v in F32 or BF16;
//   - decoupled weight decay on matrices only (ParamSlot::decay, from the tensor table);
//   - global-norm clipping over all gradients (torch.nn.utils.clip_grad_norm_'s rule);
//   - gradient accumulation: the caller sums micro-batch gradients and passes grad_scale = 1/n;
//   - non-finite loss or gradients: the step is skipped (parameters and moments untouched, the
//     bias-correction counter not advanced) and counted; after max_consecutive_skips skipped steps
//     in a row, step() throws TrainingStopped.
// The update itself is Backend::adamw when a backend is given (so parameters on the GPU stay there),
// else the plain loop in optimizer.cpp (the CPU reference of the same formula).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "core/error.h"
#include "core/tensor.h"

namespace dsv3 {

class Backend;

// A run that cannot continue because of the numbers it produced (not a bug, not bad input).
struct TrainingStopped : InputError {
  using InputError::InputError;
};

struct OptimizerConfig {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;  // applied to ParamSlot::decay tensors only
  double clip_norm = 1.0;     // ≤ 0: no clipping (the norm is still computed and reported)
  DType moment_dtype = DType::F32;  // F32 or BF16
  int max_consecutive_skips = 5;
  void validate() const;  // InputError naming the field
};

// One trainable tensor. param and grad share storage with the model (Tensor copies are views).
// Non-trainable state such as e_score_correction_bias is simply not listed.
struct ParamSlot {
  std::string name;  // the hub tensor name
  Tensor param;      // F32 master weights
  Tensor grad;       // F32, same shape
  bool decay = true;
};

// Matrices decay, vectors (norm weights, biases) do not: the rule behind ParamSlot::decay.
inline bool is_matrix(const Shape& s) { return s.n >= 2; }

struct StepReport {
  bool applied = false;       // false: skipped because of non-finite values
  double grad_norm = 0.0;     // of grad_scale·grad, before clipping (NaN/Inf when skipped)
  double clip_scale = 1.0;    // factor applied to the gradients by clipping
  int64_t skipped_total = 0;  // over the whole run (restored on resume)
  int consecutive_skips = 0;
};

class AdamW {
 public:
  AdamW(std::vector<ParamSlot> params, OptimizerConfig cfg, Backend* backend = nullptr);

  // One optimizer step at learning rate lr. `loss` is the step's (averaged) loss: a non-finite
  // loss skips the step like non-finite gradients do. grad_scale multiplies every gradient
  // (1/accumulation steps). The step number used for bias correction is updates()+1.
  StepReport step(double lr, double loss, double grad_scale = 1.0);

  // Global L2 norm of grad_scale·grad over all parameters (sums in double, fixed order).
  double grad_norm(double grad_scale = 1.0) const;
  void zero_grads();

  int64_t updates() const { return updates_; }
  int64_t skipped_total() const { return skipped_total_; }
  const OptimizerConfig& config() const { return cfg_; }
  const std::vector<ParamSlot>& params() const { return params_; }
  // Copies of the parameters in another float dtype (the trainer's BF16 compute weights), rewritten
  // by each applied step from the updated values in the same pass: copy_of(name) gives a
  // parameter's copy, same shape, or an undefined tensor for none.
  void set_copies(const std::function<Tensor(const std::string&)>& copy_of);

  // State for checkpoints: tensors "<param>.exp_avg" and "<param>.exp_avg_sq", and counters.
  struct NamedState {
    std::string name;
    Tensor tensor;  // on the parameters' device
  };
  std::vector<NamedState> state_tensors() const;
  nlohmann::json state_json() const;
  // Restore from what state_tensors()/state_json() saved. `lookup` returns the saved tensor of a
  // name (an undefined Tensor when absent); names, shapes and dtypes must match exactly, else
  // InputError naming `where` and the tensor. Values are converted to moment_dtype if needed.
  void load_state(const std::function<Tensor(const std::string&)>& lookup,
                  const nlohmann::json& state, const std::string& where);

 private:
  void update_plain(ParamSlot& p, Tensor& m, Tensor& v, double lr, double wd, double gscale,
                    int64_t t) const;
  std::vector<ParamSlot> params_;
  std::vector<Tensor> m_, v_;
  std::vector<Tensor> copies_;  // per parameter, set_copies' (undefined: none)
  OptimizerConfig cfg_;
  Backend* backend_ = nullptr;
  int64_t updates_ = 0;
  int64_t skipped_total_ = 0;
  int consecutive_ = 0;
};

// Gradient accumulation: counts micro-batches and averages their losses over one optimizer step.
class GradAccumulator {
 public:
  explicit GradAccumulator(int micro_steps);
  // Record one micro-batch's loss; true when this was the last micro-batch of the step.
  bool add(double loss, int64_t tokens);
  int micro_steps() const { return n_; }
  double grad_scale() const { return 1.0 / double(n_); }  // gradients are summed over micro-batches
  double mean_loss() const;
  int64_t tokens() const { return tokens_; }
  void reset();

 private:
  int n_, count_ = 0;
  double loss_sum_ = 0.0;
  int64_t tokens_ = 0;
};

}  // namespace dsv3
