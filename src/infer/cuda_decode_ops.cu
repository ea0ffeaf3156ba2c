#include "infer/cuda_decode_ops.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <type_traits>

#include "backend/cuda/common.cuh"
#include "backend/cuda/graph.h"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/pdl.cuh"
#include "infer/cuda_decode_fma.cuh"
#include "infer/cuda_decode_launch.cuh"
#include "infer/cuda_decode_mma.cuh"
#include "infer/cuda_weight_vec.cuh"

namespace dsv3 {
using namespace cuda;

namespace {

constexpr int64_t kNormRouterMaxWeights = int64_t(1) << 17;  // E·H of a fused router (every row's CTA reads it)
constexpr int kGemvWarps = 4;  // GEMV: 4 warps per CTA (many CTAs for short outputs)

// h[r] = RMSNorm(x[r])·norm_w as rmsnorm_reg_kernel computes it (rms_norm_row at the 256-thread
// column stride: the backend's bits), and logits[r, e] = h[r]·gate[e]: the
// router's GEMV inside the post-attention norm's launch, one launch fewer per MoE layer. The normed
// row goes through shared memory; warp w takes experts w, w + 8, …, each lane every 32nd 16-byte
// vector of the expert's row (four in flight), the lanes' sums added by a fixed butterfly. At 32
// rows this launch took ~7 µs of which the gate's loads, issued after the norm, were the tail.
template <class WT, int NPT>
__global__ void norm_router_kernel(const float* x, const void* norm_w, DType norm_t, float eps, const WT* gate, int H,
                                   int E, float* h, float* logits) {
  extern __shared__ __align__(16) float hs[];  // [H]
  constexpr int V = kVecCols<WT>, kPE = 4, kPV = 4;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5, nv = H / V;
  auto row_of = [&](int e) { return reinterpret_cast<const uint4*>(gate + int64_t(e) * H); };
  // The gate is a model weight: this warp's first kPE experts' first kPV vectors per lane are
  // loaded before the wait, so they arrive while the previous kernel drains.
  uint4 pre[kPE][kPV];
#pragma unroll
  for (int i = 0; i < kPE; ++i)
#pragma unroll
    for (int u = 0; u < kPV; ++u) {
      const int e = warp + i * nw, v = lane + 32 * u;
      pre[i][u] = e < E && v < nv ? ld_weights(row_of(e) + v) : make_uint4(0, 0, 0, 0);
    }
  pdl_wait();
  pdl_trigger();
  const int64_t r = blockIdx.x;
  float hv[NPT];
  rms_norm_row(x + r * H, norm_w, norm_t, H, eps, hv);
#pragma unroll
  for (int i = 0; i < NPT; ++i) {
    const int j = threadIdx.x + i * blockDim.x;
    if (j < H) h[r * H + j] = hs[j] = hv[i];
  }
  __syncthreads();
  // One expert's logit, its vectors in lane order (the first kPV from `pre` when given).
  auto logit = [&](int e, const uint4 (&first)[kPV], bool prefetched) {
    const uint4* row = row_of(e);
    float acc = 0.0f;
    int v = lane;
    if (prefetched) {
#pragma unroll
      for (int u = 0; u < kPV; ++u, v += 32) {
        if (v >= nv) break;
        float f[V];
        unpack_w<WT>(first[u], f);
#pragma unroll
        for (int c = 0; c < V; ++c) acc = fmaf(hs[v * V + c], f[c], acc);
      }
    }
#pragma unroll 4
    for (; v < nv; v += 32) {
      float f[V];
      unpack_w<WT>(ld_weights(row + v), f);
#pragma unroll
      for (int c = 0; c < V; ++c) acc = fmaf(hs[v * V + c], f[c], acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) logits[r * E + e] = acc;
  };
#pragma unroll
  for (int i = 0; i < kPE; ++i)
    if (warp + i * nw < E) logit(warp + i * nw, pre[i], true);
  for (int e = warp + kPE * nw; e < E; e += nw) logit(e, pre[0], false);
}

// c[r] = kv_a_layernorm(kv_a[r, :R]) (the backend's RMSNorm: sum of squares in double) and
// k_pe[r] = RoPE(kv_a[r, R:]) at positions[r]: the backend's copy_cols, rmsnorm, copy_cols, rope.
// With q (rows of nh heads of qk floats), also q's RoPE part (columns nope..qk of each head) at the
// same position, as the backend's rope on q: one launch fewer per layer. kva_older: kv_a was
// written two or more launches back (complete by now, pdl.cuh), so the norm's sum of squares is
// taken before the wait; otherwise after it, q's rotation first (its loads overlap the sum's).
__global__ void kv_latent_kernel(const float* __restrict__ kva, int64_t R, int64_t P, const void* w, DType wt,
                                 float eps, const int32_t* pos, const float* cs, const float* sn, bool interleaved,
                                 float* __restrict__ c, float* __restrict__ kpe, float* __restrict__ q, int64_t nh,
                                 int64_t qk, int64_t nope, bool kva_older) {
  const int64_t r = blockIdx.x;
  const float* x = kva + r * (R + P);
  auto sum_squares = [&] {
    double ss = 0.0;
    for (int64_t j = threadIdx.x; j < R; j += blockDim.x) ss += double(x[j]) * double(x[j]);
    return block_sum(ss);
  };
  double ss = kva_older ? sum_squares() : 0.0;
  pdl_wait();
  pdl_trigger();
  const int64_t half = P / 2, a = pos[r], stride = interleaved ? 1 : half;
  auto rotate = [&](const float* in, float* out, int64_t j) {
    const float x0 = in[0], x1 = in[stride], cj = cs[a * half + j], sj = sn[a * half + j];
    out[0] = x0 * cj - x1 * sj;
    out[stride] = x1 * cj + x0 * sj;
  };
  if (q)
    for (int64_t t = threadIdx.x; t < nh * half; t += blockDim.x) {
      const int64_t j = t % half;
      float* p = q + (r * nh + t / half) * qk + nope + (interleaved ? 2 * j : j);
      rotate(p, p, j);
    }
  if (!kva_older) ss = sum_squares();
  const float rs = float(1.0 / sqrt(ss / double(R) + double(eps)));
  for (int64_t j = threadIdx.x; j < R; j += blockDim.x) c[r * R + j] = load_f(w, wt, j) * (x[j] * rs);
  for (int64_t j = threadIdx.x; j < half; j += blockDim.x) {
    const int64_t i0 = interleaved ? 2 * j : j;
    rotate(x + R + i0, kpe + r * P + i0, j);
  }
}

// y[r, j] (+)= x[r]·W[j] (see GemvArgs) for 16-byte-aligned rows: R weight rows per warp
// (blockIdx.y), rows of x kRows·blockIdx.x onwards staged in shared memory (tile_rows). The first
// pass's weight loads are issued before pdl_wait, so they overlap the previous kernel's tail; the
// CTAs of one weight block run side by side (x fastest), so their re-reads of W come from L2.
template <class WT, int U, int R, bool kNorm, int kRows>
__global__ void __launch_bounds__(32 * kGemvWarps) gemv_kernel(GemvArgs g) {
  extern __shared__ __align__(16) float xs_sm[];
  __shared__ TileSmem ts;
  const int warp = threadIdx.x >> 5;
  const int j0 = (blockIdx.y * kGemvWarps + warp) * R, q0 = blockIdx.x * kRows;
  const int n = min(kRows, g.n - q0);
  const bool active = j0 < g.n_out + g.n_out2;
  const bool second = active && j0 >= g.n_out;  // R rows never straddle W and W2 (n_out % R == 0)
  const int jr = second ? j0 - g.n_out : (active ? j0 : 0), head = second ? 0 : jr / g.head_rows;
  // One x slice per CTA: its rows lie in one head (checked on the host).
  const int cta_row = blockIdx.y * kGemvWarps * R, cta_head = cta_row < g.n_out ? cta_row / g.head_rows : 0;
  if (threadIdx.x < n) ts.src[threadIdx.x] = g.x + int64_t(cta_head) * g.head_x + int64_t(q0 + threadIdx.x) * g.ldx;
  const size_t row_bytes = size_t(g.K) * sizeof(WT);
  const char* W = static_cast<const char*>(second ? g.W2 : g.W) + size_t(jr) * row_bytes;
  float acc[R][kRows], unused[1][kRows];
  tile_rows<WT, U, R, false, kNorm, true>(W, nullptr, row_bytes, active, g.K / kVecCols<WT>, n, ts, xs_sm, g.norm_w,
                                          g.norm_t, g.eps, acc, unused);
  if (!active) return;
  reduce_rows<false>(acc, unused, n, [&](int r, int q, float v, float) {
    const int64_t row = q0 + q;
    const int j = jr + r;
    float* o = second ? g.y2 + row * g.ldy2 + j : g.y + row * g.ldy + int64_t(head) * g.head_y + (j - head * g.head_rows);
    *o = g.acc ? *o + v : v;
  });
}

// The fallback for F32 rows that are not 16-byte aligned: a warp per weight row, streamed once per
// kChunk rows of x, optionally RMSNorm on x first.
__global__ void rows_gemv_scalar_kernel(GemvArgs g) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int j = blockIdx.x * kGemvWarps + warp;
  if (j >= g.n_out + g.n_out2) return;
  const bool second = j >= g.n_out;
  if (second) j -= g.n_out;
  const float* W = static_cast<const float*>(second ? g.W2 : g.W) + int64_t(j) * g.K;
  const int head = second ? 0 : j / g.head_rows;
  for (int q0 = 0; q0 < g.n; q0 += kChunk) {
    const int nq = min(kChunk, g.n - q0);
    const float* x = g.x + int64_t(head) * g.head_x + int64_t(q0) * g.ldx;
    float rs[kChunk], a[kChunk];
#pragma unroll
    for (int q = 0; q < kChunk; ++q) {
      rs[q] = 1.0f;
      a[q] = 0.0f;
    }
    if (g.norm_w) {
#pragma unroll
      for (int q = 0; q < kChunk; ++q)
        if (q < nq) {
          double ss = 0.0;
          for (int c = lane; c < g.K; c += 32) {
            const double v = x[int64_t(q) * g.ldx + c];
            ss += v * v;
          }
          for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
          rs[q] = float(1.0 / sqrt(ss / double(g.K) + double(g.eps)));
        }
    }
    for (int c = lane; c < g.K; c += 32) {
      const float wv = W[c];
      const float gv = g.norm_w ? load_f(g.norm_w, g.norm_t, c) : 1.0f;
#pragma unroll
      for (int q = 0; q < kChunk; ++q)
        if (q < nq) {
          float xv = __ldg(x + int64_t(q) * g.ldx + c);
          if (g.norm_w) xv = gv * (xv * rs[q]);
          a[q] = fmaf(wv, xv, a[q]);
        }
    }
#pragma unroll
    for (int q = 0; q < kChunk; ++q) {
      if (q >= nq) break;
      const float v = warp_sum(a[q]);
      if (lane == 0) {
        const int64_t row = q0 + q;
        float* o = second ? g.y2 + row * g.ldy2 + j
                          : g.y + row * g.ldy + int64_t(head) * g.head_y + (j - head * g.head_rows);
        *o = g.acc ? *o + v : v;
      }
    }
  }
}

// One row of x (a batch-1 step) takes the kernel built for one row: its code is a fraction of the
// kChunk-row kernel's.
template <class WT, int U, int R, bool kNorm, int kRows> void launch_gemv_k(int blocks, const GemvArgs& g) {
  static const bool once = (allow_smem(gemv_kernel<WT, U, R, kNorm, kRows>, tile_smem<WT, U>()), true);
  (void)once;
  const int rows = std::min(g.n, kRows);  // rows of x staged per CTA
  launch_pdl(gemv_kernel<WT, U, R, kNorm, kRows>, dim3(unsigned((g.n + kRows - 1) / kRows), unsigned(blocks)),
             dim3(32 * kGemvWarps), size_t(rows) * tile_smem<WT, U>() / kChunk, g);
}
template <class WT, int U, int R, bool kNorm> void launch_gemv_u(int blocks, const GemvArgs& g) {
  g.n == 1 ? launch_gemv_k<WT, U, R, kNorm, 1>(blocks, g) : launch_gemv_k<WT, U, R, kNorm, kChunk>(blocks, g);
}
template <class WT, int R, bool kNorm> void launch_gemv(int U, int blocks, const GemvArgs& g) {
  switch (U) {
    case 1: launch_gemv_u<WT, 1, R, kNorm>(blocks, g); break;
    case 2: launch_gemv_u<WT, 2, R, kNorm>(blocks, g); break;
    case 4: launch_gemv_u<WT, 4, R, kNorm>(blocks, g); break;
    default: launch_gemv_u<WT, 8, R, kNorm>(blocks, g); break;
  }
}
template <class WT, bool kNorm> void launch_gemv(int R, int U, int blocks, const GemvArgs& g) {
  R == 2 ? launch_gemv<WT, 2, kNorm>(U, blocks, g) : launch_gemv<WT, 1, kNorm>(U, blocks, g);
}
template <int NT, bool kF8> void launch_gemv_mma_nt(const GemvArgs& g) {
  const int ks = mma_ksplit(g.K, false), rows_per_cta = 16 * (kMmaWarps / ks);
  const int64_t ctas = (int64_t(g.n_out) + g.n_out2 + rows_per_cta - 1) / rows_per_cta;
  DSV3_CHECK(ctas <= INT32_MAX, "cuda_rows_gemv: ", g.n_out + g.n_out2, " output rows exceed one launch");
  launch_pdl(gemv_mma_kernel<NT, kF8>, dim3(unsigned(ctas), unsigned((g.n + 8 * NT - 1) / (8 * NT))), dim3(32 * kMmaWarps),
             size_t(kMmaWarps) * kMmaStash<NT> * sizeof(float), g, ks);
}
// gemv_rows_kernel when K fits its warps (≤ 16 k-blocks; with more than 8 rows of x, ≤ 32 in two
// rounds); x in parts of gemv_x_rows() rows (16; at most 32, its registers) along the grid's y,
// the steps per CTA sized for all parts together. Warps per
// CTA: the most (up to kExpRowWarps) that still give every SM a step, else ks (the most CTAs): a
// CTA's steps cost its warps' instructions in turn, so fewer warps per CTA spread a GEMV of few
// steps over more SMs (bench-0.7b's W_UK and W_UV at 32 rows were 32 steps of 16 warps on 32 of the
// H200's 132 SMs, issue-bound at ~16k cycles each under Nsight Compute: 13.2 / 11.6 -> 8.8 / 7.7 us
// with 2 and 4 warps). Splitting K over the CTAs of a cluster as well (partial sums through
// distributed shared memory) measured slower for every GEMV of the step (q_a + kv_a 10.8 -> 15.6 us,
// o_proj 16 -> 37 us) and was dropped. Step ranges sized so the CTAs about fill the SMs once
// (16 / nw CTAs of nw warps per SM). DSV3_DECODE_MMA_GEMV_ROWS=0 keeps gemv_mma_kernel;
// DSV3_DECODE_GEMV_ROUNDS=1 keeps one round (K beyond 16 k-blocks in slices of 16, one launch each).
template <int NT, bool kF8, int kRounds>
void launch_gemv_rows_nt(const GemvArgs& g, int ks, int nw, int steps_per_cta, int ctas, int x_parts) {
  const size_t smem = size_t(2) * kExpRowWarps * kMmaStash<NT> * sizeof(float);
  static const bool once = (allow_smem(gemv_rows_kernel<NT, kF8, kRounds>, smem), true);
  (void)once;
  launch_pdl(gemv_rows_kernel<NT, kF8, kRounds>, dim3(unsigned(ctas), unsigned(x_parts)), dim3(32 * nw),
             size_t(2) * nw * kMmaStash<NT> * sizeof(float), g, ks, steps_per_cta);
}
bool gemv_rows_on() {
  static const bool on = cuda::on_unless_env_zero("DSV3_DECODE_MMA_GEMV_ROWS");
  return on;
}
int gemv_max_rounds() {
  static const int n = env_choice("DSV3_DECODE_GEMV_ROUNDS", 2, {1, 2});
  return n;
}
// Rows of x per CTA (DSV3_DECODE_GEMV_XROWS: 8, 16 or 32): fewer rows give more CTAs, each with
// fewer x loads, splits and MMAs per warp, the weights read once more per part (from L2).
int gemv_x_rows() {
  static const int n = env_choice("DSV3_DECODE_GEMV_XROWS", 16, {8, 16, 32});
  return n;
}
// GEMVs of many row steps (kWideSteps per SM or more: bench-0.7b's lm_head, 2,048 steps) take up
// to 32 rows of x in one part: their steps already fill every SM, so a second part would only
// read the weights again from L2 (that lm_head at batch 32 on an H100: 204 against 123 MB of L2
// traffic, 49.7 against 45.5 us; session 37). Each output's sum has the same terms in the same
// order either way. DSV3_DECODE_GEMV_WIDE=0 at start-up turns it off.
constexpr int64_t kWideSteps = 4;
bool& gemv_wide_setting() {
  static bool on = cuda::on_unless_env_zero("DSV3_DECODE_GEMV_WIDE");
  return on;
}
template <bool kF8> bool launch_gemv_rows(const GemvArgs& g) {
  const int nkb = (g.K + kMmaKb - 1) / kMmaKb;
  int ks = 1;
  while (ks < nkb) ks *= 2;
  const int rounds = ks > kExpRowWarps && g.n > 8 ? ks / kExpRowWarps : 1;
  if (rounds > 1) ks = kExpRowWarps;
  if (!gemv_rows_on() || ks > kExpRowWarps || rounds > gemv_max_rounds() || g.n > kCudaGemvMaxRows) return false;
  const int64_t rows = int64_t(g.n_out) + g.n_out2;
  auto steps_for = [&](int nw) { return (rows + 16 * (nw / ks) - 1) / (16 * (nw / ks)); };
  const bool wide = gemv_wide_setting() && steps_for(kExpRowWarps) >= kWideSteps * sm_count();
  const int part = wide ? std::max(32, gemv_x_rows()) : gemv_x_rows();
  const int x_parts = (g.n + part - 1) / part;  // CTAs of `part` rows of x each
  const int prows = std::min(g.n, part);
  int nw = kExpRowWarps;
  while (nw > ks && steps_for(nw) * x_parts < sm_count()) nw /= 2;
  const int64_t steps = steps_for(nw);
  const int64_t slots = std::max<int64_t>(1, int64_t(sm_count()) * (kExpRowWarps / nw) / x_parts);
  const int64_t per = std::max<int64_t>(1, (steps + slots - 1) / slots);
  const int64_t ctas = (steps + per - 1) / per;
  DSV3_CHECK(ctas <= INT32_MAX, "cuda_rows_gemv: ", g.n_out + g.n_out2, " output rows exceed one launch");
  const int p = int(per), c = int(ctas);
  auto with_nt = [&]<int NT>() {  // NT n-tiles of 8 rows: the part's rows of x
    rounds == 2 ? launch_gemv_rows_nt<NT, kF8, 2>(g, ks, nw, p, c, x_parts)
                : launch_gemv_rows_nt<NT, kF8, 1>(g, ks, nw, p, c, x_parts);
  };
  if (prows <= 8)
    with_nt.template operator()<1>();
  else if (prows <= 16)
    with_nt.template operator()<2>();
  else
    with_nt.template operator()<4>();
  return true;
}
// K beyond gemv_rows_kernel's reach (16 k-blocks, or 32 in two rounds; up to four times that) as
// slices of its reach, each a gemv_rows launch, the later ones adding into y (in order: each waits
// for the one before). gemv_mma_kernel takes such a GEMV in one launch, but a warp there reloads x
// for every k-block it multiplies. DSV3_DECODE_GEMV_KSLICES=0 keeps it, as DSV3_DECODE_MMA_GEMV_ROWS=0 does.
template <bool kF8> bool launch_gemv_kslices(const GemvArgs& g) {
  static const bool on = cuda::on_unless_env_zero("DSV3_DECODE_GEMV_KSLICES");
  const int kSlice = gemv_max_rounds() * kExpRowWarps * kMmaKb;
  if (!on || !gemv_rows_on() || g.n <= 8 || g.n > kCudaGemvMaxRows || g.W2 || g.head_rows < g.n_out || g.ldw ||
      g.K <= kSlice || g.K > 4 * kSlice)
    return false;
  for (int k0 = 0; k0 < g.K; k0 += kSlice) {
    GemvArgs s = g;
    s.K = std::min(kSlice, g.K - k0);
    s.x = g.x + k0;
    s.W = static_cast<const char*>(g.W) + size_t(k0) * (kF8 ? 1 : 2);
    if (kF8) s.scale = g.scale + k0 / 128;  // kSlice is a multiple of the 128-column scale blocks
    s.ldw = g.K;
    s.acc = g.acc || k0 > 0;
    DSV3_CHECK(launch_gemv_rows<kF8>(s), "cuda_rows_gemv: a K slice the row-range kernel refused");
  }
  return true;
}
// The tensor-core GEMV, BF16 or (kF8) FP8 weights: the row-range kernel, its K slices, or the k-loop one.
template <bool kF8> void launch_gemv_mma(const GemvArgs& g) {
  if (launch_gemv_rows<kF8>(g) || launch_gemv_kslices<kF8>(g)) return;
  if (g.n <= 8)
    launch_gemv_mma_nt<1, kF8>(g);
  else if (g.n <= 16)
    launch_gemv_mma_nt<2, kF8>(g);
  else if (g.n <= 32)
    launch_gemv_mma_nt<4, kF8>(g);
  else
    launch_gemv_mma_nt<8, kF8>(g);
}
// The shapes the tensor-core GEMV takes: no fused norm, 16-row blocks inside one head and one weight.
bool mma_shape_ok(const GemvArgs& g) {
  return !g.norm_w && (g.head_rows >= g.n_out || g.head_rows % 16 == 0) && (!g.W2 || g.n_out % 16 == 0);
}

// A weight the GEMV takes: on the device, no bias, F32 (other layouts take the scalar fallback),
// BF16 in vector rows, or FP8 (fp8_rows).
bool gemv_weight_ok(const LinearParam& p) {
  return p.w.device() == Device::CUDA && !present(p.bias) &&
         (p.w.dtype() == DType::F32 || vector_rows(p.w) || fp8_rows(p));
}

}  // namespace

void cuda_set_decode_mma_rows(int rows) { mma_rows_setting() = std::max(rows, 0); }
int cuda_decode_mma_rows() { return mma_rows_setting(); }
void cuda_set_decode_gemv_wide(bool on) { gemv_wide_setting() = on; }
bool cuda_decode_gemv_wide() { return gemv_wide_setting(); }

bool cuda_small_linear_ok(const LinearParam& p, const Tensor& x) {
  return gemv_weight_ok(p) && x.dtype() == DType::F32 && x.ndim() == 2 && x.dim(0) <= kCudaGemvMaxRows &&
         x.dim(1) == p.w.dim(1);
}

bool cuda_small_linear_fuses_norm(const LinearParam& p) { return p.w.dtype() != DType::F8_E4M3; }
bool cuda_decode_fp8_ok(const LinearParam& p) { return fp8_rows(p); }

bool cuda_small_mlp_ok(const MlpParams& m, const Tensor& x) {
  return cuda_small_linear_ok(m.gate_proj, x) && cuda_small_linear_ok(m.up_proj, x) &&
         m.gate_proj.w.dtype() == m.up_proj.w.dtype() && gemv_weight_ok(m.down_proj) &&
         m.down_proj.w.dim(1) == m.gate_proj.w.dim(0);
}

void cuda_rows_gemv(const GemvArgs& g) {
  DSV3_CHECK(g.n >= 0 && g.n <= kCudaGemvMaxRows && g.K > 0 && g.head_rows > 0 && (g.ldw == 0 || g.ldw == g.K) &&
                 (g.wt == DType::F32 || g.wt == DType::BF16 || g.wt == DType::F8_E4M3),
             "cuda_rows_gemv: n ", g.n, " K ", g.K, " weights ", dtype_name(g.wt));
  if (g.n == 0 || g.n_out + g.n_out2 == 0) return;
  const bool f8 = g.wt == DType::F8_E4M3, bf = g.wt == DType::BF16;
  const int kv = f8 ? 16 : bf ? 8 : 4;
  const bool vec = g.K % kv == 0 && g.ldx % 4 == 0 && g.head_x % 4 == 0 && aligned16(g.x) && aligned16(g.W) &&
                   (!g.W2 || aligned16(g.W2));
  if (f8) {  // the tensor-core kernels only (cuda_decode_ops.h)
    DSV3_CHECK(vec && mma_shape_ok(g) && g.scale && (!g.W2 || g.scale2),
               "cuda_rows_gemv: FP8 weights need block scales, no fused norm, K a multiple of 16 (K ", g.K,
               "), aligned rows and heads of a multiple of 16 rows");
    launch_gemv_mma<true>(g);
    check_launch("small linear (FP8, tensor cores)");
    return;
  }
  if (!vec) {
    DSV3_CHECK(!bf, "cuda_rows_gemv: BF16 weights need 16-byte aligned rows (K ", g.K, ")");
    rows_gemv_scalar_kernel<<<unsigned((g.n_out + g.n_out2 + kGemvWarps - 1) / kGemvWarps), 32 * kGemvWarps, 0,
                              stream()>>>(g);
    check_launch("small linear");
    return;
  }
  // Two rows per warp when pairs never straddle a head or W and W2: each x load feeds both. A CTA's
  // rows share one x slice: within one head (W2 only beside a single-head W).
  DSV3_CHECK(!g.W2 || g.head_rows >= g.n_out, "cuda_rows_gemv: a second weight beside a multi-head first");
  const int R = g.head_rows % 2 == 0 && g.n_out % 2 == 0 && g.n_out2 % 2 == 0 ? 2 : 1;
  const bool one_head_per_cta = g.head_rows >= g.n_out || g.head_rows % (kGemvWarps * R) == 0;
  if (!one_head_per_cta) {
    DSV3_CHECK(!bf, "cuda_rows_gemv: BF16 weights need heads of a multiple of ", kGemvWarps * R, " rows");
    rows_gemv_scalar_kernel<<<unsigned((g.n_out + g.n_out2 + kGemvWarps - 1) / kGemvWarps), 32 * kGemvWarps, 0,
                              stream()>>>(g);
    check_launch("small linear");
    return;
  }
  if (bf && mma_wanted(g.n) && mma_shape_ok(g)) {
    launch_gemv_mma<false>(g);
    check_launch("small linear (tensor cores)");
    return;
  }
  const int U = vectors_per_lane(g.K / kv);
  const int64_t blocks = (int64_t(g.n_out) + g.n_out2 + kGemvWarps * R - 1) / (kGemvWarps * R);
  DSV3_CHECK(blocks <= 65535, "cuda_rows_gemv: ", g.n_out + g.n_out2, " output rows exceed one launch");
  const bool norm = g.norm_w != nullptr;
  const int nb = int(blocks);
  if (bf)
    norm ? launch_gemv<__nv_bfloat16, true>(R, U, nb, g) : launch_gemv<__nv_bfloat16, false>(R, U, nb, g);
  else
    norm ? launch_gemv<float, true>(R, U, nb, g) : launch_gemv<float, false>(R, U, nb, g);
  check_launch("small linear");
}

void cuda_small_linear(const LinearParam& p, const Tensor& x, const Tensor& y, bool accumulate, const Tensor* norm_w,
                       float eps, const LinearParam* p2, const Tensor* y2) {
  DSV3_CHECK(cuda_small_linear_ok(p, x) && y.numel() == x.dim(0) * p.w.dim(0) &&
                 (!p2 || (cuda_small_linear_ok(*p2, x) && y2 && y2->numel() == x.dim(0) * p2->w.dim(0) && !accumulate)),
             "cuda_small_linear: x ", x.shape().str(), " w ", p.w.shape().str());
  if (p2 && p.w.dtype() == DType::F8_E4M3 && p.w.dim(0) % 16 != 0) {
    // The FP8 kernels' 16-row blocks would straddle the two weights (the others take the F32-FMA
    // GEMV then): one launch each.
    cuda_small_linear(p, x, y, false, norm_w, eps);  // a norm_w is refused there, as for every FP8 GEMV
    cuda_small_linear(*p2, x, *y2, false, norm_w, eps);
    return;
  }
  GemvArgs g;
  g.x = x.data<float>();
  g.n = int(x.dim(0));
  g.K = int(p.w.dim(1));
  g.ldx = g.K;
  set_gemv_weight(g, p.w, p.scale_inv);
  g.n_out = int(p.w.dim(0));
  g.head_rows = g.n_out;
  g.y = ptr<float>(y);
  g.ldy = g.n_out;
  g.acc = accumulate;
  if (norm_w) {
    DSV3_CHECK(norm_w->numel() == g.K, "cuda_small_linear: norm weight ", norm_w->shape().str());
    g.norm_w = norm_w->raw();
    g.norm_t = norm_w->dtype();
    g.eps = eps;
  }
  if (p2) {
    DSV3_CHECK(p2->w.dtype() == g.wt, "cuda_small_linear: the paired weights differ in dtype");
    GemvArgs second;
    set_gemv_weight(second, p2->w, p2->scale_inv);
    g.W2 = second.W;
    g.scale2 = second.scale;
    g.ld_scale2 = second.ld_scale;
    g.n_out2 = int(p2->w.dim(0));
    g.y2 = ptr<float>(*y2);
    g.ldy2 = g.n_out2;
  }
  cuda_rows_gemv(g);
}


bool cuda_norm_router_ok(const LinearParam& gate, const Tensor& x) {
  const int64_t E = gate.w.dim(0), H = gate.w.dim(1);
  return gate.w.device() == Device::CUDA && !present(gate.bias) && vector_rows(gate.w) && x.dtype() == DType::F32 &&
         x.ndim() == 2 && x.dim(1) == H && H <= 256 * 8 && E * H <= kNormRouterMaxWeights;
}
// From 32 rows: bench-0.7b decode steps on the H200, fused against separate launches (two runs
// each, one lease, ms per step): 2 rows 0.772–0.776 / 0.754–0.755, 8 rows 1.100–1.102 / 1.074–1.076,
// 16 rows 1.080–1.081 / 1.069–1.081, 32 rows 1.407–1.440 / 1.446–1.476 (every CTA reads the whole
// gate, so few rows leave the SMs idle where the GEMV spreads the weight over them).
// DSV3_NORM_ROUTER_MIN_ROWS sets another threshold (for comparison).
int64_t cuda_norm_router_min_rows() {
  static const int64_t rows = [] {
    const char* e = std::getenv("DSV3_NORM_ROUTER_MIN_ROWS");
    return e ? std::max<int64_t>(1, std::atoll(e)) : int64_t(32);
  }();
  return rows;
}

void cuda_norm_router(const Tensor& x, const Tensor& norm_w, float eps, const LinearParam& gate, const Tensor& h,
                      const Tensor& logits) {
  const int64_t N = x.dim(0), E = gate.w.dim(0), H = gate.w.dim(1);
  DSV3_CHECK(cuda_norm_router_ok(gate, x) && norm_w.numel() == H && h.numel() == N * H && logits.numel() == N * E,
             "cuda_norm_router: x ", x.shape().str(), " gate ", gate.w.shape().str());
  if (N == 0) return;
  const size_t smem = size_t(H) * sizeof(float);
  auto run = [&](auto kernel, const auto* w) {
    launch_pdl(kernel, dim3(unsigned(N)), dim3(256), smem, x.data<float>(), norm_w.raw(), norm_w.dtype(), eps, w,
               int(H), int(E), ptr<float>(h), ptr<float>(logits));
  };
  const bool bf = gate.w.dtype() == DType::BF16, wide = H > 256 * 4;
  const auto* wb = static_cast<const __nv_bfloat16*>(gate.w.raw());
  const auto* wf = static_cast<const float*>(gate.w.raw());
  if (bf)
    wide ? run(norm_router_kernel<__nv_bfloat16, 8>, wb) : run(norm_router_kernel<__nv_bfloat16, 4>, wb);
  else
    wide ? run(norm_router_kernel<float, 8>, wf) : run(norm_router_kernel<float, 4>, wf);
  check_launch("norm and router");
}

namespace {

// This thread's side stream for cuda_kv_latent(…, beside = true): non-blocking, so that it runs
// beside the legacy stream in an eager step too; inside a capture the fork and join events make
// it part of the graph (two branches between q_b's GEMV and the latent attention).
struct Beside {
  cudaStream_t side = nullptr;
  cudaEvent_t fork = nullptr, join = nullptr;
  bool pending = false;
  Beside() {
    relaxed([&] {
      DSV3_CUDA_CHECK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
      DSV3_CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
      DSV3_CUDA_CHECK(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
    });
  }
  // Creation may happen during a capture, whose thread-local mode refuses such calls.
  template <class F> static void relaxed(F f) {
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    DSV3_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    f();
    DSV3_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  }
  ~Beside() {  // errors ignored: at exit the runtime may be gone already
    cudaEventDestroy(fork);
    cudaEventDestroy(join);
    cudaStreamDestroy(side);
  }
};
Beside& beside_state() {
  static thread_local Beside b;
  return b;
}
bool& beside_setting() {
  static bool on = cuda::on_unless_env_zero("DSV3_DECODE_BESIDE");
  return on;
}
std::atomic<int64_t> g_beside_forks{0};

}  // namespace

void cuda_set_decode_beside(bool on) { beside_setting() = on; }
bool cuda_decode_beside() { return beside_setting(); }
int64_t cuda_decode_beside_forks() { return g_beside_forks.load(); }

void cuda_join_beside() {
  Beside& b = beside_state();
  if (!b.pending) return;
  b.pending = false;
  if (cudaEventRecord(b.join, b.side) != cudaSuccess) {
    // Forked inside a capture that ended without this join (a throw in between): its work was never
    // run, and the side stream may be left in the dead capture; a fresh one replaces it.
    (void)cudaGetLastError();
    cudaStream_t old = b.side;
    Beside::relaxed([&] { DSV3_CUDA_CHECK(cudaStreamCreateWithFlags(&b.side, cudaStreamNonBlocking)); });
    cudaStreamDestroy(old);
    return;
  }
  DSV3_CUDA_CHECK(cudaStreamWaitEvent(stream(), b.join, 0));
}

void cuda_kv_latent(const Tensor& kv_a, const Tensor& norm_w, float eps, const Tensor& positions, const Tensor& cos,
                    const Tensor& sin, bool interleaved, const Tensor& c_kv_n, const Tensor& k_pe, const Tensor* q,
                    int64_t q_nope, bool kv_a_older, bool beside) {
  const int64_t N = kv_a.dim(0), R = c_kv_n.dim(-1), P = k_pe.dim(-1);
  DSV3_CHECK(kv_a.dim(1) == R + P && c_kv_n.numel() == N * R && k_pe.numel() == N * P && norm_w.numel() == R &&
                 positions.numel() == N && P % 2 == 0,
             "cuda_kv_latent: kv_a ", kv_a.shape().str());
  DSV3_CHECK(!q || (q->ndim() == 3 && q->dim(0) == N && q->dim(2) == q_nope + P && q->dtype() == DType::F32),
             "cuda_kv_latent: q ", q ? q->shape().str() : "", " does not hold ", P, " RoPE columns after ", q_nope);
  if (!N) return;
  cuda_join_beside();  // one branch at a time
  std::optional<StreamScope> side;
  if (beside) {
    Beside& b = beside_state();
    DSV3_CUDA_CHECK(cudaEventRecord(b.fork, stream()));
    DSV3_CUDA_CHECK(cudaStreamWaitEvent(b.side, b.fork, 0));
    side.emplace(b.side);
    b.pending = true;
    ++g_beside_forks;
  }
  launch_pdl(kv_latent_kernel, dim3(unsigned(N)), dim3(256), 0, kv_a.data<float>(), R, P, norm_w.raw(),
             norm_w.dtype(), eps, positions.data<int32_t>(), cos.data<float>(), sin.data<float>(), interleaved,
             ptr<float>(c_kv_n), ptr<float>(k_pe), q ? ptr<float>(*q) : nullptr, q ? q->dim(1) : 0,
             q ? q->dim(2) : 0, q_nope, kv_a_older);
  check_launch("kv latent");
}

}  // namespace dsv3
