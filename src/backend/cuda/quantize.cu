// FP8 E4M3 tile quantization on the GPU (backend/fp8.h semantics): one warp per tile (1×128,
// 128×1 or 128×128) finds the amax of its finite values, derives the scale exactly as the CPU does
// (amax/448, all-zero tile → 1, underflow → the smallest FP32, optional power of two) and writes the
// saturated RNE codes, optionally transposed; 128×128 tiles take one CTA each, and transposed 128×1 /
// 128×128 outputs go through a tiled transpose of x first. The reduced-precision linear layer's variant
// (cuda_quantize_fp8_async) does not read the count back and marks a tile with non-finite values by
// a NaN scale, so the whole training step runs without a host synchronisation per quantization.
#include <cfloat>

#include "backend/cuda/common.cuh"
#include "backend/cuda/linear_lowp.h"

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
                                bool nan_mark, uint8_t* q, float* sc, unsigned long long* nonfinite) {
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
    float sw = bad && nan_mark ? __int_as_float(0x7fc00000) : s;
    if (transpose) sc[g * nrb + rb] = sw;
    else sc[rb * ng + g] = sw;
    if (bad && nonfinite) atomicAdd(nonfinite, bad);
  }
  for (int64_t e = lane; e < n; e += 32) {
    int64_t r = r0 + e / w, k = c0 + e % w;
    uint8_t v = __nv_cvt_float_to_fp8(x[r * K + k] / s, __NV_SATFINITE, __NV_E4M3);
    if (transpose) q[k * M + r] = v;
    else q[r * K + k] = v;
  }
}

// One CTA (256 threads) per 128×128 tile: a warp per tile leaves a weight's few tiles on a few warps.
__global__ void quantize_block_kernel(const float* x, int64_t M, int64_t K, bool pow2, bool nan_mark, uint8_t* q,
                                      float* sc, unsigned long long* nonfinite) {
  const int64_t ng = (K + kFp8Block - 1) / kFp8Block, rb = blockIdx.x / ng, g = blockIdx.x % ng;
  const int64_t r0 = rb * kFp8Block, r1 = r0 + kFp8Block < M ? r0 + kFp8Block : M, c = g * kFp8Block + (threadIdx.x & 127);
  const bool in = c < K;
  const int rs = threadIdx.x >> 7;
  float amax = 0.0f;
  unsigned long long bad = 0;
  if (in)
    for (int64_t r = r0 + rs; r < r1; r += 2) {
      float v = x[r * K + c];
      if (!isfinite(v)) ++bad;
      else amax = fmaxf(amax, fabsf(v));
    }
  amax = block_max(amax);
  bad = block_sum(bad);
  const float s = scale_of(amax, pow2);
  if (threadIdx.x == 0) {
    sc[rb * ng + g] = bad && nan_mark ? __int_as_float(0x7fc00000) : s;
    if (bad && nonfinite) atomicAdd(nonfinite, bad);
  }
  if (in)
    for (int64_t r = r0 + rs; r < r1; r += 2) q[r * K + c] = __nv_cvt_float_to_fp8(x[r * K + c] / s, __NV_SATFINITE, __NV_E4M3);
}

// 128×1 tiles with the transposed output (Wgrad's operands), one CTA per 128 rows × 32 columns: the
// tile is read once along rows (coalesced), kept in shared memory, and written per column (coalesced
// in the transposed q). The source is x [M, K] F32, or FP8 1×128 tiles (qs, ss: x̂ = e4m3(qs)·ss, the
// dequantized FP32 value, as dequantize_fp8 computes it) so that the forward's FP8 copy is
// re-quantized without materialising x̂.
template <bool kFp8Src>
__global__ void quantize_cols_t_kernel(const float* x, const uint8_t* qs, const float* ss, int64_t M, int64_t K,
                                       bool pow2, bool nan_mark, uint8_t* q, float* sc,
                                       unsigned long long* nonfinite) {
  __shared__ float t[kFp8Block][33];
  __shared__ float am_w[8][32], s_col[32];
  __shared__ unsigned bad_w[8][32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t rb = blockIdx.y, r0 = rb * kFp8Block, c = int64_t(blockIdx.x) * 32 + lane;
  const int64_t kb = (K + kFp8Block - 1) / kFp8Block;
  float am = 0.0f;
  unsigned bad = 0;
  for (int i = w; i < kFp8Block; i += 8) {
    const int64_t r = r0 + i;
    float v = 0.0f;
    if (r < M && c < K) {
      if constexpr (kFp8Src) {
        __half_raw h = __nv_cvt_fp8_to_halfraw(qs[r * K + c], __NV_E4M3);
        v = __half2float(__half(h)) * ss[r * kb + c / kFp8Block];
      } else {
        v = x[r * K + c];
      }
      if (!isfinite(v)) ++bad;
      else am = fmaxf(am, fabsf(v));
    }
    t[i][lane] = v;
  }
  am_w[w][lane] = am;
  bad_w[w][lane] = bad;
  __syncthreads();
  if (w == 0) {
    float a = 0.0f;
    unsigned b = 0;
    for (int j = 0; j < 8; ++j) a = fmaxf(a, am_w[j][lane]), b += bad_w[j][lane];
    const float sv = scale_of(a, pow2);
    s_col[lane] = sv;
    if (c < K) {
      sc[c * gridDim.y + rb] = b && nan_mark ? __int_as_float(0x7fc00000) : sv;
      if (b && nonfinite) atomicAdd(nonfinite, (unsigned long long)b);
    }
  }
  __syncthreads();
  for (int kk = w; kk < 32; kk += 8) {
    const int64_t k = int64_t(blockIdx.x) * 32 + kk;
    if (k >= K) break;
    const float sv = s_col[kk];
    for (int i = lane; i < kFp8Block; i += 32) {
      const int64_t r = r0 + i;
      if (r < M) q[k * M + r] = __nv_cvt_float_to_fp8(t[i][kk] / sv, __NV_SATFINITE, __NV_E4M3);
    }
  }
}

// y[C, R] = x[R, C]ᵀ through 32×32 shared-memory tiles (both sides coalesced).
__global__ void transpose_kernel(const float* x, int64_t R, int64_t C, float* y) {
  __shared__ float t[32][33];
  const int64_t c0 = int64_t(blockIdx.x) * 32, r0 = int64_t(blockIdx.y) * 32;
  for (int j = threadIdx.y; j < 32; j += 8) {
    const int64_t r = r0 + j, c = c0 + threadIdx.x;
    if (r < R && c < C) t[j][threadIdx.x] = x[r * C + c];
  }
  __syncthreads();
  for (int j = threadIdx.y; j < 32; j += 8) {
    const int64_t c = c0 + j, r = r0 + threadIdx.x;
    if (c < C && r < R) y[c * R + r] = t[threadIdx.x][j];
  }
}

}  // namespace

// A transposed 128×128 output is the 128×128 tiling of xᵀ (same tiles, scales and codes), so x is
// transposed first and the coalesced block kernel runs on xᵀ; 128×1 transposed has its own kernel.
void cuda_quantize_fp8_async(const QuantizeFp8Args& a, unsigned long long* nonfinite, bool nan_mark) {
  validate(a);
  int64_t K = last_dim(a.x), M = rows_of(a.x);
  if (M * K == 0) return;
  const float* x = a.x.data<float>();
  std::unique_ptr<Scratch> xt;
  const Fp8Tiling tiling = a.tiling;
  bool transpose = a.transpose_out;
  if (transpose && tiling == Fp8Tiling::Col128x1) {
    quantize_cols_t_kernel<false><<<dim3(unsigned((K + 31) / 32), unsigned((M + kFp8Block - 1) / kFp8Block)), 256>>>(
        x, nullptr, nullptr, M, K, a.pow2_scale, nan_mark, ptr<uint8_t>(a.q), ptr<float>(a.scale), nonfinite);
    check_launch("quantize_fp8 128x1 transposed");
    return;
  }
  if (transpose && tiling == Fp8Tiling::Block128x128) {
    xt = std::make_unique<Scratch>(size_t(M * K) * sizeof(float));
    transpose_kernel<<<dim3(unsigned((K + 31) / 32), unsigned((M + 31) / 32)), dim3(32, 8)>>>(x, M, K, xt->as<float>());
    check_launch("quantize_fp8 transpose");
    x = xt->as<float>();
    std::swap(M, K);
    transpose = false;
  }
  if (tiling == Fp8Tiling::Block128x128) {
    const int64_t tiles = ((M + kFp8Block - 1) / kFp8Block) * ((K + kFp8Block - 1) / kFp8Block);
    quantize_block_kernel<<<unsigned(tiles), 256>>>(x, M, K, a.pow2_scale, nan_mark, ptr<uint8_t>(a.q),
                                                     ptr<float>(a.scale), nonfinite);
  } else {
    const int64_t th = tiling == Fp8Tiling::Row1x128 ? 1 : kFp8Block, tw = tiling == Fp8Tiling::Col128x1 ? 1 : kFp8Block;
    const int64_t tiles = ((M + th - 1) / th) * ((K + tw - 1) / tw);
    quantize_kernel<<<blocks_for(tiles * 32), 256>>>(x, M, K, th, tw, a.pow2_scale, transpose, nan_mark,
                                                     ptr<uint8_t>(a.q), ptr<float>(a.scale), nonfinite);
  }
  check_launch("quantize_fp8");
}

void cuda_requantize_cols_t(const Fp8Tiles& src, bool pow2_scale, const Tensor& q, const Tensor& scale) {
  const int64_t M = src.q.dim(0), K = src.q.dim(1), rbs = (M + kFp8Block - 1) / kFp8Block;
  DSV3_CHECK(src.scale.dim(0) == M && src.scale.dim(1) == (K + kFp8Block - 1) / kFp8Block && q.numel() == M * K &&
                 scale.numel() == K * rbs,
             "cuda_requantize_cols_t: shapes do not fit FP8 1x128 tiles of [", M, ", ", K, "]");
  if (M * K == 0) return;
  quantize_cols_t_kernel<true><<<dim3(unsigned((K + 31) / 32), unsigned(rbs)), 256>>>(
      nullptr, ptr<uint8_t>(src.q), src.scale.data<float>(), M, K, pow2_scale, true, ptr<uint8_t>(q), ptr<float>(scale),
      nullptr);
  check_launch("fp8 re-quantization 128x1");
}

Fp8Status cuda_quantize_fp8(const QuantizeFp8Args& a) {
  int64_t K = last_dim(a.x), M = rows_of(a.x);
  Scratch count(sizeof(unsigned long long));
  DSV3_CUDA_CHECK(cudaMemset(count.as<void>(), 0, sizeof(unsigned long long)));
  cuda_quantize_fp8_async(a, count.as<unsigned long long>(), false);
  unsigned long long bad = 0;
  DSV3_CUDA_CHECK(cudaMemcpy(&bad, count.as<void>(), sizeof bad, cudaMemcpyDeviceToHost));
  if (bad > 0 && a.on_nonfinite == NonFinitePolicy::Throw)
    input_error("FP8 quantization of ", a.name, ": ", bad, " non-finite value(s) (NaN or Inf) in [", M, ", ", K,
                "]; expected finite values");
  return {int64_t(bad)};
}

}  // namespace dsv3
