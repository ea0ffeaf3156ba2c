// Vectorisable float math for the CPU backend's row loops, and the per-ISA dispatch of those loops.
//
// exp_f32 is branch-free (selects, integer bit tricks, one polynomial), so a loop over it compiles
// to SIMD code, which std::exp (a libm call per element) never does. Accuracy against exp in
// double (tests/backend/vec_math_test.cpp: 2·10^7 points over [-87.33, 88.72], every ISA variant):
// at most kExpMaxUlp units in the last place for normal results (measured 1.21 ulp without FMA,
// 0.93 with); results below FLT_MIN (x < -87.34) are within one subnormal step of the true value;
// x > 88.72 gives +inf, −inf gives 0, and NaN stays NaN. One ulp is 6e-8 relative, far inside the
// FP32 class of docs/tolerances.md (kF32 = 1e-5), so the ops built on it keep their bounds.
//
// Dispatch: the library is built for the baseline x86-64 ISA (SSE2), so a hot loop is written once
// as an always-inline body and instantiated three times, for AVX-512, AVX2 and the baseline; the
// widest the CPU has is chosen once. Results are deterministic on one machine for any thread
// count; different ISAs may round a few results differently (the compiler may fuse a·b+c into an
// FMA where the ISA has one), as OpenBLAS's kernels already do.
#pragma once
#include <bit>
#include <cstdint>

namespace dsv3::cpu {

constexpr double kExpMaxUlp = 1.5;

[[gnu::always_inline]] inline float exp_f32(float x) {
  // Clamp so that n stays in [-159, 128]: below, the result is 0 anyway; above, +inf. The
  // comparisons are written so that NaN passes through unchanged.
  x = x < -110.0f ? -110.0f : x;
  x = x > 89.0f ? 89.0f : x;
  // n = round(x / ln 2) by adding 1.5·2^23 (round to nearest happens in the addition).
  constexpr float kMagic = 12582912.0f;
  const float t = x * 1.44269504088896341f + kMagic;
  const float nf = t - kMagic;
  const int32_t n = int32_t(std::bit_cast<uint32_t>(t) - std::bit_cast<uint32_t>(kMagic));
  // r = x − n·ln 2 in two parts (Cody–Waite): n·kLn2Hi is exact for |n| < 2^8.
  constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.42860682028622680e-6f;
  const float r = (x - nf * kLn2Hi) - nf * kLn2Lo;
  // e^r on |r| <= ln2/2 by its Taylor polynomial of degree 7 (truncation < 6e-9 relative).
  float p = 1.98412698412698413e-4f;
  p = p * r + 1.38888888888888889e-3f;
  p = p * r + 8.33333333333333333e-3f;
  p = p * r + 4.16666666666666667e-2f;
  p = p * r + 1.66666666666666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^n as two normal powers of two (n/2 rounded down, and the rest), so that results near
  // overflow and subnormal results need no special case: the first product is exact and the
  // second rounds once.
  const int32_t n1 = n >> 1, n2 = n - n1;
  const float s1 = std::bit_cast<float>(uint32_t(n1 + 127) << 23);
  const float s2 = std::bit_cast<float>(uint32_t(n2 + 127) << 23);
  return p * s1 * s2;
}

// The widest instruction set this CPU supports, decided once.
enum class Isa { Base, Avx2, Avx512 };
Isa cpu_isa();
const char* isa_name(Isa isa);

// f(lo, hi) over [0, n) in chunks of `grain`, which the threads take as they come free (when
// `parallel`): on a shared machine a thread that lost its core does fewer chunks instead of the
// others waiting for a fixed share. For row-local and elementwise work only, where which thread
// runs a chunk never changes a bit.
template <class F> void for_chunks(int64_t n, int64_t grain, bool parallel, F&& f) {
  const int64_t chunks = (n + grain - 1) / grain;
#pragma omp parallel for schedule(dynamic, 1) if (parallel && chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) f(c * grain, c + 1 == chunks ? n : (c + 1) * grain);
}

// y[i] = exp_f32(x[i]) compiled for `isa` (or the widest this CPU has, if it lacks `isa`): lets
// the tests check every variant.
void exp_f32_array(const float* x, float* y, int64_t n, Isa isa);

}  // namespace dsv3::cpu

// Defines NAME_base, NAME_avx2 and NAME_avx512, each `void NAME_x PARAMS { BODY ARGS; }` where BODY
// is an always-inline function, and NAME PARAMS, which calls the widest one the CPU has.
// Example: DSV3_CPU_KERNEL(scale_row, (float* x, int64_t n, float s), scale_row_body, (x, n, s))
#define DSV3_CPU_KERNEL(NAME, PARAMS, BODY, ARGS)                                                   \
  void NAME##_base PARAMS { BODY ARGS; }                                                            \
  [[gnu::target("avx2,fma")]] void NAME##_avx2 PARAMS { BODY ARGS; }                                \
  [[gnu::target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")]] void NAME##_avx512 PARAMS { BODY ARGS; } \
  [[maybe_unused]] void NAME PARAMS {                                                               \
    static const ::dsv3::cpu::Isa isa = ::dsv3::cpu::cpu_isa();                                     \
    if (isa == ::dsv3::cpu::Isa::Avx512)                                                            \
      NAME##_avx512 ARGS;                                                                           \
    else if (isa == ::dsv3::cpu::Isa::Avx2)                                                         \
      NAME##_avx2 ARGS;                                                                             \
    else                                                                                            \
      NAME##_base ARGS;                                                                             \
  }
