// Elementwise and data-layout ops, the AdamW update, and the process-wide CPU backend.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/vec_math.h"

namespace dsv3 {

namespace {

constexpr int64_t kLanes = 16;

// Σ x² in double, lane k taking elements k, k + kLanes, ... in order, then the lanes in order.
[[gnu::always_inline]] inline void sum_squares_body(const float* x, int64_t n, double* out) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) acc[k] += double(x[i + k]) * double(x[i + k]);
  for (; i < n; ++i) acc[0] += double(x[i]) * double(x[i]);
  double s = 0.0;
  for (int64_t k = 0; k < kLanes; ++k) s += acc[k];
  *out = s;
}
DSV3_CPU_KERNEL(sum_squares_chunk, (const float* x, int64_t n, double* out), sum_squares_body, (x, n, out))

struct AdamWConsts {
  float b1, b2, one_b1, one_b2, decay, step_size, bc2_sqrt, eps, gs;
};

// The F32-moment update, one element at a time as the generic loop below but branch-free, so it
// compiles to SIMD (sqrt and division are correctly rounded in SIMD too: the same bits as scalar).
[[gnu::always_inline]] inline void adamw_f32_body(float* p, const float* g, float* m, float* v, int64_t n,
                                                  const AdamWConsts* c) {
  const AdamWConsts k = *c;
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * k.gs;
    const float mi = k.b1 * m[i] + k.one_b1 * gi;
    const float vi = k.b2 * v[i] + k.one_b2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * k.decay - k.step_size * mi / (std::sqrt(vi) / k.bc2_sqrt + k.eps);
  }
}
DSV3_CPU_KERNEL(adamw_f32, (float* p, const float* g, float* m, float* v, int64_t n, const AdamWConsts* c),
                adamw_f32_body, (p, g, m, v, n, c))

}  // namespace

Backend& cpu_backend() {
  static CpuBackend b;
  return b;
}

void CpuBackend::add(const AddArgs& a) {
  validate(a);
  int64_t n = a.out.numel();
  const float* x = a.a.data<float>();
  const float* y = a.b.data<float>();
  float* o = cpu::mut<float>(a.out);
  float al = a.alpha, be = a.beta;
#pragma omp parallel for schedule(static) if (n >= cpu::kParallelMin)
  for (int64_t i = 0; i < n; ++i) o[i] = al * x[i] + be * y[i];
}

void CpuBackend::scale(const ScaleArgs& a) {
  validate(a);
  int64_t n = a.out.numel();
  const float* x = a.x.data<float>();
  float* o = cpu::mut<float>(a.out);
  float s = a.s;
#pragma omp parallel for schedule(static) if (n >= cpu::kParallelMin)
  for (int64_t i = 0; i < n; ++i) o[i] = s * x[i];
}

void CpuBackend::mul(const MulArgs& a) {
  validate(a);
  int64_t n = a.out.numel();
  const float* x = a.a.data<float>();
  const float* y = a.b.data<float>();
  float* o = cpu::mut<float>(a.out);
  if (a.accumulate) {
#pragma omp parallel for schedule(static) if (n >= cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) o[i] += x[i] * y[i];
  } else {
#pragma omp parallel for schedule(static) if (n >= cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) o[i] = x[i] * y[i];
  }
}

void CpuBackend::copy(const CopyArgs& a) {
  validate(a);
  if (a.src.raw() == a.dst.raw() && a.src.dtype() == a.dst.dtype()) return;
  if (a.src.dtype() == a.dst.dtype()) {
    std::memmove(const_cast<Tensor&>(a.dst).raw(), a.src.raw(), a.src.nbytes());
    return;
  }
  // Convert in chunks so large tensors use every thread.
  constexpr int64_t kChunk = 1 << 16;
  int64_t n = a.src.numel();
  size_t ss = dtype_size(a.src.dtype()), ds = dtype_size(a.dst.dtype());
  const char* s = static_cast<const char*>(a.src.raw());
  char* d = static_cast<char*>(const_cast<Tensor&>(a.dst).raw());
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < (n + kChunk - 1) / kChunk; ++c) {
    int64_t i0 = c * kChunk, len = std::min(kChunk, n - i0);
    convert(s + size_t(i0) * ss, a.src.dtype(), d + size_t(i0) * ds, a.dst.dtype(), size_t(len));
  }
}

void CpuBackend::fill(const FillArgs& a) {
  validate(a);
  if (a.x.dtype() != DType::F32) {
    const_cast<Tensor&>(a.x).fill(a.value);
    return;
  }
  int64_t n = a.x.numel();
  float* o = cpu::mut<float>(a.x);
  float v = a.value;
#pragma omp parallel for schedule(static) if (n >= cpu::kParallelMin)
  for (int64_t i = 0; i < n; ++i) o[i] = v;
}

void CpuBackend::copy_cols(const CopyColsArgs& a) {
  validate(a);
  int64_t cs = cpu::last_dim(a.src), cd = cpu::last_dim(a.dst);
  int64_t rs = cpu::rows_of(a.src), rd = cpu::rows_of(a.dst), w = a.width;
  const float* s = a.src.data<float>() + a.src_col;
  float* d = cpu::mut<float>(a.dst) + a.dst_col;
  bool acc = a.accumulate;
  if (rs >= rd) {  // equal rows, or each dst row sums a group of n src rows
    int64_t g = rd ? rs / rd : 0;
#pragma omp parallel for schedule(static) if (rd * w >= cpu::kParallelMin)
    for (int64_t r = 0; r < rd; ++r) {
      float* o = d + r * cd;
      const float* first = s + (r * g) * cs;
      if (acc)
        for (int64_t c = 0; c < w; ++c) o[c] += first[c];
      else
        std::memcpy(o, first, size_t(w) * sizeof(float));
      for (int64_t j = 1; j < g; ++j) {
        const float* src = s + (r * g + j) * cs;
        for (int64_t c = 0; c < w; ++c) o[c] += src[c];
      }
    }
  } else {  // broadcast: dst row r takes src row r / n
    int64_t g = rd / rs;
#pragma omp parallel for schedule(static) if (rd * w >= cpu::kParallelMin)
    for (int64_t r = 0; r < rd; ++r) {
      float* o = d + r * cd;
      const float* src = s + (r / g) * cs;
      if (acc)
        for (int64_t c = 0; c < w; ++c) o[c] += src[c];
      else
        std::memcpy(o, src, size_t(w) * sizeof(float));
    }
  }
}

void CpuBackend::sum_squares(const SumSquaresArgs& a) {
  validate(a);
  // Fixed chunks summed in order: the result does not even depend on the thread count.
  constexpr int64_t kChunk = 1 << 14;
  int64_t n = a.x.numel(), nc = (n + kChunk - 1) / kChunk;
  const float* x = a.x.data<float>();
  std::vector<double> part(size_t(nc), 0.0);
#pragma omp parallel for schedule(dynamic, 1) if (n >= cpu::kParallelMin)
  for (int64_t c = 0; c < nc; ++c)
    sum_squares_chunk(x + c * kChunk, std::min(n, (c + 1) * kChunk) - c * kChunk, &part[size_t(c)]);
  double total = 0.0;
  for (double p : part) total += p;
  float* o = cpu::mut<float>(a.out);
  o[0] = a.accumulate ? float(double(o[0]) + total) : float(total);
}

void CpuBackend::adamw(const AdamWArgs& a) {
  validate(a);
  int64_t n = a.param.numel();
  float* p = cpu::mut<float>(a.param);
  const float* g = a.grad.data<float>();
  bool mb = a.m.dtype() == DType::BF16, vb = a.v.dtype() == DType::BF16;
  void* mp = const_cast<Tensor&>(a.m).raw();
  void* vp = const_cast<Tensor&>(a.v).raw();
  // As torch.optim.AdamW (single-tensor path): decay first, then the bias-corrected step.
  const float b1 = a.beta1, b2 = a.beta2, lr = a.lr, eps = a.eps, gs = a.grad_scale;
  const float decay = 1.0f - lr * a.weight_decay;
  const double bc1 = 1.0 - std::pow(double(b1), double(a.step));
  const double bc2 = 1.0 - std::pow(double(b2), double(a.step));
  const float step_size = float(double(lr) / bc1);
  const float bc2_sqrt = float(std::sqrt(bc2));
  if (!mb && !vb) {
    const AdamWConsts c{b1, b2, 1.0f - b1, 1.0f - b2, decay, step_size, bc2_sqrt, eps, gs};
    float* m = static_cast<float*>(mp);
    float* v = static_cast<float*>(vp);
    cpu::for_chunks(n, 1 << 14, n >= cpu::kParallelMin,
                    [&](int64_t lo, int64_t hi) { adamw_f32(p + lo, g + lo, m + lo, v + lo, hi - lo, &c); });
  } else {
#pragma omp parallel for schedule(static) if (n >= cpu::kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      float gi = g[i] * gs;
      float mi = mb ? bf16_to_float(static_cast<uint16_t*>(mp)[i]) : static_cast<float*>(mp)[i];
      float vi = vb ? bf16_to_float(static_cast<uint16_t*>(vp)[i]) : static_cast<float*>(vp)[i];
      mi = b1 * mi + (1.0f - b1) * gi;
      vi = b2 * vi + (1.0f - b2) * gi * gi;
      float pi = p[i] * decay;
      pi -= step_size * mi / (std::sqrt(vi) / bc2_sqrt + eps);
      p[i] = pi;
      if (mb) static_cast<uint16_t*>(mp)[i] = float_to_bf16(mi);
      else static_cast<float*>(mp)[i] = mi;
      if (vb) static_cast<uint16_t*>(vp)[i] = float_to_bf16(vi);
      else static_cast<float*>(vp)[i] = vi;
    }
  }
  if (present(a.param_copy)) copy(CopyArgs{a.param, a.param_copy});
}

}  // namespace dsv3
