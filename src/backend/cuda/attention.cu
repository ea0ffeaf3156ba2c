// Exact attention, memory-efficient (flash-style): no [T, S] score matrix is ever stored. The
// forward walks the keys in chunks of kChunk with an online softmax (running max and sum), one
// block per (query row, head, batch); it saves the logsumexp for the backward. The backward
// recomputes probabilities from the logsumexp: one pass per query row gives dq (and D = dO·O), one
// pass per key row gives dk and dv, so every output element has one owner (no atomics,
// deterministic). Head dims that are multiples of 8 up to qk 256 / v 128 (MLA's 192 / 128 and
// every training shape) take the tiled kernels below; others (the absorbed 576/512) the per-row ones.
// With cuda_set_attention_bf16(true) (BF16/FP8 training), shapes it supports go to the BF16
// tensor-core kernels of attention_bf16.cu instead (and a backward given their kept operands always
// does).
#include "backend/cuda/attention_bf16.h"
#include "backend/cuda/common.cuh"

namespace dsv3 {
using namespace cuda;

namespace {

constexpr int kChunk = 128;  // keys (or queries) per step = threads per block

struct Dims {
  int64_t b, t, s, h, dqk, dv;
};
Dims dims_of(const Tensor& q, const Tensor& k, const Tensor& v) {
  int o = q.ndim() == 4 ? 1 : 0;
  return {o ? q.dim(0) : 1, q.dim(o), k.dim(o), q.dim(o + 1), q.dim(o + 2), v.dim(o + 2)};
}

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ float dot(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t d = 0; d < n; ++d) s = fmaf(a[d], b[d], s);
  return s;
}

__global__ void attn_fwd_kernel(const float* q, const float* k, const float* v, float* out, float* lse, Dims dm,
                                float scale, bool causal, int64_t q_off) {
  extern __shared__ float sm[];
  float* qs = sm;             // [dqk]
  float* acc = qs + dm.dqk;   // [dv]
  float* ps = acc + dm.dv;    // [kChunk]
  int64_t i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  int64_t ldq = dm.h * dm.dqk, ldv = dm.h * dm.dv;
  const float* qr = q + (b * dm.t + i) * ldq + h * dm.dqk;
  const float* kb = k + b * dm.s * ldq + h * dm.dqk;
  const float* vb = v + b * dm.s * ldv + h * dm.dv;
  for (int64_t d = threadIdx.x; d < dm.dqk; d += blockDim.x) qs[d] = qr[d];
  for (int64_t d = threadIdx.x; d < dm.dv; d += blockDim.x) acc[d] = 0.0f;
  __syncthreads();
  int64_t lim = causal ? imin(dm.s, q_off + i + 1) : dm.s;
  float m = -INFINITY, l = 0.0f;
  for (int64_t c0 = 0; c0 < lim; c0 += kChunk) {
    int64_t j = c0 + threadIdx.x;
    float s = j < lim ? scale * dot(qs, kb + j * ldq, dm.dqk) : -INFINITY;
    float mn = fmaxf(m, block_max(s));
    float p = j < lim ? expf(s - mn) : 0.0f;
    ps[threadIdx.x] = p;
    float psum = block_sum(p);  // its barrier also publishes ps
    float alpha = expf(m - mn);
    l = l * alpha + psum;
    int64_t n = imin(kChunk, lim - c0);
    for (int64_t d = threadIdx.x; d < dm.dv; d += blockDim.x) {
      float a = acc[d] * alpha;
      for (int64_t jj = 0; jj < n; ++jj) a = fmaf(ps[jj], vb[(c0 + jj) * ldv + d], a);
      acc[d] = a;
    }
    m = mn;
    __syncthreads();
  }
  float* o = out + (b * dm.t + i) * ldv + h * dm.dv;
  float inv = l > 0.0f ? 1.0f / l : 0.0f;  // no keys (S = 0): zeros, as the CPU's empty sum
  for (int64_t d = threadIdx.x; d < dm.dv; d += blockDim.x) o[d] = acc[d] * inv;
  if (lse && threadIdx.x == 0) lse[(b * dm.h + h) * dm.t + i] = m + logf(l);
}

// Per query row: D_i = dO_i·O_i (saved) and dq_i = scale · Σ_j P_ij (dO_i·v_j − D_i) k_j.
__global__ void attn_bwd_q_kernel(const float* q, const float* k, const float* v, const float* out, const float* lse,
                                  const float* dout, float* dq, float* dsum, Dims dm, float scale, bool causal,
                                  int64_t q_off) {
  extern __shared__ float sm[];
  float* qs = sm;              // [dqk]
  float* dos = qs + dm.dqk;    // [dv]
  float* acc = dos + dm.dv;    // [dqk]
  float* ps = acc + dm.dqk;    // [kChunk]
  int64_t i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  int64_t ldq = dm.h * dm.dqk, ldv = dm.h * dm.dv;
  const float* qr = q + (b * dm.t + i) * ldq + h * dm.dqk;
  const float* dor = dout + (b * dm.t + i) * ldv + h * dm.dv;
  const float* orow = out + (b * dm.t + i) * ldv + h * dm.dv;
  const float* kb = k + b * dm.s * ldq + h * dm.dqk;
  const float* vb = v + b * dm.s * ldv + h * dm.dv;
  float dpart = 0.0f;
  for (int64_t d = threadIdx.x; d < dm.dqk; d += blockDim.x) {
    qs[d] = qr[d];
    acc[d] = 0.0f;
  }
  for (int64_t d = threadIdx.x; d < dm.dv; d += blockDim.x) {
    dos[d] = dor[d];
    dpart += dor[d] * orow[d];
  }
  float di = block_sum(dpart);
  int64_t row = (b * dm.h + h) * dm.t + i;
  if (threadIdx.x == 0) dsum[row] = di;
  float li = lse[row];
  int64_t lim = causal ? imin(dm.s, q_off + i + 1) : dm.s;
  for (int64_t c0 = 0; c0 < lim; c0 += kChunk) {
    int64_t j = c0 + threadIdx.x;
    float ds = 0.0f;
    if (j < lim) {
      float p = expf(scale * dot(qs, kb + j * ldq, dm.dqk) - li);
      ds = p * (dot(dos, vb + j * ldv, dm.dv) - di);
    }
    ps[threadIdx.x] = ds;
    __syncthreads();
    int64_t n = imin(kChunk, lim - c0);
    if (dq)
      for (int64_t d = threadIdx.x; d < dm.dqk; d += blockDim.x) {
        float a = acc[d];
        for (int64_t jj = 0; jj < n; ++jj) a = fmaf(ps[jj], kb[(c0 + jj) * ldq + d], a);
        acc[d] = a;
      }
    __syncthreads();
  }
  if (dq) {
    float* o = dq + (b * dm.t + i) * ldq + h * dm.dqk;
    for (int64_t d = threadIdx.x; d < dm.dqk; d += blockDim.x) o[d] = scale * acc[d];
  }
}

// Per key row j: dv_j = Σ_i P_ij dO_i and dk_j = scale · Σ_i P_ij (dO_i·v_j − D_i) q_i.
__global__ void attn_bwd_kv_kernel(const float* q, const float* k, const float* v, const float* lse,
                                   const float* dout, const float* dsum, float* dk, float* dv, Dims dm, float scale,
                                   bool causal, int64_t q_off) {
  extern __shared__ float sm[];
  float* ks = sm;               // [dqk]
  float* vs = ks + dm.dqk;      // [dv]
  float* ak = vs + dm.dv;       // [dqk]
  float* av = ak + dm.dqk;      // [dv]
  float* ps = av + dm.dv;       // [kChunk]
  float* dss = ps + kChunk;     // [kChunk]
  int64_t j = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  int64_t ldq = dm.h * dm.dqk, ldv = dm.h * dm.dv;
  const float* kr = k + (b * dm.s + j) * ldq + h * dm.dqk;
  const float* vr = v + (b * dm.s + j) * ldv + h * dm.dv;
  const float* qb = q + b * dm.t * ldq + h * dm.dqk;
  const float* db = dout + b * dm.t * ldv + h * dm.dv;
  const float* lb = lse + (b * dm.h + h) * dm.t;
  const float* sb = dsum + (b * dm.h + h) * dm.t;
  for (int64_t d = threadIdx.x; d < dm.dqk; d += blockDim.x) {
    ks[d] = kr[d];
    ak[d] = 0.0f;
  }
  for (int64_t d = threadIdx.x; d < dm.dv; d += blockDim.x) {
    vs[d] = vr[d];
    av[d] = 0.0f;
  }
  __syncthreads();
  int64_t first = causal ? imax(0, j - q_off) : 0;
  for (int64_t c0 = first; c0 < dm.t; c0 += kChunk) {
    int64_t i = c0 + threadIdx.x;
    float p = 0.0f, ds = 0.0f;
    if (i < dm.t) {
      p = expf(scale * dot(ks, qb + i * ldq, dm.dqk) - lb[i]);
      ds = p * (dot(vs, db + i * ldv, dm.dv) - sb[i]);
    }
    ps[threadIdx.x] = p;
    dss[threadIdx.x] = ds;
    __syncthreads();
    int64_t n = imin(kChunk, dm.t - c0);
    for (int64_t d = threadIdx.x; d < dm.dv; d += blockDim.x) {
      float a = av[d];
      for (int64_t ii = 0; ii < n; ++ii) a = fmaf(ps[ii], db[(c0 + ii) * ldv + d], a);
      av[d] = a;
    }
    for (int64_t d = threadIdx.x; d < dm.dqk; d += blockDim.x) {
      float a = ak[d];
      for (int64_t ii = 0; ii < n; ++ii) a = fmaf(dss[ii], qb[(c0 + ii) * ldq + d], a);
      ak[d] = a;
    }
    __syncthreads();
  }
  if (dk) {
    float* o = dk + (b * dm.s + j) * ldq + h * dm.dqk;
    for (int64_t d = threadIdx.x; d < dm.dqk; d += blockDim.x) o[d] = scale * ak[d];
  }
  if (dv) {
    float* o = dv + (b * dm.s + j) * ldv + h * dm.dv;
    for (int64_t d = threadIdx.x; d < dm.dv; d += blockDim.x) o[d] = av[d];
  }
}

// ---- Tiled kernels (head dims multiples of 8, qk ≤ 256, v ≤ 128: every MLA training shape) ------
// Blocks of 64 queries (or 32 keys) per CTA; the other side streams through shared memory in tiles,
// so each K/V (or Q/dO) row is read from memory once per CTA instead of once per query. 256
// threads: ty = tid / 8 owns two query rows (or one key row), tx = tid % 8 owns the columns
// tx, tx + 8, ... Shared rows are padded to an odd stride so the 8 tx lanes hit distinct banks.
constexpr int kTq = 64, kTk = 32, kTiledThreads = 256, kMaxK8 = 32, kMaxV8 = 16;

bool tiled_ok(const Dims& d) { return d.dqk % 8 == 0 && d.dv % 8 == 0 && d.dqk <= 8 * kMaxK8 && d.dv <= 8 * kMaxV8; }

// Rows [r0, r0 + n) of a [rows, H, width] tensor at head h → shared [n][ld], zero past `limit`.
__device__ __forceinline__ void load_rows(float* dst, int ld, const float* src, int64_t r0, int n, int64_t limit,
                                          int64_t row_stride, int width) {
  for (int idx = threadIdx.x; idx < n * width; idx += kTiledThreads) {
    int r = idx / width, c = idx % width;
    dst[r * ld + c] = r0 + r < limit ? src[(r0 + r) * row_stride + c] : 0.0f;
  }
}

// out[r][j] = Σ_d a[(r0 + r)·la + d] · b[(tx + 8j)·lb + d] for r < 2, j < 4: the two rows of a thread
// against its four rows of the other tile (scores q·kᵀ, or dO·vᵀ).
__device__ __forceinline__ void tile_dots(const float* a, int la, int r0, const float* b, int lb, int tx, int n,
                                          float (&out)[2][4]) {
  for (int d = 0; d < n; ++d) {
    float x0 = a[r0 * la + d], x1 = a[(r0 + 1) * la + d];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float y = b[(tx + 8 * j) * lb + d];
      out[0][j] = fmaf(x0, y, out[0][j]);
      out[1][j] = fmaf(x1, y, out[1][j]);
    }
  }
}

__global__ void __launch_bounds__(kTiledThreads) attn_fwd_tiled(const float* q, const float* k, const float* v,
                                                                float* out, float* lse, Dims dm, float scale,
                                                                bool causal, int64_t q_off) {
  extern __shared__ float sm[];
  const int dqk = int(dm.dqk), dv = int(dm.dv), lq = dqk + 1, lk = dqk + 1, lv = dv;
  float* qs = sm;               // [kTq][lq]
  float* ks = qs + kTq * lq;    // [kTk][lk]
  float* vs = ks + kTk * lk;    // [kTk][lv]
  float* ss = vs + kTk * lv;    // [kTq][kTk + 1]
  const int64_t q0 = int64_t(blockIdx.x) * kTq, h = blockIdx.y, b = blockIdx.z;
  const int64_t ldq = dm.h * dm.dqk, ldv = dm.h * dm.dv;
  const int tid = threadIdx.x, ty = tid >> 3, tx = tid & 7, r0 = 2 * ty;
  const float* kb = k + b * dm.s * ldq + h * dm.dqk;
  const float* vb = v + b * dm.s * ldv + h * dm.dv;
  load_rows(qs, lq, q + b * dm.t * ldq + h * dm.dqk, q0, kTq, dm.t, ldq, dqk);
  const int64_t q_last = q0 + kTq < dm.t ? q0 + kTq : dm.t;
  const int64_t lim = causal ? (dm.s < q_off + q_last ? dm.s : q_off + q_last) : dm.s;
  float acc[2][kMaxV8];
#pragma unroll
  for (int j = 0; j < kMaxV8; ++j) acc[0][j] = acc[1][j] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  for (int64_t k0 = 0; k0 < lim; k0 += kTk) {
    __syncthreads();
    load_rows(ks, lk, kb, k0, kTk, dm.s, ldq, dqk);
    load_rows(vs, lv, vb, k0, kTk, dm.s, ldv, dv);
    __syncthreads();
    float sc[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
    tile_dots(qs, lq, r0, ks, lk, tx, dqk, sc);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = q0 + r0 + r;
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t key = k0 + tx + 8 * j;
        bool ok = key < dm.s && (!causal || key <= q_off + i);
        sc[r][j] = ok ? sc[r][j] * scale : -INFINITY;
        mx = fmaxf(mx, sc[r][j]);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      const float mn = fmaxf(m[r], mx);
      const float alpha = mn == -INFINITY ? 1.0f : expf(m[r] - mn);
      float psum = 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float p = mn == -INFINITY ? 0.0f : expf(sc[r][j] - mn);
        ss[(r0 + r) * (kTk + 1) + tx + 8 * j] = p;
        psum += p;
      }
      psum += __shfl_xor_sync(0xffffffffu, psum, 1);
      psum += __shfl_xor_sync(0xffffffffu, psum, 2);
      psum += __shfl_xor_sync(0xffffffffu, psum, 4);
      l[r] = l[r] * alpha + psum;
      m[r] = mn;
#pragma unroll
      for (int j = 0; j < kMaxV8; ++j) acc[r][j] *= alpha;
    }
    __syncthreads();
    for (int c = 0; c < kTk; ++c) {
      float p0 = ss[r0 * (kTk + 1) + c], p1 = ss[(r0 + 1) * (kTk + 1) + c];
#pragma unroll
      for (int j = 0; j < kMaxV8; ++j)
        if (8 * j < dv) {
          float vv = vs[c * lv + tx + 8 * j];
          acc[0][j] = fmaf(p0, vv, acc[0][j]);
          acc[1][j] = fmaf(p1, vv, acc[1][j]);
        }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = q0 + r0 + r;
    if (i >= dm.t) continue;
    float* o = out + (b * dm.t + i) * ldv + h * dm.dv;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
#pragma unroll
    for (int j = 0; j < kMaxV8; ++j)
      if (8 * j < dv) o[tx + 8 * j] = acc[r][j] * inv;
    if (lse && tx == 0) lse[(b * dm.h + h) * dm.t + i] = m[r] + logf(l[r]);
  }
}

// dq (and D = dO·O per row, saved for the key side): per block of 64 queries over all key tiles.
__global__ void __launch_bounds__(kTiledThreads) attn_bwd_q_tiled(const float* q, const float* k, const float* v,
                                                                  const float* out, const float* lse,
                                                                  const float* dout, float* dq, float* dsum, Dims dm,
                                                                  float scale, bool causal, int64_t q_off) {
  extern __shared__ float sm[];
  const int dqk = int(dm.dqk), dv = int(dm.dv), lq = dqk + 1, lk = dqk + 1, lv = dv + 1, ld = dv + 1;
  float* qs = sm;                // [kTq][lq]
  float* dos = qs + kTq * lq;    // [kTq][ld]
  float* ks = dos + kTq * ld;    // [kTk][lk]
  float* vs = ks + kTk * lk;     // [kTk][lv]
  float* ss = vs + kTk * lv;     // [kTq][kTk + 1]  dS
  const int64_t q0 = int64_t(blockIdx.x) * kTq, h = blockIdx.y, b = blockIdx.z;
  const int64_t ldq = dm.h * dm.dqk, ldv = dm.h * dm.dv;
  const int tid = threadIdx.x, ty = tid >> 3, tx = tid & 7, r0 = 2 * ty;
  const float* kb = k + b * dm.s * ldq + h * dm.dqk;
  const float* vb = v + b * dm.s * ldv + h * dm.dv;
  load_rows(qs, lq, q + b * dm.t * ldq + h * dm.dqk, q0, kTq, dm.t, ldq, dqk);
  load_rows(dos, ld, dout + b * dm.t * ldv + h * dm.dv, q0, kTq, dm.t, ldv, dv);
  __syncthreads();
  float di[2], li[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = q0 + r0 + r;
    float part = 0.0f;
    if (i < dm.t) {
      const float* orow = out + (b * dm.t + i) * ldv + h * dm.dv;
      for (int c = tx; c < dv; c += 8) part += dos[(r0 + r) * ld + c] * orow[c];
    }
    part += __shfl_xor_sync(0xffffffffu, part, 1);
    part += __shfl_xor_sync(0xffffffffu, part, 2);
    part += __shfl_xor_sync(0xffffffffu, part, 4);
    di[r] = part;
    li[r] = i < dm.t ? lse[(b * dm.h + h) * dm.t + i] : 0.0f;
    if (i < dm.t && tx == 0) dsum[(b * dm.h + h) * dm.t + i] = part;
  }
  const int64_t q_last = q0 + kTq < dm.t ? q0 + kTq : dm.t;
  const int64_t lim = causal ? (dm.s < q_off + q_last ? dm.s : q_off + q_last) : dm.s;
  float acc[2][kMaxK8];
#pragma unroll
  for (int j = 0; j < kMaxK8; ++j) acc[0][j] = acc[1][j] = 0.0f;
  for (int64_t k0 = 0; k0 < lim; k0 += kTk) {
    __syncthreads();
    load_rows(ks, lk, kb, k0, kTk, dm.s, ldq, dqk);
    load_rows(vs, lv, vb, k0, kTk, dm.s, ldv, dv);
    __syncthreads();
    float sc[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}}, dp[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
    tile_dots(qs, lq, r0, ks, lk, tx, dqk, sc);
    tile_dots(dos, ld, r0, vs, lv, tx, dv, dp);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = q0 + r0 + r;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t key = k0 + tx + 8 * j;
        bool ok = i < dm.t && key < dm.s && (!causal || key <= q_off + i);
        float p = ok ? expf(sc[r][j] * scale - li[r]) : 0.0f;
        ss[(r0 + r) * (kTk + 1) + tx + 8 * j] = p * (dp[r][j] - di[r]);
      }
    }
    __syncthreads();
    for (int c = 0; c < kTk; ++c) {
      float s0 = ss[r0 * (kTk + 1) + c], s1 = ss[(r0 + 1) * (kTk + 1) + c];
#pragma unroll
      for (int j = 0; j < kMaxK8; ++j)
        if (8 * j < dqk) {
          float kk = ks[c * lk + tx + 8 * j];
          acc[0][j] = fmaf(s0, kk, acc[0][j]);
          acc[1][j] = fmaf(s1, kk, acc[1][j]);
        }
    }
  }
  if (!dq) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = q0 + r0 + r;
    if (i >= dm.t) continue;
    float* o = dq + (b * dm.t + i) * ldq + h * dm.dqk;
#pragma unroll
    for (int j = 0; j < kMaxK8; ++j)
      if (8 * j < dqk) o[tx + 8 * j] = scale * acc[r][j];
  }
}

// dk, dv: per block of 32 keys over the query tiles that can see them.
__global__ void __launch_bounds__(kTiledThreads) attn_bwd_kv_tiled(const float* q, const float* k, const float* v,
                                                                   const float* lse, const float* dout,
                                                                   const float* dsum, float* dk, float* dv_out,
                                                                   Dims dm, float scale, bool causal, int64_t q_off) {
  extern __shared__ float sm[];
  const int dqk = int(dm.dqk), dv = int(dm.dv), lq = dqk + 1, lk = dqk + 1, lv = dv + 1, ld = dv + 1;
  constexpr int lp = kTq + 1;
  float* ks = sm;                 // [kTk][lk]
  float* vs = ks + kTk * lk;      // [kTk][lv]
  float* qs = vs + kTk * lv;      // [kTq][lq]
  float* dos = qs + kTq * lq;     // [kTq][ld]
  float* ls = dos + kTq * ld;     // [kTq] lse
  float* ds_ = ls + kTq;          // [kTq] D
  float* ps = ds_ + kTq;          // [kTk][lp] P
  float* dss = ps + kTk * lp;     // [kTk][lp] dS
  const int64_t k0 = int64_t(blockIdx.x) * kTk, h = blockIdx.y, b = blockIdx.z;
  const int64_t ldq = dm.h * dm.dqk, ldv = dm.h * dm.dv;
  const int tid = threadIdx.x, kr = tid >> 3, tx = tid & 7;
  const float* qb = q + b * dm.t * ldq + h * dm.dqk;
  const float* db = dout + b * dm.t * ldv + h * dm.dv;
  const float* lb = lse + (b * dm.h + h) * dm.t;
  const float* sb = dsum + (b * dm.h + h) * dm.t;
  load_rows(ks, lk, k + b * dm.s * ldq + h * dm.dqk, k0, kTk, dm.s, ldq, dqk);
  load_rows(vs, lv, v + b * dm.s * ldv + h * dm.dv, k0, kTk, dm.s, ldv, dv);
  const int64_t key = k0 + kr;
  float ak[kMaxK8], av[kMaxV8];
#pragma unroll
  for (int j = 0; j < kMaxK8; ++j) ak[j] = 0.0f;
#pragma unroll
  for (int j = 0; j < kMaxV8; ++j) av[j] = 0.0f;
  int64_t first = causal ? (k0 - q_off > 0 ? k0 - q_off : 0) : 0;
  first = first / kTq * kTq;
  for (int64_t i0 = first; i0 < dm.t; i0 += kTq) {
    __syncthreads();
    load_rows(qs, lq, qb, i0, kTq, dm.t, ldq, dqk);
    load_rows(dos, ld, db, i0, kTq, dm.t, ldv, dv);
    for (int r = tid; r < kTq; r += kTiledThreads) {
      ls[r] = i0 + r < dm.t ? lb[i0 + r] : 0.0f;
      ds_[r] = i0 + r < dm.t ? sb[i0 + r] : 0.0f;
    }
    __syncthreads();
    float sc[8], dp[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) sc[j] = dp[j] = 0.0f;
    for (int d = 0; d < dqk; ++d) {
      float kk = ks[kr * lk + d];
#pragma unroll
      for (int j = 0; j < 8; ++j) sc[j] = fmaf(qs[(tx + 8 * j) * lq + d], kk, sc[j]);
    }
    for (int d = 0; d < dv; ++d) {
      float vv = vs[kr * lv + d];
#pragma unroll
      for (int j = 0; j < 8; ++j) dp[j] = fmaf(dos[(tx + 8 * j) * ld + d], vv, dp[j]);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int qi = tx + 8 * j;
      const int64_t i = i0 + qi;
      bool ok = i < dm.t && key < dm.s && (!causal || key <= q_off + i);
      float p = ok ? expf(sc[j] * scale - ls[qi]) : 0.0f;
      ps[kr * lp + qi] = p;
      dss[kr * lp + qi] = p * (dp[j] - ds_[qi]);
    }
    __syncwarp();  // the 8 lanes of a key row are in one warp
    for (int qi = 0; qi < kTq; ++qi) {
      float p = ps[kr * lp + qi], s = dss[kr * lp + qi];
#pragma unroll
      for (int j = 0; j < kMaxV8; ++j)
        if (8 * j < dv) av[j] = fmaf(p, dos[qi * ld + tx + 8 * j], av[j]);
#pragma unroll
      for (int j = 0; j < kMaxK8; ++j)
        if (8 * j < dqk) ak[j] = fmaf(s, qs[qi * lq + tx + 8 * j], ak[j]);
    }
  }
  if (key >= dm.s) return;
  if (dk) {
    float* o = dk + (b * dm.s + key) * ldq + h * dm.dqk;
#pragma unroll
    for (int j = 0; j < kMaxK8; ++j)
      if (8 * j < dqk) o[tx + 8 * j] = scale * ak[j];
  }
  if (dv_out) {
    float* o = dv_out + (b * dm.s + key) * ldv + h * dm.dv;
#pragma unroll
    for (int j = 0; j < kMaxV8; ++j)
      if (8 * j < dv) o[tx + 8 * j] = av[j];
  }
}

}  // namespace

void CudaBackend::attention(const AttentionArgs& a) {
  validate(a);
  if (a.keep) *a.keep = Tensor();  // only the BF16 kernels below keep operands
  const bool split = a.kv.defined();  // validated: the split form
  Dims d = split ? dims_of(a.q, a.kv, a.out) : dims_of(a.q, a.k, a.v);
  if (d.b * d.t * d.h == 0) return;
  // The BF16 kernels read the split form in place; the FP32 ones take it composed.
  if (cuda_attention_bf16() && cuda_attention_bf16_forward(a)) return;
  if (split) return attention_split_kv(*this, a);
  if (tiled_ok(d)) {
    size_t smem = size_t(kTq * (d.dqk + 1) + kTk * (d.dqk + 1) + kTk * d.dv + kTq * (kTk + 1)) * 4;
    allow_smem(attn_fwd_tiled, smem);
    attn_fwd_tiled<<<dim3(unsigned((d.t + kTq - 1) / kTq), unsigned(d.h), unsigned(d.b)), kTiledThreads, smem>>>(
        a.q.data<float>(), a.k.data<float>(), a.v.data<float>(), ptr<float>(a.out),
        present(a.lse) ? ptr<float>(a.lse) : nullptr, d, a.scale, a.causal, a.q_offset);
    check_launch("attention (tiled)");
    return;
  }
  size_t smem = size_t(d.dqk + d.dv + kChunk) * 4;
  allow_smem(attn_fwd_kernel, smem);
  attn_fwd_kernel<<<dim3(unsigned(d.t), unsigned(d.h), unsigned(d.b)), kChunk, smem>>>(
      a.q.data<float>(), a.k.data<float>(), a.v.data<float>(), ptr<float>(a.out),
      present(a.lse) ? ptr<float>(a.lse) : nullptr, d, a.scale, a.causal, a.q_offset);
  check_launch("attention");
}

void CudaBackend::attention_backward(const AttentionBackwardArgs& a) {
  validate(a);
  const bool split = a.kv.defined() || a.k_pe.defined();  // validated: the split form
  // q and kv may be absent where the forward kept its operands; dq and dkv have their shapes then.
  Dims d = split ? dims_of(q_or_dq(a), kv_or_dkv(a), a.out) : dims_of(q_or_dq(a), a.k, a.v);
  if (d.b * d.h == 0) return;
  // Kept operands come from the BF16 kernels' forward: its backward reads them, whatever the setting now.
  if ((cuda_attention_bf16() || a.kept.defined()) && cuda_attention_bf16_backward(a)) return;
  require_operands(a, "the BF16 kernels that read kept operands in its place decline these arguments (each of out, "
                      "dout, dkv and dk_pe must start 16-byte aligned)");
  if (split) return attention_backward_split_kv(*this, a);
  Scratch dsum(size_t(std::max<int64_t>(d.b * d.h * d.t, 1)) * 4);
  if (tiled_ok(d)) {
    if (d.t > 0) {
      size_t smem = size_t(kTq * (d.dqk + 1) + kTq * (d.dv + 1) + kTk * (d.dqk + 1) + kTk * (d.dv + 1) +
                           kTq * (kTk + 1)) * 4;
      allow_smem(attn_bwd_q_tiled, smem);
      attn_bwd_q_tiled<<<dim3(unsigned((d.t + kTq - 1) / kTq), unsigned(d.h), unsigned(d.b)), kTiledThreads, smem>>>(
          a.q.data<float>(), a.k.data<float>(), a.v.data<float>(), a.out.data<float>(), a.lse.data<float>(),
          a.dout.data<float>(), present(a.dq) ? ptr<float>(a.dq) : nullptr, dsum.as<float>(), d, a.scale, a.causal,
          a.q_offset);
      check_launch("attention_backward (dq, tiled)");
    }
    if ((present(a.dk) || present(a.dv)) && d.s > 0) {
      size_t smem = size_t(kTk * (d.dqk + 1) + kTk * (d.dv + 1) + kTq * (d.dqk + 1) + kTq * (d.dv + 1) + 2 * kTq +
                           2 * kTk * (kTq + 1)) * 4;
      allow_smem(attn_bwd_kv_tiled, smem);
      attn_bwd_kv_tiled<<<dim3(unsigned((d.s + kTk - 1) / kTk), unsigned(d.h), unsigned(d.b)), kTiledThreads, smem>>>(
          a.q.data<float>(), a.k.data<float>(), a.v.data<float>(), a.lse.data<float>(), a.dout.data<float>(),
          dsum.as<float>(), present(a.dk) ? ptr<float>(a.dk) : nullptr, present(a.dv) ? ptr<float>(a.dv) : nullptr,
          d, a.scale, a.causal, a.q_offset);
      check_launch("attention_backward (dk, dv, tiled)");
    }
    return;
  }
  if (d.t > 0) {
    size_t smem = size_t(2 * d.dqk + d.dv + kChunk) * 4;
    allow_smem(attn_bwd_q_kernel, smem);
    attn_bwd_q_kernel<<<dim3(unsigned(d.t), unsigned(d.h), unsigned(d.b)), kChunk, smem>>>(
        a.q.data<float>(), a.k.data<float>(), a.v.data<float>(), a.out.data<float>(), a.lse.data<float>(),
        a.dout.data<float>(), present(a.dq) ? ptr<float>(a.dq) : nullptr, dsum.as<float>(), d, a.scale, a.causal,
        a.q_offset);
    check_launch("attention_backward (dq)");
  }
  if ((present(a.dk) || present(a.dv)) && d.s > 0) {
    size_t smem = size_t(2 * d.dqk + 2 * d.dv + 2 * kChunk) * 4;
    allow_smem(attn_bwd_kv_kernel, smem);
    attn_bwd_kv_kernel<<<dim3(unsigned(d.s), unsigned(d.h), unsigned(d.b)), kChunk, smem>>>(
        a.q.data<float>(), a.k.data<float>(), a.v.data<float>(), a.lse.data<float>(), a.dout.data<float>(),
        dsum.as<float>(), present(a.dk) ? ptr<float>(a.dk) : nullptr, present(a.dv) ? ptr<float>(a.dv) : nullptr, d,
        a.scale, a.causal, a.q_offset);
    check_launch("attention_backward (dk, dv)");
  }
}

}  // namespace dsv3
