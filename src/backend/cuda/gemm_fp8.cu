// Block-scaled FP8 GEMM through cuBLASLt (Hopper: CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F for
// operands scaled per 1×128, BLK128x128_32F for 128×128 blocks; FP32 accumulation, no fast accum).
// Row-major c[M,N] = a[M,K]·b[N,K]ᵀ is column-major cᵀ = b·aᵀ, so cuBLASLt's A is our b (transposed,
// "TN" as FP8 requires) and its B is our a. Our scale grids are row-major [R, K/128] (1×128) and
// [ceil(R/128), K/128] (128×128); cuBLASLt reads 1×128 scales outer-dimension-major (element (r, kb)
// at kb·R + r) and 128×128 scales K-block-major with the row stride padded to 4 floats (16 bytes),
// so each call first rewrites both grids into that layout in scratch (a few KB). Plans are cached
// per shape bucket by lt_gemm.h.
#include "backend/cuda/common.cuh"
#include "backend/cuda/linear_lowp.h"
#include "backend/cuda/lt_gemm.h"

namespace dsv3 {
using namespace cuda;

namespace {

// 1×128 grid [R, kb] → [kb, R]; 128×128 grid [rb, kb] → [rb, ld] with ld = kb rounded up to 4.
__global__ void relayout_scales(const float* in, float* out, int64_t rows, int64_t kb, int64_t ld, bool block) {
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (block) {
    if (i >= rows * ld) return;
    int64_t r = i / ld, c = i % ld;
    out[i] = c < kb ? in[r * kb + c] : 0.0f;
  } else {
    if (i >= rows * kb) return;
    int64_t r = i / kb, c = i % kb;
    out[c * rows + r] = in[i];
  }
}

size_t lt_scale_floats(const Tensor& grid, bool block) {
  int64_t rows = grid.dim(0), kb = grid.dim(1);
  return size_t(block ? rows * ((kb + 3) / 4 * 4) : rows * kb);
}

void to_lt_scales(const Tensor& grid, bool block, float* out) {
  int64_t rows = grid.dim(0), kb = grid.dim(1), ld = (kb + 3) / 4 * 4;
  int64_t n = block ? rows * ld : rows * kb;
  relayout_scales<<<blocks_for(n), 256>>>(ptr<float>(grid), out, rows, kb, ld, block);
  check_launch("fp8 scale relayout");
}

}  // namespace

void cuda_fp8_gemm(const Fp8GemmArgs& a) {
  validate(a);
  DSV3_CHECK(a.accum == Fp8Accum::Fp32, "cuda_fp8_gemm: only FP32 accumulation runs on the GPU");
  int64_t m = a.a.dim(0), k = a.a.dim(1), n = a.b.dim(0);
  DSV3_CHECK(k % kFp8Block == 0 && m % 16 == 0 && n % 16 == 0, "cuda_fp8_gemm: needs K % 128 == 0 and M, N % 16 == 0, got M=",
             m, " N=", n, " K=", k);
  // With R ≥ 16 rows a per-row grid [R, K/128] and a block grid [ceil(R/128), K/128] differ.
  bool a_block = a.a_scale.dim(0) != m, b_block = a.b_scale.dim(0) != n;
  DSV3_CHECK(!(a_block && b_block), "cuda_fp8_gemm: cuBLASLt does not take 128×128 blocks on both operands");
  bool bf16 = a.c.dtype() == DType::BF16;
  // cuBLASLt's A is our b, its B our a.
  size_t na = (lt_scale_floats(a.b_scale, b_block) + 3) / 4 * 4, nb = lt_scale_floats(a.a_scale, a_block);
  Scratch scales((na + nb) * sizeof(float));
  float* lt_a = scales.as<float>();
  float* lt_b = lt_a + na;
  to_lt_scales(a.b_scale, b_block, lt_a);
  to_lt_scales(a.a_scale, a_block, lt_b);
  // a[M, K]·b[N, K]ᵀ: "TN" in cuBLASLt's terms, as FP8 requires.
  LtMatmul g = lt_row_major(false, true, m, n, k, a.a.raw(), k, a.b.raw(), k, ptr<void>(a.c), n, a.accumulate);
  g.a_type = g.b_type = CUDA_R_8F_E4M3;
  g.c_type = bf16 ? CUDA_R_16BF : CUDA_R_32F;
  g.a_scale_mode = b_block ? CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F : CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  g.b_scale_mode = a_block ? CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F : CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  g.a_scale = lt_a;
  g.b_scale = lt_b;
  lt_matmul(g);
}

namespace cuda {

void fp8_gemm_lt(const uint8_t* a, const float* a_scale, int64_t M, const uint8_t* b, const float* b_scale,
                 bool b_block, int64_t N, int64_t K, float* c, bool accumulate) {
  DSV3_CHECK(K % kFp8Block == 0, "fp8_gemm_lt: K ", K, " is no multiple of 128");
  LtMatmul g = lt_row_major(false, true, M, N, K, a, K, b, K, c, N, accumulate);  // "TN"
  g.a_type = g.b_type = CUDA_R_8F_E4M3;
  g.a_scale_mode = b_block ? CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F : CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  g.b_scale_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  g.a_scale = b_scale;
  g.b_scale = a_scale;
  lt_matmul(g);
}

}  // namespace cuda
}  // namespace dsv3
