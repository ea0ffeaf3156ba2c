// Block-scaled FP8 GEMM through cuBLASLt (Hopper: CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F for
// operands scaled per 1×128, BLK128x128_32F for 128×128 blocks; FP32 accumulation, no fast accum).
// Row-major c[M,N] = a[M,K]·b[N,K]ᵀ is column-major cᵀ = b·aᵀ, so cuBLASLt's A is our b (transposed,
// "TN" as FP8 requires) and its B is our a. Our scale grids are row-major [R, K/128] (1×128) and
// [ceil(R/128), K/128] (128×128); cuBLASLt reads 1×128 scales outer-dimension-major (element (r, kb)
// at kb·R + r) and 128×128 scales K-block-major with the row stride padded to 4 floats (16 bytes),
// so each call first rewrites both grids into that layout in scratch (a few KB).
#include <cublasLt.h>

#include <map>
#include <mutex>
#include <tuple>

#include "backend/cuda/common.cuh"

namespace dsv3 {
using namespace cuda;

namespace {

cublasLtHandle_t lt() {
  static cublasLtHandle_t h = [] {
    cublasLtHandle_t x;
    DSV3_CUBLAS_CHECK(cublasLtCreate(&x));
    return x;
  }();
  return h;
}

constexpr size_t kWorkspace = 32u << 20;

struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

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

// One plan (descriptors + the heuristic's first algorithm) per shape and mode, built once. The scale
// pointers are set before the heuristic query (cuBLASLt rejects block-scaled modes without them)
// and again on every call.
const Plan& plan_for(int64_t m, int64_t n, int64_t k, bool a_block, bool b_block, bool c_bf16, const void* sa,
                     const void* sb) {
  using Key = std::tuple<int64_t, int64_t, int64_t, bool, bool, bool>;
  static std::map<Key, Plan> plans;
  static std::mutex mu;
  std::lock_guard<std::mutex> lk(mu);
  Key key{m, n, k, a_block, b_block, c_bf16};
  auto it = plans.find(key);
  if (it != plans.end()) return it->second;
  Plan p;
  DSV3_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  DSV3_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
  DSV3_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
  // cuBLASLt A = our b, cuBLASLt B = our a.
  cublasLtMatmulMatrixScale_t ma = b_block ? CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F
                                           : CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  cublasLtMatmulMatrixScale_t mb = a_block ? CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F
                                           : CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  DSV3_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &ma, sizeof ma));
  DSV3_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mb, sizeof mb));
  DSV3_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sa, sizeof sa));
  DSV3_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sb, sizeof sb));
  DSV3_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.la, CUDA_R_8F_E4M3, uint64_t(k), uint64_t(n), k));
  DSV3_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.lb, CUDA_R_8F_E4M3, uint64_t(k), uint64_t(m), k));
  DSV3_CUBLAS_CHECK(
      cublasLtMatrixLayoutCreate(&p.lc, c_bf16 ? CUDA_R_16BF : CUDA_R_32F, uint64_t(n), uint64_t(m), n));
  cublasLtMatmulPreference_t pref;
  DSV3_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  size_t ws = kWorkspace;
  DSV3_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt(), p.desc, p.la, p.lb, p.lc, p.lc, pref, 1, &res, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st != CUBLAS_STATUS_SUCCESS || found == 0)
    internal_error("cuBLASLt has no block-scaled FP8 algorithm for [", m, ", ", k, "]·[", n, ", ", k, "]ᵀ → ",
                   c_bf16 ? "BF16" : "F32", " (status ", int(st), ")");
  p.algo = res.algo;
  return plans.emplace(key, p).first->second;
}

void* workspace() {
  static void* w = [] {
    void* p = nullptr;
    DSV3_CUDA_CHECK(cudaMalloc(&p, kWorkspace));
    return p;
  }();
  return w;
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
  const void* sa = lt_a;
  const void* sb = lt_b;
  const Plan& p = plan_for(m, n, k, a_block, b_block, bf16, sa, sb);
  // Scale pointers change per call; set them on the (shared) descriptor under no concurrency: all
  // calls come from the host thread that owns the default stream.
  DSV3_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sa, sizeof sa));
  DSV3_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sb, sizeof sb));
  float alpha = 1.0f, beta = a.accumulate ? 1.0f : 0.0f;
  void* c = ptr<void>(a.c);
  DSV3_CUBLAS_CHECK(cublasLtMatmul(lt(), p.desc, &alpha, a.b.raw(), p.la, a.a.raw(), p.lb, &beta, c, p.lc, c, p.lc,
                                   &p.algo, workspace(), kWorkspace, nullptr));
}

}  // namespace dsv3
