// Block-scaled FP8 GEMM through cuBLASLt (Hopper: CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F for
// operands scaled per 1×128, BLK128x128_32F for 128×128 blocks; FP32 accumulation, no fast accum).
// Row-major c[M,N] = a[M,K]·b[N,K]ᵀ is column-major cᵀ = b·aᵀ, so cuBLASLt's A is our b (transposed,
// "TN" as FP8 requires) and its B is our a. Our scale grids are row-major [R, ceil(K/128)] (and
// [ceil(R/128), ceil(K/128)]), which is the column-major K-block-major layout cuBLASLt reads.
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

// One plan (descriptors + the heuristic's first algorithm) per shape and mode, built once.
const Plan& plan_for(int64_t m, int64_t n, int64_t k, bool a_block, bool b_block, bool c_bf16) {
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
  const Plan& p = plan_for(m, n, k, a_block, b_block, bf16);
  // Scale pointers change per call; set them on the (shared) descriptor under no concurrency: all
  // calls come from the host thread that owns the default stream.
  const void* sa = a.b_scale.raw();
  const void* sb = a.a_scale.raw();
  DSV3_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sa, sizeof sa));
  DSV3_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sb, sizeof sb));
  float alpha = 1.0f, beta = a.accumulate ? 1.0f : 0.0f;
  void* c = ptr<void>(a.c);
  DSV3_CUBLAS_CHECK(cublasLtMatmul(lt(), p.desc, &alpha, a.b.raw(), p.la, a.a.raw(), p.lb, &beta, c, p.lc, c, p.lc,
                                   &p.algo, workspace(), kWorkspace, nullptr));
}

}  // namespace dsv3
