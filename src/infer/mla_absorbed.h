// Attention over cached keys for the inference engine, in two forms behind one interface:
//
//   LatentAttention  (the engine's path) — the paged latent cache and the ABSORBED form of MLA:
//     q_lat[h] = W_UKᵀ[h]·q_nope[h]            (into latent space, kv_lora_rank values)
//     s_j      = scale·(q_lat[h]·c_j + q_pe[h]·k_pe_j)   over the sequence's cached rows j ≤ pos
//     o[h]     = W_UV[h]·Σ_j softmax(s)_j·c_j   (back to v_head_dim), then o_proj outside.
//     W_UK[h] / W_UV[h] are the k_nope / v row slices of head h of kv_b_proj ([nope ; v] per head).
//   PlainAttention (the reference and the benchmark baseline) — per-head K/V rows up-projected
//     through kv_b_proj and cached per sequence, then the backend's attention op. Not used by the
//     engine; the absorbed path never calls it.
//
// Both first store this step's rows for `layer`, then attend, so a row at position p sees every row
// of its sequence at positions ≤ p, including rows of the same step (chunked prefill, verification
// of drafts, and plain decode are the same call).
#pragma once
#include <cstdint>
#include <vector>

#include "backend/ops.h"
#include "infer/kv_cache.h"
#include "model/model.h"

namespace dsv3 {

// The rows of one batched step: row r belongs to sequence seq[r] (an index into the attention
// object's per-sequence state) at absolute position pos[r]. Rows of one sequence are consecutive
// positions in increasing order.
struct StepRows {
  std::vector<int32_t> seq;
  std::vector<int64_t> pos;
  int64_t size() const { return int64_t(pos.size()); }
};

// kv_b_proj split per head into F32 W_UK [nh, nope, kv_lora] and W_UV [nh, vd, kv_lora]
// (FP8 weights are dequantized once here). With fp8_blocks, an FP8 kv_b_proj whose heads' nope and
// vd and kv_lora are multiples of 128 (V3's) also keeps its blocks as they are (exact; the CUDA
// decode GEMV reads them):
// uk_t_fp8 = W_UKᵀ per head [nh·kv_lora, nope] (each 128×128 block transposed, its scale moved with
// it) and uv_fp8 = W_UV [nh·vd, kv_lora], each with its scale_inv; absent otherwise.
struct AbsorbedKvB {
  Tensor w_uk, w_uv;
  LinearParam uk_t_fp8, uv_fp8;
};
AbsorbedKvB split_kv_b(const LinearParam& kv_b, const ModelDims& d, bool fp8_blocks = false);

class AttentionCache {
 public:
  virtual ~AttentionCache() = default;
  // q [N, nh, qk] with rotated q_pe; c_kv_n [N, kv_lora]; k_pe [N, rope] rotated; out [N, nh·vd].
  virtual void attend(int64_t layer, const MlaParams& p, const StepRows& rows, const Tensor& q,
                      const Tensor& c_kv_n, const Tensor& k_pe, const Tensor& out) = 0;
  // For a step replayed from a CUDA graph (ModelRunner): puts what the step's attend() calls read
  // at fixed device addresses now, and appends to key everything else that shapes their launches
  // (sizes, grids, those addresses). false: this step's attention cannot be replayed.
  virtual bool prepare_step(const StepRows&, std::vector<int64_t>&) { return false; }
  // Whether attend() first joins a cuda_kv_latent forked beside it (infer/cuda_decode_ops.h) before
  // it reads c_kv_n, k_pe or q's RoPE columns; only then may the runner fork it.
  virtual bool joins_beside() const { return false; }
};

class LatentAttention : public AttentionCache {
 public:
  // absorbed[l]: the split kv_b_proj of cache layer l (main layers then MTP blocks).
  LatentAttention(LatentKvPool& pool, const std::vector<AbsorbedKvB>& absorbed, const ModelDims& d)
      : pool_(pool), absorbed_(absorbed), d_(d) {}
  // Block tables of the sequences a step's rows name (StepRows::seq indexes this).
  std::vector<BlockTable*> tables;
  void attend(int64_t layer, const MlaParams& p, const StepRows& rows, const Tensor& q, const Tensor& c_kv_n,
              const Tensor& k_pe, const Tensor& out) override;

 private:
  LatentKvPool& pool_;
  const std::vector<AbsorbedKvB>& absorbed_;
  ModelDims d_;
};

// The absorbed attention core alone (CPU, F32 accumulation): rows must already be in the pool.
void mla_absorbed_attention(const LatentKvPool& pool, int64_t layer, const std::vector<BlockTable*>& tables,
                            const StepRows& rows, const AbsorbedKvB& w, const ModelDims& d, const Tensor& q,
                            const Tensor& out);

// Per-head K [S, nh, qk] and V [S, nh, vd] of one sequence, per layer (contiguous, grown on demand).
struct PlainSeqCache {
  std::vector<std::vector<float>> k, v;
  int64_t length = 0;
};

class PlainAttention : public AttentionCache {
 public:
  PlainAttention(Backend& be, const ModelDims& d, int64_t layers) : be_(be), d_(d), layers_(layers) {}
  std::vector<PlainSeqCache*> seqs;
  void attend(int64_t layer, const MlaParams& p, const StepRows& rows, const Tensor& q, const Tensor& c_kv_n,
              const Tensor& k_pe, const Tensor& out) override;
  // Bytes per token of this cache: (nh·qk + nh·vd) · layers · 4.
  uint64_t bytes_per_token() const { return uint64_t(d_.nh * (d_.qk + d_.vd)) * uint64_t(layers_) * 4; }

 private:
  Backend& be_;
  ModelDims d_;
  int64_t layers_;
};

}  // namespace dsv3
