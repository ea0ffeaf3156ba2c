// Per-op timings of the CPU backend at the shapes of the `tiny` and `bench-0.7b` presets, with the
// FLOP rate of each GEMM-based op next to what a bare cblas_sgemm of the same shape reaches in the
// same run (the baseline). Prints a table and writes bench/results/backend_ops_cpu.json.
// FLOPs: linear 2·M·N·K (backward: twice that, dx and dw); causal attention counts half the score
// matrix, B·H·T²·(Dqk + Dv), and its backward 2.5× that (five GEMMs against two).
//   dsv3_bench_backend_ops [--quick]
#include <cblas.h>

#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "backend/ops.h"
#include "common/bench_util.h"
#include "core/rng.h"
#include "core/threads.h"

using namespace dsv3;

namespace {

Tensor randn(const Shape& s, uint64_t stream, float scale = 1.0f) {
  Tensor t = Tensor::empty(DType::F32, s);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = scale * rng_normal(1, stream, uint64_t(i));
  return t;
}

// One warm-up, then repeat until ≥ 0.3 s and ≥ 3 runs; mean seconds per run.
double time_it(const std::function<void()>& f, bool quick) {
  f();
  double budget = quick ? 0.05 : 0.3, t0 = bench::now_s();
  int n = 0;
  do {
    f();
    ++n;
  } while (n < 3 || bench::now_s() - t0 < budget);
  return (bench::now_s() - t0) / n;
}

struct Row {
  std::string preset, op, shape;
  double ms, gflops, baseline_gflops;
};

}  // namespace

int main(int argc, char** argv) {
  bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  Backend& b = cpu_backend();
  std::vector<Row> rows;

  struct Shp {
    std::string preset;
    int64_t tokens, seq, hidden, inter, heads, dqk, dv, vocab, experts;
  };
  std::vector<Shp> shapes = {{"tiny", 2048, 256, 128, 384, 4, 48, 32, 4096, 8},
                             {"bench-0.7b", 1024, 512, 1024, 2816, 16, 192, 128, 32768, 32}};
  for (const Shp& s : shapes) {
    int64_t m = s.tokens, k = s.hidden, n = s.inter;
    Tensor x = randn({m, k}, 1), w = randn({n, k}, 2, 0.05f), y = Tensor::empty(DType::F32, {m, n});
    Tensor wb = w.to(DType::BF16);
    double flop = 2.0 * double(m) * double(n) * double(k);
    // Baseline: OpenBLAS with its own threads (as many as ours) on the same shape. The backend
    // itself runs OpenBLAS single-threaded under OpenMP, so restore that afterwards.
    openblas_set_num_threads(num_threads());
    double base = flop / time_it([&] {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(m), int(n), int(k), 1.0f, x.data<float>(), int(k),
                  w.data<float>(), int(k), 0.0f, y.data<float>(), int(n));
    }, quick) / 1e9;
    openblas_set_num_threads(1);
    std::string shp = cat("[", m, ",", k, "]x[", n, ",", k, "]T");
    double t = time_it([&] { b.linear({x, w, Tensor(), y, false}); }, quick);
    rows.push_back({s.preset, "linear f32", shp, t * 1e3, flop / t / 1e9, base});
    t = time_it([&] { b.linear({x, wb, Tensor(), y, false}); }, quick);
    rows.push_back({s.preset, "linear bf16 weight", shp, t * 1e3, flop / t / 1e9, base});
    Tensor dy = randn({m, n}, 3), dx = Tensor::empty(DType::F32, {m, k}), dw = Tensor::empty(DType::F32, {n, k});
    t = time_it([&] { b.linear_backward({dy, x, w, Tensor(), dx, dw, false, false}); }, quick);
    rows.push_back({s.preset, "linear backward (dx+dw)", shp, t * 1e3, 2 * flop / t / 1e9, base});

    int64_t bs = s.tokens / s.seq, h = s.heads;
    Tensor q = randn({bs, s.seq, h, s.dqk}, 4), kk = randn({bs, s.seq, h, s.dqk}, 5), v = randn({bs, s.seq, h, s.dv}, 6);
    Tensor o = Tensor::empty(DType::F32, {bs, s.seq, h, s.dv}), lse = Tensor::empty(DType::F32, {bs, h, s.seq});
    float scale = 0.1f;
    // Causal: half of the T×S score matrix; q·kᵀ and P·v.
    double aflop = double(bs * h) * double(s.seq) * double(s.seq) * double(s.dqk + s.dv);
    std::string ashp = cat("B", bs, " T", s.seq, " H", h, " ", s.dqk, "/", s.dv);
    t = time_it([&] { b.attention({q, kk, v, o, lse, scale, true, 0, {}, {}}); }, quick);
    rows.push_back({s.preset, "attention causal", ashp, t * 1e3, aflop / t / 1e9, base});
    Tensor dq = Tensor::empty(DType::F32, q.shape()), dk = Tensor::empty(DType::F32, kk.shape());
    Tensor dv = Tensor::empty(DType::F32, v.shape()), dout = randn(o.shape(), 7);
    t = time_it([&] { b.attention_backward({q, kk, v, o, lse, dout, dq, dk, dv, scale, true, 0, {}, {}, {}, {}}); },
                quick);
    rows.push_back({s.preset, "attention backward", ashp, t * 1e3, 2.5 * aflop / t / 1e9, base});

    Tensor nw = randn({k}, 8), ny = Tensor::empty(DType::F32, {m, k}), rstd = Tensor::empty(DType::F32, {m});
    t = time_it([&] { b.rmsnorm({x, nw, 1e-6f, ny, rstd}); }, quick);
    rows.push_back({s.preset, "rmsnorm", cat("[", m, ",", k, "]"), t * 1e3, 0, 0});

    Tensor logits = randn({m, s.vocab}, 9), tg = Tensor::empty(DType::I32, {m});
    for (int64_t i = 0; i < m; ++i) tg.data<int32_t>()[i] = int32_t(i % s.vocab);
    Tensor dl = Tensor::empty(DType::F32, {m, s.vocab}), ls = Tensor::empty(DType::F32, {1});
    t = time_it([&] { b.cross_entropy({logits, tg, Tensor(), ls, dl, 1.0f}); }, quick);
    rows.push_back({s.preset, "cross_entropy + grad", cat("[", m, ",", s.vocab, "]"), t * 1e3, 0, 0});

    Tensor rl = randn({m, s.experts}, 10), sc = Tensor::empty(DType::F32, {m, s.experts});
    Tensor ids = Tensor::empty(DType::I32, {m, 2}), wts = Tensor::empty(DType::F32, {m, 2});
    RouterArgs ra;
    ra.logits = rl;
    ra.n_group = 4;
    ra.topk_group = 2;
    ra.top_k = 2;
    ra.scores = sc;
    ra.ids = ids;
    ra.weights = wts;
    t = time_it([&] { b.router(ra); }, quick);
    rows.push_back({s.preset, "router noaux_tc top-2", cat("[", m, ",", s.experts, "]"), t * 1e3, 0, 0});
  }

  std::printf("CPU backend, %d threads\n", num_threads());
  std::printf("%-11s %-24s %-26s %10s %9s %14s\n", "preset", "op", "shape", "ms", "GFLOP/s", "sgemm GFLOP/s");
  nlohmann::json out = nlohmann::json::array();
  for (const Row& r : rows) {
    std::printf("%-11s %-24s %-26s %10.3f %9.2f %14.2f\n", r.preset.c_str(), r.op.c_str(), r.shape.c_str(), r.ms,
                r.gflops, r.baseline_gflops);
    out.push_back({{"preset", r.preset}, {"op", r.op}, {"shape", r.shape}, {"ms", r.ms}, {"gflops", r.gflops},
                   {"sgemm_baseline_gflops", r.baseline_gflops}});
  }
  // The load average says how much the machine was shared while this ran (timings scale with it).
  double load = -1;
  if (FILE* f = std::fopen("/proc/loadavg", "r")) {
    if (std::fscanf(f, "%lf", &load) != 1) load = -1;
    std::fclose(f);
  }
  std::printf("load average (1 min): %.2f\n", load);
  if (!quick)
    std::printf("wrote %s\n", bench::write_result("backend_ops_cpu", {{"threads", num_threads()},
                                                                       {"loadavg_1min", load},
                                                                       {"ops", out}})
                                   .c_str());
  return 0;
}
