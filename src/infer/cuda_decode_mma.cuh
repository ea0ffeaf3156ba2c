// The tensor-core decode GEMV and grouped-expert kernels (launched by cuda_decode_ops.cu and
// cuda_decode_moe.cu for BF16 and FP8 weights): 16 BF16 weight rows per warp times up to 64 rows of
// F32 x per CTA on mma.sync m16n8k16, FP32 accumulators. Included by those two only.
//
// x in two BF16 terms. hi = bf16(x) (round to nearest) leaves |x − hi| ≤ 2⁻⁸|x| (8 significant
// bits); x − hi is exact in F32 and lo = bf16(x − hi) leaves |x − hi − lo| ≤ 2⁻⁸|x − hi| ≤ 2⁻¹⁶|x|.
// A product of two BF16 values is exact in FP32 (8 × 8 significant bits), so for one output
//   |Σ w·x − Σ (w·hi + w·lo)| ≤ 2⁻¹⁶·Σ|w·x|
// before the FP32 accumulation's own rounding (the tensor core adds each 16-column block of
// products into the accumulator). The per-term errors have random signs, so the error seen is
// near 2⁻¹⁶·‖w∘x‖₂/√3: ~2e-6 of max|y| for random rows at K 512–2816 (a CPU emulation of this
// arithmetic with round-to-nearest and with truncated accumulation), inside tolerances.md's kF32
// (1e-5), the class of the F32-math path (BF16 rounding of x alone, as transformers does, would
// be ~2⁻⁹ relative: 1000× worse). Valid for |x| < 2¹²⁸·(1 − 2⁻⁹) (beyond, hi rounds to inf); an
// infinite x stays infinite, NaN stays NaN (split_bf16x2, backend/cuda/mma.cuh).
//
// The weights' 16-byte vectors go straight from HBM into A fragments: the sum over k does not
// depend on the order of the columns, so each lane's 16 consecutive columns of a row (two 16-byte
// loads) fill its A slots of four k16 MMAs, and x is read in the same permuted order (lane t of
// quad g: x row g, the same 16 columns, four float4 loads from L1). A 64-column k-block of 16 rows
// is 2 KB per weight; a warp takes every kstep-th k-block of its rows, the next block's loads in
// flight while it multiplies one (the first issued before pdl_wait).
//
// FP8 weights (E4M3 with 128×128 block scales, as DeepSeek-V3's checkpoint; kF8): a lane's 16
// columns of a row are one 16-byte load, widened to BF16 in registers before its MMAs — exactly:
// an E4M3 value has 4 significant bits and an exponent BF16 spans. A k-block (64 columns) lies in
// one 128-column scale block and a warp's 16 rows in one 128-row block, so each k-block's sums are
// kept apart and multiplied by their block's scale once (the products stay exact; one rounding per
// k-block where the CPU's dequantized weight has one per element: inside kF32 alike).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "backend/cuda/mma.cuh"
#include "backend/cuda/pdl.cuh"
#include "infer/cuda_decode_ops.h"
#include "infer/cuda_weight_vec.cuh"

namespace dsv3::cuda {

constexpr int kChunk = 8;         // picks (rows of x) per work item of the expert kernels
constexpr int kMmaWarps = 8;      // warps per CTA of gemv_mma_kernel / expert_mma_kernel
constexpr int kExpRowWarps = 16;  // warps per CTA of the row-range kernels (gemv_rows, expert_rows)
constexpr int kMmaKb = 64;        // columns per k-block

// c += a·b, m16n8k16, BF16 operands, FP32 accumulators (not volatile: the compiler may interleave).
__device__ __forceinline__ void mma_bf16_acc(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One k-block's weights for one lane: [0..1] row g, columns c..c+7 and c+8..c+15; [2..3] row g + 8.
// FP8 (kF8): as loaded, [0] and [2] hold the 16 columns of rows g and g + 8; mma_expand widens them.
struct MmaBlock {
  uint4 w[4];
};
template <bool kF8 = false>
__device__ __forceinline__ void mma_load(MmaBlock& m, const char* lo, const char* hi, int b, int nkb, int K) {
  const int c = b * kMmaKb + 16 * (threadIdx.x & 3);
  const uint4 z = make_uint4(0, 0, 0, 0);
  if constexpr (kF8) {  // K % 16 == 0 (checked on the host)
    const bool v = b < nkb && c + 16 <= K;
    m.w[0] = v ? ld_weights(lo + c) : z;
    m.w[2] = v ? ld_weights(hi + c) : z;
    return;
  }
  const bool v0 = b < nkb && c + 8 <= K, v1 = b < nkb && c + 16 <= K;
  const size_t o = size_t(c) * 2;
  m.w[0] = v0 ? ld_weights(lo + o) : z;
  m.w[1] = v1 ? ld_weights(lo + o + 16) : z;
  m.w[2] = v0 ? ld_weights(hi + o) : z;
  m.w[3] = v1 ? ld_weights(hi + o + 16) : z;
}
// Two E4M3 values (the low 16 bits) as a BF16 pair, the first in the low half.
__device__ __forceinline__ uint32_t e4m3x2_to_bf16x2(uint32_t two) {
  const __half2 h(__nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(two & 0xffffu), __NV_E4M3));
  const float2 f = __half22float2(h);
  const __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
  return *reinterpret_cast<const uint32_t*>(&b);
}
__device__ __forceinline__ uint4 e4m3x8_to_bf16(uint32_t a, uint32_t b) {
  return make_uint4(e4m3x2_to_bf16x2(a), e4m3x2_to_bf16x2(a >> 16), e4m3x2_to_bf16x2(b), e4m3x2_to_bf16x2(b >> 16));
}
// An FP8 block as mma_load left it, widened in place to the BF16 layout (nothing to do for BF16).
template <bool kF8> __device__ __forceinline__ void mma_expand(MmaBlock& m) {
  if constexpr (kF8) {
    const uint4 r0 = m.w[0], r1 = m.w[2];
    m.w[0] = e4m3x8_to_bf16(r0.x, r0.y);
    m.w[1] = e4m3x8_to_bf16(r0.z, r0.w);
    m.w[2] = e4m3x8_to_bf16(r1.x, r1.y);
    m.w[3] = e4m3x8_to_bf16(r1.z, r1.w);
  }
}
// The scale of k-block b for the 128-row block whose scale row is `srow` (FP8 only; 0 past the
// last block, whose sums are zero).
__device__ __forceinline__ float mma_scale(const float* srow, int b, int nkb) {
  return b < nkb ? __ldg(srow + b / 2) : 0.0f;
}

// This lane's x columns of block b into L1 ahead of their loads (one line per row and lane pair).
template <int NT>
__device__ __forceinline__ void mma_prefetch_x(const float* const (&xr)[NT], int b, int K) {
  const int c = b * kMmaKb + 16 * (threadIdx.x & 3);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
    if (xr[nt] && c < K) asm volatile("prefetch.global.L1 [%0];" ::"l"(xr[nt] + c));
}
// k16 tile i of block (m, c): the A fragment. Logical columns 2t, 2t+1 ↔ physical c + 4i, +1 (word
// 2i of the lane's 16 columns); 2t + 8, +9 ↔ c + 4i + 2, +3 (word 2i + 1).
__device__ __forceinline__ uint32_t word(const uint4& v, int k) { return k == 0 ? v.x : k == 1 ? v.y : k == 2 ? v.z : v.w; }
__device__ __forceinline__ void mma_a(const MmaBlock& m, int i, uint32_t (&a)[4]) {
  const int u = i / 2, k = 2 * (i % 2);  // words 2i, 2i + 1 of the row's eight
  a[0] = word(m.w[u], k);
  a[1] = word(m.w[2 + u], k);
  a[2] = word(m.w[u], k + 1);
  a[3] = word(m.w[2 + u], k + 1);
}

// One warp: ca[nt] (and cb[nt] for a second weight, kTwo) = the sums over this warp's k-blocks
// (kb0, kb0 + kstep, …) of W[16 rows]·x[8 rows of n-tile nt]ᵀ, in the MMA accumulator layout
// (lane 4g + t: c[0], c[1] = weight row g, x rows 2t, 2t + 1; c[2], c[3] = weight row g + 8).
// a_lo / a_hi: this lane's weight rows g and g + 8 (byte pointers to the row starts; BF16, K % 8 ==
// 0, or FP8, K % 16 == 0; 16-byte aligned); xr[nt]: row nt·8 + g of x (F32, 16-byte aligned) or null
// for a missing row. FP8: sa / sb are the rows' scale rows, each block's sums scaled apart.
// With `waited` false, pdl_wait (and the trigger) come after the first block's weight loads. The
// next block's weights are loaded, and its x prefetched into L1, while this block is multiplied;
// within a block the n-tiles' accumulators are interleaved (independent MMA chains).
template <int NT, bool kTwo, bool kF8 = false>
__device__ __forceinline__ void mma_rows(const char* a_lo, const char* a_hi, const char* b_lo, const char* b_hi,
                                         int K, int kb0, int kstep, const float* const (&xr)[NT], bool& waited,
                                         float (&ca)[NT][4], float (&cb)[kTwo ? NT : 1][4], const float* sa = nullptr,
                                         const float* sb = nullptr) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      ca[nt][i] = 0.0f;
      if constexpr (kTwo) cb[nt][i] = 0.0f;
    }
  const int nkb = (K + kMmaKb - 1) / kMmaKb;
  MmaBlock cur, curb;
  if (kb0 < nkb) {
    mma_load<kF8>(cur, a_lo, a_hi, kb0, nkb, K);
    if constexpr (kTwo) mma_load<kF8>(curb, b_lo, b_hi, kb0, nkb, K);
  }
  if (!waited) {
    pdl_wait();  // x comes from the previous kernels
    pdl_trigger();
    waited = true;
  }
  if (kb0 < nkb) mma_prefetch_x<NT>(xr, kb0, K);
  // One block's products into (a, b): the accumulators themselves, or (FP8) the block's own sums.
  auto block = [&](int kb, float (&a)[NT][4], float (&b)[kTwo ? NT : 1][4]) {
    const int c = kb * kMmaKb + 16 * t;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint32_t wa[4], wb[4];
      mma_a(cur, i, wa);
      if constexpr (kTwo) mma_a(curb, i, wb);
      float4 xv[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        xv[nt] = xr[nt] && c + 4 * i + 4 <= K ? __ldg(reinterpret_cast<const float4*>(xr[nt] + c) + i)
                                              : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        uint32_t h0, l0, h1, l1;
        split_bf16x2(xv[nt].x, xv[nt].y, h0, l0);
        split_bf16x2(xv[nt].z, xv[nt].w, h1, l1);
        mma_bf16_acc(a[nt], wa[0], wa[1], wa[2], wa[3], h0, h1);
        mma_bf16_acc(a[nt], wa[0], wa[1], wa[2], wa[3], l0, l1);
        if constexpr (kTwo) {
          mma_bf16_acc(b[nt], wb[0], wb[1], wb[2], wb[3], h0, h1);
          mma_bf16_acc(b[nt], wb[0], wb[1], wb[2], wb[3], l0, l1);
        }
      }
    }
  };
  for (int kb = kb0; kb < nkb; kb += kstep) {
    const int kn = kb + kstep;
    MmaBlock nxt, nxtb;
    if (kn < nkb) {  // warp-uniform
      mma_load<kF8>(nxt, a_lo, a_hi, kn, nkb, K);
      if constexpr (kTwo) mma_load<kF8>(nxtb, b_lo, b_hi, kn, nkb, K);
      mma_prefetch_x<NT>(xr, kn, K);
    }
    if constexpr (kF8) {
      const float s_a = mma_scale(sa, kb, nkb), s_b = kTwo ? mma_scale(sb, kb, nkb) : 0.0f;
      mma_expand<true>(cur);
      if constexpr (kTwo) mma_expand<true>(curb);
      float ta[NT][4] = {}, tb[kTwo ? NT : 1][4] = {};
      block(kb, ta, tb);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          ca[nt][i] = fmaf(s_a, ta[nt][i], ca[nt][i]);
          if constexpr (kTwo) cb[nt][i] = fmaf(s_b, tb[nt][i], cb[nt][i]);
        }
    } else {
      block(kb, ca, cb);
    }
    if (kn < nkb) {
      cur = nxt;
      if constexpr (kTwo) curb = nxtb;
    }
  }
}

// One k-block of one x row as this lane's B fragments, split: h/l[i] = hi/lo of the columns its
// k16 tile i takes (c + 4i … c + 4i + 3); zero past K or for a missing row.
struct MmaX {
  uint32_t h[4][2], l[4][2];
};
__device__ __forceinline__ void mma_load_x(MmaX& f, const float* xr, int b, int K) {
  const int c = b * kMmaKb + 16 * (threadIdx.x & 3);
  float4 v[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    v[i] = xr && c + 4 * i + 4 <= K ? __ldg(reinterpret_cast<const float4*>(xr + c) + i)
                                    : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    split_bf16x2(v[i].x, v[i].y, f.h[i][0], f.l[i][0]);
    split_bf16x2(v[i].z, v[i].w, f.h[i][1], f.l[i][1]);
  }
}
// c += W[16 rows, block]·x[8 rows, block]ᵀ (both terms of x).
__device__ __forceinline__ void mma_block(float (&c)[4], const MmaBlock& w, const MmaX& x) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t a[4];
    mma_a(w, i, a);
    mma_bf16_acc(c, a[0], a[1], a[2], a[3], x.h[i][0], x.h[i][1]);
    mma_bf16_acc(c, a[0], a[1], a[2], a[3], x.l[i][0], x.l[i][1]);
  }
}

// This warp's accumulators to red (its [16][NT·8 + 1] slice: the odd row stride spreads the
// epilogue's reads over the banks).
template <int NT>
__device__ __forceinline__ void mma_stash(float* red, const float (&c)[NT][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  constexpr int S = NT * 8 + 1;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    red[g * S + nt * 8 + 2 * t] = c[nt][0];
    red[g * S + nt * 8 + 2 * t + 1] = c[nt][1];
    red[(g + 8) * S + nt * 8 + 2 * t] = c[nt][2];
    red[(g + 8) * S + nt * 8 + 2 * t + 1] = c[nt][3];
  }
}
template <int NT> constexpr int kMmaStash = 16 * (NT * 8 + 1);  // floats per warp

// The GEMVs' epilogue: for rbs row blocks from block `block0` (16 weight rows each), the sum of their
// ks warps' stashed slices in warp order, stored to y (heads of head_rows rows, head_y apart) or,
// past n_out, to y2.
template <int NT>
__device__ __forceinline__ void gemv_store(const GemvArgs& g, const float* red, int block0, int rbs, int ks,
                                           int total) {
  constexpr int S = NT * 8 + 1;
  const int i = threadIdx.x & 15;
  for (int b = 0; b < rbs; ++b)
    for (int q = threadIdx.x >> 4; q < g.n; q += blockDim.x >> 4) {
      const int j0 = (block0 + b) * 16, j = j0 + i;
      if (j >= total || (j0 < g.n_out && j >= g.n_out)) continue;
      float v = 0.0f;
      for (int k = 0; k < ks; ++k) v += red[(b * ks + k) * kMmaStash<NT> + i * S + q];
      const bool sec = j >= g.n_out;
      const int jj = sec ? j - g.n_out : j, h = sec ? 0 : jj / g.head_rows;
      float* o = sec ? g.y2 + int64_t(q) * g.ldy2 + jj
                     : g.y + int64_t(q) * g.ldy + int64_t(h) * g.head_y + (jj - h * g.head_rows);
      *o = g.acc ? *o + v : v;
    }
}

// The grouped experts' launch arguments (cuda_decode_ops.cu builds them; its F32-FMA expert kernel
// takes them too).
struct ExpertArgs {
  const float* in;         // gate/up: the token rows x [N, K]; down: the activations [picks, K] in grouped order
  const int32_t* order;    // grouped position → pick
  const int32_t* offsets;  // first grouped position of each group, [groups + 1]
  const int32_t* items;    // work items (group, first pick), their count at items[2·max_items]
  int max_items;
  const int64_t* w0;       // per group: gate (or down) weight [rows_out, K]
  const int64_t* w1;       // per group: up weight (gate/up only)
  int k, nk, K, rows_out;
  float* out;  // [picks, rows_out] in grouped order
  const int64_t* s0 = nullptr;  // FP8: per group, w0's (and w1's) block scales [⌈rows_out/128⌉, lds]
  const int64_t* s1 = nullptr;
  int lds = 0;
};

// A GEMV launch over more rows of x than a CTA's registers hold: the CTAs along the grid's y take
// 8·NT rows each (they read the same weights at about the same time, the later ones from L2).
// Narrows g to this CTA's rows (CTA-uniform).
template <int NT> __device__ __forceinline__ void gemv_part(GemvArgs& g) {
  const int q0 = 8 * NT * int(blockIdx.y);
  if (q0) {
    g.x += int64_t(q0) * g.ldx;
    g.y += int64_t(q0) * g.ldy;
    if (g.y2) g.y2 += int64_t(q0) * g.ldy2;
  }
  g.n = min(g.n - q0, 8 * NT);
}

// The tensor-core GEMV (BF16 weights, cuda_decode_mma.cuh): each CTA's kMmaWarps warps take
// kMmaWarps / ks row blocks of 16 weight rows, ks warps per block splitting its k-blocks; every
// warp takes the CTA's ≤ 8·NT rows of x (gemv_part). The warps' sums meet in shared memory and are
// added in warp order. Row blocks never straddle W and W2 or two heads (checked on the host).
template <int NT, bool kF8>
__global__ void __launch_bounds__(32 * kMmaWarps, 2) gemv_mma_kernel(GemvArgs g, int ks) {
  extern __shared__ float red[];  // [kMmaWarps][kMmaStash<NT>]
  gemv_part<NT>(g);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2;
  const int rbs = kMmaWarps / ks, rb = warp / ks, kw = warp - rb * ks;
  const int total = g.n_out + g.n_out2, r0 = (int(blockIdx.x) * rbs + rb) * 16;
  const bool active = r0 < total, second = active && r0 >= g.n_out;
  const int jr = second ? r0 - g.n_out : (active ? r0 : 0), rows = second ? g.n_out2 : g.n_out;
  const int head = second ? 0 : jr / g.head_rows;
  const char* W = static_cast<const char*>(second ? g.W2 : g.W);
  const size_t row_bytes = size_t(g.K) * (kF8 ? 1 : 2);
  // Rows past the last are read as the last row again; their sums are not stored.
  const char* a_lo = W + size_t(min(jr + gq, rows - 1)) * row_bytes;
  const char* a_hi = W + size_t(min(jr + gq + 8, rows - 1)) * row_bytes;
  const float* srow = !kF8 ? nullptr : second ? g.scale2 + (jr / 128) * g.ld_scale2 : g.scale + (jr / 128) * g.ld_scale;
  const float* xr[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int q = nt * 8 + gq;
    xr[nt] = q < g.n ? g.x + int64_t(head) * g.head_x + int64_t(q) * g.ldx : nullptr;
  }
  float ca[NT][4], unused[1][4];
  bool waited = false;
  mma_rows<NT, false, kF8>(a_lo, a_hi, nullptr, nullptr, g.K, active ? kw : 1 << 30, ks, xr, waited, ca, unused, srow);
  mma_stash<NT>(red + warp * kMmaStash<NT>, ca);
  __syncthreads();
  gemv_store<NT>(g, red, int(blockIdx.x) * rbs, rbs, ks, total);
}

// The tensor-core GEMV for K ≤ 16·kRounds k-blocks: a CTA of nw ≤ kExpRowWarps warps (the launch's
// choice, a multiple of ks) takes a range of steps of 16·(nw / ks) weight rows and its ≤ 8·NT rows
// of x (gemv_part: beyond 32 rows x's fragments would not fit the registers); warp (rb, kw)
// multiplies k-blocks kw, kw + ks, … (kRounds of them) of row block rb. With one round its x
// fragments (every n-tile, split once) stay in registers while the rows' head is the same; with
// two (bench-0.7b's o_proj, K 2048) they are loaded for every round, one launch where two launches
// of 16 k-blocks, the second adding into y, cost a launch and an epilogue more. The next (step,
// round)'s weights load while one is multiplied, and each step's partial sums meet in a
// double-buffered shared array (one barrier per step), added in warp order.
template <int NT, bool kF8, int kRounds>
__global__ void __launch_bounds__(32 * kExpRowWarps, 1) gemv_rows_kernel(GemvArgs g, int ks, int steps_per_cta) {
  extern __shared__ float red[];  // [2][nw][kMmaStash<NT>]
  gemv_part<NT>(g);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, nw = blockDim.x >> 5;
  const int rbs = nw / ks, rb = warp / ks, kw = warp - rb * ks;
  const int total = g.n_out + g.n_out2, step_rows = 16 * rbs;
  const int nkb = (g.K + kMmaKb - 1) / kMmaKb, all_steps = (total + step_rows - 1) / step_rows;
  const int s_begin = int(blockIdx.x) * steps_per_cta, s_end = min(all_steps, s_begin + steps_per_cta);
  const size_t row_bytes = size_t(g.ldw ? g.ldw : g.K) * (kF8 ? 1 : 2);
  // This warp's row block in step s: its weight rows g, g + 8 (past the last: the last again), head
  // and (FP8) the scale of k-block kb.
  auto rows_of = [&](int s, int kb, const char*& lo, const char*& hi, float& scale) {
    const int r0 = min((s * rbs + rb) * 16, total - 1);
    const bool second = r0 >= g.n_out;
    const int jr = second ? r0 - g.n_out : r0, rows = second ? g.n_out2 : g.n_out;
    const char* W = static_cast<const char*>(second ? g.W2 : g.W);
    lo = W + size_t(min(jr + gq, rows - 1)) * row_bytes;
    hi = W + size_t(min(jr + gq + 8, rows - 1)) * row_bytes;
    if constexpr (kF8)
      scale = mma_scale(second ? g.scale2 + (jr / 128) * g.ld_scale2 : g.scale + (jr / 128) * g.ld_scale, kb, nkb);
    return second ? 0 : jr / g.head_rows;
  };
  MmaBlock cur, nxt;
  const char *lo, *hi;
  float scale = 1.0f, next_scale = 1.0f;
  int head = rows_of(s_begin, kw, lo, hi, scale);
  mma_load<kF8>(cur, lo, hi, kw, nkb, g.K);
  pdl_wait();  // x (and y, when accumulating) come from the previous kernels
  pdl_trigger();
  MmaX xf[NT];
  auto load_x = [&](int h, int kb) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int q = nt * 8 + gq;
      mma_load_x(xf[nt], q < g.n && kb < nkb ? g.x + int64_t(h) * g.head_x + int64_t(q) * g.ldx : nullptr, kb, g.K);
    }
  };
  int x_head = head;
  if constexpr (kRounds == 1) load_x(head, kw);
  for (int s = s_begin; s < s_end; ++s) {
    float c[NT][4] = {};
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      int next_head = head;
      const bool last = r + 1 == kRounds;
      if (!last || s + 1 < s_end) {
        next_head = rows_of(last ? s + 1 : s, kw + (last ? 0 : r + 1) * ks, lo, hi, next_scale);
        mma_load<kF8>(nxt, lo, hi, kw + (last ? 0 : r + 1) * ks, nkb, g.K);
      }
      if (kRounds > 1 || head != x_head) {  // warp-uniform: this round's (or a new head's) slice of x
        load_x(head, kw + r * ks);
        x_head = head;
      }
      mma_expand<kF8>(cur);
      if constexpr (kF8) {
        float t[NT][4] = {};
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma_block(t[nt], cur, xf[nt]);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) c[nt][i] = r == 0 ? t[nt][i] * scale : fmaf(scale, t[nt][i], c[nt][i]);
      } else {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma_block(c[nt], cur, xf[nt]);
      }
      cur = nxt;
      head = next_head;
      scale = next_scale;
    }
    float* buf = red + ((s - s_begin) & 1) * nw * kMmaStash<NT>;
    mma_stash<NT>(buf + warp * kMmaStash<NT>, c);
    __syncthreads();
    gemv_store<NT>(g, buf, s * rbs, rbs, ks, total);
  }
}

// Work item i of the grouping: group e, the item's first grouped position c0 and its n picks (at
// most kChunk).
struct ExpertItem {
  int e, c0, n;
};
__device__ __forceinline__ ExpertItem expert_item(const ExpertArgs& a, int i) {
  const int e = a.items[2 * i], c0 = a.offsets[e] + a.items[2 * i + 1];
  return {e, c0, min(kChunk, a.offsets[e + 1] - c0)};
}

// A work item's x row for lane group gq (null past its n picks): the pick's token row for gate/up,
// the grouped activation row for down.
template <bool kGateUp>
__device__ __forceinline__ const float* expert_x_row(const ExpertArgs& a, int c0, int gq, int n) {
  if (gq >= n) return nullptr;
  if (!kGateUp) return a.in + int64_t(c0 + gq) * a.K;
  const int pick = a.order[c0 + gq];
  return a.in + int64_t(pick < a.nk ? pick / a.k : pick - a.nk) * a.K;
}

// The expert kernels' epilogue: weight rows [row0, min(row0 + 16·rbs, row_end)) of the item's n picks,
// each the sum of its ks warps' stashed slices in warp order (warps: the CTA's, whose up-projection
// slices follow the gate's), stored as silu(gate)·up for gate/up.
template <bool kGateUp>
__device__ __forceinline__ void expert_store(const ExpertArgs& a, const float* red, int warps, int rbs, int ks, int c0,
                                             int n, int row0, int row_end) {
  constexpr int S = 9;
  for (int idx = threadIdx.x; idx < rbs * 16 * n; idx += blockDim.x) {
    const int i = idx & 15, b = (idx >> 4) % rbs, q = (idx >> 4) / rbs;
    const int j = row0 + b * 16 + i;
    if (j >= row_end) continue;
    float gs = 0.0f, us = 0.0f;
    for (int k = 0; k < ks; ++k) {
      gs += red[(b * ks + k) * kMmaStash<1> + i * S + q];
      if constexpr (kGateUp) us += red[(warps + b * ks + k) * kMmaStash<1> + i * S + q];
    }
    a.out[int64_t(c0 + q) * a.rows_out + j] = kGateUp ? gs / (1.0f + expf(-gs)) * us : gs;
  }
}

// The tensor-core expert kernel (BF16 or FP8 weights): work item blockIdx.y (a group and up to
// kChunk of its picks: one n-tile), row blocks as gemv_mma_kernel's. kGateUp: out =
// silu(x·g_j)·(x·u_j) with x the pick's token row; otherwise out = act_p·d_j. Gate/up waits first
// (its work items come from the kernel before it); down, whose items come from the grouping two
// kernels back (complete by now: pdl.cuh), waits in mma_rows after its first weight loads.
template <bool kGateUp, bool kF8>
__global__ void __launch_bounds__(32 * kMmaWarps, 2) expert_mma_kernel(ExpertArgs a, int ks) {
  extern __shared__ float red[];  // [kGateUp ? 2 : 1][kMmaWarps][kMmaStash<1>]
  if constexpr (kGateUp) {
    pdl_wait();
    pdl_trigger();
  }
  if (int(blockIdx.y) >= a.items[2 * a.max_items]) return;  // CTA-uniform
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2;
  const auto [e, c0, n] = expert_item(a, int(blockIdx.y));
  const int rbs = kMmaWarps / ks, rb = warp / ks, kw = warp - rb * ks;
  const int r0 = (int(blockIdx.x) * rbs + rb) * 16;
  const float* xr[1] = {expert_x_row<kGateUp>(a, c0, gq, n)};
  const size_t row_bytes = size_t(a.K) * (kF8 ? 1 : 2), lo = size_t(min(r0 + gq, a.rows_out - 1)) * row_bytes,
               hi = size_t(min(r0 + gq + 8, a.rows_out - 1)) * row_bytes;
  const char* A = reinterpret_cast<const char*>(a.w0[e]);
  const char* B = kGateUp ? reinterpret_cast<const char*>(a.w1[e]) : nullptr;
  const int64_t srow = int64_t(min(r0, a.rows_out - 1) / 128) * a.lds;
  const float* sa = kF8 ? reinterpret_cast<const float*>(a.s0[e]) + srow : nullptr;
  const float* sb = kF8 && kGateUp ? reinterpret_cast<const float*>(a.s1[e]) + srow : nullptr;
  float ga[1][4], ub[1][4];
  bool waited = kGateUp;
  mma_rows<1, kGateUp, kF8>(A + lo, A + hi, kGateUp ? B + lo : nullptr, kGateUp ? B + hi : nullptr, a.K,
                            r0 < a.rows_out ? kw : 1 << 30, ks, xr, waited, ga, ub, sa, sb);
  mma_stash<1>(red + warp * kMmaStash<1>, ga);
  if (kGateUp) mma_stash<1>(red + (kMmaWarps + warp) * kMmaStash<1>, ub);
  __syncthreads();
  expert_store<kGateUp>(a, red, kMmaWarps, rbs, ks, c0, n, int(blockIdx.x) * rbs * 16, a.rows_out);
}

// The tensor-core expert kernel for K ≤ 16·BPW k-blocks. The work is the flat sequence of (work
// item, step) pairs, items in order, each step 16·(kExpRowWarps / ks) weight rows of the item's
// group; CTA i takes the i-th of gridDim.x equal parts of it. The item count is read on the device,
// so every CTA gets the same number of steps (±1) whatever the routing did: a grid of work items ×
// row ranges sized for the most items a step can have left ~15 of the H200's 132 SMs idle at
// bench-0.7b's batch 32 and some CTAs a step more than others. Warp (rb, kw) owns k-blocks kw, kw + ks, … (BPW
// of them). An item's x fragments (its ≤ 8 rows, split once) stay in registers while its steps
// last, the next step's weights (across an item boundary too) load while a step is multiplied, and
// each step's partial sums meet in a double-buffered shared array (one barrier per step). Gate/up
// waits first (its items come from the kernel before it); down reads its items (the grouping two
// kernels back, complete by now: pdl.cuh) and loads its first step's weights before waiting for act.
template <bool kGateUp, int BPW, bool kF8>
__global__ void __launch_bounds__(32 * kExpRowWarps, 1) expert_rows_kernel(ExpertArgs a, int ks) {
  extern __shared__ float red[];  // [2][kGateUp ? 2 : 1][kExpRowWarps][kMmaStash<1>]
  if constexpr (kGateUp) {
    pdl_wait();
    pdl_trigger();
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2;
  const int rbs = kExpRowWarps / ks, rb = warp / ks, kw = warp - rb * ks;
  const int nkb = (a.K + kMmaKb - 1) / kMmaKb;
  const int step_rows = 16 * rbs, steps = (a.rows_out + step_rows - 1) / step_rows;
  const int count = a.items[2 * a.max_items];
  const int64_t total = int64_t(count) * steps;
  const int f_begin = int(total * blockIdx.x / gridDim.x), f_end = int(total * (blockIdx.x + 1) / gridDim.x);
  if (f_begin >= f_end) return;  // CTA-uniform; the last CTA's part is never empty, so one CTA waits
  const size_t row_bytes = size_t(a.K) * (kF8 ? 1 : 2);
  MmaBlock cur[BPW], curb[kGateUp ? BPW : 1], nxt[BPW], nxtb[kGateUp ? BPW : 1];
  // FP8: each block's scale (a step's, and the next step's while it loads).
  float sc[BPW] = {}, scb[BPW] = {}, nsc[BPW] = {}, nscb[BPW] = {};
  // Step s of group e. Rows past the last are read as the last row again; their sums are not stored.
  auto load = [&](int e, int s, MmaBlock (&w)[BPW], MmaBlock (&wb)[kGateUp ? BPW : 1], float (&ws)[BPW],
                  float (&wbs)[BPW]) {
    const char* A = reinterpret_cast<const char*>(a.w0[e]);
    const char* B = kGateUp ? reinterpret_cast<const char*>(a.w1[e]) : nullptr;
    const int r0 = s * step_rows + rb * 16;
    const size_t lo = size_t(min(r0 + gq, a.rows_out - 1)) * row_bytes,
                 hi = size_t(min(r0 + gq + 8, a.rows_out - 1)) * row_bytes;
    const int64_t srow = int64_t(min(r0, a.rows_out - 1) / 128) * a.lds;
#pragma unroll
    for (int j = 0; j < BPW; ++j) {
      mma_load<kF8>(w[j], A + lo, A + hi, kw + j * ks, nkb, a.K);
      if constexpr (kGateUp) mma_load<kF8>(wb[j], B + lo, B + hi, kw + j * ks, nkb, a.K);
      if constexpr (kF8) {
        ws[j] = mma_scale(reinterpret_cast<const float*>(a.s0[e]) + srow, kw + j * ks, nkb);
        if constexpr (kGateUp) wbs[j] = mma_scale(reinterpret_cast<const float*>(a.s1[e]) + srow, kw + j * ks, nkb);
      }
    }
  };
  MmaX xf[BPW];
  auto load_x = [&](const ExpertItem& it) {
    const float* xr = expert_x_row<kGateUp>(a, it.c0, gq, it.n);
#pragma unroll
    for (int j = 0; j < BPW; ++j) mma_load_x(xf[j], kw + j * ks < nkb ? xr : nullptr, kw + j * ks, a.K);
  };
  int item = f_begin / steps, s = f_begin - item * steps;
  ExpertItem it = expert_item(a, item);
  load(it.e, s, cur, curb, sc, scb);
  // The next item, read while this one's steps run: a step that crosses to it issues its weight
  // loads without waiting for the item list.
  ExpertItem next = item + 1 < count ? expert_item(a, item + 1) : it;
  if constexpr (!kGateUp) {
    pdl_wait();  // act comes from the gate/up kernel
    pdl_trigger();
  }
  load_x(it);
  constexpr int kMats = kGateUp ? 2 : 1;
  for (int f = f_begin; f < f_end; ++f) {
    const bool more = f + 1 < f_end, cross = s + 1 == steps;  // CTA-uniform
    if (more) load(cross ? next.e : it.e, cross ? 0 : s + 1, nxt, nxtb, nsc, nscb);
    float ga[1][4] = {}, ub[1][4] = {};
#pragma unroll
    for (int j = 0; j < BPW; ++j) {
      if constexpr (kF8) {
        float tg[4] = {}, tu[4] = {};
        mma_expand<true>(cur[j]);
        mma_block(tg, cur[j], xf[j]);
        if constexpr (kGateUp) {
          mma_expand<true>(curb[j]);
          mma_block(tu, curb[j], xf[j]);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          ga[0][i] = fmaf(sc[j], tg[i], ga[0][i]);
          if constexpr (kGateUp) ub[0][i] = fmaf(scb[j], tu[i], ub[0][i]);
        }
      } else {
        mma_block(ga[0], cur[j], xf[j]);
        if constexpr (kGateUp) mma_block(ub[0], curb[j], xf[j]);
      }
    }
    if (more && cross) load_x(next);  // the MMAs above have read xf; the loads overlap the epilogue
    float* buf = red + ((f - f_begin) & 1) * kMats * kExpRowWarps * kMmaStash<1>;
    mma_stash<1>(buf + warp * kMmaStash<1>, ga);
    if constexpr (kGateUp) mma_stash<1>(buf + (kExpRowWarps + warp) * kMmaStash<1>, ub);
    __syncthreads();
    expert_store<kGateUp>(a, buf, kExpRowWarps, rbs, ks, it.c0, it.n, s * step_rows, a.rows_out);
    if (more) {
#pragma unroll
      for (int j = 0; j < BPW; ++j) {
        cur[j] = nxt[j];
        if constexpr (kGateUp) curb[j] = nxtb[j];
        sc[j] = nsc[j];
        scb[j] = nscb[j];
      }
      if (cross) {
        it = next;
        if (++item + 1 < count) next = expert_item(a, item + 1);
        s = 0;
      } else {
        ++s;
      }
    }
  }
}

}  // namespace dsv3::cuda
