// Hopper's bulk copies into shared memory without a tensor map (cp.async.bulk), completing on an
// mbarrier: a stage's barrier is initialised for one arrival; whoever fills the stage arms it with
// the bytes its copies will bring, then issues them; readers wait for the barrier's phase (the
// n-th fill of a stage completes phase n − 1, parity (n − 1) & 1). Before a stage that threads
// have read is filled again, refill_fence orders their reads before the copies' writes.
// The same barriers serve stage handovers without bulk copies (grouped_fp8_gemm.cu's warp-specialised
// kernel): init for several arrivals, arrive, wait. The other direction, shared memory out to global
// (put, put_add), completes in the issuing thread's bulk groups instead: put_commit closes a group,
// put_wait_read returns once its reads of shared memory are done (the global writes drain on their
// own; a kernel's are complete when it ends). Shared memory written by ordinary stores is fenced with
// refill_fence before a put reads it.
#pragma once
#include <cstdint>

#include "backend/cuda/mma.cuh"

namespace dsv3::cuda::bulk {

// Every barrier of `bars` for `count` arrivals per phase (one: the thread that arms it), made visible
// to the copies (one thread, then a CTA barrier).
__device__ __forceinline__ void init(uint64_t* bars, int n, unsigned count = 1) {
  for (int s = 0; s < n; ++s)
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bars + s)), "r"(count));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
// One plain arrival (release: the thread's earlier writes are seen by whoever waits for the phase).
__device__ __forceinline__ void arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void arm(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
// bytes: a multiple of 16; dst and src 16-byte aligned.
__device__ __forceinline__ void get(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}
__device__ __forceinline__ void wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred p;\n WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra WAIT_%=;\n}" ::"r"(
          smem_addr(bar)),
      "r"(parity)
      : "memory");
}
// bytes: a multiple of 16; dst and src 16-byte aligned. put_add adds each FP32 value of src to dst's
// (one addition per element rounded to nearest even, as a load, add and store would make, with no
// load round trip. The PTX ISA describes cp.reduce.async.bulk .add.f32 as flushing subnormal
// inputs and results to zero; an H100 kept subnormal old values, BulkAddKeepsSubnormalOldValues).
__device__ __forceinline__ void put(void* dst, const void* src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(smem_addr(src)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void put_add(float* dst, const float* src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" ::"l"(dst),
               "r"(smem_addr(src)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void put_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
__device__ __forceinline__ void put_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
__device__ __forceinline__ void refill_fence() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

}  // namespace dsv3::cuda::bulk
