// Blocking host-device interactions, counted by wrapping the CUDA runtime's cudaMemcpy and
// cudaDeviceSynchronize (every blocking copy, range-check read-back and device synchronisation goes
// through them; each drains the GPU's queue). The wrappers are definitions: include this header in
// one source file of a program (a GPU benchmark's main file).
#pragma once
#include <cuda_runtime.h>
#include <dlfcn.h>

namespace dsv3::bench {
inline long g_blocking_calls = 0;
template <class F> F cuda_runtime_fn(const char* name) { return reinterpret_cast<F>(dlsym(RTLD_NEXT, name)); }
// Calls so far; the difference over a span of work is its count.
inline long blocking_calls() { return g_blocking_calls; }
}  // namespace dsv3::bench

extern "C" cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind kind) {
  static auto f = dsv3::bench::cuda_runtime_fn<cudaError_t (*)(void*, const void*, size_t, cudaMemcpyKind)>("cudaMemcpy");
  ++dsv3::bench::g_blocking_calls;
  return f(dst, src, n, kind);
}
extern "C" cudaError_t cudaDeviceSynchronize() {
  static auto f = dsv3::bench::cuda_runtime_fn<cudaError_t (*)()>("cudaDeviceSynchronize");
  ++dsv3::bench::g_blocking_calls;
  return f();
}
