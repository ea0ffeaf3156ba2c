#include "infer/cuda_decode_ops.h"

#include <algorithm>

#include "backend/cuda/common.cuh"

namespace dsv3 {
using namespace cuda;

namespace {

constexpr int kWarps = 8;        // per CTA of the expert kernels
constexpr int kRowsPerWarp = 2;  // weight rows per warp
constexpr int kChunk = 8;        // picks (rows of x) per pass over an expert's (a weight's) rows
constexpr int kMaxGemvRows = 64;
constexpr int kGemvWarps = 4;  // GEMV: one weight row per warp, 4 warps per CTA (many CTAs for short rows)

// One CTA of E threads: picks (r·k + j) grouped by expert, token order kept within an expert.
// order[p] = pick at grouped position p, inv[pick] = p, offsets[e] = first position of expert e.
// With a fused shared expert (group E), every token r is one more pick nk + r, after the routed ones.
__global__ void group_kernel(const int32_t* ids, int nk, int E, int n_shared_rows, int32_t* order, int32_t* inv,
                             int32_t* offsets) {
  extern __shared__ int32_t off[];
  int32_t* sid = off + E;  // the ids, read once (coalesced) instead of by every thread in turn
  for (int i = threadIdx.x; i < nk; i += blockDim.x) sid[i] = ids[i];
  __syncthreads();
  const int e = threadIdx.x;
  if (e < E) {
    int c = 0;
    for (int i = 0; i < nk; ++i) c += sid[i] == e;
    off[e] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (int i = 0; i < E; ++i) {
      const int c = off[i];
      off[i] = s;
      offsets[i] = s;
      s += c;
    }
    offsets[E] = s;
    if (n_shared_rows) offsets[E + 1] = s + n_shared_rows;
  }
  for (int r = threadIdx.x; r < n_shared_rows; r += blockDim.x) order[nk + r] = nk + r;
  __syncthreads();
  if (e < E) {
    int p = off[e];
    for (int i = 0; i < nk; ++i)
      if (sid[i] == e) {
        order[p] = i;
        inv[i] = p;
        ++p;
      }
  }
}

// y[p, j] for the picks p of expert blockIdx.x and weight rows j of this CTA: each weight row is read
// once per kChunk picks (once in all for up to kChunk picks of an expert). kGateUp: y = silu(x·g_j)·(x·u_j)
// with x the pick's token row; otherwise y = act_p·d_j with act the gate/up output rows.
template <bool kGateUp>
__global__ void expert_kernel(const float* in, const int32_t* order, const int32_t* offsets, const int64_t* w0,
                              const int64_t* w1, int k, int nk, int K, int rows_out, float* out) {
  extern __shared__ float xs[];
  const int e = blockIdx.x, c0 = offsets[e], c = offsets[e + 1] - c0;
  if (c == 0) return;
  const float* A = reinterpret_cast<const float*>(w0[e]);
  const float* B = kGateUp ? reinterpret_cast<const float*>(w1[e]) : nullptr;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __shared__ const float* src_rows[kChunk];
  for (int ch = 0; ch < c; ch += kChunk) {
    const int n = min(kChunk, c - ch);
    __syncthreads();
    // The chunk's source rows first (one lookup each), then independent loads in batches of 8 per
    // thread (a load-then-store loop would wait for every load in turn), 16 bytes when K allows.
    if (threadIdx.x < n) {
      const int p = c0 + ch + threadIdx.x;
      const int pick = kGateUp ? order[p] : 0;
      src_rows[threadIdx.x] = in + (kGateUp ? int64_t(pick < nk ? pick / k : pick - nk) : int64_t(p)) * K;
    }
    __syncthreads();
    if (K % 4 == 0) {
      const int K4 = K / 4, total = n * K4;
      for (int base = threadIdx.x; base < total; base += 8 * blockDim.x) {
        float4 v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int idx = base + u * blockDim.x;
          if (idx < total) v[u] = reinterpret_cast<const float4*>(src_rows[idx / K4])[idx % K4];
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int idx = base + u * blockDim.x;
          if (idx < total) reinterpret_cast<float4*>(xs)[idx] = v[u];
        }
      }
    } else {
      for (int idx = threadIdx.x; idx < n * K; idx += blockDim.x) xs[idx] = src_rows[idx / K][idx % K];
    }
    __syncthreads();
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int j = (blockIdx.y * kWarps + warp) * kRowsPerWarp + rr;
      if (j >= rows_out) break;
      float a[kChunk], b[kChunk];
#pragma unroll
      for (int q = 0; q < kChunk; ++q) a[q] = b[q] = 0.0f;
      const float* ar = A + int64_t(j) * K;
      const float* br = kGateUp ? B + int64_t(j) * K : nullptr;
      // 16-byte weight loads when rows allow it (K % 4 == 0: every row starts 16-byte aligned).
      const int K4 = K % 4 == 0 ? K / 4 : 0;
#pragma unroll 4
      for (int c = lane; c < K4; c += 32) {
        const float4 wa = reinterpret_cast<const float4*>(ar)[c];
        const float4 wb = kGateUp ? reinterpret_cast<const float4*>(br)[c] : make_float4(0, 0, 0, 0);
#pragma unroll
        for (int q = 0; q < kChunk; ++q)
          if (q < n) {
            const float4 xv = reinterpret_cast<const float4*>(xs + q * K)[c];
            a[q] = fmaf(wa.x, xv.x, fmaf(wa.y, xv.y, fmaf(wa.z, xv.z, fmaf(wa.w, xv.w, a[q]))));
            if (kGateUp) b[q] = fmaf(wb.x, xv.x, fmaf(wb.y, xv.y, fmaf(wb.z, xv.z, fmaf(wb.w, xv.w, b[q]))));
          }
      }
      for (int col = 4 * K4 + lane; col < K; col += 32) {
        const float wa = ar[col], wb = kGateUp ? br[col] : 0.0f;
#pragma unroll
        for (int q = 0; q < kChunk; ++q)
          if (q < n) {
            const float xv = xs[q * K + col];
            a[q] = fmaf(wa, xv, a[q]);
            if (kGateUp) b[q] = fmaf(wb, xv, b[q]);
          }
      }
#pragma unroll
      for (int q = 0; q < kChunk; ++q) {
        if (q >= n) break;
        const float g = warp_sum(a[q]);
        const float u = kGateUp ? warp_sum(b[q]) : 0.0f;
        if (lane == 0) out[int64_t(c0 + ch + q) * rows_out + j] = kGateUp ? g / (1.0f + expf(-g)) * u : g;
      }
    }
  }
}

// out[r] = Σ_j weights[r, j]·y[inv[r·k + j]] in top-k order (+ the fused shared expert's row).
__global__ void combine_kernel(const float* y, const int32_t* inv, const float* wts, int k, int nk, bool shared,
                               int H, const float* residual, float* out) {
  const int r = blockIdx.x;
  __shared__ const float* rows[32];
  __shared__ float w[32];
  if (threadIdx.x < k) {  // k ≤ 32 (checked on the host)
    rows[threadIdx.x] = y + int64_t(inv[r * k + threadIdx.x]) * H;
    w[threadIdx.x] = wts[r * k + threadIdx.x];
  }
  __syncthreads();
  for (int col = threadIdx.x; col < H; col += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < k; ++j) acc = fmaf(w[j], rows[j][col], acc);
    if (shared) acc += y[int64_t(nk + r) * H + col];
    out[int64_t(r) * H + col] = residual ? residual[int64_t(r) * H + col] + acc : acc;
  }
}

// c[r] = kv_a_layernorm(kv_a[r, :R]) (the backend's RMSNorm: sum of squares in double) and
// k_pe[r] = RoPE(kv_a[r, R:]) at positions[r]: the backend's copy_cols, rmsnorm, copy_cols, rope.
__global__ void kv_latent_kernel(const float* kva, int64_t R, int64_t P, const void* w, DType wt, float eps,
                                 const int32_t* pos, const float* cs, const float* sn, bool interleaved, float* c,
                                 float* kpe) {
  const int64_t r = blockIdx.x;
  const float* x = kva + r * (R + P);
  double ss = 0.0;
  for (int64_t j = threadIdx.x; j < R; j += blockDim.x) ss += double(x[j]) * double(x[j]);
  ss = block_sum(ss);
  const float rs = float(1.0 / sqrt(ss / double(R) + double(eps)));
  for (int64_t j = threadIdx.x; j < R; j += blockDim.x) c[r * R + j] = load_f(w, wt, j) * (x[j] * rs);
  const int64_t half = P / 2, a = pos[r];
  for (int64_t j = threadIdx.x; j < half; j += blockDim.x) {
    const int64_t i0 = interleaved ? 2 * j : j, i1 = interleaved ? 2 * j + 1 : j + half;
    const float x0 = x[R + i0], x1 = x[R + i1], cj = cs[a * half + j], sj = sn[a * half + j];
    kpe[r * P + i0] = x0 * cj - x1 * sj;
    kpe[r * P + i1] = x1 * cj + x0 * sj;
  }
}

// y[r, j] (+)= x[r]·W[j] for a few rows (see GemvArgs): a warp per weight row, streamed once per 8
// rows of x (x itself stays in L1/L2), optionally RMSNorm on x first.
template <bool kVec4>
__global__ void rows_gemv_kernel(GemvArgs g) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  {
    int j = blockIdx.x * kGemvWarps + warp;
    if (j >= g.n_out + g.n_out2) return;
    const bool second = j >= g.n_out;
    if (second) j -= g.n_out;
    const float* W = (second ? g.W2 : g.W) + int64_t(j) * g.K;
    const int head = second ? 0 : j / g.head_rows;
    // Rows of x in chunks of kChunk (the weight row is re-read per chunk, from L1/L2 after the first).
    for (int q0 = 0; q0 < g.n; q0 += kChunk) {
      const int nq = min(kChunk, g.n - q0);
      const float* x = g.x + int64_t(head) * g.head_x + int64_t(q0) * g.ldx;
      float rs[kChunk];
#pragma unroll
      for (int q = 0; q < kChunk; ++q) rs[q] = 1.0f;
      if (g.norm_w) {  // the backend's RMSNorm: sum of squares in double, then w·(x·rs)
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
      float a[kChunk];
#pragma unroll
      for (int q = 0; q < kChunk; ++q) a[q] = 0.0f;
      if (kVec4) {
        const float4* w4 = reinterpret_cast<const float4*>(W);
#pragma unroll 4
        for (int c = lane; c < g.K / 4; c += 32) {
          const float4 wv = w4[c];
          float4 gv = make_float4(1.0f, 1.0f, 1.0f, 1.0f);
          if (g.norm_w)
            gv = make_float4(load_f(g.norm_w, g.norm_t, 4 * c), load_f(g.norm_w, g.norm_t, 4 * c + 1),
                             load_f(g.norm_w, g.norm_t, 4 * c + 2), load_f(g.norm_w, g.norm_t, 4 * c + 3));
#pragma unroll
          for (int q = 0; q < kChunk; ++q)
            if (q < nq) {
              float4 xv = __ldg(reinterpret_cast<const float4*>(x + int64_t(q) * g.ldx) + c);
              if (g.norm_w) {
                xv.x = gv.x * (xv.x * rs[q]);
                xv.y = gv.y * (xv.y * rs[q]);
                xv.z = gv.z * (xv.z * rs[q]);
                xv.w = gv.w * (xv.w * rs[q]);
              }
              a[q] = fmaf(wv.x, xv.x, fmaf(wv.y, xv.y, fmaf(wv.z, xv.z, fmaf(wv.w, xv.w, a[q]))));
            }
        }
      } else {
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
}

}  // namespace

bool cuda_small_linear_ok(const LinearParam& p, const Tensor& x) {
  return p.w.dtype() == DType::F32 && p.w.device() == Device::CUDA && !present(p.bias) && x.dtype() == DType::F32 &&
         x.ndim() == 2 && x.dim(0) <= kMaxGemvRows && x.dim(1) == p.w.dim(1);
}

void cuda_rows_gemv(const GemvArgs& g) {
  DSV3_CHECK(g.n >= 0 && g.n <= kMaxGemvRows && g.K > 0 && g.head_rows > 0, "cuda_rows_gemv: n ", g.n, " K ", g.K);
  if (g.n == 0 || g.n_out + g.n_out2 == 0) return;
  auto al = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vec = g.K % 4 == 0 && g.ldx % 4 == 0 && g.head_x % 4 == 0 && al(g.x) && al(g.W) && (!g.W2 || al(g.W2));
  const unsigned grid = unsigned((g.n_out + g.n_out2 + kGemvWarps - 1) / kGemvWarps);
  if (vec)
    rows_gemv_kernel<true><<<grid, 32 * kGemvWarps>>>(g);
  else
    rows_gemv_kernel<false><<<grid, 32 * kGemvWarps>>>(g);
  check_launch("small linear");
}

void cuda_small_linear(const LinearParam& p, const Tensor& x, const Tensor& y, bool accumulate, const Tensor* norm_w,
                       float eps, const LinearParam* p2, const Tensor* y2) {
  DSV3_CHECK(cuda_small_linear_ok(p, x) && y.numel() == x.dim(0) * p.w.dim(0) &&
                 (!p2 || (cuda_small_linear_ok(*p2, x) && y2 && y2->numel() == x.dim(0) * p2->w.dim(0) && !accumulate)),
             "cuda_small_linear: x ", x.shape().str(), " w ", p.w.shape().str());
  GemvArgs g;
  g.x = x.data<float>();
  g.n = int(x.dim(0));
  g.K = int(p.w.dim(1));
  g.ldx = g.K;
  g.W = p.w.data<float>();
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
    g.W2 = p2->w.data<float>();
    g.n_out2 = int(p2->w.dim(0));
    g.y2 = ptr<float>(*y2);
    g.ldy2 = g.n_out2;
  }
  cuda_rows_gemv(g);
}


void cuda_kv_latent(const Tensor& kv_a, const Tensor& norm_w, float eps, const Tensor& positions, const Tensor& cos,
                    const Tensor& sin, bool interleaved, const Tensor& c_kv_n, const Tensor& k_pe) {
  const int64_t N = kv_a.dim(0), R = c_kv_n.dim(-1), P = k_pe.dim(-1);
  DSV3_CHECK(kv_a.dim(1) == R + P && c_kv_n.numel() == N * R && k_pe.numel() == N * P && norm_w.numel() == R &&
                 positions.numel() == N && P % 2 == 0,
             "cuda_kv_latent: kv_a ", kv_a.shape().str());
  if (N)
    kv_latent_kernel<<<unsigned(N), 128>>>(kv_a.data<float>(), R, P, norm_w.raw(), norm_w.dtype(), eps,
                                           positions.data<int32_t>(), cos.data<float>(), sin.data<float>(),
                                           interleaved, ptr<float>(c_kv_n), ptr<float>(k_pe));
  check_launch("kv latent");
}

namespace {
bool f32_mlp(const MlpParams& m) {
  for (const LinearParam* l : {&m.gate_proj, &m.up_proj, &m.down_proj})
    if (l->w.dtype() != DType::F32 || l->w.device() != Device::CUDA || present(l->bias) ||
        reinterpret_cast<uintptr_t>(l->w.raw()) % 16 != 0)
      return false;
  return true;
}
}  // namespace

bool cuda_moe_supported(const MoeParams& p) {
  if (p.experts.empty() || p.experts.size() > 1024) return false;
  // One chunk of input rows must fit the expert kernels' 48 KB of shared memory.
  const int64_t widest = std::max(p.experts[0].gate_proj.w.dim(0), p.experts[0].gate_proj.w.dim(1));
  if (kChunk * widest * int64_t(sizeof(float)) > 48 * 1024) return false;
  for (const MlpParams& m : p.experts)
    if (!f32_mlp(m)) return false;
  return true;
}

CudaMoeTables cuda_moe_tables(const MoeParams& p) {
  DSV3_CHECK(cuda_moe_supported(p), "cuda_moe_tables: unsupported experts");
  CudaMoeTables t;
  t.E = int64_t(p.experts.size());
  t.I = p.experts[0].gate_proj.w.dim(0);
  t.H = p.experts[0].gate_proj.w.dim(1);
  // The shared experts join as one more group when they have the routed experts' shape.
  const MlpParams& sh = p.shared_experts;
  t.shared = p.has_shared && f32_mlp(sh) && sh.gate_proj.w.dim(0) == t.I && sh.gate_proj.w.dim(1) == t.H;
  const int64_t cols = t.E + (t.shared ? 1 : 0);
  Tensor h = Tensor::empty(DType::I64, {3, cols});
  int64_t* d = h.data<int64_t>();
  for (int64_t e = 0; e < cols; ++e) {
    const MlpParams& m = e < t.E ? p.experts[size_t(e)] : sh;
    DSV3_CHECK(m.gate_proj.w.dim(0) == t.I && m.up_proj.w.dim(0) == t.I && m.down_proj.w.dim(0) == t.H &&
                   m.down_proj.w.dim(1) == t.I,
               "cuda_moe_tables: expert ", e, " shapes differ");
    d[e] = int64_t(reinterpret_cast<uintptr_t>(m.gate_proj.w.raw()));
    d[cols + e] = int64_t(reinterpret_cast<uintptr_t>(m.up_proj.w.raw()));
    d[2 * cols + e] = int64_t(reinterpret_cast<uintptr_t>(m.down_proj.w.raw()));
  }
  t.ptrs = cuda_backend().to_device(h);
  return t;
}

Tensor cuda_moe_forward(Backend& be, const ModelDims& d, const MoeParams& p, const CudaMoeTables& t,
                        const Tensor& x, const Tensor* residual, bool small_gemv) {
  const int64_t N = x.dim(0), E = t.E, k = d.top_k, H = t.H, I = t.I;
  DSV3_CHECK(x.device() == Device::CUDA && x.dim(1) == H && E == d.n_experts && k <= 32, "cuda_moe_forward: x ",
             x.shape().str());
  Tensor logits = be.alloc(DType::F32, {N, E});
  if (small_gemv && cuda_small_linear_ok(p.gate, x))
    cuda_small_linear(p.gate, x, logits, false);
  else
    linear_forward(be, p.gate, x, logits);
  Tensor ids = be.alloc(DType::I32, {N, k}), wts = be.alloc(DType::F32, {N, k});
  Tensor scores = be.alloc(DType::F32, {N, E});
  moe_route(be, d, p, logits, scores, ids, wts);

  const int64_t nk = N * k, groups = E + (t.shared ? 1 : 0), picks = nk + (t.shared ? N : 0);
  DSV3_CHECK(cuda_moe_fits(t, N, k), "cuda_moe_forward: ", N, " rows × top-", k, " picks exceed the grouping kernel");
  Tensor grp = be.alloc(DType::I32, {picks + nk + groups + 1});
  int32_t* order = ptr<int32_t>(grp);
  int32_t* inv = order + picks;
  int32_t* offsets = inv + nk;
  group_kernel<<<1, unsigned((E + 31) / 32 * 32), size_t(E + nk) * sizeof(int32_t)>>>(
      ids.data<int32_t>(), int(nk), int(E), t.shared ? int(N) : 0, order, inv, offsets);
  check_launch("moe grouping");
  const int64_t* w = t.ptrs.data<int64_t>();
  Tensor act = be.alloc(DType::F32, {picks, I});
  const int rows_per_cta = kWarps * kRowsPerWarp;
  expert_kernel<true><<<dim3(unsigned(groups), unsigned((I + rows_per_cta - 1) / rows_per_cta)), 32 * kWarps,
                        size_t(kChunk * H) * sizeof(float)>>>(x.data<float>(), order, offsets, w, w + groups, int(k),
                                                              int(nk), int(H), int(I), ptr<float>(act));
  check_launch("experts gate/up");
  Tensor y = be.alloc(DType::F32, {picks, H});
  expert_kernel<false><<<dim3(unsigned(groups), unsigned((H + rows_per_cta - 1) / rows_per_cta)), 32 * kWarps,
                         size_t(kChunk * I) * sizeof(float)>>>(act.data<float>(), order, offsets, w + 2 * groups,
                                                               nullptr, int(k), int(nk), int(I), int(H),
                                                               ptr<float>(y));
  check_launch("experts down");
  Tensor out = be.alloc(DType::F32, {N, H});
  const bool late_shared = p.has_shared && !t.shared;
  const bool fold = residual && !late_shared;
  combine_kernel<<<unsigned(N), 256>>>(y.data<float>(), inv, wts.data<float>(), int(k), int(nk), t.shared, int(H),
                                       fold ? residual->data<float>() : nullptr, ptr<float>(out));
  check_launch("moe combine");
  if (late_shared) {
    MlpActs m;
    m.out = out;
    mlp_forward(be, p.shared_experts, x, m, true);  // out += shared experts
  }
  if (residual && !fold) {
    AddArgs a;
    a.a = *residual;
    a.b = out;
    a.out = out;
    be.add(a);
  }
  return out;
}

}  // namespace dsv3
