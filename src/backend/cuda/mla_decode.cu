// Absorbed-MLA decode (flash-decoding over the paged latent cache) on BF16 tensor cores.
// A CTA takes one sequence, a group of heads (16 or 64) and a contiguous range of its cache blocks
// (a split), so every latent row is read from HBM once for all heads of the group (MLA's K and V
// are the same row). Rows stream through a ring of stages (kT tokens, inside one cache block, so
// contiguous in the pool) by cp.async, kS − 1 stages in flight while one is computed, invalid rows
// zero-filled. MMAs are mma.sync m16n8k16: 16 heads are the M of a tile. Per stage:
//   scores S[heads, tokens] = Q[heads, 576] · rowsᵀ, with 576 split over the warps of a head group
//   (partial scores added through shared memory), then the online softmax in base 2 in registers,
//   then O[heads, 512] += P · rows[:, 0:512], the 512 columns split over the same warps.
// With one split the CTA writes out and lse itself; otherwise a second kernel merges the splits'
// partial sums (merging in the last CTA of each sequence, counted by an arrival counter, measured no
// faster on the H200: the second launch's gap is hidden, and that CTA's serial pass is a tail).
// Operands are BF16 (q and the softmax weights are rounded to BF16), accumulation FP32; the
// tolerance is the BF16-operand one. The 16-head default keeps each warp's q fragments in registers
// (q_in_registers). The first kernel (legacy: four warps splitting the tokens, maxima and weights
// through shared memory, double buffer) stays for comparison in the benchmark.
#include <algorithm>
#include <cmath>

#include "backend/cuda/common.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/mla_decode.h"

namespace dsv3 {
using namespace cuda;

namespace {

constexpr int kBlock = 64;  // tokens per cache block (the paged cache's block size)
constexpr int kW = 576;     // row width: kv_lora_rank 512 + rope 64
constexpr int kR = 512;
constexpr int kPad = 8;     // BF16 elements of row padding: 16 bytes, so ldmatrix rows avoid bank conflicts
constexpr float kLog2e = 1.4426950408889634f;
// Legacy kernel shape.
constexpr int kLStage = 32, kLHeads = 16, kLWarps = 4, kLThreads = kLWarps * 32;

struct Shape_ {
  int64_t b, h, w, r, layers, layer, max_blocks, splits, blocks_per_split;
};

// The first kernel (kept for comparison in the benchmark): 16 heads, 4 warps, 32-token stages,
// double-buffered, two CTAs per SM. R = kLWarps · 8 · kNT output columns.
template <int kNT>
__global__ void __launch_bounds__(kLThreads, 2)
    mla_legacy_kernel(const float* q, const __nv_bfloat16* pool, const int32_t* table, const int32_t* lengths,
                     Shape_ s, float scale, float* part_o, float* part_m, float* part_l) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int W = kW, ws = W + kPad;
  __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [16][ws]
  __nv_bfloat16* kv = qs + kLHeads * ws;                             // [2][kLStage][ws]
  __nv_bfloat16* ps = kv + 2 * kLStage * ws;                         // [16][kLStage + kPad]
  float* red = reinterpret_cast<float*>(ps + kLHeads * (kLStage + kPad));  // [kLWarps][16]
  const int64_t hg = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int64_t h0 = hg * kLHeads;
  const int nh = int(s.h - h0 < kLHeads ? s.h - h0 : kLHeads);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const int64_t len = lengths[b], nblk = (len + kBlock - 1) / kBlock;
  const int64_t blk0 = split * s.blocks_per_split;
  const int64_t blk1 = blk0 + s.blocks_per_split < nblk ? blk0 + s.blocks_per_split : nblk;
  const int64_t tok0 = blk0 * kBlock, tok1 = blk1 * kBlock < len ? blk1 * kBlock : len;
  const int64_t nstages = tok1 > tok0 ? (tok1 - tok0 + kLStage - 1) / kLStage : 0;

  // q → BF16 in shared memory (heads past nh are zero rows).
  for (int i = tid; i < kLHeads * W; i += kLThreads) {
    int h = i / W, j = i % W;
    qs[h * ws + j] = __float2bfloat16(h < nh ? q[((b * s.h + h0 + h) * s.w) + j] : 0.0f);
  }
  // A stage's 32 tokens lie in one 64-token cache block, whose rows are contiguous in the pool:
  // one table lookup per stage, then a straight copy of 32·W BF16 into padded shared rows.
  constexpr int kChunks = kW / 8;  // 16-byte pieces per row
  auto load_stage = [&](int64_t st, int buf) {
    const int64_t t_first = tok0 + st * kLStage;
    const int64_t pb = table[b * s.max_blocks + t_first / kBlock];
    const __nv_bfloat16* src = pool + (((pb * s.layers + s.layer) * kBlock) + t_first % kBlock) * kW;
    const int valid_rows = int(tok1 - t_first < kLStage ? tok1 - t_first : kLStage);
    __nv_bfloat16* dst = kv + buf * kLStage * ws;
#pragma unroll 4
    for (int i = tid; i < kLStage * kChunks; i += kLThreads) {
      const int r = i / kChunks, c = i - r * kChunks;
      cp_async16(dst + r * ws + c * 8, src + r * kW + c * 8, r < valid_rows);
    }
    cp_async_commit();
  };
  if (nstages > 0) load_stage(0, 0);

  float acc[kNT][4];
#pragma unroll
  for (int n = 0; n < kNT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  float m_lo = -INFINITY, m_hi = -INFINITY;  // running maxima of heads g and g + 8 (same in every thread)
  float l_lo = 0.0f, l_hi = 0.0f;            // this thread's partial sums

  for (int64_t st = 0; st < nstages; ++st) {
    const int buf = int(st & 1);
    if (st + 1 < nstages) {
      load_stage(st + 1, buf ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const __nv_bfloat16* rows = kv + buf * kLStage * ws;
    // Scores: warp → tokens 8·warp .. 8·warp + 7.
    float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    {
      // Two accumulators on alternate k-steps: a chain of W/16 dependent MMAs would be latency-bound.
      float sc2[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const __nv_bfloat16* arow = qs + (lane & 15) * ws + (lane >> 4) * 8;
      const __nv_bfloat16* brow = rows + (warp * 8 + (lane & 7)) * ws + ((lane >> 3) & 1) * 8;
      int k0 = 0;
      for (; k0 + 32 <= W; k0 += 32) {
        // A matrices in mma order: (heads 0-7, k lo), (8-15, k lo), (0-7, k hi), (8-15, k hi).
        uint32_t a[4], bb[2], a2[4], bb2[2];
        ldmatrix_x4(a, arow + k0);
        ldmatrix_x2(bb, brow + k0);
        ldmatrix_x4(a2, arow + k0 + 16);
        ldmatrix_x2(bb2, brow + k0 + 16);
        mma_bf16(sc, a, bb[0], bb[1]);
        mma_bf16(sc2, a2, bb2[0], bb2[1]);
      }
      if (k0 < W) {
        uint32_t a[4], bb[2];
        ldmatrix_x4(a, arow + k0);
        ldmatrix_x2(bb, brow + k0);
        mma_bf16(sc, a, bb[0], bb[1]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) sc[i] += sc2[i];
    }
    // sc[0], sc[1]: head g, tokens 2·t4, 2·t4 + 1 of this warp's 8; sc[2], sc[3]: head g + 8.
    const int64_t tbase = tok0 + st * kLStage + warp * 8 + 2 * t4;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      bool valid = tbase + (i & 1) < tok1;
      sc[i] = valid ? sc[i] * scale : -INFINITY;
    }
    float mx_lo = fmaxf(sc[0], sc[1]), mx_hi = fmaxf(sc[2], sc[3]);
    mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
    mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
    mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
    mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
    if (t4 == 0) {
      red[warp * kLHeads + g] = mx_lo;
      red[warp * kLHeads + g + 8] = mx_hi;
    }
    __syncthreads();
    float bm_lo = red[g], bm_hi = red[g + 8];
#pragma unroll
    for (int w2 = 1; w2 < kLWarps; ++w2) {
      bm_lo = fmaxf(bm_lo, red[w2 * kLHeads + g]);
      bm_hi = fmaxf(bm_hi, red[w2 * kLHeads + g + 8]);
    }
    const float mn_lo = fmaxf(m_lo, bm_lo), mn_hi = fmaxf(m_hi, bm_hi);
    // A stage whose tokens are all masked keeps −inf maxima: exp(−inf − −inf) would be NaN.
    const float al_lo = mn_lo == -INFINITY ? 1.0f : __expf(m_lo - mn_lo);
    const float al_hi = mn_hi == -INFINITY ? 1.0f : __expf(m_hi - mn_hi);
    float p[4];
    p[0] = mn_lo == -INFINITY ? 0.0f : __expf(sc[0] - mn_lo);
    p[1] = mn_lo == -INFINITY ? 0.0f : __expf(sc[1] - mn_lo);
    p[2] = mn_hi == -INFINITY ? 0.0f : __expf(sc[2] - mn_hi);
    p[3] = mn_hi == -INFINITY ? 0.0f : __expf(sc[3] - mn_hi);
    l_lo = l_lo * al_lo + p[0] + p[1];
    l_hi = l_hi * al_hi + p[2] + p[3];
    m_lo = mn_lo;
    m_hi = mn_hi;
    const int pw = kLStage + kPad;
    *reinterpret_cast<uint32_t*>(ps + g * pw + warp * 8 + 2 * t4) = pack_bf16(p[0], p[1]);
    *reinterpret_cast<uint32_t*>(ps + (g + 8) * pw + warp * 8 + 2 * t4) = pack_bf16(p[2], p[3]);
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
      acc[n][0] *= al_lo;
      acc[n][1] *= al_lo;
      acc[n][2] *= al_hi;
      acc[n][3] *= al_hi;
    }
    __syncthreads();
    // O += P · rows[:, cols of this warp]: k = tokens (2 steps of 16), n = 8 columns per tile.
#pragma unroll
    for (int k0 = 0; k0 < kLStage; k0 += 16) {
      uint32_t a[4];
      ldmatrix_x4(a, ps + (lane & 15) * pw + k0 + (lane >> 4) * 8);
      const int col0 = warp * kNT * 8;
#pragma unroll
      for (int n = 0; n < kNT; n += 2) {
        // Matrices: (tokens k0..+7, cols c..c+7), (k0+8.., c..), (k0.., c+8..), (k0+8.., c+8..).
        const int mat = lane >> 3;
        const __nv_bfloat16* src =
            rows + (k0 + (mat & 1) * 8 + (lane & 7)) * ws + col0 + n * 8 + (mat >> 1) * 8;
        uint32_t bb[4];
        ldmatrix_x4_trans(bb, src);
        mma_bf16(acc[n], a, bb[0], bb[1]);
        mma_bf16(acc[n + 1], a, bb[2], bb[3]);
      }
    }
    __syncthreads();  // the next stage's load overwrites this buffer
  }

  // Row sums: reduce the quad, then the warps.
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
  if (t4 == 0) {
    red[warp * kLHeads + g] = l_lo;
    red[warp * kLHeads + g + 8] = l_hi;
  }
  __syncthreads();
  const int64_t base = (b * s.splits + split) * s.h + h0;
  if (tid < nh) {
    float l = 0.0f;
    for (int w2 = 0; w2 < kLWarps; ++w2) l += red[w2 * kLHeads + tid];
    part_l[base + tid] = l;
    // Every thread holds the same maxima; thread tid's are those of heads g and g + 8 of its lane.
  }
  if (t4 == 0 && warp == 0) {
    if (g < nh) part_m[base + g] = m_lo * kLog2e;  // the merge works in base 2
    if (g + 8 < nh) part_m[base + g + 8] = m_hi * kLog2e;
  }
#pragma unroll
  for (int n = 0; n < kNT; ++n) {
    const int col = warp * kNT * 8 + n * 8 + 2 * t4;
    if (g < nh) *reinterpret_cast<float2*>(part_o + (base + g) * s.r + col) = make_float2(acc[n][0], acc[n][1]);
    if (g + 8 < nh)
      *reinterpret_cast<float2*>(part_o + (base + g + 8) * s.r + col) = make_float2(acc[n][2], acc[n][3]);
  }
}

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

// Merge of the splits (maxima in base 2): one CTA of 128 threads per (head, sequence), 4 columns each.
__global__ void __launch_bounds__(128) mla_merge_kernel(const float* part_o, const float* part_m,
                                                        const float* part_l, Shape_ s, float* out, float* lse) {
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
template <int kMG, int kMW, int kWN, int kT, int kS, bool kQR = false> Launch reg_launch() {
  using P = Reg<kMG, kMW, kWN, kT, kS, kQR>;
  return {MlaDecodeConfig{MlaKernel::reg_p, P::kHeads, 16 * kMW, kMG * kWN, kT, kS, kQR, 0},
          reinterpret_cast<const void*>(mla_reg_kernel<kMG, kMW, kWN, kT, kS, kQR>), P::kThreads, P::smem};
}
const std::vector<Launch>& launches() {
  static const std::vector<Launch> all = [] {
    const size_t lws = kW + kPad;
    const size_t legacy_smem =
        (size_t(kLHeads) * lws + 2 * size_t(kLStage) * lws + size_t(kLHeads) * (kLStage + kPad)) * 2 +
        size_t(kLWarps * kLHeads) * 4;
    std::vector<Launch> v{
        {MlaDecodeConfig{MlaKernel::legacy, 16, 16, kLWarps, kLStage, 2, false, 0},
         reinterpret_cast<const void*>(mla_legacy_kernel<kR / (kLWarps * 8)>), kLThreads, legacy_smem},
        reg_launch<1, 1, 4, 16, 4>(),  // two CTAs per SM
        reg_launch<1, 1, 4, 32, 2>(),  // two CTAs per SM
        reg_launch<1, 1, 4, 32, 3>(),
        reg_launch<1, 1, 4, 64, 2>(),
        reg_launch<1, 1, 8, 32, 2>(),  // two CTAs per SM
        reg_launch<4, 1, 2, 32, 2>(),
        reg_launch<4, 1, 4, 32, 2>(),
        reg_launch<2, 2, 4, 32, 2>(),
        reg_launch<1, 1, 4, 32, 2, true>(),  // two CTAs per SM
        reg_launch<1, 1, 4, 16, 3, true>(),  // three CTAs per SM
        reg_launch<1, 1, 4, 16, 4, true>(),  // two CTAs per SM
        reg_launch<1, 1, 4, 64, 2, true>(),
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

// Measured on the H200 (bench/gpu_mla_decode.cpp, B 64, context 4096): two 4-warp CTAs per SM with
// double-buffered 32-token stages beat deeper rings at one CTA per SM (those are latency-bound on
// one warp per scheduler), and q held in registers beats q re-read from shared memory every stage;
// above 32 heads one 64-head CTA beats four 16-head ones re-reading rows.
MlaDecodeConfig mla_decode_default_config(int64_t heads) {
  return heads <= 32 ? MlaDecodeConfig{MlaKernel::reg_p, 16, 16, 4, 32, 2, true, 0}
                     : MlaDecodeConfig{MlaKernel::reg_p, 64, 16, 8, 32, 2, false, 0};
}

std::string mla_decode_config_name(const MlaDecodeConfig& c) {
  const char* k = c.kernel == MlaKernel::legacy ? "legacy" : "regP";
  return cat(k, " h", c.heads_per_cta, c.heads_per_warp == 16 ? "" : cat("/", c.heads_per_warp), " w", c.warps,
             " t", c.stage_tokens, " s", c.stages, c.q_in_registers ? " qr" : "");
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
  const bool legacy = c.kernel == MlaKernel::legacy;
  const bool merge = splits > 1 || legacy;
  Scratch po(merge ? size_t(B * splits * H * R) * 4 : 0), pm(merge ? size_t(B * splits * H) * 4 : 0),
      pl(merge ? size_t(B * splits * H) * 4 : 0);
  const float* qp = a.q.data<float>();
  const __nv_bfloat16* pool = static_cast<const __nv_bfloat16*>(a.pool.raw());
  const int32_t* table = a.block_table.data<int32_t>();
  const int32_t* lens = a.lengths.data<int32_t>();
  float* out = ptr<float>(a.out);
  float* lse = present(a.lse) ? ptr<float>(a.lse) : nullptr;
  float *pop = po.as<float>(), *pmp = pm.as<float>(), *plp = pl.as<float>();
  // Head groups fastest: the CTAs reading the same rows are scheduled together and share them in L2.
  const dim3 grid{unsigned(head_groups), unsigned(splits), unsigned(B)};
  if (legacy) {
    mla_legacy_kernel<kR / (kLWarps * 8)><<<grid, l->threads, l->smem>>>(qp, pool, table, lens, s, a.scale, pop,
                                                                          pmp, plp);
  } else {
    float scale_log2 = a.scale * kLog2e;
    void* args[] = {&qp, &pool, &table, &lens, &s, &scale_log2, &pop, &pmp, &plp, &out, &lse};
    DSV3_CUDA_CHECK(cudaLaunchKernel(l->kernel, grid, dim3(unsigned(l->threads)), args, l->smem, nullptr));
  }
  if (merge)
    mla_merge_kernel<<<dim3(unsigned(H), unsigned(B)), 128>>>(pop, pmp, plp, s, out, lse);
  check_launch("mla_decode");
  return splits;
}

}  // namespace dsv3
