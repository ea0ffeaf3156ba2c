#include "core/dtype.h"

#include <cmath>
#include <cstring>

#include "core/error.h"

namespace dsv3 {

namespace {

struct Info {
  DType t;
  const char* name;
  size_t size;
  bool is_float;
};
constexpr Info kInfo[] = {
    {DType::F32, "F32", 4, true},          {DType::F64, "F64", 8, true},
    {DType::BF16, "BF16", 2, true},        {DType::F16, "F16", 2, true},
    {DType::F8_E4M3, "F8_E4M3", 1, true},  {DType::F8_E5M2, "F8_E5M2", 1, true},
    {DType::I64, "I64", 8, false},         {DType::I32, "I32", 4, false},
    {DType::U8, "U8", 1, false},
};

const Info& info(DType t) {
  size_t i = size_t(t);
  DSV3_CHECK(i < sizeof(kInfo) / sizeof(kInfo[0]), "bad dtype ", i);
  return kInfo[i];
}

// A small binary float format with E exponent bits, M mantissa bits and bias 2^(E-1)-1.
// `ieee`: the all-ones exponent encodes Inf/NaN; otherwise (E4M3 "fn") only all-ones is NaN.
struct MiniFloat {
  int E, M;
  bool ieee;
  int bias() const { return (1 << (E - 1)) - 1; }
  int emin() const { return 1 - bias(); }
  double max_finite() const {
    int emax = ieee ? (1 << E) - 2 - bias() : (1 << E) - 1 - bias();
    double mant = ieee ? 2.0 - std::ldexp(1.0, -M) : 2.0 - std::ldexp(2.0, -M);  // fn: mantissa 110
    return std::ldexp(mant, emax);
  }

  double decode(uint32_t bits) const {
    uint32_t sign = bits >> (E + M) & 1u;
    uint32_t exp = bits >> M & ((1u << E) - 1);
    uint32_t man = bits & ((1u << M) - 1);
    double v;
    if (ieee && exp == (1u << E) - 1) {
      v = man ? NAN : INFINITY;
    } else if (!ieee && exp == (1u << E) - 1 && man == (1u << M) - 1) {
      v = NAN;
    } else if (exp == 0) {
      v = std::ldexp(double(man), emin() - M);
    } else {
      v = std::ldexp(double(man | (1u << M)), int(exp) - bias() - M);
    }
    return sign ? -v : v;
  }

  // Round |x| to the nearest representable value (ties to even), returning the magnitude code.
  // `saturate`: finite overflow clamps to the largest finite value, else becomes Inf (IEEE).
  uint32_t encode(float x, bool saturate, uint32_t nan_code) const {
    uint32_t sign = std::signbit(x) ? 1u << (E + M) : 0u;
    if (std::isnan(x)) return nan_code;
    double a = std::fabs(double(x));
    uint32_t inf_code = ((1u << E) - 1) << M;
    uint32_t max_code = ieee ? inf_code - 1 : inf_code | ((1u << M) - 2);
    if (std::isinf(a)) return sign | (ieee && !saturate ? inf_code : max_code);
    int e;
    std::frexp(a, &e);  // a = f·2^e with f in [0.5, 1)
    int ex = e - 1;     // a in [2^ex, 2^(ex+1))
    if (ex < emin()) ex = emin();
    double q = std::nearbyint(std::ldexp(a, M - ex));  // default rounding mode is to-nearest-even
    double v = std::ldexp(q, ex - M);
    if (v > max_finite()) {
      // Values between max and the next (unrepresentable) step round down to max when they are
      // closer to it; otherwise they overflow.
      double step = std::ldexp(1.0, ilogb_(max_finite()) - M);
      bool to_max = a < max_finite() + step / 2 || (a == max_finite() + step / 2 && ((max_code & 1u) == 0));
      if (to_max || saturate) return sign | max_code;
      return sign | inf_code;
    }
    if (v < std::ldexp(1.0, emin())) return sign | uint32_t(q);  // subnormal (q == 2^M is min normal)
    int ev = ilogb_(v);
    uint32_t man = uint32_t(std::ldexp(v, M - ev)) - (1u << M);
    return sign | uint32_t(ev + bias()) << M | man;
  }
  static int ilogb_(double v) { return std::ilogb(v); }
};

constexpr MiniFloat kE4M3{4, 3, false};
constexpr MiniFloat kE5M2{5, 2, true};
constexpr MiniFloat kF16{5, 10, true};

}  // namespace

size_t dtype_size(DType t) { return info(t).size; }
const char* dtype_name(DType t) { return info(t).name; }
bool is_float(DType t) { return info(t).is_float; }

bool parse_dtype(std::string_view name, DType* out) {
  for (const Info& i : kInfo)
    if (name == i.name) {
      *out = i.t;
      return true;
    }
  return false;
}

std::string dtype_list() {
  std::string s;
  for (const Info& i : kInfo) s += (s.empty() ? "" : ", ") + std::string(i.name);
  return s;
}

float f16_to_float(uint16_t h) { return float(kF16.decode(h)); }
uint16_t float_to_f16(float f) { return uint16_t(kF16.encode(f, false, 0x7e00u)); }
float e4m3_to_float(uint8_t b) { return float(kE4M3.decode(b)); }
uint8_t float_to_e4m3(float f) {
  return uint8_t(kE4M3.encode(f, true, std::signbit(f) ? 0xffu : 0x7fu));
}
float e5m2_to_float(uint8_t b) { return float(kE5M2.decode(b)); }
uint8_t float_to_e5m2(float f) {
  if (std::isinf(f)) return f > 0 ? 0x7c : 0xfc;
  return uint8_t(kE5M2.encode(f, true, 0x7eu));
}

float load_as_float(const void* data, DType t, size_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(data)[i];
    case DType::F64: return float(static_cast<const double*>(data)[i]);
    case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(data)[i]);
    case DType::F16: return f16_to_float(static_cast<const uint16_t*>(data)[i]);
    case DType::F8_E4M3: return e4m3_to_float(static_cast<const uint8_t*>(data)[i]);
    case DType::F8_E5M2: return e5m2_to_float(static_cast<const uint8_t*>(data)[i]);
    case DType::I64: return float(static_cast<const int64_t*>(data)[i]);
    case DType::I32: return float(static_cast<const int32_t*>(data)[i]);
    case DType::U8: return float(static_cast<const uint8_t*>(data)[i]);
  }
  internal_error("load_as_float: bad dtype");
}

namespace {

template <class Dst, class Src>
void int_copy(const void* s, void* d, size_t n) {
  const Src* a = static_cast<const Src*>(s);
  Dst* b = static_cast<Dst*>(d);
  for (size_t i = 0; i < n; ++i) b[i] = Dst(a[i]);
}

void store_float(float v, void* dst, DType t, size_t i) {
  switch (t) {
    case DType::F32: static_cast<float*>(dst)[i] = v; return;
    case DType::F64: static_cast<double*>(dst)[i] = v; return;
    case DType::BF16: static_cast<uint16_t*>(dst)[i] = float_to_bf16(v); return;
    case DType::F16: static_cast<uint16_t*>(dst)[i] = float_to_f16(v); return;
    case DType::F8_E4M3: static_cast<uint8_t*>(dst)[i] = float_to_e4m3(v); return;
    case DType::F8_E5M2: static_cast<uint8_t*>(dst)[i] = float_to_e5m2(v); return;
    case DType::I64: static_cast<int64_t*>(dst)[i] = int64_t(v); return;
    case DType::I32: static_cast<int32_t*>(dst)[i] = int32_t(v); return;
    case DType::U8: static_cast<uint8_t*>(dst)[i] = uint8_t(v); return;
  }
}

}  // namespace

void convert(const void* src, DType st, void* dst, DType dt, size_t n) {
  if (st == dt) {
    std::memcpy(dst, src, n * dtype_size(st));
    return;
  }
  if (st == DType::F64 && dt == DType::F32) {
    int_copy<float, double>(src, dst, n);
    return;
  }
  if (st == DType::F32 && dt == DType::F64) {
    int_copy<double, float>(src, dst, n);
    return;
  }
  if (!is_float(st) && !is_float(dt)) {
    // Integer to integer: exact through int64.
    for (size_t i = 0; i < n; ++i) {
      int64_t v = st == DType::I64   ? static_cast<const int64_t*>(src)[i]
                  : st == DType::I32 ? static_cast<const int32_t*>(src)[i]
                                     : static_cast<const uint8_t*>(src)[i];
      if (dt == DType::I64) static_cast<int64_t*>(dst)[i] = v;
      else if (dt == DType::I32) static_cast<int32_t*>(dst)[i] = int32_t(v);
      else static_cast<uint8_t*>(dst)[i] = uint8_t(v);
    }
    return;
  }
  for (size_t i = 0; i < n; ++i) store_float(load_as_float(src, st, i), dst, dt, i);
}

}  // namespace dsv3
