// Exact attention, memory-efficient (flash-style): no [T, S] score matrix is ever stored. The
// forward walks the keys in chunks of kChunk with an online softmax (running max and sum), one
// block per (query row, head, batch); it saves the logsumexp for the backward. The backward
// recomputes probabilities from the logsumexp: one pass per query row gives dq (and D = dO·O), one
// pass per key row gives dk and dv, so every output element has one owner (no atomics,
// deterministic). Any head dims (MLA's qk 192 / v 128, the absorbed 576/512) take the same path.
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
  float inv = 1.0f / l;
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

void set_smem(const void* kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

}  // namespace

void CudaBackend::attention(const AttentionArgs& a) {
  validate(a);
  Dims d = dims_of(a.q, a.k, a.v);
  if (d.b * d.t * d.h == 0) return;
  size_t smem = size_t(d.dqk + d.dv + kChunk) * 4;
  set_smem(reinterpret_cast<const void*>(attn_fwd_kernel), smem);
  attn_fwd_kernel<<<dim3(unsigned(d.t), unsigned(d.h), unsigned(d.b)), kChunk, smem>>>(
      a.q.data<float>(), a.k.data<float>(), a.v.data<float>(), ptr<float>(a.out),
      present(a.lse) ? ptr<float>(a.lse) : nullptr, d, a.scale, a.causal, a.q_offset);
  check_launch("attention");
}

void CudaBackend::attention_backward(const AttentionBackwardArgs& a) {
  validate(a);
  Dims d = dims_of(a.q, a.k, a.v);
  if (d.b * d.h == 0) return;
  Scratch dsum(size_t(std::max<int64_t>(d.b * d.h * d.t, 1)) * 4);
  if (d.t > 0) {
    size_t smem = size_t(2 * d.dqk + d.dv + kChunk) * 4;
    set_smem(reinterpret_cast<const void*>(attn_bwd_q_kernel), smem);
    attn_bwd_q_kernel<<<dim3(unsigned(d.t), unsigned(d.h), unsigned(d.b)), kChunk, smem>>>(
        a.q.data<float>(), a.k.data<float>(), a.v.data<float>(), a.out.data<float>(), a.lse.data<float>(),
        a.dout.data<float>(), present(a.dq) ? ptr<float>(a.dq) : nullptr, dsum.as<float>(), d, a.scale, a.causal,
        a.q_offset);
    check_launch("attention_backward (dq)");
  }
  if ((present(a.dk) || present(a.dv)) && d.s > 0) {
    size_t smem = size_t(2 * d.dqk + 2 * d.dv + 2 * kChunk) * 4;
    set_smem(reinterpret_cast<const void*>(attn_bwd_kv_kernel), smem);
    attn_bwd_kv_kernel<<<dim3(unsigned(d.s), unsigned(d.h), unsigned(d.b)), kChunk, smem>>>(
        a.q.data<float>(), a.k.data<float>(), a.v.data<float>(), a.lse.data<float>(), a.dout.data<float>(),
        dsum.as<float>(), present(a.dk) ? ptr<float>(a.dk) : nullptr, present(a.dv) ? ptr<float>(a.dv) : nullptr, d,
        a.scale, a.causal, a.q_offset);
    check_launch("attention_backward (dk, dv)");
  }
}

}  // namespace dsv3
