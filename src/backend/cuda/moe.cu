// MoE on the GPU: the grouped router and its backward, sorting picks by expert, and the row gather /
// deterministic weighted scatter-add (a stable sort by destination row gives every output row its
// sources in ascending order, so no floating-point atomics are needed).
//
// The router runs one warp per token with the scores in registers (expert lane + 32·i); every
// selection step is a warp reduction. It reproduces the serial scan it replaced bit for bit: the
// largest value wins, ties go to the lower index, a NaN is never picked unless it is the first
// candidate (a serial scan keeps that one), the softmax sum is added in the former 128-thread order,
// and the weights are summed in pick order.
#include <climits>

#include "backend/cuda/common.cuh"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/vec4.cuh"

namespace dsv3 {
using namespace cuda;

namespace {

constexpr int kRouterWarps = 4;  // tokens per CTA

// Index of the largest c[lo..hi) not yet taken; ties → lower index (torch.topk on the CPU).
__device__ int argmax_free(const float* c, const unsigned char* taken, int lo, int hi) {
  int best = -1;
  for (int j = lo; j < hi; ++j)
    if (!taken[j] && (best < 0 || c[j] > c[best])) best = j;
  return best;
}

// The serial router for more than 1024 experts (one thread selects; shared-memory flags).
__global__ void router_serial_kernel(const float* logits, const void* bias, DType bt, bool sigmoid, int method, int ng,
                                     int topk_group, int k, bool norm, float rsf, int e, float* scores, int32_t* ids,
                                     float* weights) {
  extern __shared__ float sm[];
  float* choice = sm;
  unsigned char* taken = reinterpret_cast<unsigned char*>(sm + e);
  int64_t t = blockIdx.x;
  const float* l = logits + t * e;
  float* s = scores + t * e;
  if (sigmoid) {
    for (int j = threadIdx.x; j < e; j += blockDim.x) s[j] = 1.0f / (1.0f + expf(-l[j]));
  } else {
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < e; j += blockDim.x) mx = fmaxf(mx, l[j]);
    mx = block_max(mx);
    double sum = 0.0;
    for (int j = threadIdx.x; j < e; j += blockDim.x) sum += exp(double(l[j] - mx));
    sum = block_sum(sum);
    for (int j = threadIdx.x; j < e; j += blockDim.x) s[j] = float(exp(double(l[j] - mx)) / sum);
  }
  for (int j = threadIdx.x; j < e; j += blockDim.x) {
    choice[j] = bias ? s[j] + load_f(bias, bt, j) : s[j];
    taken[j] = 0;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  bool grouped = method != int(RouterMethod::Greedy);
  if (grouped && topk_group < ng) {
    int gsz = e / ng;
    float gscore[64];
    unsigned char gtaken[64];
    for (int g = 0; g < ng; ++g) {
      const float* c = choice + g * gsz;
      if (method == int(RouterMethod::NoauxTc)) {
        int a = argmax_free(c, taken + g * gsz, 0, gsz);
        taken[g * gsz + a] = 1;
        int b = argmax_free(c, taken + g * gsz, 0, gsz);
        taken[g * gsz + a] = 0;
        gscore[g] = c[a] + c[b];
      } else {
        float m = c[0];
        for (int j = 1; j < gsz; ++j) m = fmaxf(m, c[j]);
        gscore[g] = m;
      }
      gtaken[g] = 0;
    }
    for (int i = 0; i < topk_group; ++i) gtaken[argmax_free(gscore, gtaken, 0, ng)] = 1;
    for (int j = 0; j < e; ++j)
      if (!gtaken[j / gsz]) choice[j] = -INFINITY;
  }
  float* w = weights + t * k;
  float sum = 0.0f;
  for (int i = 0; i < k; ++i) {
    int p = argmax_free(choice, taken, 0, e);
    taken[p] = 1;
    ids[t * k + i] = p;
    w[i] = s[p];
    sum += w[i];
  }
  if (norm)
    for (int i = 0; i < k; ++i) w[i] /= sum + 1e-20f;
  for (int i = 0; i < k; ++i) w[i] *= rsf;
}

// argmax_free over c[0..n) without `excl` (a serial scan: the same comparisons in the same order).
__device__ int scan_argmax(const float* c, int n, int excl) {
  int best = -1;
  float bv = 0.0f;
  for (int j = 0; j < n; ++j)
    if (j != excl && (best < 0 || c[j] > bv)) {
      best = j;
      bv = c[j];
    }
  return best;
}

// Unsigned key ordered as the floats (not NaN); −0 and +0 share a key, as they compare equal.
__device__ __forceinline__ unsigned order_key(float v) {
  const unsigned u = __float_as_uint(v == 0.0f ? 0.0f : v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// What argmax_free returns over the warp's values v (index lane + 32·i, below n, bit i of `taken`
// clear): its first candidate when that is NaN, else the largest non-NaN value, lowest index on ties.
// Every key of a non-NaN value is above 0, the key of a lane without candidates.
template <int C>
__device__ int warp_argmax(const float (&v)[C], unsigned taken, int n, bool any_nan) {
  const int lane = threadIdx.x & 31;
  if (any_nan) {
    unsigned first = UINT_MAX;
#pragma unroll
    for (int i = C - 1; i >= 0; --i) {
      const int j = lane + 32 * i;
      if (j < n && !((taken >> i) & 1u)) first = (unsigned(j) << 1) | unsigned(isnan(v[i]));
    }
    first = __reduce_min_sync(0xffffffffu, first);
    if (first & 1u) return int(first >> 1);
  }
  unsigned best = 0;
  int bi = INT_MAX;
#pragma unroll
  for (int i = 0; i < C; ++i) {
    const int j = lane + 32 * i;
    if (j < n && !((taken >> i) & 1u) && !isnan(v[i])) {
      const unsigned key = order_key(v[i]);
      if (key > best) {
        best = key;
        bi = j;
      }
    }
  }
  const unsigned top = __reduce_max_sync(0xffffffffu, best);
  return __reduce_min_sync(0xffffffffu, best == top ? bi : INT_MAX);
}

template <int C> __device__ bool warp_any_nan(const float (&v)[C], int n) {
  bool nan = false;
#pragma unroll
  for (int i = 0; i < C; ++i) nan |= (threadIdx.x & 31) + 32 * i < n && isnan(v[i]);
  return __any_sync(0xffffffffu, nan);
}

// One warp per token, C experts per lane (e ≤ 32·C). Shared memory per warp: e + 64 floats (the
// choice values, each group followed by one pad float so that the lanes scanning groups in parallel
// hit distinct banks) and k floats (the picked scores).
template <int C>
__global__ void router_warp_kernel(const float* logits, const void* bias, DType bt, bool sigmoid, int method, int ng,
                                   int topk_group, int k, bool norm, float rsf, int e, int64_t tokens, float* scores,
                                   int32_t* ids, float* weights) {
  extern __shared__ float sm[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kRouterWarps + warp;
  pdl_wait();  // the logits (and, in training, the bias) come from previous kernels
  pdl_trigger();
  if (t >= tokens) return;  // whole warps only: nothing below synchronises the CTA
  const int gsz = e / ng, gstride = gsz + 1;
  float* choice = sm + warp * (e + 64 + k);
  float* picked = choice + e + 64;
  const float* l = logits + t * e;
  float s[C], c[C], bv[C];  // the bias loads issued with the logits'
#pragma unroll
  for (int i = 0; i < C; ++i) {
    const int j = lane + 32 * i;
    s[i] = j < e ? l[j] : 0.0f;
    bv[i] = bias && j < e ? load_f(bias, bt, j) : 0.0f;
  }
  if (sigmoid) {
#pragma unroll
    for (int i = 0; i < C; ++i) s[i] = 1.0f / (1.0f + expf(-s[i]));
  } else {
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < C; ++i)
      if (lane + 32 * i < e) mx = fmaxf(mx, s[i]);
    mx = warp_max(mx);
    // The former kernel's sum: thread τ < 128 added j ≡ τ (mod 128) in order, then each warp's
    // xor-tree, then the tree over the four warp sums. Lane L holds thread L + 32·(i mod 4)'s terms.
    double part[4] = {0.0, 0.0, 0.0, 0.0};
#pragma unroll
    for (int i = 0; i < C; ++i)
      if (lane + 32 * i < e) part[i & 3] += exp(double(s[i] - mx));
    double r = 0.0;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const double pw = warp_sum(part[w]);
      if (lane == w) r = pw;
    }
    const double sum = warp_sum(r);
#pragma unroll
    for (int i = 0; i < C; ++i) s[i] = float(exp(double(s[i] - mx)) / sum);
  }
  float* so = scores + t * e;
#pragma unroll
  for (int i = 0; i < C; ++i) {
    const int j = lane + 32 * i;
    if (j < e) {
      so[j] = s[i];
      c[i] = bias ? s[i] + bv[i] : s[i];
      choice[j + j / gsz] = c[i];
    } else {
      c[i] = 0.0f;
    }
  }
  if (method != int(RouterMethod::Greedy) && topk_group < ng) {
    __syncwarp();
    float gs[2];  // ng ≤ 64: groups lane and lane + 32
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int g = lane + 32 * q;
      gs[q] = 0.0f;
      if (g >= ng) continue;
      const float* cg = choice + g * gstride;
      if (method == int(RouterMethod::NoauxTc)) {
        const int a = scan_argmax(cg, gsz, -1), b = scan_argmax(cg, gsz, a);
        gs[q] = cg[a] + cg[b];
      } else {
        float m = cg[0];
        for (int j = 1; j < gsz; ++j) m = fmaxf(m, cg[j]);
        gs[q] = m;
      }
    }
    const bool gnan = warp_any_nan(gs, ng);
    unsigned gtaken = 0;
    unsigned long long keep = 0;
    for (int i = 0; i < topk_group; ++i) {
      const int g = warp_argmax(gs, gtaken, ng, gnan);
      keep |= 1ull << g;
      if ((g & 31) == lane) gtaken |= 1u << (g >> 5);
    }
#pragma unroll
    for (int i = 0; i < C; ++i) {
      const int j = lane + 32 * i;
      if (j < e && !((keep >> (j / gsz)) & 1ull)) c[i] = -INFINITY;
    }
  }
  const bool cnan = warp_any_nan(c, e);
  unsigned taken = 0;
  float sum = 0.0f;
  int32_t* id = ids + t * k;
  for (int i = 0; i < k; ++i) {
    const int p = warp_argmax(c, taken, e, cnan);
    float sp = 0.0f;
#pragma unroll
    for (int ii = 0; ii < C; ++ii)
      if (lane + 32 * ii == p) sp = s[ii];
    sp = __shfl_sync(0xffffffffu, sp, p & 31);
    if ((p & 31) == lane) {
      taken |= 1u << (p >> 5);
      id[i] = p;
      picked[i] = sp;
    }
    sum += sp;
  }
  __syncwarp();
  float* w = weights + t * k;
  for (int i = lane; i < k; i += 32) {
    float v = picked[i];
    if (norm) v /= sum + 1e-20f;
    w[i] = v * rsf;
  }
}

__global__ void router_bwd_kernel(const float* scores, const int32_t* ids, const float* dw, bool sigmoid, bool norm,
                                  float c, int e, int k, float* dl, bool acc) {
  extern __shared__ float ds[];
  int64_t t = blockIdx.x;
  const float* s = scores + t * e;
  const int32_t* id = ids + t * k;
  const float* g = dw + t * k;
  for (int j = threadIdx.x; j < e; j += blockDim.x) ds[j] = 0.0f;
  __syncthreads();
  if (threadIdx.x == 0) {
    if (norm) {
      float z = 0.0f, gs = 0.0f;
      for (int j = 0; j < k; ++j) z += s[id[j]];
      z += 1e-20f;
      for (int j = 0; j < k; ++j) gs += g[j] * s[id[j]];
      for (int j = 0; j < k; ++j) ds[id[j]] += c * (g[j] / z - gs / (z * z));
    } else {
      for (int j = 0; j < k; ++j) ds[id[j]] += c * g[j];
    }
  }
  __syncthreads();
  float* o = dl + t * e;
  if (sigmoid) {
    for (int j = threadIdx.x; j < e; j += blockDim.x) {
      float v = ds[j] * s[j] * (1.0f - s[j]);
      o[j] = acc ? o[j] + v : v;
    }
  } else {
    double dot = 0.0;
    for (int j = threadIdx.x; j < e; j += blockDim.x) dot += double(ds[j]) * double(s[j]);
    dot = block_sum(dot);
    for (int j = threadIdx.x; j < e; j += blockDim.x) {
      float v = s[j] * (ds[j] - float(dot));
      o[j] = acc ? o[j] + v : v;
    }
  }
}

__global__ void sort_finish_kernel(const int32_t* order, int64_t n, int64_t k, int32_t* token) {
  int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r < n) token[r] = int32_t(order[r] / k);
}
__global__ void counts_kernel(const int32_t* off, int64_t e, int32_t* counts) {
  int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j < e) counts[j] = off[j + 1] - off[j];
}

// Indices outside the source rows (reported by the range check) read as zero rows.
// The row kernels below take W = 4 columns at a time (16-byte loads) when d % 4 == 0 and every
// base is 16-byte aligned, else W = 1; the arithmetic per element is the same either way.
// O: float, or __nv_bfloat16 for an output the op writes rounded (never accumulated).
template <int W, class O>
__global__ void gather_kernel(const float* src, int64_t rows, const int32_t* idx, const float* w, O* out, int64_t d,
                              bool acc) {
  int64_t i = blockIdx.x;
  const bool in = idx[i] >= 0 && idx[i] < rows;
  const float* s = src + (in ? int64_t(idx[i]) * d : 0);
  O* o = out + i * d;
  float wi = w ? w[i] : 1.0f;
  for (int64_t j = W * threadIdx.x; j < d; j += W * blockDim.x) {
    Floats<W> v = in ? load_w<W>(s + j) : Floats<W>{};  // not even row 0: src may have no rows
    const Floats<W> prev = acc ? load_w<W>(o + j) : Floats<W>{};
#pragma unroll
    for (int c = 0; c < W; ++c) {
      const float x = !in ? 0.0f : w ? wi * v.v[c] : v.v[c];
      v.v[c] = acc ? prev.v[c] + x : x;
    }
    store_w<W>(o + j, v);
  }
}
template <int W>
__global__ void scatter_kernel(const float* src, const int32_t* order, const int32_t* off, const float* w, float* out,
                               int64_t d) {
  int64_t r = blockIdx.x;
  int32_t lo = off[r], hi = off[r + 1];
  if (lo == hi) return;
  for (int64_t j = W * threadIdx.x; j < d; j += W * blockDim.x) {
    Floats<W> v = load_w<W>(out + r * d + j);
    for (int32_t q = lo; q < hi; ++q) {
      const int64_t i = order[q];
      const Floats<W> x = load_w<W>(src + i * d + j);
#pragma unroll
      for (int c = 0; c < W; ++c) v.v[c] += w ? w[i] * x.v[c] : x.v[c];
    }
    store_w<W>(out + r * d + j, v);
  }
}
// dw's dot product: each thread's columns in ascending order in double, then block_sum.
template <int W, class O>
__global__ void scatter_bwd_kernel(const float* dout, int64_t rows, const int32_t* idx, const float* src,
                                   const float* w, O* dsrc, float* dw, int64_t d, bool acc) {
  int64_t i = blockIdx.x;
  if (idx[i] < 0 || idx[i] >= rows) {  // reported by the range check; the row's outputs read as zero
    if (dw && threadIdx.x == 0 && !acc) dw[i] = 0.0f;
    if (dsrc && !acc)
      for (int64_t j = threadIdx.x; j < d; j += blockDim.x) dsrc[i * d + j] = O(0.0f);
    return;
  }
  const float* g = dout + int64_t(idx[i]) * d;
  const float* s = src + i * d;
  const float wi = w ? w[i] : 1.0f;
  O* o = dsrc ? dsrc + i * d : nullptr;
  double dot = 0.0;
  for (int64_t j = W * threadIdx.x; j < d; j += W * blockDim.x) {
    const Floats<W> gv = load_w<W>(g + j);
    if (dw) {
      const Floats<W> sv = load_w<W>(s + j);
#pragma unroll
      for (int c = 0; c < W; ++c) dot += double(gv.v[c]) * double(sv.v[c]);
    }
    if (o) {
      Floats<W> r = acc ? load_w<W>(o + j) : Floats<W>{};
#pragma unroll
      for (int c = 0; c < W; ++c) r.v[c] = acc ? r.v[c] + wi * gv.v[c] : wi * gv.v[c];
      store_w<W>(o + j, r);
    }
  }
  if (dw) {
    dot = block_sum(dot);
    if (threadIdx.x == 0) dw[i] = acc ? dw[i] + float(dot) : float(dot);
  }
}

void check_idx(const Tensor& idx, int64_t rows, const char* op) {
  check_range(idx.data<int32_t>(), idx.numel(), 0, rows, [rows, op](int64_t i, int32_t bad) {
    internal_error(op, ": idx[", i, "] = ", bad, " outside [0, ", rows, ")");
  });
}

}  // namespace

void CudaBackend::router(const RouterArgs& a) {
  validate(a);
  int64_t t = a.logits.dim(0), e = a.logits.dim(1);
  int ng = a.method != RouterMethod::Greedy ? a.n_group : 1;
  DSV3_CHECK(ng <= 64, "router on CUDA: n_group ", ng, " > 64");
  if (t == 0) return;
  const void* bias = present(a.bias) ? a.bias.raw() : nullptr;
  const bool sig = a.scoring == RouterScoring::Sigmoid;
  float* sc = ptr<float>(a.scores);
  int32_t* ids = ptr<int32_t>(a.ids);
  float* w = ptr<float>(a.weights);
  if (e > 1024) {
    router_serial_kernel<<<unsigned(t), 128, size_t(e) * 5, stream()>>>(
        a.logits.data<float>(), bias, a.bias.dtype(), sig, int(a.method), ng, a.topk_group, a.top_k,
        a.norm_topk_prob, a.routed_scaling_factor, int(e), sc, ids, w);
    check_launch("router");
    return;
  }
  const unsigned grid = unsigned((t + kRouterWarps - 1) / kRouterWarps);
  const size_t smem = size_t(kRouterWarps) * size_t(e + 64 + a.top_k) * sizeof(float);
  auto run = [&](auto kernel) {
    launch_pdl(kernel, dim3(grid), dim3(32 * kRouterWarps), smem, a.logits.data<float>(), bias, a.bias.dtype(), sig,
               int(a.method), ng, a.topk_group, a.top_k, a.norm_topk_prob, a.routed_scaling_factor, int(e), t, sc, ids,
               w);
  };
  if (e <= 32) run(router_warp_kernel<1>);
  else if (e <= 64) run(router_warp_kernel<2>);
  else if (e <= 128) run(router_warp_kernel<4>);
  else if (e <= 256) run(router_warp_kernel<8>);
  else if (e <= 512) run(router_warp_kernel<16>);
  else run(router_warp_kernel<32>);
  check_launch("router");
}

void CudaBackend::router_backward(const RouterBackwardArgs& a) {
  validate(a);
  int64_t t = a.scores.dim(0), e = a.scores.dim(1), k = a.ids.dim(1);
  if (t)
    router_bwd_kernel<<<unsigned(t), 128, size_t(e) * 4>>>(
        a.scores.data<float>(), a.ids.data<int32_t>(), a.dweights.data<float>(), a.scoring == RouterScoring::Sigmoid,
        a.norm_topk_prob, a.routed_scaling_factor, int(e), int(k), ptr<float>(a.dlogits), a.accumulate);
  check_launch("router_backward");
}

void CudaBackend::moe_sort(const MoeSortArgs& a) {
  validate(a);
  int64_t n = a.ids.numel(), k = a.ids.dim(1), e = a.n_experts;
  check_range(a.ids.data<int32_t>(), n, 0, e, [e](int64_t i, int32_t bad) {
    internal_error("moe_sort: expert id ", bad, " at ", i, " outside [0, ", e, ")");
  });
  Scratch off(size_t(e + 1) * 4);
  stable_bucket(a.ids.data<int32_t>(), n, e, ptr<int32_t>(a.pick), off.as<int32_t>());
  if (n) sort_finish_kernel<<<blocks_for(n), 256>>>(a.pick.data<int32_t>(), n, k, ptr<int32_t>(a.token));
  if (e) counts_kernel<<<blocks_for(e), 256>>>(off.as<int32_t>(), e, ptr<int32_t>(a.counts));
  check_launch("moe_sort");
}

void CudaBackend::gather_rows(const GatherRowsArgs& a) {
  validate(a);
  check_idx(a.idx, a.src.dim(0), "gather_rows");
  int64_t n = a.idx.numel(), d = a.src.dim(1);
  if (n == 0) return;
  const float* src = a.src.data<float>();
  const bool vec = d % 4 == 0 && all_aligned16({src, a.out.raw()});
  auto run = [&](auto* out, auto kernel) {
    kernel<<<unsigned(n), 128>>>(src, a.src.dim(0), a.idx.data<int32_t>(),
                                 present(a.weight) ? a.weight.data<float>() : nullptr, out, d, a.accumulate);
  };
  using B = __nv_bfloat16;
  if (a.out.dtype() == DType::BF16)
    run(ptr<B>(a.out), vec ? gather_kernel<4, B> : gather_kernel<1, B>);
  else
    run(ptr<float>(a.out), vec ? gather_kernel<4, float> : gather_kernel<1, float>);
  check_launch("gather_rows");
}

void CudaBackend::scatter_add_rows(const ScatterAddRowsArgs& a) {
  validate(a);
  int64_t r = a.out.dim(0), n = a.idx.numel(), d = a.src.dim(1);
  check_idx(a.idx, r, "scatter_add_rows");
  if (n == 0 || r == 0) return;
  Scratch order(size_t(n) * 4), off(size_t(r + 1) * 4);
  stable_bucket(a.idx.data<int32_t>(), n, r, order.as<int32_t>(), off.as<int32_t>());
  const float* src = a.src.data<float>();
  float* out = ptr<float>(a.out);
  auto* kernel = d % 4 == 0 && all_aligned16({src, out}) ? scatter_kernel<4> : scatter_kernel<1>;
  kernel<<<unsigned(r), 128>>>(src, order.as<int32_t>(), off.as<int32_t>(),
                               present(a.weight) ? a.weight.data<float>() : nullptr, out, d);
  check_launch("scatter_add_rows");
}

void CudaBackend::scatter_add_rows_backward(const ScatterAddRowsBackwardArgs& a) {
  validate(a);
  int64_t n = a.idx.numel(), d = a.src.dim(1);
  check_idx(a.idx, a.dout.dim(0), "scatter_add_rows_backward");
  if (n == 0) return;
  const float *dout = a.dout.data<float>(), *src = a.src.data<float>();
  const bool vec = d % 4 == 0 && all_aligned16({dout, src, present(a.dsrc) ? a.dsrc.raw() : nullptr});
  auto run = [&](auto* dsrc, auto kernel) {
    kernel<<<unsigned(n), 128>>>(dout, a.dout.dim(0), a.idx.data<int32_t>(), src,
                                 present(a.weight) ? a.weight.data<float>() : nullptr, dsrc,
                                 present(a.dweight) ? ptr<float>(a.dweight) : nullptr, d, a.accumulate);
  };
  using B = __nv_bfloat16;
  if (present(a.dsrc) && a.dsrc.dtype() == DType::BF16)
    run(ptr<B>(a.dsrc), vec ? scatter_bwd_kernel<4, B> : scatter_bwd_kernel<1, B>);
  else
    run(present(a.dsrc) ? ptr<float>(a.dsrc) : nullptr, vec ? scatter_bwd_kernel<4, float> : scatter_bwd_kernel<1, float>);
  check_launch("scatter_add_rows_backward");
}

}  // namespace dsv3
