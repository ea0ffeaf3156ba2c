// y = x·Wᵀ for a few rows of x (decode steps, draft verification), F32 weights.
//
// The weight is streamed once for all rows (blocks of 4 weight rows stay in L1 while every row of
// x is multiplied with them), so 1 + N rows cost little more than one. Each output value is one
// dot product with a fixed summation order that does not depend on how many rows are in the call,
// which rows they are, or the thread count: a row gives bitwise the same result alone or in a batch.
// OpenBLAS sgemm, by contrast, packs the whole weight on every call (the cost of a 4096-row head is
// that copy when x has one row).
#pragma once
#include <cstdint>

namespace dsv3 {

// y[r, n] = Σ_k x[r, k]·w[n, k] for r < rows, n < N; x rows lda apart, y rows ldy apart.
// Splits N over num_threads() when N·K is large.
void row_linear(const float* x, int64_t lda, int64_t rows, const float* w, int64_t N, int64_t K, float* y,
                int64_t ldy);

}  // namespace dsv3
