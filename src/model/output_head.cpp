#include "model/output_head.h"

#include "backend/fp8.h"

namespace dsv3 {

namespace {
// BF16 under either low precision; false (the plain path) in F32 training or for a head with a bias
// or stored scales.
bool bf16_head(const LinearParam& p, LinearPrecision& prec) {
  prec = linear_precision();
  if (prec.mode == LinearPrecisionMode::F32 || present(p.bias) || present(p.scale_inv)) return false;
  prec.mode = LinearPrecisionMode::Bf16;
  return true;
}
}  // namespace

void head_forward(Backend& be, const LinearParam& p, const Tensor& x, const Tensor& y) {
  LinearPrecision prec;
  if (!bf16_head(p, prec)) return linear_forward(be, p, x, y);
  LinearArgs a;
  a.x = x;
  a.w = p.w;
  a.y = y;
  linear_lowp(prec, a);
}

void head_backward(Backend& be, const LinearParam& p, const LinearParam& g, const Tensor& x, const Tensor& dy,
                   const Tensor& dx, bool accumulate_dx) {
  LinearPrecision prec;
  if (!bf16_head(p, prec)) return linear_backward(be, p, g, x, dy, dx, accumulate_dx);
  if (x.numel() == 0) return;
  LinearBackwardArgs a;
  a.dy = dy;
  a.x = x;
  a.w = p.w;
  a.dx = dx;
  a.dw = g.w;
  a.accumulate_dx = accumulate_dx;
  a.accumulate_dw = true;
  linear_backward_lowp(prec, a);
}

}  // namespace dsv3
