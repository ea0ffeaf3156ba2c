// ModelRunner: the model's forward for inference steps. A step is any set of rows (tokens at
// positions of one or more sequences); attention reads and extends a cache (infer/mla_absorbed.h)
// instead of recomputing the prefix, so one call serves chunked prefill, batched decode of many
// sequences of different lengths, and verification of speculative drafts.
//
// Built from the model's modules (model/model.h: parameters, RMSNorm/linear/MLP/MoE forwards, RoPE
// tables); only the attention differs from the plain forward. MTP module k runs as cache layer
// num_hidden_layers + k − 1, its hub layer index.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "infer/mla_absorbed.h"
#include "model/model.h"

namespace dsv3 {

class ModelRunner {
 public:
  explicit ModelRunner(const Weights& w, Backend& be = cpu_backend());

  const ModelConfig& config() const { return cfg_; }
  const ModelDims& dims() const { return d_; }
  const ModelParams& params() const { return params_; }
  Backend& backend() { return be_; }
  int64_t num_layers() const { return cfg_.num_hidden_layers; }
  int64_t num_mtp() const { return int64_t(params_.mtp.size()); }
  const std::vector<AbsorbedKvB>& absorbed() const { return absorbed_; }

  struct Output {
    Tensor hidden;  // [N, H]: h⁰ after model.norm (main), or h^k before shared_head.norm (MTP)
    Tensor logits;  // [logit_rows, V] F32
  };
  // The main model on `tokens` (one per row). Logits only for the listed rows.
  Output forward(AttentionCache& cache, const StepRows& rows, std::span<const int32_t> tokens,
                 std::span<const int32_t> logit_rows);
  // MTP module k (1-based): row r takes token tokens[r] (= t_{i+k}) and h_prev row r (= h^{k−1}_i).
  Output mtp_forward(int k, AttentionCache& cache, const StepRows& rows, std::span<const int32_t> tokens,
                     const Tensor& h_prev, std::span<const int32_t> logit_rows);

 private:
  Tensor decoder_layer(int64_t layer, const LayerParams& p, const Tensor& x, const StepRows& rows,
                       const Tensor& positions, AttentionCache& cache);
  Tensor head(const Tensor& normed, std::span<const int32_t> logit_rows);
  const RopeTables& rope_for(int64_t n);
  Tensor positions_of(const StepRows& rows);

  ModelConfig cfg_;
  Backend& be_;
  ModelDims d_;
  ModelParams params_;
  std::vector<AbsorbedKvB> absorbed_;  // main layers then MTP blocks
  RopeCache rope_;
};

}  // namespace dsv3
