// Embedding and RMSNorm with their backwards (SwiGLU is elementwise, in elementwise.cu).
#include <algorithm>

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
// dweight in two deterministic passes (one thread per column over all rows left a 1024-wide weight
// on 1024 threads for 16k rows: ~10 ms per layer): per chunk of kDwRows rows, one thread per column
// sums its rows in order (double); then each column adds its chunks in order.
constexpr int64_t kDwRows = 128;
__global__ void rmsnorm_dw_part_kernel(const float* dy, const float* x, const float* rstd, double* part, int64_t m,
                                       int64_t d) {
  int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, c = blockIdx.y;
  if (j >= d) return;
  int64_t r0 = c * kDwRows, r1 = r0 + kDwRows < m ? r0 + kDwRows : m;
  double s = 0.0;
  for (int64_t r = r0; r < r1; ++r) s += double(dy[r * d + j]) * double(x[r * d + j] * rstd[r]);
  part[c * d + j] = s;
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

void CudaBackend::rmsnorm_backward(const RmsNormBackwardArgs& a) {
  validate(a);
  int64_t d = last_dim(a.x), m = rows_of(a.x);
  // dweight first: dx may alias dy.
  if (present(a.dweight)) {
    const int64_t chunks = std::max<int64_t>((m + kDwRows - 1) / kDwRows, 1);
    Scratch part(size_t(chunks * d) * sizeof(double));
    if (m)
      rmsnorm_dw_part_kernel<<<dim3(blocks_for(d, 128), unsigned(chunks)), 128>>>(
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
