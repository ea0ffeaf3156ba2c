// The pieces of FP8 E4M3 tile quantization shared by quantize.cu's kernels and the fused producers
// that quantize their own outputs (swiglu_fp8.cu): the scale of a tile's amax, the codes of its
// values (the CPU's division and rounding, backend/fp8.h), and the 1×128 tile held by eight lanes.
#pragma once
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cfloat>
#include <cstdint>

namespace dsv3::cuda::fp8q {

__device__ inline float scale_of(float amax, bool pow2) {
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

// Folds v into a tile's statistics: amax over its finite values, bad counting the others.
template <class Count>
__device__ __forceinline__ void tile_stat(float v, float& amax, Count& bad) {
  if (!isfinite(v)) ++bad;
  else amax = fmaxf(amax, fabsf(v));
}
// max(a, b) that is NaN when either is (max.NaN). Folding |v| of a tile's values with it costs one
// instruction per value where tile_stat takes three (a test, a max and a count under predicates):
// the result is the amax while every value is finite and NaN or +Inf otherwise, and only then do
// the callers go back over the values with tile_stat (the scale and the count of the CPU's rule).
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ bool finite_amax(float m) { return m < INFINITY; }  // false for NaN too

// Exact widening to F32 (E4M3 through half, as load_f).

__device__ __forceinline__ float widen(__nv_fp8_storage_t v) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(v, __NV_E4M3)));
}
// The four codes of a word widened (byte 0 first), two per conversion; the values of widen.
__device__ __forceinline__ float4 widen4(uint32_t word) {
  const auto pair = [](uint32_t two) {
    return __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(two), __NV_E4M3)));
  };
  const float2 lo = pair(word & 0xffffu), hi = pair(word >> 16);
  return make_float4(lo.x, lo.y, hi.x, hi.y);
}

// v / s for a tile's scale s, rounded as the CPU's FP32 division, in five instructions where the
// division takes ~15 (it was most of the GEMM preparation's instructions): q0 = RN(v·r) with
// r = RN(1/s) may be an ulp or so off, one step with the remainder v − q0·s (an fma) brings it
// within an ulp, and a second step, whose remainder is then exact, rounds it correctly
// (Markstein: r within half an ulp of 1/s, q within an ulp of v/s). The remainders stay normal
// while s is not tiny: tiles with s outside [2^-80, 2^100] divide outright. Below that, a quotient
// under 2^-11 may come out an ulp off (a subnormal remainder), and its code is ±0 either way.
// Non-finite v: q0 itself, as the division gives (±Inf saturates, NaN stays NaN); the sign is v's
// (−0 included). tools/scale_div_check.c compares it with the division for every finite
// |v| ≤ 448·s of scales across that range. A tile known to hold finite values only (finite: the
// scale is its own amax's, so |v/s| ≤ 448 and q is finite) skips the test for non-finite q: two
// instructions of the code's eight.
struct ScaleDiv {
  float s, r;
  bool fast, finite;
  __device__ explicit ScaleDiv(float scale, bool finite_tile = false)
      : s(scale), r(1.0f / scale), fast(scale >= 0x1p-80f && scale <= 0x1p100f), finite(finite_tile) {}
  // The two Newton steps while fast.
  __device__ __forceinline__ float steps(float v) const {
    const float q0 = __fmul_rn(v, r), q1 = __fmaf_rn(__fmaf_rn(-q0, s, v), r, q0);
    return __fmaf_rn(__fmaf_rn(-q1, s, v), r, q1);
  }
  // The quotient while fast.
  __device__ __forceinline__ float quick(float v) const {
    const float q = steps(v);
    return isfinite(q) ? copysignf(q, v) : __fmul_rn(v, r);  // −0: the remainder's sum comes out +0
  }
  __device__ __forceinline__ float operator()(float v) const { return fast ? quick(v) : v / s; }
};

// The code of v in a tile: the saturated round-to-nearest E4M3 of v/s, the CPU's rule.
__device__ __forceinline__ uint8_t code_of(float v, const ScaleDiv& d) {
  return __nv_cvt_float_to_fp8(d(v), __NV_SATFINITE, __NV_E4M3);
}
// The codes of v[0..N) (N a multiple of 4) packed four to a word, v[0] in the lowest byte. The test
// for the fast quotient is made once for all N, not around each code, and two codes come from one
// conversion (with a since-replaced redux.sync amax, the experts' down-projection preparation of a
// bench-0.7b layer went 258M → 166M instructions under ncu).
template <int N>
__device__ __forceinline__ void codes(const float* v, const ScaleDiv& d, uint32_t (&out)[N / 4]) {
  float q[N];
  if (d.fast && d.finite) {
#pragma unroll
    for (int j = 0; j < N; ++j) q[j] = copysignf(d.steps(v[j]), v[j]);
  } else if (d.fast) {
#pragma unroll
    for (int j = 0; j < N; ++j) q[j] = d.quick(v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) q[j] = v[j] / d.s;
  }
#pragma unroll
  for (int j = 0; j < N / 4; ++j)
    out[j] = uint32_t(__nv_cvt_float2_to_fp8x2(make_float2(q[4 * j], q[4 * j + 1]), __NV_SATFINITE, __NV_E4M3)) |
             uint32_t(__nv_cvt_float2_to_fp8x2(make_float2(q[4 * j + 2], q[4 * j + 3]), __NV_SATFINITE, __NV_E4M3))
                 << 16;
}
__device__ __forceinline__ uint32_t codes4(const float* v, const ScaleDiv& d) {
  uint32_t b[1];
  codes<4>(v, d, b);
  return b[0];
}

// A 1×128 tile held by an aligned group of eight lanes, sixteen values per lane: its scale, and in
// bad (every lane of the group) the count of its non-finite values. The amax is exact in any order.
// Every lane of the warp calls it (it shuffles); a non-finite value in any of the warp's tiles sends
// all four groups through tile_stat.
__device__ __forceinline__ float group8_tile_scale(const float (&v)[16], bool pow2, unsigned& bad) {
  float amax = 0.0f;
  bad = 0;
#pragma unroll
  for (int k = 0; k < 16; ++k) amax = max_nan(amax, fabsf(v[k]));
#pragma unroll
  for (int m = 1; m < 8; m <<= 1) amax = max_nan(amax, __shfl_xor_sync(0xffffffffu, amax, m));
  if (__any_sync(0xffffffffu, !finite_amax(amax))) {
    amax = 0.0f;
#pragma unroll
    for (int k = 0; k < 16; ++k) tile_stat(v[k], amax, bad);
#pragma unroll
    for (int m = 1; m < 8; m <<= 1) {
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
      bad += __shfl_xor_sync(0xffffffffu, bad, m);
    }
  }
  return scale_of(amax, pow2);
}
// Lane j's sixteen values of a whole 1×128 tile at t (16-byte aligned, global or shared memory):
// columns 4j + 32k .. +3 (k < 4), so a group's loads read 128 contiguous bytes; zeros unless in.
__device__ __forceinline__ void group8_get(const float* t, int j, bool in, float (&v)[16]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float4 f = in ? *reinterpret_cast<const float4*>(t + 4 * j + 32 * k) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    v[4 * k] = f.x, v[4 * k + 1] = f.y, v[4 * k + 2] = f.z, v[4 * k + 3] = f.w;
  }
}
// Their codes under the tile's scale s (finite: the tile holds no non-finite value), into the
// tile's 128 codes at q (4-byte aligned).
__device__ __forceinline__ void group8_put(uint8_t* q, int j, const float (&v)[16], float s, bool finite) {
  uint32_t b[4];
  codes<16>(v, ScaleDiv(s, finite), b);
#pragma unroll
  for (int k = 0; k < 4; ++k) *reinterpret_cast<uint32_t*>(q + 4 * j + 32 * k) = b[k];
}

}  // namespace dsv3::cuda::fp8q
