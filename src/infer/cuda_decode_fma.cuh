// The F32-FMA core of the decode GEMV and grouped-expert kernels (F32 or BF16 weights, a few rows
// of x staged in shared memory), and the expert kernel built on it. Included by cuda_decode_ops.cu
// (the GEMV) and cuda_decode_moe.cu (the experts) only.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "backend/cuda/common.cuh"
#include "backend/cuda/pdl.cuh"
#include "infer/cuda_decode_mma.cuh"
#include "infer/cuda_weight_vec.cuh"

namespace dsv3::cuda {

constexpr int kExpertWarps = 8;  // warps per CTA of expert_kernel

// The core of the GEMV and expert kernels, for one CTA: n ≤ kRows rows of x (src[q], in shared
// memory) times R weight rows per warp (A, and B when kTwo), K = nv 16-byte weight vectors, in passes
// of 32·U vectors per lane. Each pass loads the warp's weight vectors into registers first, then
// stages the pass's columns of the n rows into shared memory by cp.async (every copy in flight at
// once; the CTA's warps share them), then accumulates ga (and ub) with F32 FMAs. Before the first
// pass's staging: pdl_wait when kWait (the caller has not waited yet). With kNorm, the rows' RMSNorm
// factors (the backend's: sum of squares in double, then nw·(x·rs)), nw per column kept in
// registers: summed from the staged rows when one pass covers K (x is read from global memory
// once), else from global memory before the first staging. Vectors past the row are zero in both
// operands. `active`: this warp has weight rows (warps without take part in the staging and its
// barriers only). kRows (kChunk, or 1 for one-row steps) sizes the unrolled per-row code: at one
// row the kernel is a fraction as long, and every launch starts on a cold instruction cache.
struct TileSmem {
  const float* src[kChunk];
  float rs[kChunk];
};
// rs = 1/sqrt(mean(x²) + eps) of one row of K floats (K % 4 == 0, 16-byte aligned; global or
// shared memory), by one warp: every lane's loads issued before its sum, the squares summed in
// double (the backend's rmsnorm), the lanes' sums by butterfly; lane 0 writes rs.
template <bool kGlobal>
__device__ __forceinline__ void row_rstd(const float4* x4, int K, float eps, float& rs) {
  const int lane = threadIdx.x & 31;
  double ss = 0.0;
  for (int b = 0; b < K / 4; b += 32 * 8) {
    float4 t[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int c = b + i * 32 + lane;
      t[i] = c < K / 4 ? (kGlobal ? __ldg(x4 + c) : x4[c]) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i)
      ss += double(t[i].x) * t[i].x + double(t[i].y) * t[i].y + double(t[i].z) * t[i].z + double(t[i].w) * t[i].w;
  }
  ss = warp_sum(ss);
  if (lane == 0) rs = float(1.0 / sqrt(ss / double(K) + double(eps)));
}
template <class WT, int U, int R, bool kTwo, bool kNorm, bool kWait, int kRows>
__device__ __forceinline__ void tile_rows(const char* A, const char* B, size_t row_bytes, bool active, int nv,
                                          int n, TileSmem& ts, float* xs_sm, const void* nw, DType nt, float eps,
                                          float (&ga)[R][kRows], float (&ub)[kTwo ? R : 1][kRows]) {
  constexpr int kV = kVecCols<WT>, kCols = 32 * U * kV;  // x columns per pass
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int K = nv * kV;
  const bool one_pass = nv <= 32 * U;
#pragma unroll
  for (int q = 0; q < kRows; ++q) {
#pragma unroll
    for (int r = 0; r < R; ++r) ga[r][q] = 0.0f;
#pragma unroll
    for (int r = 0; r < (kTwo ? R : 1); ++r) ub[r][q] = 0.0f;
  }
  for (int v0 = 0; v0 < nv; v0 += 32 * U) {
    uint4 wa[R][U], wb[kTwo ? R : 1][U];
    float nwv[kNorm ? U : 1][kV];
    if (active) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = v0 + u * 32 + lane;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          wa[r][u] = v < nv ? ld_weights(A + r * row_bytes + size_t(v) * 16) : make_uint4(0, 0, 0, 0);
          if constexpr (kTwo) wb[r][u] = v < nv ? ld_weights(B + r * row_bytes + size_t(v) * 16) : make_uint4(0, 0, 0, 0);
        }
        if constexpr (kNorm) {
#pragma unroll
          for (int i = 0; i < kV; ++i) nwv[u][i] = v < nv ? load_f(nw, nt, v * kV + i) : 0.0f;
        }
      }
    }
    if (v0 == 0) {
      if constexpr (kWait) {
        pdl_wait();  // x comes from the previous kernels
        pdl_trigger();
      }
      if constexpr (kNorm) {
        if (!one_pass) {
          __syncthreads();  // the caller's ts.src
          for (int q = warp; q < n; q += nwarps) row_rstd<true>(reinterpret_cast<const float4*>(ts.src[q]), K, eps, ts.rs[q]);
        }
      }
    }
    __syncthreads();  // the previous pass is done with xs_sm (and rs is written)
    const int c0 = v0 * kV, cols4 = min(kCols, K - c0) / 4;
    for (int i = threadIdx.x; i < n * cols4; i += blockDim.x) {
      const int q = i / cols4, c = i - q * cols4;
      cp_async16(xs_sm + q * kCols + 4 * c, ts.src[q] + c0 + 4 * c);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    if constexpr (kNorm) {
      if (one_pass) {  // the staged rows are whole: their factors from shared memory
        for (int q = warp; q < n; q += nwarps) row_rstd<false>(reinterpret_cast<const float4*>(xs_sm + q * kCols), K, eps, ts.rs[q]);
        __syncthreads();
      }
    }
    if (!active) continue;
    // Per weight vector: unpacked to F32 once, then applied to every row of x. Each accumulator
    // still sums in the vector order u, then column order i.
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int vv = u * 32 + lane;
      if (v0 + vv >= nv) break;
      float wf[R][kV], bf[kTwo ? R : 1][kV];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        unpack_w<WT>(wa[r][u], wf[r]);
        if constexpr (kTwo) unpack_w<WT>(wb[r][u], bf[r]);
      }
#pragma unroll
      for (int q = 0; q < kRows; ++q) {
        if (q >= n) break;
        float xs[kV];
#pragma unroll
        for (int i = 0; i < kV; i += 4) {
          const float4 t = *reinterpret_cast<const float4*>(xs_sm + q * kCols + vv * kV + i);
          xs[i] = t.x;
          xs[i + 1] = t.y;
          xs[i + 2] = t.z;
          xs[i + 3] = t.w;
        }
        if constexpr (kNorm) {
          const float rq = ts.rs[q];
#pragma unroll
          for (int i = 0; i < kV; ++i) xs[i] = nwv[u][i] * (xs[i] * rq);
        }
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int i = 0; i < kV; ++i) {
            ga[r][q] = fmaf(wf[r][i], xs[i], ga[r][q]);
            if constexpr (kTwo) ub[r][q] = fmaf(bf[r][i], xs[i], ub[r][q]);
          }
      }
    }
  }
}
// The warp sums of ga[r][q] (and ub[r][q] when kTwo) for the n rows of x; lane 0 passes each to
// store(r, q, Σga, Σub).
template <bool kTwo, int R, int kRows, class F>
__device__ __forceinline__ void reduce_rows(const float (&ga)[R][kRows], const float (&ub)[kTwo ? R : 1][kRows],
                                            int n, F&& store) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int q = 0; q < kRows; ++q) {
      if (q >= n) break;
      const float g = warp_sum(ga[r][q]);
      const float u = kTwo ? warp_sum(ub[kTwo ? r : 0][q]) : 0.0f;
      if (lane == 0) store(r, q, g, u);
    }
}
template <class WT, int U> constexpr size_t tile_smem() { return size_t(kChunk) * 32 * U * kVecCols<WT> * sizeof(float); }

// Work item blockIdx.y (a group and up to kChunk of its picks), R weight rows per warp (blockIdx.x:
// kExpertWarps·R rows per CTA); the picks' rows are staged in shared memory (tile_rows). kGateUp: out = silu(x·g_j)·(x·u_j) with x the pick's
// token row; otherwise out = act_p·d_j. Gate/up waits first: its work items come from the kernel
// before it. Down's come from the grouping two kernels back, complete by now (pdl.cuh), so it reads
// them and issues its weight loads before waiting for act.
template <class WT, bool kGateUp, int U, int R, int kRows>
__global__ void __launch_bounds__(32 * kExpertWarps) expert_kernel(ExpertArgs a) {
  extern __shared__ __align__(16) float xs_sm[];
  __shared__ TileSmem ts;
  if constexpr (kGateUp) {
    pdl_wait();
    pdl_trigger();
  }
  const int warp = threadIdx.x >> 5;
  const int j0 = (blockIdx.x * kExpertWarps + warp) * R;
  if (int(blockIdx.y) >= a.items[2 * a.max_items]) return;  // CTA-uniform exits only: tile_rows has barriers
  const int e = a.items[2 * blockIdx.y], ch = a.items[2 * blockIdx.y + 1];
  const int c0 = a.offsets[e], n = min(kRows, a.offsets[e + 1] - c0 - ch);
  if (threadIdx.x < n) {
    const int p = c0 + ch + threadIdx.x;
    if (kGateUp) {
      const int pick = a.order[p];
      ts.src[threadIdx.x] = a.in + int64_t(pick < a.nk ? pick / a.k : pick - a.nk) * a.K;
    } else {
      ts.src[threadIdx.x] = a.in + int64_t(p) * a.K;
    }
  }
  const bool active = j0 < a.rows_out;
  const size_t row_bytes = size_t(a.K) * sizeof(WT);
  const char* A = reinterpret_cast<const char*>(a.w0[e]) + size_t(active ? j0 : 0) * row_bytes;
  const char* B = kGateUp ? reinterpret_cast<const char*>(a.w1[e]) + size_t(active ? j0 : 0) * row_bytes : nullptr;
  float ga[R][kRows], ub[kGateUp ? R : 1][kRows];
  tile_rows<WT, U, R, kGateUp, false, !kGateUp>(A, B, row_bytes, active, a.K / kVecCols<WT>, n, ts, xs_sm, nullptr,
                                               DType::F32, 0.0f, ga, ub);
  if (!active) return;
  reduce_rows<kGateUp>(ga, ub, n, [&](int r, int q, float g, float u) {
    a.out[int64_t(c0 + ch + q) * a.rows_out + j0 + r] = kGateUp ? g / (1.0f + expf(-g)) * u : g;
  });
}

}  // namespace dsv3::cuda
