// The paged latent KV cache (DESIGN §3 "Latent cache"). Per layer and token it holds only what the
// absorbed decode reads: kv_a_layernorm(c_kv) (kv_lora_rank values) and the rotated, head-shared
// k_pe (qk_rope_head_dim values), stored side by side as one row of W = kv_lora_rank +
// qk_rope_head_dim values. DeepSeek-V3: W = 576, 61 layers, BF16 → 70,272 bytes per token.
//
// Memory is a pool of fixed-size blocks (block_size tokens, default 64) carved from a byte budget
// once. A block covers `layers` layer slots for its tokens; row (block b, layer l, slot s) lives at
// element ((b·layers + l)·block_size + s)·W. A sequence owns a BlockTable: its blocks in position
// order, so position p is slot p % block_size of block blocks[p / block_size].
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"

namespace dsv3 {

struct KvCacheOptions {
  int64_t block_size = 64;                    // tokens per block
  uint64_t budget_bytes = uint64_t(256) << 20;  // the pool's size; rounded down to whole blocks
  DType dtype = DType::F32;                   // F32, or BF16 storage (rounded to nearest even)
  bool host_storage = true;  // false: block accounting only, the rows live on a device (infer/cuda_latent_attention.h)
};

// The blocks one sequence owns, in position order, and how many positions hold valid entries.
struct BlockTable {
  std::vector<int32_t> blocks;
  int64_t length = 0;
};

class LatentKvPool {
 public:
  // layers: main layers plus any MTP layers the engine runs. InputError when the budget cannot hold
  // one block or the options are invalid (names the option and both numbers).
  LatentKvPool(int64_t layers, int64_t kv_lora_rank, int64_t rope_dim, const KvCacheOptions& opt);

  int64_t layers() const { return layers_; }
  int64_t kv_lora_rank() const { return kv_lora_; }
  int64_t rope_dim() const { return rope_; }
  int64_t row_width() const { return kv_lora_ + rope_; }
  int64_t block_size() const { return block_size_; }
  DType dtype() const { return dtype_; }
  // (kv_lora_rank + qk_rope_head_dim) · layers · sizeof(dtype).
  uint64_t bytes_per_token() const;
  uint64_t block_bytes() const { return bytes_per_token() * uint64_t(block_size_); }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t free_blocks() const { return int64_t(free_.size()); }
  int64_t capacity_tokens() const { return num_blocks_ * block_size_; }
  bool host_storage() const { return host_storage_; }
  // One line: "KV cache: latent (R + r) × L layers × B bytes = X bytes/token; N blocks of T tokens (M MiB)".
  std::string describe() const;

  // Blocks needed to hold `tokens` positions.
  int64_t blocks_for(int64_t tokens) const { return (tokens + block_size_ - 1) / block_size_; }
  // Grow `t` so positions [0, tokens) have a slot. All or nothing: false (and no change) when the
  // pool has too few free blocks.
  bool reserve(BlockTable& t, int64_t tokens);
  // Keep positions [0, len) valid; blocks past them go back to the pool.
  void truncate(BlockTable& t, int64_t len);
  void release(BlockTable& t) { truncate(t, 0); }

  // Store one row (c_kv_n [kv_lora], k_pe [rope]) at (table, layer, position).
  void write(const BlockTable& t, int64_t layer, int64_t pos, const float* c_kv_n, const float* k_pe);
  // Rows [p0, p0 + n) of one layer as F32 into out[n, W] (n must stay inside one block).
  void read_rows(const BlockTable& t, int64_t layer, int64_t p0, int64_t n, float* out) const;
  // Direct F32 pointer to the first of the `block_size` rows of (block, layer) (F32 pools only).
  const float* block_rows_f32(int32_t block, int64_t layer) const;

 private:
  size_t row_offset(int32_t block, int64_t layer, int64_t slot) const {
    return ((size_t(block) * size_t(layers_) + size_t(layer)) * size_t(block_size_) + size_t(slot)) *
           size_t(kv_lora_ + rope_);
  }
  int64_t layers_, kv_lora_, rope_, block_size_, num_blocks_ = 0;
  DType dtype_;
  bool host_storage_ = true;
  std::vector<float> f32_;
  std::vector<uint16_t> bf16_;
  std::vector<int32_t> free_;  // a stack; lowest ids handed out first
};

}  // namespace dsv3
