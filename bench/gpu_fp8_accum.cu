// FP8 accumulation precision measured on the GPU itself ([V3] §3.3.2: "in a K = 4096 GEMM ... the
// limited accumulation precision in Tensor Cores results in a maximum relative error of nearly 2%"),
// beside the CPU emulation of bench/fp8_accum.cpp on the very same E4M3 operands.
//
// Columns, each against the double-precision product of the dequantized operands:
//   mma chain     one warp per 16×8 output tile, `mma.sync.m16n8k32` E4M3 → F32 with the accumulator
//                 fed back into every MMA for the whole of K (no promotion: what the tensor core keeps)
//   mma promote   the same MMAs, but the tensor-core accumulator is added into separate FP32 registers
//                 and cleared every N_C = 128 elements (DeepGEMM's promotion)
//   lt fast       cuBLASLt per-tensor-scaled FP8 matmul with CUBLASLT_MATMUL_DESC_FAST_ACCUM = 1
//                 (cuBLAS's documented "no periodic promotion" mode), split-K forced to 1
//   lt default    the same with FAST_ACCUM = 0 (cuBLAS promotes)
//   emu acc/prod  our emulation (backend/fp8.h Fp8Accum::Limited, 14 bits), no promotion
//   emu N_C=128   the same with promotion every 128
// Inputs and the error measures are those of bench/fp8_accum.cpp. Writes bench/results/gpu_fp8_accum.json.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "backend/fp8.h"
#include "common/bench_util.h"
#include "common/fp8_accum_util.h"
#include "common/gpu_bench.h"
#include "core/rng.h"

using namespace dsv3;

namespace {

// a: [M, K] E4M3 row-major; b: [N, K] E4M3 (k contiguous, the MMA's column-major B); c: [M, N] F32.
// One warp per 16×8 tile. promote = 0: one accumulator chain over all of K.
__global__ void mma_probe(const uint8_t* a, const uint8_t* b, float* c, int M, int N, int K, int promote) {
  int tiles_n = N / 8;
  int tile = blockIdx.x;
  int m0 = (tile / tiles_n) * 16, n0 = (tile % tiles_n) * 8;
  int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  float d[4] = {0, 0, 0, 0}, total[4] = {0, 0, 0, 0};
  auto ld32 = [](const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); };
  for (int k0 = 0; k0 < K; k0 += 32) {
    uint32_t a0 = ld32(a + size_t(m0 + g) * K + k0 + t * 4);
    uint32_t a1 = ld32(a + size_t(m0 + g + 8) * K + k0 + t * 4);
    uint32_t a2 = ld32(a + size_t(m0 + g) * K + k0 + 16 + t * 4);
    uint32_t a3 = ld32(a + size_t(m0 + g + 8) * K + k0 + 16 + t * 4);
    uint32_t b0 = ld32(b + size_t(n0 + g) * K + k0 + t * 4);
    uint32_t b1 = ld32(b + size_t(n0 + g) * K + k0 + 16 + t * 4);
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    if (promote > 0 && (k0 + 32) % promote == 0) {
      for (int i = 0; i < 4; ++i) {
        total[i] += d[i];
        d[i] = 0;
      }
    }
  }
  for (int i = 0; i < 4; ++i) total[i] += d[i];
  int r = m0 + g, col = n0 + t * 2;
  c[size_t(r) * N + col] = total[0];
  c[size_t(r) * N + col + 1] = total[1];
  c[size_t(r + 8) * N + col] = total[2];
  c[size_t(r + 8) * N + col + 1] = total[3];
}

// c[M, N] (row-major) = a·bᵀ through cuBLASLt FP8 (per-tensor scale 1). Column-major view: cᵀ [N, M] =
// bᵀᵀ... i.e. D(N×M) = op(B)·op(A) with B as the "A" operand (TN layout, the one FP8 supports).
// Returns the split-K count of the algorithm used.
int lt_gemm(cublasLtHandle_t lt, const uint8_t* a, const uint8_t* b, float* c, int M, int N, int K, bool fast,
            void* ws, size_t ws_bytes) {
  cublasLtMatmulDesc_t desc;
  CK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
  CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
  int8_t f = fast ? 1 : 0;
  CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &f, sizeof f));
  cublasLtMatrixLayout_t la, lb, lc;
  CK(cublasLtMatrixLayoutCreate(&la, CUDA_R_8F_E4M3, K, N, K));  // b rows as columns: op = T
  CK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_8F_E4M3, K, M, K));
  CK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, N, M, N));
  cublasLtMatmulPreference_t pref;
  CK(cublasLtMatmulPreferenceCreate(&pref));
  CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                          sizeof ws_bytes));
  cublasLtMatmulHeuristicResult_t res[16];
  int n = 0;
  CK(cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, lc, pref, 16, res, &n));
  if (n == 0) {
    std::fprintf(stderr, "cuBLASLt: no FP8 algorithm for %dx%dx%d\n", M, N, K);
    std::exit(1);
  }
  // Split-K would add K slices in FP32 outside the tensor core (a promotion of its own): force 1.
  cublasLtMatmulAlgo_t algo = res[0].algo;
  int32_t one = 1;
  CK(cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &one, sizeof one));
  int32_t splitk = 0;
  size_t got = 0;
  CK(cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, sizeof splitk, &got));
  float alpha = 1, beta = 0;
  CK(cublasLtMatmul(lt, desc, &alpha, b, la, a, lb, &beta, c, lc, c, lc, &algo, ws, ws_bytes, nullptr));
  CK(cudaDeviceSynchronize());
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatmulDescDestroy(desc);
  return splitk;
}

// E4M3 bytes of x with one power-of-two scale for the whole operand (as bench/fp8_accum.cpp); the bytes
// are what the tensor core multiplies, the scale (exact) is left out of every column alike.
std::vector<uint8_t> quant(const std::vector<float>& x) {
  float s = bench::pow2_operand_scale(x.data(), x.size());
  std::vector<uint8_t> q(x.size());
  for (size_t i = 0; i < x.size(); ++i) q[i] = float_to_e4m3(x[i] / s);
  return q;
}

bench::AccumErr emulate(const std::vector<uint8_t>& qa, const std::vector<uint8_t>& qb, int mn, int K, int64_t promote,
            bool aligned, const std::vector<double>& ref) {
  int64_t kb = (K + 127) / 128;
  Tensor a = Tensor::empty(DType::F8_E4M3, {mn, K}), b = Tensor::empty(DType::F8_E4M3, {mn, K});
  std::memcpy(a.raw(), qa.data(), qa.size());
  std::memcpy(b.raw(), qb.data(), qb.size());
  Tensor sa = Tensor::empty(DType::F32, {mn, kb}), sb = Tensor::empty(DType::F32, {mn, kb});
  for (int64_t i = 0; i < mn * kb; ++i) sa.data<float>()[i] = sb.data<float>()[i] = 1.0f;
  return bench::emulated_gemm_error(a, sa, b, sb, ref, Fp8Accum::Limited, 14, promote, aligned);
}

}  // namespace

int main(int argc, char** argv) {
  int mn = 64;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--mn") && i + 1 < argc) {
      mn = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--mn 64]  (M = N, a multiple of 16)\n", argv[0]);
      return 2;
    }
  }
  if (mn <= 0 || mn % 16) {
    std::fprintf(stderr, "--mn must be a positive multiple of 16, got %d\n", mn);
    return 2;
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  cublasLtHandle_t lt;
  CK(cublasLtCreate(&lt));
  size_t ws_bytes = size_t(32) << 20;
  void* ws;
  CK(cudaMalloc(&ws, ws_bytes));
  std::printf("FP8 E4M3 accumulation on %s: max relative error over %dx%d outputs (frob in brackets)\n", prop.name,
              mn, mn);
  std::printf("%-7s %6s | %-17s %-17s | %-17s %-17s | %-17s %-17s %-17s\n", "inputs", "K", "mma chain",
              "mma promote 128", "lt fast-accum", "lt default", "emu acc", "emu prod", "emu acc N_C=128");
  nlohmann::json rows = nlohmann::json::array();
  int splitk_seen = 0;
  for (const char* dist : {"uniform", "normal"})
    for (int K : {256, 1024, 4096, 16384}) {
      bool uni = !std::strcmp(dist, "uniform");
      std::vector<float> x(size_t(mn) * K), w(size_t(mn) * K);
      for (size_t i = 0; i < x.size(); ++i) {
        x[i] = bench::accum_input(uni, 1, i);
        w[i] = bench::accum_input(uni, 2, i);
      }
      std::vector<uint8_t> qa = quant(x), qb = quant(w);
      std::vector<double> da(qa.size()), db(qb.size());
      for (size_t i = 0; i < qa.size(); ++i) {
        da[i] = e4m3_to_float(qa[i]);
        db[i] = e4m3_to_float(qb[i]);
      }
      std::vector<double> ref(size_t(mn) * mn);
      for (int i = 0; i < mn; ++i)
        for (int j = 0; j < mn; ++j) {
          double s = 0;
          for (int k = 0; k < K; ++k) s += da[size_t(i) * K + k] * db[size_t(j) * K + k];
          ref[size_t(i) * mn + j] = s;
        }
      uint8_t *ga, *gb;
      float* gc;
      CK(cudaMalloc(&ga, qa.size()));
      CK(cudaMalloc(&gb, qb.size()));
      CK(cudaMalloc(&gc, ref.size() * sizeof(float)));
      CK(cudaMemcpy(ga, qa.data(), qa.size(), cudaMemcpyHostToDevice));
      CK(cudaMemcpy(gb, qb.data(), qb.size(), cudaMemcpyHostToDevice));
      std::vector<float> c(ref.size());
      auto run_mma = [&](int promote) {
        mma_probe<<<(mn / 16) * (mn / 8), 32>>>(ga, gb, gc, mn, mn, K, promote);
        CK(cudaGetLastError());
        CK(cudaMemcpy(c.data(), gc, c.size() * sizeof(float), cudaMemcpyDeviceToHost));
        return bench::accum_error(c.data(), ref);
      };
      auto run_lt = [&](bool fast) {
        splitk_seen = std::max(splitk_seen, lt_gemm(lt, ga, gb, gc, mn, mn, K, fast, ws, ws_bytes));
        CK(cudaMemcpy(c.data(), gc, c.size() * sizeof(float), cudaMemcpyDeviceToHost));
        return bench::accum_error(c.data(), ref);
      };
      bench::AccumErr chain = run_mma(0), prom = run_mma(128), fast = run_lt(true), dflt = run_lt(false);
      bench::AccumErr eacc = emulate(qa, qb, mn, K, 0, true, ref), eprod = emulate(qa, qb, mn, K, 0, false, ref);
      bench::AccumErr eprom = emulate(qa, qb, mn, K, 128, true, ref);
      auto cell = [](const bench::AccumErr& e) {
        static char buf[8][40];
        static int i = 0;
        char* s = buf[i++ % 8];
        std::snprintf(s, 40, "%7.4f%% (%6.4f%%)", 100 * e.max_rel, 100 * e.frob);
        return s;
      };
      std::printf("%-7s %6d | %-17s %-17s | %-17s %-17s | %-17s %-17s %-17s\n", dist, K, cell(chain), cell(prom),
                  cell(fast), cell(dflt), cell(eacc), cell(eprod), cell(eprom));
      rows.push_back({{"inputs", dist},
                      {"K", K},
                      {"gpu_mma_no_promotion", bench::to_json(chain)},
                      {"gpu_mma_promote_128", bench::to_json(prom)},
                      {"cublaslt_fast_accum", bench::to_json(fast)},
                      {"cublaslt_default", bench::to_json(dflt)},
                      {"emulation_acc_aligned", bench::to_json(eacc)},
                      {"emulation_products_aligned", bench::to_json(eprod)},
                      {"emulation_acc_aligned_promote_128", bench::to_json(eprom)}});
      cudaFree(ga);
      cudaFree(gb);
      cudaFree(gc);
    }
  std::string path = bench::write_result(
      "gpu_fp8_accum",
      {{"bench", "gpu_fp8_accum"},
       {"gpu", prop.name},
       {"M", mn},
       {"N", mn},
       {"quantization", "E4M3, one power-of-two scale per operand (left out of every column alike)"},
       {"reference", "double-precision product of the same dequantized FP8 operands"},
       {"cublaslt_split_k", splitk_seen},
       {"paper", "[V3] 3.3.2: K = 4096, ~14-bit accumulation, max relative error nearly 2%"},
       {"rows", rows}});
  std::printf("cuBLASLt split-K used: %d\nwrote %s\n", splitk_seen, path.c_str());
  cublasLtDestroy(lt);
  cudaFree(ws);
  return 0;
}
