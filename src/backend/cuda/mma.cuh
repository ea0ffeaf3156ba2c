// PTX wrappers shared by the tensor-core kernels (attention_bf16.cu, mla_decode.cu, the decode GEMVs):
// cp.async staging, ldmatrix fragment loads, F32 split into two BF16 terms, the BF16 mma.sync
// m16n8k16 with FP32 accumulators, and the repacking of accumulators into the next MMA's A operand.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

namespace dsv3::cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}
// valid = false reads 0 bytes: the 16-byte destination is zero-filled.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// "memory": shared-memory reads after the wait must not be moved above it (quantize.cu reads the
// lane's own copies with no barrier between).
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
// (x0, x1) = hi + lo + r as two BF16 terms each, x0 in the low halves: hi = bf16(x) leaves
// |x − hi| ≤ 2⁻⁸|x|, x − hi is exact in F32, and lo = bf16(x − hi) leaves |r| ≤ 2⁻¹⁶|x| (nearest
// even; BF16 × BF16 products are exact in FP32, so W·hi + W·lo is an F32-class product). For finite
// |x| below BF16's largest value; lo is 0 where hi is not finite, so an infinite x stays infinite.
// The non-finite halves are masked on the packed bits (all-ones exponent) after the subtraction: a
// select on the floats kept x live longer and made the decode GEMV spill (300 bytes against 52).
__device__ __forceinline__ void split_bf16x2(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
  const float2 hf = __bfloat1622float2(h);
  const __nv_bfloat162 l = __floats2bfloat162_rn(x0 - hf.x, x1 - hf.y);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  const uint32_t non_finite = __vcmpeq2(hi & 0x7f807f80u, 0x7f807f80u);  // 0xffff per such half
  lo = *reinterpret_cast<const uint32_t*>(&l) & ~non_finite;
}

// c += a·b, m16n8k16, BF16 operands, FP32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Two floats rounded to BF16 (RNE) in one register, lo in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
// The A fragment (16×16, BF16) of an m16n8k16 MMA from two adjacent 16×8 FP32 accumulator tiles
// (columns 0–7 in c0, 8–15 in c1): the accumulator layout of one MMA is the A layout of the next.
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack_bf16(c0[0], c0[1]);
  a[1] = pack_bf16(c0[2], c0[3]);
  a[2] = pack_bf16(c1[0], c1[1]);
  a[3] = pack_bf16(c1[2], c1[3]);
}
// 2^x in one MUFU instruction (~2 ulp; 2^−inf = +0), without exp2f's handling of subnormal results:
// far below the BF16 rounding the softmax weights get next.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace dsv3::cuda
