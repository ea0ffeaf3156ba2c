// FP8 E4M3 tile quantization on the GPU (backend/fp8.h semantics): one warp per tile (1×128,
// 128×1 or 128×128) finds the amax of its finite values, derives the scale exactly as the CPU does
// (amax/448, all-zero tile → 1, underflow → the smallest FP32, optional power of two) and writes the
// saturated RNE codes, optionally transposed.
#include <cfloat>

#include "backend/cuda/common.cuh"

namespace dsv3 {
using namespace cuda;

namespace {

__device__ float scale_of(float amax, bool pow2) {
  if (amax == 0.0f) return 1.0f;
  float s = amax / 448.0f;
  if (s == 0.0f) s = FLT_TRUE_MIN;
  if (pow2) {
    int e;
    float m = frexpf(s, &e);
    s = ldexpf(1.0f, m == 0.5f ? e - 1 : e);
  }
  return s;
}

__global__ void quantize_kernel(const float* x, int64_t M, int64_t K, int64_t th, int64_t tw, bool pow2, bool transpose,
                                uint8_t* q, float* sc, unsigned long long* nonfinite) {
  int64_t nrb = (M + th - 1) / th, ng = (K + tw - 1) / tw;
  int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  int lane = threadIdx.x & 31;
  if (warp >= nrb * ng) return;
  int64_t rb = warp / ng, g = warp % ng;
  int64_t r0 = rb * th, r1 = r0 + th < M ? r0 + th : M, c0 = g * tw, c1 = c0 + tw < K ? c0 + tw : K;
  int64_t w = c1 - c0, n = (r1 - r0) * w;
  float amax = 0.0f;
  unsigned long long bad = 0;
  for (int64_t e = lane; e < n; e += 32) {
    float v = x[(r0 + e / w) * K + c0 + e % w];
    if (!isfinite(v)) ++bad;
    else amax = fmaxf(amax, fabsf(v));
  }
  amax = warp_max(amax);
  bad = warp_sum(bad);
  float s = scale_of(amax, pow2);
  if (lane == 0) {
    if (transpose) sc[g * nrb + rb] = s;
    else sc[rb * ng + g] = s;
    if (bad) atomicAdd(nonfinite, bad);
  }
  for (int64_t e = lane; e < n; e += 32) {
    int64_t r = r0 + e / w, k = c0 + e % w;
    uint8_t v = __nv_cvt_float_to_fp8(x[r * K + k] / s, __NV_SATFINITE, __NV_E4M3);
    if (transpose) q[k * M + r] = v;
    else q[r * K + k] = v;
  }
}

}  // namespace

Fp8Status cuda_quantize_fp8(const QuantizeFp8Args& a) {
  validate(a);
  int64_t K = last_dim(a.x), M = rows_of(a.x);
  int64_t th = a.tiling == Fp8Tiling::Row1x128 ? 1 : kFp8Block, tw = a.tiling == Fp8Tiling::Col128x1 ? 1 : kFp8Block;
  int64_t tiles = ((M + th - 1) / th) * ((K + tw - 1) / tw);
  Scratch count(sizeof(unsigned long long));
  DSV3_CUDA_CHECK(cudaMemset(count.as<void>(), 0, sizeof(unsigned long long)));
  if (tiles)
    quantize_kernel<<<blocks_for(tiles * 32), 256>>>(a.x.data<float>(), M, K, th, tw, a.pow2_scale, a.transpose_out,
                                                     ptr<uint8_t>(a.q), ptr<float>(a.scale),
                                                     count.as<unsigned long long>());
  check_launch("quantize_fp8");
  unsigned long long bad = 0;
  DSV3_CUDA_CHECK(cudaMemcpy(&bad, count.as<void>(), sizeof bad, cudaMemcpyDeviceToHost));
  if (bad > 0 && a.on_nonfinite == NonFinitePolicy::Throw)
    input_error("FP8 quantization of ", a.name, ": ", bad, " non-finite value(s) (NaN or Inf) in [", M, ", ", K,
                "]; expected finite values");
  return {int64_t(bad)};
}

}  // namespace dsv3
