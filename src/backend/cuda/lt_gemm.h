// cuBLASLt matmuls with cached plans, shared by the BF16 (linear_lowp.cu) and block-scaled FP8
// (gemm_fp8.cu) GEMMs. cuBLASLt's heuristic query costs tens of microseconds of host time, and
// cuBLAS's own cache misses whenever a dimension changes; the MoE experts' row counts change every
// step, so one query per call made the training step host-bound. Here a plan is kept per shape with
// each "free" dimension (one that is no operand's leading dimension, so it can change under fixed
// leading dimensions: the experts' rows) rounded up to a power of two; calls in the same bucket reuse
// the bucket's algorithm with their exact sizes (cuBLASLt checks an algorithm against the layouts it
// runs on). If cuBLASLt rejects it for an exact size, that size gets its own plan from then on.
#pragma once
#include <cublasLt.h>

#include <cstdint>

namespace dsv3::cuda {

// Column-major D = alpha·op(A)·op(B) + beta·C, C and D the same matrix (cuBLASLt's view: callers with
// row-major data swap the operands).
struct LtMatmul {
  cudaDataType_t a_type = CUDA_R_16BF, b_type = CUDA_R_16BF, c_type = CUDA_R_32F;
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;  // D is [m, n]; op(A) [m, k]; op(B) [k, n]
  const void* a = nullptr;
  const void* b = nullptr;
  void* c = nullptr;
  int64_t lda = 0, ldb = 0, ldc = 0;
  float alpha = 1.0f, beta = 0.0f;
  // Block-scaled FP8: cuBLASLt scale modes (cublasLtMatmulMatrixScale_t) and their scale arrays.
  int a_scale_mode = -1, b_scale_mode = -1;
  const void* a_scale = nullptr;
  const void* b_scale = nullptr;
  // A batch of `batch` products of these sizes: product i's matrices at a + i·stride_a elements (and
  // b, c alike), or, with pointer_array, at addresses read from device arrays of pointers (a, b, c
  // then point at those arrays, and `align` is the smallest alignment in bytes of any matrix in
  // them: cuBLASLt cannot see it).
  int64_t batch = 1;
  int64_t stride_a = 0, stride_b = 0, stride_c = 0;
  bool pointer_array = false;
  uint32_t align = 0;
};

// Row-major c[m, n] (+)= op(a)[m, k] · op(b)[k, n] as cuBLASLt's column-major problem (cᵀ = op(b)ᵀ ·
// op(a)ᵀ: its A is our b, its B our a), BF16 operands and F32 c unless the caller changes the types.
inline LtMatmul lt_row_major(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
                             const void* b, int64_t ldb, void* c, int64_t ldc, bool accumulate) {
  LtMatmul g;
  g.trans_a = trans_b;
  g.trans_b = trans_a;
  g.m = n;
  g.n = m;
  g.k = k;
  g.a = b;
  g.lda = ldb;
  g.b = a;
  g.ldb = lda;
  g.c = c;
  g.ldc = ldc;
  g.beta = accumulate ? 1.0f : 0.0f;
  return g;
}

// Runs the matmul on cuda::stream() (stream.h); an internal error when cuBLASLt has no algorithm for it.
void lt_matmul(const LtMatmul& g);
// The same, false (nothing run) when cuBLASLt has no algorithm for it.
bool lt_try_matmul(const LtMatmul& g);

// Plans built so far (each one heuristic query): a test's way to see that calls share a bucket's plan.
int64_t lt_plan_count();

}  // namespace dsv3::cuda
