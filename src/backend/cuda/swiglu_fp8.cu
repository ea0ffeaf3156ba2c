// The MLPs' SwiGLU under --precision fp8 with its FP8 tiles made in the same pass (backend/fp8.h
// swiglu_fp8, swiglu_fp8_recompute, swiglu_backward_fp8). Composed, the forward read gate and up for
// the SwiGLU, wrote out, then read gate, up and out again for their 1×128 tiles (27 bytes moved per
// element); the backward dequantized gate and up into F32, read them back for out, and out again
// for its tiles (27 bytes), and the gradient read the F32 gate and up (20 bytes with dout and the
// two gradients). Here each tile of eight lanes does a pass from one read: 15 bytes per element
// forward, 7 for the recomputation, 14 for the gradient. The bytes are those of the composition on
// this GPU: the same SwiGLU expressions (common.cuh) and the tiles of quantize_rows_kernel
// (fp8_tile.cuh).
#include "backend/cuda/common.cuh"
#include "backend/cuda/fp8_tile.cuh"
#include "backend/cuda/linear_lowp.h"
#include "backend/cuda/stream.h"

namespace dsv3 {
using namespace cuda;
using namespace cuda::fp8q;

namespace {

// [M, I] row-major with I a multiple of 128, so tile t (row t / (I/128), column block t % (I/128))
// starts at element 128·t and its scale is element t of the [M, I/128] grid.
struct SwigluFp8Args {
  int64_t tiles = 0;
  bool pow2 = false;
  const float *g = nullptr, *u = nullptr;                // forward: gate and up
  const uint8_t *gq_in = nullptr, *uq_in = nullptr;      // recompute: their tiles
  const float *gs_in = nullptr, *us_in = nullptr;
  uint8_t *gq = nullptr, *uq = nullptr;                  // forward: gate's and up's tiles
  float *gs = nullptr, *us = nullptr;
  float* act = nullptr;                                  // silu(gate)·up, and its tiles
  uint8_t* aq = nullptr;
  float* as = nullptr;
};

// Lane j's sixteen values of tile t from its codes and scale (columns as group8_get), e4m3·s as
// dequantize computes it.
__device__ __forceinline__ void group8_dequant(const uint8_t* q, const float* s, int64_t t, int j, bool live,
                                               float (&v)[16]) {
  const float sc = live ? s[t] : 0.0f;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float4 w = widen4(live ? *reinterpret_cast<const uint32_t*>(q + kFp8Block * t + 4 * j + 32 * k) : 0u);
    // Rounded products, as dequantize stores them: never fused into the SwiGLU's arithmetic.
    v[4 * k] = __fmul_rn(w.x, sc), v[4 * k + 1] = __fmul_rn(w.y, sc), v[4 * k + 2] = __fmul_rn(w.z, sc),
             v[4 * k + 3] = __fmul_rn(w.w, sc);
  }
}
__device__ __forceinline__ void group8_store(float* p, int j, const float (&v)[16]) {
#pragma unroll
  for (int k = 0; k < 4; ++k)
    *reinterpret_cast<float4*>(p + 4 * j + 32 * k) = make_float4(v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]);
}
// The tile's scale (NaN when it holds a non-finite value) and codes. Every lane calls it (it shuffles).
__device__ __forceinline__ void group8_tile(const float (&v)[16], int64_t t, int j, bool live, bool pow2, uint8_t* q,
                                            float* s) {
  unsigned bad = 0;
  const float sc = group8_tile_scale(v, pow2, bad);
  if (!live) return;
  if (j == 0) s[t] = bad ? __int_as_float(0x7fc00000) : sc;
  group8_put(q + kFp8Block * t, j, v, sc, bad == 0);
}

template <bool kFromTiles>
__global__ void __launch_bounds__(256) swiglu_fp8_kernel(const __grid_constant__ SwigluFp8Args a) {
  const int64_t t = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 8;
  const int j = threadIdx.x & 7;
  const bool live = t < a.tiles;  // a tile past the end is zeros, not stored
  float g[16], u[16], v[16];
  if constexpr (kFromTiles) {
    group8_dequant(a.gq_in, a.gs_in, t, j, live, g);
    group8_dequant(a.uq_in, a.us_in, t, j, live, u);
  } else {
    group8_get(a.g + kFp8Block * t, j, live, g);
    group8_get(a.u + kFp8Block * t, j, live, u);
    group8_tile(g, t, j, live, a.pow2, a.gq, a.gs);
    group8_tile(u, t, j, live, a.pow2, a.uq, a.us);
  }
#pragma unroll
  for (int k = 0; k < 16; ++k) v[k] = swiglu_value(g[k], u[k]);
  if (live) group8_store(a.act + kFp8Block * t, j, v);
  group8_tile(v, t, j, live, a.pow2, a.aq, a.as);
}

// The gradients: dgate, dup = swiglu_grad(dout, gate, up) with gate and up from their tiles (dgate may
// be dout: each element is read before it is written, by the same lane).
struct SwigluBwdFp8Args {
  int64_t tiles = 0;
  const float* dout = nullptr;
  const uint8_t *gq = nullptr, *uq = nullptr;
  const float *gs = nullptr, *us = nullptr;
  float *dg = nullptr, *du = nullptr;
};
__global__ void __launch_bounds__(256) swiglu_bwd_fp8_kernel(const __grid_constant__ SwigluBwdFp8Args a) {
  const int64_t t = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 8;
  const int j = threadIdx.x & 7;
  if (t >= a.tiles) return;  // no shuffles here
  float g[16], u[16], d[16];
  group8_dequant(a.gq, a.gs, t, j, true, g);
  group8_dequant(a.uq, a.us, t, j, true, u);
  group8_get(a.dout + kFp8Block * t, j, true, d);
#pragma unroll
  for (int k = 0; k < 16; ++k) swiglu_grad(d[k], g[k], u[k], g[k], u[k]);
  group8_store(a.dg + kFp8Block * t, j, g);
  group8_store(a.du + kFp8Block * t, j, u);
}

// The rows of a tensor whose rows are a positive multiple of 128 wide; -1 otherwise.
int64_t tile_rows(const Tensor& x) {
  const int64_t I = last_dim(x);
  return I > 0 && I % kFp8Block == 0 ? rows_of(x) : -1;
}

// The rows of gate's and up's tiles when a fused launch takes them (E4M3 1×128 tiles of the same
// [M, I], I a multiple of 128, 16-byte aligned codes, F32 scales [M, I/128]); -1 otherwise.
int64_t fused_tiles(const Fp8Tiles& gate, const Fp8Tiles& up) {
  const int64_t M = tile_rows(gate.q);
  if (M < 0) return -1;
  const Shape grid{M, gate.q.dim(-1) / kFp8Block};
  const auto ok = [&](const Fp8Tiles& t) {
    return t.q.dtype() == DType::F8_E4M3 && t.q.shape() == gate.q.shape() && aligned16(t.q.raw()) &&
           t.scale.dtype() == DType::F32 && t.scale.shape() == grid;
  };
  return ok(gate) && ok(up) ? M : -1;
}

Fp8Tiles tiles_like(const Tensor& x) {
  const int64_t I = last_dim(x), M = rows_of(x);
  CudaBackend& be = cuda_backend();
  return {be.alloc(DType::F8_E4M3, {M, I}), be.alloc(DType::F32, {M, I / kFp8Block}), 0};
}

// A CTA per 32 tiles (eight lanes each), no grid-stride loop.
unsigned grid_for(int64_t tiles) {
  const int64_t g = (tiles + 31) / 32;
  DSV3_CHECK(g < (int64_t(1) << 31), "swiglu_fp8: ", tiles, " tiles are more than one launch takes");
  return unsigned(g);
}

void launch(bool from_tiles, const SwigluFp8Args& a) {
  if (a.tiles == 0) return;
  if (from_tiles) swiglu_fp8_kernel<true><<<grid_for(a.tiles), 256, 0, stream()>>>(a);
  else swiglu_fp8_kernel<false><<<grid_for(a.tiles), 256, 0, stream()>>>(a);
  check_launch(from_tiles ? "swiglu_fp8_recompute" : "swiglu_fp8");
}

}  // namespace

bool cuda_swiglu_fp8(const SwigluArgs& s, bool pow2, SwigluTiles& out) {
  validate(s);
  const int64_t M = tile_rows(s.gate);
  // out written over gate or up would change the tiles the composition makes of them afterwards.
  if (M < 0 || s.up.shape() != s.gate.shape() || s.out.shape() != s.gate.shape() || s.out.dtype() != DType::F32 ||
      s.out.raw() == s.gate.raw() || s.out.raw() == s.up.raw() || !aligned16(s.gate.raw()) || !aligned16(s.up.raw()) ||
      !aligned16(s.out.raw()))
    return false;
  out = {tiles_like(s.gate), tiles_like(s.gate), tiles_like(s.gate)};
  SwigluFp8Args a;
  a.tiles = M * (s.gate.dim(-1) / kFp8Block);
  a.pow2 = pow2;
  a.g = ptr<float>(s.gate);
  a.u = ptr<float>(s.up);
  a.gq = ptr<uint8_t>(out.gate.q);
  a.gs = ptr<float>(out.gate.scale);
  a.uq = ptr<uint8_t>(out.up.q);
  a.us = ptr<float>(out.up.scale);
  a.act = ptr<float>(s.out);
  a.aq = ptr<uint8_t>(out.out.q);
  a.as = ptr<float>(out.out.scale);
  launch(false, a);
  return true;
}

bool cuda_swiglu_fp8_recompute(const Fp8Tiles& gate, const Fp8Tiles& up, bool pow2, SwigluRecompute& out) {
  const int64_t M = fused_tiles(gate, up);
  if (M < 0) return false;
  out = {cuda_backend().alloc(DType::F32, {M, gate.q.dim(-1)}), tiles_like(gate.q)};
  SwigluFp8Args a;
  a.tiles = gate.scale.numel();
  a.pow2 = pow2;
  a.gq_in = ptr<uint8_t>(gate.q);
  a.gs_in = ptr<float>(gate.scale);
  a.uq_in = ptr<uint8_t>(up.q);
  a.us_in = ptr<float>(up.scale);
  a.act = ptr<float>(out.out);
  a.aq = ptr<uint8_t>(out.out_tiles.q);
  a.as = ptr<float>(out.out_tiles.scale);
  launch(true, a);
  return true;
}

bool cuda_swiglu_backward_fp8(const SwigluBackwardArgs& s, const Fp8Tiles& gate, const Fp8Tiles& up) {
  const int64_t M = fused_tiles(gate, up);
  const auto f32 = [&](const Tensor& t) {
    return present(t) && t.dtype() == DType::F32 && t.numel() == gate.q.numel() && aligned16(t.raw());
  };
  if (M < 0 || s.accumulate || !f32(s.dout) || !f32(s.dgate) || !f32(s.dup) || s.dgate.raw() == s.dup.raw())
    return false;
  SwigluBwdFp8Args a;
  a.tiles = gate.scale.numel();
  a.dout = ptr<float>(s.dout);
  a.gq = ptr<uint8_t>(gate.q);
  a.gs = ptr<float>(gate.scale);
  a.uq = ptr<uint8_t>(up.q);
  a.us = ptr<float>(up.scale);
  a.dg = ptr<float>(s.dgate);
  a.du = ptr<float>(s.dup);
  if (a.tiles == 0) return true;
  swiglu_bwd_fp8_kernel<<<grid_for(a.tiles), 256, 0, stream()>>>(a);
  check_launch("swiglu_backward_fp8");
  return true;
}

}  // namespace dsv3
