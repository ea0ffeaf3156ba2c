// Training attention on the GPU at bench-0.7b's shape (B 8, T 2048, 16 heads, qk 192 = 128 nope +
// 64 rope, v 128, causal): the exact FP32 tiled kernels against the BF16 tensor-core flash kernels
// (attention_bf16.cu), forward and backward, through CudaBackend::attention / attention_backward
// (so the BF16 times include the passes that round q, k, v, dout to BF16 and compute D).
// FLOPs: forward 2·B·H·T·S·(Dqk + Dv), backward 2·B·H·T·S·(3·Dqk + 2·Dv) (S = Q·Kᵀ, dP, dV, dK,
// dQ — the dq kernel path recomputes S and dP once more, and the dQ matmul runs over more than the
// causal half of dS (blocks of query rows, each up to its last row's keys), neither counted),
// causal counted as half; the rows for the two backward kernels alone count what each executes. Roofline: 989 TFLOP/s dense BF16 (H200 datasheet). Also the BF16 path's
// normalised error against the FP32 kernels at this shape. Writes bench/results/gpu_attention.json.
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/bench_util.h"

#ifndef DSV3_HAVE_CUDA
int main() {
  std::puts("gpu_attention: built without CUDA");
  return 1;
}
#else
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cuda/attention_bf16.h"
#include "backend/cuda/cuda_backend.h"
#include "common/gpu_bench.h"

using namespace dsv3;

namespace {
Tensor random_device(CudaBackend& be, const Shape& s, uint64_t salt) {
  Tensor h = Tensor::empty(DType::F32, s);
  float* p = h.data<float>();
  for (int64_t i = 0; i < h.numel(); ++i) {
    uint64_t x = (uint64_t(i) + salt * 0x9E3779B97F4A7C15ull) * 0xBF58476D1CE4E5B9ull;
    x ^= x >> 31;
    p[i] = float(int64_t(x >> 40 & 0xFFFF) - 32768) / 16384.0f;  // uniform in [-2, 2)
  }
  return be.to_device(h);
}

double norm_err(CudaBackend& be, const Tensor& got, const Tensor& want) {
  Tensor g = be.to_host(got), w = be.to_host(want);
  double md = 0, mr = 0;
  for (int64_t i = 0; i < g.numel(); ++i) {
    md = std::max(md, std::fabs(double(g.data<float>()[i]) - double(w.data<float>()[i])));
    mr = std::max(mr, std::fabs(double(w.data<float>()[i])));
  }
  return mr > 0 ? md / mr : md;
}
}  // namespace

int main(int argc, char** argv) {
  const char* usage = "usage: dsv3_bench_gpu_attention [T (sequence length, default 2048)]\n";
  if (argc > 1 && (!std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h"))) {
    std::fputs(usage, stdout);
    return 0;
  }
  if (argc > 2 || (argc == 2 && std::atoll(argv[1]) <= 0)) {
    std::fprintf(stderr, "dsv3_bench_gpu_attention: expected one positive sequence length\n%s", usage);
    return 2;
  }
  const int64_t B = 8, T = argc > 1 ? std::atoll(argv[1]) : 2048, H = 16, DQ = 192, DV = 128;
  CudaBackend& be = cuda_backend();
  Tensor q = random_device(be, {B, T, H, DQ}, 1), k = random_device(be, {B, T, H, DQ}, 2);
  Tensor v = random_device(be, {B, T, H, DV}, 3), dout = random_device(be, {B, T, H, DV}, 4);
  const float scale = 1.0f / std::sqrt(float(DQ)) * 0.5f;  // inputs span ±2: keep logits O(1)
  Tensor out32 = be.alloc(DType::F32, {B, T, H, DV}), lse32 = be.alloc(DType::F32, {B, H, T});
  Tensor out16 = be.alloc(DType::F32, {B, T, H, DV}), lse16 = be.alloc(DType::F32, {B, H, T});
  Tensor dq32 = be.alloc(DType::F32, {B, T, H, DQ}), dk32 = be.alloc(DType::F32, {B, T, H, DQ});
  Tensor dv32 = be.alloc(DType::F32, {B, T, H, DV});
  Tensor dq16 = be.alloc(DType::F32, {B, T, H, DQ}), dk16 = be.alloc(DType::F32, {B, T, H, DQ});
  Tensor dv16 = be.alloc(DType::F32, {B, T, H, DV});
  auto fwd = [&](Tensor& o, Tensor& l) { be.attention({q, k, v, o, l, scale, true, 0, {}, {}}); };
  auto bwd = [&](Tensor& o, Tensor& l, Tensor& dq, Tensor& dk, Tensor& dv) {
    be.attention_backward({q, k, v, o, l, dout, dq, dk, dv, scale, true, 0, {}, {}, {}, {}});
  };
  const double pairs = double(B) * double(H) * double(T) * double(T) * 0.5;
  const double f_fwd = 2.0 * pairs * double(DQ + DV), f_bwd = 2.0 * pairs * double(3 * DQ + 2 * DV);
  const double peak = 989e12;
  // FLOPs each backward kernel executes (S and dP are computed in both): dq: S, dP, dQ;
  // dk/dv: S, dP, dV, dK.
  const double f_dq = 2.0 * pairs * double(2 * DQ + DV), f_dkv = 2.0 * pairs * double(2 * DQ + 2 * DV);
  // The dQ matmul's products in n blocks of query rows (each block over the keys its last row sees;
  // one block is the whole square, twice the causal half).
  auto dq_matmul_flops = [&](int n) {
    const int64_t r = cuda_attention_dq_block_rows(T, n);
    double prod = 0;
    for (int64_t r0 = 0; r0 < T; r0 += r) prod += double(std::min(T, r0 + r) - r0) * double(std::min(T, r0 + r));
    return 2.0 * double(B * H) * prod * double(DQ);
  };
  const int dq_blocks = cuda_attention_dq_blocks();
  // dq alone by the matmul: the dk/dv kernel (all of its products; it stores only dSᵀ) and the
  // matmul in the default blocks.
  const double f_dq_mm = f_dkv + dq_matmul_flops(dq_blocks);

  cuda_set_attention_bf16(false);
  const double t_f32_fwd = bench::gpu_time_s([&] { fwd(out32, lse32); }, 2, 3, 1);
  const double t_f32_bwd = bench::gpu_time_s([&] { bwd(out32, lse32, dq32, dk32, dv32); }, 1, 3, 1);
  cuda_set_attention_bf16(true);
  const double t_b16_fwd = bench::gpu_time_s([&] { fwd(out16, lse16); }, 10, 5, 1);
  const double t_b16_bwd = bench::gpu_time_s([&] { bwd(out16, lse16, dq16, dk16, dv16); }, 5, 5, 1);
  Tensor none;
  // The mma.sync forward and dk/dv kernels, for comparison (the default path otherwise).
  cuda_set_attention_wgmma(false);
  const double t_b16_fwd_sync = bench::gpu_time_s([&] { fwd(out16, lse16); }, 10, 5, 1);
  const double t_b16_bwd_sync = bench::gpu_time_s([&] { bwd(out16, lse16, dq16, dk16, dv16); }, 5, 5, 1);
  const double t_b16_dkv_sync = bench::gpu_time_s([&] { bwd(out16, lse16, none, dk16, dv16); }, 5, 5, 1);
  cuda_set_attention_wgmma(true);
  // dq alone by the default path: the dk/dv kernel storing dSᵀ (without dk, dv) and the matmul.
  const double t_b16_dq_mm = bench::gpu_time_s([&] { bwd(out16, lse16, dq16, none, none); }, 5, 5, 1);
  // The same backward with dQ by its own kernel, and its two halves (each with the shared prep
  // passes): dq alone, dk/dv alone.
  cuda_set_attention_dq_matmul(false);
  const double t_b16_bwd_k = bench::gpu_time_s([&] { bwd(out16, lse16, dq16, dk16, dv16); }, 5, 5, 1);
  const double t_b16_dq = bench::gpu_time_s([&] { bwd(out16, lse16, dq16, none, none); }, 5, 5, 1);
  cuda_set_attention_dq_matmul(true);
  // The backward with the dQ matmul over the whole square and in 2 / 4 / 8 blocks of query rows.
  const int block_counts[] = {1, 2, 4, 8};
  double t_blocks[4];
  for (int i = 0; i < 4; ++i) {
    cuda_set_attention_dq_blocks(block_counts[i]);
    t_blocks[i] = bench::gpu_time_s([&] { bwd(out16, lse16, dq16, dk16, dv16); }, 5, 5, 1);
  }
  cuda_set_attention_dq_blocks(dq_blocks);
  const double t_b16_dkv = bench::gpu_time_s([&] { bwd(out16, lse16, none, dk16, dv16); }, 5, 5, 1);
  bwd(out16, lse16, dq16, dk16, dv16);  // the default path's gradients for the error check
  cuda_set_attention_bf16(false);
  const double e_out = norm_err(be, out16, out32), e_lse = norm_err(be, lse16, lse32);
  const double e_dq = norm_err(be, dq16, dq32), e_dk = norm_err(be, dk16, dk32), e_dv = norm_err(be, dv16, dv32);

  std::printf("attention, B %ld T %ld H %ld qk %ld v %ld causal (FLOPs counted over the causal half)\n", long(B),
              long(T), long(H), long(DQ), long(DV));
  std::printf("%-28s %10s %10s %12s\n", "kernel", "ms", "TFLOP/s", "of 989 peak");
  struct Row {
    const char* name;
    double t, f;
  } rows[] = {{"FP32 tiled forward", t_f32_fwd, f_fwd},
              {"FP32 tiled backward", t_f32_bwd, f_bwd},
              {"BF16 flash forward (wgmma)", t_b16_fwd, f_fwd},
              {"BF16 forward, mma.sync", t_b16_fwd_sync, f_fwd},
              {"BF16 flash backward (wgmma)", t_b16_bwd, f_bwd},
              {"BF16 backward, mma.sync dk/dv", t_b16_bwd_sync, f_bwd},
              {"  mma.sync dk/dv kernel + prep", t_b16_dkv_sync, f_dkv},
              {"  dq alone: dS + matmul", t_b16_dq_mm, f_dq_mm},
              {"BF16 backward, dq kernel", t_b16_bwd_k, f_bwd},
              {"  of which dq kernel + prep", t_b16_dq, f_dq},
              {"  of which dk/dv kernel + prep", t_b16_dkv, f_dkv}};
  nlohmann::json jr = nlohmann::json::array();
  for (const Row& r : rows) {
    std::printf("%-28s %10.3f %10.1f %12.3f\n", r.name, r.t * 1e3, r.f / r.t / 1e12, r.f / r.t / peak);
    jr.push_back({{"kernel", r.name}, {"ms", r.t * 1e3}, {"tflops", r.f / r.t / 1e12}, {"fraction_of_peak", r.f / r.t / peak}});
  }
  std::printf("dQ matmul in blocks of query rows (default %d), backward ms: ", dq_blocks);
  nlohmann::json jb = nlohmann::json::array();
  for (int i = 0; i < 4; ++i) {
    std::printf("%s%d: %.3f (matmul %.1f GFLOP)", i ? ", " : "", block_counts[i], t_blocks[i] * 1e3,
                dq_matmul_flops(block_counts[i]) / 1e9);
    jb.push_back({{"blocks", block_counts[i]}, {"bwd_ms", t_blocks[i] * 1e3},
                  {"matmul_gflop", dq_matmul_flops(block_counts[i]) / 1e9}});
  }
  // Against the default's own entry of the same loop where it is one of the counts.
  double t_default = t_b16_bwd;
  for (int i = 0; i < 4; ++i)
    if (block_counts[i] == dq_blocks) t_default = t_blocks[i];
  std::printf("; whole square over default %.2fx\n", t_blocks[0] / t_default);
  std::printf("BF16 vs FP32 kernels, normalised error: out %.2e lse %.2e dq %.2e dk %.2e dv %.2e\n", e_out, e_lse,
              e_dq, e_dk, e_dv);
  std::printf("on wgmma against mma.sync: forward %.2fx, backward %.2fx, dk/dv kernel + prep %.2fx\n",
              t_b16_fwd_sync / t_b16_fwd, t_b16_bwd_sync / t_b16_bwd, t_b16_dkv_sync / t_b16_dkv);
  std::printf("speedup forward %.1fx, backward %.1fx; dQ as a matmul from dS: backward %.2fx the dq kernel's\n",
              t_f32_fwd / t_b16_fwd, t_f32_bwd / t_b16_bwd, t_b16_bwd_k / t_b16_bwd);
  nlohmann::json res = {{"bench", "gpu_attention"},
                        {"shape", {{"batch", B}, {"seq", T}, {"heads", H}, {"qk_head_dim", DQ}, {"v_head_dim", DV}, {"causal", true}}},
                        {"roofline_tflops_bf16_dense", peak / 1e12},
                        {"rows", jr},
                        {"bf16_fwd_tflops", f_fwd / t_b16_fwd / 1e12},
                        {"bf16_bwd_tflops", f_bwd / t_b16_bwd / 1e12},
                        {"bf16_fwd_mma_sync_ms", t_b16_fwd_sync * 1e3},
                        {"fwd_wgmma_speedup", t_b16_fwd_sync / t_b16_fwd},
                        {"bf16_bwd_mma_sync_ms", t_b16_bwd_sync * 1e3},
                        {"bwd_wgmma_speedup", t_b16_bwd_sync / t_b16_bwd},
                        {"dkv_wgmma_speedup", t_b16_dkv_sync / t_b16_dkv},
                        {"bf16_bwd_dq_ms", t_b16_dq * 1e3},
                        {"bf16_bwd_dq_kernel_ms", t_b16_bwd_k * 1e3},
                        {"bf16_bwd_dq_matmul_alone_ms", t_b16_dq_mm * 1e3},
                        {"bwd_dq_matmul_speedup", t_b16_bwd_k / t_b16_bwd},
                        {"bf16_bwd_dkv_ms", t_b16_dkv * 1e3},
                        {"dq_matmul_blocks_default", dq_blocks},
                        {"dq_matmul_blocks", jb},
                        {"speedup_fwd", t_f32_fwd / t_b16_fwd},
                        {"speedup_bwd", t_f32_bwd / t_b16_bwd},
                        {"bf16_vs_fp32_norm_err", {{"out", e_out}, {"lse", e_lse}, {"dq", e_dq}, {"dk", e_dk}, {"dv", e_dv}}}};
  std::printf("wrote %s\n", dsv3::bench::write_result("gpu_attention", res).c_str());
  return 0;
}
#endif
