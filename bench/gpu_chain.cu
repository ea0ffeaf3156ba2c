// The floor a chain of dependent kernels puts under a batch-1 decode step (bench-0.7b's step is 168
// kernels, each reading what an earlier one wrote): microseconds per kernel of a chain of --length
// launches, launched eagerly and replayed from a CUDA graph, each plainly and as a programmatic
// dependent launch (launch_pdl, the engine's kernels' launch), for three kernels:
//   empty  one warp: the dependency wait and the trigger only
//   relay  one warp: reads the value the previous kernel wrote and writes the next one (a dependent
//          round trip through memory, the least a decode kernel does)
//   wide   132 CTAs of 256 threads (a GEMV's grid): each thread loads 16 bytes of a constant 528 KiB
//          buffer before the wait (as the decode GEMVs load their weights), then every CTA reads the
//          previous kernel's value and CTA 0 writes the next one
// Writes bench/results/gpu_chain.json (--out NAME: NAME.json).
#include <cstdio>
#include <cstdlib>
#include <string>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/graph.h"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/pdl.h"
#include "common/bench_util.h"
#include "common/gpu_bench.h"

using namespace dsv3;

namespace {

constexpr int kWideCtas = 132, kWideThreads = 256;

__global__ void empty_kernel() {
  cuda::pdl_wait();
  cuda::pdl_trigger();
}

__global__ void relay_kernel(float* v, int i) {
  cuda::pdl_wait();
  cuda::pdl_trigger();
  if (threadIdx.x == 0) v[i + 1] = v[i] + 1.0f;
}

// sink[cta] keeps the early loads alive; CTA 0 writes the next value.
__global__ void wide_kernel(const uint4* w, float* v, float* sink, int i) {
  const uint4 a = w[blockIdx.x * blockDim.x + threadIdx.x];
  cuda::pdl_wait();
  cuda::pdl_trigger();
  const float x = v[i];
  if (threadIdx.x == 0) {
    if (blockIdx.x == 0) v[i + 1] = x + 1.0f;
    sink[blockIdx.x] = x + float(a.x & 1u);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const char* usage =
      "usage: dsv3_bench_gpu_chain [--length L] [--out NAME]\n"
      "  microseconds per kernel of a chain of L dependent launches (default 168: a bench-0.7b batch-1\n"
      "  decode step), eager and from a CUDA graph, plain and programmatic-dependent\n";
  if (const int rc = bench::check_pair_args(argc, argv, usage); rc >= 0) return rc;
  int length = 168;
  std::string out = "gpu_chain";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], val = argv[i + 1];
    const int n = std::atoi(val.c_str());
    if (k == "--length" && n >= 1 && n <= 100000)
      length = n;
    else if (k == "--out" && !val.empty() && val.find('/') == std::string::npos)
      out = val;
    else {
      std::fprintf(stderr, "gpu_chain: bad flag %s %s\n%s", k.c_str(), val.c_str(), usage);
      return 2;
    }
  }
  cuda_backend();  // registers the CUDA allocator CudaGraph's capture swaps
  float *v = nullptr, *sink = nullptr;
  uint4* w = nullptr;
  CK(cudaMalloc(&v, sizeof(float) * size_t(length + 1)));
  CK(cudaMalloc(&sink, sizeof(float) * kWideCtas));
  CK(cudaMalloc(&w, sizeof(uint4) * kWideCtas * kWideThreads));
  CK(cudaMemset(v, 0, sizeof(float) * size_t(length + 1)));
  CK(cudaMemset(w, 0, sizeof(uint4) * kWideCtas * kWideThreads));

  const char* kernels[] = {"empty", "relay", "wide"};
  auto chain = [&](int kind) {
    for (int i = 0; i < length; ++i) {
      if (kind == 0) cuda::launch_pdl(empty_kernel, dim3(1), dim3(32), 0);
      if (kind == 1) cuda::launch_pdl(relay_kernel, dim3(1), dim3(32), 0, v, i);
      if (kind == 2) cuda::launch_pdl(wide_kernel, dim3(kWideCtas), dim3(kWideThreads), 0, w, v, sink, i);
    }
  };
  std::printf("gpu_chain: %d dependent launches per chain, microseconds per kernel\n", length);
  std::printf("%-8s %10s %10s %10s %10s\n", "kernel", "eager", "eager pdl", "graph", "graph pdl");
  nlohmann::json rows = nlohmann::json::array();
  for (int kind = 0; kind < 3; ++kind) {
    double us[4];
    for (int mode = 0; mode < 4; ++mode) {
      const bool graph = mode >= 2, pdl = mode % 2 == 1;
      cuda_set_pdl(pdl);
      CudaGraph g;
      if (graph && !g.capture([&] { chain(kind); })) {
        std::fprintf(stderr, "gpu_chain: capture failed: %s\n", g.error().c_str());
        return 1;
      }
      const double s = bench::gpu_time_s(
          [&] {
            if (!graph) return chain(kind);
            if (!g.launch()) {
              std::fprintf(stderr, "gpu_chain: graph launch failed: %s\n", g.error().c_str());
              std::exit(1);
            }
          },
          10, 7, 3);
      CK(cudaGetLastError());
      us[mode] = s / length * 1e6;
    }
    std::printf("%-8s %10.2f %10.2f %10.2f %10.2f\n", kernels[kind], us[0], us[1], us[2], us[3]);
    rows.push_back({{"kernel", kernels[kind]},
                    {"us_per_kernel_eager", us[0]},
                    {"us_per_kernel_eager_pdl", us[1]},
                    {"us_per_kernel_graph", us[2]},
                    {"us_per_kernel_graph_pdl", us[3]},
                    {"chain_ms_graph_pdl", us[3] * length / 1e3}});
  }
  cuda_set_pdl(true);
  CK(cudaDeviceSynchronize());
  std::printf("wrote %s\n", bench::write_result(out, {{"length", length}, {"rows", rows}}).c_str());
  cudaFree(v);
  cudaFree(sink);
  cudaFree(w);
  return 0;
}
