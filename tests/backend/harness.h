// The generic backend test harness (DESIGN §2.1): a registry of op cases, each of which builds its
// inputs from a seed, runs one op (or a forward + backward) on a backend, and returns its outputs
// next to a double-precision reference. The runner (backend_ops_test.cpp) runs every case on every
// registered backend and checks the normalised error max|Δ|/max|ref|, NaN/Inf, and guard bytes
// around every output. A CUDA backend plugs in by adding itself to `test_backends()`.
#pragma once
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backend/ops.h"
#include "backend/tolerance.h"
#include "core/rng.h"

namespace dsv3::test {

using Vec = std::vector<double>;

// Every backend the tests can run on (the CPU always; CUDA when built and a device is present).
std::vector<Backend*> test_backends();

// ---- host tensors ----------------------------------------------------------------------------

inline Vec to_vec(const Tensor& t) {
  Vec v(static_cast<size_t>(t.numel()));
  for (size_t i = 0; i < v.size(); ++i) v[i] = double(load_as_float(t.raw(), t.dtype(), i));
  return v;
}
inline Tensor host_f32(const Shape& s, const Vec& v) {
  Tensor t = Tensor::empty(DType::F32, s);
  for (size_t i = 0; i < v.size(); ++i) t.data<float>()[i] = float(v[i]);
  return t;
}
// Normal(0, scale²) values, rounded to dtype (so the reference sees exactly what the op sees).
inline Tensor randn(const Shape& s, uint64_t seed, uint64_t stream, float scale = 1.0f,
                    DType t = DType::F32) {
  Tensor f = Tensor::empty(DType::F32, s);
  for (int64_t i = 0; i < f.numel(); ++i) f.data<float>()[i] = scale * rng_normal(seed, stream, uint64_t(i));
  return t == DType::F32 ? f : f.to(t);
}
// FP8 quotients where one ulp decides the code: rows of K values at, and a few ulps around, E4M3's
// rounding midpoints (signs alternating), row r scaled by about 2^(e0 + r) and led by 448 times
// that, so row r's first 1×128 tile has a scale of 2^(e0 + r) within a factor of two and its
// quotients are the midpoints (its other tiles' amax is a midpoint's: quotients near them).
inline Tensor fp8_midpoints(int64_t R, int64_t K, uint64_t seed, int e0) {
  std::vector<float> pos;  // E4M3's positive values
  for (int j = 1; j < 8; ++j) pos.push_back(std::ldexp(float(j), -9));
  for (int e = -6; e <= 8; ++e)
    for (int j = 0; j < 8; ++j)
      if (std::ldexp(1.0f + float(j) / 8.0f, e) <= 448.0f) pos.push_back(std::ldexp(1.0f + float(j) / 8.0f, e));
  std::vector<float> mids = {std::ldexp(1.0f, -10)};
  for (size_t i = 0; i + 1 < pos.size(); ++i) mids.push_back((pos[i] + pos[i + 1]) / 2.0f);
  Tensor x = Tensor::empty(DType::F32, {R, K});
  for (int64_t r = 0; r < R; ++r) {
    const float s = std::ldexp(1.0f + float(rng_u64(seed, 1, uint64_t(r)) % 1024) / 1024.0f, e0 + int(r));
    float* row = x.data<float>() + r * K;
    row[0] = s * 448.0f;
    for (int64_t j = 1; j < K; ++j) {
      float v = mids[rng_u64(seed, 2, uint64_t(r * K + j)) % mids.size()] * s;
      const int step = int(j % 5) - 2;
      for (int t = 0; t < std::abs(step); ++t) v = std::nextafter(v, step > 0 ? INFINITY : 0.0f);
      row[j] = j % 2 ? -v : v;
    }
  }
  return x;
}
inline Tensor randi(const Shape& s, uint64_t seed, uint64_t stream, int32_t lo, int32_t hi) {
  Tensor t = Tensor::empty(DType::I32, s);
  for (int64_t i = 0; i < t.numel(); ++i)
    t.data<int32_t>()[i] = lo + int32_t(rng_u64(seed, stream, uint64_t(i)) % uint64_t(hi - lo));
  return t;
}

// ---- guarded outputs -------------------------------------------------------------------------

// Allocates outputs on a backend inside a larger buffer whose leading and trailing bytes hold a
// sentinel; `intact()` says whether the op wrote outside its output.
class Guards {
 public:
  static constexpr size_t kGuard = 256;
  static constexpr uint8_t kSentinel = 0xA5;
  explicit Guards(Backend& b) : b_(b) {}

  // An output whose initial contents are NaN (0xFF bytes): elements the op fails to write show up.
  Tensor out(DType t, const Shape& s) {
    std::vector<uint8_t> payload(size_t(s.numel()) * dtype_size(t), 0xFF);
    return make(t, s, payload.data());
  }
  // An output (or in/out) starting from the values of a host tensor.
  Tensor init(const Tensor& host) { return make(host.dtype(), host.shape(), host.raw()); }

  // "" when every guard is untouched, else the names of the damaged buffers.
  std::string damaged() {
    std::string bad;
    for (size_t i = 0; i < bufs_.size(); ++i) {
      Tensor h = b_.to_host(*bufs_[i]);
      const uint8_t* p = h.data<uint8_t>();
      size_t n = size_t(h.numel());
      for (size_t j = 0; j < kGuard; ++j)
        if (p[j] != kSentinel || p[n - 1 - j] != kSentinel) {
          bad += cat("buffer#", i, " ");
          break;
        }
    }
    return bad;
  }

 private:
  Tensor make(DType t, const Shape& s, const void* payload) {
    size_t bytes = size_t(s.numel()) * dtype_size(t);
    Tensor host = Tensor::empty(DType::U8, {int64_t(bytes + 2 * kGuard)});
    uint8_t* p = host.data<uint8_t>();
    std::memset(p, kSentinel, kGuard);
    std::memset(p + kGuard + bytes, kSentinel, kGuard);
    std::memcpy(p + kGuard, payload, bytes);
    auto dev = std::make_shared<Tensor>(b_.to_device(host));
    bufs_.push_back(dev);
    return Tensor::borrow(static_cast<uint8_t*>(dev->raw()) + kGuard, t, s, dev, b_.device());
  }
  Backend& b_;
  std::vector<std::shared_ptr<Tensor>> bufs_;
};

// ---- comparison ------------------------------------------------------------------------------

struct Output {
  std::string name;
  Tensor got;  // on the host
  Vec want;
  double tol;  // on max|Δ| / max|ref|
};

struct Err {
  double norm_err = 0;  // max|Δ| / max|ref|
  int64_t worst = -1;
  int64_t non_finite = 0;
};
inline Err compare(const Tensor& got, const Vec& want) {
  Err e;
  Vec g = to_vec(got);
  double mref = 0, md = 0;
  for (size_t i = 0; i < want.size() && i < g.size(); ++i) {
    if (!std::isfinite(g[i])) ++e.non_finite;
    mref = std::max(mref, std::fabs(want[i]));
    double d = std::fabs(g[i] - want[i]);
    if (d > md || (!std::isfinite(g[i]) && e.worst < 0)) {
      md = std::isfinite(d) ? d : md;
      e.worst = int64_t(i);
    }
  }
  e.norm_err = mref > 0 ? md / mref : md;
  return e;
}

// ---- cases -----------------------------------------------------------------------------------

struct OpCase {
  std::string name;
  // Builds inputs from `seed`, runs on `b` with outputs from `g`, returns outputs with references.
  std::function<std::vector<Output>(Backend& b, Guards& g, uint64_t seed)> run;
};
std::vector<OpCase>& op_cases();
struct RegisterCase {
  RegisterCase(std::string name, std::function<std::vector<Output>(Backend&, Guards&, uint64_t)> f) {
    op_cases().push_back({std::move(name), std::move(f)});
  }
};

// Central finite differences of a scalar function in double: the reference gradient for every
// backward. h is relative to max(1, |x_i|).
inline Vec fd_grad(const std::function<double(const Vec&)>& f, Vec x, double h = 1e-6) {
  Vec g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    double x0 = x[i], step = h * std::max(1.0, std::fabs(x0));
    x[i] = x0 + step;
    double fp = f(x);
    x[i] = x0 - step;
    double fm = f(x);
    x[i] = x0;
    g[i] = (fp - fm) / (2 * step);
  }
  return g;
}
inline double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

}  // namespace dsv3::test

// OP_CASE(name) { ... return {outputs}; } defines and registers a case; the body sees
// `Backend& b`, `Guards& g`, `uint64_t seed`.
#define OP_CASE(name)                                                                           \
  static std::vector<::dsv3::test::Output> name##_case(::dsv3::Backend& b, ::dsv3::test::Guards& g, \
                                                       uint64_t seed);                          \
  static ::dsv3::test::RegisterCase name##_reg(#name, name##_case);                              \
  static std::vector<::dsv3::test::Output> name##_case(::dsv3::Backend& b, ::dsv3::test::Guards& g, \
                                                       uint64_t seed)

namespace dsv3::test {
// Backends beyond the CPU add themselves here (e.g. `static RegisterBackend r(&cuda_backend());`
// in a CUDA test file); test_backends() returns the CPU followed by these.
std::vector<Backend*>& registered_backends();
struct RegisterBackend {
  explicit RegisterBackend(Backend* b) { registered_backends().push_back(b); }
};
}  // namespace dsv3::test
