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
  // Where given, the BF16 Q this kernel rounds goes out too, as [B·H, tp, DQK] (rows past T and
  // columns past dqk zero, tp a multiple of 64): the backward's operand, kept.
  __nv_bfloat16* q_keep = nullptr;
  int64_t tp = 0;
};

// Two warpgroups of 64 query rows per CTA over 64-key tiles, one tile's P·V beside the next one's
// softmax; DQK, DV the padded widths (multiples of 64: (64, 64), (128, 128), (192, 128), (256,
// 128)); S ≥ 1. Same arithmetic as the mma.sync forward: S in FP32, the online softmax in base 2, P
// rounded to BF16 for P·V.
void attention_bf16_forward_wgmma(const AttnFwdArgs& a, int dqk_w, int dv_w);

// Where the dk/dv kernels write (keys counted over B·S as tokens): dK's columns c < dk_split at
// dk[token·dk_tok + head·dk_head + c], the rest at dk2[token·dk2_tok + head·dk2_head + c − dk_split];
// dV at dv[token·dv_tok + head·dv_head + c]. Null pointers: not written. dk_split, the strides and
// the bases even (float2 stores).
struct AttnDkvOut {
  float* dk = nullptr;
  float* dk2 = nullptr;
  float* dv = nullptr;
  // BF16 destinations in place of dk and dv (the split form's BF16 dkv), same strides: the F32
  // values rounded to nearest even.
  __nv_bfloat16* dk_b = nullptr;
  __nv_bfloat16* dv_b = nullptr;
  int64_t dk_tok = 0, dk_head = 0, dk2_tok = 0, dk2_head = 0, dv_tok = 0, dv_head = 0;
  int dk_split = 0;
};

struct AttnDkvArgs {
  const __nv_bfloat16* q;     // [B·H, tp, DQK] BF16, padded with zeros
  const __nv_bfloat16* k;     // [B·H, sp, DQK]
  const __nv_bfloat16* v;     // [B·H, sp, DV]
  const __nv_bfloat16* dout;  // [B·H, tp, DV]
  const float* lse2;          // [B·H, tp] lse·log2(e), +inf on padded rows
  const float* dsum;          // [B·H, tp] D = rowsum(dO∘O)
  AttnDkvOut out;             // dK and dV
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
