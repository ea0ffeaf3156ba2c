// Absorbed-MLA decode attention over the paged latent cache (src/infer/kv_cache.h layout), on the GPU.
// Plain C++ header (no CUDA types) so the engine, tests and benchmarks can include it.
#pragma once
#include <string>
#include <vector>

#include "core/tensor.h"

namespace dsv3 {

// For each sequence b and head h, with rows r_t = pool row of position t (t < lengths[b]) of `layer`:
//   s_t = scale · q[b,h,:]·r_t[0:W],  out[b,h,:] = Σ_t softmax(s)_t · r_t[0:kv_lora_rank],
//   lse[b,h] = logsumexp(s) (optional).
// q is the absorbed query [q_nope·W_UK ‖ rotated q_pe] (W = kv_lora_rank + rope dims = 576 for V3).
// pool: the cache pool's storage on the device, BF16, row (block, layer, slot) at element
// ((block·layers + layer)·block_size + slot)·W; block_size must be 64. block_table[b, i] is the
// i-th block of sequence b. Every lengths[b] ≥ 1.
struct MlaDecodeArgs {
  Tensor q;            // [B, H, W] F32 (device)
  Tensor pool;         // BF16 (device), any shape holding the rows
  Tensor block_table;  // [B, max_blocks] I32 (device)
  Tensor lengths;      // [B] I32 (device)
  int64_t layers = 1, layer = 0, block_size = 64, kv_lora_rank = 512;
  int64_t max_len = 0;  // an upper bound of lengths (host side: sizes the split of the work)
  float scale = 1.0f;
  Tensor out;  // [B, H, kv_lora_rank] F32 (device)
  Tensor lse;  // [B, H] F32, optional
};
void cuda_mla_decode(const MlaDecodeArgs& a);

// The kernel shapes compiled in, for the benchmark and the tests to select explicitly;
// cuda_mla_decode picks one by head count (mla_decode_default_config). Same results up to
// floating-point summation order.
enum class MlaKernel {
  reg_p,   // warps split the scores' K and add partial scores; softmax weights stay in registers
  wgmma,   // 16 heads, one warpgroup, 64-token stages: Sᵀ and Oᵀ by wgmma with the tokens as M
};
struct MlaDecodeConfig {
  MlaKernel kernel = MlaKernel::reg_p;
  int heads_per_cta = 16;  // 16 or 64 (one sequence's heads share every row read); wgmma: 16
  int heads_per_warp = 16; // MMA row tiles of 16 per warp (reg_p: 16 or 32)
  int warps = 4;
  int stage_tokens = 32;   // tokens per cp.async pipeline stage (wgmma: 64, a whole cache block)
  int stages = 2;          // pipeline depth
  bool q_in_registers = false;  // reg_p: each warp's q fragments in registers, not q in shared memory
  int splits = 0;          // ranges of cache blocks per sequence merged afterwards; 0: chosen from the shape
};
std::vector<MlaDecodeConfig> mla_decode_configs();
MlaDecodeConfig mla_decode_default_config(int64_t heads);
std::string mla_decode_config_name(const MlaDecodeConfig& c);
// Returns the number of splits it ran with.
int64_t cuda_mla_decode_with(const MlaDecodeArgs& a, const MlaDecodeConfig& c);

}  // namespace dsv3
