// Absorbed-MLA decode kernel bandwidth (bench/gpu.sh runs it on the H200): batch 64, context 4096,
// BF16 latent rows of 576 over the paged cache (64-token blocks in shuffled order), 16, 64 and 128
// heads. Baseline in the same run: a device-to-device cudaMemcpy of the same number of bytes.
// Bandwidth counts HBM traffic: the kernel reads the cache once (q and outputs are < 1% extra at 16
// heads); the copy reads and writes, so its traffic is 2× the bytes. Every compiled kernel shape
// (mla_decode_configs) is timed at every head count, and the 16-head default at several splits;
// `rows` and the top-level fractions are the default (what cuda_mla_decode runs). Rooflines: copy
// bandwidth for the bytes, 989 TFLOP/s dense BF16 for 2·H·(576 + 512) FLOPs per cached row.
// At 16 heads every shape is also timed with the block table pointing at 64 blocks only (4.7 MB,
// resident in L2): the kernel's time when HBM is not the limit. `--heads N` times one head count;
// `--only S` / `--skip S` time only the shapes whose name contains S / does not (the default always).
// Writes bench/results/gpu_mla_decode.json.
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
#include <exception>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "common/gpu_bench.h"
#include "backend/cuda/mla_decode.h"

using namespace dsv3;

namespace {
constexpr double kBf16Peak = 989e12;
}  // namespace

int main(int argc, char** argv) {
  int64_t only_heads = 0;
  std::string only, skip;
  for (int i = 1; i < argc; ++i) {
    const std::string o = argv[i];
    if (o == "--heads" && i + 1 < argc) {
      only_heads = std::atol(argv[++i]);
    } else if (o == "--only" && i + 1 < argc) {
      only = argv[++i];
    } else if (o == "--skip" && i + 1 < argc) {
      skip = argv[++i];
    } else {
      std::fprintf(stderr,
                   "usage: %s [--heads N] [--only S] [--skip S]\n  --heads N  time only N heads (default: 16, 64 "
                   "and 128)\n  --only S   only the shapes whose name contains S (default: all)\n  --skip S   "
                   "not the shapes whose name contains S (default: none)\n",
                   argv[0]);
      return 2;
    }
  }
  auto wanted = [&](const MlaDecodeConfig& c) {
    const std::string n = mla_decode_config_name(c);
    return (only.empty() || n.find(only) != std::string::npos) && (skip.empty() || n.find(skip) == std::string::npos);
  };
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
  Tensor hot = Tensor::empty(DType::I32, {B, nblk});
  for (int64_t i = 0; i < B * nblk; ++i) hot.data<int32_t>()[i] = int32_t((i * 7919) % 64);
  Tensor dhot = be.to_device(hot);
  double bytes = double(B) * double(ctx) * double(W) * 2.0;
  Tensor dst = be.alloc(DType::BF16, {B * ctx, W});
  double t_copy = bench::gpu_time_s([&] { cudaMemcpy(dst.raw(), pool.raw(), size_t(bytes), cudaMemcpyDeviceToDevice); });
  double copy_bw = 2 * bytes / t_copy;
  std::printf("device-to-device copy: %.0f GB/s (read + write traffic)\n", copy_bw / 1e9);
  std::printf("B=%ld context=%ld: %.0f MB of cache rows\n", long(B), long(ctx), bytes / 1e6);
  std::printf("%-22s %5s %6s %9s %8s %6s %8s %6s %6s\n", "kernel", "heads", "splits", "time_us", "GB/s", "copy",
              "TFLOP/s", "peak", "roof");
  nlohmann::json rows = nlohmann::json::array(), configs = nlohmann::json::array(), hot_l2 = nlohmann::json::array();
  nlohmann::json res = {{"bench", "gpu_mla_decode"}, {"copy_gbps_read_plus_write", copy_bw / 1e9}};
  for (int64_t H : {int64_t(16), int64_t(64), int64_t(128)}) {
    if (only_heads && H != only_heads) continue;
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
    const double flops = 2.0 * double(B) * double(H) * double(ctx) * double(W + R);
    // The roofline: the larger of reading the cache at copy speed and the FLOPs at the BF16 peak.
    const double t_roof = std::max(bytes / copy_bw, flops / kBf16Peak);
    auto measure = [&](const MlaDecodeConfig& c) {
      int64_t splits = 0;
      double t = 0;
      try {
        t = bench::gpu_time_s([&] { splits = cuda_mla_decode_with(a, c); });
      } catch (const std::exception& e) {  // one shape that cannot launch here must not end the run
        std::printf("%-22s %5ld failed: %s\n", mla_decode_config_name(c).c_str(), long(H), e.what());
        cudaGetLastError();
        return nlohmann::json{{"kernel", mla_decode_config_name(c)}, {"heads", H}, {"error", e.what()}};
      }
      double bw = bytes / t, tf = flops / t;
      std::printf("%-22s %5ld %6ld %9.1f %8.0f %6.2f %8.1f %6.2f %6.2f\n", mla_decode_config_name(c).c_str(), long(H),
                  long(splits), t * 1e6, bw / 1e9, bw / copy_bw, tf / 1e12, tf / kBf16Peak, t_roof / t);
      return nlohmann::json{{"kernel", mla_decode_config_name(c)},
                            {"heads", H},
                            {"splits", splits},
                            {"time_us", t * 1e6},
                            {"gbps", bw / 1e9},
                            {"fraction_of_copy", bw / copy_bw},
                            {"tflops", tf / 1e12},
                            {"fraction_of_bf16_peak", tf / kBf16Peak},
                            {"fraction_of_roofline", t_roof / t}};
    };
    for (const MlaDecodeConfig& c : mla_decode_configs()) {
      if (c.heads_per_cta > H || !wanted(c)) continue;
      configs.push_back(measure(c));
    }
    MlaDecodeConfig def = mla_decode_default_config(H);
    if (H == 16 && wanted(def))
      for (int sp : {1, 2, 3, 4, 8}) {
        MlaDecodeConfig c = def;
        c.splits = sp;
        configs.push_back(measure(c));
      }
    if (H == 16) {
      std::printf("rows resident in L2 (the block table points at 64 blocks):\n");
      a.block_table = dhot;
      for (const MlaDecodeConfig& c : mla_decode_configs())
        if (c.heads_per_cta == 16 && wanted(c)) hot_l2.push_back(measure(c));
      a.block_table = dt;
    }
    nlohmann::json r = measure(def);
    r["batch"] = B;
    r["context"] = ctx;
    r["cache_bytes"] = bytes;
    r["default"] = true;
    rows.push_back(r);
    const std::string k = std::to_string(H);
    res["mla_decode_bw_fraction_h" + k] = r["fraction_of_copy"];
    res["mla_decode_tflops_h" + k] = r["tflops"];
    res["mla_decode_bf16_peak_fraction_h" + k] = r["fraction_of_bf16_peak"];
    res["mla_decode_roofline_fraction_h" + k] = r["fraction_of_roofline"];
    std::printf("H=%3ld default (%s): %.2f of copy, %.2f of the BF16 peak, %.2f of the roofline\n", long(H),
                mla_decode_config_name(def).c_str(), double(r["fraction_of_copy"]), double(r["fraction_of_bf16_peak"]),
                double(r["fraction_of_roofline"]));
  }
  res["rows"] = rows;
  res["configs"] = configs;
  res["hot_l2"] = hot_l2;
  std::printf("wrote %s\n", dsv3::bench::write_result("gpu_mla_decode", res).c_str());
  return 0;
}
#endif
