// F32 → BF16 for the tensor-core operands: four elements per thread (one 16-byte load, one 8-byte
// store). The generic conversion loop (one element, a dtype switch and a scale lookup per thread)
// took a fifth of a bench-0.7b BF16 training step's GPU time.
#include "backend/cuda/common.cuh"

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

}  // namespace

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
