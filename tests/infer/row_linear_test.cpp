// row_linear (the lean decode path's linear) against a float64 reference, and its invariances: a
// row gives bitwise the same output alone or in a batch, and for 1 or 2 threads.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/rng.h"
#include "core/threads.h"
#include "infer/row_linear.h"

namespace dsv3 {
namespace {

std::vector<float> values(size_t n, uint64_t stream) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = rng_normal(7, stream, i);
  return v;
}

TEST(RowLinear, MatchesFloat64ReferenceOnEveryBlockShape) {
  // N and K cover the 8/4/1 weight-row blocks and the k tail; rows cover pairs and an odd row.
  for (int64_t N : {1, 3, 4, 7, 8, 13, 40})
    for (int64_t K : {1, 5, 8, 16, 37, 128})
      for (int64_t R : {1, 2, 3, 5}) {
        const int64_t lda = K + 3, ldy = N + 2;
        const std::vector<float> x = values(size_t(R * lda), 1), w = values(size_t(N * K), 2);
        std::vector<float> y(size_t(R * ldy), -99.0f);
        row_linear(x.data(), lda, R, w.data(), N, K, y.data(), ldy);
        for (int64_t r = 0; r < R; ++r)
          for (int64_t n = 0; n < N; ++n) {
            double ref = 0.0, mag = 0.0;
            for (int64_t k = 0; k < K; ++k) {
              ref += double(x[size_t(r * lda + k)]) * double(w[size_t(n * K + k)]);
              mag += std::fabs(double(x[size_t(r * lda + k)]) * double(w[size_t(n * K + k)]));
            }
            // F32 accumulation: error bounded by K·eps·Σ|x·w|.
            EXPECT_LE(std::fabs(double(y[size_t(r * ldy + n)]) - ref), double(K) * 1.2e-7 * mag + 1e-30)
                << "N " << N << " K " << K << " rows " << R << " at " << r << "," << n;
          }
        for (int64_t r = 0; r < R; ++r)  // padding between rows untouched
          for (int64_t n = N; n < ldy; ++n) EXPECT_EQ(y[size_t(r * ldy + n)], -99.0f);
      }
}

TEST(RowLinear, RowsAreIndependentOfBatchAndThreads) {
  const int threads = num_threads();
  const int64_t N = 4100, K = 128, R = 5;  // N·K above the thread split threshold, N not a multiple of 8
  const std::vector<float> x = values(size_t(R * K), 3), w = values(size_t(N * K), 4);
  std::vector<float> batch(static_cast<size_t>(R * N)), alone(static_cast<size_t>(N)), two(static_cast<size_t>(R * N));
  set_num_threads(1);
  row_linear(x.data(), K, R, w.data(), N, K, batch.data(), N);
  for (int64_t r = 0; r < R; ++r) {
    row_linear(x.data() + r * K, K, 1, w.data(), N, K, alone.data(), N);
    for (int64_t n = 0; n < N; ++n) ASSERT_EQ(alone[size_t(n)], batch[size_t(r * N + n)]) << "row " << r << " n " << n;
  }
  set_num_threads(2);
  row_linear(x.data(), K, R, w.data(), N, K, two.data(), N);
  set_num_threads(threads);
  EXPECT_EQ(two, batch);
}

}  // namespace
}  // namespace dsv3
