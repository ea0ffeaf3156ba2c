#include "infer/cuda_latent_prefill.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>

#include "backend/cuda/common.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/stream.h"
#include "infer/cuda_latent_attention.h"

namespace dsv3 {
using namespace cuda;

namespace {

constexpr int kHg = 16;        // heads per CTA (an MMA's M per query row)
constexpr int kT = 32;         // positions per tile
constexpr int kThreads = 256;  // 8 warps
constexpr int kNV = 5;         // 16-byte pieces per thread per tile: 32 rows of ≤ 320 BF16 values
constexpr int kPs = kT + 8;    // BF16 elements per row of P (80 bytes: conflict-free ldmatrix rows)

// Shared memory: q as two BF16 terms [2][Q·16][W + 8] | the tile [32][W + 8] BF16 | both width
// halves' scores [2][Q·16][33] F32 | P as two BF16 terms [2][Q·16][kPs] | corr, sum [Q·16] F32 each.
size_t prefill_smem(int q, int W) {
  const size_t sq = size_t(W) + 8, M = size_t(q) * kHg;
  return (2 * M * sq + kT * sq + 2 * M * kPs) * 2 + (2 * M * (kT + 1) + 2 * M) * 4;
}

// Group g of rows shares one sequence and its tiles; its last row is the longest (positions rise
// by one per row), and that row's block table covers every tile. Per tile: the scores of every
// row's 16 heads (warp w: positions 8·(w mod 4)… over half the width's k-steps, the halves added
// through shared memory; the tile's B fragments loaded once for all rows), the online softmax per
// (row, head) (a row's positions past its own length are masked, so rows of a group that end
// earlier see weights 0 there), then P·V (warp w: column tiles w, w + 8, …; the tile's transposed
// fragments loaded once for all rows). Each row's sums run in the row kernel's order, so its output
// has the same bits as there (up to the sign of zeros) while the cache rows are finite: a masked
// position contributes 0·value.
template <int Q>
__global__ void __launch_bounds__(kThreads, Q <= 2 ? 2 : 1) latent_prefill_kernel(const LatentPrefillArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int M = Q * kHg;
  const int W = a.W, R = a.R, sq = W + 8;
  __nv_bfloat16* qh = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* ql = qh + M * sq;
  __nv_bfloat16* t16 = ql + M * sq;
  float* ss = reinterpret_cast<float*>(t16 + kT * sq);
  __nv_bfloat16* ph = reinterpret_cast<__nv_bfloat16*>(ss + 2 * M * (kT + 1));
  __nv_bfloat16* pl = ph + M * kPs;
  float* st = reinterpret_cast<float*>(pl + M * kPs);  // corr [M] | sum [M]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  // The longest groups (latest positions) first: their CTAs run longest.
  const int grp = a.ngroups - 1 - int(blockIdx.x), h0 = int(blockIdx.y) * kHg;
  const int r0 = a.groups[grp], nq = a.groups[grp + 1] - r0;
  int lens[Q];
#pragma unroll
  for (int q = 0; q < Q; ++q) lens[q] = q < nq ? a.meta[r0 + q] : 0;
  const int len = a.meta[r0 + nq - 1];  // the longest row's, and its table covers every tile
  const int32_t* table = a.meta + 3 * a.n + int64_t(r0 + nq - 1) * a.maxb;
  const int bs = int(a.bs), V = W >> 3;
  // idx / V through F32: idx < 32·V, V ≤ 40, so (idx + ½)/V lies ≥ 1/80 from an integer.
  const float rv = 1.0f / float(V);
  auto quot = [&](int idx) { return __float2int_rz((float(idx) + 0.5f) * rv); };
  uint4 raw[kNV];
  auto fetch = [&](int tl) {
    const int t0 = tl * kT;
#pragma unroll
    for (int u = 0; u < kNV; ++u) {
      const int idx = tid + u * kThreads, t = quot(idx), v = idx - t * V, pos = t0 + t;
      if (idx < kT * V && pos / bs < a.maxb) {
        const int64_t row = (int64_t(table[pos / bs]) * a.layers + a.layer) * a.bs + pos % bs;
        raw[u] = reinterpret_cast<const uint4*>(a.pool + row * W)[v];
      }
    }
  };
  const int tiles = (len + kT - 1) / kT;
  fetch(0);
  // Rows past the longest row's end are zero (their weights are 0, and 0·garbage could be NaN).
  auto stash = [&](int tl) {
    const int cnt = min(kT, len - tl * kT);
#pragma unroll
    for (int u = 0; u < kNV; ++u) {
      const int idx = tid + u * kThreads;
      if (idx < kT * V) {
        const int t = quot(idx), v = idx - t * V;
        *reinterpret_cast<uint4*>(t16 + t * sq + 8 * v) = t < cnt ? raw[u] : make_uint4(0, 0, 0, 0);
      }
    }
  };
  // q (scaled) as two BF16 terms; rows past the group and heads past nh are zero.
  {
    const int w4 = W / 4, total = M * w4;
    for (int base = tid; base < total; base += kNV * kThreads) {
      float4 qv[kNV];
#pragma unroll
      for (int u = 0; u < kNV; ++u) {
        const int idx = base + u * kThreads, m = idx / w4, k = 4 * (idx - m * w4), q = m / kHg, h = h0 + m % kHg;
        qv[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (idx < total && q < nq && h < a.nh) {
          const int64_t rh = int64_t(r0 + q) * a.nh + h;
          qv[u] = *reinterpret_cast<const float4*>(k < R ? a.qcat + rh * W + k : a.qrot + rh * a.qk + a.nope + (k - R));
        }
      }
#pragma unroll
      for (int u = 0; u < kNV; ++u) {
        const int idx = base + u * kThreads, m = idx / w4, k = 4 * (idx - m * w4);
        if (idx >= total) continue;
        uint2 hi, lo;
        split_bf16x2(qv[u].x * a.scale, qv[u].y * a.scale, hi.x, lo.x);
        split_bf16x2(qv[u].z * a.scale, qv[u].w * a.scale, hi.y, lo.y);
        *reinterpret_cast<uint2*>(qh + m * sq + k) = hi;
        *reinterpret_cast<uint2*>(ql + m * sq + k) = lo;
      }
    }
  }

  float m_run[Q][2], l_run[Q][2];
  float om[Q][4][4];
#pragma unroll
  for (int q = 0; q < Q; ++q) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      m_run[q][j] = -INFINITY;
      l_run[q][j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) om[q][j][i] = 0.0f;
  }

  for (int tl = 0; tl < tiles; ++tl) {
    const int t0 = tl * kT;
    __syncthreads();  // the previous tile is no longer read
    stash(tl);
    __syncthreads();
    if (tl + 1 < tiles) fetch(tl + 1);
    {
      const int nt = warp & 3, kh = warp >> 2, nks = W >> 4, half = (nks + 1) >> 1;
      const int s_end = min(nks, (kh + 1) * half);
      const int arow = (lane & 15) * sq + ((lane >> 4) << 3);
      const __nv_bfloat16* brow = t16 + (8 * nt + (lane & 7)) * sq + (((lane >> 3) & 1) << 3);
      float chi[Q][4] = {}, clo[Q][4] = {};
      for (int ks16 = kh * half; ks16 < s_end; ++ks16) {
        uint32_t bw[2];
        ldmatrix_x2(bw, brow + 16 * ks16);
#pragma unroll
        for (int q = 0; q < Q; ++q) {
          uint32_t ah[4], al[4];
          ldmatrix_x4(ah, qh + q * kHg * sq + arow + 16 * ks16);
          ldmatrix_x4(al, ql + q * kHg * sq + arow + 16 * ks16);
          mma_bf16(chi[q], ah, bw[0], bw[1]);
          mma_bf16(clo[q], al, bw[0], bw[1]);
        }
      }
#pragma unroll
      for (int q = 0; q < Q; ++q) {
        float* sp = ss + (kh * M + q * kHg) * (kT + 1) + 8 * nt + 2 * t4;
        sp[g * (kT + 1)] = chi[q][0] + clo[q][0];
        sp[g * (kT + 1) + 1] = chi[q][1] + clo[q][1];
        sp[(g + 8) * (kT + 1)] = chi[q][2] + clo[q][2];
        sp[(g + 8) * (kT + 1) + 1] = chi[q][3] + clo[q][3];
      }
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      const int cnt = min(kT, lens[q] - t0);  // ≤ 0: this row ended before the tile
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int m = q * kHg + 2 * warp + j;
        const float sc = lane >= cnt ? -INFINITY : ss[m * (kT + 1) + lane] + ss[(M + m) * (kT + 1) + lane];
        const float mnew = fmaxf(m_run[q][j], warp_max(sc));
        const float corr = m_run[q][j] == -INFINITY ? 0.0f : exp2f(m_run[q][j] - mnew);
        const float p = lane < cnt ? exp2f(sc - mnew) : 0.0f;
        l_run[q][j] = l_run[q][j] * corr + warp_sum(p);
        m_run[q][j] = mnew;
        const __nv_bfloat16 hi = __float2bfloat16_rn(p);
        ph[m * kPs + lane] = hi;
        pl[m * kPs + lane] = __float2bfloat16_rn(p - __bfloat162float(hi));
        if (lane == 0) st[m] = corr;
      }
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      const float cg = st[q * kHg + g], cg8 = st[q * kHg + g + 8];
      uint32_t pah[2][4], pal[2][4];
#pragma unroll
      for (int k2 = 0; k2 < 2; ++k2) {
        const int off = (q * kHg + (lane & 15)) * kPs + 16 * k2 + ((lane >> 4) << 3);
        ldmatrix_x4(pah[k2], ph + off);
        ldmatrix_x4(pal[k2], pl + off);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int nt = warp + 8 * j;
        if (8 * nt >= R) break;
        om[q][j][0] *= cg;
        om[q][j][1] *= cg;
        om[q][j][2] *= cg8;
        om[q][j][3] *= cg8;
        uint32_t bv[4];  // rows (positions) 0–7, 8–15, 16–23, 24–31 of the tile's columns 8·nt…
        ldmatrix_x4_trans(bv, t16 + lane * sq + 8 * nt);
        mma_bf16(om[q][j], pah[0], bv[0], bv[1]);
        mma_bf16(om[q][j], pal[0], bv[0], bv[1]);
        mma_bf16(om[q][j], pah[1], bv[2], bv[3]);
        mma_bf16(om[q][j], pal[1], bv[2], bv[3]);
      }
    }
  }
  if (lane == 0)
#pragma unroll
    for (int q = 0; q < Q; ++q)
#pragma unroll
      for (int j = 0; j < 2; ++j) st[M + q * kHg + 2 * warp + j] = l_run[q][j];
  __syncthreads();
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    if (q >= nq) break;
    const float inv = 1.0f / st[M + q * kHg + g], inv8 = 1.0f / st[M + q * kHg + g + 8];
    float* out = a.lat + int64_t(r0 + q) * a.nh * R;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = 8 * (warp + 8 * j) + 2 * t4;
      if (col >= R) break;
      if (h0 + g < a.nh)
        *reinterpret_cast<float2*>(out + int64_t(h0 + g) * R + col) = make_float2(om[q][j][0] * inv, om[q][j][1] * inv);
      if (h0 + g + 8 < a.nh)
        *reinterpret_cast<float2*>(out + int64_t(h0 + g + 8) * R + col) =
            make_float2(om[q][j][2] * inv8, om[q][j][3] * inv8);
    }
  }
}

template <int Q>
void launch(const LatentPrefillArgs& a) {
  const size_t smem = prefill_smem(Q, a.W);
  // Per call (the attribute is per device; a prefill launches once per layer).
  DSV3_CUDA_CHECK(cudaFuncSetAttribute(latent_prefill_kernel<Q>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const unsigned head_groups = unsigned((a.nh + kHg - 1) / kHg);
  latent_prefill_kernel<Q><<<dim3(unsigned(a.ngroups), head_groups), kThreads, smem, stream()>>>(a);
  check_launch("latent prefill attention");
}

std::atomic<int64_t> g_launches{0};

// Rows per CTA (0: the row kernel for every step); DSV3_LATENT_PREFILL_ROWS at start-up.
int& rows_setting() {
  static int q = [] {
    const char* e = std::getenv("DSV3_LATENT_PREFILL_ROWS");
    if (!e) return 2;
    const std::string v = e;
    if (v != "0" && v != "2" && v != "4") input_error("DSV3_LATENT_PREFILL_ROWS is '", v, "': 0 (off), 2 or 4");
    return std::stoi(v);
  }();
  return q;
}

}  // namespace

void cuda_set_latent_prefill_rows(int rows) {
  if (rows != 0 && rows != 2 && rows != 4) input_error("latent prefill rows per CTA: ", rows, " (0, 2 or 4)");
  rows_setting() = rows;
}
int cuda_latent_prefill_rows() { return rows_setting(); }
int64_t cuda_latent_prefill_launches() { return g_launches; }

std::vector<int32_t> latent_prefill_groups(const StepRows& rows, int q) {
  const int64_t N = rows.size();
  std::vector<int32_t> starts;
  for (int64_t r = 0; r < N;) {
    starts.push_back(int32_t(r));
    int64_t e = r + 1;
    while (e < N && e - r < q && rows.seq[size_t(e)] == rows.seq[size_t(r)] &&
           rows.pos[size_t(e)] == rows.pos[size_t(e - 1)] + 1)
      ++e;
    r = e;
  }
  starts.push_back(int32_t(N));
  return starts;
}

void launch_latent_prefill(const LatentPrefillArgs& a, int q) {
  DSV3_CHECK(a.W % 16 == 0 && a.W <= 320 && a.R % 8 == 0 && a.R <= 256 && a.ngroups > 0,
             "latent prefill attention: shape W ", a.W, ", R ", a.R);
  if (q == 2)
    launch<2>(a);
  else if (q == 4)
    launch<4>(a);
  else
    DSV3_CHECK(false, "latent prefill attention: ", q, " rows per group");
  ++g_launches;
}

}  // namespace dsv3
