// Shared by the FP8 accumulation benchmarks (bench/fp8_accum.cpp on the CPU emulation,
// bench/gpu_fp8_accum.cu on the GPU), so both see the same operands and report the same measures.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <vector>

#include "backend/fp8.h"
#include "core/dtype.h"
#include "core/rng.h"

namespace dsv3::bench {

// Entry i of operand `stream` (1 or 2): U(0,1) on a 2^-24 grid when uniform, else N(0,1).
inline float accum_input(bool uniform, uint64_t stream, uint64_t i) {
  return uniform ? float(rng_u64(1, stream, i) >> 40) * 0x1p-24f : rng_normal(1, stream, i);
}

// One power-of-two scale for a whole operand with amax/scale ≤ 448 (E4M3's largest finite value).
inline float pow2_operand_scale(const float* x, size_t n) {
  float amax = 0;
  for (size_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  int e;
  float m = std::frexp(amax / kE4M3Max, &e);
  return std::ldexp(1.0f, m == 0.5f ? e - 1 : e);
}

struct AccumErr {
  double max_rel = 0;   // max over outputs of |c − ref| / |ref|
  double mean_rel = 0;  // mean over outputs of |c − ref| / |ref|
  double norm_max = 0;  // max|c − ref| / max|ref|
  double frob = 0;      // ‖c − ref‖_F / ‖ref‖_F
};
inline AccumErr accum_error(const float* c, const std::vector<double>& ref) {
  AccumErr e;
  double big = 0, worst = 0, d2 = 0, r2 = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    double d = std::fabs(double(c[i]) - ref[i]), r = d / std::fabs(ref[i]);
    e.max_rel = std::max(e.max_rel, r);
    e.mean_rel += r / double(ref.size());
    worst = std::max(worst, d);
    big = std::max(big, std::fabs(ref[i]));
    d2 += d * d;
    r2 += ref[i] * ref[i];
  }
  e.norm_max = worst / big;
  e.frob = std::sqrt(d2 / r2);
  return e;
}
// The CPU's FP8 GEMM c = a·bᵀ (E4M3 operands with their scale grids) under accumulation `acc`:
// bits-bit partial sums, promoted to FP32 every `promote` products (0: never), the products aligned
// inside the accumulator (or only among themselves); its error against ref.
inline AccumErr emulated_gemm_error(const Tensor& a, const Tensor& sa, const Tensor& b, const Tensor& sb,
                                    const std::vector<double>& ref, Fp8Accum acc, int bits, int64_t promote,
                                    bool aligned) {
  Tensor c = Tensor::empty(DType::F32, {a.dim(0), b.dim(0)});
  Fp8GemmArgs g{a, sa, b, sb, c};
  g.accum = acc;
  g.acc_bits = bits;
  g.promote_every = promote;
  g.acc_in_alignment = aligned;
  fp8_gemm(g);
  return accum_error(c.data<float>(), ref);
}

inline nlohmann::json to_json(const AccumErr& e) {
  return {{"max_rel", e.max_rel}, {"mean_rel", e.mean_rel}, {"norm_max", e.norm_max}, {"frob", e.frob}};
}

}  // namespace dsv3::bench
