// linear, its backward and matmul through cuBLAS SGEMM (FP32, TF32 off, as the CPU reference).
// Weights stored in F16/FP8 (and BF16 ones in the backward, or in shapes linear_split_bf16 does
// not take) are widened to F32 in a scratch buffer per call (FP8 with its 128×128 block scales), so
// a loaded model stays at its file size on the device. The forward with a BF16 weight runs on BF16
// tensor cores instead, x split into two BF16 terms (linear_split_bf16).
#include "backend/cuda/common.cuh"
#include "backend/cuda/lt_gemm.h"
#include "backend/cuda/stream.h"

namespace dsv3 {
using namespace cuda;

namespace {
__global__ void widen_kernel(const void* w, DType t, const float* sc, int64_t kb, int64_t n, int64_t k, float* out) {
  int64_t total = n * k;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    float v = load_f(w, t, i);
    if (sc) v *= sc[(i / k / kFp8Block) * kb + (i % k) / kFp8Block];
    out[i] = v;
  }
}

// The weight as F32: the tensor itself, or a widened copy in `buf`.
const float* weight_f32(const Tensor& w, const Tensor& scale_inv, std::unique_ptr<Scratch>& buf) {
  if (w.dtype() == DType::F32) return w.data<float>();
  int64_t n = w.dim(0), k = w.dim(1);
  buf = std::make_unique<Scratch>(size_t(std::max<int64_t>(n * k, 1)) * 4);
  bool fp8 = w.dtype() == DType::F8_E4M3;
  widen_kernel<<<std::min(blocks_for(n * k), 1u << 20), 256>>>(w.raw(), w.dtype(),
                                                               fp8 ? scale_inv.data<float>() : nullptr,
                                                               fp8 ? scale_inv.dim(1) : 0, n, k, buf->as<float>());
  check_launch("weight widening");
  return buf->as<float>();
}

// y = (acc ? y + top : top) + bottom, four floats per thread (n % 4 == 0).
__global__ void add_halves_kernel(const float4* top, const float4* bottom, float4* y, int64_t n4, bool acc) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4; i += int64_t(gridDim.x) * blockDim.x) {
    const float4 t = top[i], b = bottom[i];
    float4 v = t;
    if (acc) {
      const float4 o = y[i];
      v = make_float4(o.x + t.x, o.y + t.y, o.z + t.z, o.w + t.w);
    }
    y[i] = make_float4(v.x + b.x, v.y + b.y, v.z + b.z, v.w + b.w);
  }
}

// y (+)= x·Wᵀ for a BF16 W as W·hi + W·lo (f32_split_bf16): within tolerances.md's kF32 of the F32
// product, as the decode GEMVs' tensor-core path (src/infer/cuda_decode_mma.cuh). Widening
// W for SGEMM made the F32-math prefill of bench-0.7b at 4,096 rows run at ~30 TFLOP/s on the H200.
// hi and lo are stacked as 2M rows of one matmul (cuBLASLt's host time per call, ~10 µs, bounded
// the prefill's thousands of expert GEMMs), whose halves one kernel adds into y.
// Shapes cuBLASLt's BF16 kernels take without padding only (16-byte rows and bases of W and y; the
// terms are in scratch); false otherwise.
bool linear_split_bf16(const LinearArgs& a, int64_t m, int64_t n, int64_t k) {
  if (a.w.dtype() != DType::BF16 || k % 8 != 0 || n % 4 != 0 || !aligned16(a.w.raw()) || !aligned16(a.y.raw()))
    return false;
  const size_t terms_bytes = (size_t(2 * m * k) * sizeof(__nv_bfloat16) + 255) / 256 * 256;
  Scratch buf(terms_bytes + size_t(2 * m * n) * sizeof(float));
  __nv_bfloat16* hi = buf.as<__nv_bfloat16>();
  float* halves = reinterpret_cast<float*>(buf.as<char>() + terms_bytes);
  f32_split_bf16(a.x.data<float>(), m * k, hi, hi + m * k);
  lt_matmul(lt_row_major(false, true, 2 * m, n, k, hi, k, a.w.raw(), k, halves, n, false));
  const int64_t n4 = m * n / 4;
  add_halves_kernel<<<unsigned(std::min<int64_t>((n4 + 255) / 256, int64_t(sm_count()) * 16)), 256, 0, stream()>>>(
      reinterpret_cast<const float4*>(halves), reinterpret_cast<const float4*>(halves + m * n),
      reinterpret_cast<float4*>(ptr<float>(a.y)), n4, a.accumulate);
  check_launch("linear: adding the split terms' products");
  return true;
}
}  // namespace

void CudaBackend::linear(const LinearArgs& a) {
  validate(a);
  int64_t m = rows_of(a.x), n = a.w.dim(0), k = a.w.dim(1);
  if (m == 0) return;
  if (linear_split_bf16(a, m, n, k)) return;
  std::unique_ptr<Scratch> buf;
  const float* w = weight_f32(a.w, a.w_scale_inv, buf);
  sgemm(false, true, m, n, k, 1.0f, a.x.data<float>(), k, w, k, a.accumulate ? 1.0f : 0.0f, ptr<float>(a.y), n);
}

void CudaBackend::linear_backward(const LinearBackwardArgs& a) {
  validate(a);
  int64_t m = rows_of(a.dy), n = last_dim(a.dy);
  if (present(a.dx) && m > 0) {
    int64_t k = a.w.dim(1);
    std::unique_ptr<Scratch> buf;
    const float* w = weight_f32(a.w, a.w_scale_inv, buf);
    sgemm(false, false, m, k, n, 1.0f, a.dy.data<float>(), n, w, k, a.accumulate_dx ? 1.0f : 0.0f, ptr<float>(a.dx), k);
  }
  if (present(a.dw)) {
    int64_t k = last_dim(a.x);
    if (m == 0) {
      if (!a.accumulate_dw) DSV3_CUDA_CHECK(cudaMemset(ptr<void>(a.dw), 0, a.dw.nbytes()));
      return;
    }
    sgemm(true, false, n, k, m, 1.0f, a.dy.data<float>(), n, a.x.data<float>(), k, a.accumulate_dw ? 1.0f : 0.0f,
          ptr<float>(a.dw), k);
  }
}

void CudaBackend::matmul(const MatmulArgs& a) {
  validate(a);
  int64_t m = a.c.dim(0), n = a.c.dim(1), k = a.trans_a ? a.a.dim(0) : a.a.dim(1);
  if (k == 0) {
    if (!a.accumulate) DSV3_CUDA_CHECK(cudaMemset(ptr<void>(a.c), 0, a.c.nbytes()));
    return;
  }
  sgemm(a.trans_a, a.trans_b, m, n, k, a.alpha, a.a.data<float>(), a.a.dim(1), a.b.data<float>(), a.b.dim(1),
        a.accumulate ? 1.0f : 0.0f, ptr<float>(a.c), n);
}

}  // namespace dsv3
