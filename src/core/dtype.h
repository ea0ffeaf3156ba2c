// Element types and exact conversions between them.
//
// Rounding is round-to-nearest-even everywhere. Special values:
//   BF16, F16   IEEE: overflow rounds to ±Inf, NaN stays NaN (quiet).
//   F8_E4M3     OCP "fn" (torch.float8_e4m3fn): no Inf, max ±448, NaN = 0x7F/0xFF. Conversion
//               saturates (like CUDA's __NV_SATFINITE): finite values past 448 and ±Inf → ±448.
//               NaN → 0x7F. (A plain torch cast instead gives NaN from 480 up; the FP8 recipe
//               scales by amax/448, so in-range values never reach either rule.)
//   F8_E5M2     IEEE-like (torch.float8_e5m2): max ±57344, has ±Inf. Finite overflow saturates to
//               ±57344; ±Inf stays ±Inf; NaN → 0x7E.
// Subnormals are kept in every format (no flush to zero).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace dsv3 {

enum class DType : uint8_t { F32, F64, BF16, F16, F8_E4M3, F8_E5M2, I64, I32, U8 };

// Storage wrappers so overloads and templates can tell the 16- and 8-bit formats apart.
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };
struct f8e4m3 { uint8_t bits; };
struct f8e5m2 { uint8_t bits; };

size_t dtype_size(DType t);
// Name as safetensors writes it ("F32", "BF16", "F8_E4M3", ...).
const char* dtype_name(DType t);
// Parse a safetensors dtype name; false when it is not one of ours.
bool parse_dtype(std::string_view name, DType* out);
bool is_float(DType t);

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::F32; }
template <> constexpr DType dtype_of<double>() { return DType::F64; }
template <> constexpr DType dtype_of<bf16>() { return DType::BF16; }
template <> constexpr DType dtype_of<f16>() { return DType::F16; }
template <> constexpr DType dtype_of<f8e4m3>() { return DType::F8_E4M3; }
template <> constexpr DType dtype_of<f8e5m2>() { return DType::F8_E5M2; }
template <> constexpr DType dtype_of<int64_t>() { return DType::I64; }
template <> constexpr DType dtype_of<int32_t>() { return DType::I32; }
template <> constexpr DType dtype_of<uint8_t>() { return DType::U8; }

// Scalar conversions.
inline float bf16_to_float(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float f16_to_float(uint16_t h);
uint16_t float_to_f16(float f);
float e4m3_to_float(uint8_t b);
uint8_t float_to_e4m3(float f);
float e5m2_to_float(uint8_t b);
uint8_t float_to_e5m2(float f);

constexpr float kE4M3Max = 448.0f;
constexpr float kE5M2Max = 57344.0f;

// Bulk conversion of n elements between any two dtypes (float types via float; integers exact
// within range). src and dst must not overlap.
void convert(const void* src, DType src_t, void* dst, DType dst_t, size_t n);
// Element i of a buffer of type t, as float.
float load_as_float(const void* data, DType t, size_t i);

std::string dtype_list();  // "F32, F64, ..." for error messages

}  // namespace dsv3
