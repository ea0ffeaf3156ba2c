// The generic absorbed latent attention's kernels (CudaLatentAttention, cuda_latent_attention.cu,
// launches them; included by that file only): the attention over a step's cached latent rows and the
// merge of its splits' partials.
#pragma once
#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "backend/cuda/common.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/pdl.cuh"
#include "infer/cuda_latent_prefill.h"
#include "infer/cuda_weight_vec.cuh"

namespace dsv3::cuda::latent {

// The generic absorbed attention (any latent width up to 512; V3's 512 + 64 takes cuda_mla_decode).
// One CTA of 8 warps per (split of a row's positions, row, group of 16 heads): every cached row is
// read once for all the group's heads. Per 32-position tile, widened to F32 in shared memory (the
// tensor-core path, kMma below, keeps it in BF16 and takes both products on mma.sync):
//   scores S[16 heads × 32 positions] = q·rows — each thread a 4 × 4 block over one eighth of the
//     width (lanes of a warp: 8 width slices × 4 head quads), the slices added by a reduce-scatter
//     of shuffles;
//   online softmax per head (base 2: log2 e is folded into q's scale);
//   acc[16 heads × R] += P·rows[:, :R] — each thread 4 heads × 4 (or 8) columns.
// The next tile's rows are loaded into registers while this one is computed. Splits of one row
// form a thread-block cluster and merge their partial (max, sum, acc) through distributed shared
// memory; more than 8 splits (long contexts, few rows) write partials merged by merge_kernel.
constexpr int kHg = 16;        // heads per CTA
constexpr int kT = 32;         // positions per tile
constexpr int kThreads = 256;  // 8 warps
constexpr int kQStride = 4 * kHg + 4;  // floats per 4-column chunk of q (padded: conflict-free slices)
constexpr int kMaxClusterSplits = 8;
constexpr int kMaxSplits = 64;
constexpr int kMaxColumns = 512;  // kv_lora_rank

struct AttnArgs : LatentAttnCommon {
  int splits, max_tiles;
  bool qvec;    // q readable as float4 pieces
  int mode;     // 0: one split, lat written directly; 1: cluster merge; 2: partials to part
  const float* c_new;    // with fold: this step's rows (c_kv_n [N, R], k_pe [N, P]), which
  const float* kpe_new;  // the kernel writes to the pool and reads from here instead
  bool fold;             // every row of the step is the last of its sequence (decode)
  float* part;  // mode 2: [N, nh, splits, R + 2] = (max, sum, acc)
};

enum { kDirect = 0, kCluster = 1, kPartials = 2 };

// Shared memory (floats): q chunks | tile [kT, W32] | S [kHg, kT + 1] | P [kT, kHg] | corr, max, sum
// [kHg each]; in a cluster also the members' (max, sum) [8, 2·kHg] and acc slices [8·kHg·slots·4].
__host__ __device__ inline int attn_w32(int W) { return (W + 31) & ~31; }
// With mma: q as two BF16 terms [2][kHg][W + 8] and the tile as BF16 [kT][W + 8] (32·(W + 8) floats),
// both halves' scores [2][kHg, kT + 1], P as two BF16 terms [2][kHg][kPs], then corr, max, sum.
constexpr int kPs = kT + 8;  // BF16 elements per row of P (80 bytes: conflict-free ldmatrix rows)
__host__ __device__ inline int attn_smem_floats(int W, int R, bool cluster, bool mma) {
  const int w32 = attn_w32(W), rq = (R + 3) / 4;
  const int base = mma ? 32 * (W + 8) + 2 * kHg * (kT + 1) + kHg * kPs + 3 * kHg
                       : w32 / 4 * kQStride + kT * w32 + kHg * (kT + 1) + kT * kHg + 3 * kHg;
  return cluster ? base + 2 * kHg * kMaxClusterSplits + kHg * 4 * (rq + kMaxClusterSplits - 1) : base;
}

// Eight BF16 cache values (one 16-byte vector) to F32 in shared memory.
__device__ __forceinline__ void widen8(uint4 v, float* d) {
  float f[8];
  unpack_w<__nv_bfloat16>(v, f);
  reinterpret_cast<float4*>(d)[0] = make_float4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<float4*>(d)[1] = make_float4(f[4], f[5], f[6], f[7]);
}

// Element i of step row r as the pool holds it (BF16).
__device__ __forceinline__ __nv_bfloat16 new_value(const AttnArgs& a, int r, int i) {
  return __float2bfloat16_rn(i < a.R ? a.c_new[int64_t(r) * a.R + i]
                                     : a.kpe_new[int64_t(r) * (a.W - a.R) + (i - a.R)]);
}

// CQ column quads per thread in P·V (R ≤ 256·CQ); NV 16-byte loads per thread per tile (W ≤ 64·NV
// with W % 8 == 0 takes the prefetched path, other widths load each tile synchronously).
//
// kMma (R ≤ 256, R % 8 = 0, W ≤ 320, W % 16 = 0, q readable as float4): both products on BF16 tensor
// cores (mma.sync m16n8k16, FP32 accumulators) from a BF16 tile. q and the softmax weights P enter
// as two BF16 terms each (hi + lo, split_bf16x2: 2⁻¹⁶ relative left), the cache rows are BF16
// already, so each product is F32-class. Scores: warp w takes positions 8·(w mod 4)… and half the
// width's k-steps, the halves added through shared memory; P·V: warp w takes column tiles w, w + 8,
// …. The FP32 path above spent ~2,600 instructions per warp on a tile (Nsight Compute, batch 1);
// the accumulators go through shared memory into its layout for the shared merge below.
//
// Launched as a programmatic dependent of the previous kernel (the q GEMV): everything before
// pdl_wait reads only what older kernels wrote (step metadata, block tables, cached rows), so the
// first tile's loads overlap that kernel; q and this step's c_kv_n / k_pe (with the new cache row
// they make) come after the wait, since cuda_kv_latent may run beside the q GEMV. Without fold the
// step's new rows are written by write_rows_kernel, the kernel just before: the first tile, which
// may hold them, is loaded after the wait then.
template <int CQ, int NV, bool kMma>
__global__ void __launch_bounds__(kThreads, 2) latent_attn_kernel(const AttnArgs a) {
  extern __shared__ __align__(16) float sm[];
  // A member's shared memory may be written only once the member runs: arrive now, wait before the
  // merge's remote stores (no member returns in between).
  if (a.mode == kCluster) asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  const int W = a.W, R = a.R, w32 = attn_w32(W), nc = w32 / 4, rq = (R + 3) >> 2;
  float* qs = sm;
  float* tile = qs + nc * kQStride;
  float* ss = tile + kT * w32;
  float* ps = ss + kHg * (kT + 1);
  float* st = ps + kT * kHg;  // corr | max | sum, kHg each
  const int sq = W + 8;       // kMma: BF16 elements per row of q and of the tile (16-byte multiple)
  __nv_bfloat16* qh = reinterpret_cast<__nv_bfloat16*>(sm);
  __nv_bfloat16* ql = qh + kHg * sq;
  __nv_bfloat16* t16 = ql + kHg * sq;
  __nv_bfloat16* ph = reinterpret_cast<__nv_bfloat16*>(sm + 32 * sq + 2 * kHg * (kT + 1));
  __nv_bfloat16* pl = ph + kHg * kPs;
  if constexpr (kMma) {
    ss = sm + 32 * sq;  // [2][kHg][kT + 1]: the two halves of the width
    st = sm + 32 * sq + 2 * kHg * (kT + 1) + kHg * kPs;
  }
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int split = blockIdx.x, r = blockIdx.y, h0 = blockIdx.z * kHg;
  const int bs = int(a.bs);
  const bool vec = (W & 7) == 0 && W <= 64 * NV;
  const int V = W >> 3;  // 16-byte pieces per row
  // The split's tiles from the longest row (no wait for this row's length), clipped to it below.
  const int tb = int(int64_t(split) * a.max_tiles / a.splits);
  int te = int(int64_t(split + 1) * a.max_tiles / a.splits);
  const int32_t* table = a.meta + 3 * a.n + int64_t(r) * a.maxb;
  const int len = a.meta[r];
  auto row_of = [&](int pos) {
    return (int64_t(table[pos / bs]) * a.layers + a.layer) * a.bs + pos % bs;
  };
  // idx / V for a tile's 16-byte pieces, through F32 up to R 256: there idx < 32·V and V ≤ 40 (rows
  // of ≤ 320 values), so (idx + ½)/V lies ≥ 1/80 from an integer, and the product's rounding
  // (< 2⁻²³ relative, idx < 1280) cannot cross one. The integer divisions (by V, and per row by the
  // block size) were a fifth of the kernel's instructions at batch 1 (Nsight Compute). The R 512
  // instance is at its 128 registers, where the leaner code spills; it keeps them.
  constexpr bool kLean = NV <= 5;
  const float rv = 1.0f / float(max(V, 1));
  auto quot = [&](int idx) { return kLean ? __float2int_rz((float(idx) + 0.5f) * rv) : idx / V; };
  // A tile's rows into registers, all 32 positions (those past this row's end are zeroed in stash;
  // their block-table entries, within the row's maxb, exist). A tile inside one block (block size
  // a multiple of 32) takes one table entry.
  uint4 raw[NV];
  auto fetch = [&](int tl) {
    const int t0 = tl * kT;
    if (kLean && bs % kT == 0) {
      const int b = t0 / bs;
      if (b >= a.maxb) return;
      const __nv_bfloat16* base = a.pool + ((int64_t(table[b]) * a.layers + a.layer) * a.bs + (t0 - b * bs)) * W;
#pragma unroll
      for (int u = 0; u < NV; ++u) {
        const int idx = tid + u * kThreads, t = quot(idx), v = idx - t * V;
        if (idx < kT * V) raw[u] = reinterpret_cast<const uint4*>(base + int64_t(t) * W)[v];
      }
      return;
    }
#pragma unroll
    for (int u = 0; u < NV; ++u) {
      const int idx = tid + u * kThreads, t = quot(idx), v = idx - t * V;
      if (idx < kT * V && (t0 + t) / bs < a.maxb)
        raw[u] = reinterpret_cast<const uint4*>(a.pool + row_of(t0 + t) * W)[v];
    }
  };
  const bool first = vec && tb < te;
  if (first && a.fold) fetch(tb);
  const int tiles = (len + kT - 1) / kT;
  te = min(te, tiles);
  for (int idx = tid; !kMma && idx < kT * (w32 - W); idx += kThreads) {  // padding columns, never loaded
    const int t = idx / (w32 - W);
    tile[t * w32 + W + (idx - t * (w32 - W))] = 0.0f;
  }
  pdl_wait();
  if (first && !a.fold) fetch(tb);
  pdl_trigger();
  // With fold, the CTA holding the row's last position takes it from c_kv_n / k_pe (rounded as the
  // pool holds it) and, for head group 0, writes it to the pool.
  const bool new_row = a.fold && tb < te && te == tiles;
  uint4 newp = make_uint4(0, 0, 0, 0);
  if (new_row && vec && tid < V) {
    uint32_t w[4];
#pragma unroll
    for (int e = 0; e < 4; ++e)
      w[e] = uint32_t(__bfloat16_as_ushort(new_value(a, r, 8 * tid + 2 * e))) |
             (uint32_t(__bfloat16_as_ushort(new_value(a, r, 8 * tid + 2 * e + 1))) << 16);
    newp = make_uint4(w[0], w[1], w[2], w[3]);
    if (blockIdx.z == 0) reinterpret_cast<uint4*>(const_cast<__nv_bfloat16*>(a.pool) + row_of(len - 1) * W)[tid] = newp;
  } else if (new_row && !vec && blockIdx.z == 0) {
    __nv_bfloat16* dst = const_cast<__nv_bfloat16*>(a.pool) + row_of(len - 1) * W;
    for (int i = tid; i < W; i += kThreads) dst[i] = new_value(a, r, i);
  }

  // The tile in shared memory, as F32 (kMma: BF16, as the pool holds it); rows past the end are zero
  // (their weights are 0, and 0·garbage could be NaN).
  auto put8 = [&](int t, int v, uint4 x) {  // 8 values of tile row t from column 8·v
    if (kMma)
      *reinterpret_cast<uint4*>(t16 + t * sq + 8 * v) = x;
    else
      widen8(x, tile + t * w32 + 8 * v);
  };
  auto stash = [&](int tl) {
    const int t0 = tl * kT, cnt = min(kT, len - t0);
    if (kMma || vec) {
#pragma unroll
      for (int u = 0; u < NV; ++u) {
        const int idx = tid + u * kThreads;
        if (idx < kT * V) {
          const int t = quot(idx), v = idx - t * V;
          if (!(new_row && t0 + t == len - 1)) put8(t, v, t < cnt ? raw[u] : make_uint4(0, 0, 0, 0));
        }
      }
      if (new_row && len - 1 - t0 < kT && tid < V) put8(len - 1 - t0, tid, newp);
    } else {
      for (int idx = tid; idx < kT * W; idx += kThreads) {
        const int t = idx / W, i = idx - t * W, pos = t0 + t;
        tile[t * w32 + i] = t >= cnt                  ? 0.0f
                            : new_row && pos == len - 1 ? __bfloat162float(new_value(a, r, i))
                                                        : __bfloat162float(a.pool[row_of(pos) * W + i]);
      }
    }
  };
  // q (scaled) into its chunks: the loads of a batch are all issued before their stores.
  if (kMma || a.qvec) {  // float4 pieces: W, R, qk and nope multiples of 4 (kMma: rows of two BF16 terms)
    const int w4 = (kMma ? W : w32) / 4, qtotal = kHg * w4;
    for (int base = tid; base < qtotal; base += NV * kThreads) {
      float4 qv[NV];
#pragma unroll
      for (int u = 0; u < NV; ++u) {
        const int idx = base + u * kThreads, hh = idx / w4, k = 4 * (idx - hh * w4), h = h0 + hh;
        qv[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (idx < qtotal && h < a.nh && k < W) {
          const int64_t rh = int64_t(r) * a.nh + h;
          qv[u] = *reinterpret_cast<const float4*>(k < R ? a.qcat + rh * W + k
                                                         : a.qrot + rh * a.qk + a.nope + (k - R));
        }
      }
#pragma unroll
      for (int u = 0; u < NV; ++u) {
        const int idx = base + u * kThreads, hh = idx / w4, k = 4 * (idx - hh * w4);
        if (idx >= qtotal) continue;
        const float4 v = make_float4(qv[u].x * a.scale, qv[u].y * a.scale, qv[u].z * a.scale, qv[u].w * a.scale);
        if (kMma) {
          uint2 hi, lo;
          split_bf16x2(v.x, v.y, hi.x, lo.x);
          split_bf16x2(v.z, v.w, hi.y, lo.y);
          *reinterpret_cast<uint2*>(qh + hh * sq + k) = hi;
          *reinterpret_cast<uint2*>(ql + hh * sq + k) = lo;
        } else {
          *reinterpret_cast<float4*>(qs + (k >> 2) * kQStride + hh * 4) = v;
        }
      }
    }
  } else {
    const int total = kHg * w32;
    for (int base = tid; base < total; base += 8 * kThreads) {
      float v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int idx = base + u * kThreads, hh = idx / w32, k = idx - hh * w32, h = h0 + hh;
        v[u] = 0.0f;
        if (idx < total && h < a.nh && k < W) {
          const int64_t rh = int64_t(r) * a.nh + h;
          v[u] = k < R ? a.qcat[rh * W + k] : a.qrot[rh * a.qk + a.nope + (k - R)];
        }
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int idx = base + u * kThreads, hh = idx / w32, k = idx - hh * w32;
        if (idx < total) qs[(k >> 2) * kQStride + hh * 4 + (k & 3)] = v[u] * a.scale;
      }
    }
  }

  const int ks = lane & 7, hq_s = lane >> 3;  // scores: width slice, head quad (positions: the warp's quad)
  const int hq = warp >> 1;                   // P·V: head quad
  const int cq0 = (warp & 1) * 32 + lane;     // P·V: first column quad (then + 64)
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};  // heads 2·warp + j
  float o[CQ][4][4];
#pragma unroll
  for (int u = 0; u < CQ; ++u)
#pragma unroll
    for (int hh = 0; hh < 4; ++hh)
#pragma unroll
      for (int i = 0; i < 4; ++i) o[u][hh][i] = 0.0f;
  // kMma: this warp's P·V accumulators, column tiles warp + 8j (heads g, g + 8; columns 2·t4, +1).
  const int g = lane >> 2, t4 = lane & 3;
  float om[4][4] = {};

  for (int tl = tb; tl < te; ++tl) {
    const int cnt = min(kT, len - tl * kT);
    __syncthreads();  // the previous tile is no longer read
    stash(tl);
    __syncthreads();
    if (vec && tl + 1 < te) fetch(tl + 1);
    if constexpr (kMma) {
      const int nt = warp & 3, kh = warp >> 2, nks = W >> 4, half = (nks + 1) >> 1;
      const int s_end = min(nks, (kh + 1) * half);
      const int arow = (lane & 15) * sq + ((lane >> 4) << 3);
      const __nv_bfloat16* brow = t16 + (8 * nt + (lane & 7)) * sq + (((lane >> 3) & 1) << 3);
      float chi[4] = {}, clo[4] = {};
      for (int ks16 = kh * half; ks16 < s_end; ++ks16) {
        uint32_t ah[4], al[4], bw[2];
        ldmatrix_x4(ah, qh + arow + 16 * ks16);
        ldmatrix_x4(al, ql + arow + 16 * ks16);
        ldmatrix_x2(bw, brow + 16 * ks16);
        mma_bf16(chi, ah, bw[0], bw[1]);
        mma_bf16(clo, al, bw[0], bw[1]);
      }
      float* sp = ss + kh * kHg * (kT + 1) + 8 * nt + 2 * t4;
      sp[g * (kT + 1)] = chi[0] + clo[0];
      sp[g * (kT + 1) + 1] = chi[1] + clo[1];
      sp[(g + 8) * (kT + 1)] = chi[2] + clo[2];
      sp[(g + 8) * (kT + 1) + 1] = chi[3] + clo[3];
    } else {
      float acc[4][4];
#pragma unroll
      for (int hh = 0; hh < 4; ++hh)
#pragma unroll
        for (int u = 0; u < 4; ++u) acc[hh][u] = 0.0f;
      for (int c = ks; c < nc; c += 8) {
        float4 qv[4], rv[4];
#pragma unroll
        for (int hh = 0; hh < 4; ++hh) qv[hh] = *reinterpret_cast<const float4*>(qs + c * kQStride + (4 * hq_s + hh) * 4);
#pragma unroll
        for (int u = 0; u < 4; ++u) rv[u] = *reinterpret_cast<const float4*>(tile + (4 * warp + u) * w32 + 4 * c);
#pragma unroll
        for (int hh = 0; hh < 4; ++hh)
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            float d = acc[hh][u];
            d = fmaf(qv[hh].x, rv[u].x, d);
            d = fmaf(qv[hh].y, rv[u].y, d);
            d = fmaf(qv[hh].z, rv[u].z, d);
            d = fmaf(qv[hh].w, rv[u].w, d);
            acc[hh][u] = d;
          }
      }
      // Reduce-scatter over the 8 slices (lane bits 2, 1, 0): lane keeps head 2·b2 + b0 of its quad and
      // positions 2·b1, 2·b1 + 1 of the warp's quad.
      const int b2 = (ks >> 2) & 1, b1 = (ks >> 1) & 1, b0 = ks & 1;
      float x1[2][4];
#pragma unroll
      for (int hk = 0; hk < 2; ++hk)
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const float keep = b2 ? acc[2 + hk][u] : acc[hk][u], give = b2 ? acc[hk][u] : acc[2 + hk][u];
          x1[hk][u] = keep + __shfl_xor_sync(0xffffffffu, give, 4);
        }
      float x2[2][2];
#pragma unroll
      for (int hk = 0; hk < 2; ++hk)
#pragma unroll
        for (int uk = 0; uk < 2; ++uk) {
          const float keep = b1 ? x1[hk][2 + uk] : x1[hk][uk], give = b1 ? x1[hk][uk] : x1[hk][2 + uk];
          x2[hk][uk] = keep + __shfl_xor_sync(0xffffffffu, give, 2);
        }
      float x3[2];
#pragma unroll
      for (int uk = 0; uk < 2; ++uk) {
        const float keep = b0 ? x2[1][uk] : x2[0][uk], give = b0 ? x2[0][uk] : x2[1][uk];
        x3[uk] = keep + __shfl_xor_sync(0xffffffffu, give, 1);
      }
      {
        const int hh = 4 * hq_s + 2 * b2 + b0, t = 4 * warp + 2 * b1;
        ss[hh * (kT + 1) + t] = x3[0];
        ss[hh * (kT + 1) + t + 1] = x3[1];
      }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int hh = 2 * warp + j;
      const float sc = lane >= cnt ? -INFINITY
                       : kMma     ? ss[hh * (kT + 1) + lane] + ss[(kHg + hh) * (kT + 1) + lane]
                                  : ss[hh * (kT + 1) + lane];
      const float mnew = fmaxf(m_run[j], warp_max(sc));
      const float corr = m_run[j] == -INFINITY ? 0.0f : exp2f(m_run[j] - mnew);
      const float p = lane < cnt ? exp2f(sc - mnew) : 0.0f;
      l_run[j] = l_run[j] * corr + warp_sum(p);
      m_run[j] = mnew;
      if (kMma) {
        const __nv_bfloat16 hi = __float2bfloat16_rn(p);
        ph[hh * kPs + lane] = hi;
        pl[hh * kPs + lane] = __float2bfloat16_rn(p - __bfloat162float(hi));
      } else {
        ps[lane * kHg + hh] = p;
      }
      if (lane == 0) st[hh] = corr;
    }
    __syncthreads();
    if constexpr (kMma) {
      const float cg = st[g], cg8 = st[g + 8];
      uint32_t pah[2][4], pal[2][4];
#pragma unroll
      for (int k2 = 0; k2 < 2; ++k2) {
        ldmatrix_x4(pah[k2], ph + (lane & 15) * kPs + 16 * k2 + ((lane >> 4) << 3));
        ldmatrix_x4(pal[k2], pl + (lane & 15) * kPs + 16 * k2 + ((lane >> 4) << 3));
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int nt = warp + 8 * j;
        if (8 * nt >= R) break;
        om[j][0] *= cg;
        om[j][1] *= cg;
        om[j][2] *= cg8;
        om[j][3] *= cg8;
        uint32_t bv[4];  // rows (positions) 0–7, 8–15, 16–23, 24–31 of the tile's columns 8·nt…
        ldmatrix_x4_trans(bv, t16 + lane * sq + 8 * nt);
        mma_bf16(om[j], pah[0], bv[0], bv[1]);
        mma_bf16(om[j], pal[0], bv[0], bv[1]);
        mma_bf16(om[j], pah[1], bv[2], bv[3]);
        mma_bf16(om[j], pal[1], bv[2], bv[3]);
      }
    } else {
      const float4 cr = *reinterpret_cast<const float4*>(st + 4 * hq);
      const float crs[4] = {cr.x, cr.y, cr.z, cr.w};
#pragma unroll
      for (int u = 0; u < CQ; ++u)
#pragma unroll
        for (int hh = 0; hh < 4; ++hh)
#pragma unroll
          for (int i = 0; i < 4; ++i) o[u][hh][i] *= crs[hh];
      for (int t = 0; t < cnt; ++t) {
        const float4 pv = *reinterpret_cast<const float4*>(ps + t * kHg + 4 * hq);
        const float pr[4] = {pv.x, pv.y, pv.z, pv.w};
#pragma unroll
        for (int u = 0; u < CQ; ++u) {
          const int cq = cq0 + 64 * u;
          if (cq >= rq) continue;
          const float4 rv = *reinterpret_cast<const float4*>(tile + t * w32 + 4 * cq);
#pragma unroll
          for (int hh = 0; hh < 4; ++hh) {
            o[u][hh][0] = fmaf(pr[hh], rv.x, o[u][hh][0]);
            o[u][hh][1] = fmaf(pr[hh], rv.y, o[u][hh][1]);
            o[u][hh][2] = fmaf(pr[hh], rv.z, o[u][hh][2]);
            o[u][hh][3] = fmaf(pr[hh], rv.w, o[u][hh][3]);
          }
        }
      }
    }
  }
  if constexpr (kMma) {  // the accumulators into the FP32 path's layout, through the tile's memory
    float* of = reinterpret_cast<float*>(t16);  // [kHg][R]
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = 8 * (warp + 8 * j) + 2 * t4;
      if (col >= R) break;
      *reinterpret_cast<float2*>(of + g * R + col) = make_float2(om[j][0], om[j][1]);
      *reinterpret_cast<float2*>(of + (g + 8) * R + col) = make_float2(om[j][2], om[j][3]);
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < CQ; ++u) {
      const int cq = cq0 + 64 * u;
      if (cq >= rq) continue;
#pragma unroll
      for (int hh = 0; hh < 4; ++hh) {
        const float4 v = *reinterpret_cast<const float4*>(of + (4 * hq + hh) * R + 4 * cq);
        o[u][hh][0] = v.x;
        o[u][hh][1] = v.y;
        o[u][hh][2] = v.z;
        o[u][hh][3] = v.w;
      }
    }
  }

  // Four values of the output row (head h, columns 4·cq..), as float4 when R allows.
  auto put = [&](float* dst, int cq, float4 v) {
    if ((R & 3) == 0) {
      *reinterpret_cast<float4*>(dst + 4 * cq) = v;
    } else {
      const float vv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (4 * cq + i < R) dst[4 * cq + i] = vv[i];
    }
  };
  if (a.mode == kCluster) {
    // Each member pushes its (max, sum) to every member and the acc of column quad cq to member
    // cq mod splits (remote stores), one cluster barrier, then each merges its columns locally.
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    const int ns = a.splits, me = int(cluster.block_rank()), slots = (rq + ns - 1) / ns;
    float* rml = st + 3 * kHg;           // [split][max kHg | sum kHg]
    float* rbuf = rml + 2 * kHg * kMaxClusterSplits;  // [split][kHg][slots] float4
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");  // every member is running
    if (lane < ns) {  // lane k sends the warp's two heads to member k
      float* d = cluster.map_shared_rank(rml, lane) + me * 2 * kHg;
      *reinterpret_cast<float2*>(d + 2 * warp) = make_float2(m_run[0], m_run[1]);
      *reinterpret_cast<float2*>(d + kHg + 2 * warp) = make_float2(l_run[0], l_run[1]);
    }
#pragma unroll
    for (int u = 0; u < CQ; ++u) {
      const int cq = cq0 + 64 * u;
      if (cq >= rq) continue;
      float* d = cluster.map_shared_rank(rbuf, cq % ns);
#pragma unroll
      for (int hh = 0; hh < 4; ++hh)
        *reinterpret_cast<float4*>(d + ((me * kHg + 4 * hq + hh) * slots + cq / ns) * 4) =
            make_float4(o[u][hh][0], o[u][hh][1], o[u][hh][2], o[u][hh][3]);
    }
    cluster.sync();
    for (int idx = tid; idx < kHg * slots; idx += kThreads) {
      const int hh = idx / slots, slot = idx - hh * slots, cq = me + ns * slot, h = h0 + hh;
      if (cq >= rq || h >= a.nh) continue;
      float mx = -INFINITY;
      for (int k = 0; k < ns; ++k) mx = fmaxf(mx, rml[k * 2 * kHg + hh]);
      float l = 0.0f;
      float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      for (int k = 0; k < ns; ++k) {
        const float mk = rml[k * 2 * kHg + hh];
        const float w = mk == -INFINITY ? 0.0f : exp2f(mk - mx);  // -inf: an empty split
        l = fmaf(w, rml[k * 2 * kHg + kHg + hh], l);
        const float4 ak = *reinterpret_cast<const float4*>(rbuf + ((k * kHg + hh) * slots + slot) * 4);
        v.x = fmaf(w, ak.x, v.x);
        v.y = fmaf(w, ak.y, v.y);
        v.z = fmaf(w, ak.z, v.z);
        v.w = fmaf(w, ak.w, v.w);
      }
      const float inv = 1.0f / l;
      put(a.lat + (int64_t(r) * a.nh + h) * R, cq, make_float4(v.x * inv, v.y * inv, v.z * inv, v.w * inv));
    }
    return;
  }
  if (lane == 0)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      st[kHg + 2 * warp + j] = m_run[j];
      st[2 * kHg + 2 * warp + j] = l_run[j];
    }
  __syncthreads();
#pragma unroll
  for (int hh = 0; hh < 4; ++hh) {
    const int h = h0 + 4 * hq + hh;
    if (h >= a.nh) continue;
    if (a.mode == kDirect) {
      const float inv = 1.0f / st[2 * kHg + 4 * hq + hh];
#pragma unroll
      for (int u = 0; u < CQ; ++u) {
        const int cq = cq0 + 64 * u;
        if (cq < rq)
          put(a.lat + (int64_t(r) * a.nh + h) * R, cq,
              make_float4(o[u][hh][0] * inv, o[u][hh][1] * inv, o[u][hh][2] * inv, o[u][hh][3] * inv));
      }
    } else {
      float* pr = a.part + ((int64_t(r) * a.nh + h) * a.splits + split) * (R + 2);
      if ((warp & 1) == 0 && lane == 0) {
        pr[0] = st[kHg + 4 * hq + hh];
        pr[1] = st[2 * kHg + 4 * hq + hh];
      }
#pragma unroll
      for (int u = 0; u < CQ; ++u) {
        const int cq = cq0 + 64 * u;
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (4 * cq + i < R) pr[2 + 4 * cq + i] = o[u][hh][i];
      }
    }
  }
}

// lat[r, h] = Σ_s 2^{m_s − M}·acc_s / Σ_s 2^{m_s − M}·l_s over the splits (empty splits: m = −inf).
__global__ void merge_kernel(const float* part, int splits, int R, float* lat) {
  __shared__ float w[kMaxSplits];
  __shared__ float inv_l;
  const int64_t rh = blockIdx.x;
  const float* p = part + rh * splits * (R + 2);
  if (threadIdx.x < 32) {
    float mx = -INFINITY;
    for (int s = threadIdx.x; s < splits; s += 32) mx = fmaxf(mx, p[s * (R + 2)]);
    mx = warp_max(mx);
    float l = 0.0f;
    for (int s = threadIdx.x; s < splits; s += 32) {
      const float ms = p[s * (R + 2)];
      w[s] = ms == -INFINITY ? 0.0f : exp2f(ms - mx);
      l += w[s] * p[s * (R + 2) + 1];
    }
    l = warp_sum(l);
    if (threadIdx.x == 0) inv_l = 1.0f / l;
  }
  __syncthreads();
  for (int c = threadIdx.x; c < R; c += blockDim.x) {
    float v = 0.0f;
    for (int s = 0; s < splits; ++s) v = fmaf(w[s], p[s * (R + 2) + 2 + c], v);
    lat[rh * R + c] = v * inv_l;
  }
}

}  // namespace dsv3::cuda::latent
