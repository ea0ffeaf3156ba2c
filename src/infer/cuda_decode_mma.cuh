// The tensor-core core of the decode GEMV and grouped-expert kernels (cuda_decode_ops.cu): 16 BF16
// weight rows per warp times up to 64 rows of F32 x on mma.sync m16n8k16, FP32 accumulators.
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
// be ~2⁻⁹ relative: 1000× worse). Valid for |x| < 2¹²⁸·(1 − 2⁻⁹) (beyond, hi rounds to inf); a
// non-finite x gives NaN.
//
// The weights' 16-byte vectors go straight from HBM into A fragments: the sum over k does not
// depend on the order of the columns, so each lane's 16 consecutive columns of a row (two 16-byte
// loads) fill its A slots of four k16 MMAs, and x is read in the same permuted order (lane t of
// quad g: x row g, the same 16 columns, four float4 loads from L1). A 64-column k-block of 16 rows
// is 2 KB per weight; a warp takes every kstep-th k-block of its rows, two blocks' loads in flight
// per weight (all issued before the first pdl_wait).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "backend/cuda/pdl.cuh"
#include "infer/cuda_weight_vec.cuh"

namespace dsv3::cuda {

constexpr int kMmaWarps = 8;  // warps per CTA of the tensor-core kernels
constexpr int kMmaKb = 64;    // columns per k-block

// c += a·b, m16n8k16, BF16 operands, FP32 accumulators (not volatile: the compiler may interleave).
__device__ __forceinline__ void mma_bf16_acc(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// (x0, x1) = hi + lo + r, |r| ≤ 2⁻¹⁶|x| (see the top of the file); x0 in the low halves.
__device__ __forceinline__ void split_bf16x2(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
  const float2 hf = __bfloat1622float2(h);
  const __nv_bfloat162 l = __floats2bfloat162_rn(x0 - hf.x, x1 - hf.y);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = *reinterpret_cast<const uint32_t*>(&l);
}

// One warp: ca[nt] (and cb[nt] for a second weight, kTwo) = the sums over this warp's k-blocks
// (kb0, kb0 + kstep, …) of W[16 rows]·x[8 rows of n-tile nt]ᵀ, in the MMA accumulator layout
// (lane 4g + t: c[0], c[1] = weight row g, x rows 2t, 2t + 1; c[2], c[3] = weight row g + 8).
// a_lo / a_hi: this lane's weight rows g and g + 8 (byte pointers to the row starts; BF16, K % 8 ==
// 0, 16-byte aligned); xr[nt]: row nt·8 + g of x (F32, 16-byte aligned) or null for a missing row.
// With `waited` false, pdl_wait (and the trigger) come after the first loads of the weights.
template <int NT, bool kTwo>
__device__ __forceinline__ void mma_rows(const char* a_lo, const char* a_hi, const char* b_lo, const char* b_hi,
                                         int K, int kb0, int kstep, const float* const (&xr)[NT], bool& waited,
                                         float (&ca)[NT][4], float (&cb)[kTwo ? NT : 1][4]) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      ca[nt][i] = 0.0f;
      if constexpr (kTwo) cb[nt][i] = 0.0f;
    }
  const uint4 z = make_uint4(0, 0, 0, 0);
  const int nkb = (K + kMmaKb - 1) / kMmaKb;
  for (int kb = kb0; kb < nkb; kb += 2 * kstep) {
    // [d][0..1]: row g, columns c..c+7 and c+8..c+15; [d][2..3]: row g + 8.
    uint4 wa[2][4], wb[kTwo ? 2 : 1][4] = {};
#pragma unroll
    for (int d = 0; d < 2; ++d) {
      const int b = kb + d * kstep, c = b * kMmaKb + 16 * t;
      const bool v0 = b < nkb && c + 8 <= K, v1 = b < nkb && c + 16 <= K;
      const size_t o = size_t(c) * 2;
      wa[d][0] = v0 ? ld_weights(a_lo + o) : z;
      wa[d][1] = v1 ? ld_weights(a_lo + o + 16) : z;
      wa[d][2] = v0 ? ld_weights(a_hi + o) : z;
      wa[d][3] = v1 ? ld_weights(a_hi + o + 16) : z;
      if constexpr (kTwo) {
        wb[d][0] = v0 ? ld_weights(b_lo + o) : z;
        wb[d][1] = v1 ? ld_weights(b_lo + o + 16) : z;
        wb[d][2] = v0 ? ld_weights(b_hi + o) : z;
        wb[d][3] = v1 ? ld_weights(b_hi + o + 16) : z;
      }
    }
    if (!waited) {
      pdl_wait();  // x comes from the previous kernels
      pdl_trigger();
      waited = true;
    }
#pragma unroll
    for (int d = 0; d < 2; ++d) {
      const int b = kb + d * kstep, c = b * kMmaKb + 16 * t;
      if (b >= nkb) break;  // warp-uniform
      const uint32_t ra[8] = {wa[d][0].x, wa[d][0].y, wa[d][0].z, wa[d][0].w,
                              wa[d][1].x, wa[d][1].y, wa[d][1].z, wa[d][1].w};
      const uint32_t rh[8] = {wa[d][2].x, wa[d][2].y, wa[d][2].z, wa[d][2].w,
                              wa[d][3].x, wa[d][3].y, wa[d][3].z, wa[d][3].w};
      const int db = kTwo ? d : 0;
      const uint32_t sa[8] = {wb[db][0].x, wb[db][0].y, wb[db][0].z, wb[db][0].w,
                              wb[db][1].x, wb[db][1].y, wb[db][1].z, wb[db][1].w};
      const uint32_t sh[8] = {wb[db][2].x, wb[db][2].y, wb[db][2].z, wb[db][2].w,
                              wb[db][3].x, wb[db][3].y, wb[db][3].z, wb[db][3].w};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        float4 xv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
          xv[i] = xr[nt] && c + 4 * i + 4 <= K ? __ldg(reinterpret_cast<const float4*>(xr[nt] + c) + i)
                                                : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        // k16 tile i: logical columns 2t, 2t+1 ↔ physical c + 4i, +1; 2t + 8, +9 ↔ c + 4i + 2, +3.
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          uint32_t h0, l0, h1, l1;
          split_bf16x2(xv[i].x, xv[i].y, h0, l0);
          split_bf16x2(xv[i].z, xv[i].w, h1, l1);
          mma_bf16_acc(ca[nt], ra[2 * i], rh[2 * i], ra[2 * i + 1], rh[2 * i + 1], h0, h1);
          mma_bf16_acc(ca[nt], ra[2 * i], rh[2 * i], ra[2 * i + 1], rh[2 * i + 1], l0, l1);
          if constexpr (kTwo) {
            mma_bf16_acc(cb[nt], sa[2 * i], sh[2 * i], sa[2 * i + 1], sh[2 * i + 1], h0, h1);
            mma_bf16_acc(cb[nt], sa[2 * i], sh[2 * i], sa[2 * i + 1], sh[2 * i + 1], l0, l1);
          }
        }
      }
    }
  }
  if (!waited) {  // no k-block: still wait before the caller's epilogue touches outputs
    pdl_wait();
    pdl_trigger();
    waited = true;
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

}  // namespace dsv3::cuda
