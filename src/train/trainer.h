// The training loop (DESIGN §3, paper_facts §3.3–3.4, §5):
//   data [B, T+1] → forward (keep activations) → loss (CE main + λ/D·Σ MTP + α·balance) → backward
//   → repeat for grad_accum micro-batches (gradients summed, scaled 1/n by the optimizer)
//   → global-norm clip → AdamW (FP32 master weights, decay on matrices; the router bias is not a
//   parameter of the optimizer and gets no gradient)
//   → aux-loss-free balancing: per MoE layer (main and MTP blocks) b_i += γ·sign(mean load − load_i),
//   the loads counted over the whole step (all micro-batches), only after an applied step.
// Logged per step: loss, grad norm, lr, ms, tok/s (one llm.c line), MaxVio per MoE layer
// (max_i load_i / mean − 1) into metrics.jsonl; every eval_every steps a validation loss and a short
// greedy sample; checkpoints through CheckpointManager; a run resumes from OUT/latest bitwise.
//
// Precision (--precision): fp32 (everything F32); bf16 and fp8 (the FP8 issue's recipe, see
// docs/fp8.md) run the eligible linears' GEMMs on rounded operands with FP32 accumulation, from
// BF16 copies of the F32 master weights re-rounded after each update; norms, router, attention
// core, loss, gradients and AdamW stay F32.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/config.h"
#include "train/optimizer.h"
#include "train/schedule.h"

namespace dsv3 {

struct Grads;
class MoeLayerHook;

// Several processes training one model (docs/distributed.md): data parallel over size() ranks,
// optionally expert parallel (moe_hook) and ZeRO-1 (shards_optimizer). Implemented over a
// Communicator in src/dist/train_parallel.h; declared here because src/train cannot depend on
// src/dist. Every call is collective: all ranks make it, in the same order.
//   Data: each optimizer step draws grad_accum · size() micro-batches of `batch` sequences from the
//   (identical, deterministic) sampler; rank r trains on micro-batches r·grad_accum … +grad_accum−1.
//   So the sampler state, the checkpoints and the numbers are those of one process running
//   grad_accum · size() micro-batches (tests/dist: equal within the DP tolerance).
class TrainParallel {
 public:
  virtual ~TrainParallel() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // InputError on every rank when `value` is not the same on all ranks (names `what` and the ranks).
  virtual void check_same(const std::string& what, const std::string& value) = 0;
  // root's string on every rank.
  virtual std::string broadcast(const std::string& s, int root) = 0;
  // After the backward of a step: gradients (slot order) and MoE loads summed over the ranks, the
  // loss sum added in rank order (unscaled: the optimizer's grad_scale divides).
  virtual void reduce(const std::vector<ParamSlot>& slots, std::vector<std::vector<int64_t>>& loads,
                      double& loss_sum) = 0;
  // Expert parallelism: installed on the training thread for every forward/backward (nullptr: none).
  virtual MoeLayerHook* moe_hook() { return nullptr; }

  // ZeRO-1: when true, the trainer keeps no AdamW of its own and uses the four below instead.
  virtual bool shards_optimizer() const = 0;
  // Build this rank's shard over `slots` (every parameter), from `loaded` (a complete AdamW read
  // from a checkpoint) or fresh when null.
  virtual void init_optimizer(const std::vector<ParamSlot>& slots, const OptimizerConfig& cfg, Backend* be,
                              const AdamW* loaded) = 0;
  // As AdamW::step over all slots: global norm, clipping, skip rule; then parameters all-gathered.
  virtual StepReport optimizer_step(double lr, double loss, double grad_scale) = 0;
  // The complete optimizer state on `root` (nullptr on the other ranks), for a checkpoint.
  virtual std::unique_ptr<AdamW> gather_optimizer(int root) = 0;
  virtual int64_t skipped_total() const = 0;
};

struct TrainOptions {
  int64_t steps = 1000;
  int64_t batch = 8;       // sequences per micro-batch (of one rank under TrainParallel)
  int64_t seq_len = 64;    // T
  int64_t grad_accum = 1;  // micro-batches per optimizer step
  double lr = 5e-3, min_lr = 5e-4;
  double warmup_frac = 0.05, decay_start_frac = 0.5;  // the V3 shape: warm-up, constant, cosine
  ScalarSchedule mtp_lambda{0.3};
  ScalarSchedule balance_alpha{1e-4};  // complementary sequence-wise loss α
  ScalarSchedule bias_gamma{1e-3};     // aux-loss-free bias update speed γ (0: off)
  OptimizerConfig opt;
  uint64_t seed = 1234;
  // 0.006 is the paper's for a 7168-wide model; the 128-wide tiny preset learns much faster from 0.02
  // (its initializer_range): measured on the Brown corpus, val loss 6.23 vs 6.79 after 200 steps.
  double init_std = 0.02;
  std::string precision = "fp32";  // fp32 | bf16 | fp8 | fp8-dgrad-128x128
  std::string device = "cpu";      // cpu | cuda (one GPU per rank)
  std::string data_dir;            // prepared dataset (dataset.json)
  std::string tokenizer_path;      // for samples and the checkpoints' tokenizer.json ("" = none)
  std::string out_dir = "out";
  int64_t eval_every = 100, eval_batches = 8;  // 0: no validation
  int64_t sample_tokens = 24;                 // greedy sample after each validation (0: none)
  std::string sample_prompt = "The";
  int64_t checkpoint_every = 200;  // and at the end; 0: only at the end
  int keep_checkpoints = 2;
  bool resume = true;   // continue from OUT/latest when it exists
  bool plot = true;     // loss PNG at each validation and at the end
  bool quiet = false;   // no step lines (tests)

  void validate() const;  // InputError naming the option
  nlohmann::json to_json() const;
};

struct TrainSummary {
  int64_t steps_done = 0, skipped = 0;
  double last_loss = 0, last_val_loss = -1, first_val_loss = -1;
  double seconds = 0;
  std::vector<double> max_vio;              // of the last step, per MoE layer
  std::vector<std::vector<int64_t>> loads;  // of the last step: per MoE layer, tokens per expert
};

class Trainer {
 public:
  // A fresh run starts from Weights::random(config, seed, init_std); with resume and a checkpoint
  // in out_dir the run continues from it (its config wins; a different one is an InputError).
  // With `par` (kept by the caller, outliving the trainer) every rank constructs its Trainer with
  // the same config and options (checked); rank 0 alone writes checkpoints, metrics and output.
  Trainer(const ModelConfig& config, TrainOptions o, TrainParallel* par = nullptr);
  ~Trainer();

  // Run until `stop_at` optimizer steps are done (default: o.steps). Throws TrainingStopped after
  // max_consecutive_skips non-finite steps in a row.
  TrainSummary run(int64_t stop_at = -1);

  // Test hook: called after each micro-batch backward with (step, grads) — e.g. to poison gradients.
  void set_grad_hook(std::function<void(int64_t, Grads&)> f) { grad_hook_ = std::move(f); }
  int64_t step() const;
  // The F32 master weights (named hub tensors), for tests.
  std::vector<std::pair<std::string, const float*>> parameters() const;
  std::vector<std::pair<std::string, int64_t>> parameter_sizes() const;
  double validation_loss();
  std::string greedy_sample(int64_t n);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::function<void(int64_t, Grads&)> grad_hook_;
};

}  // namespace dsv3
