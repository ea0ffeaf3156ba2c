// The read bandwidth of the orders a batch-32 decode step's expert kernels could read their weights
// in, with no arithmetic: one layer is 33 groups (bench-0.7b's 32 experts and the shared one) of a
// gate and an up matrix, 512 × 1024 BF16 each (1 MiB, 69 MB a layer), read whole once per pass by
// 132 CTAs of 512 threads. Each pass reads the next of four layers, so none of it is in L2 from the
// pass before. Orders:
//   flat          CTA i takes the i-th of 132 equal parts of the (group, 16-row step) list; a step
//                 is 16 rows of gate and of up (64 KB), warp w its k-block w (16 rows × 128 B), the
//                 next step's loads in flight (the row-range expert kernel's order and depth)
//   rows          CTA (part, group) takes 128 rows of gate and of up; warp w owns 16 rows over the
//                 whole row, 4 k-blocks in flight (session 30's first kernel by group)
//   bulk          CTA (part, group): units of 16 whole rows (32 KB, contiguous) by cp.async.bulk into
//                 a 4-stage ring, one barrier per unit (session 30's bulk-copy kernel)
//   bulk-stagger  the same, each CTA starting at its own unit (branch exp/expert-group-bulk)
//   flat-bulk     the flat order's steps (gate and up, 64 KB) by cp.async.bulk into a 3-stage ring
//   linear        16-byte vectors grid-stride over one contiguous layer (the ceiling)
// Two placements of the matrices: "packed" (one buffer, 1 MiB apart: every CTA of an order by group
// starts at the same offset modulo 256 KiB) and "engine" (one backend allocation each, gate, up and
// down per expert in turn, as the engine loads a checkpoint). Writes bench/results/gpu_stream.json
// (--out NAME: NAME.json).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "common/bench_util.h"
#include "common/gpu_bench.h"
#include "infer/cuda_weight_vec.cuh"

using namespace dsv3;
using dsv3::cuda::ld_weights;

namespace {

constexpr int kGroups = 33, kRows = 512, kRowBytes = 2048, kLayers = 4;
constexpr int kCtas = 132, kThreads = 512, kParts = 4, kPartRows = kRows / kParts;
constexpr int kUnitBytes = 16 * kRowBytes, kStages = 4, kUnits = 2 * kPartRows / 16;
constexpr size_t kMatBytes = size_t(kRows) * kRowBytes;

struct Mats {
  const char* p[2 * kGroups];  // group e: gate p[2e], up p[2e + 1]
};

__device__ __forceinline__ uint32_t fold(const uint4& v) { return v.x ^ v.y ^ v.z ^ v.w; }

// This lane's share of k-block kb of the 16 rows from `rows`: rows g and g + 8, 32 bytes each.
__device__ __forceinline__ void load_block(uint4* w, const char* rows, int kb) {
  const int lane = threadIdx.x & 31;
  const char* lo = rows + size_t(lane >> 2) * kRowBytes + kb * 128 + 32 * (lane & 3);
  const char* hi = lo + 8 * kRowBytes;
  w[0] = ld_weights(lo);
  w[1] = ld_weights(lo + 16);
  w[2] = ld_weights(hi);
  w[3] = ld_weights(hi + 16);
}
// Keeps the loads: a store that never happens unless the folded bits hit one value.
__device__ __forceinline__ void keep(uint32_t acc, unsigned* sink) {
  if (acc == 0x9e3779b9u) sink[blockIdx.x + gridDim.x * blockIdx.y] = acc;
}

__global__ void __launch_bounds__(kThreads, 1) flat_kernel(Mats m, unsigned* sink) {
  const int kb = threadIdx.x >> 5, steps = kRows / 16, total = kGroups * steps;
  const int f0 = int(int64_t(total) * blockIdx.x / gridDim.x), f1 = int(int64_t(total) * (blockIdx.x + 1) / gridDim.x);
  uint4 cur[8], nxt[8];
  auto load = [&](int f, uint4* w) {
    const int e = f / steps, s = f - e * steps;
    load_block(w, m.p[2 * e] + size_t(s) * 16 * kRowBytes, kb);
    load_block(w + 4, m.p[2 * e + 1] + size_t(s) * 16 * kRowBytes, kb);
  };
  uint32_t acc = 0;
  if (f0 < f1) load(f0, cur);
  for (int f = f0; f < f1; ++f) {
    if (f + 1 < f1) load(f + 1, nxt);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc ^= fold(cur[i]);
    if (f + 1 < f1)
#pragma unroll
      for (int i = 0; i < 8; ++i) cur[i] = nxt[i];
  }
  keep(acc, sink);
}

__global__ void __launch_bounds__(kThreads, 1) rows_kernel(Mats m, unsigned* sink) {
  const int warp = threadIdx.x >> 5, mat = warp / 8, rb = warp % 8;
  const char* rows = m.p[2 * blockIdx.y + mat] + size_t(blockIdx.x * kPartRows + rb * 16) * kRowBytes;
  constexpr int kDepth = 4, kBlocks = kRowBytes / 128;
  uint4 w[kDepth][4];
#pragma unroll
  for (int j = 0; j < kDepth; ++j) load_block(w[j], rows, j);
  uint32_t acc = 0;
  for (int kb0 = 0; kb0 < kBlocks; kb0 += kDepth)
#pragma unroll
    for (int j = 0; j < kDepth; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc ^= fold(w[j][i]);
      if (kb0 + j + kDepth < kBlocks) load_block(w[j], rows, kb0 + j + kDepth);
    }
  keep(acc, sink);
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

template <bool kStagger> __global__ void __launch_bounds__(kThreads, 1) bulk_kernel(Mats m, unsigned* sink) {
  extern __shared__ __align__(128) unsigned char ring[];  // [kStages][kUnitBytes], then the mbarriers
  uint64_t* bar = reinterpret_cast<uint64_t*>(ring + kStages * kUnitBytes);
  const int e = blockIdx.y, part = blockIdx.x;
  const int shift = kStagger ? 2 * ((e * 7 + part * 3) % (kUnits / 2)) : 0;
  auto issue = [&](int u) {  // unit v: 16 rows of gate (v even) or up from the part's row v / 2 · 16
    const int v = (u + shift) % kUnits;
    const char* src = m.p[2 * e + v % 2] + size_t(part * kPartRows + (v / 2) * 16) * kRowBytes;
    const uint32_t b = smem_u32(bar + u % kStages);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(kUnitBytes) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     smem_u32(ring + (u % kStages) * kUnitBytes)),
                 "l"(src), "r"(kUnitBytes), "r"(b)
                 : "memory");
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(bar + s)));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    for (int u = 0; u < kStages; ++u) issue(u);
  }
  __syncthreads();
  uint32_t acc = 0;
  for (int u = 0; u < kUnits; ++u) {
    asm volatile(
        "{\n .reg .pred p;\n WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra WAIT_%=;\n}" ::"r"(
            smem_u32(bar + u % kStages)),
        "r"((u / kStages) & 1)
        : "memory");
    const uint4* st = reinterpret_cast<const uint4*>(ring + (u % kStages) * kUnitBytes);
#pragma unroll
    for (int i = 0; i < kUnitBytes / 16 / kThreads; ++i) acc ^= fold(st[threadIdx.x + i * kThreads]);
    __syncthreads();  // the stage is read: it may be filled again
    if (threadIdx.x == 0 && u + kStages < kUnits) {
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      issue(u + kStages);
    }
  }
  keep(acc, sink);
}

// The flat order by bulk copies: a step (16 rows of gate, 16 of up: two 32 KB copies on one
// mbarrier) a stage of a 3-stage ring.
constexpr int kFlatStages = 3;
__global__ void __launch_bounds__(kThreads, 1) flat_bulk_kernel(Mats m, unsigned* sink) {
  extern __shared__ __align__(128) unsigned char ring[];  // [kFlatStages][2 · kUnitBytes], then the mbarriers
  uint64_t* bar = reinterpret_cast<uint64_t*>(ring + kFlatStages * 2 * kUnitBytes);
  const int steps = kRows / 16, total = kGroups * steps;
  const int f0 = int(int64_t(total) * blockIdx.x / gridDim.x), f1 = int(int64_t(total) * (blockIdx.x + 1) / gridDim.x);
  auto issue = [&](int f) {
    const int e = f / steps, s = f - e * steps, slot = (f - f0) % kFlatStages;
    const uint32_t b = smem_u32(bar + slot);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(2 * kUnitBytes) : "memory");
    for (int j = 0; j < 2; ++j)
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                       smem_u32(ring + (slot * 2 + j) * kUnitBytes)),
                   "l"(m.p[2 * e + j] + size_t(s) * kUnitBytes), "r"(kUnitBytes), "r"(b)
                   : "memory");
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s < kFlatStages; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(bar + s)));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    for (int f = f0; f < min(f1, f0 + kFlatStages); ++f) issue(f);
  }
  __syncthreads();
  uint32_t acc = 0;
  for (int f = f0; f < f1; ++f) {
    const int slot = (f - f0) % kFlatStages;
    asm volatile(
        "{\n .reg .pred p;\n WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra WAIT_%=;\n}" ::"r"(
            smem_u32(bar + slot)),
        "r"(((f - f0) / kFlatStages) & 1)
        : "memory");
    const uint4* st = reinterpret_cast<const uint4*>(ring + slot * 2 * kUnitBytes);
#pragma unroll
    for (int i = 0; i < 2 * kUnitBytes / 16 / kThreads; ++i) acc ^= fold(st[threadIdx.x + i * kThreads]);
    __syncthreads();
    if (threadIdx.x == 0 && f + kFlatStages < f1) {
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      issue(f + kFlatStages);
    }
  }
  keep(acc, sink);
}

__global__ void __launch_bounds__(kThreads) linear_kernel(const uint4* x, int64_t n, unsigned* sink) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  uint32_t acc = 0;
  int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    const uint4 a = ld_weights(x + i), b = ld_weights(x + i + stride), c = ld_weights(x + i + 2 * stride),
                d = ld_weights(x + i + 3 * stride);
    acc ^= fold(a) ^ fold(b) ^ fold(c) ^ fold(d);
  }
  for (; i < n; i += stride) acc ^= fold(ld_weights(x + i));
  keep(acc, sink);
}

}  // namespace

int main(int argc, char** argv) {
  const char* usage =
      "usage: dsv3_bench_gpu_stream [--reps N (default 5)] [--out NAME (default gpu_stream)]\n"
      "  read bandwidth of the expert kernels' possible weight orders at bench-0.7b's batch-32 decode\n"
      "  (33 groups x gate and up, 512 x 1024 BF16), two placements of the matrices\n";
  if (const int rc = bench::check_pair_args(argc, argv, usage); rc >= 0) return rc;
  int reps = 5;
  std::string out = "gpu_stream";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], val = argv[i + 1];
    const int n = std::atoi(val.c_str());
    if (k == "--reps" && n >= 1 && n <= 1000)
      reps = n;
    else if (k == "--out" && !val.empty() && val.find('/') == std::string::npos)
      out = val;
    else {
      std::fprintf(stderr, "gpu_stream: bad flag %s %s\n%s", k.c_str(), val.c_str(), usage);
      return 2;
    }
  }
  CudaBackend& be = cuda_backend();
  unsigned* sink = nullptr;
  CK(cudaMalloc(&sink, sizeof(unsigned) * kCtas * 4));  // the largest grid's CTAs (linear)
  // packed: one buffer per layer, matrix j at j MiB (the linear order reads it whole).
  std::vector<char*> packed(kLayers);
  std::vector<Mats> layouts[2];
  for (int l = 0; l < kLayers; ++l) {
    CK(cudaMalloc(&packed[size_t(l)], 2 * kGroups * kMatBytes));
    CK(cudaMemset(packed[size_t(l)], l + 1, 2 * kGroups * kMatBytes));
    Mats m;
    for (int j = 0; j < 2 * kGroups; ++j) m.p[j] = packed[size_t(l)] + size_t(j) * kMatBytes;
    layouts[0].push_back(m);
  }
  // engine: gate, up and down of each expert from the backend's allocator in turn (down unread).
  std::vector<Tensor> keep_alive;
  Tensor host = Tensor::empty(DType::BF16, {kRows, kRowBytes / 2});
  std::memset(host.raw(), 7, host.nbytes());
  for (int l = 0; l < kLayers; ++l) {
    Mats m;
    for (int e = 0; e < kGroups; ++e)
      for (int j = 0; j < 3; ++j) {
        keep_alive.push_back(be.to_device(host));
        if (j < 2) m.p[2 * e + j] = static_cast<const char*>(keep_alive.back().raw());
      }
    layouts[1].push_back(m);
  }
  const size_t smem = size_t(kStages) * kUnitBytes + kStages * sizeof(uint64_t);
  CK(cudaFuncSetAttribute(bulk_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  CK(cudaFuncSetAttribute(bulk_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const size_t flat_smem = size_t(kFlatStages) * 2 * kUnitBytes + kFlatStages * sizeof(uint64_t);
  CK(cudaFuncSetAttribute(flat_bulk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(flat_smem)));
  const double bytes = double(2 * kGroups) * double(kMatBytes);
  const char* orders[] = {"flat", "rows", "bulk", "bulk-stagger", "flat-bulk", "linear"};
  const char* places[] = {"packed", "engine"};
  std::printf("gpu_stream: %.1f MB a pass (33 groups x gate, up 512 x 1024 BF16), %d layers in turn\n", bytes / 1e6,
              kLayers);
  std::printf("%-13s %-7s %9s %8s %9s\n", "order", "place", "us", "TB/s", "of linear");
  nlohmann::json rows = nlohmann::json::array();
  double linear_tb = 0.0;
  for (int o = 5; o >= 0; --o)  // linear first: the others' ceiling
    for (int pl = 0; pl < (o == 5 ? 1 : 2); ++pl) {
      int layer = 0;
      auto pass = [&] {
        const Mats& m = layouts[pl][size_t(layer)];
        const dim3 by_group(kParts, kGroups);
        if (o == 0) flat_kernel<<<kCtas, kThreads>>>(m, sink);
        if (o == 1) rows_kernel<<<by_group, kThreads>>>(m, sink);
        if (o == 2) bulk_kernel<false><<<by_group, kThreads, smem>>>(m, sink);
        if (o == 3) bulk_kernel<true><<<by_group, kThreads, smem>>>(m, sink);
        if (o == 4) flat_bulk_kernel<<<kCtas, kThreads, flat_smem>>>(m, sink);
        if (o == 5)
          linear_kernel<<<kCtas * 4, kThreads>>>(reinterpret_cast<const uint4*>(packed[size_t(layer)]),
                                                 int64_t(bytes / 16), sink);
        layer = (layer + 1) % kLayers;
      };
      const double s = bench::gpu_time_s(pass, 8, reps, 4);
      CK(cudaGetLastError());
      const double tb = bytes / s / 1e12;
      if (o == 5) linear_tb = tb;
      std::printf("%-13s %-7s %9.1f %8.2f %9.2f\n", orders[o], o == 5 ? "packed" : places[pl], s * 1e6, tb,
                  tb / linear_tb);
      rows.push_back({{"order", orders[o]},
                      {"placement", o == 5 ? "packed" : places[pl]},
                      {"us_per_pass", s * 1e6},
                      {"tb_per_s", tb},
                      {"fraction_of_linear", tb / linear_tb}});
    }
  CK(cudaDeviceSynchronize());
  std::printf("wrote %s\n", bench::write_result(out, {{"bytes_per_pass", bytes}, {"rows", rows}}).c_str());
  for (char* p : packed) cudaFree(p);
  cudaFree(sink);
  return 0;
}
