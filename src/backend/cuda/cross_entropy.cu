// Softmax cross-entropy over the vocabulary fused with its gradient: one block per token row.
#include "backend/cuda/common.cuh"

namespace dsv3 {
using namespace cuda;

namespace {
__global__ void ce_kernel(const float* lg, const int32_t* tg, float* loss, float* dl, int64_t v, float gs) {
  int64_t i = blockIdx.x;
  const float* l = lg + i * v;
  float* o = dl ? dl + i * v : nullptr;
  int32_t target = tg[i];
  if (target < 0 || target >= v) {  // ignored, or out of range (reported by the range check)
    if (threadIdx.x == 0) loss[i] = 0.0f;
    if (o)
      for (int64_t j = threadIdx.x; j < v; j += blockDim.x) o[j] = 0.0f;
    return;
  }
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) mx = fmaxf(mx, l[j]);
  mx = block_max(mx);
  float lt = l[target];  // read before o (which may alias l) is written
  double sum = 0.0;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) sum += double(expf(l[j] - mx));
  sum = block_sum(sum);
  if (o) {
    float f = float(double(gs) / sum);
    for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
      float e = expf(l[j] - mx) * f;
      o[j] = j == target ? e - gs : e;
    }
  }
  if (threadIdx.x == 0) loss[i] = float(double(mx) + log(sum) - double(lt));
}
__global__ void sum_kernel(const float* x, int64_t n, float* out) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
  s = block_sum(s);
  if (threadIdx.x == 0) out[0] = float(s);
}
}  // namespace

void CudaBackend::cross_entropy(const CrossEntropyArgs& a) {
  validate(a);
  int64_t t = a.logits.dim(0), v = a.logits.dim(1);
  check_range(a.targets.data<int32_t>(), t, -1, v, [v](int64_t i, int32_t bad) {
    input_error("cross_entropy: target ", bad, " at position ", i, " is outside [-1, ", v, ")");
  });
  Scratch loss(size_t(std::max<int64_t>(t, 1)) * 4);
  float* lp = present(a.loss) ? ptr<float>(a.loss) : loss.as<float>();
  if (t)
    ce_kernel<<<unsigned(t), 512>>>(a.logits.data<float>(), a.targets.data<int32_t>(), lp,
                                    present(a.dlogits) ? ptr<float>(a.dlogits) : nullptr, v, a.grad_scale);
  if (present(a.loss_sum)) sum_kernel<<<1, 256>>>(lp, t, ptr<float>(a.loss_sum));
  check_launch("cross_entropy");
}

}  // namespace dsv3
