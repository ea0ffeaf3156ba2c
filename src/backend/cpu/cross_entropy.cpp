// Softmax cross-entropy over the vocabulary, fused with its gradient: per row one pass for the
// maximum, one for the exponentials (kept in the gradient) and their sum, one to scale them.
// The row loops are SIMD (vec_math.h): a fixed number of lanes, each summing its own elements in
// order, then the lanes in order, so the result does not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/vec_math.h"

namespace dsv3 {

namespace {

constexpr int64_t kLanes = 16;

// max over the row; a NaN element is skipped here and poisons the sum instead (exp(NaN) = NaN).
[[gnu::always_inline]] inline float row_max(const float* l, int64_t v) {
  float m[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) m[k] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= v; j += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) m[k] = l[j + k] > m[k] ? l[j + k] : m[k];
  for (; j < v; ++j) m[0] = l[j] > m[0] ? l[j] : m[0];
  float r = m[0];
  for (int64_t k = 1; k < kLanes; ++k) r = m[k] > r ? m[k] : r;
  return r;
}

// Σ x in double: lane k sums elements k, k + kLanes, ... in order, then the lanes are added in order.
[[gnu::always_inline]] inline double lane_sum(const float* x, int64_t n, double* acc) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) acc[k] += double(x[j + k]);
  for (; j < n; ++j) acc[0] += double(x[j]);
  double s = 0.0;
  for (int64_t k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

// loss[i] and, when o is set, o = grad_scale·(softmax(l) − onehot(target)). o may alias l: every
// element is read before it is written.
[[gnu::always_inline]] inline void ce_row_body(const float* l, float* o, int64_t v, int32_t target, float gs,
                                               float* loss) {
  const float mx = row_max(l, v);
  const float lt = l[target];
  double acc[kLanes] = {};
  double sum = 0.0;
  if (o) {
#pragma omp simd  // o may alias l (same index): safe for SIMD, but the compiler cannot know
    for (int64_t j = 0; j < v; ++j) o[j] = cpu::exp_f32(l[j] - mx);
    sum = lane_sum(o, v, acc);
    const float f = float(double(gs) / sum);
    for (int64_t j = 0; j < v; ++j) o[j] *= f;
    o[target] -= gs;
  } else {
    // Chunks of a multiple of kLanes, so the lanes see the same elements as with a gradient.
    constexpr int64_t kChunk = 64 * kLanes;
    float e[kChunk];
    for (int64_t j0 = 0; j0 < v; j0 += kChunk) {
      const int64_t n = std::min(kChunk, v - j0);
      for (int64_t j = 0; j < n; ++j) e[j] = cpu::exp_f32(l[j0 + j] - mx);
      int64_t full = n / kLanes * kLanes;
      for (int64_t j = 0; j < full; j += kLanes)
        for (int64_t k = 0; k < kLanes; ++k) acc[k] += double(e[j + k]);
      for (int64_t j = full; j < n; ++j) acc[0] += double(e[j]);
    }
    for (int64_t k = 0; k < kLanes; ++k) sum += acc[k];
  }
  *loss = float(double(mx) + std::log(sum) - double(lt));
}

DSV3_CPU_KERNEL(ce_row, (const float* l, float* o, int64_t v, int32_t target, float gs, float* loss), ce_row_body,
                (l, o, v, target, gs, loss))

}  // namespace

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
  // Rows handed out as threads come free (row-local: the same bits whichever thread runs a row).
#pragma omp parallel for schedule(dynamic, 8) if (t * v >= cpu::kParallelMin)
  for (int64_t i = 0; i < t; ++i) {
    float* o = dl ? dl + i * v : nullptr;
    if (tg[i] < 0) {
      loss[size_t(i)] = 0.0f;
      if (o) std::fill(o, o + v, 0.0f);
      continue;
    }
    ce_row(lg + i * v, o, v, tg[i], gs, &loss[size_t(i)]);
  }
  if (present(a.loss)) std::copy(loss.begin(), loss.end(), cpu::mut<float>(a.loss));
  if (present(a.loss_sum)) {
    double s = 0.0;
    for (float x : loss) s += x;
    cpu::mut<float>(a.loss_sum)[0] = float(s);
  }
}

}  // namespace dsv3
