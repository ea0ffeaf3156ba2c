// FP8 E4M3 tile quantization on the GPU (backend/fp8.h semantics): the amax of a tile's finite
// values gives the scale exactly as the CPU derives it (amax/448, all-zero tile → 1, underflow → the
// smallest FP32, optional power of two), the codes are the saturated RNE of x/s. 1×128 tiles take
// eight lanes each, 128×128 tiles a CTA, transposed 128×1 tiles a CTA per 128 rows × 32 columns
// through shared memory. The reduced-precision linear layer's variant (cuda_quantize_fp8_async) does not read
// the count back and marks a tile with non-finite values by a NaN scale, so the whole training step
// runs without a host synchronisation per quantization; its GEMM preparation (fp8_fprop_prep,
// fp8_backward_prep, linear_lowp.h) runs these tiles as roles of one launch per pass.
#include <algorithm>
#include <cfloat>
#include <climits>
#include <map>
#include <mutex>

#include "backend/cuda/common.cuh"
#include "backend/cuda/fp8_tile.cuh"
#include "backend/cuda/linear_lowp.h"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/stream.h"

namespace dsv3 {
using namespace cuda;
using namespace cuda::fp8q;

namespace {

// The 1×128 tiles of x [M, K] into q [M, K] and row-major scales sc [M, ⌈K/128⌉]: eight lanes per
// tile, four tiles per warp. A warp per tile spent ~330 instructions on it, issue-bound at ~1.5 TB/s
// (ncu, 16,384 × 1,024): the scale, its reciprocal and the index are a tile's fixed cost, now shared
// by four. Lane j of a group holds columns 4j + 32k .. +3 (k < 4), so each load instruction reads a
// tile's 128 contiguous bytes per group; vec: one 16-byte load (K % 4 == 0, x 16-byte and q 4-byte
// aligned), so a group of four columns is all in range or all out.
__global__ void quantize_rows_kernel(const float* x, int64_t M, int64_t K, bool vec, bool pow2, bool nan_mark,
                                     uint8_t* q, float* sc, unsigned long long* nonfinite) {
  const int64_t ng = (K + kFp8Block - 1) / kFp8Block;
  const int64_t t = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 8;
  const int j = threadIdx.x & 7;
  // Every lane reaches the shuffles; a tile past the end is zeros and is not stored.
  const bool live = t < M * ng;
  int64_t r = 0, g = 0;
  if (!live) {
  } else if (M * ng <= INT32_MAX) {  // a 64-bit division is a software routine of dozens of instructions
    r = uint32_t(t) / uint32_t(ng);
    g = uint32_t(t) - uint32_t(r) * uint32_t(ng);
  } else {
    r = t / ng;
    g = t % ng;
  }
  const int64_t c0 = g * kFp8Block + 4 * j;
  const float* xr = x + r * K;
  float v[16];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t c = c0 + 32 * k;
    if (vec) {
      const float4 f = live && c < K ? *reinterpret_cast<const float4*>(xr + c) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      v[4 * k] = f.x, v[4 * k + 1] = f.y, v[4 * k + 2] = f.z, v[4 * k + 3] = f.w;
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) v[4 * k + i] = live && c + i < K ? xr[c + i] : 0.0f;
    }
  }
  unsigned bad = 0;
  const float s = group8_tile_scale(v, pow2, bad);
  if (!live) return;
  if (j == 0) {
    sc[r * ng + g] = bad && nan_mark ? __int_as_float(0x7fc00000) : s;
    if (bad && nonfinite) atomicAdd(nonfinite, (unsigned long long)bad);
  }
  uint32_t b[4];
  codes<16>(v, ScaleDiv(s, bad == 0), b);
  uint8_t* qr = q + r * K;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t c = c0 + 32 * k;
    if (vec) {
      if (c < K) *reinterpret_cast<uint32_t*>(qr + c) = b[k];
    } else {
      for (int i = 0; i < 4; ++i)
        if (c + i < K) qr[c + i] = uint8_t(b[k] >> (8 * i));
    }
  }
}

bool aligned_to(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; }
bool rows_vec(const float* x, int64_t K, const uint8_t* q) {
  return K % 4 == 0 && aligned_to(x, 16) && aligned_to(q, 4);
}

// 128×1 tiles with the transposed output (Wgrad's operands), one CTA (256 threads) per 128 rows × 32
// columns (block bx, row block rb of nrb): the tile is read once along rows (coalesced), kept in
// shared memory, and written per column (coalesced in the transposed q). The source is x [M, K] F32,
// or FP8 1×128 tiles (qs, ss: x̂ = e4m3(qs)·ss, the dequantized FP32 value, as dequantize_fp8
// computes it) so that the forward's FP8 copy is re-quantized without materialising x̂. q is [K, M],
// scales [K, nrb]. Returns (warp 0's lanes) whether the lane's column held non-finite values.
struct ColsSmem {
  float t[kFp8Block][33];
  float am_w[8][32], s_col[32];
  unsigned bad_w[8][32];
};
__device__ unsigned cols_t_tile(ColsSmem& sm, int64_t bx, int64_t rb, int64_t nrb, const float* x, const uint8_t* qs,
                                const float* ss, int64_t M, int64_t K, bool pow2, bool nan_mark, uint8_t* q, float* sc,
                                unsigned long long* nonfinite) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t r0 = rb * kFp8Block, c = bx * 32 + lane, kb = (K + kFp8Block - 1) / kFp8Block;
  float am = 0.0f;
  unsigned bad = 0;
  float v[16];  // rows w, w + 8, …: every load issued before the first use
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    const int64_t r = r0 + w + 8 * k;
    v[k] = r >= M || c >= K ? 0.0f
           : qs             ? widen(__nv_fp8_storage_t(qs[r * K + c])) * ss[r * kb + c / kFp8Block]
                            : x[r * K + c];
  }
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    tile_stat(v[k], am, bad);
    sm.t[w + 8 * k][lane] = v[k];
  }
  sm.am_w[w][lane] = am;
  sm.bad_w[w][lane] = bad;
  __syncthreads();
  unsigned b = 0;
  if (w == 0) {
    float a = 0.0f;
    for (int j = 0; j < 8; ++j) a = fmaxf(a, sm.am_w[j][lane]), b += sm.bad_w[j][lane];
    const float sv = scale_of(a, pow2);
    sm.s_col[lane] = sv;
    if (c < K) {
      sc[c * nrb + rb] = b && nan_mark ? __int_as_float(0x7fc00000) : sv;
      if (b && nonfinite) atomicAdd(nonfinite, (unsigned long long)b);
    } else {
      b = 0;
    }
  }
  __syncthreads();
  for (int kk = w; kk < 32; kk += 8) {
    const int64_t k = bx * 32 + kk;
    if (k >= K) break;
    const ScaleDiv d(sm.s_col[kk]);
    for (int i = lane; i < kFp8Block; i += 32) {
      const int64_t r = r0 + i;
      if (r < M) q[k * M + r] = code_of(sm.t[i][kk], d);
    }
  }
  __syncthreads();  // sm is reused by the caller's next tile
  return b;
}

__global__ void quantize_cols_t_kernel(const float* x, const uint8_t* qs, const float* ss, int64_t M, int64_t K,
                                       bool pow2, bool nan_mark, uint8_t* q, float* sc,
                                       unsigned long long* nonfinite) {
  __shared__ ColsSmem sm;
  cols_t_tile(sm, blockIdx.x, blockIdx.y, gridDim.y, x, qs, ss, M, K, pow2, nan_mark, q, sc, nonfinite);
}

__global__ void quantize_kernel(const float* x, int64_t M, int64_t K, int64_t th, int64_t tw, bool pow2, bool transpose,
                                bool nan_mark, uint8_t* q, float* sc, unsigned long long* nonfinite) {
  int64_t nrb = (M + th - 1) / th, ng = (K + tw - 1) / tw;
  int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  int lane = threadIdx.x & 31;
  if (warp >= nrb * ng) return;
  int64_t rb = warp / ng, g = warp % ng;
  int64_t r0 = rb * th, r1 = r0 + th < M ? r0 + th : M, c0 = g * tw, c1 = c0 + tw < K ? c0 + tw : K;
  int64_t w = c1 - c0, n = (r1 - r0) * w;
  float amax = 0.0f;
  unsigned long long bad = 0;
  for (int64_t e = lane; e < n; e += 32) {
    float v = x[(r0 + e / w) * K + c0 + e % w];
    tile_stat(v, amax, bad);
  }
  amax = warp_max(amax);
  bad = warp_sum(bad);
  float s = scale_of(amax, pow2);
  if (lane == 0) {
    float sw = bad && nan_mark ? __int_as_float(0x7fc00000) : s;
    if (transpose) sc[g * nrb + rb] = sw;
    else sc[rb * ng + g] = sw;
    if (bad && nonfinite) atomicAdd(nonfinite, bad);
  }
  const ScaleDiv d(s);
  for (int64_t e = lane; e < n; e += 32) {
    int64_t r = r0 + e / w, k = c0 + e % w;
    uint8_t v = code_of(x[r * K + k], d);
    if (transpose) q[k * M + r] = v;
    else q[r * K + k] = v;
  }
}

// One CTA (256 threads) per 128×128 tile: a warp per tile leaves a weight's few tiles on a few warps.
__global__ void quantize_block_kernel(const float* x, int64_t M, int64_t K, bool pow2, bool nan_mark, uint8_t* q,
                                      float* sc, unsigned long long* nonfinite) {
  const int64_t ng = (K + kFp8Block - 1) / kFp8Block, rb = blockIdx.x / ng, g = blockIdx.x % ng;
  const int64_t r0 = rb * kFp8Block, r1 = r0 + kFp8Block < M ? r0 + kFp8Block : M, c = g * kFp8Block + (threadIdx.x & 127);
  const bool in = c < K;
  const int rs = threadIdx.x >> 7;
  float amax = 0.0f;
  unsigned long long bad = 0;
  if (in)
    for (int64_t r = r0 + rs; r < r1; r += 2) {
      float v = x[r * K + c];
      tile_stat(v, amax, bad);
    }
  amax = block_max(amax);
  bad = block_sum(bad);
  const float s = scale_of(amax, pow2);
  if (threadIdx.x == 0) {
    sc[rb * ng + g] = bad && nan_mark ? __int_as_float(0x7fc00000) : s;
    if (bad && nonfinite) atomicAdd(nonfinite, bad);
  }
  const ScaleDiv d(s);
  if (in)
    for (int64_t r = r0 + rs; r < r1; r += 2) q[r * K + c] = code_of(x[r * K + c], d);
}

// y[C, R] = x[R, C]ᵀ through 32×32 shared-memory tiles (both sides coalesced).
__global__ void transpose_kernel(const float* x, int64_t R, int64_t C, float* y) {
  __shared__ float t[32][33];
  const int64_t c0 = int64_t(blockIdx.x) * 32, r0 = int64_t(blockIdx.y) * 32;
  for (int j = threadIdx.y; j < 32; j += 8) {
    const int64_t r = r0 + j, c = c0 + threadIdx.x;
    if (r < R && c < C) t[j][threadIdx.x] = x[r * C + c];
  }
  __syncthreads();
  for (int j = threadIdx.y; j < 32; j += 8) {
    const int64_t c = c0 + j, r = r0 + threadIdx.x;
    if (c < C && r < R) y[c * R + r] = t[threadIdx.x][j];
  }
}

// ---------------------------------------------------------------------------------------------
// The linear layer's GEMM preparation (linear_lowp.h): one launch per pass whose CTAs take roles by
// their index, every operand written in cuBLASLt's layout.

// The preparations of one launch: the CTAs [start[i], start[i + 1]) run p[i], split between its
// roles as a[i] / b[i] (Fprop: weight tiles / token CTAs; backward: dy / x̂ CTAs, the rest weight
// tiles). Passed as a __grid_constant__ parameter (~8 KB for 32 backward preparations).
template <class P>
struct PrepGroup {
  int n = 0;
  int64_t start[kPrepGroup + 1] = {};
  int64_t a[kPrepGroup] = {}, b[kPrepGroup] = {};
  P p[kPrepGroup];
};
using FpropGroup = PrepGroup<FpropPrep>;
using BackwardGroup = PrepGroup<BackwardPrep>;

// NaN propagation: each role or-s a bit into its preparation's g_nan word when its tiles hold
// non-finite values; the last of the preparation's CTAs to finish (an arrival count) sees every bit,
// writes NaN over whole scale arrays of the GEMMs those operands feed (then every output of such a
// GEMM is NaN, as on the CPU) and clears the word for the stream's next launch. Words per stream
// (nan_slot), so launches on the backend's lane streams may overlap, and per preparation of a
// launch.
struct NanSync {
  unsigned flag, count;
};
constexpr int kNanSlots = 16;
__device__ NanSync g_nan[kNanSlots][kPrepGroup];  // zero at load; every launch leaves its words zero

constexpr unsigned kBadX = 1, kBadW = 2, kBadDy = 4;

// ctas: the CTAs that arrive at sync (the preparation's).
__device__ void nan_end(NanSync& sync, unsigned ctas, float* p0, int64_t n0, unsigned m0, float* p1, int64_t n1,
                        unsigned m1) {
  __shared__ bool last;
  __syncthreads();  // the CTA's writes happen before thread 0's fence (cumulative) and arrival
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(&sync.count, 1u) == ctas - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const unsigned f = *static_cast<volatile unsigned*>(&sync.flag);
  if (p0 && (f & m0))
    for (int64_t i = threadIdx.x; i < n0; i += blockDim.x) p0[i] = __int_as_float(0x7fc00000);
  if (p1 && (f & m1))
    for (int64_t i = threadIdx.x; i < n1; i += blockDim.x) p1[i] = __int_as_float(0x7fc00000);
  __syncthreads();
  if (threadIdx.x == 0) sync.flag = sync.count = 0;
}

// One CTA (256 threads), one 128×128 tile of W [N, K] (any float dtype; an FP8 weight times its
// scale_inv as dequantize_fp8 does: one scale per tile). Thread (cg, rs) holds the 8 columns
// 8·cg..8·cg+7 of rows rs, rs + 16, … (16 lanes cover a row: coalesced), loaded 8 values at a time
// (one 16-byte load for BF16, two for F32, one 8-byte for FP8) when the row's base allows it, all
// loads issued before the first use. A scalar load per value (ncu on the H200: 2,600 instructions
// per warp, half the stalls on instruction fetch, 27 µs per tile on one SM) had set the length of
// every expert's preparation launch. The codes are written as W [N, ldq] (8 per store) or,
// transposed, through a shared byte tile as Wᵀ [K, ldq] (the transposed tiling has the same tiles,
// so the same scales and codes); columns beyond the reduction get code 0. The scale goes to
// cuBLASLt's BLK128x128 layout (rows of ld4 floats, the padding 0). Returns the tile's non-finite
// count (every thread).
struct WeightSmem {
  uint8_t t[kFp8Block][kFp8Block + 4];
};
constexpr int kTileCols = 8;                                 // columns per thread
constexpr int kTileRowStep = 256 / (kFp8Block / kTileCols);  // 16: rows between a thread's rows
constexpr int kTileRows = kFp8Block / kTileRowStep;          // 8 rows per thread

__device__ __forceinline__ void widen8(uint4 u, float (&v)[kTileCols]) {  // 8 BF16
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    v[2 * j] = __uint_as_float(w[j] << 16);
    v[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
  }
}

__device__ __forceinline__ void put8(float4 a, float4 b, float (&v)[kTileCols]) {
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
// The 8 values of row r from column c (all < K, or all ≥ K: K is a multiple of 8 when vec).
__device__ __forceinline__ void load_row8(const WeightSide& p, bool vec, int64_t r, int64_t c, bool row_in, float si,
                                          float (&v)[kTileCols]) {
  if (!row_in || c >= p.K) {
#pragma unroll
    for (int j = 0; j < kTileCols; ++j) v[j] = 0.0f;
    return;
  }
  const int64_t i = r * p.K + c;
  if (vec && p.wtype == DType::BF16) {
    widen8(*reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(p.w) + i), v);
  } else if (vec && p.wtype == DType::F32) {
    const float4* f = reinterpret_cast<const float4*>(static_cast<const float*>(p.w) + i);
    put8(f[0], f[1], v);
  } else if (vec && p.wtype == DType::F8_E4M3) {
    const uint2 u = *reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(p.w) + i);
    put8(widen4(u.x), widen4(u.y), v);
  } else {  // columns past K stay +0 (unscaled: a non-finite or negative scale_inv must not touch them)
#pragma unroll
    for (int j = 0; j < kTileCols; ++j) v[j] = c + j < p.K ? load_f(p.w, p.wtype, i + j) * si : 0.0f;
    return;
  }
#pragma unroll
  for (int j = 0; j < kTileCols; ++j) v[j] *= si;  // ×1 is exact
}

__device__ unsigned weight_tile(WeightSmem& sm, int64_t tile, const WeightSide& p, bool pow2) {
  const int64_t ngk = (p.K + kFp8Block - 1) / kFp8Block, ngn = (p.N + kFp8Block - 1) / kFp8Block;
  const int64_t rb = tile / ngk, g = tile % ngk;
  const int64_t r0 = rb * kFp8Block, r1 = r0 + kFp8Block < p.N ? r0 + kFp8Block : p.N;
  const int cg = threadIdx.x % (kFp8Block / kTileCols), rs = threadIdx.x / (kFp8Block / kTileCols);
  const int64_t c = g * kFp8Block + kTileCols * cg;
  const unsigned align = p.wtype == DType::F8_E4M3 ? 8u : 16u;
  const bool vec = p.K % kTileCols == 0 && (reinterpret_cast<uintptr_t>(p.w) & (align - 1)) == 0 &&
                   (p.wtype == DType::BF16 || p.wtype == DType::F32 || p.wtype == DType::F8_E4M3);
  const float si = p.w_scale_inv ? p.w_scale_inv[rb * ngk + g] : 1.0f;
  float v[kTileRows][kTileCols];
#pragma unroll
  for (int i = 0; i < kTileRows; ++i) {
    const int64_t r = r0 + rs + kTileRowStep * i;
    load_row8(p, vec, r, c, r < r1, si, v[i]);
  }
  float amax = 0.0f;
  unsigned bad = 0;
#pragma unroll
  for (int i = 0; i < kTileRows; ++i)
#pragma unroll
    for (int j = 0; j < kTileCols; ++j) amax = max_nan(amax, fabsf(v[i][j]));
  if (__syncthreads_or(!finite_amax(amax))) {
    amax = 0.0f;
#pragma unroll
    for (int i = 0; i < kTileRows; ++i)
#pragma unroll
      for (int j = 0; j < kTileCols; ++j) tile_stat(v[i][j], amax, bad);
    bad = block_sum(bad);
  }
  amax = block_max(amax);
  const float s = scale_of(amax, pow2);
  if (threadIdx.x == 0) {
    const int64_t sr = p.transpose ? g : rb, scol = p.transpose ? rb : g, ncol = p.transpose ? ngn : ngk;
    p.scale_lt[sr * p.ld4 + scol] = bad ? __int_as_float(0x7fc00000) : s;
    if (scol == ncol - 1)
      for (int64_t j = ncol; j < p.ld4; ++j) p.scale_lt[sr * p.ld4 + j] = 0.0f;
  }
  // The codes, a row of 8 per iteration from a second read of the row (L1): unrolled over the 64
  // values held, this code ran once per SM per launch, so fetching it set the pace (ncu: 58% of
  // the stalls on instruction fetch after the loads were vectorised).
  const ScaleDiv d(s, bad == 0);
#pragma unroll 1
  for (int i = 0; i < kTileRows; ++i) {
    const int64_t r = r0 + rs + kTileRowStep * i;
    float u[kTileCols];
    load_row8(p, vec, r, c, r < r1, si, u);
    const uint32_t b[2] = {codes4(u, d), codes4(u + 4, d)};
    if (p.transpose) {  // rows beyond N hold 0: code 0 (Dgrad's padded reduction)
      // Store j of lane cg = 4a + b' goes to row 8cg + (j + a) % 8, so that the sixteen lanes of a
      // row of W hit sixteen banks (in order, cg, cg + 4, cg + 8 and cg + 12 shared one: 7-way
      // conflicts on average under ncu); the codes are rotated by a bytes to match.
      const int a = cg >> 2;
      const uint32_t lo = __funnelshift_r(b[0], b[1], 8 * a), hi = __funnelshift_r(b[1], b[0], 8 * a);
#pragma unroll
      for (int j = 0; j < kTileCols; ++j)
        sm.t[kTileCols * cg + ((j + a) & 7)][rs + kTileRowStep * i] = uint8_t((j < 4 ? lo : hi) >> (8 * (j % 4)));
      continue;
    }
    if (r >= r1) continue;  // rows beyond N do not exist in q; columns K..ldq hold 0/s = code 0
    uint8_t* dst = p.q + r * p.ldq + c;
    if (c + kTileCols <= p.ldq && p.ldq % kTileCols == 0 && (reinterpret_cast<uintptr_t>(p.q) & 7u) == 0)
      *reinterpret_cast<uint2*>(dst) = make_uint2(b[0], b[1]);
    else
#pragma unroll
      for (int j = 0; j < kTileCols; ++j)
        if (c + j < p.ldq) dst[j] = uint8_t(b[j / 4] >> (8 * (j % 4)));
  }
  if (!p.transpose) return bad;
  __syncthreads();
  for (int e = threadIdx.x; e < kFp8Block * 32; e += blockDim.x) {
    const int cc = e >> 5, w4 = e & 31;
    const int64_t k = g * kFp8Block + cc;  // row k of Wᵀ, columns r0 + 4·w4 .. (ldq ≥ r0 + 128)
    if (k < p.K)
      *reinterpret_cast<uint32_t*>(p.q + k * p.ldq + r0 + 4 * w4) =
          *reinterpret_cast<const uint32_t*>(&sm.t[cc][4 * w4]);
  }
  __syncthreads();  // sm is reused by the caller's next tile
  return bad;
}

// One warp, row r of x [M, K] (K a multiple of 128, x 16-byte aligned): the row's 1×128 tiles
// eight at a time, their loads issued together, eight lanes per tile (group8_tile_scale, as
// quantize_rows_kernel: a warp per tile spent about half its instructions on the scale, its
// reciprocal and the index); group h takes tiles g0 + h and g0 + 4 + h, lane j columns 4j + 32k.
// The same codes and scales as quantize_rows_kernel. A row r ≥ M is padding (codes 0, scale 1).
// Returns (every lane) whether the row held a non-finite value.
__device__ bool rows_row(const float* x, int64_t M, int64_t M_lt, int64_t K, int64_t r, bool pow2, uint8_t* q,
                         float* sc, float* sc_lt) {
  const int lane = threadIdx.x & 31, h = lane >> 3, j = lane & 7;
  const int64_t ng = K / kFp8Block;
  unsigned bad_row = 0;
  for (int64_t g0 = 0; g0 < ng; g0 += 8) {
    float v[2][16];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const int64_t g = g0 + 4 * t + h;
      group8_get(x + r * K + g * kFp8Block, j, r < M && g < ng, v[t]);
    }
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      if (g0 + 4 * t >= ng) break;  // warp-uniform
      const int64_t g = g0 + 4 * t + h;
      unsigned bad;
      const float s = group8_tile_scale(v[t], pow2, bad);  // every lane: it shuffles
      if (g >= ng) continue;
      bad_row |= bad;
      if (j == 0) {
        const float sw = bad ? __int_as_float(0x7fc00000) : s;
        if (r < M) sc[r * ng + g] = sw;
        sc_lt[g * M_lt + r] = sw;
      }
      group8_put(q + r * K + g * kFp8Block, j, v[t], s, bad == 0);
    }
  }
  return __any_sync(0xffffffffu, bad_row != 0);
}

// Fprop: CTAs [0, w_tiles) the weight's tiles; the rest (n_tok of them, looping) the token side,
// M_lt rows (M rounded up to cuBLASLt's 4, the padding rows code 0 and scale 1): x's rows, a warp per
// row (the cache and the VEC128 scales at once), or the cached scales rewritten into VEC128 layout,
// 256 rows per CTA, and, when the cache lacks the padding rows, its codes copied into q_lt.
// CTA `cta` of the w_tiles + n_tok that run p, ctas of them arriving at sync.
__device__ void fprop_prep_cta(WeightSmem& sm, const FpropPrep& p, int64_t cta, int64_t w_tiles, int64_t n_tok,
                               NanSync& sync, unsigned ctas) {
  const int64_t kb = p.w.K / kFp8Block;
  unsigned bad = 0;
  const int64_t b = cta - w_tiles;
  if (b < 0) {
    bad = weight_tile(sm, cta, p.w, p.pow2) ? kBadW : 0;
  } else if (p.x) {
    for (int64_t r = b * 8 + (threadIdx.x >> 5); r < p.M_lt; r += n_tok * 8)
      if (rows_row(p.x, p.M, p.M_lt, p.w.K, r, p.pow2, p.q_lt, p.x_scale, p.x_scale_lt)) bad = kBadX;
  } else {
    for (int64_t r = b * int64_t(blockDim.x) + threadIdx.x; r < p.M_lt; r += n_tok * int64_t(blockDim.x))
      for (int64_t j = 0; j < kb; ++j) {
        const float v = r < p.M ? p.x_scale[r * kb + j] : 1.0f;
        if (isnan(v)) bad = kBadX;
        p.x_scale_lt[j * p.M_lt + r] = v;
      }
    if (p.q_lt != p.xq) {  // K is a multiple of 128: 16-byte pieces
      const int64_t n = p.M * p.w.K / 16, n_lt = p.M_lt * p.w.K / 16;
      for (int64_t i = b * int64_t(blockDim.x) + threadIdx.x; i < n_lt; i += n_tok * int64_t(blockDim.x))
        reinterpret_cast<uint4*>(p.q_lt)[i] = i < n ? reinterpret_cast<const uint4*>(p.xq)[i] : make_uint4(0, 0, 0, 0);
    }
  }
  if (bad) atomicOr(&sync.flag, bad);
  nan_end(sync, ctas, p.w.scale_lt, ((p.w.N + kFp8Block - 1) / kFp8Block) * p.w.ld4, kBadX | kBadW, nullptr, 0, 0);
}

// The preparation of CTA blockIdx.x in a group: the last whose first CTA is at or before it (start
// rises strictly: launch_groups leaves out the empty ones). A binary search: most CTAs of a grouped
// launch take one tile, so their prologue counts (ncu: ~5% of the experts' backward preparation's
// instructions with a scan over the entries).
__device__ int group_entry(const int64_t* start, int n) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (start[mid] <= int64_t(blockIdx.x)) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// Two CTAs per SM: one more register than 128 leaves room for one, and the Fprop preparations ran
// 1.4× longer (docs/cuda_runs.md, session 43).
__global__ void __launch_bounds__(256, 2) fprop_prep_kernel(const __grid_constant__ FpropGroup g, int slot) {
  __shared__ WeightSmem sm;
  const int e = group_entry(g.start, g.n);
  const FpropPrep p = g.p[e];
  fprop_prep_cta(sm, p, int64_t(blockIdx.x) - g.start[e], g.a[e], g.b[e], g_nan[slot][e],
                 unsigned(g.start[e + 1] - g.start[e]));
}

// dy [M, N], one CTA per 128×128 block (g, rb), staged in shared memory: for Dgrad each warp
// quantizes its rows from there (1×128 tiles q1 [M1, ld1], VEC128 scales s1_lt [⌈N/128⌉, M1]); for
// Wgrad the block is quantized per column (128×1 tiles transposed: q2 [N, ld2], VEC128 scales
// s2_lt [⌈M/128⌉, N]). Columns N..ld1 of q1 and M..ld2 of q2 get code 0. The bytes and scales of
// quantize_rows_kernel and cols_t_tile.
// Row stride in floats: rows 16-byte aligned for float4 access.
constexpr int kDyLd = kFp8Block + 4;
struct DySmem {
  float t[kFp8Block][kDyLd];
};
// The 16 values of rows i0 .. i0 + 15 of column col, in the order rows i0 + (j + 4·sub) % 16 for
// j < 16 (two base addresses, immediate offsets): a pair's two threads, 16 rows apart, would read
// the same banks at any even stride, and the rotation puts them 20 or 4 rows apart, 16 banks.
__device__ __forceinline__ void col16(const DySmem& sm, int i0, int col, int sub, float (&v)[16]) {
  const float* b1 = &sm.t[i0 + 4 * sub][col];
  const float* b2 = b1 - 16 * sub * kDyLd;
#pragma unroll
  for (int j = 0; j < 12; ++j) v[j] = b1[j * kDyLd];
#pragma unroll
  for (int j = 12; j < 16; ++j) v[j] = b2[j * kDyLd];
}
// The 128×1 tiles of the 128 × 128 block in sm (rows r0.., columns c0.. of a [rows, n] matrix),
// transposed: codes q [n, ld] (rows beyond the matrix hold 0: code 0), VEC128 scales s_lt
// [⌈rows/128⌉, n]. Threads 2c and 2c + 1 hold column c, thread `sub` its rows 32k + 16·sub .. +15
// (k < 4): the pair's amax is one shuffle away, so the pass has no barrier and no shared
// statistics of its own (a thread per column and half, with the halves' amax through shared memory,
// took two barriers), and each 32 rows' codes of a column leave as one 32-byte sector from the
// pair's two 16-byte stores. Returns whether the thread's column held non-finite values.
__device__ unsigned cols_pass(DySmem& sm, int64_t r0, int64_t c0, int64_t n, int64_t ld, bool pow2, uint8_t* q,
                              float* s_lt) {
  const int col = threadIdx.x >> 1, sub = threadIdx.x & 1;
  const int64_t c = c0 + col, rb = r0 / kFp8Block;
  float am = 0.0f;
  unsigned bad = 0;
#pragma unroll 1
  for (int k = 0; k < 4; ++k) {
    float v[16];
    col16(sm, 32 * k + 16 * sub, col, sub, v);
#pragma unroll
    for (int j = 0; j < 16; ++j) am = max_nan(am, fabsf(v[j]));
  }
  if (!finite_amax(am)) {
    am = 0.0f;
    for (int k = 0; k < 4; ++k) {
      float v[16];
      col16(sm, 32 * k + 16 * sub, col, sub, v);
      for (int j = 0; j < 16; ++j) tile_stat(v[j], am, bad);
    }
  }
  am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, 1));
  bad += __shfl_xor_sync(0xffffffffu, bad, 1);
  if (c < n) {
    const float sv = scale_of(am, pow2);
    if (sub == 0) s_lt[rb * n + c] = bad ? __int_as_float(0x7fc00000) : sv;
    // 16 codes to a store (ld a multiple of 16, q 16-byte aligned; rows ld.. do not exist, rows
    // M..ld hold 0: code 0); b's words come in the rotated row order, hence the selects.
    const ScaleDiv d(sv, bad == 0);
#pragma unroll 1
    for (int k = 0; k < 4; ++k) {
      const int i0 = 32 * k + 16 * sub;
      if (r0 + i0 >= ld) break;
      float v[16];
      col16(sm, i0, col, sub, v);
      uint32_t b[4];
      codes<16>(v, d, b);
      *reinterpret_cast<uint4*>(q + c * ld + r0 + i0) =
          sub ? make_uint4(b[3], b[0], b[1], b[2]) : make_uint4(b[0], b[1], b[2], b[3]);
    }
  } else {
    bad = 0;
  }
  __syncthreads();  // sm is reused by the caller's next block
  return bad;
}

// Rows of a block starting at row r0 of n rows: at most a block's.
__device__ __forceinline__ int block_rows(int64_t n, int64_t r0) {
  return n - r0 < kFp8Block ? int(n - r0) : kFp8Block;
}

__device__ unsigned dy_tile(DySmem& sm, int64_t g, int64_t rb, const BackwardPrep& p) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t M = p.M, N = p.N, r0 = rb * kFp8Block, c0 = g * kFp8Block;
  const int64_t cl = c0 + 4 * lane;  // this lane's first column
  const bool vec = N % 4 == 0 && (reinterpret_cast<uintptr_t>(p.dy) & 15u) == 0;
  unsigned any = 0;
  // The rows' tiles of the previous block read other lanes' columns: all of them before any copy.
  __syncwarp();
  // Warp w's rows w, w + 8, …, four columns per lane, into shared memory (the 128×1 tiles read it by
  // column; the rows' codes below read back what the warp copied). cp.async puts all 16 copies in
  // flight at once: loads through registers went one at a time (ncu: each load's wait before its
  // store to shared memory drew ~30% of the stall samples).
  if (vec) {
    // One 64-bit product for the warp's first row, then a step of eight rows per copy (the
    // products per copy were ~60% of this part's instructions).
    const float* src = p.dy + (r0 + w) * N + cl;
    const int rows = block_rows(M, r0);
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      const bool in = w + 8 * k < rows && cl < N;  // N % 4 == 0: all four columns or none
      cp_async16(&sm.t[w + 8 * k][4 * lane], in ? src : p.dy, in);
      src += 8 * N;
    }
    cp_async_commit();
    cp_async_wait<0>();
  } else {
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      const int64_t r = r0 + w + 8 * k;
      float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (r < M && cl < N) {
        const float* src = p.dy + r * N + cl;
        v.x = src[0];
        v.y = cl + 1 < N ? src[1] : 0.0f;
        v.z = cl + 2 < N ? src[2] : 0.0f;
        v.w = cl + 3 < N ? src[3] : 0.0f;
      }
      *reinterpret_cast<float4*>(&sm.t[w + 8 * k][4 * lane]) = v;
    }
  }
  __syncwarp();
  // The 1×128 tiles, eight lanes per row and four rows per iteration (group8_tile_scale: a warp per
  // row spent ~120 instructions on each, half of them the scale, its reciprocal and the index, now
  // shared by eight lanes); lane j of group h takes row w + 8(4m + h), columns 4j + 32k, so each
  // group's loads read 128 contiguous bytes. The loop is rolled: each SM runs this code once per
  // launch, so its length is fetch time. Rows M..M1 are zero: codes 0, scale 1.
  if (p.q1) {
    // Pointers stepped per iteration and 32-bit row tests: the 64-bit index products per row were
    // a third of the iteration's instructions besides the values' own.
    const int h = lane >> 3, j = lane & 7, i0 = w + 8 * h;
    const int rows1 = block_rows(p.M1, r0);  // rows of q1 (M1 ≥ M) in the block
    float* s1 = p.s1_lt + g * p.M1 + r0 + i0;
    uint8_t* q1 = p.q1 + (r0 + i0) * p.ld1 + c0;  // ld1 = N rounded up to 128: in range
    const int64_t q1_step = 32 * p.ld1;
#pragma unroll 1
    for (int i = i0; i - 8 * h < rows1; i += 32, s1 += 32, q1 += q1_step) {  // warp-uniform: w + 32m
      float v[16];
      group8_get(sm.t[i], j, true, v);
      unsigned bad;
      const float s = group8_tile_scale(v, p.pow2, bad);  // every lane: it shuffles
      if (i < rows1) {
        any |= bad;
        if (j == 0) *s1 = bad ? __int_as_float(0x7fc00000) : s;
        group8_put(q1, j, v, s, bad == 0);
      }
    }
  }
  if (!p.q2) return any;
  __syncthreads();
  return any | cols_pass(sm, r0, c0, N, p.ld2, p.pow2, p.q2, p.s2_lt);
}

// x̂'s 128×1 tiles for Wgrad, a 128 × 128 block (g, rb) per CTA: the forward's FP8 copy of x
// (codes xs_q [M, K], K a multiple of 16, the row's scale per 128 columns) widened and scaled into
// shared memory — 16 codes per 16-byte load, four rows per thread — then cols_pass (q3 [K, ld2],
// s3_lt [⌈M/128⌉, K]). A 128 × 32 block per CTA (cols_t_tile) moved 4 KB, too little to keep
// the memory busy at two CTAs per SM. The values are cols_t_tile's: e4m3 · scale in FP32.
__device__ unsigned xhat_tile(DySmem& sm, int64_t g, int64_t rb, const BackwardPrep& p) {
  const int64_t M = p.M, K = p.K, r0 = rb * kFp8Block, c0 = g * kFp8Block, kb = (K + kFp8Block - 1) / kFp8Block;
  const int cq = 16 * (threadIdx.x & 7);
  const int64_t c = c0 + cq;  // K is a multiple of 16: all 16 columns in range or none
  uint4 u[4];
  float sr[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t r = r0 + (threadIdx.x >> 3) + 32 * k;
    const bool in = r < M && c < K;
    u[k] = in ? *reinterpret_cast<const uint4*>(p.xs_q + r * K + c) : make_uint4(0, 0, 0, 0);
    sr[k] = in ? p.xs_scale[r * kb + g] : 0.0f;
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int i = (threadIdx.x >> 3) + 32 * k;
    const uint32_t w[4] = {u[k].x, u[k].y, u[k].z, u[k].w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float4 f = widen4(w[q]);
      *reinterpret_cast<float4*>(&sm.t[i][cq + 4 * q]) =
          make_float4(f.x * sr[k], f.y * sr[k], f.z * sr[k], f.w * sr[k]);
    }
  }
  __syncthreads();
  return cols_pass(sm, r0, c0, K, p.ld2, p.pow2, p.q3, p.s3_lt);
}

union BackwardSmem {
  DySmem dy;
  WeightSmem w;
};

// Backward: CTAs [0, n_dy) dy's 128×128 blocks, then (Wgrad) x̂'s 128×128 blocks, then (Dgrad) Wᵀ's
// tiles.
__device__ void backward_prep_cta(BackwardSmem& sm, const BackwardPrep& p, int64_t cta, int64_t n_dy, int64_t n_x,
                                  NanSync& sync, unsigned ctas) {
  const int64_t kbn = (p.N + kFp8Block - 1) / kFp8Block, rbs = (p.M + kFp8Block - 1) / kFp8Block;
  unsigned bad = 0;
  int64_t b = cta;
  if (b < n_dy) {
    for (int64_t t = b; t < kbn * rbs; t += n_dy)
      if (dy_tile(sm.dy, t % kbn, t / kbn, p)) bad = kBadDy;
  } else if ((b -= n_dy) < n_x) {
    for (int64_t t = b; t < ((p.K + kFp8Block - 1) / kFp8Block) * rbs; t += n_x)
      if (xhat_tile(sm.dy, t / rbs, t % rbs, p)) bad = kBadX;
  } else {
    bad = weight_tile(sm.w, b - n_x, p.w, p.pow2) ? kBadW : 0;
  }
  if (bad) atomicOr(&sync.flag, bad);
  nan_end(sync, ctas, p.q2 ? p.s3_lt : nullptr, rbs * p.K, kBadDy | kBadX, p.q1 ? p.w.scale_lt : nullptr,
          ((p.K + kFp8Block - 1) / kFp8Block) * p.w.ld4, kBadDy | kBadW);
}

__global__ void __launch_bounds__(256, 3) backward_prep_kernel(const __grid_constant__ BackwardGroup g,
                                                                      int slot) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int e = group_entry(g.start, g.n);
  const BackwardPrep p = g.p[e];
  backward_prep_cta(*reinterpret_cast<BackwardSmem*>(smem_raw), p, int64_t(blockIdx.x) - g.start[e], g.a[e], g.b[e],
                    g_nan[slot][e], unsigned(g.start[e + 1] - g.start[e]));
}

// The g_nan words of a stream: the legacy stream's is 0, other streams get the next free one.
int nan_slot(cudaStream_t s) {
  static std::mutex mu;
  static std::map<cudaStream_t, int> slots{{nullptr, 0}};
  std::lock_guard<std::mutex> lk(mu);
  auto it = slots.find(s);
  if (it != slots.end()) return it->second;
  DSV3_CHECK(int(slots.size()) < kNanSlots, "FP8 preparation: more than ", kNanSlots, " streams");
  return slots.emplace(s, int(slots.size())).first->second;
}

}  // namespace

// A transposed 128×128 output is the 128×128 tiling of xᵀ (same tiles, scales and codes), so x is
// transposed first and the coalesced block kernel runs on xᵀ; 128×1 transposed has its own kernel.
void cuda_quantize_fp8_async(const QuantizeFp8Args& a, unsigned long long* nonfinite, bool nan_mark) {
  validate(a);
  int64_t K = last_dim(a.x), M = rows_of(a.x);
  if (M * K == 0) return;
  const float* x = a.x.data<float>();
  std::unique_ptr<Scratch> xt;
  const Fp8Tiling tiling = a.tiling;
  bool transpose = a.transpose_out;
  if (transpose && tiling == Fp8Tiling::Col128x1) {
    quantize_cols_t_kernel<<<dim3(unsigned((K + 31) / 32), unsigned((M + kFp8Block - 1) / kFp8Block)), 256>>>(
        x, nullptr, nullptr, M, K, a.pow2_scale, nan_mark, ptr<uint8_t>(a.q), ptr<float>(a.scale), nonfinite);
    check_launch("quantize_fp8 128x1 transposed");
    return;
  }
  if (transpose && tiling == Fp8Tiling::Block128x128) {
    xt = std::make_unique<Scratch>(size_t(M * K) * sizeof(float));
    transpose_kernel<<<dim3(unsigned((K + 31) / 32), unsigned((M + 31) / 32)), dim3(32, 8)>>>(x, M, K, xt->as<float>());
    check_launch("quantize_fp8 transpose");
    x = xt->as<float>();
    std::swap(M, K);
    transpose = false;
  }
  if (tiling == Fp8Tiling::Block128x128) {
    const int64_t tiles = ((M + kFp8Block - 1) / kFp8Block) * ((K + kFp8Block - 1) / kFp8Block);
    quantize_block_kernel<<<unsigned(tiles), 256>>>(x, M, K, a.pow2_scale, nan_mark, ptr<uint8_t>(a.q),
                                                     ptr<float>(a.scale), nonfinite);
  } else if (tiling == Fp8Tiling::Row1x128 && !transpose) {
    quantize_rows_kernel<<<blocks_for(M * ((K + kFp8Block - 1) / kFp8Block) * 8), 256>>>(
        x, M, K, rows_vec(x, K, ptr<uint8_t>(a.q)), a.pow2_scale, nan_mark, ptr<uint8_t>(a.q), ptr<float>(a.scale),
        nonfinite);
  } else {
    const int64_t th = tiling == Fp8Tiling::Row1x128 ? 1 : kFp8Block, tw = tiling == Fp8Tiling::Col128x1 ? 1 : kFp8Block;
    const int64_t tiles = ((M + th - 1) / th) * ((K + tw - 1) / tw);
    quantize_kernel<<<blocks_for(tiles * 32), 256>>>(x, M, K, th, tw, a.pow2_scale, transpose, nan_mark,
                                                     ptr<uint8_t>(a.q), ptr<float>(a.scale), nonfinite);
  }
  check_launch("quantize_fp8");
}

void cuda_requantize_cols_t(const Fp8Tiles& src, bool pow2_scale, const Tensor& q, const Tensor& scale) {
  const int64_t M = src.q.dim(0), K = src.q.dim(1), rbs = (M + kFp8Block - 1) / kFp8Block;
  DSV3_CHECK(src.scale.dim(0) == M && src.scale.dim(1) == (K + kFp8Block - 1) / kFp8Block && q.numel() == M * K &&
                 scale.numel() == K * rbs,
             "cuda_requantize_cols_t: shapes do not fit FP8 1x128 tiles of [", M, ", ", K, "]");
  if (M * K == 0) return;
  quantize_cols_t_kernel<<<dim3(unsigned((K + 31) / 32), unsigned(rbs)), 256>>>(
      nullptr, ptr<uint8_t>(src.q), src.scale.data<float>(), M, K, pow2_scale, true, ptr<uint8_t>(q), ptr<float>(scale),
      nullptr);
  check_launch("fp8 re-quantization 128x1");
}

namespace cuda {

namespace {

// One preparation's CTAs by role (a, b as PrepGroup's; total 0: nothing to do), after its checks.
struct Split {
  int64_t a = 0, b = 0, total = 0;
};

Split fprop_split(const FpropPrep& p) {
  const WeightSide& w = p.w;
  DSV3_CHECK(w.K % kFp8Block == 0 && !w.transpose && w.ldq == w.K && w.ld4 >= w.K / kFp8Block,
             "fp8_fprop_prep: the weight side does not fit [", w.N, ", ", w.K, "]");
  DSV3_CHECK(p.M_lt >= p.M && p.M_lt < p.M + 4 && (p.x ? p.q_lt == p.xq : p.q_lt == p.xq || p.M_lt > p.M),
             "fp8_fprop_prep: token rows ", p.M, " / ", p.M_lt);
  if (p.M == 0) return {};
  DSV3_CHECK(!p.x || rows_vec(p.x, w.K, p.xq), "fp8_fprop_prep: x must be 16-byte aligned");
  const int64_t w_tiles = ((w.N + kFp8Block - 1) / kFp8Block) * (w.K / kFp8Block);
  // Few CTAs, looping: every CTA of the launch takes one turn at the arrival counter (nan_end).
  const int64_t rel = (p.M_lt + 255) / 256, copy = p.q_lt != p.xq ? (p.M_lt * w.K / 16 + 255) / 256 : 0;
  const int64_t n_tok = std::min<int64_t>(p.x ? (p.M_lt + 7) / 8 : std::max(rel, copy), 4 * sm_count());
  return {w_tiles, n_tok, w_tiles + n_tok};
}

Split backward_split(const BackwardPrep& p) {
  const int64_t kbn = (p.N + kFp8Block - 1) / kFp8Block, rbs = (p.M + kFp8Block - 1) / kFp8Block;
  DSV3_CHECK((!p.q1 || (p.ld1 == kbn * kFp8Block && p.M1 >= p.M && p.M1 <= rbs * kFp8Block && p.w.transpose &&
                        p.w.N == p.N && p.w.K == p.K && p.w.ldq == p.ld1)) &&
                 (!p.q2 || (p.ld2 >= p.M && p.ld2 <= rbs * kFp8Block && p.q3 && p.K % 16 == 0 &&
                            aligned16(p.xs_q) &&  // xhat_tile's 16-byte loads
                            p.ld2 % 16 == 0 && aligned16(p.q2) && aligned16(p.q3))) &&  // cols_pass's 16-byte stores
                 (reinterpret_cast<uintptr_t>(p.q1) & 3u) == 0,  // dy_tile stores q1's codes 4 at a time
             "fp8_backward_prep: operands do not fit dy [", p.M, ", ", p.N, "] and K ", p.K);
  if (p.M * p.N == 0 || (!p.q1 && !p.q2)) return {};
  // Few CTAs, looping (three fit an SM by the launch bounds): every CTA takes one turn at the
  // arrival counter (nan_end).
  const int64_t n_dy = std::min<int64_t>(kbn * rbs, 3 * sm_count());
  const int64_t n_x = p.q2 ? std::min<int64_t>(((p.K + kFp8Block - 1) / kFp8Block) * rbs, 3 * sm_count()) : 0;
  const int64_t n_w = p.q1 ? ((p.N + kFp8Block - 1) / kFp8Block) * ((p.K + kFp8Block - 1) / kFp8Block) : 0;
  return {n_dy, n_x, n_dy + n_x + n_w};
}

// The launches, kPrepGroup preparations at a time (those with nothing to do left out).
template <class P, class SplitFn, class Launch>
void launch_groups(std::span<const P> ps, SplitFn split, Launch launch) {
  for (size_t i0 = 0; i0 < ps.size(); i0 += kPrepGroup) {
    PrepGroup<P> g;
    for (size_t i = i0; i < std::min(ps.size(), i0 + kPrepGroup); ++i) {
      const Split s = split(ps[i]);
      if (s.total == 0) continue;
      g.a[g.n] = s.a;
      g.b[g.n] = s.b;
      g.p[g.n] = ps[i];
      g.start[g.n + 1] = g.start[g.n] + s.total;
      ++g.n;
    }
    if (g.n == 0) continue;
    DSV3_CHECK(g.start[g.n] <= INT32_MAX, "FP8 grouped preparation: ", g.start[g.n], " CTAs");
    launch(g);
  }
}

}  // namespace

void fp8_fprop_prep(std::span<const FpropPrep> ps) {
  launch_groups(ps, fprop_split, [](const FpropGroup& g) {
    fprop_prep_kernel<<<unsigned(g.start[g.n]), 256, 0, stream()>>>(g, nan_slot(stream()));
    check_launch("fp8 Fprop preparation");
  });
}

void fp8_backward_prep(std::span<const BackwardPrep> ps) {
  static const bool attr = [] {
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(backward_prep_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(sizeof(BackwardSmem))));
    return true;
  }();
  (void)attr;
  launch_groups(ps, backward_split, [](const BackwardGroup& g) {
    backward_prep_kernel<<<unsigned(g.start[g.n]), 256, sizeof(BackwardSmem), stream()>>>(g,
                                                                                                nan_slot(stream()));
    check_launch("fp8 backward preparation");
  });
}

}  // namespace cuda

Fp8Status cuda_quantize_fp8(const QuantizeFp8Args& a) {
  int64_t K = last_dim(a.x), M = rows_of(a.x);
  Scratch count(sizeof(unsigned long long));
  DSV3_CUDA_CHECK(cudaMemset(count.as<void>(), 0, sizeof(unsigned long long)));
  cuda_quantize_fp8_async(a, count.as<unsigned long long>(), false);
  unsigned long long bad = 0;
  cuda::raise_range_errors();  // a read-back: an earlier op's queued index error surfaces here first
  DSV3_CUDA_CHECK(cudaMemcpy(&bad, count.as<void>(), sizeof bad, cudaMemcpyDeviceToHost));
  if (bad > 0 && a.on_nonfinite == NonFinitePolicy::Throw)
    input_error("FP8 quantization of ", a.name, ": ", bad, " non-finite value(s) (NaN or Inf) in [", M, ", ", K,
                "]; expected finite values");
  return {int64_t(bad)};
}

}  // namespace dsv3
