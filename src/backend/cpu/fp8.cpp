// CPU FP8: tile quantization to E4M3, dequantization, and the block-scaled GEMM (exact FP32 and the
// limited-precision accumulation emulation). Semantics in backend/fp8.h.
#include <omp.h>

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/fp8.h"
#include "core/error.h"

namespace dsv3 {
namespace {

const std::array<float, 256>& e4m3_lut() {
  static const std::array<float, 256> lut = [] {
    std::array<float, 256> l{};
    for (int i = 0; i < 256; ++i) l[size_t(i)] = e4m3_to_float(uint8_t(i));
    return l;
  }();
  return lut;
}

int64_t ceil128(int64_t n) { return (n + kFp8Block - 1) / kFp8Block; }

float scale_of(float amax, bool pow2) {
  if (amax == 0.0f) return 1.0f;
  float s = amax / kE4M3Max;
  if (s == 0.0f) s = FLT_TRUE_MIN;
  if (pow2) {
    int e;
    float m = std::frexp(s, &e);  // s = m·2^e, m in [0.5, 1)
    s = std::ldexp(1.0f, m == 0.5f ? e - 1 : e);
  }
  return s;
}

// Tile geometry of a tiling: row-block height and column-group width.
void tile_dims(Fp8Tiling t, int64_t* th, int64_t* tw) {
  *th = t == Fp8Tiling::Row1x128 ? 1 : kFp8Block;
  *tw = t == Fp8Tiling::Col128x1 ? 1 : kFp8Block;
}

// The scale grid of an operand [R, C] from the scale's shape: per row / per block / per column.
struct Grid {
  int64_t th = 1, tw = kFp8Block;
};
Grid grid_of(int64_t R, int64_t C, const Tensor& scale, const char* what) {
  int64_t g0 = scale.dim(0), g1 = scale.dim(1);
  if (g0 == R && g1 == ceil128(C)) return {1, kFp8Block};
  if (g0 == ceil128(R) && g1 == ceil128(C)) return {kFp8Block, kFp8Block};
  if (g0 == ceil128(R) && g1 == C) return {kFp8Block, 1};
  throw InternalError(cat(what, ": scale grid [", g0, ", ", g1, "] fits no FP8 tiling of [", R, ", ", C, "]"));
}

}  // namespace

Fp8Status quantize_fp8(const QuantizeFp8Args& a) {
  validate(a);
  int64_t K = cpu::last_dim(a.x), M = cpu::rows_of(a.x);
  int64_t th, tw;
  tile_dims(a.tiling, &th, &tw);
  int64_t nrb = (M + th - 1) / th, ng = (K + tw - 1) / tw;
  const float* x = a.x.data<float>();
  uint8_t* q = static_cast<uint8_t*>(const_cast<Tensor&>(a.q).raw());
  float* sc = cpu::mut<float>(a.scale);
  int64_t bad = 0, first_bad = -1;
#pragma omp parallel for schedule(static) reduction(+ : bad) if (M * K >= cpu::kParallelMin)
  for (int64_t rb = 0; rb < nrb; ++rb) {
    int64_t r0 = rb * th, r1 = std::min(M, r0 + th);
    std::vector<float> amax(size_t(ng), 0.0f);
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t k = 0; k < K; ++k) {
        float v = x[r * K + k];
        if (!std::isfinite(v)) {
          ++bad;
#pragma omp critical(dsv3_fp8_first_bad)
          if (first_bad < 0 || r * K + k < first_bad) first_bad = r * K + k;
          continue;
        }
        float& m = amax[size_t(k / tw)];
        m = std::max(m, std::fabs(v));
      }
    std::vector<float> s(static_cast<size_t>(ng));
    for (int64_t g = 0; g < ng; ++g) {
      s[size_t(g)] = scale_of(amax[size_t(g)], a.pow2_scale);
      if (a.transpose_out)
        sc[g * nrb + rb] = s[size_t(g)];
      else
        sc[rb * ng + g] = s[size_t(g)];
    }
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t k = 0; k < K; ++k) {
        uint8_t v = float_to_e4m3(x[r * K + k] / s[size_t(k / tw)]);
        if (a.transpose_out)
          q[k * M + r] = v;
        else
          q[r * K + k] = v;
      }
  }
  if (bad > 0 && a.on_nonfinite == NonFinitePolicy::Throw)
    input_error("FP8 quantization of ", a.name, ": ", bad, " non-finite value(s) (NaN or Inf), first at element [",
                first_bad / K, ", ", first_bad % K, "] of [", M, ", ", K, "]; expected finite values");
  return {bad};
}

void dequantize_fp8(const Tensor& q, const Tensor& scale, const Tensor& out) {
  DSV3_CHECK(q.dtype() == DType::F8_E4M3 && q.ndim() == 2 && scale.dtype() == DType::F32 && scale.ndim() == 2 &&
                 out.dtype() == DType::F32 && out.numel() == q.numel(),
             "dequantize_fp8: q must be F8_E4M3 [R, C], scale F32 2-D, out F32 with q's size");
  int64_t R = q.dim(0), C = q.dim(1);
  Grid g = grid_of(R, C, scale, "dequantize_fp8");
  const auto& lut = e4m3_lut();
  const uint8_t* qp = static_cast<const uint8_t*>(q.raw());
  const float* sp = scale.data<float>();
  float* o = cpu::mut<float>(out);
  int64_t g1 = scale.dim(1);
#pragma omp parallel for schedule(static) if (R * C >= cpu::kParallelMin)
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) o[r * C + c] = lut[qp[r * C + c]] * sp[(r / g.th) * g1 + c / g.tw];
}

namespace {

// Truncate v toward zero to a multiple of 2^lsb_exp.
double chop(double v, int lsb_exp) {
  double u = std::ldexp(1.0, lsb_exp);
  return std::trunc(v / u) * u;
}
// Exponent e with |v| in [2^(e-1), 2^e) (frexp's), or INT_MIN for 0.
int exp_of(double v) {
  if (v == 0.0) return INT32_MIN;
  int e;
  std::frexp(v, &e);
  return e;
}

// One output of the limited-precision emulation: dot of two FP32 rows of scaled products.
float limited_dot(const float* a, const float* b, const float* sa, const float* sb, int64_t K, int bits,
                  int64_t promote, bool acc_aligned) {
  constexpr int64_t kGroup = 32;
  float fp32 = 0.0f;
  double acc = 0.0;  // holds a value with at most `bits` significant bits
  std::array<double, kGroup> p{};
  for (int64_t k0 = 0; k0 < K; k0 += kGroup) {
    int64_t n = std::min(kGroup, K - k0);
    int emax = acc_aligned ? exp_of(acc) : INT32_MIN;
    for (int64_t i = 0; i < n; ++i) {
      int64_t k = k0 + i;
      p[size_t(i)] = double(a[k] * b[k] * (sa[k / kFp8Block] * sb[k / kFp8Block]));
      emax = std::max(emax, exp_of(p[size_t(i)]));
    }
    if (emax != INT32_MIN) {
      int lsb = emax - bits;
      double s = acc_aligned ? chop(acc, lsb) : acc;
      for (int64_t i = 0; i < n; ++i) s += chop(p[size_t(i)], lsb);
      acc = s == 0.0 ? 0.0 : chop(s, exp_of(s) - bits);
    }
    if (promote > 0 && (k0 + n) % promote == 0) {
      fp32 += float(acc);
      acc = 0.0;
    }
  }
  return fp32 + float(acc);
}

}  // namespace

void fp8_gemm(const Fp8GemmArgs& g) {
  validate(g);
  int64_t M = g.a.dim(0), K = g.a.dim(1), N = g.b.dim(0), nk = ceil128(K);
  Grid ga = grid_of(M, K, g.a_scale, "fp8_gemm a"), gb = grid_of(N, K, g.b_scale, "fp8_gemm b");
  const auto& lut = e4m3_lut();
  // The E4M3 values as FP32 (exact), unscaled.
  std::vector<float> af(size_t(M * K)), bf(size_t(N * K));
  const uint8_t* qa = static_cast<const uint8_t*>(g.a.raw());
  const uint8_t* qb = static_cast<const uint8_t*>(g.b.raw());
  for (int64_t i = 0; i < M * K; ++i) af[size_t(i)] = lut[qa[i]];
  for (int64_t i = 0; i < N * K; ++i) bf[size_t(i)] = lut[qb[i]];
  const float* sa = g.a_scale.data<float>();
  const float* sb = g.b_scale.data<float>();
  std::vector<float> acc(size_t(M * N), 0.0f);
  if (g.accum == Fp8Accum::Fp32) {
    std::vector<float> part(size_t(M * N));
    for (int64_t c = 0; c < nk; ++c) {
      int64_t k0 = c * kFp8Block, kn = std::min(kFp8Block, K - k0);
      // Products of E4M3 values are exact in FP32; the chunk's sums are FP32 (OpenBLAS's order).
      cpu::sgemm(false, true, M, N, kn, 1.0f, af.data() + k0, K, bf.data() + k0, K, 0.0f, part.data(), N);
#pragma omp parallel for schedule(static) if (M * N >= cpu::kParallelMin)
      for (int64_t i = 0; i < M; ++i) {
        float s_a = sa[(i / ga.th) * nk + c];
        for (int64_t j = 0; j < N; ++j)
          acc[size_t(i * N + j)] += part[size_t(i * N + j)] * (s_a * sb[(j / gb.th) * nk + c]);
      }
    }
  } else {
#pragma omp parallel for schedule(dynamic) if (M * N * K >= cpu::kParallelMin)
    for (int64_t i = 0; i < M; ++i) {
      const float* sar = sa + (i / ga.th) * nk;
      for (int64_t j = 0; j < N; ++j)
        acc[size_t(i * N + j)] = limited_dot(af.data() + i * K, bf.data() + j * K, sar, sb + (j / gb.th) * nk, K,
                                             g.acc_bits, g.promote_every, g.acc_in_alignment);
    }
  }
  if (g.c.dtype() == DType::F32) {
    float* c = cpu::mut<float>(g.c);
    for (int64_t i = 0; i < M * N; ++i) c[i] = g.accumulate ? c[i] + acc[size_t(i)] : acc[size_t(i)];
  } else {
    uint16_t* c = reinterpret_cast<uint16_t*>(cpu::mut<bf16>(g.c));
    for (int64_t i = 0; i < M * N; ++i)
      c[i] = float_to_bf16(g.accumulate ? bf16_to_float(c[i]) + acc[size_t(i)] : acc[size_t(i)]);
  }
}

}  // namespace dsv3
