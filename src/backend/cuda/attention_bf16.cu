// BF16 tensor-core flash attention for training (FlashAttention-2 scheme on mma.sync m16n8k16; the
// forward and dk/dv by default on wgmma, attention_bf16_wgmma.cu, the same scheme and roundings).
// A prep pass rounds q, k, v (and dout) to BF16 (RNE) into per-head [B·H, Tp, Dp] copies, rows
// padded to a multiple of 64 and head dims to the kernel's template width with zeros, so every
// tile load is an unconditional cp.async and zero columns add nothing to the dot products. Where
// AttentionArgs::keep asks, the forward's K and V heads and its Q (the wgmma kernel writes out the
// tiles it rounds) stay for the backward, which reads them from AttentionBackwardArgs::kept instead
// of rounding q, k and v again (MLA then frees its F32 q and kv after the forward).
//   forward: CTA = 4 warps × 16 queries; K/V tiles of 64 keys double-buffered by cp.async; Q kept
//            in registers as MMA A fragments; S = Q·Kᵀ, online softmax in FP32 registers (exp2 with
//            the scale folded in), P rounded to BF16 straight from the accumulator layout for P·V.
//   dq:      CTA = 64 queries over key tiles of 32: S, dP = dO·Vᵀ, dS = P∘(dP − D), dQ += dS·K.
//   dk, dv:  CTA = 64 keys over query tiles of 32: Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ, dV += Pᵀ·dO,
//            dK += dSᵀ·Q.
//   dq as a matmul (the default while dSᵀ fits kDsMaxBytes): the dk, dv kernel also stores its
//            BF16 dSᵀ tiles (the MMA operand it rounds anyway) and zeros for the query tiles the
//            causal mask skips; dQ = scale·dS·K is then cuBLASLt batched matmuls per batch
//            element and block of query rows, each over the keys its block sees. The dq kernel
//            recomputes S and dP (two of its three products), so this saves that work at the cost
//            of writing and reading dSᵀ once.
// D = rowsum(dO∘O) in FP32 from the FP32 tensors. Every output element has one owner (no atomics,
// deterministic). Causal tiles entirely above the diagonal are skipped; the masking is the FP32
// kernels' (query i at absolute position q_offset + i sees keys ≤ q_offset + i).
#include "backend/cuda/attention_bf16.h"
#include "backend/cuda/attention_bf16_tile.cuh"
#include "backend/cuda/attention_bf16_wgmma.h"
#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/lt_gemm.h"
#include "backend/cuda/mma.cuh"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>

namespace dsv3 {
using namespace cuda;

namespace {

std::atomic<bool> g_bf16{false};
// dQ by matmul from the stored dSᵀ (on unless DSV3_ATTN_DQ_MATMUL=0); the dq kernel otherwise, or
// when dSᵀ (2 bytes per query-key pair of every head) would exceed kDsMaxBytes.
std::atomic<bool> g_dq_matmul{on_unless_env_zero("DSV3_ATTN_DQ_MATMUL")};
constexpr int64_t kDsMaxBytes = int64_t(2) << 30;
std::atomic<int64_t> g_dq_matmuls{0};
// The forward and dk/dv kernels on wgmma (attention_bf16_wgmma.cu; on unless DSV3_ATTN_WGMMA=0) or
// on mma.sync (the dq kernel is mma.sync either way).
std::atomic<bool> g_wgmma{on_unless_env_zero("DSV3_ATTN_WGMMA")};
std::atomic<int64_t> g_wgmma_calls{0};
std::atomic<int64_t> g_split_calls{0};
// Causal dQ matmul in this many blocks of query rows (DSV3_ATTN_DQ_BLOCKS, default 4): block j
// reads keys up to its last row only, (nb + 1) / (2·nb) of the square's products.
std::atomic<int> g_dq_blocks{[] {
  const char* e = std::getenv("DSV3_ATTN_DQ_BLOCKS");
  const int n = e ? std::atoi(e) : 4;
  return n >= 1 && n <= 64 ? n : 4;
}()};

constexpr int kThreads = 128, kRowPad = 64, kPad = 8;
constexpr float kLog2e = 1.4426950408889634f;

struct Dims {
  int64_t b, t, s, h, dqk, dv;
};
Dims dims_of(const Tensor& q, const Tensor& k, const Tensor& v) {
  int o = q.ndim() == 4 ? 1 : 0;
  return {o ? q.dim(0) : 1, q.dim(o), k.dim(o), q.dim(o + 1), q.dim(o + 2), v.dim(o + 2)};
}
int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Lane addresses of ldmatrix x4 for a 16×16 block at (r0, c0) of a row-major shared tile:
// A operand (rows = M) and "trans" B operand (rows = K): matrices ordered (r lo, c lo), (r hi, c lo),
// (r lo, c hi), (r hi, c hi).
__device__ __forceinline__ const bf16_t* frag_a(const bf16_t* base, int ld, int r0, int c0, int lane) {
  return base + (r0 + (lane & 15)) * ld + c0 + (lane >> 4) * 8;
}
// Non-trans B operand whose rows are N (keys, say) and columns K: two n-tiles of 8 at r0, r0 + 8;
// matrices (n lo, k lo), (n lo, k hi), (n hi, k lo), (n hi, k hi) → b0, b1 of n-tile 0 then 1.
__device__ __forceinline__ const bf16_t* frag_b(const bf16_t* base, int ld, int r0, int c0, int lane) {
  return base + (r0 + (lane & 7) + ((lane >> 4) << 3)) * ld + c0 + ((lane >> 3) & 1) * 8;
}
// Trans B operand stored with rows = K and columns = N: 16 k-rows at r0, two n-tiles at c0, c0 + 8.
__device__ __forceinline__ const bf16_t* frag_bt(const bf16_t* base, int ld, int r0, int c0, int lane) {
  return base + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + c0 + (lane >> 4) * 8;
}

// acc[:, 0..D) += a · rows [k0, k0 + 16) of the [·, D] tile at base (shared, row stride ld): the
// rows are the MMA's K, read transposed by ldmatrix (the P·V / dS·K / Pᵀ·dO / dSᵀ·Q products).
template <int D>
__device__ __forceinline__ void mma_a_rows(float (&acc)[D / 8][4], const uint32_t (&a)[4], const bf16_t* base, int ld,
                                           int k0, int lane) {
#pragma unroll
  for (int np = 0; np < D / 16; ++np) {
    uint32_t b[4];
    ldmatrix_x4_trans(b, frag_bt(base, ld, k0, np * 16, lane));
    mma_bf16(acc[2 * np], a, b[0], b[1]);
    mma_bf16(acc[2 * np + 1], a, b[2], b[3]);
  }
}

// rows × W BF16 from global (row stride W, contiguous) into shared (row stride W + kPad).
template <int W>
__device__ __forceinline__ void load_tile(bf16_t* dst, const bf16_t* src, int rows) {
  constexpr int chunks = W / 8;
  for (int i = threadIdx.x; i < rows * chunks; i += kThreads) {
    const int r = i / chunks, c = i - r * chunks;
    cp_async16(dst + r * (W + kPad) + c * 8, src + int64_t(r) * W + c * 8);
  }
}

// ---- prep ---------------------------------------------------------------------------------------

// Columns of a per-head F32 source: element (token, head, c) at p[token·tok + head·head + c], c < w
// (head = 0: one row shared by all heads).
struct HeadCols {
  const float* p = nullptr;
  int64_t tok = 0, head = 0;
  int w = 0;
};

// [B·T tokens, H heads] rows → [B·H, Tp, Dp] BF16 (RNE): columns [0, a.w) from a, then [a.w, a.w +
// b.w) from b (w = 0: none), zero past them and past T. Grid (row chunks, H, B); 8 elements per
// thread (a.w is a multiple of 8, so a chunk lies in one segment).
__global__ void to_bf16_heads(HeadCols a, HeadCols b, bf16_t* dst, int t, int h, int tp, int dp) {
  const int chunks = dp / 8;
  const int idx = int(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= tp * chunks) return;
  const int r = idx / chunks, c = (idx - r * chunks) * 8;
  const int64_t hh = blockIdx.y, tok = int64_t(blockIdx.z) * t + r;
  uint4 o = make_uint4(0u, 0u, 0u, 0u);
  if (r < t && c < a.w + b.w) {
    const float* src = c < a.w ? a.p + tok * a.tok + hh * a.head + c : b.p + tok * b.tok + hh * b.head + (c - a.w);
    const float4 x = reinterpret_cast<const float4*>(src)[0], y = reinterpret_cast<const float4*>(src)[1];
    o = make_uint4(pack_bf16(x.x, x.y), pack_bf16(x.z, x.w), pack_bf16(y.x, y.y), pack_bf16(y.z, y.w));
  }
  *reinterpret_cast<uint4*>(dst + ((int64_t(blockIdx.z) * h + hh) * tp + r) * int64_t(dp) + c) = o;
}

// The split form's dk_pe: per token, the sum over the H heads (in order 0..H-1, copy_cols' order)
// of dK's rope columns, which the dk/dv kernel left in part [B·S, H, dr]. Four columns per thread.
__global__ void sum_heads(const float4* part, float4* out, int64_t tokens, int h, int dr4) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= tokens * dr4) return;
  const int64_t tok = i / dr4, c = i - tok * dr4;
  const float4* p = part + tok * h * dr4 + c;
  float4 v = p[0];
  for (int j = 1; j < h; ++j) {
    const float4 u = p[int64_t(j) * dr4];
    v.x += u.x, v.y += u.y, v.z += u.z, v.w += u.w;
  }
  out[i] = v;
}

// Per row of dout: D[bh, i] = Σ_c dout·out (F32, 0 on padded rows), lse2[bh, i] = lse·log2(e)
// (+inf on padded rows, so exp2(s·scale·log2e − lse2) = 0 there), and dout rounded to BF16 into
// [B·H, Tp, Dp] like to_bf16_heads. One warp per row, 4 columns per lane per step.
__global__ void bwd_prep(const float* dout, const float* out, const float* lse, bf16_t* dout16, float* dsum,
                         float* lse2, int t, int h, int dv, int tp, int dp) {
  const int row = int(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= tp) return;
  const int64_t hh = blockIdx.y, b = blockIdx.z, bh = b * h + hh;
  const int64_t src = ((b * t + row) * h + hh) * dv;
  bf16_t* dst = dout16 + (bh * tp + row) * int64_t(dp);
  float s = 0.0f;
  for (int c = lane * 4; c < dp; c += 128) {
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row < t && c < dv) {
      x = *reinterpret_cast<const float4*>(dout + src + c);
      const float4 o = *reinterpret_cast<const float4*>(out + src + c);
      s = fmaf(x.x, o.x, fmaf(x.y, o.y, fmaf(x.z, o.z, fmaf(x.w, o.w, s))));
    }
    *reinterpret_cast<uint2*>(dst + c) = make_uint2(pack_bf16(x.x, x.y), pack_bf16(x.z, x.w));
  }
  s = warp_sum(s);
  if (lane == 0) {
    dsum[bh * tp + row] = s;
    lse2[bh * tp + row] = row < t ? lse[bh * t + row] * kLog2e : INFINITY;
  }
}

// ---- forward ------------------------------------------------------------------------------------

constexpr int kFwdM = 64, kFwdN = 64;

template <int DQK, int DV>
__global__ void __launch_bounds__(kThreads, 1)
    fwd_kernel(const float* q, const bf16_t* k, const bf16_t* v, float* out, float* lse, Dims dm, int64_t sp,
               float scale, bool causal, int64_t q_off) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int lq = DQK + kPad, lv = DV + kPad, NT = kFwdN / 8;
  bf16_t* qs = reinterpret_cast<bf16_t*>(smem_raw);  // [64][lq]
  bf16_t* ks = qs + kFwdM * lq;                      // [2][64][lq]
  bf16_t* vs = ks + 2 * kFwdN * lq;                  // [2][64][lv]
  const int64_t q0 = int64_t(gridDim.x - 1 - blockIdx.x) * kFwdM;  // longest causal rows first
  const int64_t bh = int64_t(blockIdx.z) * dm.h + blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const bf16_t* kg = k + bh * sp * DQK;
  const bf16_t* vg = v + bh * sp * DV;
  const int64_t q_last = q0 + kFwdM < dm.t ? q0 + kFwdM : dm.t;
  const int64_t nkeys = causal ? (dm.s < q_off + q_last ? dm.s : q_off + q_last) : dm.s;
  const int ntiles = int((nkeys + kFwdN - 1) / kFwdN);
  auto load_kv = [&](int j, int buf) {
    load_tile<DQK>(ks + buf * kFwdN * lq, kg + int64_t(j) * kFwdN * DQK, kFwdN);
    load_tile<DV>(vs + buf * kFwdN * lv, vg + int64_t(j) * kFwdN * DV, kFwdN);
    cp_async_commit();
  };
  if (ntiles > 0) load_kv(0, 0);
  // Q is read once per CTA: straight from the F32 tensor, rounded here (the first tile's barrier
  // publishes it).
  {
    constexpr int chunks = DQK / 4;
    const float* qg = q + blockIdx.y * dm.dqk;
    for (int i = tid; i < kFwdM * chunks; i += kThreads) {
      const int r = i / chunks, c = (i - r * chunks) * 4;
      float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
      if (q0 + r < dm.t && c < dm.dqk)
        x = *reinterpret_cast<const float4*>(qg + (int64_t(blockIdx.z) * dm.t + q0 + r) * dm.h * dm.dqk + c);
      *reinterpret_cast<uint2*>(qs + r * lq + c) = make_uint2(pack_bf16(x.x, x.y), pack_bf16(x.z, x.w));
    }
  }

  uint32_t qf[DQK / 16][4];
  float o[DV / 8][4];
#pragma unroll
  for (int n = 0; n < DV / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  attn::RowStats st;
  const float sl2 = scale * kLog2e;

  for (int j = 0; j < ntiles; ++j) {
    const int buf = j & 1;
    if (j + 1 < ntiles) {
      load_kv(j + 1, buf ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < DQK / 16; ++kk) ldmatrix_x4(qf[kk], frag_a(qs, lq, warp * 16, kk * 16, lane));
    }
    const bf16_t* kt = ks + buf * kFwdN * lq;
    const bf16_t* vt = vs + buf * kFwdN * lv;
    float s[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < DQK / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, frag_b(kt, lq, np * 16, kk * 16, lane));
        mma_bf16(s[2 * np], qf[kk], b[0], b[1]);
        mma_bf16(s[2 * np + 1], qf[kk], b[2], b[3]);
      }
    }
    float al_lo, al_hi;
    attn::softmax_tile(s, st, int64_t(j) * kFwdN, dm.s, causal, q_off, q0 + warp * 16, g, t4, sl2, al_lo, al_hi);
#pragma unroll
    for (int n = 0; n < DV / 8; ++n) {
      o[n][0] *= al_lo;
      o[n][1] *= al_lo;
      o[n][2] *= al_hi;
      o[n][3] *= al_hi;
    }
    // The S accumulators of n-tiles 2kk, 2kk + 1 are exactly the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
      uint32_t a[4];
      acc_to_a(a, s[2 * kk], s[2 * kk + 1]);
      mma_a_rows<DV>(o, a, vt, lv, kk * 16, lane);
    }
    __syncthreads();  // the buffer is refilled next iteration
  }
  attn::write_rows<DV>(o, st, out, lse, blockIdx.z, blockIdx.y, dm.t, dm.h, dm.dv, q0 + warp * 16, g, t4, scale);
}

// ---- backward: dq ---------------------------------------------------------------------------------

// s += A·Bᵀ over DQK (A = a1 rows m0.., B = b1 rows) and dp += C·Dᵀ over DV (c2, d2), NT n-tiles of 8
// each, zeroed first. The k-steps of the two products are interleaved so that 2·NT independent MMA
// chains are in flight (one product alone, 4 chains of 12 dependent MMAs, is latency-bound).
template <int DQK, int DV, int NT>
__device__ __forceinline__ void scores_and_dp(float (&s)[NT][4], float (&dp)[NT][4], const bf16_t* a1,
                                              const bf16_t* b1, const bf16_t* c2, const bf16_t* d2, int m0,
                                              int lane) {
  constexpr int lq = DQK + kPad, lv = DV + kPad, K1 = DQK / 16, K2 = DV / 16, KM = K1 > K2 ? K1 : K2;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < KM; ++kk) {
    if (kk < K1) {
      uint32_t a[4];
      ldmatrix_x4(a, frag_a(a1, lq, m0, kk * 16, lane));
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, frag_b(b1, lq, np * 16, kk * 16, lane));
        mma_bf16(s[2 * np], a, b[0], b[1]);
        mma_bf16(s[2 * np + 1], a, b[2], b[3]);
      }
    }
    if (kk < K2) {
      uint32_t a[4];
      ldmatrix_x4(a, frag_a(c2, lv, m0, kk * 16, lane));
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, frag_b(d2, lv, np * 16, kk * 16, lane));
        mma_bf16(dp[2 * np], a, b[0], b[1]);
        mma_bf16(dp[2 * np + 1], a, b[2], b[3]);
      }
    }
  }
}

constexpr int kDqM = 64, kDqN = 32;

template <int DQK, int DV>
__global__ void __launch_bounds__(kThreads, 2)
    dq_kernel(const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout, const float* lse2,
              const float* dsum, float* dq, Dims dm, int64_t tp, int64_t sp, float scale, bool causal,
              int64_t q_off) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int lq = DQK + kPad, lv = DV + kPad, NT = kDqN / 8;
  bf16_t* qs = reinterpret_cast<bf16_t*>(smem_raw);  // [64][lq]
  bf16_t* dos = qs + kDqM * lq;                      // [64][lv]
  bf16_t* ks = dos + kDqM * lv;                      // [2][32][lq]
  bf16_t* vs = ks + 2 * kDqN * lq;                   // [2][32][lv]
  const int64_t q0 = int64_t(gridDim.x - 1 - blockIdx.x) * kDqM;
  const int64_t bh = int64_t(blockIdx.z) * dm.h + blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const bf16_t* kg = k + bh * sp * DQK;
  const bf16_t* vg = v + bh * sp * DV;
  load_tile<DQK>(qs, q + (bh * tp + q0) * DQK, kDqM);
  load_tile<DV>(dos, dout + (bh * tp + q0) * DV, kDqM);
  cp_async_commit();
  const int64_t q_last = q0 + kDqM < dm.t ? q0 + kDqM : dm.t;
  const int64_t nkeys = causal ? (dm.s < q_off + q_last ? dm.s : q_off + q_last) : dm.s;
  const int ntiles = int((nkeys + kDqN - 1) / kDqN);
  auto load_kv = [&](int j, int buf) {
    load_tile<DQK>(ks + buf * kDqN * lq, kg + int64_t(j) * kDqN * DQK, kDqN);
    load_tile<DV>(vs + buf * kDqN * lv, vg + int64_t(j) * kDqN * DV, kDqN);
    cp_async_commit();
  };
  if (ntiles > 0) load_kv(0, 0);
  const int64_t row_lo = q0 + warp * 16 + g, row_hi = row_lo + 8;
  const float l2_lo = lse2[bh * tp + row_lo], l2_hi = lse2[bh * tp + row_hi];
  const float d_lo = dsum[bh * tp + row_lo], d_hi = dsum[bh * tp + row_hi];
  const float sl2 = scale * kLog2e;
  float acc[DQK / 8][4];
#pragma unroll
  for (int n = 0; n < DQK / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

  for (int j = 0; j < ntiles; ++j) {
    const int buf = j & 1;
    if (j + 1 < ntiles) {
      load_kv(j + 1, buf ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16_t* kt = ks + buf * kDqN * lq;
    const bf16_t* vt = vs + buf * kDqN * lv;
    float s[NT][4], dp[NT][4];
    scores_and_dp<DQK, DV, NT>(s, dp, qs, kt, dos, vt, warp * 16, lane);
    const int64_t k0 = int64_t(j) * kDqN;
    const bool need_mask = k0 + kDqN > dm.s || (causal && k0 + kDqN - 1 > q_off + q0 + warp * 16);
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool hi = e >= 2;
        float p = ex2(fmaf(s[n][e], sl2, -(hi ? l2_hi : l2_lo)));
        if (need_mask) {
          const int64_t key = k0 + n * 8 + 2 * t4 + (e & 1);
          if (key >= dm.s || (causal && key > q_off + (hi ? row_hi : row_lo))) p = 0.0f;
        }
        s[n][e] = p * (dp[n][e] - (hi ? d_hi : d_lo));  // dS (unscaled)
      }
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
      uint32_t a[4];
      acc_to_a(a, s[2 * kk], s[2 * kk + 1]);
      mma_a_rows<DQK>(acc, a, kt, lq, kk * 16, lane);
    }
    __syncthreads();
  }
  const int64_t ldq = dm.h * dm.dqk, b = blockIdx.z, hh = blockIdx.y;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = half ? row_hi : row_lo;
    if (row >= dm.t) continue;
    float* orow = dq + (b * dm.t + row) * ldq + hh * dm.dqk;
#pragma unroll
    for (int n = 0; n < DQK / 8; ++n) {
      const int c = n * 8 + 2 * t4;
      if (c < dm.dqk)
        *reinterpret_cast<float2*>(orow + c) = make_float2(scale * acc[n][2 * half], scale * acc[n][2 * half + 1]);
    }
  }
}

// ---- backward: dk, dv -----------------------------------------------------------------------------

constexpr int kKvN = 64, kKvM = 32;

template <int DQK, int DV>
__global__ void __launch_bounds__(kThreads, 2)
    dkv_kernel(const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout, const float* lse2,
               const float* dsum, AttnDkvOut o, bf16_t* dst, int64_t dq_rows, Dims dm, int64_t tp,
               int64_t sp, float scale, bool causal, int64_t q_off) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int lq = DQK + kPad, lv = DV + kPad, NT = kKvM / 8;
  bf16_t* ks = reinterpret_cast<bf16_t*>(smem_raw);  // [64][lq]
  bf16_t* vs = ks + kKvN * lq;                       // [64][lv]
  bf16_t* qs = vs + kKvN * lv;                       // [2][32][lq]
  bf16_t* dos = qs + 2 * kKvM * lq;                  // [2][32][lv]
  float* ls = reinterpret_cast<float*>(dos + 2 * kKvM * lv);  // [2][32] lse·log2e
  float* ds = ls + 2 * kKvM;                                  // [2][32] D
  const int64_t k0 = int64_t(blockIdx.x) * kKvN;
  const int64_t bh = int64_t(blockIdx.z) * dm.h + blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const bf16_t* qg = q + bh * tp * DQK;
  const bf16_t* dg = dout + bh * tp * DV;
  load_tile<DQK>(ks, k + (bh * sp + k0) * DQK, kKvN);
  load_tile<DV>(vs, v + (bh * sp + k0) * DV, kKvN);
  cp_async_commit();
  const int64_t first = attn::first_query(k0, q_off, causal, kKvM);
  const int ntiles = first < dm.t ? int((dm.t - first + kKvM - 1) / kKvM) : 0;
  auto load_q = [&](int j, int buf) {
    const int64_t i0 = first + int64_t(j) * kKvM;
    load_tile<DQK>(qs + buf * kKvM * lq, qg + i0 * DQK, kKvM);
    load_tile<DV>(dos + buf * kKvM * lv, dg + i0 * DV, kKvM);
    cp_async_commit();
    if (tid < kKvM) {
      ls[buf * kKvM + tid] = lse2[bh * tp + i0 + tid];
      ds[buf * kKvM + tid] = dsum[bh * tp + i0 + tid];
    }
  };
  if (ntiles > 0) load_q(0, 0);
  if (dst) attn::zero_masked_ds(dst + (bh * sp + k0) * tp, tp, kKvN, k0, q_off, causal, first, dq_rows, kThreads);
  const int64_t key_lo = k0 + warp * 16 + g;
  const float sl2 = scale * kLog2e;
  float ak[DQK / 8][4], av[DV / 8][4];
#pragma unroll
  for (int n = 0; n < DQK / 8; ++n) ak[n][0] = ak[n][1] = ak[n][2] = ak[n][3] = 0.0f;
#pragma unroll
  for (int n = 0; n < DV / 8; ++n) av[n][0] = av[n][1] = av[n][2] = av[n][3] = 0.0f;

  for (int j = 0; j < ntiles; ++j) {
    const int buf = j & 1;
    if (j + 1 < ntiles) {
      load_q(j + 1, buf ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16_t* qt = qs + buf * kKvM * lq;
    const bf16_t* dt = dos + buf * kKvM * lv;
    const float* lt = ls + buf * kKvM;
    const float* dd = ds + buf * kKvM;
    float s[NT][4], dp[NT][4];
    scores_and_dp<DQK, DV, NT>(s, dp, ks, qt, vs, dt, warp * 16, lane);
    const int64_t i0 = first + int64_t(j) * kKvM;
    // Transposed tiles: rows are keys (key_lo / key_hi), columns queries i0 + n·8 + 2·t4 + (e & 1).
    const bool need_mask = k0 + kKvN > dm.s || (causal && k0 + kKvN - 1 > q_off + i0);
    attn::p_and_ds(s, dp, lt, dd, need_mask, key_lo, dm.s, causal, q_off, i0, t4, sl2);
    uint32_t pa[NT / 2][4];
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
      acc_to_a(pa[kk], s[2 * kk], s[2 * kk + 1]);
    }
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
      mma_a_rows<DV>(av, pa[kk], dt, lv, kk * 16, lane);
    }
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
      uint32_t a[4];
      acc_to_a(a, dp[2 * kk], dp[2 * kk + 1]);
      if (dst) attn::store_ds(dst + (bh * sp + key_lo) * tp + i0 + 16 * kk + 2 * t4, tp, a);
      mma_a_rows<DQK>(ak, a, qt, lq, kk * 16, lane);
    }
    __syncthreads();
  }
  attn::write_dkv<DQK, DV>(ak, av, o, blockIdx.z, blockIdx.y, dm.s, dm.dqk, dm.dv, key_lo, t4, scale);
}

// ---- dispatch -------------------------------------------------------------------------------------

// Padded head dims of the instantiated kernels: (64, 64), (128, 128), (192, 128), (256, 128).
struct Width {
  int dqk, dv;
};
Width width_for(int64_t dqk, int64_t dv) {
  if (dqk <= 64 && dv <= 64) return {64, 64};
  return {dqk <= 128 ? 128 : dqk <= 192 ? 192 : 256, 128};
}

// Where k's and v's columns come from: k, v themselves, or (the split form) kv and k_pe.
struct KvSource {
  HeadCols k0, k1, v;
};
KvSource kv_source(const Tensor& k, const Tensor& v, const Tensor& kv, const Tensor& k_pe, const Dims& d) {
  if (!kv.defined())
    return {{k.data<float>(), d.h * d.dqk, d.dqk, int(d.dqk)}, {}, {v.data<float>(), d.h * d.dv, d.dv, int(d.dv)}};
  const int64_t dn = kv.dim(-1) - d.dv, w = dn + d.dv;
  return {{kv.data<float>(), d.h * w, w, int(dn)},
          {k_pe.data<float>(), d.dqk - dn, 0, int(d.dqk - dn)},
          {kv.data<float>() + dn, d.h * w, w, int(d.dv)}};
}

void convert(HeadCols a, HeadCols b, const Dims& d, int64_t rows, int64_t tp, int64_t dp, bf16_t* dst) {
  const int64_t n = tp * (dp / 8);
  DSV3_CHECK(n < (int64_t(1) << 31) && d.h < 65536 && d.b < 65536, "attention_bf16: ", rows, " rows of ", d.h,
             " heads, batch ", d.b, " exceed the launch grid");
  to_bf16_heads<<<dim3(unsigned((n + 255) / 256), unsigned(d.h), unsigned(d.b)), 256>>>(a, b, dst, int(rows), int(d.h),
                                                                                       int(tp), int(dp));
  check_launch("attention_bf16 (convert)");
}
HeadCols rows_of_heads(const Tensor& x, const Dims& d, int64_t width) {
  return {x.data<float>(), d.h * width, width, int(width)};
}

// The BF16 operands the forward rounds and the backward reads, in one tensor: K [B·H, Sp, DQK], V
// [B·H, Sp, DV], Q [B·H, Tp, DQK] (S and T padded to kRowPad; padding rows and columns zero). The
// forward leaves them in *keep where asked (then q and kv need not outlive it); the backward reads
// them from kept, or rounds its own.
int64_t operand_elems(const Dims& d, int64_t sp, int64_t tp, int dqk, int dv) {
  return d.b * d.h * (sp * (dqk + dv) + tp * dqk);
}
struct Operands {
  std::optional<Scratch> scratch;
  bf16_t *k = nullptr, *v = nullptr, *q = nullptr;
  void at(bf16_t* base, const Dims& d, int64_t sp, int dqk, int dv) {
    k = base, v = k + d.b * d.h * sp * dqk, q = v + d.b * d.h * sp * dv;
  }
  // In scratch: K and V, and Q where with_q.
  void in_scratch(const Dims& d, int64_t sp, int64_t tp, int dqk, int dv, bool with_q) {
    scratch.emplace(size_t(operand_elems(d, sp, with_q ? tp : 0, dqk, dv)) * 2);
    at(scratch->as<bf16_t>(), d, sp, dqk, dv);
    if (!with_q) q = nullptr;
  }
};

template <int DQK, int DV>
void run_fwd(const AttentionArgs& a, const Dims& d) {
  const int64_t tp = round_up(d.t, kRowPad), sp = round_up(std::max<int64_t>(d.s, 1), kRowPad);
  Operands kv;
  if (a.keep) {
    *a.keep = cuda_backend().alloc(DType::BF16, Shape{operand_elems(d, sp, tp, DQK, DV)});
    kv.at(ptr<bf16_t>(*a.keep), d, sp, DQK, DV);
  } else {
    kv.in_scratch(d, sp, tp, DQK, DV, false);
  }
  const KvSource src = kv_source(a.k, a.v, a.kv, a.k_pe, d);
  convert(src.k0, src.k1, d, d.s, sp, DQK, kv.k);
  convert(src.v, {}, d, d.s, sp, DV, kv.v);
  if (g_wgmma.load() && d.s > 0) {  // (no keys: the mma.sync kernel writes the empty rows)
    attention_bf16_forward_wgmma({a.q.data<float>(), kv.k, kv.v, ptr<float>(a.out),
                                  present(a.lse) ? ptr<float>(a.lse) : nullptr, d.b, d.t, d.s, d.h, d.dqk, d.dv, sp,
                                  a.scale, a.causal, a.q_offset, kv.q, tp},
                                 DQK, DV);
    ++g_wgmma_calls;
    return;
  }
  if (kv.q) convert(rows_of_heads(a.q, d, d.dqk), {}, d, d.t, tp, DQK, kv.q);  // (the wgmma kernel's own)
  const size_t smem = size_t(kFwdM * (DQK + kPad) + 2 * kFwdN * (DQK + kPad) + 2 * kFwdN * (DV + kPad)) * 2;
  allow_smem(fwd_kernel<DQK, DV>, smem);
  fwd_kernel<DQK, DV><<<dim3(unsigned(tp / kFwdM), unsigned(d.h), unsigned(d.b)), kThreads, smem>>>(
      a.q.data<float>(), kv.k, kv.v, ptr<float>(a.out),
      present(a.lse) ? ptr<float>(a.lse) : nullptr, d, sp, a.scale, a.causal, a.q_offset);
  check_launch("attention_bf16 (forward)");
}

template <int DQK, int DV>
void run_bwd(const AttentionBackwardArgs& a, const Dims& d) {
  const int64_t tp = round_up(std::max<int64_t>(d.t, 1), kRowPad), sp = round_up(std::max<int64_t>(d.s, 1), kRowPad);
  Scratch db(size_t(d.b * d.h * tp * DV) * 2), dsum(size_t(d.b * d.h * tp) * 4), lse2(size_t(d.b * d.h * tp) * 4);
  Operands kv;
  if (a.kept.defined()) {
    const int64_t n = operand_elems(d, sp, tp, DQK, DV);
    DSV3_CHECK(a.kept.device() == Device::CUDA && a.kept.dtype() == DType::BF16 && a.kept.numel() == n,
               "attention_backward: kept ", dtype_name(a.kept.dtype()), a.kept.shape().str(),
               " is not what this forward keeps for ", d.b, " x ", d.h, " heads of ", d.t, " queries and ", d.s,
               " keys (", n, " BF16 elements on CUDA)");
    kv.at(ptr<bf16_t>(a.kept), d, sp, DQK, DV);
  } else {
    kv.in_scratch(d, sp, tp, DQK, DV, true);
    const KvSource src = kv_source(a.k, a.v, a.kv, a.k_pe, d);
    convert(rows_of_heads(a.q, d, d.dqk), {}, d, d.t, tp, DQK, kv.q);
    convert(src.k0, src.k1, d, d.s, sp, DQK, kv.k);
    convert(src.v, {}, d, d.s, sp, DV, kv.v);
  }
  bwd_prep<<<dim3(unsigned(tp / 8), unsigned(d.h), unsigned(d.b)), 256>>>(
      a.dout.data<float>(), a.out.data<float>(), a.lse.data<float>(), db.as<bf16_t>(), dsum.as<float>(),
      lse2.as<float>(), int(d.t), int(d.h), int(d.dv), int(tp), DV);
  check_launch("attention_bf16 (backward prep)");
  const bool dq_matmul = present(a.dq) && d.t > 0 && d.s > 0 && g_dq_matmul.load() &&
                         d.b * d.h * sp * tp * 2 <= kDsMaxBytes;
  // Causal: dQ's rows in blocks of dq_rows (a multiple of 64), each block's matmul over the keys its
  // last row sees; without the mask one block reads every key.
  const int64_t dq_rows = cuda_attention_dq_block_rows(d.t, a.causal ? g_dq_blocks.load() : 1);
  std::optional<Scratch> ds;
  if (dq_matmul) ds.emplace(size_t(d.b * d.h * sp * tp) * 2);
  // dK and dV straight into their tensors, or (split) into dkv, with dK's rope columns per head
  // into part for sum_heads.
  AttnDkvOut o;
  std::optional<Scratch> part;
  const bool split = a.kv.defined() || a.k_pe.defined();
  const int64_t dn = split ? kv_or_dkv(a).dim(-1) - d.dv : d.dqk, dr = d.dqk - dn;
  if (split) {
    o.dk_split = int(dn);
    if (present(a.dkv)) {
      if (a.dkv.dtype() == DType::BF16) o.dk_b = ptr<bf16_t>(a.dkv), o.dv_b = o.dk_b + dn;
      else o.dk = ptr<float>(a.dkv), o.dv = o.dk + dn;
      o.dk_tok = o.dv_tok = d.h * (dn + d.dv), o.dk_head = o.dv_head = dn + d.dv;
    }
    if (present(a.dk_pe)) {
      part.emplace(size_t(d.b * d.s * d.h * dr) * 4);
      o.dk2 = part->as<float>(), o.dk2_tok = d.h * dr, o.dk2_head = dr;
    }
  } else {
    o.dk_split = int(d.dqk);
    o.dk = present(a.dk) ? ptr<float>(a.dk) : nullptr, o.dk_tok = d.h * d.dqk, o.dk_head = d.dqk;
    o.dv = present(a.dv) ? ptr<float>(a.dv) : nullptr, o.dv_tok = d.h * d.dv, o.dv_head = d.dv;
  }
  if ((o.dk || o.dk_b || o.dk2 || o.dv || o.dv_b || dq_matmul) && d.s > 0) {
    bf16_t* dst = dq_matmul ? ds->as<bf16_t>() : nullptr;
    if (g_wgmma.load()) {
      attention_bf16_dkv_wgmma({kv.q, kv.k, kv.v, db.as<bf16_t>(), lse2.as<float>(),
                                dsum.as<float>(), o, dst, dq_rows, d.b, d.t, d.s, d.h, d.dqk, d.dv, tp, sp,
                                a.scale, a.causal, a.q_offset},
                               DQK, DV);
      ++g_wgmma_calls;
    } else {
      const size_t smem = size_t(kKvN * (DQK + kPad) + kKvN * (DV + kPad) + 2 * kKvM * (DQK + kPad) +
                                 2 * kKvM * (DV + kPad)) * 2 + 4 * kKvM * 4;
      allow_smem(dkv_kernel<DQK, DV>, smem);
      dkv_kernel<DQK, DV><<<dim3(unsigned(sp / kKvN), unsigned(d.h), unsigned(d.b)), kThreads, smem>>>(
          kv.q, kv.k, kv.v, db.as<bf16_t>(), lse2.as<float>(), dsum.as<float>(), o, dst, dq_rows, d, tp,
          sp, a.scale, a.causal, a.q_offset);
      check_launch("attention_bf16 (dk, dv)");
    }
  }
  if (part && d.b * d.s > 0) {
    const int64_t n = d.b * d.s * (dr / 4);
    sum_heads<<<blocks_for(n), 256>>>(part->as<float4>(), ptr<float4>(a.dk_pe), d.b * d.s, int(d.h), int(dr / 4));
    check_launch("attention_bf16 (dk_pe)");
  }
  if (dq_matmul) {
    // Per batch element, per head, per block of rows [r0, r1): dq[r0:r1, h, :dqk] = scale ·
    // (dSᵀ)ᵀ[r0:r1, :keys] · K[:keys, :dqk] (K's padded rows are zero, as are dSᵀ's masked entries).
    for (int64_t b = 0; b < d.b; ++b)
      for (int64_t r0 = 0; r0 < d.t; r0 += dq_rows) {
        const int64_t r1 = std::min(d.t, r0 + dq_rows), keys = a.causal ? std::min(sp, r1 + a.q_offset) : sp;
        LtMatmul g = lt_row_major(true, false, r1 - r0, d.dqk, keys, ds->as<bf16_t>() + b * d.h * sp * tp + r0, tp,
                                  kv.k + b * d.h * sp * DQK, DQK,
                                  ptr<float>(a.dq) + (b * d.t + r0) * d.h * d.dqk, d.h * d.dqk, false);
        g.alpha = a.scale;
        g.batch = d.h;
        g.stride_a = sp * DQK;  // cuBLASLt's A is K (lt_row_major swaps the operands)
        g.stride_b = sp * tp;
        g.stride_c = d.dqk;
        lt_matmul(g);
      }
    ++g_dq_matmuls;
  } else if (present(a.dq) && d.t > 0) {
    const size_t smem = size_t(kDqM * (DQK + kPad) + kDqM * (DV + kPad) + 2 * kDqN * (DQK + kPad) +
                               2 * kDqN * (DV + kPad)) * 2;
    allow_smem(dq_kernel<DQK, DV>, smem);
    dq_kernel<DQK, DV><<<dim3(unsigned(tp / kDqM), unsigned(d.h), unsigned(d.b)), kThreads, smem>>>(
        kv.q, kv.k, kv.v, db.as<bf16_t>(), lse2.as<float>(), dsum.as<float>(), ptr<float>(a.dq), d, tp,
        sp, a.scale, a.causal, a.q_offset);
    check_launch("attention_bf16 (dq)");
  }
}

}  // namespace

void cuda_set_attention_bf16(bool on) { g_bf16.store(on); }
bool cuda_attention_bf16() { return g_bf16.load(); }
void cuda_set_attention_dq_matmul(bool on) { g_dq_matmul.store(on); }
bool cuda_attention_dq_matmul() { return g_dq_matmul.load(); }
int64_t cuda_attention_dq_matmuls() { return g_dq_matmuls.load(); }
void cuda_set_attention_wgmma(bool on) { g_wgmma.store(on); }
bool cuda_attention_wgmma() { return g_wgmma.load(); }
int64_t cuda_attention_wgmma_calls() { return g_wgmma_calls.load(); }
int64_t cuda_attention_split_in_place() { return g_split_calls.load(); }
void cuda_set_attention_dq_blocks(int n) { g_dq_blocks.store(std::max(1, n)); }
int cuda_attention_dq_blocks() { return g_dq_blocks.load(); }
int64_t cuda_attention_dq_block_rows(int64_t t, int n) {
  n = std::max(1, n);
  return round_up((t + n - 1) / n, kRowPad);
}

bool cuda_attention_bf16_supported(int64_t dqk, int64_t dv) {
  return dqk > 0 && dv > 0 && dqk % 16 == 0 && dv % 16 == 0 && dqk <= 256 && dv <= 128;
}

// The prep pass reads float4s: every base must be 16-byte aligned (rows are, as head dims are
// multiples of 16; a view starting mid-row would not be).
static bool aligned(const Tensor& t) { return !present(t) || (reinterpret_cast<uintptr_t>(t.raw()) & 15) == 0; }

// The split form in place: dk's split on an 8-column boundary, so a chunk of 8 or a float2 pair lies
// in one segment and every float4 is 16-byte aligned (Dqk and Dv are multiples of 16 already).
static bool split_ok(const Tensor& kv, const Tensor& k_pe, const Dims& d) {
  if (!kv.defined()) return true;
  return (kv.dim(-1) - d.dv) % 8 == 0 && aligned(kv) && aligned(k_pe);
}

bool cuda_attention_bf16_forward(const AttentionArgs& a) {
  const Dims d = a.kv.defined() ? dims_of(a.q, a.kv, a.out) : dims_of(a.q, a.k, a.v);
  if (!cuda_attention_bf16_supported(d.dqk, d.dv) || !aligned(a.q) || !aligned(a.k) || !aligned(a.v) ||
      !split_ok(a.kv, a.k_pe, d))
    return false;
  if (a.kv.defined()) ++g_split_calls;
  if (d.b * d.t * d.h == 0) return true;
  const Width w = width_for(d.dqk, d.dv);
  if (w.dqk == 64) run_fwd<64, 64>(a, d);
  else if (w.dqk == 128) run_fwd<128, 128>(a, d);
  else if (w.dqk == 192) run_fwd<192, 128>(a, d);
  else run_fwd<256, 128>(a, d);
  return true;
}

bool cuda_attention_bf16_backward(const AttentionBackwardArgs& a) {
  // Shapes from q and kv, or from dq and dkv where the kept operands stand for them (validated).
  const bool split = a.kv.defined() || a.k_pe.defined();
  const Tensor& kv = kv_or_dkv(a);
  const Dims d = split ? dims_of(q_or_dq(a), kv, a.out) : dims_of(q_or_dq(a), a.k, a.v);
  if (!cuda_attention_bf16_supported(d.dqk, d.dv) || !aligned(a.q) || !aligned(a.k) || !aligned(a.v) ||
      !aligned(a.dout) || !aligned(a.out) || !split_ok(kv, a.k_pe, d) || !aligned(a.dkv) || !aligned(a.dk_pe))
    return false;
  if (split) ++g_split_calls;
  if (d.b * d.h == 0) return true;
  const Width w = width_for(d.dqk, d.dv);
  if (w.dqk == 64) run_bwd<64, 64>(a, d);
  else if (w.dqk == 128) run_bwd<128, 128>(a, d);
  else if (w.dqk == 192) run_bwd<192, 128>(a, d);
  else run_bwd<256, 128>(a, d);
  return true;
}

}  // namespace dsv3
