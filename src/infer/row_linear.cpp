#include "infer/row_linear.h"

#include <omp.h>

#include <algorithm>

#include "core/threads.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace dsv3 {

namespace {

// Portable form: per output an 8-lane accumulator over k in steps of 8, lanes summed as a tree,
// then the k tail in order (the order of the AVX2 form, without fused multiply-adds).
void rows_base(const float* x, int64_t lda, int64_t rows, const float* w, int64_t n0, int64_t n1, int64_t K,
               float* y, int64_t ldy) {
  const int64_t K8 = K / 8 * 8;
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * K;
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * lda;
      float acc[8] = {};
      for (int64_t k = 0; k < K8; k += 8)
        for (int l = 0; l < 8; ++l) acc[l] += wr[k + l] * xr[k + l];
      float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      for (int64_t k = K8; k < K; ++k) s += wr[k] * xr[k];
      y[r * ldy + n] = s;
    }
  }
}

#if defined(__x86_64__)
#define DSV3_AVX2 [[gnu::target("avx2,fma")]]

// Lane sums of 4 / 8 accumulators, output j in lane j, each ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)).
DSV3_AVX2 inline __m128 reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
DSV3_AVX2 inline float reduce1(__m256 a) {
  alignas(32) float l[8];
  _mm256_store_ps(l, a);
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

// Every output is acc = fma(w, x, acc) over the 8-wide chunks of k in order, the lane sum above,
// then the k tail in order: the same value whichever block shape computes it (8×1, 4×2, 4×1, 1×1).
struct Avx2Rows {
  const float* x;
  int64_t lda;
  const float* w;
  int64_t K, K8;
  float* y;
  int64_t ldy;

  DSV3_AVX2 float tail(int64_t n, int64_t r, float s) const {
    for (int64_t k = K8; k < K; ++k) s += w[n * K + k] * x[r * lda + k];
    return s;
  }
  DSV3_AVX2 void store4(int64_t n, int64_t r, __m128 v) const {
    alignas(16) float t[4];
    _mm_store_ps(t, v);
    for (int i = 0; i < 4; ++i) y[r * ldy + n + i] = tail(n + i, r, t[i]);
  }
  // Weight rows n..n+7, x row r.
  DSV3_AVX2 void b8x1(int64_t n, int64_t r) const {
    const float* wr = w + n * K;
    const float* xr = x + r * lda;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t k = 0; k < K8; k += 8) {
      const __m256 v = _mm256_loadu_ps(xr + k);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k), v, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + K + k), v, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + 2 * K + k), v, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + 3 * K + k), v, a3);
      a4 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + 4 * K + k), v, a4);
      a5 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + 5 * K + k), v, a5);
      a6 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + 6 * K + k), v, a6);
      a7 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + 7 * K + k), v, a7);
    }
    store4(n, r, reduce4(a0, a1, a2, a3));
    store4(n + 4, r, reduce4(a4, a5, a6, a7));
  }
  // Weight rows n..n+3, x rows r, r+1.
  DSV3_AVX2 void b4x2(int64_t n, int64_t r) const {
    const float* wr = w + n * K;
    const float* xa = x + r * lda;
    const float* xb = xa + lda;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t k = 0; k < K8; k += 8) {
      const __m256 va = _mm256_loadu_ps(xa + k), vb = _mm256_loadu_ps(xb + k);
      __m256 v = _mm256_loadu_ps(wr + k);
      a0 = _mm256_fmadd_ps(v, va, a0);
      b0 = _mm256_fmadd_ps(v, vb, b0);
      v = _mm256_loadu_ps(wr + K + k);
      a1 = _mm256_fmadd_ps(v, va, a1);
      b1 = _mm256_fmadd_ps(v, vb, b1);
      v = _mm256_loadu_ps(wr + 2 * K + k);
      a2 = _mm256_fmadd_ps(v, va, a2);
      b2 = _mm256_fmadd_ps(v, vb, b2);
      v = _mm256_loadu_ps(wr + 3 * K + k);
      a3 = _mm256_fmadd_ps(v, va, a3);
      b3 = _mm256_fmadd_ps(v, vb, b3);
    }
    store4(n, r, reduce4(a0, a1, a2, a3));
    store4(n, r + 1, reduce4(b0, b1, b2, b3));
  }
  DSV3_AVX2 void b4x1(int64_t n, int64_t r) const {
    const float* wr = w + n * K;
    const float* xr = x + r * lda;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K8; k += 8) {
      const __m256 v = _mm256_loadu_ps(xr + k);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k), v, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + K + k), v, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + 2 * K + k), v, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + 3 * K + k), v, a3);
    }
    store4(n, r, reduce4(a0, a1, a2, a3));
  }
  DSV3_AVX2 void b1x1(int64_t n, int64_t r) const {
    const float* wr = w + n * K;
    const float* xr = x + r * lda;
    __m256 a = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k), _mm256_loadu_ps(xr + k), a);
    y[r * ldy + n] = tail(n, r, reduce1(a));
  }
};

// Outer loop over blocks of 8 weight rows (read from memory once), inner over the rows of x.
DSV3_AVX2 void rows_avx2(const float* x, int64_t lda, int64_t rows, const float* w, int64_t n0, int64_t n1,
                         int64_t K, float* y, int64_t ldy) {
  const Avx2Rows b{x, lda, w, K, K / 8 * 8, y, ldy};
  const int64_t pairs = rows / 2 * 2;
  int64_t n = n0;
  for (; n + 8 <= n1; n += 8) {
    for (int64_t r = 0; r < pairs; r += 2) {
      b.b4x2(n, r);
      b.b4x2(n + 4, r);
    }
    if (pairs < rows) b.b8x1(n, rows - 1);
  }
  if (n + 4 <= n1) {
    for (int64_t r = 0; r < pairs; r += 2) b.b4x2(n, r);
    if (pairs < rows) b.b4x1(n, rows - 1);
    n += 4;
  }
  for (; n < n1; ++n)
    for (int64_t r = 0; r < rows; ++r) b.b1x1(n, r);
}

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

void rows_range(const float* x, int64_t lda, int64_t rows, const float* w, int64_t n0, int64_t n1, int64_t K,
                float* y, int64_t ldy) {
#if defined(__x86_64__)
  if (has_avx2()) return rows_avx2(x, lda, rows, w, n0, n1, K, y, ldy);
#endif
  rows_base(x, lda, rows, w, n0, n1, K, y, ldy);
}

// Below this many weight values a thread start costs more than the split saves.
constexpr int64_t kSplitMin = int64_t(1) << 18;

}  // namespace

void row_linear(const float* x, int64_t lda, int64_t rows, const float* w, int64_t N, int64_t K, float* y,
                int64_t ldy) {
  if (rows <= 0 || N <= 0) return;
  const int nt = omp_in_parallel() ? 1 : num_threads();
  if (nt <= 1 || N * K < kSplitMin) return rows_range(x, lda, rows, w, 0, N, K, y, ldy);
#pragma omp parallel num_threads(nt)
  {
    const int id = omp_get_thread_num(), cnt = omp_get_num_threads();
    // Ranges aligned to 8 weight rows; the values do not depend on the split.
    const int64_t blocks = (N + 7) / 8;
    const int64_t lo = std::min(N, blocks * id / cnt * 8), hi = std::min(N, blocks * (id + 1) / cnt * 8);
    if (hi > lo) rows_range(x, lda, rows, w, lo, hi, K, y, ldy);
  }
}

}  // namespace dsv3
