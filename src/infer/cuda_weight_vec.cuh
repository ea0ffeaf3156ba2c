// 16-byte vectors of F32 or BF16 rows, shared by the decode kernels (cuda_decode_ops.cu, the
// tensor-core pieces in cuda_decode_mma.cuh) and the latent attention's BF16 cache rows
// (cuda_latent_attention.cu). CUDA only.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

namespace dsv3::cuda {

// 16 bytes of a weight row, read once: not kept in L1.
__device__ __forceinline__ uint4 ld_weights(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// The columns one 16-byte vector holds (4 F32 or 8 BF16), and the vector as F32.
template <class WT> constexpr int kVecCols = 16 / int(sizeof(WT));
template <class WT> __device__ __forceinline__ void unpack_w(uint4 w, float (&f)[kVecCols<WT>]) {
  const uint32_t u[4] = {w.x, w.y, w.z, w.w};
  if constexpr (sizeof(WT) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(u[i]);
  } else {  // BF16: column 2i in the low half of word i (little-endian), 2i + 1 in the high half
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(u[i] << 16);
      f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
    }
  }
}

}  // namespace dsv3::cuda
