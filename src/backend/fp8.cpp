// FP8 op validation and the reduced-precision linear layer (backend/fp8.h), composed from the FP8
// ops and the CPU backend's FP32 GEMMs.
#include "backend/fp8.h"

#include <limits>

#include "core/error.h"

namespace dsv3 {
namespace {

int64_t ceil128(int64_t n) { return (n + kFp8Block - 1) / kFp8Block; }
int64_t last_dim(const Tensor& t) { return t.ndim() ? t.dim(t.ndim() - 1) : 1; }

void check_operand(const Tensor& q, const Tensor& s, const char* what) {
  DSV3_CHECK(q.defined() && q.dtype() == DType::F8_E4M3 && q.ndim() == 2,
             cat("fp8_gemm: ", what, " must be F8_E4M3 [R, K]"));
  int64_t R = q.dim(0), K = q.dim(1);
  DSV3_CHECK(s.defined() && s.dtype() == DType::F32 && s.ndim() == 2 && s.dim(1) == ceil128(K) &&
                 (s.dim(0) == R || s.dim(0) == ceil128(R)),
             cat("fp8_gemm: ", what, "'s scale must be F32 [", R, " or ", ceil128(R), ", ", ceil128(K), "]"));
}

}  // namespace

const char* fp8_tiling_name(Fp8Tiling t) {
  switch (t) {
    case Fp8Tiling::Row1x128: return "1x128";
    case Fp8Tiling::Col128x1: return "128x1";
    case Fp8Tiling::Block128x128: return "128x128";
  }
  return "?";
}

void validate(const QuantizeFp8Args& a) {
  DSV3_CHECK(a.x.defined() && a.x.dtype() == DType::F32 && a.x.ndim() >= 1, "quantize_fp8: x must be F32 [..., K]");
  int64_t K = last_dim(a.x), M = K ? a.x.numel() / K : 0;
  int64_t th = a.tiling == Fp8Tiling::Row1x128 ? 1 : kFp8Block;
  int64_t tw = a.tiling == Fp8Tiling::Col128x1 ? 1 : kFp8Block;
  int64_t g0 = (M + th - 1) / th, g1 = (K + tw - 1) / tw;
  if (a.transpose_out) std::swap(g0, g1);
  DSV3_CHECK(a.q.defined() && a.q.dtype() == DType::F8_E4M3 && a.q.numel() == M * K &&
                 (a.q.ndim() < 2 || !a.transpose_out || (a.q.dim(0) == K && a.q.dim(1) == M)),
             cat("quantize_fp8: q must be F8_E4M3 with ", M * K, " elements", a.transpose_out ? " shaped [K, M]" : ""));
  DSV3_CHECK(a.scale.defined() && a.scale.dtype() == DType::F32 && a.scale.ndim() == 2 && a.scale.dim(0) == g0 &&
                 a.scale.dim(1) == g1,
             cat("quantize_fp8: scale must be F32 [", g0, ", ", g1, "] for tiling ", fp8_tiling_name(a.tiling)));
}

void validate(const Fp8GemmArgs& g) {
  check_operand(g.a, g.a_scale, "a");
  check_operand(g.b, g.b_scale, "b");
  DSV3_CHECK(g.a.dim(1) == g.b.dim(1), cat("fp8_gemm: K mismatch, a [", g.a.dim(0), ", ", g.a.dim(1), "] b [",
                                           g.b.dim(0), ", ", g.b.dim(1), "]"));
  DSV3_CHECK(g.c.defined() && (g.c.dtype() == DType::F32 || g.c.dtype() == DType::BF16) &&
                 g.c.numel() == g.a.dim(0) * g.b.dim(0),
             cat("fp8_gemm: c must be F32 or BF16 [", g.a.dim(0), ", ", g.b.dim(0), "]"));
  DSV3_CHECK(g.acc_bits >= 2 && g.acc_bits <= 24, "fp8_gemm: acc_bits must be in [2, 24]");
  DSV3_CHECK(g.promote_every >= 0 && g.promote_every % 32 == 0, "fp8_gemm: promote_every must be a multiple of 32");
}

LinearPrecision& linear_precision() {
  static LinearPrecision p;
  return p;
}

namespace {

struct Quant {
  Tensor q, s;
  int64_t nonfinite = 0;
};
// Quantize x [R, C] (2-D view) with a tiling; transposed output when `t`.
Quant quant(const Tensor& x, Fp8Tiling tiling, bool t, bool pow2, const char* name) {
  int64_t R = x.dim(0), C = x.dim(1);
  int64_t th = tiling == Fp8Tiling::Row1x128 ? 1 : kFp8Block;
  int64_t tw = tiling == Fp8Tiling::Col128x1 ? 1 : kFp8Block;
  int64_t g0 = (R + th - 1) / th, g1 = (C + tw - 1) / tw;
  Quant out;
  out.q = Tensor::empty(DType::F8_E4M3, t ? Shape{C, R} : Shape{R, C});
  out.s = Tensor::empty(DType::F32, t ? Shape{g1, g0} : Shape{g0, g1});
  QuantizeFp8Args a;
  a.x = x;
  a.tiling = tiling;
  a.pow2_scale = pow2;
  a.transpose_out = t;
  a.q = out.q;
  a.scale = out.s;
  a.name = name;
  a.on_nonfinite = NonFinitePolicy::Report;
  out.nonfinite = quantize_fp8(a).nonfinite;
  return out;
}

Tensor as_f32(const Tensor& w, const Tensor& scale_inv) {
  if (w.dtype() == DType::F32) return w;
  if (w.dtype() != DType::F8_E4M3) return w.to(DType::F32);
  Tensor out = Tensor::empty(DType::F32, w.shape());
  dequantize_fp8(w, scale_inv, out);
  return out;
}

Tensor round_bf16(const Tensor& x) { return x.to(DType::BF16).to(DType::F32); }

Tensor mat(const Tensor& t) {
  int64_t k = last_dim(t);
  return t.reshape({k ? t.numel() / k : 0, k});
}

// A non-finite operand makes the whole product NaN, as an FP32 GEMM would propagate it: the trainer's
// non-finite step check then sees it (FP8 itself has no Inf and the scales would hide it).
void gemm(const Quant& a, const Quant& b, const Tensor& c, bool accumulate) {
  if (a.nonfinite + b.nonfinite > 0) {
    FillArgs f;
    f.x = c;
    f.value = std::numeric_limits<float>::quiet_NaN();
    cpu_backend().fill(f);
    return;
  }
  Fp8GemmArgs g;
  g.a = a.q;
  g.a_scale = a.s;
  g.b = b.q;
  g.b_scale = b.s;
  g.c = c;
  g.accumulate = accumulate;
  fp8_gemm(g);
}

}  // namespace

void linear_lowp(const LinearPrecision& p, const LinearArgs& a) {
  validate(a);
  Backend& be = cpu_backend();
  if (p.mode == LinearPrecisionMode::F32) return be.linear(a);
  Tensor w = as_f32(a.w, a.w_scale_inv), x = mat(a.x), y = mat(a.y);
  if (x.dim(0) == 0) return;
  if (p.mode == LinearPrecisionMode::Bf16) {
    LinearArgs b = a;
    b.x = round_bf16(a.x);
    b.w = round_bf16(w);
    b.w_scale_inv = Tensor();
    return be.linear(b);
  }
  gemm(quant(x, Fp8Tiling::Row1x128, false, p.pow2_scale, "linear input"),
       quant(w, Fp8Tiling::Block128x128, false, p.pow2_scale, "linear weight"), y, a.accumulate);
}

void linear_backward_lowp(const LinearPrecision& p, const LinearBackwardArgs& a) {
  validate(a);
  Backend& be = cpu_backend();
  if (p.mode == LinearPrecisionMode::F32) return be.linear_backward(a);
  Tensor w = present(a.w) ? as_f32(a.w, a.w_scale_inv) : a.w;
  Tensor dy = mat(a.dy);
  if (dy.dim(0) == 0) return;
  if (p.mode == LinearPrecisionMode::Bf16) {
    LinearBackwardArgs b = a;
    b.dy = round_bf16(a.dy);
    if (present(a.x)) b.x = round_bf16(a.x);
    if (present(w)) b.w = round_bf16(w);
    b.w_scale_inv = Tensor();
    return be.linear_backward(b);
  }
  Fp8Tiling gtile = p.dgrad_block ? Fp8Tiling::Block128x128 : Fp8Tiling::Row1x128;
  if (present(a.dx))  // Dgrad: dx[M, K] = Q(dy)[M, N] · (Q(W)ᵀ [K, N])ᵀ
    gemm(quant(dy, gtile, false, p.pow2_scale, "linear output gradient"),
         quant(w, Fp8Tiling::Block128x128, true, p.pow2_scale, "linear weight"), mat(a.dx), a.accumulate_dx);
  if (present(a.dw)) {
    // Wgrad: dW[N, K] = Q(dyᵀ)[N, M] · (Q(x̂ᵀ)[K, M])ᵀ, both grouped 128 tokens per channel. x̂ is the
    // FP8 copy of x the forward kept (1×128 tiles), dequantized and re-quantized in 128×1 tiles.
    Tensor x = mat(a.x);
    Quant qx = quant(x, Fp8Tiling::Row1x128, false, p.pow2_scale, "linear input");
    Tensor xh = Tensor::empty(DType::F32, x.shape());
    dequantize_fp8(qx.q, qx.s, xh);
    gemm(quant(dy, p.dgrad_block ? Fp8Tiling::Block128x128 : Fp8Tiling::Col128x1, true, p.pow2_scale,
               "linear output gradient"),
         quant(xh, Fp8Tiling::Col128x1, true, p.pow2_scale, "linear input (re-quantized)"), a.dw, a.accumulate_dw);
  }
}

}  // namespace dsv3
