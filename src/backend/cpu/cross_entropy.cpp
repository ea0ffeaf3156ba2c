// Softmax cross-entropy over the vocabulary, fused with its gradient.
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_backend.h"

namespace dsv3 {

void CpuBackend::cross_entropy(const CrossEntropyArgs& a) {
  validate(a);
  int64_t t = a.logits.dim(0), v = a.logits.dim(1);
  const int32_t* tg = a.targets.data<int32_t>();
  for (int64_t i = 0; i < t; ++i)
    if (tg[i] < -1 || tg[i] >= v)
      input_error("cross_entropy: target ", tg[i], " at position ", i, " is outside [-1, ", v, ")");
  const float* lg = a.logits.data<float>();
  float* dl = present(a.dlogits) ? cpu::mut<float>(a.dlogits) : nullptr;
  std::vector<float> loss(static_cast<size_t>(t));
  float gs = a.grad_scale;
#pragma omp parallel for schedule(static) if (t * v >= cpu::kParallelMin)
  for (int64_t i = 0; i < t; ++i) {
    const float* l = lg + i * v;
    float* o = dl ? dl + i * v : nullptr;
    if (tg[i] < 0) {
      loss[size_t(i)] = 0.0f;
      if (o) std::fill(o, o + v, 0.0f);
      continue;
    }
    float mx = *std::max_element(l, l + v);
    float target = l[tg[i]];
    // exp in FP32 (vectorisable), sums in double; when there is a gradient the exponentials are
    // kept in it and scaled afterwards. o may alias l: each element is read before it is written.
    double sum = 0.0;
    if (o) {
      for (int64_t j = 0; j < v; ++j) {
        float e = std::exp(l[j] - mx);
        o[j] = e;
        sum += double(e);
      }
      float f = float(double(gs) / sum);
      for (int64_t j = 0; j < v; ++j) o[j] *= f;
      o[tg[i]] -= gs;
    } else {
      for (int64_t j = 0; j < v; ++j) sum += double(std::exp(l[j] - mx));
    }
    loss[size_t(i)] = float(double(mx) + std::log(sum) - double(target));
  }
  if (present(a.loss)) std::copy(loss.begin(), loss.end(), cpu::mut<float>(a.loss));
  if (present(a.loss_sum)) {
    double s = 0.0;
    for (float x : loss) s += x;
    cpu::mut<float>(a.loss_sum)[0] = float(s);
  }
}

}  // namespace dsv3
