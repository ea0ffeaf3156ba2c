#include "backend/cpu/vec_math.h"

#include "backend/cpu/cpu_backend.h"

namespace dsv3::cpu {

Isa cpu_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
  return Isa::Base;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    case Isa::Base: break;
  }
  return "base";
}

namespace {
[[gnu::always_inline]] inline void exp_array_body(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = exp_f32(x[i]);
}
DSV3_CPU_KERNEL(exp_array, (const float* x, float* y, int64_t n), exp_array_body, (x, y, n))
}  // namespace

void exp_f32_array(const float* x, float* y, int64_t n, Isa isa) {
  if (isa == Isa::Avx512 && cpu_isa() == Isa::Avx512)
    exp_array_avx512(x, y, n);
  else if (isa == Isa::Avx2 && cpu_isa() != Isa::Base)
    exp_array_avx2(x, y, n);
  else
    exp_array_base(x, y, n);
}

}  // namespace dsv3::cpu
