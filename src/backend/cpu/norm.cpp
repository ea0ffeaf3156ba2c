// Embedding, RMSNorm and SwiGLU: row-local ops and their backwards.
#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/vec_math.h"

#include <omp.h>

namespace dsv3 {

namespace {

constexpr int64_t kLanes = 16;

// Σ a·b in double over fixed lanes (lane k takes elements k, k + kLanes, ... in order).
[[gnu::always_inline]] inline double lane_dot(const float* a, const float* b, int64_t n) {
  double acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) acc[k] += double(a[j + k]) * double(b[j + k]);
  for (; j < n; ++j) acc[0] += double(a[j]) * double(b[j]);
  double s = 0.0;
  for (int64_t k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

[[gnu::always_inline]] inline void rmsnorm_rows_body(const float* x, const float* w, float* y, float* rstd,
                                                     int64_t r0, int64_t r1, int64_t d, float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * d;
    double ss = lane_dot(xr, xr, d);
    float rs = float(1.0 / std::sqrt(ss / double(d) + double(eps)));
    if (rstd) rstd[r] = rs;
    float* yr = y + r * d;  // may alias xr: each element is read before it is written (so SIMD is safe)
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) yr[j] = w[j] * (xr[j] * rs);
  }
}
DSV3_CPU_KERNEL(rmsnorm_rows,
                (const float* x, const float* w, float* y, float* rstd, int64_t r0, int64_t r1, int64_t d, float eps),
                rmsnorm_rows_body, (x, w, y, rstd, r0, r1, d, eps))

// dweight[c0, c1) (+)= Σ_rows dy · x · rstd, in double, rows in order (c1 − c0 <= 64).
[[gnu::always_inline]] inline void rmsnorm_dw_cols_body(const float* x, const float* dy, const float* rstd, float* dw,
                                                        int64_t m, int64_t d, int64_t c0, int64_t c1, bool acc) {
  double s[64] = {};
  const int64_t w = c1 - c0;
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * d + c0;
    const float* gr = dy + r * d + c0;
    const float rs = rstd[r];
    for (int64_t j = 0; j < w; ++j) s[j] += double(gr[j]) * double(xr[j] * rs);
  }
  for (int64_t j = 0; j < w; ++j) dw[c0 + j] = acc ? float(double(dw[c0 + j]) + s[j]) : float(s[j]);
}
DSV3_CPU_KERNEL(rmsnorm_dw_cols,
                (const float* x, const float* dy, const float* rstd, float* dw, int64_t m, int64_t d, int64_t c0,
                 int64_t c1, bool acc),
                rmsnorm_dw_cols_body, (x, dy, rstd, dw, m, d, c0, c1, acc))

// dx = rstd·(w·dy − x·rstd²·mean(w·dy·x)) for rows [r0, r1); dx may alias dy.
[[gnu::always_inline]] inline void rmsnorm_dx_rows_body(const float* x, const float* w, const float* dy,
                                                        const float* rstd, float* dx, float* wdy, int64_t r0,
                                                        int64_t r1, int64_t d, bool acc) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * d;
    const float* gr = dy + r * d;
    float* o = dx + r * d;
    for (int64_t j = 0; j < d; ++j) wdy[j] = w[j] * gr[j];
    double dot = lane_dot(wdy, xr, d);
    float rs = rstd[r];
    float c = float(dot / double(d)) * rs * rs;
    if (acc)
      for (int64_t j = 0; j < d; ++j) o[j] += rs * (wdy[j] - xr[j] * c);
    else
      for (int64_t j = 0; j < d; ++j) o[j] = rs * (wdy[j] - xr[j] * c);
  }
}
DSV3_CPU_KERNEL(rmsnorm_dx_rows,
                (const float* x, const float* w, const float* dy, const float* rstd, float* dx, float* wdy, int64_t r0,
                 int64_t r1, int64_t d, bool acc),
                rmsnorm_dx_rows_body, (x, w, dy, rstd, dx, wdy, r0, r1, d, acc))

// o may alias g or u; each element is read before it is written, so SIMD is safe (omp simd says so
// to the compiler, which would otherwise fall back to scalar code for the alias).
[[gnu::always_inline]] inline void swiglu_body(const float* g, const float* u, float* o, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i], ui = u[i];
    o[i] = gi / (1.0f + cpu::exp_f32(-gi)) * ui;
  }
}
DSV3_CPU_KERNEL(swiglu_range, (const float* g, const float* u, float* o, int64_t n), swiglu_body, (g, u, o, n))

// The gradient of one element; dg or du may alias dout: both values are formed before either store.
[[gnu::always_inline]] inline void swiglu_grad(float gi, float ui, float go, float& vg, float& vu) {
  const float sg = 1.0f / (1.0f + cpu::exp_f32(-gi));
  vg = go * ui * sg * (1.0f + gi * (1.0f - sg));
  vu = go * (gi * sg);
}

[[gnu::always_inline]] inline void swiglu_backward_body(const float* g, const float* u, const float* dout, float* dg,
                                                        float* du, int64_t n, bool acc) {
  if (acc) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      float vg, vu;
      swiglu_grad(g[i], u[i], dout[i], vg, vu);
      dg[i] += vg;
      du[i] += vu;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      float vg, vu;
      swiglu_grad(g[i], u[i], dout[i], vg, vu);
      dg[i] = vg;
      du[i] = vu;
    }
  }
}
DSV3_CPU_KERNEL(swiglu_backward_range,
                (const float* g, const float* u, const float* dout, float* dg, float* du, int64_t n, bool acc),
                swiglu_backward_body, (g, u, dout, dg, du, n, acc))

// Work units handed to threads (cpu::for_chunks): elements, and rows of a norm.
constexpr int64_t kGrain = 1 << 14;
constexpr int64_t kRowGrain = 64;

// A weight vector of any float dtype as F32 (norm weights are small; converting per call is cheap).
const float* as_f32(const Tensor& t, std::vector<float>& buf) {
  if (t.dtype() == DType::F32) return t.data<float>();
  buf.resize(size_t(t.numel()));
  convert(t.raw(), t.dtype(), buf.data(), DType::F32, buf.size());
  return buf.data();
}
}  // namespace

void CpuBackend::embedding(const EmbeddingArgs& a) {
  validate(a);
  int64_t t = a.ids.numel(), v = a.table.dim(0), d = a.table.dim(1);
  const int32_t* ids = a.ids.data<int32_t>();
  for (int64_t i = 0; i < t; ++i)
    if (ids[i] < 0 || ids[i] >= v)
      input_error("embedding: token id ", ids[i], " at position ", i, " is outside the vocabulary [0, ", v, ")");
  const char* tab = static_cast<const char*>(a.table.raw());
  size_t es = dtype_size(a.table.dtype());
  float* out = cpu::mut<float>(a.out);
#pragma omp parallel for schedule(static) if (t * d >= cpu::kParallelMin)
  for (int64_t i = 0; i < t; ++i)
    convert(tab + size_t(ids[i]) * size_t(d) * es, a.table.dtype(), out + i * d, DType::F32, size_t(d));
}

void CpuBackend::embedding_backward(const EmbeddingBackwardArgs& a) {
  validate(a);
  int64_t t = a.ids.numel(), v = a.dtable.dim(0), d = a.dtable.dim(1);
  const int32_t* ids = a.ids.data<int32_t>();
  for (int64_t i = 0; i < t; ++i)
    if (ids[i] < 0 || ids[i] >= v)
      input_error("embedding_backward: token id ", ids[i], " at position ", i, " is outside [0, ", v, ")");
  const float* dout = a.dout.data<float>();
  float* dt = cpu::mut<float>(a.dtable);
  // Each thread owns a range of vocabulary rows and adds its tokens in position order.
#pragma omp parallel if (t * d >= cpu::kParallelMin)
  {
    int nt = omp_get_num_threads(), id = omp_get_thread_num();
    int64_t lo = v * id / nt, hi = v * (id + 1) / nt;
    for (int64_t i = 0; i < t; ++i) {
      int64_t r = ids[i];
      if (r < lo || r >= hi) continue;
      float* o = dt + r * d;
      const float* g = dout + i * d;
      for (int64_t j = 0; j < d; ++j) o[j] += g[j];
    }
  }
}

void CpuBackend::rmsnorm(const RmsNormArgs& a) {
  validate(a);
  int64_t d = cpu::last_dim(a.x), m = cpu::rows_of(a.x);
  std::vector<float> wbuf;
  const float* w = as_f32(a.weight, wbuf);
  const float* x = a.x.data<float>();
  float* y = cpu::mut<float>(a.y);
  float* rstd = present(a.rstd) ? cpu::mut<float>(a.rstd) : nullptr;
  float eps = a.eps;
  cpu::for_chunks(m, kRowGrain, m * d >= cpu::kParallelMin,
                  [&](int64_t lo, int64_t hi) { rmsnorm_rows(x, w, y, rstd, lo, hi, d, eps); });
}

void CpuBackend::rmsnorm_backward(const RmsNormBackwardArgs& a) {
  validate(a);
  int64_t d = cpu::last_dim(a.x), m = cpu::rows_of(a.x);
  std::vector<float> wbuf;
  const float* w = as_f32(a.weight, wbuf);
  const float* x = a.x.data<float>();
  const float* dy = a.dy.data<float>();
  const float* rstd = a.rstd.data<float>();
  if (present(a.dweight)) {
    float* dw = cpu::mut<float>(a.dweight);
    bool acc = a.accumulate_dweight;
    // Each thread owns a block of columns and sums rows in order.
    constexpr int64_t kCols = 64;
#pragma omp parallel for schedule(static) if (m * d >= cpu::kParallelMin)
    for (int64_t c0 = 0; c0 < d; c0 += kCols)
      rmsnorm_dw_cols(x, dy, rstd, dw, m, d, c0, std::min(d, c0 + kCols), acc);
  }
  if (present(a.dx)) {
    float* dx = cpu::mut<float>(a.dx);
    bool acc = a.accumulate_dx;
    cpu::for_chunks(m, kRowGrain, m * d >= cpu::kParallelMin, [&](int64_t lo, int64_t hi) {
      rmsnorm_dx_rows(x, w, dy, rstd, dx, cpu::scratch(size_t(d)), lo, hi, d, acc);
    });
  }
}

void CpuBackend::swiglu(const SwigluArgs& a) {
  validate(a);
  int64_t n = a.out.numel();
  const float* g = a.gate.data<float>();
  const float* u = a.up.data<float>();
  const cpu::F32Out o32(a.out);
  float* o = o32.f32();
  cpu::for_chunks(n, kGrain, n >= cpu::kParallelMin,
                  [&](int64_t lo, int64_t hi) { swiglu_range(g + lo, u + lo, o + lo, hi - lo); });
  o32.done();
}

void CpuBackend::swiglu_backward(const SwigluBackwardArgs& a) {
  validate(a);
  int64_t n = a.gate.numel();
  const float* g = a.gate.data<float>();
  const float* u = a.up.data<float>();
  const float* dout = a.dout.data<float>();
  // BF16 outputs (never accumulated) through F32 temporaries; dgate may alias dout only in F32.
  const std::optional<cpu::F32Out> g32 = present(a.dgate) ? std::optional<cpu::F32Out>(a.dgate) : std::nullopt;
  const std::optional<cpu::F32Out> u32 = present(a.dup) ? std::optional<cpu::F32Out>(a.dup) : std::nullopt;
  float* dg = g32 ? g32->f32() : nullptr;
  float* du = u32 ? u32->f32() : nullptr;
  bool acc = a.accumulate;
  // An absent output goes to scratch (one per thread, so the kernel has no branch per element).
  cpu::for_chunks(n, kGrain, n >= cpu::kParallelMin, [&](int64_t lo, int64_t hi) {
    float* sink = (dg && du) ? nullptr : cpu::scratch(size_t(hi - lo), 1);
    swiglu_backward_range(g + lo, u + lo, dout + lo, dg ? dg + lo : sink, du ? du + lo : sink, hi - lo, acc);
  });
  if (g32) g32->done();
  if (u32) u32->done();
}

}  // namespace dsv3
