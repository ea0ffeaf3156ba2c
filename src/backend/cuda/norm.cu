// Embedding and RMSNorm with their backwards (SwiGLU is elementwise, in elementwise.cu).
#include <algorithm>
#include <optional>

#include "backend/cuda/common.cuh"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/unchecked_ops.h"

namespace dsv3 {
using namespace cuda;

namespace {

// An id outside the table (reported by the range check) gives a zero row.
__global__ void embedding_kernel(const int32_t* ids, const void* tab, DType tt, float* out, int64_t d, int64_t v) {
  int64_t t = blockIdx.x, row = ids[t];
  const bool in = row >= 0 && row < v;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) out[t * d + j] = in ? load_f(tab, tt, row * d + j) : 0.0f;
}
// dtable row r += dout rows of its tokens, in position order (order[] from a stable sort by id).
__global__ void embedding_bwd_kernel(const int32_t* order, const int32_t* off, const float* dout, float* dt,
                                     int64_t d) {
  int64_t r = blockIdx.x;
  int32_t lo = off[r], hi = off[r + 1];
  if (lo == hi) return;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    float v = dt[r * d + j];
    for (int32_t s = lo; s < hi; ++s) v += dout[int64_t(order[s]) * d + j];
    dt[r * d + j] = v;
  }
}
__global__ void rmsnorm_kernel(const float* x, const void* w, DType wt, float eps, float* y, float* rstd, int64_t d) {
  int64_t r = blockIdx.x;
  const float* xr = x + r * d;
  double ss = 0.0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) ss += double(xr[j]) * double(xr[j]);
  ss = block_sum(ss);
  float rs = float(1.0 / sqrt(ss / double(d) + double(eps)));
  if (rstd && threadIdx.x == 0) rstd[r] = rs;
  float* yr = y + r * d;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) yr[j] = load_f(w, wt, j) * (xr[j] * rs);
}
// The same arithmetic for rows of up to 256·NPT values held in registers: x and the weight are
// loaded together up front (the loop above waits for x, then, after the sum, for the weight).
template <int NPT>
__global__ void rmsnorm_reg_kernel(const float* x, const void* w, DType wt, float eps, float* y, float* rstd,
                                   int64_t d) {
  pdl_wait();  // x and (in training) the weight come from previous kernels
  pdl_trigger();
  const int64_t r = blockIdx.x;
  float h[NPT];
  const float rs = rms_norm_row(x + r * d, w, wt, d, eps, h);
  if (rstd && threadIdx.x == 0) rstd[r] = rs;
  float* yr = y + r * d;
#pragma unroll
  for (int i = 0; i < NPT; ++i) {
    const int64_t j = threadIdx.x + int64_t(i) * blockDim.x;
    if (j < d) yr[j] = h[i];
  }
}
__global__ void rmsnorm_dx_kernel(const float* dy, const float* x, const void* w, DType wt, const float* rstd,
                                  float* dx, int64_t d, bool acc) {
  int64_t r = blockIdx.x;
  const float* xr = x + r * d;
  const float* gr = dy + r * d;
  double dot = 0.0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x)
    dot += double(load_f(w, wt, j)) * double(gr[j]) * double(xr[j]);
  dot = block_sum(dot);
  float rs = rstd[r];
  float c = float(dot / double(d)) * rs * rs;
  float* o = dx + r * d;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    float v = rs * (load_f(w, wt, j) * gr[j] - xr[j] * c);
    o[j] = acc ? o[j] + v : v;
  }
}
// The backward in one pass over dy and x for rows of at most 128·V values (d % 4 == 0, rows 16-byte
// aligned): a warp per row, each lane four columns per 128, x, dy and the weight in registers; the
// warp also keeps its rows' dweight terms (the sum's own per-element product, double) and the CTA's
// four warps leave one partial per chunk of kFusedRows rows for rmsnorm_dw_kernel. The two-kernel
// form read dy and x twice: a bench-0.7b step's 49 launches of each took 5.67 ms on an H100, this
// pass 3.80 (its 1,024-wide rows at 1.65 TB/s: 244 registers, two CTAs per SM; two warps per such
// row, 8135dab, at 122 registers took 7% longer on the same H100).
constexpr int kFusedWarps = 4, kFusedRows = 64;
template <int V>
__global__ void __launch_bounds__(32 * kFusedWarps) rmsnorm_bwd_fused_kernel(const float* dy, const float* x,
                                                                             const void* w, DType wt,
                                                                             const float* rstd, float* dx,
                                                                             double* part, int64_t m, int64_t d,
                                                                             bool acc) {
  __shared__ double red[kFusedWarps][128 * V];
  const int lane = threadIdx.x & 31, wi = threadIdx.x >> 5;
  float wv[V][4];
  double dw[V][4] = {};
#pragma unroll
  for (int i = 0; i < V; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t j = 128 * i + 4 * lane + e;
      wv[i][e] = j < d ? load_f(w, wt, j) : 0.0f;
    }
  const int64_t r0 = int64_t(blockIdx.x) * kFusedRows;
  for (int64_t r = r0 + wi; r < m && r < r0 + kFusedRows; r += kFusedWarps) {
    float4 g[V], xv[V];
    double dot = 0.0;
    const float rs = rstd[r];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int64_t j = 128 * i + 4 * lane;
      const bool in = j < d;
      g[i] = in ? *reinterpret_cast<const float4*>(dy + r * d + j) : make_float4(0, 0, 0, 0);
      xv[i] = in ? *reinterpret_cast<const float4*>(x + r * d + j) : make_float4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float ge[4] = {g[i].x, g[i].y, g[i].z, g[i].w}, xe[4] = {xv[i].x, xv[i].y, xv[i].z, xv[i].w};
#pragma unroll
      for (int e = 0; e < 4; ++e) dot += double(wv[i][e]) * double(ge[e]) * double(xe[e]);
    }
    dot = warp_sum(dot);
    const float c = float(dot / double(d)) * rs * rs;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int64_t j = 128 * i + 4 * lane;
      if (j >= d) continue;
      const float ge[4] = {g[i].x, g[i].y, g[i].z, g[i].w}, xe[4] = {xv[i].x, xv[i].y, xv[i].z, xv[i].w};
      float o[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        o[e] = rs * (wv[i][e] * ge[e] - xe[e] * c);
        dw[i][e] += double(ge[e]) * double(xe[e] * rs);
      }
      float4* out = reinterpret_cast<float4*>(dx + r * d + j);
      if (acc) {
        const float4 old = *out;
        o[0] += old.x, o[1] += old.y, o[2] += old.z, o[3] += old.w;
      }
      *out = make_float4(o[0], o[1], o[2], o[3]);
    }
  }
  if (!part) return;
#pragma unroll
  for (int i = 0; i < V; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) red[wi][128 * i + 4 * lane + e] = dw[i][e];
  __syncthreads();
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    double s = 0.0;
#pragma unroll
    for (int k = 0; k < kFusedWarps; ++k) s += red[k][j];
    part[blockIdx.x * d + j] = s;
  }
}

// dweight in two deterministic passes (one thread per column over all rows left a 1024-wide weight
// on 1024 threads for 16k rows: ~10 ms per layer): per chunk of kDwRows rows, one thread per column
// sums its rows in order (double); then each column adds its chunks in order.
constexpr int64_t kDwRows = 128;
__global__ void rmsnorm_dw_part_kernel(const float* dy, const float* x, const float* rstd, double* part, int64_t m,
                                       int64_t d) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= d) return;
  // Chunks by a stride of the grid's height (at most 65,535: over 8.4M rows there are more chunks).
  for (int64_t c = blockIdx.y; c * kDwRows < m; c += gridDim.y) {
    const int64_t r0 = c * kDwRows, r1 = r0 + kDwRows < m ? r0 + kDwRows : m;
    double s = 0.0;
    for (int64_t r = r0; r < r1; ++r) s += double(dy[r * d + j]) * double(x[r * d + j] * rstd[r]);
    part[c * d + j] = s;
  }
}
// 32 columns per CTA, its 8 warps each summing every 8th chunk, then the 8 sums in warp order (a
// thread per column over all chunks left a 1024-wide weight on 8 CTAs: ~18 µs of dependent loads).
constexpr int kDwWarps = 8;
__global__ void rmsnorm_dw_kernel(const double* part, int64_t chunks, float* dw, int64_t d, bool acc) {
  __shared__ double sum[kDwWarps][32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t j = blockIdx.x * int64_t(32) + lane;
  double s = 0.0;
  if (j < d)
    for (int64_t c = w; c < chunks; c += kDwWarps) s += part[c * d + j];
  sum[w][lane] = s;
  __syncthreads();
  if (w != 0 || j >= d) return;
  double t = 0.0;
  for (int i = 0; i < kDwWarps; ++i) t += sum[i][lane];
  dw[j] = acc ? float(double(dw[j]) + t) : float(t);
}

}  // namespace

void CudaBackend::embedding(const EmbeddingArgs& a) {
  validate(a);
  const int64_t v = a.table.dim(0);
  check_range(a.ids.data<int32_t>(), a.ids.numel(), 0, v, [v](int64_t i, int32_t bad) {
    input_error("embedding: token id ", bad, " at position ", i, " is outside the vocabulary [0, ", v, ")");
  });
  cuda_embedding_unchecked(a);
}

void cuda_embedding_unchecked(const EmbeddingArgs& a) {
  validate(a);
  const int64_t t = a.ids.numel(), d = a.table.dim(1);
  if (t)
    embedding_kernel<<<unsigned(t), 256, 0, stream()>>>(a.ids.data<int32_t>(), a.table.raw(), a.table.dtype(),
                                                        ptr<float>(a.out), d, a.table.dim(0));
  check_launch("embedding");
}

void CudaBackend::embedding_backward(const EmbeddingBackwardArgs& a) {
  validate(a);
  int64_t t = a.ids.numel(), v = a.dtable.dim(0), d = a.dtable.dim(1);
  check_range(a.ids.data<int32_t>(), t, 0, v, [v](int64_t i, int32_t bad) {
    input_error("embedding_backward: token id ", bad, " at position ", i, " is outside [0, ", v, ")");
  });
  if (t == 0) return;
  Scratch order(size_t(t) * 4), off(size_t(v + 1) * 4);
  stable_bucket(a.ids.data<int32_t>(), t, v, order.as<int32_t>(), off.as<int32_t>());
  embedding_bwd_kernel<<<unsigned(v), 128>>>(order.as<int32_t>(), off.as<int32_t>(), a.dout.data<float>(),
                                             ptr<float>(a.dtable), d);
  check_launch("embedding_backward");
}

void CudaBackend::rmsnorm(const RmsNormArgs& a) {
  validate(a);
  int64_t d = last_dim(a.x), m = rows_of(a.x);
  if (m) {
    const float* x = a.x.data<float>();
    float* rstd = present(a.rstd) ? ptr<float>(a.rstd) : nullptr;
    // Programmatic dependent launch: a decode step's RMSNorm starts while the previous kernel drains.
    if (d <= 256 * 4)
      launch_pdl(rmsnorm_reg_kernel<4>, dim3(unsigned(m)), dim3(256), 0, x, a.weight.raw(), a.weight.dtype(), a.eps,
                 ptr<float>(a.y), rstd, d);
    else if (d <= 256 * 8)
      launch_pdl(rmsnorm_reg_kernel<8>, dim3(unsigned(m)), dim3(256), 0, x, a.weight.raw(), a.weight.dtype(), a.eps,
                 ptr<float>(a.y), rstd, d);
    else
      rmsnorm_kernel<<<unsigned(m), 256, 0, stream()>>>(x, a.weight.raw(), a.weight.dtype(), a.eps, ptr<float>(a.y),
                                                        rstd, d);
  }
  check_launch("rmsnorm");
}

namespace {
// The fused pass's V for d columns, or 0 where the two-kernel form runs.
int fused_width(const RmsNormBackwardArgs& a, int64_t d) {
  if (d == 0 || d % 4 != 0 || !present(a.dx) || !aligned16(a.dy.raw()) || !aligned16(a.x.raw()) ||
      !aligned16(a.dx.raw()))
    return 0;
  return d <= 256 ? 2 : d <= 512 ? 4 : d <= 1024 ? 8 : 0;
}
template <int V>
void launch_fused(const RmsNormBackwardArgs& a, int64_t m, int64_t d, double* part) {
  rmsnorm_bwd_fused_kernel<V><<<unsigned((m + kFusedRows - 1) / kFusedRows), 32 * kFusedWarps>>>(
      a.dy.data<float>(), a.x.data<float>(), a.weight.raw(), a.weight.dtype(), a.rstd.data<float>(), ptr<float>(a.dx),
      part, m, d, a.accumulate_dx);
}
}  // namespace

void CudaBackend::rmsnorm_backward(const RmsNormBackwardArgs& a) {
  validate(a);
  int64_t d = last_dim(a.x), m = rows_of(a.x);
  if (const int v = m > 0 ? fused_width(a, d) : 0) {
    const int64_t chunks = (m + kFusedRows - 1) / kFusedRows;
    std::optional<Scratch> part;
    if (present(a.dweight)) part.emplace(size_t(chunks * d) * sizeof(double));
    double* pp = part ? part->as<double>() : nullptr;
    if (v == 2) launch_fused<2>(a, m, d, pp);
    else if (v == 4) launch_fused<4>(a, m, d, pp);
    else launch_fused<8>(a, m, d, pp);
    if (pp)
      rmsnorm_dw_kernel<<<unsigned((d + 31) / 32), 32 * kDwWarps>>>(pp, chunks, ptr<float>(a.dweight), d,
                                                                   a.accumulate_dweight);
    check_launch("rmsnorm_backward");
    return;
  }
  // dweight first: dx may alias dy.
  if (present(a.dweight)) {
    const int64_t chunks = std::max<int64_t>((m + kDwRows - 1) / kDwRows, 1);
    Scratch part(size_t(chunks * d) * sizeof(double));
    if (m)
      rmsnorm_dw_part_kernel<<<dim3(blocks_for(d, 128), unsigned(std::min<int64_t>(chunks, 65535))), 128>>>(
          a.dy.data<float>(), a.x.data<float>(), a.rstd.data<float>(), part.as<double>(), m, d);
    else
      DSV3_CUDA_CHECK(cudaMemsetAsync(part.as<void>(), 0, size_t(d) * sizeof(double), nullptr));
    rmsnorm_dw_kernel<<<unsigned((d + 31) / 32), 32 * kDwWarps>>>(part.as<double>(), chunks, ptr<float>(a.dweight), d,
                                                                 a.accumulate_dweight);
  }
  if (present(a.dx) && m)
    rmsnorm_dx_kernel<<<unsigned(m), 256>>>(a.dy.data<float>(), a.x.data<float>(), a.weight.raw(), a.weight.dtype(),
                                            a.rstd.data<float>(), ptr<float>(a.dx), d, a.accumulate_dx);
  check_launch("rmsnorm_backward");
}

}  // namespace dsv3
