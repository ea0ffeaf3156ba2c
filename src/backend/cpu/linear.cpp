// linear (x·Wᵀ with weights in their stored dtype), its backward, and plain matmul.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cstring>

#include "backend/cpu/cpu_backend.h"
#include "core/threads.h"

namespace dsv3 {
namespace cpu {

void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
           int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // BLAS would also do this, but some builds read a/b anyway
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    return;
  }
  // OpenBLAS runs single-threaded in the calling thread; the threads are OpenMP's alone, so they
  // never compete with OpenBLAS's own spinning workers on a small machine.
  static const bool single = (openblas_set_num_threads(1), true);
  (void)single;
  auto call = [&](int64_t mm, int64_t nn, const float* aa, const float* bb, float* cc) {
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, int(mm),
                int(nn), int(k), alpha, aa, int(lda), bb, int(ldb), beta, cc, int(ldc));
  };
  int nt = omp_in_parallel() ? 1 : num_threads();
  // Below m·n·k = 2^21 (~50 µs in one thread) a fork/join costs about what the split saves.
  constexpr double kMinSplitFlops = 1 << 21;
  if (nt <= 1 || double(m) * double(n) * double(k) < kMinSplitFlops) {
    call(m, n, a, b, c);
    return;
  }
  // Split the larger of m and n into 2·nt contiguous chunks that threads take as they come free: on
  // a shared machine a thread that lost its core takes fewer, instead of the others waiting for its
  // fixed half. Each chunk is one sgemm call whose bounds depend on nt only, so which thread runs
  // it never changes a bit.
  bool rows = m >= n;
  int64_t len = rows ? m : n;
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(2 * nt, len / 16));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    int64_t lo = len * ch / chunks, hi = len * (ch + 1) / chunks;
    if (hi > lo) {
      if (rows)
        call(hi - lo, n, trans_a ? a + lo : a + lo * lda, b, c + lo * ldc);
      else
        call(m, hi - lo, a, trans_b ? b + lo * ldb : b + lo, c + lo);
    }
  }
}

float* scratch(size_t n, int slot) {
  thread_local std::vector<float> bufs[4];
  std::vector<float>& b = bufs[slot];
  if (b.size() < n) b.resize(n);
  return b.data();
}

void weight_rows_to_f32(const Tensor& w, const Tensor& scale_inv, int64_t r0, int64_t r1, float* out) {
  int64_t k = w.dim(1);
  DType t = w.dtype();
  const char* base = static_cast<const char*>(w.raw());
  size_t es = dtype_size(t);
  if (t == DType::F8_E4M3) {
    const float* sc = scale_inv.data<float>();
    int64_t kb = scale_inv.dim(1);
    const uint8_t* p = reinterpret_cast<const uint8_t*>(base);
    static const std::array<float, 256> lut = [] {
      std::array<float, 256> l{};
      for (int i = 0; i < 256; ++i) l[size_t(i)] = e4m3_to_float(uint8_t(i));
      return l;
    }();
#pragma omp parallel for schedule(static) if ((r1 - r0) * k >= cpu::kParallelMin)
    for (int64_t r = r0; r < r1; ++r) {
      const float* srow = sc + (r / kFp8Block) * kb;
      float* o = out + (r - r0) * k;
      const uint8_t* wr = p + r * k;
      for (int64_t j = 0; j < k; ++j) o[j] = lut[wr[j]] * srow[j / kFp8Block];
    }
    return;
  }
#pragma omp parallel for schedule(static) if ((r1 - r0) * k >= cpu::kParallelMin)
  for (int64_t r = r0; r < r1; ++r)
    convert(base + size_t(r * k) * es, t, out + (r - r0) * k, DType::F32, size_t(k));
}

}  // namespace cpu

namespace {
// Weights other than F32 are converted this many rows at a time, bounding the scratch.
constexpr int64_t kWeightRowBlock = 256;
}  // namespace

void CpuBackend::linear(const LinearArgs& a) {
  validate(a);
  int64_t m = cpu::rows_of(a.x), n = a.w.dim(0), k = a.w.dim(1);
  const float* x = a.x.data<float>();
  float* y = cpu::mut<float>(a.y);
  float beta = a.accumulate ? 1.0f : 0.0f;
  if (m == 0) return;  // an expert that received no tokens
  if (a.w.dtype() == DType::F32) {
    cpu::sgemm(false, true, m, n, k, 1.0f, x, k, a.w.data<float>(), k, beta, y, n);
    return;
  }
  // Each thread owns a contiguous range of output columns (weight rows) and converts it block by
  // block into its own scratch, so the weight is read once and never held converted in full.
  int nt = num_threads();
#pragma omp parallel num_threads(nt) if (n * k >= cpu::kParallelMin)
  {
    int id = omp_get_thread_num(), cnt = omp_get_num_threads();
    int64_t lo = n * id / cnt, hi = n * (id + 1) / cnt;
    float* wb = cpu::scratch(size_t(std::min(hi - lo, kWeightRowBlock) * k));
    for (int64_t n0 = lo; n0 < hi; n0 += kWeightRowBlock) {
      int64_t n1 = std::min(hi, n0 + kWeightRowBlock);
      cpu::weight_rows_to_f32(a.w, a.w_scale_inv, n0, n1, wb);
      cpu::sgemm(false, true, m, n1 - n0, k, 1.0f, x, k, wb, k, beta, y + n0, n);
    }
  }
}

void CpuBackend::linear_backward(const LinearBackwardArgs& a) {
  validate(a);
  int64_t m = cpu::rows_of(a.dy), n = cpu::last_dim(a.dy);
  const float* dy = a.dy.data<float>();
  if (present(a.dx) && m > 0) {
    int64_t k = a.w.dim(1);
    float* dx = cpu::mut<float>(a.dx);
    float beta = a.accumulate_dx ? 1.0f : 0.0f;
    if (a.w.dtype() == DType::F32) {
      cpu::sgemm(false, false, m, k, n, 1.0f, dy, n, a.w.data<float>(), k, beta, dx, k);
    } else {
      float* wb = cpu::scratch(size_t(std::min(n, kWeightRowBlock) * k));
      for (int64_t n0 = 0; n0 < n; n0 += kWeightRowBlock) {
        int64_t n1 = std::min(n, n0 + kWeightRowBlock);
        cpu::weight_rows_to_f32(a.w, a.w_scale_inv, n0, n1, wb);
        cpu::sgemm(false, false, m, k, n1 - n0, 1.0f, dy + n0, n, wb, k, n0 == 0 ? beta : 1.0f, dx, k);
      }
    }
  }
  if (present(a.dw)) {
    int64_t k = cpu::last_dim(a.x);
    cpu::sgemm(true, false, n, k, m, 1.0f, dy, n, a.x.data<float>(), k, a.accumulate_dw ? 1.0f : 0.0f,
               cpu::mut<float>(a.dw), k);
  }
}

void CpuBackend::matmul(const MatmulArgs& a) {
  validate(a);
  int64_t m = a.c.dim(0), n = a.c.dim(1), k = a.trans_a ? a.a.dim(0) : a.a.dim(1);
  cpu::sgemm(a.trans_a, a.trans_b, m, n, k, a.alpha, a.a.data<float>(), a.a.dim(1), a.b.data<float>(),
             a.b.dim(1), a.accumulate ? 1.0f : 0.0f, cpu::mut<float>(a.c), n);
}

}  // namespace dsv3
