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
// The same arithmetic with the row read once: each of the 512 threads keeps its PER float4 chunks
// (chunk c at columns 4·(c·512 + thread)) in registers through the max, the sum and the gradient,
// so a row costs one read and one write of memory instead of three reads and a write. Rows 16-byte
// aligned (v % 4 == 0), v ≤ 2048·PER; columns past v read as −inf (exp 0) and are not written.
constexpr int kCeThreads = 512;
template <int PER>
__global__ void __launch_bounds__(kCeThreads) ce_reg_kernel(const float* lg, const int32_t* tg, float* loss, float* dl,
                                                             int64_t v, float gs) {
  const int64_t i = blockIdx.x;
  const float4* l = reinterpret_cast<const float4*>(lg + i * v);
  float4* o = dl ? reinterpret_cast<float4*>(dl + i * v) : nullptr;
  const int32_t target = tg[i];
  const int64_t v4 = v / 4;
  if (target < 0 || target >= v) {
    if (threadIdx.x == 0) loss[i] = 0.0f;
    if (o)
      for (int64_t c = threadIdx.x; c < v4; c += kCeThreads) o[c] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    return;
  }
  float4 x[PER];
  float mx = -INFINITY;
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const int64_t c = k * kCeThreads + threadIdx.x;
    x[k] = c < v4 ? l[c] : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
  }
#pragma unroll
  for (int k = 0; k < PER; ++k) mx = fmaxf(mx, fmaxf(fmaxf(x[k].x, x[k].y), fmaxf(x[k].z, x[k].w)));
  mx = block_max(mx);
  const float lt = lg[i * v + target];
  double sum = 0.0;
#pragma unroll
  for (int k = 0; k < PER; ++k)
    sum += double(expf(x[k].x - mx)) + double(expf(x[k].y - mx)) + double(expf(x[k].z - mx)) +
           double(expf(x[k].w - mx));
  sum = block_sum(sum);
  if (o) {
    const float f = float(double(gs) / sum);
#pragma unroll
    for (int k = 0; k < PER; ++k) {
      const int64_t c = k * kCeThreads + threadIdx.x;
      if (c >= v4) break;
      float4 e = make_float4(expf(x[k].x - mx) * f, expf(x[k].y - mx) * f, expf(x[k].z - mx) * f,
                             expf(x[k].w - mx) * f);
      const int64_t t = target - 4 * c;
      if (t == 0) e.x -= gs;
      if (t == 1) e.y -= gs;
      if (t == 2) e.z -= gs;
      if (t == 3) e.w -= gs;
      o[c] = e;
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
  const float* lg = a.logits.data<float>();
  float* dl = present(a.dlogits) ? ptr<float>(a.dlogits) : nullptr;
  const int32_t* tg = a.targets.data<int32_t>();
  // The register kernel when the row fits it (bench-0.7b's 32,768-word vocabulary: 16 chunks).
  const bool vec = v % 4 == 0 && aligned16(lg) && aligned16(dl);
  const int64_t chunks = (v / 4 + kCeThreads - 1) / kCeThreads;
  auto* kernel = !vec || chunks > 16 ? ce_kernel
                 : chunks > 8         ? ce_reg_kernel<16>
                 : chunks > 4         ? ce_reg_kernel<8>
                                      : ce_reg_kernel<4>;
  if (t) kernel<<<unsigned(t), kCeThreads>>>(lg, tg, lp, dl, v, a.grad_scale);
  if (present(a.loss_sum)) sum_kernel<<<1, 256>>>(lp, t, ptr<float>(a.loss_sum));
  check_launch("cross_entropy");
}

}  // namespace dsv3
