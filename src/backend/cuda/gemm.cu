// linear, its backward and matmul through cuBLAS SGEMM (FP32, TF32 off, as the CPU reference).
// Weights stored in F16/FP8 (and BF16 or FP8 ones in the backward, or in shapes split_bf16_grouped
// does not take) are widened to F32 in a scratch buffer per call (FP8 with its 128×128 block scales),
// so a loaded model stays at its file size on the device. The forward with a BF16 or FP8 weight runs
// on BF16 tensor cores instead, x split into two BF16 terms, an FP8 weight too (grouped_linear.cu,
// one block).
#include "backend/cuda/common.cuh"

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

}  // namespace

void CudaBackend::linear(const LinearArgs& a) {
  validate(a);
  int64_t m = rows_of(a.x), n = a.w.dim(0), k = a.w.dim(1);
  if (m == 0) return;
  if (a.w.dtype() == DType::BF16 || a.w.dtype() == DType::F8_E4M3) {  // tensor cores: grouped_linear's path
    const Tensor w[1] = {a.w};
    const Tensor s[1] = {a.w_scale_inv};
    const int64_t offsets[2] = {0, m};
    const std::span<const Tensor> scales = present(a.w_scale_inv) ? std::span<const Tensor>(s) : std::span<const Tensor>();
    if (split_bf16_grouped({a.x.reshape({m, k}), w, scales, offsets, a.y.reshape({m, n}), a.accumulate})) return;
  }
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
