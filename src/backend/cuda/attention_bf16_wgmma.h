// Internal to the CUDA backend: the BF16 training attention's forward and dk/dv kernels on Hopper's
// wgmma (attention_bf16.cu rounds the operands into padded per-head copies and calls them; its
// mma.sync kernels stay beside them).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

namespace dsv3::cuda {

struct AttnFwdArgs {
  const float* q;           // [B, T, H, dqk] F32, rounded to BF16 by the kernel
  const __nv_bfloat16* k;   // [B·H, sp, DQK] BF16, rows past S and columns past dqk zero
  const __nv_bfloat16* v;   // [B·H, sp, DV]
  float* out;               // [B, T, H, dv]
  float* lse;               // [B, H, T] or null
  int64_t b, t, s, h, dqk, dv, sp;
  float scale;
  bool causal;
  int64_t q_off;
};

// Two warpgroups of 64 query rows per CTA over 64-key tiles, one tile's P·V beside the next one's
// softmax; DQK, DV the padded widths (multiples of 64: (64, 64), (128, 128), (192, 128), (256,
// 128)); S ≥ 1. Same arithmetic as the mma.sync forward: S in FP32, the online softmax in base 2, P
// rounded to BF16 for P·V.
void attention_bf16_forward_wgmma(const AttnFwdArgs& a, int dqk_w, int dv_w);

struct AttnDkvArgs {
  const __nv_bfloat16* q;     // [B·H, tp, DQK] BF16, padded with zeros
  const __nv_bfloat16* k;     // [B·H, sp, DQK]
  const __nv_bfloat16* v;     // [B·H, sp, DV]
  const __nv_bfloat16* dout;  // [B·H, tp, DV]
  const float* lse2;          // [B·H, tp] lse·log2(e), +inf on padded rows
  const float* dsum;          // [B·H, tp] D = rowsum(dO∘O)
  float* dk;                  // [B, S, H, dqk] or null
  float* dv_out;              // [B, S, H, dv] or null
  __nv_bfloat16* dst;         // [B·H, sp, tp] dSᵀ for the dQ matmul, or null
  int64_t dq_rows;            // the matmul's blocks of query rows (what the zeros must cover)
  int64_t b, t, s, h, dqk, dv, tp, sp;
  float scale;
  bool causal;
  int64_t q_off;
};

// One warpgroup per 64 keys over query tiles of 32, two CTAs per SM: Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ
// (m64n32k16, both operands in shared memory), P and dS in the accumulators, then dV += Pᵀ·dO
// and dK += dSᵀ·Q with Pᵀ, dSᵀ as register A operands and dO, Q read N-major. The mma.sync dk/dv
// kernel's arithmetic and its dSᵀ stores (the same BF16 values), in another summation order.
void attention_bf16_dkv_wgmma(const AttnDkvArgs& a, int dqk_w, int dv_w);

}  // namespace dsv3::cuda
