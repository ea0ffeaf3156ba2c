// Absorbed-MLA decode kernel bandwidth (bench/gpu.sh runs it on the H200): batch 64, context 4096,
// BF16 latent rows of 576 over the paged cache (64-token blocks in shuffled order), 16 and 128 heads.
// Baseline in the same run: a device-to-device cudaMemcpy of the same number of bytes. Bandwidth
// counts HBM traffic: the kernel reads the cache once (q and outputs are < 1% extra); the copy reads
// and writes, so its traffic is 2× the bytes. Writes bench/results/gpu_mla_decode.json.
#include <cstdio>
#include <cstdlib>

#include "common/bench_util.h"

#ifndef DSV3_HAVE_CUDA
int main() {
  std::puts("gpu_mla_decode: built without CUDA");
  return 1;
}
#else
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/mla_decode.h"

using namespace dsv3;

namespace {
template <class F> double time_s(F&& f, int iters = 20) {
  for (int i = 0; i < 3; ++i) f();
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::vector<double> t;
  for (int r = 0; r < 5; ++r) {
    cudaEventRecord(a);
    for (int i = 0; i < iters; ++i) f();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    t.push_back(ms / 1e3 / iters);
  }
  std::sort(t.begin(), t.end());
  return t[2];
}
}  // namespace

int main() {
  CudaBackend& be = cuda_backend();
  const int64_t B = 64, ctx = 4096, W = 576, R = 512, bs = 64, nblk = ctx / bs;
  Tensor table = Tensor::empty(DType::I32, {B, nblk});
  for (int64_t i = 0; i < B * nblk; ++i) table.data<int32_t>()[i] = int32_t((i * 7919) % (B * nblk));  // a permutation
  Tensor lens = Tensor::empty(DType::I32, {B});
  for (int64_t b = 0; b < B; ++b) lens.data<int32_t>()[b] = int32_t(ctx);
  // Random data (not a constant: METHOD.md saw constant/zero inputs time faster than real ones).
  Tensor pool_h = Tensor::empty(DType::BF16, {B * ctx, W});
  for (int64_t i = 0; i < B * ctx * W; ++i)
    pool_h.data<bf16>()[i].bits = float_to_bf16(float(int64_t((uint64_t(i) * 2654435761u) >> 12 & 1023) - 512) / 512.0f);
  Tensor pool = be.to_device(pool_h);
  Tensor dt = be.to_device(table), dl = be.to_device(lens);
  double bytes = double(B) * double(ctx) * double(W) * 2.0;
  Tensor dst = be.alloc(DType::BF16, {B * ctx, W});
  double t_copy = time_s([&] { cudaMemcpy(dst.raw(), pool.raw(), size_t(bytes), cudaMemcpyDeviceToDevice); });
  double copy_bw = 2 * bytes / t_copy;
  std::printf("device-to-device copy: %.0f GB/s (read + write traffic)\n", copy_bw / 1e9);
  nlohmann::json rows = nlohmann::json::array();
  double frac16 = 0;
  for (int64_t H : {int64_t(16), int64_t(64), int64_t(128)}) {
    Tensor qh = Tensor::empty(DType::F32, {B, H, W});
    for (int64_t i = 0; i < B * H * W; ++i) qh.data<float>()[i] = float(int64_t((uint64_t(i) * 40503u) >> 6 & 255) - 128) / 1024.0f;
    Tensor q = be.to_device(qh), out = be.alloc(DType::F32, {B, H, R});
    MlaDecodeArgs a;
    a.q = q;
    a.pool = pool;
    a.block_table = dt;
    a.lengths = dl;
    a.max_len = ctx;
    a.scale = 0.07f;
    a.out = out;
    double t = time_s([&] { cuda_mla_decode(a); });
    double bw = bytes / t, flops = 2.0 * double(B) * double(H) * double(ctx) * double(W + R);
    std::printf("H=%3ld: %8.1f us  %6.0f GB/s  %.2f of copy  %6.1f TFLOP/s (BF16 mma.sync; dense peak 989)\n", long(H),
                t * 1e6, bw / 1e9, bw / copy_bw, flops / t / 1e12);
    if (H == 16) frac16 = bw / copy_bw;
    rows.push_back({{"heads", H},
                    {"batch", B},
                    {"context", ctx},
                    {"time_us", t * 1e6},
                    {"cache_bytes", bytes},
                    {"gbps", bw / 1e9},
                    {"fraction_of_copy", bw / copy_bw},
                    {"tflops", flops / t / 1e12}});
  }
  nlohmann::json res = {{"bench", "gpu_mla_decode"},
                        {"copy_gbps_read_plus_write", copy_bw / 1e9},
                        {"rows", rows},
                        {"mla_decode_bw_fraction_h16", frac16}};
  if (const char* c = std::getenv("DSV3_COMMIT")) res["commit"] = c;
  std::printf("wrote %s\n", dsv3::bench::write_result("gpu_mla_decode", res).c_str());
  return 0;
}
#endif
