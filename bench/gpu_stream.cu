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

#include "backend/cuda/bulk.cuh"
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

// Reads `count` stages through a ring of kS stages of kBytes in shared memory (`ring`, its kS
// mbarriers after it): fill(k, dst, bar) arms bar and issues stage k's copies into dst (thread 0);
// every thread folds its share of each stage, and a stage is filled again once all have read it.
template <int kS, int kBytes, class Fill>
__device__ uint32_t read_ring(unsigned char* ring, int count, Fill fill) {
  uint64_t* bar = reinterpret_cast<uint64_t*>(ring + kS * kBytes);
  if (threadIdx.x == 0) {
    cuda::bulk::init(bar, kS);
    for (int k = 0; k < min(kS, count); ++k) fill(k, ring + k * kBytes, bar + k);
  }
  __syncthreads();
  uint32_t acc = 0;
  for (int k = 0; k < count; ++k) {
    cuda::bulk::wait(bar + k % kS, (k / kS) & 1);
    const uint4* st = reinterpret_cast<const uint4*>(ring + (k % kS) * kBytes);
#pragma unroll
    for (int i = 0; i < kBytes / 16 / kThreads; ++i) acc ^= fold(st[threadIdx.x + i * kThreads]);
    __syncthreads();  // the stage is read: it may be filled again
    if (threadIdx.x == 0 && k + kS < count) {
      cuda::bulk::refill_fence();
      fill(k + kS, ring + (k % kS) * kBytes, bar + k % kS);
    }
  }
  return acc;
}
template <int kS, int kBytes> constexpr size_t ring_smem = size_t(kS) * kBytes + kS * sizeof(uint64_t);

// By group: unit v of CTA (part, group) is 16 rows of gate (v even) or up from the part's row
// v / 2 · 16, one copy; staggered, each CTA starts at its own unit.
template <bool kStagger> __global__ void __launch_bounds__(kThreads, 1) bulk_kernel(Mats m, unsigned* sink) {
  extern __shared__ __align__(128) unsigned char ring[];
  const int e = blockIdx.y, part = blockIdx.x;
  const int shift = kStagger ? 2 * ((e * 7 + part * 3) % (kUnits / 2)) : 0;
  auto fill = [&](int u, unsigned char* dst, uint64_t* bar) {
    const int v = (u + shift) % kUnits;
    cuda::bulk::arm(bar, kUnitBytes);
    cuda::bulk::get(dst, m.p[2 * e + v % 2] + size_t(part * kPartRows + (v / 2) * 16) * kRowBytes, kUnitBytes, bar);
  };
  keep(read_ring<kStages, kUnitBytes>(ring, kUnits, fill), sink);
}

// The flat order by bulk copies: a step (16 rows of gate, 16 of up: two 32 KB copies on one
// mbarrier) a stage of a 3-stage ring.
constexpr int kFlatStages = 3;
__global__ void __launch_bounds__(kThreads, 1) flat_bulk_kernel(Mats m, unsigned* sink) {
  extern __shared__ __align__(128) unsigned char ring[];
  const int steps = kRows / 16, total = kGroups * steps;
  const int f0 = int(int64_t(total) * blockIdx.x / gridDim.x), f1 = int(int64_t(total) * (blockIdx.x + 1) / gridDim.x);
  auto fill = [&](int k, unsigned char* dst, uint64_t* bar) {
    const int e = (f0 + k) / steps, s = f0 + k - e * steps;
    cuda::bulk::arm(bar, 2 * kUnitBytes);
    for (int j = 0; j < 2; ++j)
      cuda::bulk::get(dst + j * kUnitBytes, m.p[2 * e + j] + size_t(s) * kUnitBytes, kUnitBytes, bar);
  };
  keep(read_ring<kFlatStages, 2 * kUnitBytes>(ring, f1 - f0, fill), sink);
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
  constexpr size_t smem = ring_smem<kStages, kUnitBytes>, flat_smem = ring_smem<kFlatStages, 2 * kUnitBytes>;
  CK(cudaFuncSetAttribute(bulk_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  CK(cudaFuncSetAttribute(bulk_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
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
