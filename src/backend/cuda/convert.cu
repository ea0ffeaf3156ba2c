// F32 → BF16 for the tensor-core operands: four elements per thread (one 16-byte load, one 8-byte
// store). The generic conversion loop (one element, a dtype switch and a scale lookup per thread)
// took a fifth of a bench-0.7b BF16 training step's GPU time.
#include "backend/cuda/common.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/stream.h"

namespace dsv3::cuda {
namespace {

__global__ void f32_to_bf16_kernel(const float* x, int64_t n, __nv_bfloat16* y) {
  const int64_t n4 = n / 4;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4; i += stride) {
    const float4 v = reinterpret_cast<const float4*>(x)[i];
    __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
    uint2 out;
    out.x = *reinterpret_cast<uint32_t*>(&lo);
    out.y = *reinterpret_cast<uint32_t*>(&hi);
    reinterpret_cast<uint2*>(y)[i] = out;
  }
  for (int64_t i = 4 * n4 + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += stride)
    y[i] = __float2bfloat16_rn(x[i]);
}
__global__ void f32_to_bf16_scalar_kernel(const float* x, int64_t n, __nv_bfloat16* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = __float2bfloat16_rn(x[i]);
}

// Two elements per split_bf16x2: four per thread when x is 16- and hi, lo 8-byte aligned (vec),
// then the tail one by one (its pair's second element 0).
__global__ void f32_split_bf16_kernel(const float* x, int64_t n, __nv_bfloat16* hi, __nv_bfloat16* lo, bool vec) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x, n4 = vec ? n / 4 : 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4; i += stride) {
    const float4 v = reinterpret_cast<const float4*>(x)[i];
    uint2 h, l;
    split_bf16x2(v.x, v.y, h.x, l.x);
    split_bf16x2(v.z, v.w, h.y, l.y);
    reinterpret_cast<uint2*>(hi)[i] = h;
    reinterpret_cast<uint2*>(lo)[i] = l;
  }
  for (int64_t i = 4 * n4 + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += stride) {
    uint32_t h, l;
    split_bf16x2(x[i], 0.0f, h, l);
    hi[i] = __ushort_as_bfloat16(uint16_t(h));
    lo[i] = __ushort_as_bfloat16(uint16_t(l));
  }
}

// One element pair per thread (cols even) or one element (odd cols), rows of x ldx apart.
__global__ void f32_split_bf16_rows_kernel(const float* x, int64_t rows, int64_t cols, int64_t ldx, __nv_bfloat16* hi,
                                           __nv_bfloat16* lo) {
  const int64_t per = (cols + 1) / 2, n = rows * per, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += stride) {
    const int64_t r = i / per, c = 2 * (i % per);
    const bool two = c + 1 < cols;
    uint32_t h, l;
    split_bf16x2(x[r * ldx + c], two ? x[r * ldx + c + 1] : 0.0f, h, l);
    hi[r * cols + c] = __ushort_as_bfloat16(uint16_t(h));
    lo[r * cols + c] = __ushort_as_bfloat16(uint16_t(l));
    if (two) {
      hi[r * cols + c + 1] = __ushort_as_bfloat16(uint16_t(h >> 16));
      lo[r * cols + c + 1] = __ushort_as_bfloat16(uint16_t(l >> 16));
    }
  }
}

}  // namespace

void f32_split_bf16(const float* x, int64_t rows, int64_t cols, int64_t ldx, __nv_bfloat16* hi, __nv_bfloat16* lo) {
  const int64_t n = rows * cols;
  if (n == 0) return;
  if (ldx == cols) {  // contiguous: one flat pass, four elements per thread when aligned
    const bool vec = (reinterpret_cast<uintptr_t>(x) & 15u) == 0 && (reinterpret_cast<uintptr_t>(hi) & 7u) == 0 &&
                     (reinterpret_cast<uintptr_t>(lo) & 7u) == 0;
    const unsigned grid = unsigned(std::min<int64_t>((n / 4 + 255) / 256 + 1, int64_t(sm_count()) * 16));
    f32_split_bf16_kernel<<<grid, 256, 0, stream()>>>(x, n, hi, lo, vec);
  } else {
    const int64_t pairs = rows * ((cols + 1) / 2);
    const unsigned grid = unsigned(std::min<int64_t>((pairs + 255) / 256, int64_t(sm_count()) * 16));
    f32_split_bf16_rows_kernel<<<grid, 256, 0, stream()>>>(x, rows, cols, ldx, hi, lo);
  }
  check_launch("f32 split into bf16 terms");
}

void f32_to_bf16(const float* x, int64_t n, __nv_bfloat16* y) {
  if (n == 0) return;
  const unsigned grid = unsigned(std::min<int64_t>((n / 4 + 255) / 256 + 1, int64_t(sm_count()) * 16));
  if ((reinterpret_cast<uintptr_t>(x) & 15u) == 0 && (reinterpret_cast<uintptr_t>(y) & 7u) == 0)
    f32_to_bf16_kernel<<<grid, 256>>>(x, n, y);
  else
    f32_to_bf16_scalar_kernel<<<std::min(blocks_for(n), 1u << 16), 256>>>(x, n, y);
  check_launch("f32 to bf16");
}

}  // namespace dsv3::cuda
