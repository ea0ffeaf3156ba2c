// Absorbed-MLA decode (flash-decoding over the paged latent cache) on BF16 tensor cores.
// A CTA takes one sequence, a group of heads (16 or 64) and a contiguous range of its cache blocks
// (a split), so every latent row is read from HBM once for all heads of the group (MLA's K and V
// are the same row). Rows stream through a ring of stages (inside one cache block, so contiguous in
// the pool) by cp.async, invalid rows zero-filled. Two kernels:
// - mla_wgmma_kernel (the default up to 32 heads): 16 heads, one warpgroup, whole 64-token blocks
//   as stages, the scores and the output transposed so that the tokens are wgmma's M = 64.
// - mla_reg_kernel (above 32 heads, 64-head CTAs): mma.sync m16n8k16 with the heads as M; per stage
//   the scores S[heads, tokens] = Q[heads, 576] · rowsᵀ with 576 split over the warps of a head
//   group (partial scores added through shared memory), the online softmax in base 2 in registers,
//   then O[heads, 512] += P · rows[:, 0:512], the 512 columns split over the same warps.
// With one split the CTA writes out and lse itself; otherwise a second kernel merges the splits'
// partial sums (merging in the last CTA of each sequence, or inside a thread-block cluster through
// distributed shared memory, measured no faster on the H200: docs/cuda.md).
// Operands are BF16 (q and the softmax weights are rounded to BF16), accumulation FP32; the
// tolerance is the BF16-operand one.
#include <algorithm>
#include <cmath>

#include "backend/cuda/common.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/wgmma.cuh"
#include "backend/cuda/mla_decode.h"

namespace dsv3 {
using namespace cuda;

namespace {

constexpr int kBlock = 64;  // tokens per cache block (the paged cache's block size)
constexpr int kW = 576;     // row width: kv_lora_rank 512 + rope 64
constexpr int kR = 512;
constexpr int kPad = 8;     // BF16 elements of row padding: 16 bytes, so ldmatrix rows avoid bank conflicts
constexpr float kLog2e = 1.4426950408889634f;
struct Shape_ {
  int64_t b, h, w, r, layers, layer, max_blocks, splits, blocks_per_split;
};

// The CTA's result for heads hl, hl + 8 (CTA-local) and kNT 8-column tiles from column col0: with
// one split, out = acc / sum and lse; otherwise the unnormalised partials for the merge kernel.
template <int kNT>
__device__ __forceinline__ void store_result(const float (&acc)[kNT][4], float m_lo, float m_hi, float sum_lo,
                                             float sum_hi, bool write_ml, int hl, int nh, int col0, int t4,
                                             const Shape_& s, int64_t b, int64_t split, int64_t h0, float* part_o,
                                             float* part_m, float* part_l, float* out, float* lse) {
  const bool has_lo = hl < nh, has_hi = hl + 8 < nh;
  if (s.splits == 1) {
    // Every sequence has a token, so the sums are positive.
    const float inv_lo = 1.0f / sum_lo, inv_hi = 1.0f / sum_hi;
    float* o_lo = out + (b * s.h + h0 + hl) * kR;
    float* o_hi = o_lo + 8 * kR;
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
      const int col = col0 + n * 8 + 2 * t4;
      if (has_lo) *reinterpret_cast<float2*>(o_lo + col) = make_float2(acc[n][0] * inv_lo, acc[n][1] * inv_lo);
      if (has_hi) *reinterpret_cast<float2*>(o_hi + col) = make_float2(acc[n][2] * inv_hi, acc[n][3] * inv_hi);
    }
    if (lse && write_ml) {
      if (has_lo) lse[b * s.h + h0 + hl] = m_lo / kLog2e + logf(sum_lo);
      if (has_hi) lse[b * s.h + h0 + hl + 8] = m_hi / kLog2e + logf(sum_hi);
    }
    return;
  }
  const int64_t base = (b * s.splits + split) * s.h + h0;
  if (write_ml) {
    if (has_lo) {
      part_m[base + hl] = m_lo;
      part_l[base + hl] = sum_lo;
    }
    if (has_hi) {
      part_m[base + hl + 8] = m_hi;
      part_l[base + hl + 8] = sum_hi;
    }
  }
  float* o_lo = part_o + (base + hl) * kR;
  float* o_hi = o_lo + 8 * kR;
#pragma unroll
  for (int n = 0; n < kNT; ++n) {
    const int col = col0 + n * 8 + 2 * t4;
    if (has_lo) *reinterpret_cast<float2*>(o_lo + col) = make_float2(acc[n][0], acc[n][1]);
    if (has_hi) *reinterpret_cast<float2*>(o_hi + col) = make_float2(acc[n][2], acc[n][3]);
  }
}

constexpr int kOS = kR + 8;  // floats per head row of O staged in shared memory (padding: fewer bank conflicts)

// The result of a 16-head CTA from its shared memory: O unnormalised [16][kOS], then 16 maxima
// (base 2) and 16 sums. One split writes out and lse, more write their partials for
// mla_merge_kernel. Called by every thread of the CTA.
template <int kThreads>
__device__ __forceinline__ void finish_from_smem(float* smem, const Shape_& s, int64_t b, int64_t split, int64_t h0,
                                                 int nh, int tid, float* part_o, float* part_m, float* part_l,
                                                 float* out, float* lse) {
  const float* ml = smem + 16 * kOS;
  __syncthreads();
  const int64_t base = (b * s.splits + split) * s.h + h0;
  for (int i = tid; i < nh * (kR / 4); i += kThreads) {
    const int h = i / (kR / 4), c = (i % (kR / 4)) * 4;
    float4 v = *reinterpret_cast<const float4*>(smem + h * kOS + c);
    if (s.splits == 1) {
      const float inv = 1.0f / ml[16 + h];
      v = make_float4(v.x * inv, v.y * inv, v.z * inv, v.w * inv);
      *reinterpret_cast<float4*>(out + (b * s.h + h0 + h) * kR + c) = v;
      if (lse && c == 0) lse[b * s.h + h0 + h] = ml[h] / kLog2e + logf(ml[16 + h]);
    } else {
      *reinterpret_cast<float4*>(part_o + (base + h) * kR + c) = v;
      if (c == 0) {
        part_m[base + h] = ml[h];
        part_l[base + h] = ml[16 + h];
      }
    }
  }
}

// Stage st of a sequence's token range [tok0, tok1) (kT tokens, inside one cache block, so its rows
// are contiguous in the pool) into a padded shared buffer by cp.async; rows past tok1 are
// zero-filled. Warp w copies rows w, w + warps, …: 72 pieces of 16 bytes per row, lanes 0-31, 32-63,
// then 64-71, so every address is a per-stage base plus a constant.
// pb: the stage's pool block (block_table entry), looked up by the caller ahead of time.
template <int kT, int kThreads>
__device__ __forceinline__ void load_rows(__nv_bfloat16* dst, const __nv_bfloat16* pool, int64_t pb,
                                          const Shape_& s, int64_t tok0, int64_t tok1, int64_t st, int tid) {
  constexpr int kWarps = kThreads / 32, ws = kW + kPad;
  static_assert(kT % kWarps == 0, "rows per warp");
  const int lane = tid & 31, warp = tid >> 5;
  const int64_t t_first = tok0 + st * kT;
  const __nv_bfloat16* src =
      pool + (((pb * s.layers + s.layer) * kBlock) + t_first % kBlock) * kW + warp * kW + lane * 8;
  dst += warp * ws + lane * 8;
  const int valid_rows = int(tok1 - t_first < kT ? tok1 - t_first : kT);
#pragma unroll
  for (int i = 0; i < kT / kWarps; ++i) {
    const bool v = warp + i * kWarps < valid_rows;
    cp_async16(dst + i * kWarps * ws, src + i * kWarps * kW, v);
    cp_async16(dst + i * kWarps * ws + 256, src + i * kWarps * kW + 256, v);
    if (lane < 8) cp_async16(dst + i * kWarps * ws + 512, src + i * kWarps * kW + 512, v);
  }
}

// q[b, h0 .. h0 + kHeads) → BF16 rows of shared memory (heads past nh are zero rows).
template <int kHeads, int kThreads>
__device__ __forceinline__ void stage_q(__nv_bfloat16* qs, const float* q, const Shape_& s, int64_t b, int64_t h0,
                                        int nh, int tid) {
  constexpr int ws = kW + kPad;
  for (int i = tid; i < kHeads * (kW / 4); i += kThreads) {
    const int h = i / (kW / 4), j = (i - h * (kW / 4)) * 4;
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (h < nh) v = *reinterpret_cast<const float4*>(q + (b * s.h + h0 + h) * kW + j);
    *reinterpret_cast<uint32_t*>(qs + h * ws + j) = pack_bf16(v.x, v.y);
    *reinterpret_cast<uint32_t*>(qs + h * ws + j + 2) = pack_bf16(v.z, v.w);
  }
}

// The register-P kernel: warps form kMG head groups (kMW head tiles of 16 per warp, so each B
// fragment feeds kMW MMAs) × kWN. The kWN warps of a head group split the scores' K = 576 (36
// k-steps, as evenly as they divide) over all kT tokens of the stage and add their partial scores
// through shared memory in a fixed order, so every warp of the group holds the same full scores:
// maxima, softmax weights and row sums stay in registers (no maxima exchange, no weights through
// shared memory), and the weights are the A operand of P·V directly (two m16n8 accumulator tiles
// are one m16n8k16 A fragment). For P·V the kWN warps split the 512 output columns.
// kQR: each warp keeps the A fragments of its k-steps of q in registers (9 k-steps, 36 registers
// with 4 warps) instead of reading them from a shared copy of q every stage: no q in shared memory,
// no ldmatrix for A.
template <int kMG, int kMW, int kWN, int kT, int kS, bool kQR> struct Reg {
  static constexpr int kHeads = 16 * kMG * kMW, kThreads = 32 * kMG * kWN;
  static constexpr int kTiles = kT / 8, kSteps = kW / 16;
  static constexpr int kKS = (kSteps + kWN - 1) / kWN;  // k-steps of the first kSteps % kWN warps (others one less)
  static constexpr int kCols = kR / kWN, kNT = kCols / 8;
  static constexpr int ws = kW + kPad;
  static constexpr size_t smem = (size_t(kQR ? 0 : kHeads) * ws + size_t(kS) * kT * ws) * 2 +
                                 (kWN > 1 ? size_t(kMG) * kWN * kMW * kTiles * 32 * sizeof(float4) : 0);
  // CTAs per SM the shared memory allows (228 KB per SM, 1 KB reserved per CTA), at most 3: the
  // register budget the compiler is held to.
  static constexpr int kPerSm = 233472 / (smem + 1536) < 3 ? int(233472 / (smem + 1536)) : 3;
  static_assert(kR % kWN == 0 && kBlock % kT == 0 && kT % 16 == 0 && kNT % 2 == 0 && kS >= 2,
                "pipeline shape");
};

template <int kMG, int kMW, int kWN, int kT, int kS, bool kQR>
__global__ void __launch_bounds__(Reg<kMG, kMW, kWN, kT, kS, kQR>::kThreads, Reg<kMG, kMW, kWN, kT, kS, kQR>::kPerSm)
    mla_reg_kernel(const float* q, const __nv_bfloat16* pool, const int32_t* table, const int32_t* lengths,
                   Shape_ s, float scale_log2, float* part_o, float* part_m, float* part_l, float* out, float* lse) {
  using P = Reg<kMG, kMW, kWN, kT, kS, kQR>;
  constexpr int kHeads = P::kHeads, kThreads = P::kThreads, kTiles = P::kTiles, ws = P::ws;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [kHeads][ws], not with kQR
  __nv_bfloat16* kv = qs + (kQR ? 0 : kHeads) * ws;                // [kS][kT][ws]
  float4* xch = reinterpret_cast<float4*>(kv + kS * kT * ws);       // [kMG][kWN][kMW][kTiles][32 lanes]
  const int64_t hg = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int64_t h0 = hg * kHeads;
  const int nh = int(s.h - h0 < kHeads ? s.h - h0 : kHeads);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const int mg = warp % kMG, wn = warp / kMG;
  const int64_t len = lengths[b], nblk = (len + kBlock - 1) / kBlock;
  const int64_t blk0 = split * s.blocks_per_split;
  const int64_t blk1 = blk0 + s.blocks_per_split < nblk ? blk0 + s.blocks_per_split : nblk;
  const int64_t tok0 = blk0 * kBlock, tok1 = blk1 * kBlock < len ? blk1 * kBlock : len;
  const int64_t nstages = tok1 > tok0 ? (tok1 - tok0 + kT - 1) / kT : 0;

  // Pool block of stage st. The loop looks the next one up a stage ahead: a table read right before
  // the copies it addresses would stall the warp for a memory latency every stage.
  const int32_t* trow = table + b * s.max_blocks;
  auto block_of = [&](int64_t st) { return st < nstages ? int64_t(trow[(tok0 + st * kT) / kBlock]) : int64_t(0); };
#pragma unroll
  for (int i = 0; i < kS - 1; ++i) {
    if (i < nstages) load_rows<kT, kThreads>(kv + i * kT * ws, pool, block_of(i), s, tok0, tok1, i, tid);
    cp_async_commit();
  }
  int64_t pb_next = block_of(kS - 1);
  if constexpr (!kQR) stage_q<kHeads, kThreads>(qs, q, s, b, h0, nh, tid);

  float acc[kMW][P::kNT][4];
  float m_lo[kMW], m_hi[kMW], l_lo[kMW], l_hi[kMW];  // per head tile: running maxima (base 2), partial sums
#pragma unroll
  for (int i = 0; i < kMW; ++i) {
#pragma unroll
    for (int n = 0; n < P::kNT; ++n) acc[i][n][0] = acc[i][n][1] = acc[i][n][2] = acc[i][n][3] = 0.0f;
    m_lo[i] = m_hi[i] = -INFINITY;
    l_lo[i] = l_hi[i] = 0.0f;
  }
  // This warp's k-steps: [k_first, k_first + nks) of 36.
  const int nks = P::kSteps / kWN + (wn < P::kSteps % kWN ? 1 : 0);
  const int k_first = (wn * (P::kSteps / kWN) + (wn < P::kSteps % kWN ? wn : P::kSteps % kWN)) * 16;
  const __nv_bfloat16* arow = qs + (mg * kMW * 16 + (lane & 15)) * ws + (lane >> 4) * 8 + k_first;
  // kQR: the A fragments straight from q, (head g, k 2·t4), (g + 8, 2·t4), (g, 2·t4 + 8), (g + 8, 2·t4 + 8)
  // of each 16 × 16 tile, as ldmatrix would give them.
  uint32_t qa[kQR ? kMW : 1][kQR ? P::kKS : 1][4];
  if constexpr (kQR) {
#pragma unroll
    for (int i = 0; i < kMW; ++i)
#pragma unroll
      for (int kk = 0; kk < P::kKS; ++kk)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = mg * kMW * 16 + i * 16 + g + (e & 1) * 8, k = k_first + kk * 16 + 2 * t4 + (e >> 1) * 8;
          float2 v = make_float2(0.0f, 0.0f);
          if (h < nh && kk < nks) v = *reinterpret_cast<const float2*>(q + (b * s.h + h0 + h) * kW + k);
          qa[i][kk][e] = pack_bf16(v.x, v.y);
        }
  }
  // ldmatrix x4 over two token tiles: (tile j, k lo), (j, k hi), (j + 1, k lo), (j + 1, k hi).
  const int brow_off = ((lane >> 4) * 8 + (lane & 7)) * ws + ((lane >> 3) & 1) * 8 + k_first;
  const int mat = lane >> 3;
  const int vrow_off = ((mat & 1) * 8 + (lane & 7)) * ws + wn * P::kCols + (mat >> 1) * 8;

  for (int64_t st = 0; st < nstages; ++st) {
    cp_async_wait<kS - 2>();
    __syncthreads();  // stage st visible to all; every warp is done with stage st − 1's buffer and xch
    {
      const int64_t nx = st + kS - 1;
      if (nx < nstages) load_rows<kT, kThreads>(kv + int(nx % kS) * kT * ws, pool, pb_next, s, tok0, tok1, nx, tid);
      cp_async_commit();
      pb_next = block_of(nx + 1);
    }
    const __nv_bfloat16* rows = kv + int(st % kS) * kT * ws;
    float sc[kMW][kTiles][4];
#pragma unroll
    for (int i = 0; i < kMW; ++i)
#pragma unroll
      for (int j = 0; j < kTiles; ++j) sc[i][j][0] = sc[i][j][1] = sc[i][j][2] = sc[i][j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < P::kKS; ++kk) {
      if (P::kSteps % kWN != 0 && kk >= nks) break;
      uint32_t a[kMW][4];
#pragma unroll
      for (int i = 0; i < kMW; ++i) {
        if constexpr (kQR) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a[i][e] = qa[i][kk][e];
        } else {
          ldmatrix_x4(a[i], arow + i * 16 * ws + kk * 16);
        }
      }
#pragma unroll
      for (int j = 0; j < kTiles; j += 2) {
        uint32_t bb[4];
        ldmatrix_x4(bb, rows + brow_off + j * 8 * ws + kk * 16);
#pragma unroll
        for (int i = 0; i < kMW; ++i) {
          mma_bf16(sc[i][j], a[i], bb[0], bb[1]);
          mma_bf16(sc[i][j + 1], a[i], bb[2], bb[3]);
        }
      }
    }
    if constexpr (kWN > 1) {
      float4* mine = xch + (mg * kWN + wn) * kMW * kTiles * 32 + lane;
#pragma unroll
      for (int i = 0; i < kMW; ++i)
#pragma unroll
        for (int j = 0; j < kTiles; ++j)
          mine[(i * kTiles + j) * 32] = make_float4(sc[i][j][0], sc[i][j][1], sc[i][j][2], sc[i][j][3]);
      __syncthreads();
      const float4* all = xch + mg * kWN * kMW * kTiles * 32 + lane;
#pragma unroll
      for (int i = 0; i < kMW; ++i)
#pragma unroll
        for (int j = 0; j < kTiles; ++j) {
          float4 t = all[(i * kTiles + j) * 32];
#pragma unroll
          for (int w2 = 1; w2 < kWN; ++w2) {
            const float4 u = all[((w2 * kMW + i) * kTiles + j) * 32];
            t.x += u.x;
            t.y += u.y;
            t.z += u.z;
            t.w += u.w;
          }
          sc[i][j][0] = t.x;
          sc[i][j][1] = t.y;
          sc[i][j][2] = t.z;
          sc[i][j][3] = t.w;
        }
    }
    // sc[i][j][0..1]: head g of tile i, tokens 8j + 2·t4, +1 of the stage; sc[i][j][2..3]: head g + 8.
    const int nvalid = int(tok1 - (tok0 + st * kT) < kT ? tok1 - (tok0 + st * kT) : kT);
#pragma unroll
    for (int i = 0; i < kMW; ++i) {
      float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
      for (int j = 0; j < kTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          sc[i][j][e] *= scale_log2;
          if (nvalid < kT && j * 8 + 2 * t4 + (e & 1) >= nvalid) sc[i][j][e] = -INFINITY;
          if (e < 2)
            mx_lo = fmaxf(mx_lo, sc[i][j][e]);
          else
            mx_hi = fmaxf(mx_hi, sc[i][j][e]);
        }
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
      // Every stage has a valid token, so the new maxima are finite.
      const float mn_lo = fmaxf(m_lo[i], mx_lo), mn_hi = fmaxf(m_hi[i], mx_hi);
      const float al_lo = ex2(m_lo[i] - mn_lo), al_hi = ex2(m_hi[i] - mn_hi);
      m_lo[i] = mn_lo;
      m_hi[i] = mn_hi;
      l_lo[i] *= al_lo;
      l_hi[i] *= al_hi;
#pragma unroll
      for (int j = 0; j < kTiles; ++j) {
        sc[i][j][0] = ex2(sc[i][j][0] - mn_lo);
        sc[i][j][1] = ex2(sc[i][j][1] - mn_lo);
        sc[i][j][2] = ex2(sc[i][j][2] - mn_hi);
        sc[i][j][3] = ex2(sc[i][j][3] - mn_hi);
        l_lo[i] += sc[i][j][0] + sc[i][j][1];
        l_hi[i] += sc[i][j][2] + sc[i][j][3];
      }
      // Once the maxima settle most stages leave them unchanged: skip the rescale (warp-uniform).
      if (__any_sync(0xffffffffu, al_lo != 1.0f || al_hi != 1.0f)) {
#pragma unroll
        for (int n = 0; n < P::kNT; ++n) {
          acc[i][n][0] *= al_lo;
          acc[i][n][1] *= al_lo;
          acc[i][n][2] *= al_hi;
          acc[i][n][3] *= al_hi;
        }
      }
    }
    // O += P · rows[:, cols of this warp]: k = tokens (steps of 16), n = 8 columns per tile.
#pragma unroll
    for (int kk = 0; kk < kT / 16; ++kk) {
      uint32_t a[kMW][4];
#pragma unroll
      for (int i = 0; i < kMW; ++i) {
        acc_to_a(a[i], sc[i][2 * kk], sc[i][2 * kk + 1]);
      }
      const __nv_bfloat16* src = rows + kk * 16 * ws + vrow_off;
#pragma unroll
      for (int n = 0; n < P::kNT; n += 2) {
        uint32_t bb[4];
        ldmatrix_x4_trans(bb, src + n * 8);
#pragma unroll
        for (int i = 0; i < kMW; ++i) {
          mma_bf16(acc[i][n], a[i], bb[0], bb[1]);
          mma_bf16(acc[i][n + 1], a[i], bb[2], bb[3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  pdl_trigger();  // the merge kernel may start arriving
#pragma unroll
  for (int i = 0; i < kMW; ++i) {
    float lo = l_lo[i], hi = l_hi[i];
    lo += __shfl_xor_sync(0xffffffffu, lo, 1);
    lo += __shfl_xor_sync(0xffffffffu, lo, 2);
    hi += __shfl_xor_sync(0xffffffffu, hi, 1);
    hi += __shfl_xor_sync(0xffffffffu, hi, 2);
    store_result<P::kNT>(acc[i], m_lo[i], m_hi[i], lo, hi, wn == 0 && t4 == 0, (mg * kMW + i) * 16 + g, nh,
                         wn * P::kCols, t4, s, b, split, h0, part_o, part_m, part_l, out, lse);
  }
}

// The wgmma kernel: one warpgroup (4 warps) per CTA, 16 heads, stages of one whole 64-token cache
// block, transposed so that the 64 tokens are wgmma's M: Sᵀ[64 tokens, 16 heads] = rows · qᵀ (36
// m64n16k16, both operands from shared memory), the online softmax over the columns (maxima across
// the four warps through shared memory), Pᵀ to shared memory as BF16, then Oᵀ[512, 16] += rowsᵀ ·
// Pᵀ (8 × 4 m64n16k16, the rows read transposed). Rows land by cp.async in the 128-byte swizzled
// layout wgmma reads (per 64 columns: 64 rows × 128 bytes, 16-byte chunks XORed with row mod 8), so
// one copy of a stage serves as K-major A of the scores and as M-major A of Oᵀ. 4 warps issue 68
// wgmma per 64 rows where the mma.sync kernels issue 544 mma.sync and 272 ldmatrix.
namespace wg {
constexpr int kRing = 2, kStage = kBlock * kW * 2;  // bytes per stage: 9 panels of 64 rows × 128 B
constexpr int kQ = 16 * kW * 2, kP = 16 * kBlock * 2;
constexpr size_t smem = size_t(kRing) * kStage + kQ + kP + 2 * 4 * 16 * 4 + 1024;  // + the 1024-byte alignment

using namespace wgmma;  // desc, fences, sw (wgmma.cuh)
// d (+)= A·B, m64n16k16, BF16 operands from shared memory, FP32 accumulators; kTA: A is M-major.
template <int kTA>
__device__ __forceinline__ void mma(float (&d)[8], uint64_t da, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7}, %8, %9, p, 1, 1, %11, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "l"(da), "l"(db), "r"(accumulate), "n"(kTA)
      : "memory");
}
}  // namespace wg

__global__ void __launch_bounds__(128, 1)
    mla_wgmma_kernel(const float* q, const __nv_bfloat16* pool, const int32_t* table, const int32_t* lengths,
                     Shape_ s, float scale_log2, float* part_o, float* part_m, float* part_l, float* out, float* lse) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* base = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* ring = base;                        // [kRing][9 panels][64 rows][128 B]
  unsigned char* qs = ring + wg::kRing * wg::kStage;  // [9 panels][16 heads][128 B]
  unsigned char* ps = qs + wg::kQ;                    // [16 heads][64 tokens] BF16, swizzled
  float* red = reinterpret_cast<float*>(ps + wg::kP);  // [2][4 warps][16 heads]
  const int64_t split = blockIdx.y, b = blockIdx.z, h0 = int64_t(blockIdx.x) * 16;
  const int nh = int(s.h - h0 < 16 ? s.h - h0 : 16);
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const int64_t len = lengths[b], nblk = (len + kBlock - 1) / kBlock;
  const int64_t blk0 = split * s.blocks_per_split;
  const int64_t blk1 = blk0 + s.blocks_per_split < nblk ? blk0 + s.blocks_per_split : nblk;
  const int64_t tok0 = blk0 * kBlock, tok1 = blk1 * kBlock < len ? blk1 * kBlock : len;
  const int64_t nstages = blk1 > blk0 ? blk1 - blk0 : 0;
  const int32_t* trow = table + b * s.max_blocks + blk0;
  // Warp w copies rows 16w .. 16w + 15 of a block: 72 chunks of 16 bytes per row (lanes, lanes + 32,
  // lanes 0-7 + 64); chunk c goes to panel c / 8 at its swizzled place. Rows past tok1: zero-filled.
  auto load = [&](int64_t st) {
    const int64_t pb = trow[st];
    const __nv_bfloat16* src = pool + ((pb * s.layers + s.layer) * kBlock + 16 * w) * kW + lane * 8;
    unsigned char* dst = ring + int(st % wg::kRing) * wg::kStage;
    const int valid = int(tok1 - (tok0 + st * kBlock) < kBlock ? tok1 - (tok0 + st * kBlock) : kBlock);
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int r = 16 * w + i;
      const bool v = r < valid;
      cp_async16(dst + (lane >> 3) * 8192 + wg::sw(r, lane & 7), src + i * kW, v);
      cp_async16(dst + ((lane >> 3) + 4) * 8192 + wg::sw(r, lane & 7), src + i * kW + 256, v);
      if (lane < 8) cp_async16(dst + 8 * 8192 + wg::sw(r, lane), src + i * kW + 512, v);
    }
    cp_async_commit();
  };
  if (nstages > 0) load(0);
  // q → BF16, swizzled like the rows: panel c / 8, row = head (heads past nh are zero).
  for (int i = tid; i < 16 * (kW / 8); i += 128) {
    const int h = i / (kW / 8), c = i % (kW / 8);
    float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f), y = x;
    if (h < nh) {
      x = *reinterpret_cast<const float4*>(q + (b * s.h + h0 + h) * kW + c * 8);
      y = *reinterpret_cast<const float4*>(q + (b * s.h + h0 + h) * kW + c * 8 + 4);
    }
    *reinterpret_cast<uint4*>(qs + (c >> 3) * 2048 + wg::sw(h, c & 7)) =
        make_uint4(pack_bf16(x.x, x.y), pack_bf16(x.z, x.w), pack_bf16(y.x, y.y), pack_bf16(y.z, y.w));
  }
  // This thread's heads: 2·t4, 2·t4 + 1, 8 + 2·t4, 9 + 2·t4 (accumulator columns); its tokens of a
  // stage: 16w + g and 16w + g + 8 (rows); of Oᵀ: columns 64·mb + 16w + g (+ 8).
  float o[8][8];
#pragma unroll
  for (int mb = 0; mb < 8; ++mb)
#pragma unroll
    for (int e = 0; e < 8; ++e) o[mb][e] = 0.0f;
  float m[4], l[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    m[j] = -INFINITY;
    l[j] = 0.0f;
  }
  const uint32_t ring_a = smem_addr(ring), qs_a = smem_addr(qs), ps_a = smem_addr(ps);
  for (int64_t st = 0; st < nstages; ++st) {
    cp_async_wait<0>();
    wg::fence_async_smem();
    __syncthreads();  // stage st (and q) visible to wgmma; every warp is done with stage st − 1
    if (st + 1 < nstages) load(st + 1);
    const uint32_t stage_a = ring_a + uint32_t(st % wg::kRing) * wg::kStage;
    float sc[8] = {};
    wg::fence();
#pragma unroll
    for (int kk = 0; kk < kW / 16; ++kk) {
      const uint32_t off = (kk >> 2) * 8192 + (kk & 3) * 32;
      wg::mma<0>(sc, wg::desc(stage_a + off, 16, 1024), wg::desc(qs_a + (kk >> 2) * 2048 + (kk & 3) * 32, 16, 1024),
                 kk > 0);
    }
    wg::commit();
    wg::wait0();
    // sc[e]: token 16w + g + 8·((e >> 1) & 1), head 2·t4 + (e & 1) + 8·(e >> 2).
    const int nvalid = int(tok1 - (tok0 + st * kBlock) < kBlock ? tok1 - (tok0 + st * kBlock) : kBlock);
    float mx[4];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      sc[e] *= scale_log2;
      if (16 * w + g + 8 * ((e >> 1) & 1) >= nvalid) sc[e] = -INFINITY;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // j: head 2·t4 + (j & 1) + 8·(j >> 1); values e = (j & 1) + 4·(j >> 1) (+ 2)
      const int e = (j & 1) + 4 * (j >> 1);
      mx[j] = fmaxf(sc[e], sc[e + 2]);
      mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffffu, mx[j], 4));
      mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffffu, mx[j], 8));
      mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffffu, mx[j], 16));
    }
    float* rd = red + int(st & 1) * 64;
    if (g == 0)
#pragma unroll
      for (int j = 0; j < 4; ++j) rd[w * 16 + 2 * t4 + (j & 1) + 8 * (j >> 1)] = mx[j];
    __syncthreads();
    float al[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int h = 2 * t4 + (j & 1) + 8 * (j >> 1);
      const float bm = fmaxf(fmaxf(rd[h], rd[16 + h]), fmaxf(rd[32 + h], rd[48 + h]));
      const float mn = fmaxf(m[j], bm);  // finite: every stage has a token
      al[j] = ex2(m[j] - mn);
      m[j] = mn;
      const int e = (j & 1) + 4 * (j >> 1);
      sc[e] = ex2(sc[e] - mn);
      sc[e + 2] = ex2(sc[e + 2] - mn);
      l[j] = l[j] * al[j] + sc[e] + sc[e + 2];
    }
    // Pᵀ as the K-major B of Oᵀ: row = head, 64 tokens of 2 bytes, swizzled.
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int h = 2 * t4 + (e & 1) + 8 * (e >> 2), t = 16 * w + g + 8 * ((e >> 1) & 1);
      *reinterpret_cast<__nv_bfloat16*>(ps + wg::sw(h, t >> 3) + (t & 7) * 2) = __float2bfloat16(sc[e]);
    }
    if (__any_sync(0xffffffffu, al[0] != 1.0f || al[1] != 1.0f || al[2] != 1.0f || al[3] != 1.0f)) {
#pragma unroll
      for (int mb = 0; mb < 8; ++mb)
#pragma unroll
        for (int e = 0; e < 8; ++e) o[mb][e] *= al[(e & 1) + 2 * (e >> 2)];
    }
    wg::fence_async_smem();
    __syncthreads();  // Pᵀ complete
    wg::fence();
#pragma unroll
    for (int mb = 0; mb < 8; ++mb)
#pragma unroll
      for (int ks = 0; ks < kBlock / 16; ++ks)
        wg::mma<1>(o[mb], wg::desc(stage_a + mb * 8192 + ks * 2048, 1024, 1024), wg::desc(ps_a + ks * 32, 16, 1024),
                   1);
    wg::commit();
    wg::wait0();
  }
  cp_async_wait<0>();
  // Row sums: over the lanes of a column (g), then the warps; O, maxima and sums to shared memory.
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    l[j] += __shfl_xor_sync(0xffffffffu, l[j], 4);
    l[j] += __shfl_xor_sync(0xffffffffu, l[j], 8);
    l[j] += __shfl_xor_sync(0xffffffffu, l[j], 16);
  }
  __syncthreads();  // every warp is done with the ring and red
  float* so = reinterpret_cast<float*>(base);
  float* ml = so + 16 * kOS;
  float* lw = ml + 32;  // [4 warps][16]
  if (g == 0)
#pragma unroll
    for (int j = 0; j < 4; ++j) lw[w * 16 + 2 * t4 + (j & 1) + 8 * (j >> 1)] = l[j];
#pragma unroll
  for (int mb = 0; mb < 8; ++mb)
#pragma unroll
    for (int e = 0; e < 8; ++e)
      so[(2 * t4 + (e & 1) + 8 * (e >> 2)) * kOS + 64 * mb + 16 * w + g + 8 * ((e >> 1) & 1)] = o[mb][e];
  __syncthreads();
  if (tid < 16) {
    ml[16 + tid] = lw[tid] + lw[16 + tid] + lw[32 + tid] + lw[48 + tid];
  }
  if (w == 0 && g == 0)
#pragma unroll
    for (int j = 0; j < 4; ++j) ml[2 * t4 + (j & 1) + 8 * (j >> 1)] = m[j];
  pdl_trigger();  // the merge kernel may start arriving
  finish_from_smem<128>(so, s, b, split, h0, nh, tid, part_o, part_m, part_l, out, lse);
}

// Merge of the splits (maxima in base 2): one CTA of 128 threads per (head, sequence), 4 columns each.
__global__ void __launch_bounds__(128) mla_merge_kernel(const float* part_o, const float* part_m,
                                                        const float* part_l, Shape_ s, float* out, float* lse) {
  // Launched as a programmatic dependent of the decode kernel: it may be resident before that one
  // ends (no launch gap) and waits here until its partials are complete and visible.
  pdl_wait();
  const int64_t b = blockIdx.y, h = blockIdx.x;
  const int64_t first = b * s.splits * s.h + h;  // split sp at first + sp·H
  float mx = -INFINITY;
  for (int64_t sp = 0; sp < s.splits; ++sp) mx = fmaxf(mx, part_m[first + sp * s.h]);
  float l = 0.0f;
  float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  const int d = threadIdx.x * 4;
  for (int64_t sp = 0; sp < s.splits; ++sp) {
    const int64_t i = first + sp * s.h;
    const float m = part_m[i];
    if (m == -INFINITY) continue;  // a split past the sequence's end
    const float w = exp2f(m - mx);
    l += w * part_l[i];
    const float4 v = *reinterpret_cast<const float4*>(part_o + i * kR + d);
    o.x += w * v.x;
    o.y += w * v.y;
    o.z += w * v.z;
    o.w += w * v.w;
  }
  const float inv = 1.0f / l;
  *reinterpret_cast<float4*>(out + (b * s.h + h) * kR + d) = make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
  if (lse && threadIdx.x == 0) lse[b * s.h + h] = mx / kLog2e + logf(l);
}

struct Launch {
  MlaDecodeConfig c;
  const void* kernel;
  int threads;
  size_t smem;
  int per_sm = 1;  // resident CTAs per SM (set once, with the shared-memory attribute)
};
Launch wgmma_launch() {
  return {MlaDecodeConfig{MlaKernel::wgmma, 16, 16, 4, kBlock, wg::kRing, false, 0},
          reinterpret_cast<const void*>(mla_wgmma_kernel), 128, wg::smem};
}
template <int kMG, int kMW, int kWN, int kT, int kS, bool kQR = false> Launch reg_launch() {
  using P = Reg<kMG, kMW, kWN, kT, kS, kQR>;
  return {MlaDecodeConfig{MlaKernel::reg_p, P::kHeads, 16 * kMW, kMG * kWN, kT, kS, kQR, 0},
          reinterpret_cast<const void*>(mla_reg_kernel<kMG, kMW, kWN, kT, kS, kQR>), P::kThreads, P::smem};
}
const std::vector<Launch>& launches() {
  static const std::vector<Launch> all = [] {
    std::vector<Launch> v{
        reg_launch<1, 1, 4, 32, 2>(),        // two CTAs per SM
        reg_launch<4, 1, 2, 32, 2>(),        // the default above 32 heads
        reg_launch<2, 2, 4, 32, 2>(),
        reg_launch<1, 1, 4, 32, 2, true>(),  // two CTAs per SM; the 16-head default before wgmma
        reg_launch<1, 1, 4, 16, 4, true>(),  // two CTAs per SM
        wgmma_launch(),                      // the default up to 32 heads
    };
    for (Launch& l : v) {
      DSV3_CUDA_CHECK(cudaFuncSetAttribute(l.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(l.smem)));
      DSV3_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&l.per_sm, l.kernel, l.threads, l.smem));
      l.per_sm = std::max(l.per_sm, 1);
    }
    return v;
  }();
  return all;
}
bool same_shape(const MlaDecodeConfig& x, const MlaDecodeConfig& y) {
  return x.kernel == y.kernel && x.heads_per_cta == y.heads_per_cta && x.heads_per_warp == y.heads_per_warp &&
         x.warps == y.warps &&
         x.stage_tokens == y.stage_tokens && x.stages == y.stages && x.q_in_registers == y.q_in_registers;
}

}  // namespace

std::vector<MlaDecodeConfig> mla_decode_configs() {
  std::vector<MlaDecodeConfig> v;
  for (const Launch& l : launches()) v.push_back(l.c);
  return v;
}

// Measured on the H200 (bench/gpu_mla_decode.cpp, B 64, context 4096): up to 32 heads the wgmma
// kernel (83.3 us against 90.2 for two 16-head mma.sync CTAs per SM, docs/cuda.md); above 32 heads
// one 64-head mma.sync CTA beats 16-head ones re-reading rows.
MlaDecodeConfig mla_decode_default_config(int64_t heads) {
  return heads <= 32 ? MlaDecodeConfig{MlaKernel::wgmma, 16, 16, 4, kBlock, wg::kRing, false, 0}
                     : MlaDecodeConfig{MlaKernel::reg_p, 64, 16, 8, 32, 2, false, 0};
}

std::string mla_decode_config_name(const MlaDecodeConfig& c) {
  return cat(c.kernel == MlaKernel::wgmma ? "wgmma" : "regP", " h", c.heads_per_cta,
             c.heads_per_warp == 16 ? "" : cat("/", c.heads_per_warp), " w", c.warps, " t", c.stage_tokens, " s",
             c.stages, c.q_in_registers ? " qr" : "");
}

void cuda_mla_decode(const MlaDecodeArgs& a) {
  cuda_mla_decode_with(a, mla_decode_default_config(a.q.ndim() == 3 ? a.q.dim(1) : 0));
}

int64_t cuda_mla_decode_with(const MlaDecodeArgs& a, const MlaDecodeConfig& c) {
  DSV3_CHECK(a.q.dtype() == DType::F32 && a.q.ndim() == 3 && a.pool.dtype() == DType::BF16 &&
                 a.block_table.dtype() == DType::I32 && a.block_table.ndim() == 2 &&
                 a.lengths.dtype() == DType::I32 && a.out.dtype() == DType::F32,
             "cuda_mla_decode: q F32 [B, H, W], pool BF16, block_table I32 [B, n], lengths I32 [B], out F32");
  int64_t B = a.q.dim(0), H = a.q.dim(1), W = a.q.dim(2), R = a.kv_lora_rank;
  DSV3_CHECK(a.block_size == kBlock, "cuda_mla_decode: block_size must be ", kBlock, ", got ", a.block_size);
  DSV3_CHECK(W == kW && R == kR,
             "cuda_mla_decode: needs rows of 576 (kv_lora_rank 512 + rope 64, DeepSeek-V2/V3), got W=", W, " R=", R);
  DSV3_CHECK(a.out.shape() == Shape({B, H, R}) && a.lengths.numel() == B && a.block_table.dim(0) == B,
             "cuda_mla_decode: shapes of out/lengths/block_table do not match q ", a.q.shape().str());
  DSV3_CHECK(!present(a.lse) || (a.lse.dtype() == DType::F32 && a.lse.numel() == B * H),
             "cuda_mla_decode: lse must be F32 [B, H]");
  const Launch* l = nullptr;
  for (const Launch& x : launches())
    if (same_shape(x.c, c)) l = &x;
  DSV3_CHECK(l, "cuda_mla_decode: no compiled kernel of shape ", mla_decode_config_name(c));
  if (B == 0 || H == 0) return 0;
  int64_t max_blocks = a.block_table.dim(1);
  int64_t nblk = std::max<int64_t>(1, (std::max<int64_t>(a.max_len, 1) + kBlock - 1) / kBlock);
  DSV3_CHECK(nblk <= max_blocks, "cuda_mla_decode: max_len ", a.max_len, " exceeds the block table");
  const int64_t slots = int64_t(sm_count()) * l->per_sm;
  const int64_t head_groups = (H + c.heads_per_cta - 1) / c.heads_per_cta;
  int64_t splits = c.splits;
  if (splits <= 0) {
    // Time model: CTAs run in waves over the slots, each wave as long as its CTAs' block count; a
    // block takes one slot's share of the bandwidth. Splits add a merge pass over their partial sums.
    const double block_s = 73728.0 * double(slots) / 3.5e12;
    double best = 0;
    for (int64_t sp = 1; sp <= nblk; ++sp) {
      const int64_t per = (nblk + sp - 1) / sp;
      if (sp > 1 && (nblk + per - 1) / per != sp) continue;  // same per-CTA work as fewer splits
      const int64_t waves = (B * head_groups * sp + slots - 1) / slots;
      double t = double(waves * per) * block_s;
      if (sp > 1) t += double(B * H * R * 4 * (sp + 1)) / 3.0e12 + 3e-6;
      if (sp == 1 || t < best) {
        best = t;
        splits = sp;
      }
    }
  }
  splits = std::min(splits, nblk);
  const int64_t per = (nblk + splits - 1) / splits;
  splits = (nblk + per - 1) / per;
  Shape_ s{B, H, W, R, a.layers, a.layer, max_blocks, splits, per};
  const bool merge = splits > 1;
  // The partials as backend tensors (not Scratch): inside a CUDA graph capture they stay the
  // graph's, so a decode step of this shape can be captured (docs/inference.md "CUDA graphs").
  CudaBackend& be = cuda_backend();
  const Tensor po = merge ? be.alloc(DType::F32, {B * splits * H * R}) : Tensor();
  const Tensor pm = merge ? be.alloc(DType::F32, {B * splits * H}) : Tensor();
  const Tensor pl = merge ? be.alloc(DType::F32, {B * splits * H}) : Tensor();
  const float* qp = a.q.data<float>();
  const __nv_bfloat16* pool = static_cast<const __nv_bfloat16*>(a.pool.raw());
  const int32_t* table = a.block_table.data<int32_t>();
  const int32_t* lens = a.lengths.data<int32_t>();
  float* out = ptr<float>(a.out);
  float* lse = present(a.lse) ? ptr<float>(a.lse) : nullptr;
  float *pop = merge ? ptr<float>(po) : nullptr, *pmp = merge ? ptr<float>(pm) : nullptr,
        *plp = merge ? ptr<float>(pl) : nullptr;
  // Head groups fastest: the CTAs reading the same rows are scheduled together and share them in L2.
  const dim3 grid{unsigned(head_groups), unsigned(splits), unsigned(B)};
  float scale_log2 = a.scale * kLog2e;
  void* args[] = {&qp, &pool, &table, &lens, &s, &scale_log2, &pop, &pmp, &plp, &out, &lse};
  DSV3_CUDA_CHECK(cudaLaunchKernel(l->kernel, grid, dim3(unsigned(l->threads)), args, l->smem, stream()));
  if (merge)
    launch_pdl(mla_merge_kernel, dim3(unsigned(H), unsigned(B)), dim3(128), 0, static_cast<const float*>(pop),
               static_cast<const float*>(pmp), static_cast<const float*>(plp), s, out, lse);
  check_launch("mla_decode");
  return splits;
}

}  // namespace dsv3
