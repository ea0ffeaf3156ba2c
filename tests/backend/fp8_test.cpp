// FP8 quantization and GEMM (backend/fp8.h) against independent double-precision references.
#include <gtest/gtest.h>

#include <cmath>

#include "backend/fp8.h"
#include "backend/tolerance.h"
#include "core/error.h"
#include "harness.h"

namespace dsv3::test {
namespace {

uint8_t* u8(const Tensor& t) { return static_cast<uint8_t*>(const_cast<Tensor&>(t).raw()); }
int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Q {
  Tensor q, s;
};
Q quantize(const Tensor& x, Fp8Tiling t, bool pow2, bool transpose = false) {
  int64_t M = x.dim(0), K = x.dim(1);
  int64_t th = t == Fp8Tiling::Row1x128 ? 1 : 128, tw = t == Fp8Tiling::Col128x1 ? 1 : 128;
  int64_t g0 = cdiv(M, th), g1 = cdiv(K, tw);
  Q o{Tensor::empty(DType::F8_E4M3, transpose ? Shape{K, M} : Shape{M, K}),
      Tensor::empty(DType::F32, transpose ? Shape{g1, g0} : Shape{g0, g1})};
  QuantizeFp8Args a;
  a.x = x;
  a.tiling = t;
  a.pow2_scale = pow2;
  a.transpose_out = transpose;
  a.q = o.q;
  a.scale = o.s;
  quantize_fp8(a);
  return o;
}

// Half the E4M3 spacing at |v| (v already scaled, |v| ≤ 448): 2^(e−3)/2 for normals, 2^-10 below 2^-6.
double half_step(double v) {
  double a = std::fabs(v);
  if (a < 0x1p-6) return 0x1p-10;
  return std::ldexp(1.0, int(std::floor(std::log2(a))) - 4);
}

// Values spanning many binades, so tiles have very different amax.
Tensor wide(int64_t M, int64_t K, uint64_t seed) {
  Tensor x = randn({M, K}, seed, 1);
  for (int64_t i = 0; i < M * K; ++i)
    x.data<float>()[i] *= std::ldexp(1.0f, int(rng_u64(seed, 2, uint64_t(i)) % 24) - 12);
  return x;
}

const Fp8Tiling kTilings[] = {Fp8Tiling::Row1x128, Fp8Tiling::Col128x1, Fp8Tiling::Block128x128};

TEST(Fp8Quantize, ErrorWithinHalfStepAndScaleIsAmaxOver448) {
  const int64_t M = 130, K = 300;  // edge tiles in both dims
  Tensor x = wide(M, K, 7);
  for (Fp8Tiling t : kTilings)
    for (bool pow2 : {false, true}) {
      SCOPED_TRACE(std::string(fp8_tiling_name(t)) + (pow2 ? " pow2" : ""));
      Q o = quantize(x, t, pow2);
      int64_t th = t == Fp8Tiling::Row1x128 ? 1 : 128, tw = t == Fp8Tiling::Col128x1 ? 1 : 128;
      // Independent amax per tile.
      std::vector<double> amax(size_t(o.s.numel()), 0.0);
      for (int64_t r = 0; r < M; ++r)
        for (int64_t k = 0; k < K; ++k) {
          double& m = amax[size_t((r / th) * o.s.dim(1) + k / tw)];
          m = std::max(m, double(std::fabs(x.data<float>()[r * K + k])));
        }
      for (int64_t g = 0; g < o.s.numel(); ++g) {
        float s = o.s.data<float>()[g];
        if (!pow2) {
          ASSERT_EQ(s, float(amax[size_t(g)]) / 448.0f);
        } else {
          int e;
          ASSERT_EQ(std::frexp(s, &e), 0.5f) << "not a power of two: " << s;
          ASSERT_LE(amax[size_t(g)] / s, 448.0);
          ASSERT_GT(amax[size_t(g)] / s, 224.0);
        }
      }
      double worst = 0;
      for (int64_t r = 0; r < M; ++r)
        for (int64_t k = 0; k < K; ++k) {
          float s = o.s.data<float>()[(r / th) * o.s.dim(1) + k / tw];
          double v = double(x.data<float>()[r * K + k] / s);  // the scaled value the op rounds
          double got = e4m3_to_float(u8(o.q)[r * K + k]);
          worst = std::max(worst, std::fabs(got - v) / half_step(v));
        }
      EXPECT_LE(worst, 1.0);
      EXPECT_GT(worst, 0.5);  // the data are not all representable: rounding did happen
    }
}

TEST(Fp8Quantize, RepresentableValuesComeBackExactly) {
  // Each 1×128 tile holds E4M3 values times 2^e with ±448·2^e present, so amax/448 = 2^e exactly.
  const int64_t M = 3, K = 256;
  Tensor x = Tensor::empty(DType::F32, {M, K});
  for (int64_t r = 0; r < M; ++r)
    for (int64_t k = 0; k < K; ++k) {
      int e = int(r) * 5 - 6 + int(k / 128);
      uint8_t code = uint8_t(rng_u64(3, 0, uint64_t(r * K + k)) % 0x7F);  // any finite E4M3 code
      if (rng_u64(3, 1, uint64_t(r * K + k)) & 1) code |= 0x80;
      float v = k % 128 == 5 ? 448.0f : e4m3_to_float(code);
      x.data<float>()[r * K + k] = std::ldexp(v, e);
    }
  for (bool pow2 : {false, true}) {
    Q o = quantize(x, Fp8Tiling::Row1x128, pow2);
    Tensor back = Tensor::empty(DType::F32, {M, K});
    dequantize_fp8(o.q, o.s, back);
    for (int64_t i = 0; i < M * K; ++i) ASSERT_EQ(back.data<float>()[i], x.data<float>()[i]) << i;
  }
}

TEST(Fp8Quantize, AllZeroTileHasScaleOneAndZeros) {
  Tensor x = randn({2, 256}, 1, 1);
  for (int64_t k = 128; k < 256; ++k) x.data<float>()[256 + k] = 0.0f;  // row 1, second tile
  Q o = quantize(x, Fp8Tiling::Row1x128, false);
  EXPECT_EQ(o.s.data<float>()[3], 1.0f);
  for (int64_t k = 128; k < 256; ++k) EXPECT_EQ(u8(o.q)[256 + k], 0u);
  EXPECT_NE(o.s.data<float>()[2], 1.0f);
}

TEST(Fp8Quantize, NonFiniteThrowsNamingTheTensorOrIsReported) {
  Tensor x = randn({4, 200}, 2, 1);
  x.data<float>()[1 * 200 + 7] = INFINITY;
  x.data<float>()[2 * 200 + 150] = -INFINITY;
  x.data<float>()[3 * 200 + 3] = NAN;
  Tensor q = Tensor::empty(DType::F8_E4M3, {4, 200}), s = Tensor::empty(DType::F32, {4, 2});
  QuantizeFp8Args a;
  a.x = x;
  a.q = q;
  a.scale = s;
  a.name = "layer 3 o_proj input";
  try {
    quantize_fp8(a);
    FAIL() << "no error";
  } catch (const InputError& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("layer 3 o_proj input"), std::string::npos) << m;
    EXPECT_NE(m.find("3 non-finite"), std::string::npos) << m;
    EXPECT_NE(m.find("[1, 7]"), std::string::npos) << m;
  }
  a.on_nonfinite = NonFinitePolicy::Report;
  EXPECT_EQ(quantize_fp8(a).nonfinite, 3);
  // Saturation: ±Inf → ±448, NaN → 0x7F; the finite values set the scale.
  EXPECT_EQ(u8(q)[1 * 200 + 7], 0x7E);
  EXPECT_EQ(u8(q)[2 * 200 + 150], 0xFE);
  EXPECT_EQ(u8(q)[3 * 200 + 3], 0x7F);
  EXPECT_TRUE(std::isfinite(s.data<float>()[2]));
}

TEST(Fp8Quantize, TransposedOutputIsTheTransposeOfTheTiles) {
  Tensor x = wide(150, 140, 4);
  for (Fp8Tiling t : kTilings) {
    Q a = quantize(x, t, false), b = quantize(x, t, false, true);
    for (int64_t r = 0; r < 150; ++r)
      for (int64_t k = 0; k < 140; ++k) ASSERT_EQ(u8(a.q)[r * 140 + k], u8(b.q)[k * 150 + r]);
    int64_t g0 = a.s.dim(0), g1 = a.s.dim(1);
    for (int64_t i = 0; i < g0; ++i)
      for (int64_t j = 0; j < g1; ++j) ASSERT_EQ(a.s.data<float>()[i * g1 + j], b.s.data<float>()[j * g0 + i]);
  }
}

// Double reference of the dequantized operands: c = Σ_k (qa·sa)(qb·sb), and Σ|terms| for the bound.
void reference(const Q& a, const Q& b, Vec* c, Vec* absum) {
  int64_t M = a.q.dim(0), K = a.q.dim(1), N = b.q.dim(0);
  Tensor da = Tensor::empty(DType::F32, {M, K}), db = Tensor::empty(DType::F32, {N, K});
  dequantize_fp8(a.q, a.s, da);
  dequantize_fp8(b.q, b.s, db);
  c->assign(size_t(M * N), 0.0);
  absum->assign(size_t(M * N), 0.0);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j)
      for (int64_t k = 0; k < K; ++k) {
        double t = double(da.data<float>()[i * K + k]) * double(db.data<float>()[j * K + k]);
        (*c)[size_t(i * N + j)] += t;
        (*absum)[size_t(i * N + j)] += std::fabs(t);
      }
}

TEST(Fp8Gemm, EqualsDoubleReferenceOfDequantizedOperandsWithinFp32SumError) {
  const int64_t M = 70, N = 200, K = 300;
  Tensor x = wide(M, K, 11), w = randn({N, K}, 12, 1, 0.05f);
  struct Case {
    Fp8Tiling ta, tb;
  } cases[] = {{Fp8Tiling::Row1x128, Fp8Tiling::Block128x128},
               {Fp8Tiling::Block128x128, Fp8Tiling::Row1x128},
               {Fp8Tiling::Row1x128, Fp8Tiling::Row1x128}};
  for (const Case& cs : cases) {
    Q a = quantize(x, cs.ta, false), b = quantize(w, cs.tb, false);
    Vec ref, absum;
    reference(a, b, &ref, &absum);
    Tensor c = Tensor::empty(DType::F32, {M, N});
    Fp8GemmArgs g;
    g.a = a.q;
    g.a_scale = a.s;
    g.b = b.q;
    g.b_scale = b.s;
    g.c = c;
    fp8_gemm(g);
    // Worst-case FP32 bound: ≤ 128 sums in a chunk, ceil(K/128) chunk additions, and 2 roundings in
    // applying the scales (the scales' own product rounds once, the dequantized reference does not).
    const double u = 0x1p-24, gamma = (128 + cdiv(K, 128) + 4) * u;
    double worst = 0, biggest = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      worst = std::max(worst, std::fabs(c.data<float>()[i] - ref[i]) / (gamma * absum[i]));
      biggest = std::max(biggest, std::fabs(ref[i]));
    }
    EXPECT_LE(worst, 1.0);
    EXPECT_GT(biggest, 0.0);
    // BF16 output: one RNE rounding of the same FP32 result; accumulate adds in FP32 first.
    Tensor cb = Tensor::empty(DType::BF16, {M, N});
    g.c = cb;
    fp8_gemm(g);
    for (int64_t i = 0; i < M * N; ++i)
      ASSERT_EQ(reinterpret_cast<uint16_t*>(cb.raw())[i], float_to_bf16(c.data<float>()[i]));
    g.c = c;
    g.accumulate = true;
    Tensor before = c.clone();
    fp8_gemm(g);
    for (int64_t i = 0; i < M * N; ++i) ASSERT_EQ(c.data<float>()[i], 2 * before.data<float>()[i]);
  }
}

TEST(Fp8Gemm, LimitedAccumulationTruncatesAsSpecified) {
  // One group: products 8 and 2^-4 with scale 1. With 4 significant bits the lsb at exponent 4
  // (8 ∈ [2^3, 2^4)) is 2^0, so 2^-4 is chopped away; with 14 bits it survives.
  Tensor a = Tensor::empty(DType::F8_E4M3, {1, 2}), b = Tensor::empty(DType::F8_E4M3, {1, 2});
  u8(a)[0] = float_to_e4m3(8.0f);
  u8(a)[1] = float_to_e4m3(0.0625f);
  u8(b)[0] = u8(b)[1] = float_to_e4m3(1.0f);
  Tensor s = Tensor::empty(DType::F32, {1, 1});
  s.data<float>()[0] = 1.0f;
  Tensor c = Tensor::empty(DType::F32, {1, 1});
  Fp8GemmArgs g{a, s, b, s, c};
  g.accum = Fp8Accum::Limited;
  g.acc_bits = 4;
  fp8_gemm(g);
  EXPECT_EQ(c.data<float>()[0], 8.0f);
  g.acc_bits = 14;
  fp8_gemm(g);
  EXPECT_EQ(c.data<float>()[0], 8.0625f);
}

TEST(Fp8Gemm, PromotionEveryNcRemovesTheLimitedAccumulationError) {
  const int64_t M = 8, N = 8, K = 4096;
  Tensor x = randn({M, K}, 21, 1), w = randn({N, K}, 22, 1);
  Q a = quantize(x, Fp8Tiling::Row1x128, true), b = quantize(w, Fp8Tiling::Row1x128, true);
  Vec ref, absum;
  reference(a, b, &ref, &absum);
  auto err = [&](Fp8Accum acc, int64_t promote) {
    Tensor c = Tensor::empty(DType::F32, {M, N});
    Fp8GemmArgs g{a.q, a.s, b.q, b.s, c};
    g.accum = acc;
    g.promote_every = promote;
    fp8_gemm(g);
    double e = 0, m = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      e = std::max(e, std::fabs(c.data<float>()[i] - ref[i]));
      m = std::max(m, std::fabs(ref[i]));
    }
    return e / m;
  };
  double exact = err(Fp8Accum::Fp32, 0), none = err(Fp8Accum::Limited, 0), nc = err(Fp8Accum::Limited, 128);
  EXPECT_LT(exact, tol::kF32);
  EXPECT_GT(none, 10 * nc);  // promotion is what fixes it
  EXPECT_GT(none, 1e-3);
}

TEST(Fp8Gemm, BadScaleGridIsAnInternalError) {
  Tensor a = Tensor::zeros(DType::F8_E4M3, {4, 256}), s = Tensor::zeros(DType::F32, {4, 3});
  Tensor c = Tensor::empty(DType::F32, {4, 4});
  EXPECT_THROW(fp8_gemm({a, s, a, s, c}), InternalError);
}

double cos_diff(const Tensor& x, const Tensor& y) {
  double xy = 0, xx = 0, yy = 0;
  for (int64_t i = 0; i < x.numel(); ++i) {
    double a = x.data<float>()[i], b = y.data<float>()[i];
    xy += a * b, xx += a * a, yy += b * b;
  }
  return 1 - 2 * xy / (xx + yy);
}

TEST(Fp8Linear, ThreeGemmsCloseToFp32AndNegativeControlWorse) {
  const int64_t M = 256, K = 384, N = 200;
  Tensor x = randn({M, K}, 31, 1), w = randn({N, K}, 32, 1, 0.05f), dy = randn({M, N}, 33, 1);
  // Outlier tokens (10^5×): a 128×128 block scale pushes the other tokens below E4M3's range.
  for (int64_t r = 0; r < M; ++r)
    if (r % 17 == 0)
      for (int64_t n = 0; n < N; ++n) dy.data<float>()[r * N + n] *= 1e5f;
  auto run = [&](LinearPrecision p, Tensor& y, Tensor& dx, Tensor& dw) {
    y = Tensor::empty(DType::F32, {M, N});
    dx = Tensor::empty(DType::F32, {M, K});
    dw = Tensor::zeros(DType::F32, {N, K});
    linear_lowp(p, {x, w, Tensor(), y});
    LinearBackwardArgs b;
    b.dy = dy, b.x = x, b.w = w, b.dx = dx, b.dw = dw;
    linear_backward_lowp(p, b);
  };
  Tensor y0, dx0, dw0, y1, dx1, dw1, y2, dx2, dw2;
  run({}, y0, dx0, dw0);
  run({LinearPrecisionMode::Fp8}, y1, dx1, dw1);
  run({LinearPrecisionMode::Fp8, false, true}, y2, dx2, dw2);
  EXPECT_LT(cos_diff(y0, y1), tol::kFp8CosDiff);
  EXPECT_LT(cos_diff(dx0, dx1), tol::kFp8CosDiff);
  EXPECT_LT(cos_diff(dw0, dw1), tol::kFp8CosDiff);
  // The small-magnitude tokens' input gradients lose most of their bits under 128×128 blocks.
  auto rel_small_rows = [&](const Tensor& got) {
    double e = 0, m = 0;
    for (int64_t r = 0; r < M; ++r)
      if (r % 17 != 0)
        for (int64_t k = 0; k < K; ++k) {
          e += std::pow(got.data<float>()[r * K + k] - dx0.data<float>()[r * K + k], 2);
          m += std::pow(dx0.data<float>()[r * K + k], 2);
        }
    return std::sqrt(e / m);
  };
  EXPECT_GT(rel_small_rows(dx2), 5 * rel_small_rows(dx1));
  Tensor bad = x.clone();
  bad.data<float>()[5] = NAN;
  Tensor y = Tensor::empty(DType::F32, {M, N});
  linear_lowp({LinearPrecisionMode::Fp8}, {bad, w, Tensor(), y});  // NaN in → NaN out, no exception
  for (int64_t i = 0; i < M * N; ++i) ASSERT_TRUE(std::isnan(y.data<float>()[i])) << i;
}

TEST(Fp8Linear, Bf16RoundsOperandsOnly) {
  Tensor x = randn({3, 5}, 41, 1), w = randn({4, 5}, 42, 1), y = Tensor::empty(DType::F32, {3, 4});
  linear_lowp({LinearPrecisionMode::Bf16}, {x, w, Tensor(), y});
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t j = 0; j < 4; ++j) {
      double ref = 0;
      for (int64_t k = 0; k < 5; ++k)
        ref += double(bf16_to_float(float_to_bf16(x.data<float>()[i * 5 + k]))) *
               bf16_to_float(float_to_bf16(w.data<float>()[j * 5 + k]));
      EXPECT_NEAR(y.data<float>()[i * 4 + j], ref, 1e-5 * (1 + std::fabs(ref)));
    }
}

// A cached copy of x made in another precision than the layer runs in (a forward in bf16, its
// backward in fp8) is refused, naming the caller, before any GEMM reads it; the grouped experts'
// call checks its copy as linear_forward does.
TEST(Fp8Linear, CopyOfAnotherPrecisionIsRefused) {
  const Tensor x = randn({4, 128}, 43, 1), w = randn({8, 128}, 44, 1), y = Tensor::empty(DType::F32, {4, 8});
  const Fp8Tiles bf16_copy{x.to(DType::BF16), Tensor(), 0}, fp8_copy = fp8_tiles(x, false, "x");
  const LinearPrecision fp8{LinearPrecisionMode::Fp8}, bf16{LinearPrecisionMode::Bf16};
  EXPECT_NO_THROW(check_lowp_copy(fp8, &fp8_copy, "t"));
  EXPECT_NO_THROW(check_lowp_copy(bf16, &bf16_copy, "t"));
  EXPECT_NO_THROW(check_lowp_copy(fp8, nullptr, "t"));
  EXPECT_THROW(check_lowp_copy(fp8, &bf16_copy, "t"), InternalError);
  EXPECT_THROW(check_lowp_copy(bf16, &fp8_copy, "t"), InternalError);
  const int64_t offsets[] = {0, 1, 4};
  const Tensor ws[] = {w, w};
  try {
    linear_lowp_grouped(fp8, {x, ws, {}, offsets, y, false}, bf16_copy);
    ADD_FAILURE() << "a BF16 copy reached the Fp8 GEMMs";
  } catch (const InternalError& e) {
    EXPECT_NE(std::string(e.what()).find("linear_lowp_grouped"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace dsv3::test
