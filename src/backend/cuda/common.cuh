// Helpers shared by the CUDA op files: error checks, launch shapes, dtype loads, block reductions,
// and device scratch from the backend's caching allocator.
#pragma once
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>

#include "backend/cuda/cuda_backend.h"
#include "core/error.h"

namespace dsv3::cuda {

using bf16_t = __nv_bfloat16;  // the kernels' BF16 element type

#define DSV3_CUDA_CHECK(expr)                                                                     \
  do {                                                                                            \
    cudaError_t e_ = (expr);                                                                      \
    if (e_ != cudaSuccess) ::dsv3::internal_error("CUDA: ", #expr, ": ", cudaGetErrorString(e_)); \
  } while (0)
#define DSV3_CUBLAS_CHECK(expr)                                                                   \
  do {                                                                                            \
    int s_ = int(expr);                                                                           \
    if (s_ != 0) ::dsv3::internal_error("cuBLAS: ", #expr, " returned status ", s_);              \
  } while (0)

// Check the last launch (cheap: no synchronisation).
inline void check_launch(const char* op) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) internal_error("CUDA launch in ", op, ": ", cudaGetErrorString(e));
}

// A start-up switch (DSV3_CUDA_PDL, DSV3_GROUPED_WGRAD, …): on unless the environment sets the
// variable to "0", which keeps the older path for comparison.
inline bool on_unless_env_zero(const char* name) {
  const char* e = std::getenv(name);
  return !(e && std::strcmp(e, "0") == 0);
}
// The other kind (DSV3_FP8_LEGACY, DSV3_GROUPED_FP8_WS, …): off unless the variable is "1".
inline bool off_unless_env_one(const char* name) {
  const char* e = std::getenv(name);
  return e && std::strcmp(e, "1") == 0;
}

// Lets a kernel instance take `smem` bytes of dynamic shared memory (needed beyond 48 KB). Callers
// that launch the same instance again keep it in a function-local static: set once.
template <class... P> void allow_smem(void (*kernel)(P...), size_t smem) {
  if (smem > 48 * 1024)
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
}

// The device's SM count (device 0, read once): grids sized to whole waves.
inline int sm_count() {
  static const int n = [] {
    int x = 0;
    DSV3_CUDA_CHECK(cudaDeviceGetAttribute(&x, cudaDevAttrMultiProcessorCount, 0));
    return x;
  }();
  return n;
}

inline unsigned blocks_for(int64_t n, int threads = 256) {
  int64_t b = (n + threads - 1) / threads;
  return unsigned(b < 1 ? 1 : (b > (1 << 30) ? (1 << 30) : b));
}

// silu(g)·u of one element and its gradients (d: the output's): elementwise.cu's swiglu ops and
// swiglu_fp8.cu's fused forms share them, so that their outputs (and the FP8 tiles made from them)
// agree bit for bit.
__device__ __forceinline__ float swiglu_value(float g, float u) { return g / (1.0f + expf(-g)) * u; }
__device__ __forceinline__ void swiglu_grad(float d, float g, float u, float& dg, float& du) {
  const float sg = 1.0f / (1.0f + expf(-g));
  dg = d * u * sg * (1.0f + g * (1.0f - sg));
  du = d * (g * sg);
}

template <class T> T* ptr(const Tensor& t) { return static_cast<T*>(const_cast<Tensor&>(t).raw()); }
inline int64_t last_dim(const Tensor& t) { return t.ndim() ? t.dim(-1) : 1; }
inline int64_t rows_of(const Tensor& t) {
  int64_t l = last_dim(t);
  return l ? t.numel() / l : 0;
}

// Element i of a float tensor of any stored dtype, as F32 (the CPU's conversions: exact widening).
__device__ __forceinline__ float load_f(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F64: return float(static_cast<const double*>(p)[i]);
    case DType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::F16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::F8_E4M3: {
      __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<const __nv_fp8_storage_t*>(p)[i], __NV_E4M3);
      return __half2float(__half(h));
    }
    case DType::F8_E5M2: {
      __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<const __nv_fp8_storage_t*>(p)[i], __NV_E5M2);
      return __half2float(__half(h));
    }
    case DType::I32: return float(static_cast<const int32_t*>(p)[i]);
    default: return 0.0f;
  }
}
// Store F32 into a float dtype with the CPU's rounding (RNE; FP8 saturating).
__device__ __forceinline__ void store_f(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::F32: static_cast<float*>(p)[i] = v; break;
    case DType::F64: static_cast<double*>(p)[i] = double(v); break;
    case DType::BF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    case DType::F16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case DType::F8_E4M3:
      static_cast<__nv_fp8_storage_t*>(p)[i] = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
      break;
    case DType::F8_E5M2:
      static_cast<__nv_fp8_storage_t*>(p)[i] = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E5M2);
      break;
    default: break;
  }
}

// Block-wide sum / max (blockDim.x a multiple of 32, ≤ 1024). Every thread gets the result.
template <class T> __device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <class T> __device__ T block_sum(T v) {
  __shared__ T part[32];
  __syncthreads();  // part may still be read by a previous call
  v = warp_sum(v);
  int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) part[w] = v;
  __syncthreads();
  T r = lane < nw ? part[lane] : T(0);
  return warp_sum(r);
}
// The backend's RMSNorm factor 1/sqrt(Σx²/d + eps) of a row held by the block, NPT values per thread
// at column stride blockDim.x (v[i] is column threadIdx.x + i·blockDim.x): each thread's squares
// summed in double in ascending i over the columns < d, then block_sum. Every kernel that must give
// the backend's RMSNorm bits (rmsnorm_reg_kernel, the decode kernels that fuse a norm) calls this.
template <int NPT> __device__ float rms_rstd(const float (&v)[NPT], int64_t d, float eps) {
  double ss = 0.0;
#pragma unroll
  for (int i = 0; i < NPT; ++i)
    if (threadIdx.x + int64_t(i) * blockDim.x < d) ss += double(v[i]) * double(v[i]);
  ss = block_sum(ss);
  return float(1.0 / sqrt(ss / double(d) + double(eps)));
}
// The backend's RMSNorm of the row xr (d values) for this thread's NPT columns (column threadIdx.x +
// i·blockDim.x; 0 past d): h[i] = w·(x·rs), with x and the weight loaded together before the sum.
// Returns rs. rmsnorm_reg_kernel and the decode's fused norm + router share it, so their bits agree.
template <int NPT>
__device__ float rms_norm_row(const float* xr, const void* w, DType wt, int64_t d, float eps, float (&h)[NPT]) {
  float xv[NPT], wv[NPT];
#pragma unroll
  for (int i = 0; i < NPT; ++i) {
    const int64_t j = threadIdx.x + int64_t(i) * blockDim.x;
    xv[i] = j < d ? xr[j] : 0.0f;
    wv[i] = j < d ? load_f(w, wt, j) : 0.0f;
  }
  const float rs = rms_rstd(xv, d, eps);
#pragma unroll
  for (int i = 0; i < NPT; ++i) h[i] = wv[i] * (xv[i] * rs);
  return rs;
}
__device__ inline float block_max(float v) {
  __shared__ float part[32];
  __syncthreads();
  v = warp_max(v);
  int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) part[w] = v;
  __syncthreads();
  float r = lane < nw ? part[lane] : -INFINITY;
  return warp_max(r);
}

// Device scratch from the caching allocator, freed (returned to the cache) at scope exit. Memory
// freed here is only reused by work queued after this op's kernels: on the same stream, or, inside
// a lane scope (CudaBackend::begin_lanes), once the scope has joined its lanes.
class Scratch {
 public:
  explicit Scratch(size_t bytes);
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class T> T* as() const { return static_cast<T*>(p_); }

 private:
  void* p_ = nullptr;
};

// The shared cuBLAS handle (FP32 math, TF32 off; default stream).
cublasHandle_t cublas();

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Row-major C[m,n] = alpha·op(A)·op(B) + beta·C (cuBLAS SGEMM).
void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
           const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// Queues a device-side check that the n values at p lie in [lo, hi). A failure is raised at the next
// read-back to the host (CudaBackend::to_host or synchronize) by fail(index, value) of the first
// element outside, so checking an op's indices costs no synchronisation; every kernel that consumes
// such indices skips values outside the range instead of reading or writing out of bounds.
void check_range(const int32_t* p, int64_t n, int64_t lo, int64_t hi, std::function<void(int64_t, int32_t)> fail);
// Raises the first failed queued check, if any (one blocking copy when checks are queued).
void raise_range_errors();

// y[0..n) = x rounded to BF16 (nearest even), vectorised when x is 16- and y 8-byte aligned.
void f32_to_bf16(const float* x, int64_t n, __nv_bfloat16* y);
// x = hi + lo + r per element, |r| ≤ 2⁻¹⁶|x| (split_bf16x2 of mma.cuh), on cuda::stream(): `rows`
// rows of `cols` values ldx apart in x, dense [rows, cols] in hi and lo (vectorised when the rows are
// contiguous). Used for BF16-weight products in F32 math on tensor cores.
void f32_split_bf16(const float* x, int64_t rows, int64_t cols, int64_t ldx, __nv_bfloat16* hi, __nv_bfloat16* lo);
// grouped_linear (and linear, one block) with BF16 or FP8 weights on tensor cores, x split by
// f32_split_bf16, FP8 weights into two BF16 terms (grouped_linear.cu). Returns the number of leading
// blocks done: all, or 0 with nothing written for shapes it does not take (K or N unaligned,
// unaligned weights or y, other dtypes), or where cuBLASLt has no algorithm the blocks before the
// run that found none. The caller widens the weights of the rest.
size_t split_bf16_grouped(const GroupedLinearArgs& a);

// Stable sort of keys k[0..n) in [0, nkeys): order[r] = index of the r-th element, and
// offsets[0..nkeys] the start of each key's run (device arrays owned by the caller). Keys outside
// [0, nkeys) are counted in no run.
void stable_bucket(const int32_t* keys, int64_t n, int64_t nkeys, int32_t* order, int32_t* offsets);

}  // namespace dsv3::cuda
