// The per-warp arithmetic both BF16 training-attention families share (attention_bf16.cu's mma.sync
// kernels and attention_bf16_wgmma.cu's): a warp owns 16 rows of a tile in the m16n8 accumulator
// layout — value s[n][e] at row g + 8·(e >> 1) of the warp, column 8n + 2·t4 + (e & 1) (g = lane / 4,
// t4 = lane mod 4) — which is also how wgmma's m64nN accumulators fall on each warp.
#pragma once
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "backend/cuda/attention_bf16_wgmma.h"
#include "backend/cuda/mma.cuh"

namespace dsv3::cuda::attn {

// A warp's two rows per thread: their running maxima (raw scores) and partial sums of weights.
struct RowStats {
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.0f, l_hi = 0.0f;
};

// The online softmax over one tile of NT·8 keys from k0: keys past s_len and, causal, past a row's
// position (q_off + row) masked — only where the tile reaches past S or past the warp's first row
// (row0) — then s = exp2(s·sl2 − max), the maxima and sums updated. al_lo/al_hi: what the output
// accumulated so far must be multiplied by.
template <int NT>
__device__ __forceinline__ void softmax_tile(float (&s)[NT][4], RowStats& st, int64_t k0, int64_t s_len, bool causal,
                                             int64_t q_off, int64_t row0, int g, int t4, float sl2, float& al_lo,
                                             float& al_hi) {
  const int64_t row_lo = row0 + g, row_hi = row_lo + 8;
  if (k0 + NT * 8 > s_len || (causal && k0 + NT * 8 - 1 > q_off + row0)) {
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t key = k0 + n * 8 + 2 * t4 + (e & 1);
        const int64_t row = e < 2 ? row_lo : row_hi;
        if (key >= s_len || (causal && key > q_off + row)) s[n][e] = -INFINITY;
      }
  }
  float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    mx_lo = fmaxf(mx_lo, fmaxf(s[n][0], s[n][1]));
    mx_hi = fmaxf(mx_hi, fmaxf(s[n][2], s[n][3]));
  }
  mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
  mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
  mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
  mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
  const float mn_lo = fmaxf(st.m_lo, mx_lo), mn_hi = fmaxf(st.m_hi, mx_hi);
  // A row with every key so far masked keeps −inf: exp2(−inf − −inf) would be NaN.
  const float b_lo = mn_lo == -INFINITY ? 0.0f : mn_lo * sl2, b_hi = mn_hi == -INFINITY ? 0.0f : mn_hi * sl2;
  al_lo = ex2(st.m_lo * sl2 - b_lo);
  al_hi = ex2(st.m_hi * sl2 - b_hi);
  st.m_lo = mn_lo;
  st.m_hi = mn_hi;
  float ps_lo = 0.0f, ps_hi = 0.0f;
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    s[n][0] = ex2(fmaf(s[n][0], sl2, -b_lo));
    s[n][1] = ex2(fmaf(s[n][1], sl2, -b_lo));
    s[n][2] = ex2(fmaf(s[n][2], sl2, -b_hi));
    s[n][3] = ex2(fmaf(s[n][3], sl2, -b_hi));
    ps_lo += s[n][0] + s[n][1];
    ps_hi += s[n][2] + s[n][3];
  }
  st.l_lo = st.l_lo * al_lo + ps_lo;
  st.l_hi = st.l_hi * al_hi + ps_hi;
}

// The forward's rows out: O / l (0 where l is 0) into out's row (D columns of acc, dv written) and
// lse = m·scale + ln l; rows past T are not written. o: the warp's accumulators, D / 8 n-tiles.
template <int D>
__device__ __forceinline__ void write_rows(const float (&o)[D / 8][4], RowStats st, float* out, float* lse,
                                           int64_t b, int64_t hh, int64_t t, int64_t h, int64_t dv, int64_t row0,
                                           int g, int t4, float scale) {
  st.l_lo += __shfl_xor_sync(0xffffffffu, st.l_lo, 1);
  st.l_lo += __shfl_xor_sync(0xffffffffu, st.l_lo, 2);
  st.l_hi += __shfl_xor_sync(0xffffffffu, st.l_hi, 1);
  st.l_hi += __shfl_xor_sync(0xffffffffu, st.l_hi, 2);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = row0 + g + 8 * half;
    if (row >= t) continue;
    const float l = half ? st.l_hi : st.l_lo, m = half ? st.m_hi : st.m_lo;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    float* orow = out + ((b * t + row) * h + hh) * dv;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const int c = n * 8 + 2 * t4;
      if (c < dv) *reinterpret_cast<float2*>(orow + c) = make_float2(o[n][2 * half] * inv, o[n][2 * half + 1] * inv);
    }
    if (lse && t4 == 0) lse[(b * h + hh) * t + row] = m * scale + logf(l);
  }
}

// The backward's transposed tile (rows keys key_lo, key_lo + 8; columns queries i0 + 8n + 2·t4 +
// (e & 1)): s becomes P = exp2(s·sl2 − lse2[query]) (0 on padded queries, lse2 = +inf; masked past S
// and, causal, past each query's position where need_mask) and dp becomes dS = P∘(dP − D[query]).
template <int NT>
__device__ __forceinline__ void p_and_ds(float (&s)[NT][4], float (&dp)[NT][4], const float* lt, const float* dd,
                                         bool need_mask, int64_t key_lo, int64_t s_len, bool causal, int64_t q_off,
                                         int64_t i0, int t4, float sl2) {
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int qc = n * 8 + 2 * t4 + (e & 1);
      float p = ex2(fmaf(s[n][e], sl2, -lt[qc]));
      if (need_mask) {
        const int64_t key = e >= 2 ? key_lo + 8 : key_lo;
        if (key >= s_len || (causal && key > q_off + i0 + qc)) p = 0.0f;
      }
      s[n][e] = p;
      dp[n][e] = p * (dp[n][e] - dd[qc]);
    }
}

// The dk/dv kernels' first query tile (of `tile` queries) for the keys from k0: causal, the first
// query that sees key k0, rounded down to the tile; else 0.
__device__ __forceinline__ int64_t first_query(int64_t k0, int64_t q_off, bool causal, int tile) {
  return causal ? (k0 - q_off > 0 ? k0 - q_off : 0) / tile * tile : 0;
}

// dSᵀ rows of `rows` keys from k0 (rows, tp apart, at dst): zero the query columns before `first`
// (the tiles the causal mask skips) that the dQ matmul reads, i.e. from the first block of dq_rows
// queries whose keys reach k0 (attention_bf16.cu, the blocks). The CTA's nt threads share it.
__device__ __forceinline__ void zero_masked_ds(__nv_bfloat16* dst, int64_t tp, int rows, int64_t k0, int64_t q_off,
                                               bool causal, int64_t first, int64_t dq_rows, int nt) {
  const int64_t z0 = first_query(k0, q_off, causal, 1) / dq_rows * dq_rows;
  const int64_t z1 = first < tp ? first : tp, zv = z1 > z0 ? (z1 - z0) / 8 : 0;
  for (int64_t i = threadIdx.x; i < rows * zv; i += nt) {
    const int64_t r = i / zv;
    reinterpret_cast<uint4*>(dst + r * tp + z0)[i - r * zv] = make_uint4(0, 0, 0, 0);
  }
}

// An A fragment of dSᵀ (keys key_lo, key_lo + 8 × queries q0 + 2·t4, q0 + 8 + 2·t4, two each) into
// the [keys, tp] BF16 rows at row_lo (the row of key_lo).
__device__ __forceinline__ void store_ds(__nv_bfloat16* row_lo, int64_t tp, const uint32_t (&a)[4]) {
  __nv_bfloat16* row_hi = row_lo + 8 * tp;
  *reinterpret_cast<uint32_t*>(row_lo) = a[0];
  *reinterpret_cast<uint32_t*>(row_hi) = a[1];
  *reinterpret_cast<uint32_t*>(row_lo + 8) = a[2];
  *reinterpret_cast<uint32_t*>(row_hi + 8) = a[3];
}

// dK (scaled) and dV rows out from the warp's accumulators to o's places (keys key_lo, key_lo + 8
// of batch element b; past S not written).
template <int DQK, int DV>
__device__ __forceinline__ void write_dkv(const float (&ak)[DQK / 8][4], const float (&av)[DV / 8][4],
                                          const AttnDkvOut& o, int64_t b, int64_t hh, int64_t s_len, int64_t dqk,
                                          int64_t dv_w, int64_t key_lo, int t4, float scale) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t key = key_lo + 8 * half;
    if (key >= s_len) continue;
    const int64_t tok = b * s_len + key;
    if (o.dk || o.dk_b || o.dk2) {
      float* r1 = o.dk ? o.dk + tok * o.dk_tok + hh * o.dk_head : nullptr;
      __nv_bfloat16* r1b = o.dk_b ? o.dk_b + tok * o.dk_tok + hh * o.dk_head : nullptr;
      float* r2 = o.dk2 ? o.dk2 + tok * o.dk2_tok + hh * o.dk2_head : nullptr;
#pragma unroll
      for (int n = 0; n < DQK / 8; ++n) {
        const int c = n * 8 + 2 * t4;
        if (c >= dqk) continue;
        const float2 val = make_float2(scale * ak[n][2 * half], scale * ak[n][2 * half + 1]);
        if (c >= o.dk_split) {
          if (r2) *reinterpret_cast<float2*>(r2 + (c - o.dk_split)) = val;
        } else if (r1) {
          *reinterpret_cast<float2*>(r1 + c) = val;
        } else if (r1b) {
          *reinterpret_cast<__nv_bfloat162*>(r1b + c) = __float22bfloat162_rn(val);
        }
      }
    }
    if (o.dv || o.dv_b) {
      float* orow = o.dv ? o.dv + tok * o.dv_tok + hh * o.dv_head : nullptr;
      __nv_bfloat16* orow_b = o.dv_b ? o.dv_b + tok * o.dv_tok + hh * o.dv_head : nullptr;
#pragma unroll
      for (int n = 0; n < DV / 8; ++n) {
        const int c = n * 8 + 2 * t4;
        if (c >= dv_w) continue;
        const float2 val = make_float2(av[n][2 * half], av[n][2 * half + 1]);
        if (orow) *reinterpret_cast<float2*>(orow + c) = val;
        else *reinterpret_cast<__nv_bfloat162*>(orow_b + c) = __float22bfloat162_rn(val);
      }
    }
  }
}

}  // namespace dsv3::cuda::attn
