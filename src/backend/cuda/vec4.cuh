// Elementwise loops over F32 arrays four values at a time: one 16-byte load or store per operand
// where every base is 16-byte aligned, then the tail (or the whole array otherwise) one by one.
// The arithmetic per element is the same in both forms, so the result does not depend on the path.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>
#include <initializer_list>

namespace dsv3::cuda {

template <int W> struct Floats {
  float v[W];
};
template <int W> __device__ __forceinline__ Floats<W> load_w(const float* p) {
  Floats<W> r;
  if constexpr (W == 4) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    r.v[0] = t.x, r.v[1] = t.y, r.v[2] = t.z, r.v[3] = t.w;
  } else {
#pragma unroll
    for (int j = 0; j < W; ++j) r.v[j] = p[j];
  }
  return r;
}
template <int W> __device__ __forceinline__ void store_w(float* p, const Floats<W>& r) {
  if constexpr (W == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(r.v[0], r.v[1], r.v[2], r.v[3]);
  } else {
#pragma unroll
    for (int j = 0; j < W; ++j) p[j] = r.v[j];
  }
}

// BF16 operands (an output the op may write in BF16): RNE on store, exact widening on load.
template <int W> __device__ __forceinline__ Floats<W> load_w(const __nv_bfloat16* p) {
  Floats<W> r;
#pragma unroll
  for (int j = 0; j < W; ++j) r.v[j] = __bfloat162float(p[j]);
  return r;
}
template <int W> __device__ __forceinline__ void store_w(__nv_bfloat16* p, const Floats<W>& r) {
  if constexpr (W == 4) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(r.v[0], r.v[1]), hi = __floats2bfloat162_rn(r.v[2], r.v[3]);
    *reinterpret_cast<uint2*>(p) =
        make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
  } else {
#pragma unroll
    for (int j = 0; j < W; ++j) p[j] = __float2bfloat16_rn(r.v[j]);
  }
}

// op.template at<W>(i) handles elements i..i+W-1 (W = 4 or 1). vec: every operand's base is
// 16-byte aligned (the caller checks with all_aligned16).
template <class Op> __global__ void map4_kernel(Op op, int64_t n, bool vec) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x, t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t n4 = vec ? n / 4 : 0;
  for (int64_t i = t; i < n4; i += stride) op.template at<4>(4 * i);
  for (int64_t i = 4 * n4 + t; i < n; i += stride) op.template at<1>(i);
}

// Null pointers (absent optional operands) count as aligned.
inline bool all_aligned16(std::initializer_list<const void*> ps) {
  for (const void* p : ps)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

}  // namespace dsv3::cuda
