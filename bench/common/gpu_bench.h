// Shared by the GPU benchmark programs (bench/gpu_*; CUDA builds only): a status check, the timer and
// the copy bandwidth.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

// Any CUDA / cuBLAS status that is not 0: print the call and line, exit 1 (a benchmark has no way on).
#define CK(x)                                                                     \
  do {                                                                            \
    auto s_ = (x);                                                                \
    if (int(s_) != 0) {                                                           \
      std::fprintf(stderr, "%s failed (%d) at line %d\n", #x, int(s_), __LINE__); \
      std::exit(1);                                                               \
    }                                                                             \
  } while (0)

namespace dsv3::bench {

// Seconds per call of f: `warmup` calls, then the median of `reps` runs of `iters` back-to-back calls,
// each run timed by CUDA events on the default stream (GPU time, launch gaps included).
template <class F> double gpu_time_s(F&& f, int iters = 20, int reps = 5, int warmup = 3) {
  for (int i = 0; i < warmup; ++i) f();
  cudaDeviceSynchronize();
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    cudaEventRecord(a);
    for (int i = 0; i < iters; ++i) f();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    t.push_back(ms / 1e3 / iters);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Device-to-device copy bandwidth in bytes per second, read plus write (the memory-bound
// benchmarks' roofline): a cudaMemcpy of `bytes` between two buffers holding a non-zero pattern.
inline double copy_bandwidth(size_t bytes = size_t(1) << 30) {
  void *a = nullptr, *b = nullptr;
  CK(cudaMalloc(&a, bytes));
  CK(cudaMalloc(&b, bytes));
  CK(cudaMemset(a, 0x5A, bytes));
  const double t = gpu_time_s([&] { cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice); }, 10);
  CK(cudaGetLastError());
  CK(cudaFree(a));
  CK(cudaFree(b));
  return 2.0 * double(bytes) / t;
}

}  // namespace dsv3::bench
