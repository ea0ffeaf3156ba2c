// GPU GEMM benchmark (bench/gpu.sh runs it on the H200): block-scaled FP8 GEMM TFLOP/s through our
// backend entry (cuda_fp8_gemm: validation, cached plan, cuBLASLt) against cuBLASLt called directly
// with the same scale modes, and a BF16 cuBLAS GEMM of the same shape, at 4096×7168×2048 (M×N×K)
// and 8192³. Sampled outputs are checked against a host dot product of the dequantized operands.
// Writes bench/results/gpu_gemm.json; the roofline figure (989 dense BF16 / 1979 FP8 TFLOP/s, H100/H200
// SXM spec) is printed beside each number.
#include <cstdio>
#include <cstdlib>

#include "common/bench_util.h"

#ifndef DSV3_HAVE_CUDA
int main() {
  std::puts("gpu_gemm: built without CUDA");
  return 1;
}
#else
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "common/gpu_bench.h"

using namespace dsv3;

namespace {

constexpr double kPeakBf16 = 989e12, kPeakFp8 = 1979e12;

uint64_t lcg(uint64_t& s) {
  s = s * 6364136223846793005ull + 1442695040888963407ull;
  return s >> 33;
}

// Random E4M3 bytes of moderate magnitude (no NaN: exponent field kept below the top).
Tensor random_fp8(int64_t r, int64_t c, uint64_t seed) {
  Tensor t = Tensor::empty(DType::F8_E4M3, {r, c});
  uint8_t* p = static_cast<uint8_t*>(t.raw());
  for (int64_t i = 0; i < r * c; ++i) p[i] = uint8_t(lcg(seed) & 0xB7);  // sign, exp ≤ 6, mantissa
  return t;
}
Tensor random_scales(int64_t r, int64_t c, uint64_t seed) {
  Tensor t = Tensor::empty(DType::F32, {r, c});
  for (int64_t i = 0; i < r * c; ++i) t.data<float>()[i] = 0.5f + float(lcg(seed) % 1000) / 1000.0f;
  return t;
}

struct Direct {  // cuBLASLt called straight, same layout and modes as cuda_fp8_gemm
  cublasLtHandle_t h;
  cublasLtMatmulDesc_t d;
  cublasLtMatrixLayout_t la, lb, lc;
  cublasLtMatmulAlgo_t algo;
  void* ws;
  size_t wss = 32u << 20;
  Direct(int64_t m, int64_t n, int64_t k, const void* sw, const void* sx) {
    CK(cublasLtCreate(&h));
    CK(cublasLtMatmulDescCreate(&d, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t t = CUBLAS_OP_T, nn = CUBLAS_OP_N;
    CK(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t));
    CK(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSB, &nn, sizeof nn));
    cublasLtMatmulMatrixScale_t ma = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F,
                                mb = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    CK(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &ma, sizeof ma));
    CK(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mb, sizeof mb));
    CK(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sw, sizeof sw));
    CK(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sx, sizeof sx));
    CK(cublasLtMatrixLayoutCreate(&la, CUDA_R_8F_E4M3, uint64_t(k), uint64_t(n), k));
    CK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_8F_E4M3, uint64_t(k), uint64_t(m), k));
    CK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, uint64_t(n), uint64_t(m), n));
    cublasLtMatmulPreference_t p;
    CK(cublasLtMatmulPreferenceCreate(&p));
    CK(cublasLtMatmulPreferenceSetAttribute(p, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wss, sizeof wss));
    cublasLtMatmulHeuristicResult_t r{};
    int found = 0;
    CK(cublasLtMatmulAlgoGetHeuristic(h, d, la, lb, lc, lc, p, 1, &r, &found));
    if (!found) std::exit(1);
    algo = r.algo;
    CK(cudaMalloc(&ws, wss));
  }
  void run(const void* w, const void* x, void* c) {
    float al = 1, be = 0;
    CK(cublasLtMatmul(h, d, &al, w, la, x, lb, &be, c, lc, c, lc, &algo, ws, wss, nullptr));
  }
};

}  // namespace

int main() {
  CudaBackend& be = cuda_backend();
  nlohmann::json rows = nlohmann::json::array();
  std::printf("%-18s %12s %12s %12s %10s %12s %12s\n", "M×N×K", "ours FP8", "cuBLASLt", "ours/Lt", "BF16",
              "FP8/BF16", "max rel err");
  cublasHandle_t hb;
  CK(cublasCreate(&hb));
  for (auto [m, n, k] : {std::array<int64_t, 3>{4096, 7168, 2048}, std::array<int64_t, 3>{8192, 8192, 8192}}) {
    Tensor x = random_fp8(m, k, 1), w = random_fp8(n, k, 2);
    Tensor sx = random_scales(m, k / 128, 3), sw = random_scales(n / 128, k / 128, 4);
    Tensor dx = be.to_device(x), dw = be.to_device(w), dsx = be.to_device(sx), dsw = be.to_device(sw);
    Tensor c = be.alloc(DType::BF16, {m, n}), c2 = be.alloc(DType::BF16, {m, n});
    double flops = 2.0 * double(m) * double(n) * double(k);
    double t_ours = bench::gpu_time_s([&] { cuda_fp8_gemm({dx, dsx, dw, dsw, c}); });
    Direct direct(m, n, k, dsw.raw(), dsx.raw());
    double t_lt = bench::gpu_time_s([&] { direct.run(dw.raw(), dx.raw(), c2.raw()); });
    // Sampled check of ours against the dequantized host product.
    Tensor ch = be.to_host(c);
    uint64_t s = 99;
    double max_err = 0, max_ref = 0;
    std::vector<std::pair<double, double>> samples;
    for (int i = 0; i < 48; ++i) {
      int64_t r = int64_t(lcg(s) % uint64_t(m)), col = int64_t(lcg(s) % uint64_t(n));
      double ref = 0;
      for (int64_t kk = 0; kk < k; ++kk)
        ref += double(e4m3_to_float(static_cast<uint8_t*>(x.raw())[r * k + kk])) * sx.data<float>()[r * (k / 128) + kk / 128] *
               double(e4m3_to_float(static_cast<uint8_t*>(w.raw())[col * k + kk])) *
               sw.data<float>()[(col / 128) * (k / 128) + kk / 128];
      samples.push_back({ref, double(bf16_to_float(static_cast<uint16_t*>(ch.raw())[r * n + col]))});
      max_ref = std::max(max_ref, std::fabs(ref));
    }
    for (auto [ref, got] : samples) max_err = std::max(max_err, std::fabs(ref - got) / max_ref);
    // BF16 GEMM of the same shape (cuBLAS, FP32 accumulation), on zeroed operands.
    Tensor ab = be.zeros(DType::BF16, {m, k}), bb = be.zeros(DType::BF16, {n, k}), cb = be.alloc(DType::BF16, {m, n});
    float al = 1, bt = 0;
    double t_bf16 = bench::gpu_time_s([&] {
      CK(cublasGemmEx(hb, CUBLAS_OP_T, CUBLAS_OP_N, int(n), int(m), int(k), &al, bb.raw(), CUDA_R_16BF, int(k),
                      ab.raw(), CUDA_R_16BF, int(k), &bt, cb.raw(), CUDA_R_16BF, int(n), CUBLAS_COMPUTE_32F,
                      CUBLAS_GEMM_DEFAULT));
    });
    double tf_ours = flops / t_ours / 1e12, tf_lt = flops / t_lt / 1e12, tf_bf16 = flops / t_bf16 / 1e12;
    std::string shape = std::to_string(m) + "x" + std::to_string(n) + "x" + std::to_string(k);
    std::printf("%-18s %8.0f TF/s %8.0f TF/s %12.3f %6.0f TF/s %12.2f %12.2e\n", shape.c_str(), tf_ours, tf_lt,
                tf_ours / tf_lt, tf_bf16, tf_ours / tf_bf16, max_err);
    rows.push_back({{"shape", shape},
                    {"m", m},
                    {"n", n},
                    {"k", k},
                    {"fp8_ours_tflops", tf_ours},
                    {"fp8_cublaslt_direct_tflops", tf_lt},
                    {"fp8_ours_over_cublaslt", tf_ours / tf_lt},
                    {"bf16_cublas_tflops", tf_bf16},
                    {"fp8_over_bf16", tf_ours / tf_bf16},
                    {"fp8_roofline_fraction", flops / t_ours / kPeakFp8},
                    {"bf16_roofline_fraction", flops / t_bf16 / kPeakBf16},
                    {"sampled_max_rel_err", max_err}});
  }
  std::printf("roofline: FP8 %.0f TFLOP/s, BF16 %.0f TFLOP/s (dense, spec)\n", kPeakFp8 / 1e12, kPeakBf16 / 1e12);
  nlohmann::json res = {{"bench", "gpu_gemm"}, {"rows", rows}, {"peak_fp8_tflops", 1979}, {"peak_bf16_tflops", 989}};
  std::printf("wrote %s\n", dsv3::bench::write_result("gpu_gemm", res).c_str());
  return 0;
}
#endif
