// Rotary embedding in place (interleaved or half-split pairs; inverse = the backward).
#include "backend/cuda/common.cuh"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/unchecked_ops.h"

namespace dsv3 {
using namespace cuda;

namespace {
// Index type I: uint32_t when x's elements fit it (the divisions by half and h are most of the
// kernel's instructions in 64 bits), else int64_t.
template <class I>
__global__ void rope_kernel(float* x, const int32_t* pos, const float* cs, const float* sn, I t, I h, I w, I off,
                            I half, bool interleaved, float sign, int64_t max_pos) {
  pdl_wait();
  pdl_trigger();
  const I n = t * h * half;
  for (I i = blockIdx.x * I(blockDim.x) + threadIdx.x; i < n; i += I(gridDim.x) * blockDim.x) {
    const I j = i % half, th = i / half, ti = th / h;
    const int64_t a = pos[ti];
    if (a < 0 || a >= max_pos) continue;  // reported by the range check
    float* r = x + th * w + off;
    float* p = r + (interleaved ? 2 * j : j);
    const I stride = interleaved ? 1 : half;
    float x0 = p[0], x1 = p[stride], cj = cs[a * half + j], sj = sign * sn[a * half + j];
    p[0] = x0 * cj - x1 * sj;
    p[stride] = x1 * cj + x0 * sj;
  }
}

void launch_rope(const RopeArgs& a) {
  int64_t t = a.x.dim(0), h = a.x.dim(1), w = a.x.dim(2), half = a.rope_dim / 2;
  int64_t n = t * h * half;
  if (n == 0) return;
  if (t * h * w + int64_t(blocks_for(n)) * 256 < (int64_t(1) << 32)) {  // i + stride fits too
    launch_pdl(rope_kernel<uint32_t>, dim3(std::min(blocks_for(n), 1u << 20)), dim3(256), 0, ptr<float>(a.x),
               a.positions.data<int32_t>(), a.cos.data<float>(), a.sin.data<float>(), uint32_t(t), uint32_t(h),
               uint32_t(w), uint32_t(a.offset), uint32_t(half), a.interleaved, a.inverse ? -1.0f : 1.0f,
               a.cos.dim(0));
  } else {
    launch_pdl(rope_kernel<int64_t>, dim3(std::min(blocks_for(n), 1u << 20)), dim3(256), 0, ptr<float>(a.x),
               a.positions.data<int32_t>(), a.cos.data<float>(), a.sin.data<float>(), t, h, w, a.offset, half,
               a.interleaved, a.inverse ? -1.0f : 1.0f, a.cos.dim(0));
  }
  check_launch("rope");
}
}  // namespace

void CudaBackend::rope(const RopeArgs& a) {
  validate(a);
  const int64_t max_pos = a.cos.dim(0);
  check_range(a.positions.data<int32_t>(), a.x.dim(0), 0, max_pos, [max_pos](int64_t i, int32_t bad) {
    input_error("rope: position ", bad, " of token ", i, " is outside the table [0, ", max_pos, ")");
  });
  launch_rope(a);
}

void cuda_rope_unchecked(const RopeArgs& a) {
  validate(a);
  launch_rope(a);
}

}  // namespace dsv3
