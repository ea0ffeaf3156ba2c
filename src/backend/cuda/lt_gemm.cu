// cuBLASLt matmuls with plans cached per shape bucket (lt_gemm.h says why).
#include <algorithm>
#include <array>
#include <map>
#include <mutex>
#include <set>

#include "backend/cuda/common.cuh"
#include "backend/cuda/lt_gemm.h"
#include "backend/cuda/stream.h"

namespace dsv3::cuda {
namespace {

cublasLtHandle_t handle() {
  static cublasLtHandle_t h = [] {
    cublasLtHandle_t x;
    DSV3_CUBLAS_CHECK(cublasLtCreate(&x));
    return x;
  }();
  return h;
}

constexpr size_t kWorkspace = 32u << 20;

// One workspace per stream: GEMMs on different streams (the experts' lanes) may run at once.
// Called under g_mu.
void* workspace(cudaStream_t s) {
  static std::map<cudaStream_t, void*> w;
  void*& p = w[s];
  if (!p) DSV3_CUDA_CHECK(cudaMalloc(&p, kWorkspace));
  return p;
}

int64_t bucket(int64_t x) {
  int64_t p = 16;
  while (p < x) p <<= 1;
  return p;
}

// The largest power of two (up to 256) dividing the address: algorithms that need more are excluded.
uint32_t alignment(const void* p) {
  uint32_t a = 256;
  while (a > 1 && (uintptr_t(p) & (a - 1))) a >>= 1;
  return a;
}

// A plan whose desc is null records that cuBLASLt had no algorithm for its key.
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

void destroy(Plan& p) {
  for (cublasLtMatrixLayout_t l : {p.la, p.lb, p.lc})
    if (l) cublasLtMatrixLayoutDestroy(l);
  if (p.desc) cublasLtMatmulDescDestroy(p.desc);
  p = Plan{};
}

using Key = std::array<int64_t, 18>;

void set_dims(cublasLtMatrixLayout_t l, int64_t rows, int64_t cols, int64_t ld) {
  uint64_t r = uint64_t(rows), c = uint64_t(cols);
  DSV3_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_ROWS, &r, sizeof r));
  DSV3_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_COLS, &c, sizeof c));
  DSV3_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_LD, &ld, sizeof ld));
}

// The layouts at sizes m, n, k (the query's; each call sets its exact sizes and batch before running).
void set_sizes(const Plan& p, const LtMatmul& g, int64_t m, int64_t n, int64_t k) {
  set_dims(p.la, g.trans_a ? k : m, g.trans_a ? m : k, g.lda);
  set_dims(p.lb, g.trans_b ? n : k, g.trans_b ? k : n, g.ldb);
  set_dims(p.lc, m, n, g.ldc);
  if (g.batch == 1 && !g.pointer_array) return;
  const int32_t count = int32_t(g.batch);
  const int64_t strides[3] = {g.stride_a, g.stride_b, g.stride_c};
  const cublasLtMatrixLayout_t layouts[3] = {p.la, p.lb, p.lc};
  for (int i = 0; i < 3; ++i) {
    DSV3_CUBLAS_CHECK(
        cublasLtMatrixLayoutSetAttribute(layouts[i], CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof count));
    if (!g.pointer_array)
      DSV3_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layouts[i], CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                         &strides[i], sizeof strides[i]));
  }
}

size_t elem_bytes(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : t == CUDA_R_16BF || t == CUDA_R_16F ? 2 : 1; }

// The alignment cuBLASLt may assume for an operand: the caller's for pointer arrays, else that of the
// base and, in a strided batch, of every matrix after it.
uint32_t align_of(const LtMatmul& g, const void* p, int64_t stride, cudaDataType_t t) {
  if (g.pointer_array) return g.align;
  uint32_t a = alignment(p);
  if (g.batch > 1) a = std::min(a, alignment(reinterpret_cast<const void*>(uintptr_t(stride) * elem_bytes(t))));
  return a;
}

void set_scale_pointers(const Plan& p, const LtMatmul& g) {
  if (g.a_scale_mode < 0) return;
  DSV3_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &g.a_scale, sizeof g.a_scale));
  DSV3_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &g.b_scale, sizeof g.b_scale));
}

// One heuristic query at sizes m, n, k; false when cuBLASLt offers no algorithm.
bool build(const LtMatmul& g, int64_t m, int64_t n, int64_t k, Plan& p) {
  DSV3_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t ta = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  DSV3_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
  DSV3_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
  if (g.a_scale_mode >= 0) {
    auto ma = cublasLtMatmulMatrixScale_t(g.a_scale_mode), mb = cublasLtMatmulMatrixScale_t(g.b_scale_mode);
    DSV3_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &ma, sizeof ma));
    DSV3_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mb, sizeof mb));
    set_scale_pointers(p, g);  // cuBLASLt rejects block-scaled modes without them
  }
  DSV3_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.la, g.a_type, 1, 1, 1));
  DSV3_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.lb, g.b_type, 1, 1, 1));
  DSV3_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.lc, g.c_type, 1, 1, 1));
  if (g.pointer_array) {
    const uint32_t mode = CUBLASLT_BATCH_MODE_POINTER_ARRAY;
    for (cublasLtMatrixLayout_t l : {p.la, p.lb, p.lc})
      DSV3_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_MODE, &mode, sizeof mode));
  }
  set_sizes(p, g, m, n, k);
  cublasLtMatmulPreference_t pref;
  DSV3_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  size_t ws = kWorkspace;
  DSV3_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
  const uint32_t al[3] = {align_of(g, g.a, g.stride_a, g.a_type), align_of(g, g.b, g.stride_b, g.b_type),
                          align_of(g, g.c, g.stride_c, g.c_type)};
  DSV3_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al[0], 4));
  DSV3_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al[1], 4));
  DSV3_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al[2], 4));
  DSV3_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al[2], 4));
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle(), p.desc, p.la, p.lb, p.lc, p.lc, pref, 1, &res, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  p.algo = res.algo;
  return st == CUBLAS_STATUS_SUCCESS && found > 0;
}

std::mutex g_mu;
std::map<Key, Plan>& plans() {
  static auto* m = new std::map<Key, Plan>;  // never destroyed: calls may come from static destructors
  return *m;
}
// Exact sizes whose bucket's algorithm cuBLASLt rejected: they go straight to their own plan.
std::set<Key>& rejected() {
  static auto* s = new std::set<Key>;
  return *s;
}

// Free dimensions: n is only B's column count when B is not transposed (C's columns are n too);
// k only the column count of both when A is not transposed and B is.
Key key_of(const LtMatmul& g, bool bucketed) {
  const bool n_free = bucketed && !g.trans_b, k_free = bucketed && !g.trans_a && g.trans_b;
  return Key{g.a_type,
             g.b_type,
             g.c_type,
             g.trans_a,
             g.trans_b,
             g.m,
             n_free ? bucket(g.n) : g.n,
             k_free ? bucket(g.k) : g.k,
             g.lda,
             g.ldb,
             g.ldc,
             align_of(g, g.a, g.stride_a, g.a_type),
             align_of(g, g.b, g.stride_b, g.b_type),
             align_of(g, g.c, g.stride_c, g.c_type),
             g.a_scale_mode,
             g.b_scale_mode,
             g.pointer_array ? 2 : g.batch > 1 ? 1 : 0,
             bucketed && g.batch > 1 ? bucket(g.batch) : g.batch};
}

// The plan for a key (one heuristic query at the key's sizes, then cached, "none" included).
const Plan* plan_for(const LtMatmul& g, const Key& key) {
  auto it = plans().find(key);
  if (it == plans().end()) {
    Plan p;
    if (!build(g, key[5], key[6], key[7], p)) destroy(p);
    it = plans().emplace(key, p).first;
  }
  return it->second.desc ? &it->second : nullptr;
}

cublasStatus_t run(const Plan& p, const LtMatmul& g) {
  set_sizes(p, g, g.m, g.n, g.k);
  set_scale_pointers(p, g);
  const cudaStream_t s = stream();
  return cublasLtMatmul(handle(), p.desc, &g.alpha, g.a, p.la, g.b, p.lb, &g.beta, g.c, p.lc, g.c, p.lc, &p.algo,
                        workspace(s), kWorkspace, s);
}

}  // namespace

bool lt_try_matmul(const LtMatmul& g) {
  if (g.m == 0 || g.n == 0) return true;
  if (g.k == 0) {  // an empty sum: D = beta·C
    DSV3_CHECK(g.beta == 0.0f || g.beta == 1.0f, "lt_matmul: an empty product with beta ", g.beta);
    DSV3_CHECK(!g.pointer_array, "lt_matmul: an empty product in a pointer-array batch");
    const size_t es = g.c_type == CUDA_R_32F ? 4 : 2;
    if (g.beta == 0.0f) DSV3_CUDA_CHECK(cudaMemset2DAsync(g.c, size_t(g.ldc) * es, 0, size_t(g.m) * es, size_t(g.n), stream()));
    return true;
  }
  std::lock_guard<std::mutex> lk(g_mu);  // plans carry per-call sizes and scale pointers
  const Key exact = key_of(g, false), bucketed = key_of(g, true);
  const bool own_plan = exact == bucketed || rejected().count(exact) > 0;
  const Plan* p = plan_for(g, own_plan ? exact : bucketed);
  cublasStatus_t st = p ? run(*p, g) : CUBLAS_STATUS_NOT_SUPPORTED;
  if (!own_plan && (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE)) {
    rejected().insert(exact);
    p = plan_for(g, exact);
    st = p ? run(*p, g) : CUBLAS_STATUS_NOT_SUPPORTED;
  }
  if (st == CUBLAS_STATUS_NOT_SUPPORTED) return false;
  if (st != CUBLAS_STATUS_SUCCESS)
    internal_error("cuBLASLt matmul of ", g.m, "×", g.k, " · ", g.k, "×", g.n, " (types ", int(g.a_type), "/",
                   int(g.b_type), " → ", int(g.c_type), ", scale modes ", g.a_scale_mode, "/", g.b_scale_mode,
                   ", batch ", g.batch, g.pointer_array ? " by pointer arrays" : "", ") failed: status ", int(st));
  return true;
}

void lt_matmul(const LtMatmul& g) {
  if (!lt_try_matmul(g))
    internal_error("cuBLASLt has no algorithm for the matmul of ", g.m, "×", g.k, " · ", g.k, "×", g.n, " (types ",
                   int(g.a_type), "/", int(g.b_type), " → ", int(g.c_type), ", scale modes ", g.a_scale_mode, "/",
                   g.b_scale_mode, ")");
}

int64_t lt_plan_count() {
  std::lock_guard<std::mutex> lk(g_mu);
  return int64_t(plans().size());
}

}  // namespace dsv3::cuda
