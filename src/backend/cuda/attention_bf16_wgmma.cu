// The BF16 training attention's forward and dk/dv kernels on Hopper's warpgroup MMA (see
// attention_bf16_wgmma.h). Forward: CTA = two warpgroups × 64 query rows (128 rows share each K/V
// tile); 64-key tiles in a ring of three stages, loaded by cp.async into the 128-byte swizzled
// panels wgmma reads. Per tile and warpgroup: S[64, 64] = Q·Kᵀ as DQK/16 m64n64k16 with both
// operands in shared memory (no ldmatrix: the mma.sync kernel's B fragments were one shared-memory
// load per two MMAs), the online softmax in the accumulators (each warp owns 16 rows, as in the
// mma.sync kernel), then O += P·V with P packed from the accumulators as register A operands and V
// read N-major. One tile's P·V is issued with the next tile's scores and runs beside their softmax.
#include "backend/cuda/attention_bf16_wgmma.h"
#include "backend/cuda/attention_bf16_tile.cuh"
#include "backend/cuda/common.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/wgmma.cuh"

namespace dsv3::cuda {
namespace {

// Three stages: a tile's keys are read by its scores while the previous tile's values are read by
// its P·V, and the next tile lands.
constexpr int kM = 128, kN = 64, kThreads = 256, kStages = 3;
constexpr float kLog2e = 1.4426950408889634f;

template <int DQK, int DV>
struct Smem {
  static constexpr int q = kM * DQK * 2;  // DQK / 64 panels of 128 rows
  static constexpr int k = kN * DQK * 2;  // per stage: DQK / 64 panels of 64 keys
  static constexpr int v = kN * DV * 2;   // per stage: DV / 64 panels of 64 keys
  static constexpr size_t bytes = size_t(q) + kStages * size_t(k + v) + 1024;  // + the 1,024-byte alignment
};

// rows × W BF16 (row stride W) into panels of 64 columns, `rows` rows each, swizzled; NT threads.
template <int W, int NT>
__device__ __forceinline__ void load_panels(unsigned char* dst, const bf16_t* src, int rows) {
  constexpr int chunks = W / 8;
  for (int i = threadIdx.x; i < rows * chunks; i += NT) {
    const int r = i / chunks, c = i - r * chunks;
    cp_async16(dst + (c >> 3) * (rows * 128) + wgmma::sw(r, c & 7), src + int64_t(r) * W + c * 8);
  }
}

// A thread's share of a tile of ROWS rows × W columns loaded by NT threads into panels of 64
// columns: its 16-byte chunks' shared-memory and source offsets (both below 2¹⁶), worked out once
// per CTA and packed two to a register, since every tile repeats the pattern (recomputed per tile,
// the index arithmetic cost about as many instructions as the forward's softmax).
template <int W, int ROWS, int NT>
struct TilePlan {
  static constexpr int n = ROWS * (W / 8) / NT;
  static_assert(ROWS * (W / 8) % NT == 0 && ROWS * W * 2 <= 65536);
  uint32_t off[n];  // shared-memory offset | source offset << 16 (elements)
  __device__ __forceinline__ TilePlan() {
#pragma unroll
    for (int k = 0; k < n; ++k) {
      const int i = int(threadIdx.x) + k * NT, r = i / (W / 8), c = i % (W / 8);
      off[k] = uint32_t((c >> 3) * (ROWS * 128) + wgmma::sw(r, c & 7)) | (uint32_t(r * W + c * 8) << 16);
    }
  }
  __device__ __forceinline__ void load(uint32_t d, const bf16_t* g) const {  // d: a shared-space address
#pragma unroll
    for (int k = 0; k < n; ++k)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d + (off[k] & 0xFFFFu)), "l"(g + (off[k] >> 16)));
  }
};

template <int DQK, int DV>
__global__ void __launch_bounds__(kThreads, 1) fwd_wgmma_kernel(const AttnFwdArgs a) {
  using S = Smem<DQK, DV>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* qs = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* ks = qs + S::q;            // [3][DQK / 64][64][128 B]
  unsigned char* vs = ks + kStages * S::k;  // [3][DV / 64][64][128 B]
  const int64_t q0 = int64_t(gridDim.x - 1 - blockIdx.x) * kM;  // longest causal rows first
  const int64_t bh = int64_t(blockIdx.z) * a.h + blockIdx.y;
  const int tid = threadIdx.x, wgi = tid >> 7, w = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const bf16_t* kg = a.k + bh * a.sp * DQK;
  const bf16_t* vg = a.v + bh * a.sp * DV;
  const int64_t q_last = q0 + kM < a.t ? q0 + kM : a.t;
  const int64_t nkeys = a.causal ? (a.s < a.q_off + q_last ? a.s : a.q_off + q_last) : a.s;
  const int ntiles = int((nkeys + kN - 1) / kN);
  const TilePlan<DQK, kN, kThreads> plan_k;
  const TilePlan<DV, kN, kThreads> plan_v;
  const uint32_t ks_a = smem_addr(ks), vs_a = smem_addr(vs);
  auto load_kv = [&](int j, int buf) {
    plan_k.load(ks_a + uint32_t(buf * S::k), kg + int64_t(j) * kN * DQK);
    plan_v.load(vs_a + uint32_t(buf * S::v), vg + int64_t(j) * kN * DV);
    cp_async_commit();
  };
  if (ntiles > 0) load_kv(0, 0);
  // Q once per CTA, straight from the F32 tensor, rounded here; rows past T and columns past dqk zero
  // (and kept for the backward where asked: the grid's rows cover tp).
  {
    constexpr int chunks = DQK / 8;
    const float* qg = a.q + blockIdx.y * a.dqk;
    for (int i = tid; i < kM * chunks; i += kThreads) {
      const int r = i / chunks, c = i - r * chunks;
      float4 x = make_float4(0.f, 0.f, 0.f, 0.f), y = x;
      if (q0 + r < a.t && c * 8 < a.dqk) {
        const float* p = qg + (int64_t(blockIdx.z) * a.t + q0 + r) * a.h * a.dqk + c * 8;
        x = *reinterpret_cast<const float4*>(p);
        y = *reinterpret_cast<const float4*>(p + 4);
      }
      const uint4 v = make_uint4(pack_bf16(x.x, x.y), pack_bf16(x.z, x.w), pack_bf16(y.x, y.y), pack_bf16(y.z, y.w));
      *reinterpret_cast<uint4*>(qs + (c >> 3) * (kM * 128) + wgmma::sw(r, c & 7)) = v;
      if (a.q_keep && q0 + r < a.tp) *reinterpret_cast<uint4*>(a.q_keep + (bh * a.tp + q0 + r) * DQK + c * 8) = v;
    }
  }

  float o[DV / 64][8][4] = {};
  attn::RowStats st;
  const float sl2 = a.scale * kLog2e;
  const int64_t warp_row0 = q0 + 64 * wgi + 16 * w;
  const uint32_t q_a = smem_addr(qs) + uint32_t(wgi) * 64 * 128, k_a = smem_addr(ks), v_a = smem_addr(vs);

  // P of two consecutive tiles as A fragments, taking turns: one is read by its P·V in flight while
  // the next one is written (no copy between them, which ptxas would see as a write to a wgmma's
  // input while it runs, and serialise).
  uint32_t pa[kN / 16][4], pb[kN / 16][4];
  float s[8][4] = {};  // only written by wgmma from here on (its first k-step ignores the old value)
  // S_j's mask, online softmax and P_j (into pn) on a copy of s (s itself is only written by
  // wgmma); returns the rescale factors of the rows' sums.
  auto softmax = [&](int j, uint32_t (&pn)[kN / 16][4], float& al_lo, float& al_hi) {
    float x[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) x[n][e] = s[n][e];
    attn::softmax_tile(x, st, int64_t(j) * kN, a.s, a.causal, a.q_off, warp_row0, g, t4, sl2, al_lo, al_hi);
    // The S accumulators of n-tiles 2kk, 2kk + 1 are the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) acc_to_a(pn[kk], x[2 * kk], x[2 * kk + 1]);
  };
  auto issue_s = [&](int j) {  // S_j = Q·K_jᵀ
    const uint32_t kt = k_a + uint32_t((j % kStages) * S::k);
#pragma unroll
    for (int kk = 0; kk < DQK / 16; ++kk)
      wgmma::mma_m64n64_ss(s, wgmma::desc_k(q_a + (kk >> 2) * (kM * 128) + (kk & 3) * 32),
                           wgmma::desc_k(kt + (kk >> 2) * (kN * 128) + (kk & 3) * 32), kk > 0);
  };
  auto issue_pv = [&](int j, const uint32_t (&p)[kN / 16][4]) {  // O += P_j·V_j
    const uint32_t vt = v_a + uint32_t((j % kStages) * S::v);
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk)
#pragma unroll
      for (int nb = 0; nb < DV / 64; ++nb)
        wgmma::mma_m64n64_rs_tb(o[nb], p[kk], wgmma::desc_mn(vt + nb * (kN * 128) + kk * 2048));
  };
  auto next_tile = [&](int j) {  // tile j landed and visible; tile j + 1 on its way
    cp_async_wait<0>();
    wgmma::fence_async_smem();
    __syncthreads();  // every warpgroup is also done with tile j − 2, whose stage tile j + 1 takes
    if (j + 1 < ntiles) load_kv(j + 1, (j + 1) % kStages);
  };
  auto fence_o = [&] {
#pragma unroll
    for (int nb = 0; nb < DV / 64; ++nb) wgmma::fence_regs(o[nb]);
  };
  // Tile j ≥ 1: S_j and P_{j−1}·V_{j−1} issued together (P_{j−1} in pin), S_j's softmax into pout
  // while the P·V runs, then O rescaled.
  auto step = [&](int j, uint32_t (&pin)[kN / 16][4], uint32_t (&pout)[kN / 16][4]) {
    next_tile(j);
    wgmma::fence_regs(s);
    wgmma::fence_regs(pin);
    fence_o();
    wgmma::fence();
    issue_s(j);
    wgmma::commit();
    issue_pv(j - 1, pin);
    wgmma::commit();
    wgmma::wait<1>(s);  // the scores are in
    float al_lo, al_hi;
    softmax(j, pout, al_lo, al_hi);
    wgmma::wait<0>();  // the previous tile's P·V is in
    fence_o();
    wgmma::fence_regs(pin);  // pin stays live until here: that P·V read its registers asynchronously
#pragma unroll
    for (int nb = 0; nb < DV / 64; ++nb)
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        o[nb][n][0] *= al_lo;
        o[nb][n][1] *= al_lo;
        o[nb][n][2] *= al_hi;
        o[nb][n][3] *= al_hi;
      }
  };
  // Every CTA has a tile (S ≥ 1; the dispatch keeps S = 0 off this kernel), and every warpgroup
  // runs every tile, so no wgmma sits behind a warpgroup's branch (ptxas would serialise them); a
  // tile masked for all of a warpgroup's rows gives it P = 0.
  {
    float al_lo, al_hi;
    next_tile(0);
    wgmma::fence_regs(s);
    wgmma::fence();
    issue_s(0);
    wgmma::commit();
    wgmma::wait<0>(s);
    softmax(0, pa, al_lo, al_hi);
  }
  int j = 1;
  for (; j + 1 < ntiles; j += 2) {
    step(j, pa, pb);
    step(j + 1, pb, pa);
  }
  if (j < ntiles) step(j, pa, pb);
  // The last tile's P: in pb after an odd number of steps, else in pa (a select, not a branch
  // around the wgmma).
  const bool in_b = (ntiles - 1) % 2 == 1;
  uint32_t pl[kN / 16][4];
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk)
#pragma unroll
    for (int e = 0; e < 4; ++e) pl[kk][e] = in_b ? pb[kk][e] : pa[kk][e];
  wgmma::fence_regs(pl);
  fence_o();
  wgmma::fence();
  issue_pv(ntiles - 1, pl);
  wgmma::commit();
  wgmma::wait<0>();
  fence_o();
  attn::write_rows<DV>(reinterpret_cast<const float(&)[DV / 8][4]>(o), st, a.out, a.lse, blockIdx.z, blockIdx.y, a.t,
                       a.h, a.dv, warp_row0, g, t4, a.scale);
}

template <int DQK, int DV>
void launch(const AttnFwdArgs& a) {
  const size_t smem = Smem<DQK, DV>::bytes;
  static const bool once = (allow_smem(fwd_wgmma_kernel<DQK, DV>, smem), true);
  (void)once;
  fwd_wgmma_kernel<DQK, DV><<<dim3(unsigned((a.t + kM - 1) / kM), unsigned(a.h), unsigned(a.b)), kThreads, smem>>>(a);
  check_launch("attention_bf16 (forward, wgmma)");
}

// ---- dk, dv ----------------------------------------------------------------------------------------

constexpr int kKeys = 64, kQt = 32, kDkvThreads = 128;

template <int DQK, int DV>
struct DkvSmem {
  static constexpr int k = kKeys * DQK * 2, v = kKeys * DV * 2;  // DQK / 64, DV / 64 panels of 64 keys
  static constexpr int q = kQt * DQK * 2, d = kQt * DV * 2;      // per stage: panels of 32 queries
  static constexpr size_t bytes = size_t(k + v) + 2 * size_t(q + d) + 4 * kQt * 4 + 1024;
};

template <int DQK, int DV>
__global__ void __launch_bounds__(kDkvThreads, 2) dkv_wgmma_kernel(const AttnDkvArgs a) {
  using S = DkvSmem<DQK, DV>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* ks = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* vs = ks + S::k;
  unsigned char* qs = vs + S::v;       // [2][DQK / 64][32][128 B]
  unsigned char* dos = qs + 2 * S::q;  // [2][DV / 64][32][128 B]
  float* ls = reinterpret_cast<float*>(dos + 2 * S::d);  // [2][32] lse·log2e
  float* ds = ls + 2 * kQt;                              // [2][32] D
  const int64_t k0 = int64_t(blockIdx.x) * kKeys, bh = int64_t(blockIdx.z) * a.h + blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const bf16_t* qg = a.q + bh * a.tp * DQK;
  const bf16_t* dg = a.dout + bh * a.tp * DV;
  load_panels<DQK, kDkvThreads>(ks, a.k + (bh * a.sp + k0) * DQK, kKeys);
  load_panels<DV, kDkvThreads>(vs, a.v + (bh * a.sp + k0) * DV, kKeys);
  cp_async_commit();
  const int64_t first = attn::first_query(k0, a.q_off, a.causal, kQt);
  const int ntiles = first < a.t ? int((a.t - first + kQt - 1) / kQt) : 0;
  // The tiles' chunk offsets kept in registers up to DQK 192 (at 256 the 10 registers would spill).
  const TilePlan<DQK, kQt, kDkvThreads> plan_q;
  const TilePlan<DV, kQt, kDkvThreads> plan_d;
  const uint32_t qs_a = smem_addr(qs), dos_a = smem_addr(dos);
  auto load_q = [&](int j, int buf) {
    const int64_t i0 = first + int64_t(j) * kQt;
    if constexpr (DQK <= 192) {
      plan_q.load(qs_a + uint32_t(buf * S::q), qg + i0 * DQK);
      plan_d.load(dos_a + uint32_t(buf * S::d), dg + i0 * DV);
    } else {
      load_panels<DQK, kDkvThreads>(qs + buf * S::q, qg + i0 * DQK, kQt);
      load_panels<DV, kDkvThreads>(dos + buf * S::d, dg + i0 * DV, kQt);
    }
    cp_async_commit();
    if (tid < kQt) {
      ls[buf * kQt + tid] = a.lse2[bh * a.tp + i0 + tid];
      ds[buf * kQt + tid] = a.dsum[bh * a.tp + i0 + tid];
    }
  };
  if (ntiles > 0) load_q(0, 0);
  if (a.dst)
    attn::zero_masked_ds(a.dst + (bh * a.sp + k0) * a.tp, a.tp, kKeys, k0, a.q_off, a.causal, first, a.dq_rows,
                         kDkvThreads);
  const int64_t key_lo = k0 + w * 16 + g;
  const float sl2 = a.scale * kLog2e;
  float ak[DQK / 64][8][4] = {}, av[DV / 64][8][4] = {};
  const uint32_t k_a = smem_addr(ks), v_a = smem_addr(vs), q_a = smem_addr(qs), d_a = smem_addr(dos);

  for (int j = 0; j < ntiles; ++j) {
    const int buf = j & 1;
    if (j + 1 < ntiles) {
      load_q(j + 1, buf ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    wgmma::fence_async_smem();
    __syncthreads();
    const uint32_t qt = q_a + uint32_t(buf * S::q), dt = d_a + uint32_t(buf * S::d);
    const float* lt = ls + buf * kQt;
    const float* dd = ds + buf * kQt;
    float s[4][4] = {}, dp[4][4] = {};
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < DQK / 16; ++kk)
      wgmma::mma_m64n32_ss(s, wgmma::desc_k(k_a + (kk >> 2) * (kKeys * 128) + (kk & 3) * 32),
                           wgmma::desc_k(qt + (kk >> 2) * (kQt * 128) + (kk & 3) * 32), kk > 0);
#pragma unroll
    for (int kk = 0; kk < DV / 16; ++kk)
      wgmma::mma_m64n32_ss(dp, wgmma::desc_k(v_a + (kk >> 2) * (kKeys * 128) + (kk & 3) * 32),
                           wgmma::desc_k(dt + (kk >> 2) * (kQt * 128) + (kk & 3) * 32), kk > 0);
    wgmma::commit();
    wgmma::wait0();
    const int64_t i0 = first + int64_t(j) * kQt;
    // Transposed tiles: rows are keys (key_lo / key_hi), columns queries i0 + n·8 + 2·t4 + (e & 1).
    const bool need_mask = k0 + kKeys > a.s || (a.causal && k0 + kKeys - 1 > a.q_off + i0);
    attn::p_and_ds(s, dp, lt, dd, need_mask, key_lo, a.s, a.causal, a.q_off, i0, t4, sl2);
    uint32_t pa[2][4], da[2][4];
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      acc_to_a(pa[kk], s[2 * kk], s[2 * kk + 1]);
      acc_to_a(da[kk], dp[2 * kk], dp[2 * kk + 1]);
      if (a.dst) attn::store_ds(a.dst + (bh * a.sp + key_lo) * a.tp + i0 + 16 * kk + 2 * t4, a.tp, da[kk]);
    }
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
#pragma unroll
      for (int nb = 0; nb < DV / 64; ++nb)
        wgmma::mma_m64n64_rs_tb(av[nb], pa[kk], wgmma::desc_mn(dt + nb * (kQt * 128) + kk * 2048));
#pragma unroll
      for (int nb = 0; nb < DQK / 64; ++nb)
        wgmma::mma_m64n64_rs_tb(ak[nb], da[kk], wgmma::desc_mn(qt + nb * (kQt * 128) + kk * 2048));
    }
    wgmma::commit();
    wgmma::wait0();
    __syncthreads();  // the buffer is refilled next iteration
  }
  attn::write_dkv<DQK, DV>(reinterpret_cast<const float(&)[DQK / 8][4]>(ak), reinterpret_cast<const float(&)[DV / 8][4]>(av),
                           a.out, blockIdx.z, blockIdx.y, a.s, a.dqk, a.dv, key_lo, t4, a.scale);
}

template <int DQK, int DV>
void launch_dkv(const AttnDkvArgs& a) {
  const size_t smem = DkvSmem<DQK, DV>::bytes;
  static const bool once = (allow_smem(dkv_wgmma_kernel<DQK, DV>, smem), true);
  (void)once;
  dkv_wgmma_kernel<DQK, DV><<<dim3(unsigned(a.sp / kKeys), unsigned(a.h), unsigned(a.b)), kDkvThreads, smem>>>(a);
  check_launch("attention_bf16 (dk, dv, wgmma)");
}

}  // namespace

void attention_bf16_dkv_wgmma(const AttnDkvArgs& a, int dqk_w, int dv_w) {
  if (dqk_w == 64 && dv_w == 64) launch_dkv<64, 64>(a);
  else if (dqk_w == 128 && dv_w == 128) launch_dkv<128, 128>(a);
  else if (dqk_w == 192 && dv_w == 128) launch_dkv<192, 128>(a);
  else if (dqk_w == 256 && dv_w == 128) launch_dkv<256, 128>(a);
  else internal_error("attention_bf16_dkv_wgmma: no kernel for padded widths ", dqk_w, " × ", dv_w);
}

void attention_bf16_forward_wgmma(const AttnFwdArgs& a, int dqk_w, int dv_w) {
  if (dqk_w == 64 && dv_w == 64) launch<64, 64>(a);
  else if (dqk_w == 128 && dv_w == 128) launch<128, 128>(a);
  else if (dqk_w == 192 && dv_w == 128) launch<192, 128>(a);
  else if (dqk_w == 256 && dv_w == 128) launch<256, 128>(a);
  else internal_error("attention_bf16_forward_wgmma: no kernel for padded widths ", dqk_w, " × ", dv_w);
}

}  // namespace dsv3::cuda
