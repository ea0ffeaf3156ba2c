// FP8 op validation and the reduced-precision linear layer (backend/fp8.h), composed from the FP8
// ops and the CPU backend's FP32 GEMMs; on CUDA tensors the layer runs backend/cuda/linear_lowp.cu.
#include "backend/fp8.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cfloat>
#include <cmath>
#include <limits>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "core/error.h"
#ifdef DSV3_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/linear_lowp.h"
#endif

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

// ---------------------------------------------------------------------------------------------
// Fast CPU paths (bit-identical to the reference ops in backend/cpu/fp8.cpp).

namespace {

// float_to_e4m3 without branches or doubles, so the loops below vectorize: RNE at 3 mantissa bits,
// E4M3's subnormals (|y| < 2^-6: q = RNE(|y|·2^9), by the 2^23 magic-number add), saturation of
// everything above 448 (±Inf included) to ±448, NaN → 0x7F with the sign bit of the input.
inline uint8_t e4m3_code(float y) {
  const uint32_t b = std::bit_cast<uint32_t>(y);
  const uint32_t sign = (b >> 24) & 0x80u, a = b & 0x7fffffffu;
  const uint32_t r = a + 0x7ffffu + ((a >> 20) & 1u);
  const uint32_t normal = (r >> 20) - (120u << 3);  // exponent bias 127 → 7
  const bool small = a < 0x3c800000u;               // 2^-6
  const float t = std::bit_cast<float>(small ? a : 0u) * 512.0f + 8388608.0f;
  uint32_t code = small ? std::bit_cast<uint32_t>(t) - 0x4b000000u : normal;
  code = (r >> 20) > 0x43eu ? 0x7eu : code;  // rounds above 448
  code = a > 0x7f800000u ? 0x7fu : code;     // NaN
  return uint8_t(code | sign);
}

// The reference's scale rule (backend/fp8.h): amax/448 in FP32, 1 for an all-zero tile, the smallest
// positive FP32 on underflow, or the next power of two ≥ amax/448.
float fp8_scale_of(float amax, bool pow2) {
  if (amax == 0.0f) return 1.0f;
  float s = amax / kE4M3Max;
  if (s == 0.0f) s = FLT_TRUE_MIN;
  if (pow2) {
    int e;
    float m = std::frexp(s, &e);
    s = std::ldexp(1.0f, m == 0.5f ? e - 1 : e);
  }
  return s;
}

inline bool finite_bits(float v) { return (std::bit_cast<uint32_t>(v) & 0x7f800000u) != 0x7f800000u; }

// amax over n finite values (non-finite ones counted in *bad and skipped).
inline float amax_of(const float* x, int64_t n, int64_t* bad) {
  float m = 0.0f;
  int64_t nb = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool fin = finite_bits(x[i]);
    const float v = fin ? std::fabs(x[i]) : 0.0f;
    m = v > m ? v : m;
    nb += fin ? 0 : 1;
  }
  *bad += nb;
  return m;
}

const std::array<float, 256>& e4m3_values() {
  static const std::array<float, 256> lut = [] {
    std::array<float, 256> l{};
    for (int i = 0; i < 256; ++i) l[size_t(i)] = e4m3_to_float(uint8_t(i));
    return l;
  }();
  return lut;
}

}  // namespace

Fp8Status quantize_fp8_fast(const QuantizeFp8Args& a) {
  validate(a);
  const int64_t K = last_dim(a.x), M = K ? a.x.numel() / K : 0;
  const int64_t th = a.tiling == Fp8Tiling::Row1x128 ? 1 : kFp8Block;
  const int64_t tw = a.tiling == Fp8Tiling::Col128x1 ? 1 : kFp8Block;
  const int64_t nrb = (M + th - 1) / th, ng = (K + tw - 1) / tw;
  const float* x = a.x.data<float>();
  uint8_t* q = static_cast<uint8_t*>(const_cast<Tensor&>(a.q).raw());
  float* sc = cpu::mut<float>(a.scale);
  const bool t = a.transpose_out;
  int64_t bad = 0;
#pragma omp parallel reduction(+ : bad) if (M * K >= cpu::kParallelMin)
  {
    std::vector<float> amax(static_cast<size_t>(ng)), s(static_cast<size_t>(ng));
    std::vector<uint8_t> tile(t ? static_cast<size_t>(th * K) : 0);
#pragma omp for schedule(static)
    for (int64_t rb = 0; rb < nrb; ++rb) {
      const int64_t r0 = rb * th, r1 = std::min(M, r0 + th);
      std::fill(amax.begin(), amax.end(), 0.0f);
      for (int64_t r = r0; r < r1; ++r) {
        const float* xr = x + r * K;
        if (tw == 1) {
          int64_t nb = 0;
          for (int64_t k = 0; k < K; ++k) {
            const bool fin = finite_bits(xr[k]);
            const float v = fin ? std::fabs(xr[k]) : 0.0f;
            amax[size_t(k)] = v > amax[size_t(k)] ? v : amax[size_t(k)];
            nb += fin ? 0 : 1;
          }
          bad += nb;
        } else {
          for (int64_t g = 0; g < ng; ++g) {
            int64_t nb = 0;
            const float m = amax_of(xr + g * tw, std::min(tw, K - g * tw), &nb);
            bad += nb;
            amax[size_t(g)] = std::max(amax[size_t(g)], m);
          }
        }
      }
      for (int64_t g = 0; g < ng; ++g) {
        s[size_t(g)] = fp8_scale_of(amax[size_t(g)], a.pow2_scale);
        sc[t ? g * nrb + rb : rb * ng + g] = s[size_t(g)];
      }
      for (int64_t r = r0; r < r1; ++r) {
        const float* xr = x + r * K;
        uint8_t* dst = t ? tile.data() + (r - r0) * K : q + r * K;
        if (tw == 1) {
          const float* sv = s.data();
          for (int64_t k = 0; k < K; ++k) dst[k] = e4m3_code(xr[k] / sv[k]);
        } else {
          for (int64_t g = 0; g < ng; ++g) {
            const float sg = s[size_t(g)];
            const int64_t k0 = g * tw, k1 = std::min(K, k0 + tw);
            for (int64_t k = k0; k < k1; ++k) dst[k] = e4m3_code(xr[k] / sg);
          }
        }
      }
      if (t)
        for (int64_t k = 0; k < K; ++k)
          for (int64_t r = r0; r < r1; ++r) q[k * M + r] = tile[size_t((r - r0) * K + k)];
    }
  }
  if (bad > 0 && a.on_nonfinite == NonFinitePolicy::Throw) {
    int64_t first = 0;
    while (finite_bits(x[first])) ++first;
    input_error("FP8 quantization of ", a.name, ": ", bad, " non-finite value(s) (NaN or Inf), first at element [",
                first / K, ", ", first % K, "] of [", M, ", ", K, "]; expected finite values");
  }
  return {bad};
}

void dequantize_fp8_fast(const Tensor& q, const Tensor& scale, const Tensor& out) {
  DSV3_CHECK(q.dtype() == DType::F8_E4M3 && q.ndim() == 2 && scale.dtype() == DType::F32 && scale.ndim() == 2 &&
                 out.dtype() == DType::F32 && out.numel() == q.numel(),
             "dequantize_fp8: q must be F8_E4M3 [R, C], scale F32 2-D, out F32 with q's size");
  const int64_t R = q.dim(0), C = q.dim(1), g0 = scale.dim(0), g1 = scale.dim(1);
  const bool per_row = g0 == R && g1 == ceil128(C), per_block = g0 == ceil128(R) && g1 == ceil128(C),
             per_col = g0 == ceil128(R) && g1 == C;
  DSV3_CHECK(per_row || per_block || per_col, cat("dequantize_fp8: scale grid [", g0, ", ", g1,
                                                  "] fits no FP8 tiling of [", R, ", ", C, "]"));
  const auto& lut = e4m3_values();
  const uint8_t* qp = static_cast<const uint8_t*>(q.raw());
  const float* sp = scale.data<float>();
  float* o = cpu::mut<float>(out);
#pragma omp parallel for schedule(static) if (R * C >= cpu::kParallelMin)
  for (int64_t r = 0; r < R; ++r) {
    const float* srow = sp + (per_row ? r : r / kFp8Block) * g1;
    const uint8_t* qr = qp + r * C;
    float* orow = o + r * C;
    if (per_col) {
      for (int64_t c = 0; c < C; ++c) orow[c] = lut[qr[c]] * srow[c];
    } else {
      for (int64_t c0 = 0; c0 < C; c0 += kFp8Block) {
        const float sg = srow[c0 / kFp8Block];
        const int64_t c1 = std::min(C, c0 + kFp8Block);
        for (int64_t c = c0; c < c1; ++c) orow[c] = lut[qr[c]] * sg;
      }
    }
  }
}

void fp8_gemm_fast(const Fp8GemmArgs& g) {
  validate(g);
  DSV3_CHECK(g.accum == Fp8Accum::Fp32, "fp8_gemm_fast: FP32 accumulation only");
  const int64_t M = g.a.dim(0), K = g.a.dim(1), N = g.b.dim(0), nk = ceil128(K);
  // Row → scale row: per row, or per 128 rows (the shape says which; R ≤ 128 reads the same either way).
  const int64_t ath = g.a_scale.dim(0) == M ? 1 : kFp8Block, bth = g.b_scale.dim(0) == N ? 1 : kFp8Block;
  const auto& lut = e4m3_values();
  std::vector<float> af(static_cast<size_t>(M * K)), bf(static_cast<size_t>(N * K)),
      acc(static_cast<size_t>(M * N), 0.0f), part(static_cast<size_t>(M * N)), sbv(static_cast<size_t>(N));
  const uint8_t* qa = static_cast<const uint8_t*>(g.a.raw());
  const uint8_t* qb = static_cast<const uint8_t*>(g.b.raw());
#pragma omp parallel for schedule(static) if (M * K >= cpu::kParallelMin)
  for (int64_t i = 0; i < M * K; ++i) af[size_t(i)] = lut[qa[i]];
#pragma omp parallel for schedule(static) if (N * K >= cpu::kParallelMin)
  for (int64_t i = 0; i < N * K; ++i) bf[size_t(i)] = lut[qb[i]];
  const float* sa = g.a_scale.data<float>();
  const float* sb = g.b_scale.data<float>();
  for (int64_t c = 0; c < nk; ++c) {
    const int64_t k0 = c * kFp8Block, kn = std::min(kFp8Block, K - k0);
    // The reference's chunk: one sgemm on the exact E4M3 values (same call, same bits).
    cpu::sgemm(false, true, M, N, kn, 1.0f, af.data() + k0, K, bf.data() + k0, K, 0.0f, part.data(), N);
    for (int64_t j = 0; j < N; ++j) sbv[size_t(j)] = sb[(j / bth) * nk + c];
#pragma omp parallel for schedule(static) if (M * N >= cpu::kParallelMin)
    for (int64_t i = 0; i < M; ++i) {
      const float s_a = sa[(i / ath) * nk + c];
      float* ar = acc.data() + i * N;
      const float* pr = part.data() + i * N;
      for (int64_t j = 0; j < N; ++j) ar[j] += pr[j] * (s_a * sbv[size_t(j)]);
    }
  }
  if (g.c.dtype() == DType::F32) {
    float* out = cpu::mut<float>(g.c);
    if (g.accumulate)
      for (int64_t i = 0; i < M * N; ++i) out[i] += acc[size_t(i)];
    else
      std::copy(acc.begin(), acc.end(), out);
  } else {
    uint16_t* out = reinterpret_cast<uint16_t*>(cpu::mut<bf16>(g.c));
    for (int64_t i = 0; i < M * N; ++i)
      out[i] = float_to_bf16(g.accumulate ? bf16_to_float(out[i]) + acc[size_t(i)] : acc[size_t(i)]);
  }
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
  out.nonfinite = quantize_fp8_fast(a).nonfinite;
  return out;
}

Tensor as_f32(const Tensor& w, const Tensor& scale_inv) {
  if (w.dtype() == DType::F32) return w;
  if (w.dtype() != DType::F8_E4M3) return w.to(DType::F32);
  Tensor out = Tensor::empty(DType::F32, w.shape());
  dequantize_fp8_fast(w, scale_inv, out);
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
  fp8_gemm_fast(g);
}

}  // namespace

int64_t Fp8Tiles::bytes() const {
  return defined() ? q.numel() * int64_t(dtype_size(q.dtype())) + scale.numel() * int64_t(sizeof(float)) : 0;
}

Fp8Tiles Fp8Tiles::rows(int64_t r0, int64_t r1) const {
  return {q.rows(r0, r1), scale.defined() ? scale.rows(r0, r1) : Tensor(), nonfinite};
}

Fp8Tiles fp8_tiles(const Tensor& x, bool pow2, const char* name) {
#ifdef DSV3_HAVE_CUDA
  if (x.device() == Device::CUDA) return cuda_fp8_tiles(x, pow2);
#endif
  Quant t = quant(mat(x), Fp8Tiling::Row1x128, false, pow2, name);
  return {t.q, t.s, t.nonfinite};
}

Tensor dequantize(const Fp8Tiles& t) {
#ifdef DSV3_HAVE_CUDA
  if (t.q.device() == Device::CUDA) return cuda_dequantize(t);
#endif
  Tensor out = Tensor::empty(DType::F32, t.q.shape());
  dequantize_fp8_fast(t.q, t.scale, out);
  return out;
}

SwigluTiles swiglu_fp8(Backend& be, const SwigluArgs& a, bool pow2) {
  SwigluTiles t;
#ifdef DSV3_HAVE_CUDA
  if (a.gate.device() == Device::CUDA && cuda_swiglu_fp8(a, pow2, t)) return t;
#endif
  be.swiglu(a);
  return {fp8_tiles(a.gate, pow2, "SwiGLU gate input"), fp8_tiles(a.up, pow2, "SwiGLU up input"),
          fp8_tiles(a.out, pow2, "linear input")};
}

SwigluRecompute swiglu_fp8_recompute(Backend& be, const Fp8Tiles& gate, const Fp8Tiles& up, bool pow2) {
  SwigluRecompute r;
#ifdef DSV3_HAVE_CUDA
  if (gate.q.device() == Device::CUDA && cuda_swiglu_fp8_recompute(gate, up, pow2, r)) return r;
#endif
  SwigluArgs s;
  s.gate = r.gate = dequantize(gate);
  s.up = r.up = dequantize(up);
  s.out = r.out = be.alloc(DType::F32, s.gate.shape());
  be.swiglu(s);
  r.out_tiles = fp8_tiles(r.out, pow2, "linear input");
  return r;
}

void swiglu_backward_fp8(Backend& be, SwigluBackwardArgs a, const Fp8Tiles& gate, const Fp8Tiles& up) {
  if (!a.gate.defined() || !a.up.defined()) {
#ifdef DSV3_HAVE_CUDA
    if (gate.q.device() == Device::CUDA && cuda_swiglu_backward_fp8(a, gate, up)) return;
#endif
    a.gate = dequantize(gate);
    a.up = dequantize(up);
  }
  be.swiglu_backward(a);
}

Fp8Tiles lowp_input_copy(const LinearPrecision& p, const Tensor& x, const char* name) {
  if (p.mode == LinearPrecisionMode::Fp8) return fp8_tiles(x, p.pow2_scale, name);
#ifdef DSV3_HAVE_CUDA
  if (p.mode == LinearPrecisionMode::Bf16 && x.device() == Device::CUDA) {
    if (x.dtype() == DType::BF16) return {x, Tensor(), 0};  // its own copy
    Tensor b = cuda_backend().alloc(DType::BF16, x.shape());
    cuda_backend().copy(CopyArgs{x, b});
    return {b, Tensor(), 0};
  }
#endif
  return {};
}

Fp8Tiles lowp_grad_copy(const LinearPrecision& p, const Tensor& dy) {
  return p.mode == LinearPrecisionMode::Bf16 ? lowp_input_copy(p, dy, "linear output gradient") : Fp8Tiles{};
}

void check_lowp_copy(const LinearPrecision& p, const Fp8Tiles* c, const char* where) {
  if (!c || !c->defined()) return;
  const bool ok = (p.mode == LinearPrecisionMode::Fp8 && c->q.dtype() == DType::F8_E4M3 && c->scale.defined()) ||
                  (p.mode == LinearPrecisionMode::Bf16 && c->q.dtype() == DType::BF16);
  DSV3_CHECK(ok, where, ": a cached operand copy (", dtype_name(c->q.dtype()),
             ") is not the current precision's; was the precision changed between forward and backward?");
}

void linear_lowp(const LinearPrecision& p, const LinearArgs& a, Fp8Tiles* x_fp8) {
  validate(a, p.mode == LinearPrecisionMode::Bf16);
#ifdef DSV3_HAVE_CUDA
  if (a.x.device() == Device::CUDA) return cuda_linear_lowp(p, a, x_fp8);
#endif
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
  Quant qx;
  if (x_fp8 && x_fp8->defined()) {
    DSV3_CHECK(x_fp8->q.numel() == x.numel(), "linear_lowp: the cached FP8 input does not match x");
    qx = {x_fp8->q, x_fp8->scale, x_fp8->nonfinite};
  } else {
    qx = quant(x, Fp8Tiling::Row1x128, false, p.pow2_scale, "linear input");
    if (x_fp8) *x_fp8 = {qx.q, qx.s, qx.nonfinite};
  }
  gemm(qx, quant(w, Fp8Tiling::Block128x128, false, p.pow2_scale, "linear weight"), y, a.accumulate);
}

void linear_backward_lowp(const LinearPrecision& p, const LinearBackwardArgs& a, const Fp8Tiles* x_fp8,
                          const Fp8Tiles* dy_copy) {
  validate(a, p.mode == LinearPrecisionMode::Bf16);
#ifdef DSV3_HAVE_CUDA
  if (a.dy.device() == Device::CUDA) return cuda_linear_backward_lowp(p, a, x_fp8, dy_copy);
#endif
  (void)dy_copy;  // the CPU rounds dy itself
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
    Fp8Tiles qx = x_fp8 && x_fp8->defined() ? *x_fp8 : fp8_tiles(a.x, p.pow2_scale, "linear input");
    DSV3_CHECK(qx.q.numel() == a.x.numel(), "linear_backward_lowp: the cached FP8 input does not match x");
    Tensor xh = dequantize(qx);
    Quant qxt = quant(xh, Fp8Tiling::Col128x1, true, p.pow2_scale, "linear input (re-quantized)");
    qxt.nonfinite += qx.nonfinite;
    gemm(quant(dy, p.dgrad_block ? Fp8Tiling::Block128x128 : Fp8Tiling::Col128x1, true, p.pow2_scale,
               "linear output gradient"),
         qxt, a.dw, a.accumulate_dw);
  }
}

namespace {

// Block e's backward arguments (checked as linear_backward_lowp checks them).
LinearBackwardArgs block_backward(const GroupedLinearBackwardArgs& a, size_t e) {
  const int64_t r0 = a.offsets[e], r1 = a.offsets[e + 1];
  LinearBackwardArgs b;
  b.dy = a.dy.rows(r0, r1);
  b.x = a.x.rows(r0, r1);
  b.w = a.w[e];
  if (!a.w_scale_inv.empty()) b.w_scale_inv = a.w_scale_inv[e];
  if (present(a.dx)) b.dx = a.dx.rows(r0, r1);
  b.dw = a.dw[e];
  b.accumulate_dx = a.accumulate_dx;
  b.accumulate_dw = true;
  return b;
}

// The grouped calls' x_copy, if given: x's, and of the current precision.
void check_grouped_copy(const LinearPrecision& p, const Fp8Tiles& x_copy, const Tensor& x, const char* where) {
  DSV3_CHECK(!x_copy.defined() || x_copy.q.numel() == x.numel(), where, ": the cached copy of x (",
             x_copy.q.numel(), " values) does not match x (", x.numel(), ")");
  check_lowp_copy(p, &x_copy, where);
}

Backend& backend_of(const Tensor& t) {
#ifdef DSV3_HAVE_CUDA
  if (t.device() == Device::CUDA) return cuda_backend();
#endif
  (void)t;
  return cpu_backend();
}

}  // namespace

void linear_lowp_grouped(const LinearPrecision& p, const GroupedLinearArgs& a, const Fp8Tiles& x_copy) {
  validate(a, p.mode == LinearPrecisionMode::Bf16);
  check_grouped_copy(p, x_copy, a.x, "linear_lowp_grouped");
#ifdef DSV3_HAVE_CUDA
  if (a.x.device() == Device::CUDA && cuda_linear_lowp_grouped(p, a, x_copy)) return;
#endif
  Backend& be = backend_of(a.x);
  LaneScope lanes(be, a.w.size() > 1);
  for (size_t e = 0; e < a.w.size(); ++e) {
    const int64_t r0 = a.offsets[e], r1 = a.offsets[e + 1];
    if (r0 == r1) continue;
    lanes(int64_t(e));
    Fp8Tiles xe = x_copy.defined() ? x_copy.rows(r0, r1) : Fp8Tiles{};
    linear_lowp(p, {a.x.rows(r0, r1), a.w[e], a.w_scale_inv.empty() ? Tensor() : a.w_scale_inv[e], a.y.rows(r0, r1),
                    a.accumulate},
                &xe);
  }
}

void linear_backward_lowp_grouped(const LinearPrecision& p, const GroupedLinearBackwardArgs& a,
                                  const Fp8Tiles& x_copy) {
  const size_t n = a.w.size();
  DSV3_CHECK(a.dy.ndim() == 2 && a.x.ndim() == 2, "linear_backward_lowp_grouped: dy and x must be [M, N] and [M, K]");
  const int64_t M = a.dy.dim(0);
  DSV3_CHECK(a.offsets.size() == n + 1 && a.offsets.front() == 0 && a.offsets.back() == M && a.dw.size() == n &&
                 (a.w_scale_inv.empty() || a.w_scale_inv.size() == n),
             "linear_backward_lowp_grouped: ", n, " blocks need ", n + 1, " offsets from 0 to ", M, " and ", n,
             " weight gradients");
  check_grouped_copy(p, x_copy, a.x, "linear_backward_lowp_grouped");
  for (size_t e = 0; e < n; ++e) {
    DSV3_CHECK(a.offsets[e] <= a.offsets[e + 1], "linear_backward_lowp_grouped: block ", e, " ends before it starts");
    DSV3_CHECK(present(a.dw[e]) && a.w[e].ndim() == 2 && a.w[e].dim(1) == a.x.dim(1),
               "linear_backward_lowp_grouped: block ", e, " needs its weight gradient and a weight [N, ",
               a.x.dim(1), "]");
    validate(block_backward(a, e), p.mode == LinearPrecisionMode::Bf16);
  }
#ifdef DSV3_HAVE_CUDA
  if (a.dy.device() == Device::CUDA && cuda_linear_backward_lowp_grouped(p, a, x_copy)) return;
#endif
  Backend& be = backend_of(a.dy);
  LaneScope lanes(be, n > 1);
  for (size_t e = 0; e < n; ++e) {
    if (a.offsets[e] == a.offsets[e + 1]) continue;
    lanes(int64_t(e));
    const Fp8Tiles xe = x_copy.defined() ? x_copy.rows(a.offsets[e], a.offsets[e + 1]) : Fp8Tiles{};
    linear_backward_lowp(p, block_backward(a, e), &xe);
  }
}

}  // namespace dsv3
