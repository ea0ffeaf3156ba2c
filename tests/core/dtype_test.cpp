// FP8/BF16/F16 conversions against independently computed OCP/IEEE values.
#include "core/dtype.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

using namespace dsv3;

namespace {

// Reference decoders written from the format definitions with exact powers of two, separate from
// the generic MiniFloat code under test.
double ref_e4m3(uint8_t b) {
  int s = b >> 7, e = (b >> 3) & 0xf, m = b & 7;
  if (e == 15 && m == 7) return NAN;
  double v = e == 0 ? m / 8.0 * std::pow(2.0, -6) : (1 + m / 8.0) * std::pow(2.0, e - 7);
  return s ? -v : v;
}
double ref_e5m2(uint8_t b) {
  int s = b >> 7, e = (b >> 2) & 0x1f, m = b & 3;
  double v;
  if (e == 31) v = m ? NAN : INFINITY;
  else v = e == 0 ? m / 4.0 * std::pow(2.0, -14) : (1 + m / 4.0) * std::pow(2.0, e - 15);
  return s ? -v : v;
}

}  // namespace

TEST(DType, NamesAndSizes) {
  DType t;
  ASSERT_TRUE(parse_dtype("F8_E4M3", &t));
  EXPECT_EQ(t, DType::F8_E4M3);
  EXPECT_EQ(dtype_size(DType::BF16), 2u);
  EXPECT_EQ(dtype_size(DType::I64), 8u);
  EXPECT_FALSE(parse_dtype("F8_E4M3FNUZ", &t));
  EXPECT_STREQ(dtype_name(DType::F8_E5M2), "F8_E5M2");
}

TEST(DType, E4M3AllCodesDecode) {
  for (int b = 0; b < 256; ++b) {
    double want = ref_e4m3(uint8_t(b));
    float got = e4m3_to_float(uint8_t(b));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << b;
      EXPECT_TRUE(b == 0x7f || b == 0xff) << b;
    } else {
      EXPECT_EQ(double(got), want) << "code " << b;
    }
  }
  EXPECT_EQ(e4m3_to_float(0x7e), 448.0f);
  EXPECT_EQ(e4m3_to_float(0x01), std::ldexp(1.0f, -9));
}

TEST(DType, E5M2AllCodesDecode) {
  int nans = 0;
  for (int b = 0; b < 256; ++b) {
    double want = ref_e5m2(uint8_t(b));
    float got = e5m2_to_float(uint8_t(b));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << b;
      ++nans;
    } else {
      EXPECT_EQ(double(got), want) << "code " << b;
    }
  }
  EXPECT_EQ(nans, 6);
  EXPECT_EQ(e5m2_to_float(0x7b), 57344.0f);
  EXPECT_TRUE(std::isinf(e5m2_to_float(0x7c)));
}

// Every finite code round-trips, and every float between two neighbours rounds to the nearer one,
// ties to the even code.
TEST(DType, E4M3RoundTripAndTies) {
  for (int b = 0; b < 256; ++b) {
    float v = e4m3_to_float(uint8_t(b));
    if (std::isnan(v)) continue;
    uint8_t back = float_to_e4m3(v);
    EXPECT_EQ(e4m3_to_float(back), v) << b;  // ±0 both fine
  }
  for (int b = 0; b < 0x7e; ++b) {  // positive neighbours b, b+1
    float lo = e4m3_to_float(uint8_t(b)), hi = e4m3_to_float(uint8_t(b + 1));
    float mid = (lo + hi) / 2;  // exact in float
    uint8_t even = (b % 2 == 0) ? uint8_t(b) : uint8_t(b + 1);
    EXPECT_EQ(float_to_e4m3(mid), even) << "tie between codes " << b << " and " << b + 1;
    EXPECT_EQ(float_to_e4m3(std::nextafter(mid, 0.f)), b);
    EXPECT_EQ(float_to_e4m3(std::nextafter(mid, 1e9f)), b + 1);
    EXPECT_EQ(float_to_e4m3(-mid), uint8_t(even | 0x80));
  }
}

TEST(DType, E4M3SaturationSubnormalsNaN) {
  EXPECT_EQ(float_to_e4m3(448.f), 0x7e);
  EXPECT_EQ(float_to_e4m3(460.f), 0x7e);
  EXPECT_EQ(float_to_e4m3(1e6f), 0x7e);
  EXPECT_EQ(float_to_e4m3(INFINITY), 0x7e);
  EXPECT_EQ(float_to_e4m3(-INFINITY), 0xfe);
  EXPECT_EQ(float_to_e4m3(NAN) & 0x7f, 0x7f);
  // Subnormals: 2^-9 is the smallest; half of it is a tie with 0 → 0 (even).
  EXPECT_EQ(float_to_e4m3(std::ldexp(1.f, -9)), 0x01);
  EXPECT_EQ(float_to_e4m3(std::ldexp(1.f, -10)), 0x00);
  EXPECT_EQ(float_to_e4m3(std::ldexp(1.5f, -10)), 0x01);
  EXPECT_EQ(float_to_e4m3(std::ldexp(3.f, -10)), 0x02);  // tie 1 vs 2 → 2
  EXPECT_EQ(float_to_e4m3(std::ldexp(7.5f, -9)), 0x08);  // tie 7 vs 8 → 8 = min normal
}

TEST(DType, E5M2RoundTripTiesSaturation) {
  for (int b = 0; b < 0x7b; ++b) {
    float lo = e5m2_to_float(uint8_t(b)), hi = e5m2_to_float(uint8_t(b + 1));
    float mid = (lo + hi) / 2;
    uint8_t even = (b % 2 == 0) ? uint8_t(b) : uint8_t(b + 1);
    EXPECT_EQ(float_to_e5m2(mid), even) << b;
    EXPECT_EQ(float_to_e5m2(lo), b);
  }
  EXPECT_EQ(float_to_e5m2(1e9f), 0x7b);
  EXPECT_EQ(float_to_e5m2(INFINITY), 0x7c);
  EXPECT_EQ(float_to_e5m2(-INFINITY), 0xfc);
  EXPECT_TRUE(std::isnan(e5m2_to_float(float_to_e5m2(NAN))));
}

TEST(DType, BF16Ties) {
  // 1 + 2^-8 lies halfway between bf16 1.0 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.f, -8)), 0x3f80);
  // 1 + 3·2^-8 is halfway between 1+2^-7 (odd) and 1+2^-6 (even).
  EXPECT_EQ(float_to_bf16(1.0f + 3 * std::ldexp(1.f, -8)), 0x3f82);
  EXPECT_EQ(float_to_bf16(std::nextafter(1.0f + std::ldexp(1.f, -8), 2.f)), 0x3f81);
  EXPECT_EQ(bf16_to_float(float_to_bf16(3.140625f)), 3.140625f);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(NAN))));
  EXPECT_EQ(float_to_bf16(INFINITY), 0x7f80);
  // The largest float rounds up to Inf under RNE.
  EXPECT_EQ(float_to_bf16(3.4028235e38f), 0x7f80);
}

TEST(DType, F16Exhaustive) {
  for (uint32_t b = 0; b < 0x10000; ++b) {
    uint16_t h = uint16_t(b);
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    double want = e == 31 ? (m ? NAN : INFINITY)
                  : e == 0 ? m * std::pow(2.0, -24)
                           : (1 + m / 1024.0) * std::pow(2.0, e - 15);
    if (h & 0x8000) want = -want;
    float got = f16_to_float(h);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got));
      continue;
    }
    ASSERT_EQ(double(got), want) << h;
    ASSERT_EQ(float_to_f16(got), h) << h;
  }
  EXPECT_EQ(float_to_f16(65520.f), 0x7c00);  // tie with the next step → even → Inf
  EXPECT_EQ(float_to_f16(65519.f), 0x7bff);
}

TEST(DType, BulkConvert) {
  float src[4] = {1.5f, -2.f, 448.f, 0.f};
  uint8_t f8[4];
  convert(src, DType::F32, f8, DType::F8_E4M3, 4);
  float back[4];
  convert(f8, DType::F8_E4M3, back, DType::F32, 4);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(back[i], src[i]);
  int64_t ids[3] = {0, 7, 128814};
  int32_t ids32[3];
  convert(ids, DType::I64, ids32, DType::I32, 3);
  EXPECT_EQ(ids32[2], 128814);
}
