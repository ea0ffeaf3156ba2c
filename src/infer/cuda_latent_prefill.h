// The generic absorbed attention for prefill rows (cuda_latent_attn_kernel.cuh's kernel is one CTA per
// query row): one CTA per group of up to Q consecutive rows of one sequence (positions p..p+Q−1) and
// 16 heads, every 32-position tile of the cache read once for all of the group's rows, the scores
// and P·V on BF16 tensor cores with q and P as two BF16 terms each (the row kernel's arithmetic, row
// for row: on finite cache rows the results are the same bits). Only the tensor-core shapes of the
// row kernel (kv_lora_rank ≤ 256, rows of ≤ 320 values, multiples of 8 / 16), one split per group.
// Internal to the CUDA build: included by cuda_latent_attention.cu and cuda_latent_attn_kernel.cuh.
#pragma once
#include <cstdint>
#include <vector>

#include <cuda_bf16.h>

#include "infer/mla_absorbed.h"

namespace dsv3 {

// What both latent attention kernels read and write (the row kernel's AttnArgs extends it too).
struct LatentAttnCommon {
  const float* qcat;  // [N, nh, W]: the latent part of the absorbed query (columns < R)
  const float* qrot;  // [N, nh, qk]: q_pe at columns nope..qk
  const __nv_bfloat16* pool;
  const int32_t* meta;  // CudaLatentAttention's step metadata: lengths [N] | blocks | slots | tables [N, maxb]
  int n, maxb, nh, W, R, qk, nope;
  int64_t layers, bs, layer;
  float scale;  // softmax scale · log2 e
  float* lat;   // [N, nh, R]
};

struct LatentPrefillArgs : LatentAttnCommon {
  const int32_t* groups;  // [ngroups + 1]: first row of each group, then N (the metadata's end)
  int ngroups;
};

// The first row of each group of up to q consecutive rows of one sequence at consecutive positions
// (a prefill chunk's rows), then N.
std::vector<int32_t> latent_prefill_groups(const StepRows& rows, int q);
// One launch on cuda::stream(): grid (ngroups, head groups of 16); q is 2 or 4. Counted by
// cuda_latent_prefill_launches() (cuda_latent_attention.h, with the setting that picks q).
void launch_latent_prefill(const LatentPrefillArgs& a, int q);

}  // namespace dsv3
