// Programmatic dependent launch (Hopper): a kernel launched by launch_pdl may start while the
// previous kernel in the stream drains. It must call pdl_wait before reading or writing anything
// the previous kernels touch (it returns once they have completed and their writes are visible);
// what comes before — index math, loads of weights no kernel writes — overlaps the previous
// kernel's tail. Kernels so launched trigger their dependents (pdl_trigger) only after their own
// wait, so a later kernel's early reads of older outputs stay safe (a kernel launched plainly has
// no wait and may trigger anywhere: its predecessors had finished before it started). CTAs that
// return before waiting (the experts' down kernels with no work item or no steps) are fine as long as
// one CTA of the grid waits: a grid whose CTAs all returned early would complete before its
// predecessor. The decode path's small kernels each save
// the launch gap this way. DSV3_CUDA_PDL=0 (or cuda_set_pdl(false), pdl.h) launches them plainly.
#pragma once
#include <cuda_runtime.h>

#include <utility>

#include "backend/cuda/common.cuh"
#include "backend/cuda/pdl.h"
#include "backend/cuda/stream.h"

namespace dsv3::cuda {

__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

bool pdl_enabled();

template <class... P, class... A>
void launch_pdl(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream();
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  at[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = at;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  DSV3_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...));
}

}  // namespace dsv3::cuda
