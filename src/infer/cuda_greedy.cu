// Greedy tokens on the device (cuda_latent_attention.h): one argmax kernel, one read-back of the ids.
#include <cuda_runtime.h>

#include <vector>

#include "backend/cuda/common.cuh"
#include "backend/cuda/stream.h"
#include "infer/cuda_latent_attention.h"

namespace dsv3 {
using namespace cuda;

namespace {

// Per row: argmax over [0, n_valid), lowest index on ties, as greedy_token (sampler.cpp) scans:
// from id 0 upwards taking strictly greater values, so a NaN is never taken past id 0, and a NaN at
// id 0 is kept (nothing compares greater).
__global__ void argmax_kernel(const float* logits, int64_t V, int64_t n_valid, int32_t* ids) {
  const float* row = logits + blockIdx.x * V;
  float best = -INFINITY;
  int64_t bi = -1;
  // Batches of 8 independent loads per thread; each thread still sees its ids in increasing order.
  for (int64_t base = threadIdx.x; base < n_valid; base += 8 * int64_t(blockDim.x)) {
    float v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int64_t i = base + u * int64_t(blockDim.x);
      v[u] = i < n_valid ? row[i] : -INFINITY;
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int64_t i = base + u * int64_t(blockDim.x);
      if (i < n_valid && !isnan(v[u]) && (bi < 0 || v[u] > best)) {
        best = v[u];
        bi = i;
      }
    }
  }
  __shared__ float sv[1024];
  __shared__ int64_t si[1024];
  sv[threadIdx.x] = best;
  si[threadIdx.x] = bi;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const float v = sv[threadIdx.x + s];
      const int64_t i = si[threadIdx.x + s];
      const int64_t mine = si[threadIdx.x];
      if (i >= 0 && (mine < 0 || v > sv[threadIdx.x] || (v == sv[threadIdx.x] && i < mine))) {
        sv[threadIdx.x] = v;
        si[threadIdx.x] = i;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) ids[blockIdx.x] = si[0] < 0 || isnan(row[0]) ? 0 : int32_t(si[0]);
}

}  // namespace

std::vector<int32_t> cuda_greedy_tokens(const Tensor& logits, int64_t n_valid) {
  DSV3_CHECK(logits.device() == Device::CUDA && logits.dtype() == DType::F32 && logits.ndim() == 2 &&
                 n_valid >= 1 && n_valid <= logits.dim(1),
             "cuda_greedy_tokens: logits ", logits.shape().str(), " n_valid ", n_valid);
  const int64_t N = logits.dim(0);
  std::vector<int32_t> ids(static_cast<size_t>(N));
  if (N == 0) return ids;
  Tensor dev = cuda_backend().alloc(DType::I32, {N});
  argmax_kernel<<<unsigned(N), 1024, 0, stream()>>>(logits.data<float>(), logits.dim(1), n_valid, ptr<int32_t>(dev));
  check_launch("greedy argmax");
  DSV3_CUDA_CHECK(cudaMemcpy(ids.data(), dev.raw(), size_t(N) * sizeof(int32_t), cudaMemcpyDeviceToHost));
  return ids;
}

}  // namespace dsv3
