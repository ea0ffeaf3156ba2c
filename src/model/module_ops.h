// Small wrappers the module forwards share: one op call each, allocating the output on the backend.
#pragma once
#include "backend/ops.h"

namespace dsv3::modops {

// y = rmsnorm(x)·w (F32, allocated); rstd [rows] saved for the backward.
inline Tensor rmsnorm(Backend& be, const Tensor& x, const Tensor& w, float eps, Tensor& rstd) {
  Tensor y = be.alloc(DType::F32, x.shape());
  rstd = be.alloc(DType::F32, {x.numel() / x.dim(-1)});
  RmsNormArgs a;
  a.x = x;
  a.weight = w;
  a.eps = eps;
  a.y = y;
  a.rstd = rstd;
  be.rmsnorm(a);
  return y;
}

// dx (+)= ∂L/∂x of y = rmsnorm(x)·w; dw += Σ_rows dy·x·rstd. dx may alias dy.
inline void rmsnorm_backward(Backend& be, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                             const Tensor& dw, const Tensor& dx, bool accumulate_dx) {
  RmsNormBackwardArgs a;
  a.dy = dy;
  a.x = x;
  a.weight = w;
  a.rstd = rstd;
  a.dx = dx;
  a.dweight = dw;
  a.accumulate_dx = accumulate_dx;
  a.accumulate_dweight = true;
  be.rmsnorm_backward(a);
}

// a + b (F32, allocated).
inline Tensor add(Backend& be, const Tensor& a, const Tensor& b) {
  Tensor out = be.alloc(DType::F32, a.shape());
  AddArgs s;
  s.a = a;
  s.b = b;
  s.out = out;
  be.add(s);
  return out;
}

// out[i] = src[idx[i]] (F32 rows).
inline void gather_rows(Backend& be, const Tensor& src, const Tensor& idx, const Tensor& out) {
  GatherRowsArgs g;
  g.src = src;
  g.idx = idx;
  g.out = out;
  be.gather_rows(g);
}

// A host vector of I32 as a tensor on the backend's device.
inline Tensor i32_tensor(Backend& be, const std::vector<int32_t>& v) {
  Tensor h = Tensor::empty(DType::I32, {int64_t(v.size())});
  for (size_t i = 0; i < v.size(); ++i) h.data<int32_t>()[i] = v[i];
  return be.to_device(h);
}

}  // namespace dsv3::modops
