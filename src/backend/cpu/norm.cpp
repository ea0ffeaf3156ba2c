// Embedding, RMSNorm and SwiGLU: row-local ops and their backwards.
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include <omp.h>

namespace dsv3 {

namespace {
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
#pragma omp parallel for schedule(static) if (m * d >= cpu::kParallelMin)
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * d;
    double ss = 0.0;
    for (int64_t j = 0; j < d; ++j) ss += double(xr[j]) * double(xr[j]);
    float rs = float(1.0 / std::sqrt(ss / double(d) + double(eps)));
    if (rstd) rstd[r] = rs;
    float* yr = y + r * d;  // may alias xr: each element is read before it is written
    for (int64_t j = 0; j < d; ++j) yr[j] = w[j] * (xr[j] * rs);
  }
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
    for (int64_t c0 = 0; c0 < d; c0 += kCols) {
      int64_t c1 = std::min(d, c0 + kCols);
      double s[kCols] = {};
      for (int64_t r = 0; r < m; ++r) {
        const float* xr = x + r * d;
        const float* gr = dy + r * d;
        for (int64_t j = c0; j < c1; ++j) s[j - c0] += double(gr[j]) * double(xr[j] * rstd[r]);
      }
      for (int64_t j = c0; j < c1; ++j) dw[j] = acc ? float(double(dw[j]) + s[j - c0]) : float(s[j - c0]);
    }
  }
  if (present(a.dx)) {
    float* dx = cpu::mut<float>(a.dx);
    bool acc = a.accumulate_dx;
    // dx = rstd·(w·dy − x·rstd²·mean(w·dy·x)); dx may alias dy (read before write per element).
#pragma omp parallel for schedule(static) if (m * d >= cpu::kParallelMin)
    for (int64_t r = 0; r < m; ++r) {
      const float* xr = x + r * d;
      const float* gr = dy + r * d;
      float* o = dx + r * d;
      double dot = 0.0;
      for (int64_t j = 0; j < d; ++j) dot += double(w[j]) * double(gr[j]) * double(xr[j]);
      float rs = rstd[r];
      float c = float(dot / double(d)) * rs * rs;
      for (int64_t j = 0; j < d; ++j) {
        float v = rs * (w[j] * gr[j] - xr[j] * c);
        o[j] = acc ? o[j] + v : v;
      }
    }
  }
}

void CpuBackend::swiglu(const SwigluArgs& a) {
  validate(a);
  int64_t n = a.out.numel();
  const float* g = a.gate.data<float>();
  const float* u = a.up.data<float>();
  float* o = cpu::mut<float>(a.out);
#pragma omp parallel for schedule(static) if (n >= cpu::kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    float gi = g[i], ui = u[i];
    o[i] = gi / (1.0f + std::exp(-gi)) * ui;
  }
}

void CpuBackend::swiglu_backward(const SwigluBackwardArgs& a) {
  validate(a);
  int64_t n = a.gate.numel();
  const float* g = a.gate.data<float>();
  const float* u = a.up.data<float>();
  const float* dout = a.dout.data<float>();
  float* dg = present(a.dgate) ? cpu::mut<float>(a.dgate) : nullptr;
  float* du = present(a.dup) ? cpu::mut<float>(a.dup) : nullptr;
  bool acc = a.accumulate;
#pragma omp parallel for schedule(static) if (n >= cpu::kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    float gi = g[i], ui = u[i], go = dout[i];
    float sg = 1.0f / (1.0f + std::exp(-gi));
    float silu = gi * sg;
    float vg = go * ui * sg * (1.0f + gi * (1.0f - sg));
    float vu = go * silu;
    if (dg) dg[i] = acc ? dg[i] + vg : vg;
    if (du) du[i] = acc ? du[i] + vu : vu;
  }
}

}  // namespace dsv3
