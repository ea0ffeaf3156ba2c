#include "infer/cuda_decode_ops.h"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "backend/cuda/common.cuh"
#include "backend/cuda/graph.h"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/pdl.cuh"
#include "infer/cuda_decode_mma.cuh"
#include "infer/cuda_weight_vec.cuh"

namespace dsv3 {
using namespace cuda;

namespace {

constexpr int kMaxGemvRows = 64;
constexpr int64_t kNormRouterMaxWeights = int64_t(1) << 17;  // E·H of a fused router (every row's CTA reads it)
constexpr int kGemvWarps = 4;  // GEMV: 4 warps per CTA (many CTAs for short outputs)
constexpr int kExpertWarps = 8;
constexpr int kDefaultMmaRows = 2;  // the tensor-core path from this many rows of x (measured: docs/cuda.md)

// One CTA: picks (r·k + j) grouped by expert, token order kept within an expert.
// order[p] = pick at grouped position p, inv[pick] = p, offsets[e] = first position of expert e.
// With a fused shared expert (group E), every token r is one more pick nk + r, after the routed ones.
// items[2i], items[2i + 1] (i < items[2·max_items]): the expert kernels' work items, a group with picks
// and the first of up to kChunk of its picks, groups ascending (their CTAs index the list: no CTA
// for a group without picks or a chunk past a group's end). Each warp takes experts warp, warp + nw,
// …, and finds an expert's picks 32 at a time by ballot (a pick's place is the count of earlier
// lanes' and chunks' matches); warp 0 scans the counts. The former kernel, one thread per expert
// scanning every pick and one thread writing the items, took 10 µs of a 160 µs bench-0.7b layer at
// 32 rows (Nsight Compute, H200).
__global__ void group_kernel(const int32_t* ids, int nk, int E, int n_shared_rows, int32_t* order, int32_t* inv,
                             int32_t* offsets, int32_t* items, int max_items) {
  extern __shared__ int32_t gsm[];
  int32_t* off = gsm;                 // [E] counts, then first grouped positions
  int32_t* first_item = off + E;      // [E + 1] first work item of each group (E: the shared expert)
  int32_t* sid = first_item + E + 1;  // [nk] the ids, read once (coalesced)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  pdl_wait();
  pdl_trigger();
  for (int i = threadIdx.x; i < nk; i += blockDim.x) sid[i] = ids[i];
  __syncthreads();
  for (int e = warp; e < E; e += nw) {
    int c = 0;
    for (int i0 = 0; i0 < nk; i0 += 32) c += __popc(__ballot_sync(0xffffffffu, i0 + lane < nk && sid[i0 + lane] == e));
    if (lane == 0) off[e] = c;
  }
  __syncthreads();
  if (warp == 0) {  // exclusive scans of the counts and of the items (ceil(count / kChunk) per expert)
    int pos = 0, it = 0;
    for (int e0 = 0; e0 < E; e0 += 32) {
      const int e = e0 + lane, c = e < E ? off[e] : 0, ni = (c + kChunk - 1) / kChunk;
      int cs = c, is = ni;
      for (int o = 1; o < 32; o <<= 1) {
        const int u = __shfl_up_sync(0xffffffffu, cs, o), v = __shfl_up_sync(0xffffffffu, is, o);
        if (lane >= o) {
          cs += u;
          is += v;
        }
      }
      if (e < E) {
        off[e] = offsets[e] = pos + cs - c;
        first_item[e] = it + is - ni;
      }
      pos += __shfl_sync(0xffffffffu, cs, 31);
      it += __shfl_sync(0xffffffffu, is, 31);
    }
    if (lane == 0) {
      offsets[E] = pos;
      if (n_shared_rows) offsets[E + 1] = pos + n_shared_rows;
      first_item[E] = it;
    }
  }
  __syncthreads();
  const unsigned below = (1u << lane) - 1u;
  for (int e = warp; e < E; e += nw) {
    const int start = off[e];
    int p = start;
    for (int i0 = 0; i0 < nk; i0 += 32) {
      const int i = i0 + lane;
      const bool mine = i < nk && sid[i] == e;
      const unsigned m = __ballot_sync(0xffffffffu, mine);
      if (mine) {
        const int q = p + __popc(m & below);
        order[q] = i;
        inv[i] = q;
      }
      p += __popc(m);
    }
    for (int ch = lane * kChunk; ch < p - start; ch += 32 * kChunk) {
      const int ni = first_item[e] + ch / kChunk;
      if (ni < max_items) {
        items[2 * ni] = e;
        items[2 * ni + 1] = ch;
      }
    }
  }
  const int shared_first = first_item[E];
  for (int r = threadIdx.x; r < n_shared_rows; r += blockDim.x) order[nk + r] = nk + r;
  for (int ch = threadIdx.x * kChunk; ch < n_shared_rows; ch += blockDim.x * kChunk) {
    const int ni = shared_first + ch / kChunk;
    if (ni < max_items) {
      items[2 * ni] = E;
      items[2 * ni + 1] = ch;
    }
  }
  if (threadIdx.x == 0) items[2 * max_items] = min(shared_first + (n_shared_rows + kChunk - 1) / kChunk, max_items);
}

// The core of the GEMV and expert kernels, for one CTA: n ≤ kChunk rows of x (src[q], in shared
// memory) times R weight rows per warp (A, and B when kTwo), K = nv 16-byte weight vectors, in passes
// of 32·U vectors per lane. Each pass loads the warp's weight vectors into registers first, then
// stages the pass's columns of the n rows into shared memory by cp.async (every copy in flight at
// once; the CTA's warps share them), then accumulates ga (and ub) with F32 FMAs. Before the first
// pass's staging: pdl_wait when kWait (the caller has not waited yet), and with kNorm the rows'
// RMSNorm factors (the backend's: sum of squares in double, then nw·(x·rs)), nw per column kept
// in registers. Vectors past the row are zero in both operands. `active`: this warp has weight
// rows (warps without take part in the staging and its barriers only).
struct TileSmem {
  const float* src[kChunk];
  float rs[kChunk];
};
template <class WT, int U, int R, bool kTwo, bool kNorm, bool kWait>
__device__ __forceinline__ void tile_rows(const char* A, const char* B, size_t row_bytes, bool active, int nv,
                                          int n, TileSmem& ts, float* xs_sm, const void* nw, DType nt, float eps,
                                          float (&ga)[R][kChunk], float (&ub)[kTwo ? R : 1][kChunk]) {
  constexpr int kV = kVecCols<WT>, kCols = 32 * U * kV;  // x columns per pass
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int K = nv * kV;
#pragma unroll
  for (int q = 0; q < kChunk; ++q) {
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
        __syncthreads();  // the caller's ts.src
        for (int q = warp; q < n; q += nwarps) {
          // Every lane's loads of the row issued before the sum (K % 4 == 0, 16-byte aligned rows).
          const float4* x4 = reinterpret_cast<const float4*>(ts.src[q]);
          double ss = 0.0;
          for (int b = 0; b < K / 4; b += 32 * 8) {
            float4 t[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) {
              const int c = b + i * 32 + lane;
              t[i] = c < K / 4 ? __ldg(x4 + c) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
#pragma unroll
            for (int i = 0; i < 8; ++i)
              ss += double(t[i].x) * t[i].x + double(t[i].y) * t[i].y + double(t[i].z) * t[i].z + double(t[i].w) * t[i].w;
          }
          for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
          if (lane == 0) ts.rs[q] = float(1.0 / sqrt(ss / double(K) + double(eps)));
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
      for (int q = 0; q < kChunk; ++q) {
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
template <bool kTwo, int R, class F>
__device__ __forceinline__ void reduce_rows(const float (&ga)[R][kChunk], const float (&ub)[kTwo ? R : 1][kChunk],
                                            int n, F&& store) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int q = 0; q < kChunk; ++q) {
      if (q >= n) break;
      const float g = warp_sum(ga[r][q]);
      const float u = kTwo ? warp_sum(ub[kTwo ? r : 0][q]) : 0.0f;
      if (lane == 0) store(r, q, g, u);
    }
}
template <class WT, int U> constexpr size_t tile_smem() { return size_t(kChunk) * 32 * U * kVecCols<WT> * sizeof(float); }

// Work item blockIdx.y (a group and up to kChunk of its picks), R weight rows per warp (blockIdx.x:
// kExpertWarps·R rows per CTA); the picks' rows are staged in shared memory (tile_rows). kGateUp: out = silu(x·g_j)·(x·u_j) with x the pick's
// token row; otherwise out = act_p·d_j.
template <class WT, bool kGateUp, int U, int R>
__global__ void __launch_bounds__(32 * kExpertWarps) expert_kernel(ExpertArgs a) {
  extern __shared__ __align__(16) float xs_sm[];
  __shared__ TileSmem ts;
  pdl_wait();  // the grouping and the inputs come from the previous kernels
  pdl_trigger();
  const int warp = threadIdx.x >> 5;
  const int j0 = (blockIdx.x * kExpertWarps + warp) * R;
  if (int(blockIdx.y) >= a.items[2 * a.max_items]) return;  // CTA-uniform exits only: tile_rows has barriers
  const int e = a.items[2 * blockIdx.y], ch = a.items[2 * blockIdx.y + 1];
  const int c0 = a.offsets[e], n = min(kChunk, a.offsets[e + 1] - c0 - ch);
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
  float ga[R][kChunk], ub[kGateUp ? R : 1][kChunk];
  tile_rows<WT, U, R, kGateUp, false, false>(A, B, row_bytes, active, a.K / kVecCols<WT>, n, ts, xs_sm, nullptr,
                                               DType::F32, 0.0f, ga, ub);
  if (!active) return;
  reduce_rows<kGateUp>(ga, ub, n, [&](int r, int q, float g, float u) {
    a.out[int64_t(c0 + ch + q) * a.rows_out + j0 + r] = kGateUp ? g / (1.0f + expf(-g)) * u : g;
  });
}

// out[r] = Σ_j weights[r, j]·y[inv[r·k + j]] in top-k order (+ the fused shared expert's row), plus
// the residual row. With norm_w, also normed[r] = RMSNorm(out[r])·norm_w — the next block's input
// norm, one launch less per layer — with the backend's factor (rms_rstd, the same 256-thread column
// stride) and w·(x·rs), so its bits are the backend's. The row is kept in registers (NPT values per
// thread: H ≤ 256·NPT).
template <int NPT>
__global__ void combine_kernel(const float* y, const int32_t* inv, const float* wts, int k, int nk, bool shared,
                               int H, const float* residual, float* out, const void* norm_w, DType norm_t, float eps,
                               float* normed) {
  pdl_wait();
  pdl_trigger();
  const int r = blockIdx.x;
  __shared__ const float* rows[32];
  __shared__ float w[32];
  if (threadIdx.x < k) {  // k ≤ 32 (checked on the host)
    rows[threadIdx.x] = y + int64_t(inv[r * k + threadIdx.x]) * H;
    w[threadIdx.x] = wts[r * k + threadIdx.x];
  }
  __syncthreads();
  float v[NPT];
#pragma unroll
  for (int i = 0; i < NPT; ++i) {
    const int col = threadIdx.x + i * blockDim.x;
    v[i] = 0.0f;
    if (col >= H) continue;
    float acc = 0.0f;
    for (int j = 0; j < k; ++j) acc = fmaf(w[j], rows[j][col], acc);
    if (shared) acc += y[int64_t(nk + r) * H + col];
    v[i] = residual ? residual[int64_t(r) * H + col] + acc : acc;
    out[int64_t(r) * H + col] = v[i];
  }
  if (!norm_w) return;  // grid-uniform
  const float rs = rms_rstd(v, H, eps);
#pragma unroll
  for (int i = 0; i < NPT; ++i) {
    const int col = threadIdx.x + i * blockDim.x;
    if (col < H) normed[int64_t(r) * H + col] = load_f(norm_w, norm_t, col) * (v[i] * rs);
  }
}

// h[r] = RMSNorm(x[r])·norm_w as rmsnorm_reg_kernel computes it (rms_norm_row at the 256-thread
// column stride: the backend's bits), and logits[r, e] = h[r]·gate[e]: the
// router's GEMV inside the post-attention norm's launch, one launch fewer per MoE layer. The normed
// row goes through shared memory; warp w takes experts w, w + 8, …, each lane every 32nd 16-byte
// vector of the expert's row (four in flight), the lanes' sums added by a fixed butterfly.
template <class WT, int NPT>
__global__ void norm_router_kernel(const float* x, const void* norm_w, DType norm_t, float eps, const WT* gate, int H,
                                   int E, float* h, float* logits) {
  extern __shared__ __align__(16) float hs[];  // [H]
  pdl_wait();
  pdl_trigger();
  const int64_t r = blockIdx.x;
  float hv[NPT];
  rms_norm_row(x + r * H, norm_w, norm_t, H, eps, hv);
#pragma unroll
  for (int i = 0; i < NPT; ++i) {
    const int j = threadIdx.x + i * blockDim.x;
    if (j < H) h[r * H + j] = hs[j] = hv[i];
  }
  __syncthreads();
  constexpr int V = kVecCols<WT>;
  const int lane = threadIdx.x & 31, nv = H / V;
  for (int e = threadIdx.x >> 5; e < E; e += blockDim.x >> 5) {
    const uint4* row = reinterpret_cast<const uint4*>(gate + int64_t(e) * H);
    float acc = 0.0f;
#pragma unroll 4
    for (int v = lane; v < nv; v += 32) {
      float f[V];
      unpack_w<WT>(ld_weights(row + v), f);
#pragma unroll
      for (int c = 0; c < V; ++c) acc = fmaf(hs[v * V + c], f[c], acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) logits[r * E + e] = acc;
  }
}

// c[r] = kv_a_layernorm(kv_a[r, :R]) (the backend's RMSNorm: sum of squares in double) and
// k_pe[r] = RoPE(kv_a[r, R:]) at positions[r]: the backend's copy_cols, rmsnorm, copy_cols, rope.
// With q (rows of nh heads of qk floats), also q's RoPE part (columns nope..qk of each head) at the
// same position, as the backend's rope on q: one launch fewer per layer.
__global__ void kv_latent_kernel(const float* __restrict__ kva, int64_t R, int64_t P, const void* w, DType wt,
                                 float eps, const int32_t* pos, const float* cs, const float* sn, bool interleaved,
                                 float* __restrict__ c, float* __restrict__ kpe, float* __restrict__ q, int64_t nh,
                                 int64_t qk, int64_t nope) {
  pdl_wait();
  pdl_trigger();
  const int64_t r = blockIdx.x;
  const float* x = kva + r * (R + P);
  const int64_t half = P / 2, a = pos[r], stride = interleaved ? 1 : half;
  auto rotate = [&](const float* in, float* out, int64_t j) {
    const float x0 = in[0], x1 = in[stride], cj = cs[a * half + j], sj = sn[a * half + j];
    out[0] = x0 * cj - x1 * sj;
    out[stride] = x1 * cj + x0 * sj;
  };
  if (q)  // first: independent of the norm's reduction, its loads overlap the ones below
    for (int64_t t = threadIdx.x; t < nh * half; t += blockDim.x) {
      const int64_t j = t % half;
      float* p = q + (r * nh + t / half) * qk + nope + (interleaved ? 2 * j : j);
      rotate(p, p, j);
    }
  double ss = 0.0;
  for (int64_t j = threadIdx.x; j < R; j += blockDim.x) ss += double(x[j]) * double(x[j]);
  ss = block_sum(ss);
  const float rs = float(1.0 / sqrt(ss / double(R) + double(eps)));
  for (int64_t j = threadIdx.x; j < R; j += blockDim.x) c[r * R + j] = load_f(w, wt, j) * (x[j] * rs);
  for (int64_t j = threadIdx.x; j < half; j += blockDim.x) {
    const int64_t i0 = interleaved ? 2 * j : j;
    rotate(x + R + i0, kpe + r * P + i0, j);
  }
}

// y[r, j] (+)= x[r]·W[j] (see GemvArgs) for 16-byte-aligned rows: R weight rows per warp
// (blockIdx.y), rows of x kChunk·blockIdx.x onwards staged in shared memory (tile_rows). The first
// pass's weight loads are issued before pdl_wait, so they overlap the previous kernel's tail; the
// CTAs of one weight block run side by side (x fastest), so their re-reads of W come from L2.
template <class WT, int U, int R, bool kNorm>
__global__ void __launch_bounds__(32 * kGemvWarps) gemv_kernel(GemvArgs g) {
  extern __shared__ __align__(16) float xs_sm[];
  __shared__ TileSmem ts;
  const int warp = threadIdx.x >> 5;
  const int j0 = (blockIdx.y * kGemvWarps + warp) * R, q0 = blockIdx.x * kChunk;
  const int n = min(kChunk, g.n - q0);
  const bool active = j0 < g.n_out + g.n_out2;
  const bool second = active && j0 >= g.n_out;  // R rows never straddle W and W2 (n_out % R == 0)
  const int jr = second ? j0 - g.n_out : (active ? j0 : 0), head = second ? 0 : jr / g.head_rows;
  // One x slice per CTA: its rows lie in one head (checked on the host).
  const int cta_row = blockIdx.y * kGemvWarps * R, cta_head = cta_row < g.n_out ? cta_row / g.head_rows : 0;
  if (threadIdx.x < n) ts.src[threadIdx.x] = g.x + int64_t(cta_head) * g.head_x + int64_t(q0 + threadIdx.x) * g.ldx;
  const size_t row_bytes = size_t(g.K) * sizeof(WT);
  const char* W = static_cast<const char*>(second ? g.W2 : g.W) + size_t(jr) * row_bytes;
  float acc[R][kChunk], unused[1][kChunk];
  tile_rows<WT, U, R, false, kNorm, true>(W, nullptr, row_bytes, active, g.K / kVecCols<WT>, n, ts, xs_sm, g.norm_w,
                                          g.norm_t, g.eps, acc, unused);
  if (!active) return;
  reduce_rows<false>(acc, unused, n, [&](int r, int q, float v, float) {
    const int64_t row = q0 + q;
    const int j = jr + r;
    float* o = second ? g.y2 + row * g.ldy2 + j : g.y + row * g.ldy + int64_t(head) * g.head_y + (j - head * g.head_rows);
    *o = g.acc ? *o + v : v;
  });
}

// The fallback for F32 rows that are not 16-byte aligned: a warp per weight row, streamed once per
// kChunk rows of x, optionally RMSNorm on x first.
__global__ void rows_gemv_scalar_kernel(GemvArgs g) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int j = blockIdx.x * kGemvWarps + warp;
  if (j >= g.n_out + g.n_out2) return;
  const bool second = j >= g.n_out;
  if (second) j -= g.n_out;
  const float* W = static_cast<const float*>(second ? g.W2 : g.W) + int64_t(j) * g.K;
  const int head = second ? 0 : j / g.head_rows;
  for (int q0 = 0; q0 < g.n; q0 += kChunk) {
    const int nq = min(kChunk, g.n - q0);
    const float* x = g.x + int64_t(head) * g.head_x + int64_t(q0) * g.ldx;
    float rs[kChunk], a[kChunk];
#pragma unroll
    for (int q = 0; q < kChunk; ++q) {
      rs[q] = 1.0f;
      a[q] = 0.0f;
    }
    if (g.norm_w) {
#pragma unroll
      for (int q = 0; q < kChunk; ++q)
        if (q < nq) {
          double ss = 0.0;
          for (int c = lane; c < g.K; c += 32) {
            const double v = x[int64_t(q) * g.ldx + c];
            ss += v * v;
          }
          for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
          rs[q] = float(1.0 / sqrt(ss / double(g.K) + double(g.eps)));
        }
    }
    for (int c = lane; c < g.K; c += 32) {
      const float wv = W[c];
      const float gv = g.norm_w ? load_f(g.norm_w, g.norm_t, c) : 1.0f;
#pragma unroll
      for (int q = 0; q < kChunk; ++q)
        if (q < nq) {
          float xv = __ldg(x + int64_t(q) * g.ldx + c);
          if (g.norm_w) xv = gv * (xv * rs[q]);
          a[q] = fmaf(wv, xv, a[q]);
        }
    }
#pragma unroll
    for (int q = 0; q < kChunk; ++q) {
      if (q >= nq) break;
      const float v = warp_sum(a[q]);
      if (lane == 0) {
        const int64_t row = q0 + q;
        float* o = second ? g.y2 + row * g.ldy2 + j
                          : g.y + row * g.ldy + int64_t(head) * g.head_y + (j - head * g.head_rows);
        *o = g.acc ? *o + v : v;
      }
    }
  }
}

// A kernel instance with up to `smem` bytes of dynamic shared memory (the attribute set once).
template <class... P> void allow_smem(void (*kernel)(P...), size_t smem) {
  if (smem > 48 * 1024)
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
}
template <class WT, int U, int R, bool kNorm> void launch_gemv_u(dim3 grid, int rows, const GemvArgs& g) {
  static const bool once = (allow_smem(gemv_kernel<WT, U, R, kNorm>, tile_smem<WT, U>()), true);
  (void)once;
  launch_pdl(gemv_kernel<WT, U, R, kNorm>, grid, dim3(32 * kGemvWarps), size_t(rows) * tile_smem<WT, U>() / kChunk, g);
}
template <class WT, int R, bool kNorm> void launch_gemv(int U, dim3 grid, int rows, const GemvArgs& g) {
  switch (U) {
    case 1: launch_gemv_u<WT, 1, R, kNorm>(grid, rows, g); break;
    case 2: launch_gemv_u<WT, 2, R, kNorm>(grid, rows, g); break;
    case 4: launch_gemv_u<WT, 4, R, kNorm>(grid, rows, g); break;
    default: launch_gemv_u<WT, 8, R, kNorm>(grid, rows, g); break;
  }
}
template <class WT, bool kNorm> void launch_gemv(int R, int U, dim3 grid, int rows, const GemvArgs& g) {
  R == 2 ? launch_gemv<WT, 2, kNorm>(U, grid, rows, g) : launch_gemv<WT, 1, kNorm>(U, grid, rows, g);
}
// 16-byte vectors per lane per pass: enough for the whole row up to 8 (K 1024 F32 / 2048 BF16).
int vectors_per_lane(int nv) { return nv <= 32 ? 1 : nv <= 64 ? 2 : nv <= 128 ? 4 : 8; }


// The tensor-core path's threshold (cuda_set_decode_mma_rows): steps of at least this many rows of x.
int& mma_rows_setting() {
  static int rows = [] {
    const char* e = std::getenv("DSV3_DECODE_MMA");
    return e && std::string(e) == "0" ? 0 : kDefaultMmaRows;
  }();
  return rows;
}
bool mma_wanted(int64_t n) { return mma_rows_setting() > 0 && n >= mma_rows_setting(); }

// Warps per row block of gemv_mma_kernel / expert_mma_kernel (the shapes the row-range kernels do
// not take): the largest power of two ≤ kMmaWarps that leaves every warp at least 1 (GEMV) or 2
// (experts) k-blocks (bs-32 steps on the H200 before the row-range kernels: 1 / 2 1.87 ms, 2 / 4
// 1.86, 1 / 1 1.89, 4 / 1 2.22).
int mma_blocks_per_warp(bool experts) { return experts ? 2 : 1; }
int mma_ksplit(int K, bool experts) {
  const int nkb = (K + kMmaKb - 1) / kMmaKb, blocks = mma_blocks_per_warp(experts);
  int ks = 1;
  while (2 * ks <= kMmaWarps && 2 * ks * blocks <= nkb) ks *= 2;
  return ks;
}
template <int NT> void launch_gemv_mma_nt(const GemvArgs& g) {
  const int ks = mma_ksplit(g.K, false), rows_per_cta = 16 * (kMmaWarps / ks);
  const int64_t ctas = (int64_t(g.n_out) + g.n_out2 + rows_per_cta - 1) / rows_per_cta;
  DSV3_CHECK(ctas <= INT32_MAX, "cuda_rows_gemv: ", g.n_out + g.n_out2, " output rows exceed one launch");
  launch_pdl(gemv_mma_kernel<NT>, dim3(unsigned(ctas)), dim3(32 * kMmaWarps),
             size_t(kMmaWarps) * kMmaStash<NT> * sizeof(float), g, ks);
}
// gemv_rows_kernel when x fits its registers (≤ 32 rows) and K its warps (≤ 16 k-blocks). Warps per
// CTA: the most (up to kExpRowWarps) that still give every SM a step, else ks (the most CTAs): a
// CTA's steps cost its warps' instructions in turn, so fewer warps per CTA spread a GEMV of few
// steps over more SMs (bench-0.7b's W_UK and W_UV at 32 rows were 32 steps of 16 warps on 32 of the
// H200's 132 SMs, issue-bound at ~16k cycles each under Nsight Compute: 13.2 / 11.6 -> 8.8 / 7.7 us
// with 2 and 4 warps). Splitting K over the CTAs of a cluster as well (partial sums through
// distributed shared memory) measured slower for every GEMV of the step (q_a + kv_a 10.8 -> 15.6 us,
// o_proj 16 -> 37 us) and was dropped. Step ranges sized so the CTAs about fill the SMs once
// (16 / nw CTAs of nw warps per SM). DSV3_DECODE_MMA_GEMV_ROWS=0 keeps gemv_mma_kernel.
template <int NT> void launch_gemv_rows_nt(const GemvArgs& g, int ks, int nw, int steps_per_cta, int ctas) {
  const size_t smem = size_t(2) * kExpRowWarps * kMmaStash<NT> * sizeof(float);
  static const bool once = (allow_smem(gemv_rows_kernel<NT>, smem), true);
  (void)once;
  launch_pdl(gemv_rows_kernel<NT>, dim3(unsigned(ctas)), dim3(32 * nw), size_t(2) * nw * kMmaStash<NT> * sizeof(float),
             g, ks, steps_per_cta);
}
bool launch_gemv_rows(const GemvArgs& g) {
  static const bool on = [] {
    const char* e = std::getenv("DSV3_DECODE_MMA_GEMV_ROWS");
    return !(e && std::string(e) == "0");
  }();
  const int nkb = (g.K + kMmaKb - 1) / kMmaKb;
  int ks = 1;
  while (ks < nkb) ks *= 2;
  if (!on || ks > kExpRowWarps || g.n > 32) return false;
  const int64_t rows = int64_t(g.n_out) + g.n_out2;
  auto steps_for = [&](int nw) { return (rows + 16 * (nw / ks) - 1) / (16 * (nw / ks)); };
  int nw = kExpRowWarps;
  while (nw > ks && steps_for(nw) < sm_count()) nw /= 2;
  const int64_t steps = steps_for(nw), slots = int64_t(sm_count()) * (kExpRowWarps / nw);
  const int64_t per = std::max<int64_t>(1, (steps + slots - 1) / slots);
  const int64_t ctas = (steps + per - 1) / per;
  DSV3_CHECK(ctas <= INT32_MAX, "cuda_rows_gemv: ", g.n_out + g.n_out2, " output rows exceed one launch");
  if (g.n <= 8)
    launch_gemv_rows_nt<1>(g, ks, nw, int(per), int(ctas));
  else if (g.n <= 16)
    launch_gemv_rows_nt<2>(g, ks, nw, int(per), int(ctas));
  else
    launch_gemv_rows_nt<4>(g, ks, nw, int(per), int(ctas));
  return true;
}
// K beyond gemv_rows_kernel's 16 k-blocks (bench-0.7b's o_proj, K 2048, at 9–32 rows) as slices of
// 16 k-blocks, each a gemv_rows launch, the later ones adding into y (in order: each waits for the
// one before). gemv_mma_kernel takes such a GEMV in one launch, but a warp there reloads x for every
// k-block it multiplies. DSV3_DECODE_GEMV_KSLICES=0 keeps it.
bool launch_gemv_kslices(const GemvArgs& g) {
  static const bool on = [] {
    const char* e = std::getenv("DSV3_DECODE_GEMV_KSLICES");
    return !(e && std::string(e) == "0");
  }();
  constexpr int kSlice = kExpRowWarps * kMmaKb;
  if (!on || g.n <= 8 || g.n > 32 || g.W2 || g.head_rows < g.n_out || g.ldw || g.K <= kSlice || g.K > 4 * kSlice)
    return false;
  for (int k0 = 0; k0 < g.K; k0 += kSlice) {
    GemvArgs s = g;
    s.K = std::min(kSlice, g.K - k0);
    s.x = g.x + k0;
    s.W = static_cast<const char*>(g.W) + size_t(k0) * 2;
    s.ldw = g.K;
    s.acc = g.acc || k0 > 0;
    DSV3_CHECK(launch_gemv_rows(s), "cuda_rows_gemv: a K slice the row-range kernel refused");
  }
  return true;
}
void launch_gemv_mma(const GemvArgs& g) {
  if (launch_gemv_rows(g) || launch_gemv_kslices(g)) return;
  if (g.n <= 8)
    launch_gemv_mma_nt<1>(g);
  else if (g.n <= 16)
    launch_gemv_mma_nt<2>(g);
  else if (g.n <= 32)
    launch_gemv_mma_nt<4>(g);
  else
    launch_gemv_mma_nt<8>(g);
}

// F32 or BF16 rows of whole 16-byte vectors, 16-byte aligned: what the vector kernels read.
bool vector_rows(const Tensor& w) {
  const DType t = w.dtype();
  return (t == DType::F32 || t == DType::BF16) && aligned16(w.raw()) && w.dim(1) % (t == DType::BF16 ? 8 : 4) == 0;
}
// A weight the GEMV takes: on the device, no bias, F32 (other layouts take the scalar fallback) or
// BF16 in vector rows.
bool gemv_weight_ok(const LinearParam& p) {
  return p.w.device() == Device::CUDA && !present(p.bias) && (p.w.dtype() == DType::F32 || vector_rows(p.w));
}

}  // namespace

void cuda_set_decode_mma_rows(int rows) { mma_rows_setting() = std::max(rows, 0); }
int cuda_decode_mma_rows() { return mma_rows_setting(); }

bool cuda_small_linear_ok(const LinearParam& p, const Tensor& x) {
  return gemv_weight_ok(p) && x.dtype() == DType::F32 && x.ndim() == 2 && x.dim(0) <= kMaxGemvRows &&
         x.dim(1) == p.w.dim(1);
}

bool cuda_small_mlp_ok(const MlpParams& m, const Tensor& x) {
  return cuda_small_linear_ok(m.gate_proj, x) && cuda_small_linear_ok(m.up_proj, x) &&
         m.gate_proj.w.dtype() == m.up_proj.w.dtype() && gemv_weight_ok(m.down_proj) &&
         m.down_proj.w.dim(1) == m.gate_proj.w.dim(0);
}

void cuda_rows_gemv(const GemvArgs& g) {
  DSV3_CHECK(g.n >= 0 && g.n <= kMaxGemvRows && g.K > 0 && g.head_rows > 0 && (g.ldw == 0 || g.ldw == g.K) &&
                 (g.wt == DType::F32 || g.wt == DType::BF16),
             "cuda_rows_gemv: n ", g.n, " K ", g.K, " weights ", dtype_name(g.wt));
  if (g.n == 0 || g.n_out + g.n_out2 == 0) return;
  const bool bf = g.wt == DType::BF16;
  const int kv = bf ? 8 : 4;
  const bool vec = g.K % kv == 0 && g.ldx % 4 == 0 && g.head_x % 4 == 0 && aligned16(g.x) && aligned16(g.W) &&
                   (!g.W2 || aligned16(g.W2));
  if (!vec) {
    DSV3_CHECK(!bf, "cuda_rows_gemv: BF16 weights need 16-byte aligned rows (K ", g.K, ")");
    rows_gemv_scalar_kernel<<<unsigned((g.n_out + g.n_out2 + kGemvWarps - 1) / kGemvWarps), 32 * kGemvWarps, 0,
                              stream()>>>(g);
    check_launch("small linear");
    return;
  }
  // Two rows per warp when pairs never straddle a head or W and W2: each x load feeds both. A CTA's
  // rows share one x slice: within one head (W2 only beside a single-head W).
  DSV3_CHECK(!g.W2 || g.head_rows >= g.n_out, "cuda_rows_gemv: a second weight beside a multi-head first");
  const int R = g.head_rows % 2 == 0 && g.n_out % 2 == 0 && g.n_out2 % 2 == 0 ? 2 : 1;
  const bool one_head_per_cta = g.head_rows >= g.n_out || g.head_rows % (kGemvWarps * R) == 0;
  if (!one_head_per_cta) {
    DSV3_CHECK(!bf, "cuda_rows_gemv: BF16 weights need heads of a multiple of ", kGemvWarps * R, " rows");
    rows_gemv_scalar_kernel<<<unsigned((g.n_out + g.n_out2 + kGemvWarps - 1) / kGemvWarps), 32 * kGemvWarps, 0,
                              stream()>>>(g);
    check_launch("small linear");
    return;
  }
  if (bf && mma_wanted(g.n) && !g.norm_w && (g.head_rows >= g.n_out || g.head_rows % 16 == 0) &&
      (!g.W2 || g.n_out % 16 == 0)) {
    launch_gemv_mma(g);
    check_launch("small linear (tensor cores)");
    return;
  }
  const int U = vectors_per_lane(g.K / kv);
  const int64_t blocks = (int64_t(g.n_out) + g.n_out2 + kGemvWarps * R - 1) / (kGemvWarps * R);
  DSV3_CHECK(blocks <= 65535, "cuda_rows_gemv: ", g.n_out + g.n_out2, " output rows exceed one launch");
  const dim3 grid(unsigned((g.n + kChunk - 1) / kChunk), unsigned(blocks));
  const int rows = std::min(g.n, kChunk);  // rows of x staged per CTA
  const bool norm = g.norm_w != nullptr;
  if (bf)
    norm ? launch_gemv<__nv_bfloat16, true>(R, U, grid, rows, g) : launch_gemv<__nv_bfloat16, false>(R, U, grid, rows, g);
  else
    norm ? launch_gemv<float, true>(R, U, grid, rows, g) : launch_gemv<float, false>(R, U, grid, rows, g);
  check_launch("small linear");
}

void cuda_small_linear(const LinearParam& p, const Tensor& x, const Tensor& y, bool accumulate, const Tensor* norm_w,
                       float eps, const LinearParam* p2, const Tensor* y2) {
  DSV3_CHECK(cuda_small_linear_ok(p, x) && y.numel() == x.dim(0) * p.w.dim(0) &&
                 (!p2 || (cuda_small_linear_ok(*p2, x) && y2 && y2->numel() == x.dim(0) * p2->w.dim(0) && !accumulate)),
             "cuda_small_linear: x ", x.shape().str(), " w ", p.w.shape().str());
  GemvArgs g;
  g.x = x.data<float>();
  g.n = int(x.dim(0));
  g.K = int(p.w.dim(1));
  g.ldx = g.K;
  g.W = p.w.raw();
  g.wt = p.w.dtype();
  g.n_out = int(p.w.dim(0));
  g.head_rows = g.n_out;
  g.y = ptr<float>(y);
  g.ldy = g.n_out;
  g.acc = accumulate;
  if (norm_w) {
    DSV3_CHECK(norm_w->numel() == g.K, "cuda_small_linear: norm weight ", norm_w->shape().str());
    g.norm_w = norm_w->raw();
    g.norm_t = norm_w->dtype();
    g.eps = eps;
  }
  if (p2) {
    DSV3_CHECK(p2->w.dtype() == g.wt, "cuda_small_linear: the paired weights differ in dtype");
    g.W2 = p2->w.raw();
    g.n_out2 = int(p2->w.dim(0));
    g.y2 = ptr<float>(*y2);
    g.ldy2 = g.n_out2;
  }
  cuda_rows_gemv(g);
}


bool cuda_norm_router_ok(const LinearParam& gate, const Tensor& x) {
  const int64_t E = gate.w.dim(0), H = gate.w.dim(1);
  return gate.w.device() == Device::CUDA && !present(gate.bias) && vector_rows(gate.w) && x.dtype() == DType::F32 &&
         x.ndim() == 2 && x.dim(1) == H && H <= 256 * 8 && E * H <= kNormRouterMaxWeights;
}
// From 32 rows: bench-0.7b decode steps on the H200, fused against separate launches (two runs
// each, one lease, ms per step): 2 rows 0.772–0.776 / 0.754–0.755, 8 rows 1.100–1.102 / 1.074–1.076,
// 16 rows 1.080–1.081 / 1.069–1.081, 32 rows 1.407–1.440 / 1.446–1.476 (every CTA reads the whole
// gate, so few rows leave the SMs idle where the GEMV spreads the weight over them).
// DSV3_NORM_ROUTER_MIN_ROWS sets another threshold (for comparison).
int64_t cuda_norm_router_min_rows() {
  static const int64_t rows = [] {
    const char* e = std::getenv("DSV3_NORM_ROUTER_MIN_ROWS");
    return e ? std::max<int64_t>(1, std::atoll(e)) : int64_t(32);
  }();
  return rows;
}

void cuda_norm_router(const Tensor& x, const Tensor& norm_w, float eps, const LinearParam& gate, const Tensor& h,
                      const Tensor& logits) {
  const int64_t N = x.dim(0), E = gate.w.dim(0), H = gate.w.dim(1);
  DSV3_CHECK(cuda_norm_router_ok(gate, x) && norm_w.numel() == H && h.numel() == N * H && logits.numel() == N * E,
             "cuda_norm_router: x ", x.shape().str(), " gate ", gate.w.shape().str());
  if (N == 0) return;
  const size_t smem = size_t(H) * sizeof(float);
  auto run = [&](auto kernel, const auto* w) {
    launch_pdl(kernel, dim3(unsigned(N)), dim3(256), smem, x.data<float>(), norm_w.raw(), norm_w.dtype(), eps, w,
               int(H), int(E), ptr<float>(h), ptr<float>(logits));
  };
  const bool bf = gate.w.dtype() == DType::BF16, wide = H > 256 * 4;
  const auto* wb = static_cast<const __nv_bfloat16*>(gate.w.raw());
  const auto* wf = static_cast<const float*>(gate.w.raw());
  if (bf)
    wide ? run(norm_router_kernel<__nv_bfloat16, 8>, wb) : run(norm_router_kernel<__nv_bfloat16, 4>, wb);
  else
    wide ? run(norm_router_kernel<float, 8>, wf) : run(norm_router_kernel<float, 4>, wf);
  check_launch("norm and router");
}

void cuda_kv_latent(const Tensor& kv_a, const Tensor& norm_w, float eps, const Tensor& positions, const Tensor& cos,
                    const Tensor& sin, bool interleaved, const Tensor& c_kv_n, const Tensor& k_pe, const Tensor* q,
                    int64_t q_nope) {
  const int64_t N = kv_a.dim(0), R = c_kv_n.dim(-1), P = k_pe.dim(-1);
  DSV3_CHECK(kv_a.dim(1) == R + P && c_kv_n.numel() == N * R && k_pe.numel() == N * P && norm_w.numel() == R &&
                 positions.numel() == N && P % 2 == 0,
             "cuda_kv_latent: kv_a ", kv_a.shape().str());
  DSV3_CHECK(!q || (q->ndim() == 3 && q->dim(0) == N && q->dim(2) == q_nope + P && q->dtype() == DType::F32),
             "cuda_kv_latent: q ", q ? q->shape().str() : "", " does not hold ", P, " RoPE columns after ", q_nope);
  if (N)
    launch_pdl(kv_latent_kernel, dim3(unsigned(N)), dim3(256), 0, kv_a.data<float>(), R, P, norm_w.raw(),
               norm_w.dtype(), eps, positions.data<int32_t>(), cos.data<float>(), sin.data<float>(), interleaved,
               ptr<float>(c_kv_n), ptr<float>(k_pe), q ? ptr<float>(*q) : nullptr, q ? q->dim(1) : 0,
               q ? q->dim(2) : 0, q_nope);
  check_launch("kv latent");
}

namespace {
// Weights the expert kernels take: F32 or BF16 (all three of one dtype), no bias, 16-byte aligned
// rows of whole vectors.
bool vec_mlp(const MlpParams& m) {
  for (const LinearParam* l : {&m.gate_proj, &m.up_proj, &m.down_proj})
    if (l->w.dtype() != m.gate_proj.w.dtype() || l->w.device() != Device::CUDA || present(l->bias) ||
        !vector_rows(l->w))
      return false;
  return true;
}

template <class WT, bool kGateUp, int U, int R> void launch_expert_u(dim3 grid, int rows, const ExpertArgs& a) {
  static const bool once = (allow_smem(expert_kernel<WT, kGateUp, U, R>, tile_smem<WT, U>()), true);
  (void)once;
  launch_pdl(expert_kernel<WT, kGateUp, U, R>, grid, dim3(32 * kExpertWarps), size_t(rows) * tile_smem<WT, U>() / kChunk,
             a);
}
template <class WT, bool kGateUp, int R> void launch_expert(int U, dim3 grid, int rows, const ExpertArgs& a) {
  switch (U) {
    case 1: launch_expert_u<WT, kGateUp, 1, R>(grid, rows, a); break;
    case 2: launch_expert_u<WT, kGateUp, 2, R>(grid, rows, a); break;
    case 4: launch_expert_u<WT, kGateUp, 4, R>(grid, rows, a); break;
    default: launch_expert_u<WT, kGateUp, 8, R>(grid, rows, a); break;
  }
}
// gate/up: one row of each per warp (two weight streams); down: two rows per warp when they pair up.
// Grid: weight-row blocks × the most work items a step can have.
// expert_rows_kernel when its k-blocks fit (gate/up: one per warp and step, down: two), row ranges
// sized so the items' CTAs about fill the SMs once. DSV3_DECODE_MMA_ROWS_KERNEL=0 keeps
// expert_mma_kernel (for comparison).
bool launch_expert_rows(bool gate_up, const ExpertArgs& a) {
  static const bool on = [] {
    const char* e = std::getenv("DSV3_DECODE_MMA_ROWS_KERNEL");
    return !(e && std::string(e) == "0");
  }();
  const int nkb = (a.K + kMmaKb - 1) / kMmaKb, bpw = gate_up ? 1 : 2;
  int ks = 1;
  while (ks * bpw < nkb) ks *= 2;
  if (!on || ks > kExpRowWarps) return false;
  const int step_rows = 16 * (kExpRowWarps / ks), steps = (a.rows_out + step_rows - 1) / step_rows;
  const int ranges = std::clamp((sm_count() + a.max_items - 1) / a.max_items, 1, steps);
  const int rows_per_cta = (steps + ranges - 1) / ranges * step_rows;
  const dim3 grid(unsigned((a.rows_out + rows_per_cta - 1) / rows_per_cta), unsigned(a.max_items));
  const size_t smem = size_t(2) * (gate_up ? 2 : 1) * kExpRowWarps * kMmaStash<1> * sizeof(float);
  if (gate_up)
    launch_pdl(expert_rows_kernel<true, 1>, grid, dim3(32 * kExpRowWarps), smem, a, ks, rows_per_cta);
  else
    launch_pdl(expert_rows_kernel<false, 2>, grid, dim3(32 * kExpRowWarps), smem, a, ks, rows_per_cta);
  return true;
}

template <class WT> void launch_experts(bool gate_up, int64_t N, const ExpertArgs& a) {
  if (std::is_same_v<WT, __nv_bfloat16> && mma_wanted(N) && launch_expert_rows(gate_up, a)) return;
  if (std::is_same_v<WT, __nv_bfloat16> && mma_wanted(N)) {
    const int ks = mma_ksplit(a.K, true), rows_per_cta = 16 * (kMmaWarps / ks);
    const dim3 grid(unsigned((a.rows_out + rows_per_cta - 1) / rows_per_cta), unsigned(a.max_items));
    const size_t smem = size_t(gate_up ? 2 : 1) * kMmaWarps * kMmaStash<1> * sizeof(float);
    if (gate_up)
      launch_pdl(expert_mma_kernel<true>, grid, dim3(32 * kMmaWarps), smem, a, ks);
    else
      launch_pdl(expert_mma_kernel<false>, grid, dim3(32 * kMmaWarps), smem, a, ks);
    return;
  }
  const int R = gate_up || a.rows_out % 2 != 0 ? 1 : 2;
  const int U = vectors_per_lane(a.K / kVecCols<WT>);
  const dim3 grid(unsigned((a.rows_out + kExpertWarps * R - 1) / (kExpertWarps * R)), unsigned(a.max_items));
  const int rows = int(std::min<int64_t>(N, kChunk));
  if (gate_up)
    launch_expert<WT, true, 1>(U, grid, rows, a);
  else if (R == 2)
    launch_expert<WT, false, 2>(U, grid, rows, a);
  else
    launch_expert<WT, false, 1>(U, grid, rows, a);
}
}  // namespace

bool cuda_moe_supported(const MoeParams& p) {
  // The combine kernel holds a row of up to 256·32 values in registers.
  if (p.experts.empty() || p.experts.size() > 1024 || p.experts[0].gate_proj.w.dim(1) > 256 * 32) return false;
  for (const MlpParams& m : p.experts)
    if (!vec_mlp(m) || m.gate_proj.w.dtype() != p.experts[0].gate_proj.w.dtype()) return false;
  return true;
}

CudaMoeTables cuda_moe_tables(const MoeParams& p) {
  DSV3_CHECK(cuda_moe_supported(p), "cuda_moe_tables: unsupported experts");
  CudaMoeTables t;
  t.E = int64_t(p.experts.size());
  t.I = p.experts[0].gate_proj.w.dim(0);
  t.H = p.experts[0].gate_proj.w.dim(1);
  // The shared experts join as one more group when they have the routed experts' shape.
  const MlpParams& sh = p.shared_experts;
  t.wt = p.experts[0].gate_proj.w.dtype();
  t.shared = p.has_shared && vec_mlp(sh) && sh.gate_proj.w.dtype() == t.wt && sh.gate_proj.w.dim(0) == t.I &&
             sh.gate_proj.w.dim(1) == t.H;
  const int64_t cols = t.E + (t.shared ? 1 : 0);
  Tensor h = Tensor::empty(DType::I64, {3, cols});
  int64_t* d = h.data<int64_t>();
  for (int64_t e = 0; e < cols; ++e) {
    const MlpParams& m = e < t.E ? p.experts[size_t(e)] : sh;
    DSV3_CHECK(m.gate_proj.w.dim(0) == t.I && m.up_proj.w.dim(0) == t.I && m.down_proj.w.dim(0) == t.H &&
                   m.down_proj.w.dim(1) == t.I,
               "cuda_moe_tables: expert ", e, " shapes differ");
    d[e] = int64_t(reinterpret_cast<uintptr_t>(m.gate_proj.w.raw()));
    d[cols + e] = int64_t(reinterpret_cast<uintptr_t>(m.up_proj.w.raw()));
    d[2 * cols + e] = int64_t(reinterpret_cast<uintptr_t>(m.down_proj.w.raw()));
  }
  t.ptrs = cuda_backend().to_device(h);
  return t;
}

Tensor cuda_moe_forward(Backend& be, const ModelDims& d, const MoeParams& p, const CudaMoeTables& t,
                        const Tensor& x, const Tensor* residual, bool small_gemv, CudaNextNorm* next_norm,
                        const Tensor* router_logits, const Tensor& into) {
  const int64_t N = x.dim(0), E = t.E, k = d.top_k, H = t.H, I = t.I;
  DSV3_CHECK(x.device() == Device::CUDA && x.dim(1) == H && E == d.n_experts && k <= 32, "cuda_moe_forward: x ",
             x.shape().str());
  DSV3_CHECK(!router_logits || router_logits->numel() == N * E, "cuda_moe_forward: router logits ",
             router_logits ? router_logits->shape().str() : "");
  for (const Tensor* o : std::initializer_list<const Tensor*>{&into, next_norm ? &next_norm->out : nullptr})
    DSV3_CHECK(!o || !o->defined() ||
                   (o->device() == Device::CUDA && o->dtype() == DType::F32 && o->numel() == N * H),
               "cuda_moe_forward: an output given must be [", N, ", ", H, "] F32 on the GPU, got ",
               o ? o->shape().str() : "");
  Tensor logits = router_logits ? *router_logits : be.alloc(DType::F32, {N, E});
  if (!router_logits) {
    if (small_gemv && cuda_small_linear_ok(p.gate, x)) {
      cuda_small_linear(p.gate, x, logits, false);
    } else {
      cuda_graph_mark_unsafe("the router's gate through the backend's linear");
      linear_forward(be, p.gate, x, logits);
    }
  }
  Tensor ids = be.alloc(DType::I32, {N, k}), wts = be.alloc(DType::F32, {N, k});
  Tensor scores = be.alloc(DType::F32, {N, E});
  moe_route(be, d, p, logits, scores, ids, wts);

  const int64_t nk = N * k, groups = E + (t.shared ? 1 : 0), picks = nk + (t.shared ? N : 0);
  DSV3_CHECK(cuda_moe_fits(t, N, k), "cuda_moe_forward: ", N, " rows × top-", k, " picks exceed the grouping kernel");
  // Work items: Σ over groups with picks of ceil(c / kChunk) ≤ picks / kChunk + (groups with picks).
  const int64_t max_items = picks / kChunk + std::min(groups, nk + (t.shared ? 1 : 0));
  Tensor grp = be.alloc(DType::I32, {picks + nk + groups + 1 + 2 * max_items + 1});
  int32_t* order = ptr<int32_t>(grp);
  int32_t* inv = order + picks;
  int32_t* offsets = inv + nk;
  int32_t* items = offsets + groups + 1;
  launch_pdl(group_kernel, dim3(1), dim3(unsigned(32 * std::min<int64_t>(E, 32))), size_t(2 * E + 1 + nk) * sizeof(int32_t),
             ids.data<int32_t>(), int(nk), int(E), t.shared ? int(N) : 0, order, inv, offsets, items, int(max_items));
  check_launch("moe grouping");
  const int64_t* w = t.ptrs.data<int64_t>();
  Tensor act = be.alloc(DType::F32, {picks, I});
  ExpertArgs ea{x.data<float>(), order, offsets, items, int(max_items), w, w + groups, int(k), int(nk), int(H),
                int(I), ptr<float>(act)};
  t.wt == DType::BF16 ? launch_experts<__nv_bfloat16>(true, N, ea) : launch_experts<float>(true, N, ea);
  check_launch("experts gate/up");
  Tensor y = be.alloc(DType::F32, {picks, H});
  ExpertArgs ed{act.data<float>(), order, offsets, items, int(max_items), w + 2 * groups, nullptr, int(k), int(nk),
                int(I), int(H), ptr<float>(y)};
  t.wt == DType::BF16 ? launch_experts<__nv_bfloat16>(false, N, ed) : launch_experts<float>(false, N, ed);
  check_launch("experts down");
  Tensor out = into.defined() ? into : be.alloc(DType::F32, {N, H});
  const bool late_shared = p.has_shared && !t.shared;
  const bool fold = residual && !late_shared;
  const bool norm_here = next_norm && fold;
  if (next_norm && !next_norm->out.defined()) next_norm->out = be.alloc(DType::F32, {N, H});
  DSV3_CHECK(H <= 256 * 32, "cuda_moe_forward: hidden size ", H, " above the combine kernel's 8192 (cuda_moe_supported)");
  auto combine = [&](auto kernel) {
    launch_pdl(kernel, dim3(unsigned(N)), dim3(256), 0, y.data<float>(), static_cast<const int32_t*>(inv),
               wts.data<float>(), int(k), int(nk), t.shared, int(H), fold ? residual->data<float>() : nullptr,
               ptr<float>(out), norm_here ? next_norm->weight.raw() : nullptr,
               norm_here ? next_norm->weight.dtype() : DType::F32, norm_here ? next_norm->eps : 0.0f,
               norm_here ? ptr<float>(next_norm->out) : nullptr);
  };
  if (H <= 256 * 4)
    combine(combine_kernel<4>);
  else if (H <= 256 * 8)
    combine(combine_kernel<8>);
  else
    combine(combine_kernel<32>);
  check_launch("moe combine");
  if (late_shared) {
    cuda_graph_mark_unsafe("shared experts through the backend's linears");
    MlpActs m;
    m.out = out;
    mlp_forward(be, p.shared_experts, x, m, true);  // out += shared experts
  }
  if (residual && !fold) {
    AddArgs a;
    a.a = *residual;
    a.b = out;
    a.out = out;
    be.add(a);
  }
  if (next_norm && !norm_here) {
    RmsNormArgs r;
    r.x = out;
    r.weight = next_norm->weight;
    r.eps = next_norm->eps;
    r.y = next_norm->out;
    be.rmsnorm(r);
  }
  return out;
}

}  // namespace dsv3
