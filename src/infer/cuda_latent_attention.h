// The latent cache and absorbed-MLA attention on the GPU (CUDA builds only: the implementation is
// cuda_latent_attention.cu, compiled when DSV3_HAVE_CUDA is set). Plain C++ header, no CUDA types.
//
// The LatentKvPool keeps the block accounting (reserve/truncate/release on the host, built with
// host_storage = false); this object owns the rows: BF16 on the device in the pool's layout, row
// (block, layer, slot) at element ((block·layers + layer)·block_size + slot)·W.
//
// One attend() per layer:
//   1. write the step's rows (kv_a_layernorm(c_kv) ‖ rotated k_pe, rounded to BF16) by a kernel (or,
//      on decode steps of the generic kernel, inside the attention kernel, which reads each
//      sequence's new row from the step's inputs);
//   2. qcat[r, h] = [W_UK[h]ᵀ·q_nope[r, h] ‖ q_pe[r, h]]: one GEMV launch over all heads
//      (cuda_rows_gemv, here and in 4.) for steps of up to cuda_absorbed_gemv_rows() rows, a
//      strided-batched SGEMM beyond; W_UK and W_UV are kept in BF16 for the GEMV when that is
//      exact (a BF16 kv_b_proj), so BF16 checkpoints take its tensor-core path; the q_pe half is
//      copied only for cuda_mla_decode, the generic kernel reads it from q;
//   3. lat[r, h] = Σ_j softmax(scale·qcat·row_j)·c_j over the row's sequence up to its position:
//      cuda_mla_decode (backend/cuda/mla_decode.h) at DeepSeek-V2/V3's 512 + 64 and block size 64,
//      a generic kernel for other shapes (one CTA per split of a row's positions and 16 heads, 32-row
//      tiles in shared memory; the splits of a row merged in a thread-block cluster; prefill steps
//      one CTA per two consecutive rows of a sequence, cuda_latent_prefill.h);
//   4. o[r, h] = W_UV[h]·lat[r, h], as in 2.
// Every row is its own attention entry (length pos + 1, its sequence's block table), so chunked
// prefill and draft verification are the same call as decode. The per-row tables, lengths and
// slots are uploaded once per step (one host→device copy), reused by every layer.
#pragma once
#include <cstdint>
#include <vector>

#include "infer/mla_absorbed.h"

namespace dsv3 {

// Steps of up to this many rows (at most kCudaGemvMaxRows) run the absorbed W_UK / W_UV products through the
// GEMV, larger ones through cuBLAS (default the most; the bench sets 8, an earlier limit, for comparison).
void cuda_set_absorbed_gemv_rows(int64_t rows);
int64_t cuda_absorbed_gemv_rows();

// The generic kernel's tensor-core path (kv_lora_rank ≤ 256 and rows of ≤ 320 values, both
// multiples of 8 / 16): on by default; false (or DSV3_LATENT_ATTN_MMA=0 at start-up) keeps the FP32
// path. cuda_latent_attention_mma_launches() counts the launches that took it (for tests).
void cuda_set_latent_attention_mma(bool on);
bool cuda_latent_attention_mma();
int64_t cuda_latent_attention_mma_launches();

// Prefill steps (more rows than cuda_absorbed_gemv_rows(), rows of one sequence at consecutive
// positions, on the tensor-core shapes, at least two groups of rows per SM) take a kernel with one
// CTA per this many query rows, each cache tile read once for all of them (cuda_latent_prefill.h):
// 2 by default, 4 (one CTA per SM: slower), or 0 for the row kernel everywhere
// (DSV3_LATENT_PREFILL_ROWS at start-up). cuda_latent_prefill_launches() counts its launches (for
// tests).
void cuda_set_latent_prefill_rows(int rows);
int cuda_latent_prefill_rows();
int64_t cuda_latent_prefill_launches();

class CudaLatentAttention : public AttentionCache {
 public:
  // absorbed: W_UK / W_UV per cache layer on the device (ModelRunner::absorbed() on the CUDA backend).
  CudaLatentAttention(const LatentKvPool& pool, const std::vector<AbsorbedKvB>& absorbed, const ModelDims& d);
  // Block tables of the sequences a step's rows name (StepRows::seq indexes this).
  std::vector<BlockTable*> tables;
  void attend(int64_t layer, const MlaParams& p, const StepRows& rows, const Tensor& q, const Tensor& c_kv_n,
              const Tensor& k_pe, const Tensor& out) override;
  // The step's metadata uploaded (to a buffer that keeps its address until it must grow) and the
  // key: this object (a serial and the pool's address), rows, blocks per table, tiles, splits,
  // merge mode, fold, the buffer's address. Steps on
  // cuda_mla_decode or on cuBLAS (more rows than cuda_absorbed_gemv_rows()) are not replayable.
  bool prepare_step(const StepRows& rows, std::vector<int64_t>& key) override;
  bool joins_beside() const override { return true; }  // after the W_UK product, attend()'s first launch

  // The device rows (BF16, [num_blocks·layers·block_size, W]).
  const Tensor& storage() const { return storage_; }
  // Host→device uploads of step metadata so far (one per distinct step).
  int64_t uploads() const { return uploads_; }
  // false: always the generic kernel (tests compare it with cuda_mla_decode on V3 shapes).
  void set_use_mla_decode(bool on) { use_mla_decode_ = on; }
  bool uses_mla_decode() const;

 private:
  void upload(const StepRows& rows);
  // The generic kernel's launch shape for this step's rows: splits of each row's positions, tiles
  // of the longest row, and how splits merge (direct, cluster, partials).
  struct Split {
    int64_t splits = 1, tiles = 1, groups = 1;
    int mode = 0;
  };
  Split split_plan(int64_t N) const;
  std::vector<int32_t> prefill_groups(const StepRows& rows) const;  // empty: the row kernel
  int64_t planned_len(int64_t N) const;  // positions the tables and tiles cover (max_len_ rounded up)
  const LatentKvPool& pool_;
  const std::vector<AbsorbedKvB>& absorbed_;
  std::vector<Tensor> w_uk_t_;  // W_UK[h]ᵀ per layer [nh·kv_lora, nope]: rows for the small-step GEMV
  std::vector<Tensor> w_uv_bf16_;  // W_UV per layer in BF16 when exact, else empty (the GEMV reads w_uv)
  std::vector<bool> fp8_;  // per layer: the GEMV reads the FP8 blocks of AbsorbedKvB (the two above empty)
  ModelDims d_;
  Tensor storage_;
  // This step's metadata, host copy (to detect a new step) and device copy (overwritten in place,
  // in stream order; reallocated only to grow): [lengths N | row block N | row slot N | tables N ×
  // max_blocks].
  std::vector<int32_t> meta_host_;
  Tensor meta_dev_;
  int64_t rows_ = 0, max_blocks_ = 0, max_len_ = 0, uploads_ = 0;
  bool use_mla_decode_ = true;
  bool last_rows_ = false;  // this step has one row per sequence (a decode step)
  int64_t prefill_ngroups_ = 0;  // the prefill kernel's groups this step (their starts end the metadata), or 0
  int64_t serial_ = 0;      // distinct per object in the process: part of the step key
};

// Greedy tokens on the device: ids[r] = argmax over [0, n_valid) of logits[r] (lowest id on ties);
// one kernel, one read-back of the ids.
std::vector<int32_t> cuda_greedy_tokens(const Tensor& logits, int64_t n_valid);

}  // namespace dsv3
