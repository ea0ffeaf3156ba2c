// Speed of the CPU FP8 ops: the reference quantize/GEMM (backend/cpu/fp8.cpp) against the fast paths
// the trainer uses (backend/fp8.cpp, bit-identical), and an FP32 sgemm of the same shape. Times are
// process CPU seconds (all threads), best of N: on a shared, loaded machine wall time mostly measures
// the wait for a time slice.
//
//   dsv3_bench_fp8_speed [--m 512] [--k 1024] [--n 1024] [--reps 3]
// Prints a table and writes bench/results/fp8_speed.json.
#include <time.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "backend/cpu/cpu_backend.h"
#include "backend/fp8.h"
#include "common/bench_util.h"
#include "core/rng.h"
#include "core/threads.h"

using namespace dsv3;

namespace {

double cpu_s() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

template <class F>
double best_of(int reps, F f) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    double t0 = cpu_s();
    f();
    best = std::min(best, cpu_s() - t0);
  }
  return best;
}

Tensor randn(int64_t r, int64_t c, uint64_t seed) {
  Tensor x = Tensor::empty(DType::F32, {r, c});
  for (int64_t i = 0; i < r * c; ++i) x.data<float>()[i] = rng_normal(seed, 1, uint64_t(i));
  return x;
}

struct Quant {
  Tensor q, s;
};
QuantizeFp8Args qargs(const Tensor& x, Fp8Tiling t, bool transpose, Quant& o) {
  int64_t M = x.dim(0), K = x.dim(1);
  int64_t th = t == Fp8Tiling::Row1x128 ? 1 : 128, tw = t == Fp8Tiling::Col128x1 ? 1 : 128;
  int64_t g0 = (M + th - 1) / th, g1 = (K + tw - 1) / tw;
  o.q = Tensor::empty(DType::F8_E4M3, transpose ? Shape{K, M} : Shape{M, K});
  o.s = Tensor::empty(DType::F32, transpose ? Shape{g1, g0} : Shape{g0, g1});
  QuantizeFp8Args a;
  a.x = x;
  a.tiling = t;
  a.transpose_out = transpose;
  a.q = o.q;
  a.scale = o.s;
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t M = 512, K = 1024, N = 1024;
  int reps = 3;
  const std::string usage = std::string("usage: ") + argv[0] + " [--m 512] [--k 1024] [--n 1024] [--reps 3]\n";
  if (const int rc = bench::check_pair_args(argc, argv, usage.c_str()); rc >= 0) return rc;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--m"))
      M = std::stoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--k"))
      K = std::stoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--n"))
      N = std::stoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--reps"))
      reps = std::stoi(argv[i + 1]);
    else {
      std::fputs(usage.c_str(), stderr);
      return 2;
    }
  }
  Tensor x = randn(M, K, 1), w = randn(N, K, 2);
  nlohmann::json rows = nlohmann::json::array();
  std::printf("FP8 ops on [%lld, %lld] (GEMM [%lld, %lld] x [%lld, %lld]^T), %d thread(s), CPU time, best of %d\n",
              (long long)M, (long long)K, (long long)M, (long long)K, (long long)N, (long long)K, num_threads(),
              reps);
  std::printf("%-34s %12s %12s %8s\n", "op", "reference", "fast", "speedup");
  struct QCase {
    const char* name;
    Fp8Tiling t;
    bool tr;
  } qcases[] = {{"quantize 1x128", Fp8Tiling::Row1x128, false},
                {"quantize 128x1, transposed out", Fp8Tiling::Col128x1, true},
                {"quantize 128x128", Fp8Tiling::Block128x128, false},
                {"quantize 128x128, transposed out", Fp8Tiling::Block128x128, true}};
  for (const QCase& c : qcases) {
    Quant o;
    QuantizeFp8Args a = qargs(x, c.t, c.tr, o);
    double tr = best_of(reps, [&] { quantize_fp8(a); });
    double tf = best_of(reps, [&] { quantize_fp8_fast(a); });
    double n = double(M * K);
    std::printf("%-34s %9.2f ns %9.2f ns %7.1fx   (per element)\n", c.name, 1e9 * tr / n, 1e9 * tf / n, tr / tf);
    rows.push_back({{"op", c.name}, {"ref_ns_per_elem", 1e9 * tr / n}, {"fast_ns_per_elem", 1e9 * tf / n}});
  }
  Quant qa, qb;
  quantize_fp8(qargs(x, Fp8Tiling::Row1x128, false, qa));
  quantize_fp8(qargs(w, Fp8Tiling::Block128x128, false, qb));
  Tensor c = Tensor::empty(DType::F32, {M, N});
  Fp8GemmArgs g{qa.q, qa.s, qb.q, qb.s, c};
  double gr = best_of(reps, [&] { fp8_gemm(g); });
  double gf = best_of(reps, [&] { fp8_gemm_fast(g); });
  double sg = best_of(reps, [&] {
    cpu::sgemm(false, true, M, N, K, 1.0f, x.data<float>(), K, w.data<float>(), K, 0.0f, c.data<float>(), N);
  });
  double flops = 2.0 * double(M) * double(N) * double(K);
  std::printf("%-34s %9.2f ms %9.2f ms %7.1fx   (FP32 sgemm %.2f ms; fast = %.2fx sgemm)\n", "fp8_gemm 1x128 x 128x128",
              1e3 * gr, 1e3 * gf, gr / gf, 1e3 * sg, gf / sg);
  rows.push_back({{"op", "fp8_gemm 1x128 x 128x128"},
                  {"ref_s", gr},
                  {"fast_s", gf},
                  {"sgemm_f32_s", sg},
                  {"fast_gflops", flops / gf / 1e9}});
  // One FP8 linear layer, forward + backward (5 quantizations, 3 GEMMs) against FP32 and BF16.
  Tensor y = Tensor::empty(DType::F32, {M, N}), dy = randn(M, N, 3), dx = Tensor::empty(DType::F32, {M, K}),
         dw = Tensor::zeros(DType::F32, {N, K});
  nlohmann::json lin = nlohmann::json::object();
  for (auto [name, mode] : {std::pair<const char*, LinearPrecisionMode>{"fp32", LinearPrecisionMode::F32},
                            {"bf16", LinearPrecisionMode::Bf16},
                            {"fp8", LinearPrecisionMode::Fp8}}) {
    LinearPrecision p;
    p.mode = mode;
    double t = best_of(reps, [&] {
      linear_lowp(p, {x, w, Tensor(), y});
      LinearBackwardArgs b;
      b.dy = dy, b.x = x, b.w = w, b.dx = dx, b.dw = dw;
      linear_backward_lowp(p, b);
    });
    std::printf("linear fwd+bwd %-19s %9.2f ms\n", name, 1e3 * t);
    lin[name] = t;
  }
  rows.push_back({{"op", "linear forward+backward"}, {"seconds", lin}});
  std::string path = bench::write_result("fp8_speed", {{"bench", "fp8_speed"},
                                                       {"M", M},
                                                       {"K", K},
                                                       {"N", N},
                                                       {"threads", num_threads()},
                                                       {"timing", "process CPU time, best of reps"},
                                                       {"reps", reps},
                                                       {"rows", rows}});
  std::printf("wrote %s\n", path.c_str());
  return 0;
}
