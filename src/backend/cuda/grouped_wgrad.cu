// The BF16 experts' weight gradients in one launch: dW_e[N, K] += dy_eᵀ · x_e for every block e of
// rows (dy [M, N], x [M, K] BF16, row-major; the rows, the tokens routed to expert e, are the
// reduction). cuBLASLt took one matmul per expert: on bench-0.7b (32 experts of ~2,048 rows, 512 ×
// 1,024 weights) 64 × 64 tiles at ~8 µs each, 1,056 launches per step, and on the lanes no faster.
// Here CTA (tile, e) computes a 128 × 128 tile of dW_e on Hopper's warpgroup MMA: two warpgroups of
// 64 rows, 64 rows of the reduction per stage in a ring of three, loaded by cp.async (zero past the
// block's rows and past N or K) into the 128-byte swizzled panels wgmma reads with both operands
// transposed (dyᵀ and x are M- and N-major), FP32 accumulators added into dW_e at the end. BF16
// products are exact in FP32, so dW differs from cuBLASLt's only in the order of the FP32 sums.
#include <atomic>
#include <cstdint>

#include "backend/cuda/common.cuh"
#include "backend/cuda/linear_lowp.h"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/stream.h"
#include "backend/cuda/wgmma.cuh"

namespace dsv3::cuda {
namespace {

constexpr int kTile = 128, kRed = 64, kStages = 3, kThreads = 256;
constexpr int kPanel = kRed * 128;         // bytes: 64 reduction rows × 64 columns
constexpr int kStageBytes = 4 * kPanel;    // dyᵀ's two panels, then x's two
constexpr int kMaxBlocks = 256;            // V3's experts
constexpr size_t kSmem = size_t(kStages) * kStageBytes + 1024;  // + the 1,024-byte alignment

struct WgradTable {
  const bf16_t* dy;
  const bf16_t* x;
  int64_t N, K;
  int64_t off[kMaxBlocks + 1];  // block e's rows [off[e], off[e + 1])
  float* dw[kMaxBlocks];        // [N, K] each
};

__global__ void __launch_bounds__(kThreads, 2) wgrad_kernel(const __grid_constant__ WgradTable t, int tiles_k) {
  const int e = blockIdx.y;
  const int64_t r0 = t.off[e], rows = t.off[e + 1] - r0;
  if (rows <= 0) return;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* sm = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const int64_t n0 = int64_t(blockIdx.x / tiles_k) * kTile, k0 = int64_t(blockIdx.x % tiles_k) * kTile;
  const int tid = threadIdx.x, wg = tid >> 7, w = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const bf16_t* dy = t.dy + r0 * t.N;
  const bf16_t* x = t.x + r0 * t.K;
  const int steps = int((rows + kRed - 1) / kRed);

  // Stage s: reduction rows s·64.. of dy's columns n0.. and of x's columns k0.., 16 chunks of 8 per
  // row and operand. A thread takes chunk column c of rows rb, rb + 16, … of both; a chunk lies
  // wholly inside N (K) or wholly past it (both multiples of 8), and its swizzled offset moves by
  // 16 rows (2,048 bytes) from one of the thread's rows to the next.
  const int c = tid & 15, rb = tid >> 4;
  const bool in_n = n0 + c * 8 < t.N, in_k = k0 + c * 8 < t.K;
  const bf16_t* dy_c = in_n ? dy + n0 + c * 8 : dy;
  const bf16_t* x_c = in_k ? x + k0 + c * 8 : x;
  const int off = (c >> 3) * kPanel + wgmma::sw(rb, c & 7);
  auto load = [&](int s, int slot) {
    unsigned char* base = sm + slot * kStageBytes + off;
#pragma unroll
    for (int j = 0; j < kRed / 16; ++j) {
      const int64_t row = int64_t(s) * kRed + rb + 16 * j;
      const bool in = row < rows;
      cp_async16(base + j * 2048, in && in_n ? dy_c + row * t.N : dy, in && in_n);
      cp_async16(base + 2 * kPanel + j * 2048, in && in_k ? x_c + row * t.K : x, in && in_k);
    }
  };

  float acc[2][8][4];  // the tile's first and second 64 columns
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[h][j][i] = 0.0f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load(s, s);
    cp_async_commit();
  }
  for (int s = 0; s < steps; ++s) {
    cp_async_wait<kStages - 2>();
    wgmma::fence_async_smem();
    __syncthreads();  // stage s landed for every thread
    const uint32_t a = smem_addr(sm + (s % kStages) * kStageBytes) + wg * kPanel, b = a - wg * kPanel + 2 * kPanel;
    wgmma::fence_regs(acc[0]);
    wgmma::fence_regs(acc[1]);
    wgmma::fence();
#pragma unroll
    for (int k = 0; k < kRed / 16; ++k) {
      const uint64_t da = wgmma::desc_mn(a + k * 2048);
      wgmma::mma_m64n64_ss<1, 1>(acc[0], da, wgmma::desc_mn(b + k * 2048), 1);
      wgmma::mma_m64n64_ss<1, 1>(acc[1], da, wgmma::desc_mn(b + kPanel + k * 2048), 1);
    }
    wgmma::commit();
    wgmma::wait<1>();  // stage s − 1's products are in: its slot, which stage s + 2 takes, is free
    __syncthreads();  // ... in both warpgroups
    if (s + kStages - 1 < steps) load(s + kStages - 1, (s + kStages - 1) % kStages);
    cp_async_commit();
  }
  wgmma::wait<0>();
  wgmma::fence_regs(acc[0]);
  wgmma::fence_regs(acc[1]);

  // acc[h][j][i]: row 16·w + g + 8·(i >> 1) of the warpgroup's 64, column 64·h + 8·j + 2·t4 + (i & 1).
  float* dw = t.dw[e];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t n = n0 + wg * 64 + 16 * w + g + 8 * half, k = k0 + 64 * h + 8 * j + 2 * t4;
        if (n >= t.N || k >= t.K) continue;  // K is even: k + 1 < K too
        float2* p = reinterpret_cast<float2*>(dw + n * t.K + k);
        const float2 o = *p;
        *p = make_float2(o.x + acc[h][j][2 * half], o.y + acc[h][j][2 * half + 1]);
      }
}

std::atomic<int64_t> g_launches{0};

}  // namespace

bool grouped_wgrad_bf16(const void* dy, const void* x, int64_t N, int64_t K, std::span<const int64_t> offsets,
                        std::span<const Tensor> dw) {
  const size_t blocks = dw.size();
  if (blocks == 0 || blocks > size_t(kMaxBlocks) || offsets.size() != blocks + 1 || N <= 0 || K <= 0 ||
      N % 8 != 0 || K % 8 != 0 || !aligned16(dy) || !aligned16(x))
    return false;
  const int64_t tiles = ((N + kTile - 1) / kTile) * ((K + kTile - 1) / kTile);
  if (tiles > INT32_MAX) return false;
  WgradTable t{};
  t.dy = static_cast<const bf16_t*>(dy);
  t.x = static_cast<const bf16_t*>(x);
  t.N = N;
  t.K = K;
  for (size_t e = 0; e < blocks; ++e) {
    const Tensor& d = dw[e];
    if (d.dtype() != DType::F32 || d.numel() != N * K || (reinterpret_cast<uintptr_t>(d.raw()) & 7u) != 0)
      return false;
    t.off[e] = offsets[e];
    t.dw[e] = ptr<float>(d);
  }
  t.off[blocks] = offsets[blocks];
  static const bool smem_set = (allow_smem(wgrad_kernel, kSmem), true);
  (void)smem_set;
  wgrad_kernel<<<dim3(unsigned(tiles), unsigned(blocks)), kThreads, kSmem, stream()>>>(
      t, int((K + kTile - 1) / kTile));
  check_launch("grouped BF16 Wgrad");
  ++g_launches;
  return true;
}

int64_t grouped_wgrad_launches() { return g_launches.load(); }

}  // namespace dsv3::cuda
