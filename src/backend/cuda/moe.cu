// MoE on the GPU: the grouped router and its backward (one block per token; the few serial
// selection steps run in one thread, scores and outputs in all), sorting picks by expert, and the
// row gather / deterministic weighted scatter-add (a stable sort by destination row gives every
// output row its sources in ascending order, so no floating-point atomics are needed).
#include "backend/cuda/common.cuh"

namespace dsv3 {
using namespace cuda;

namespace {

// Index of the largest c[lo..hi) not yet taken; ties → lower index (torch.topk on the CPU).
__device__ int argmax_free(const float* c, const unsigned char* taken, int lo, int hi) {
  int best = -1;
  for (int j = lo; j < hi; ++j)
    if (!taken[j] && (best < 0 || c[j] > c[best])) best = j;
  return best;
}

__global__ void router_kernel(const float* logits, const void* bias, DType bt, bool sigmoid, int method, int ng,
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

__global__ void gather_kernel(const float* src, const int32_t* idx, const float* w, float* out, int64_t d, bool acc) {
  int64_t i = blockIdx.x;
  const float* s = src + int64_t(idx[i]) * d;
  float* o = out + i * d;
  float wi = w ? w[i] : 1.0f;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    float v = w ? wi * s[j] : s[j];
    o[j] = acc ? o[j] + v : v;
  }
}
__global__ void scatter_kernel(const float* src, const int32_t* order, const int32_t* off, const float* w, float* out,
                               int64_t d) {
  int64_t r = blockIdx.x;
  int32_t lo = off[r], hi = off[r + 1];
  if (lo == hi) return;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    float v = out[r * d + j];
    for (int32_t q = lo; q < hi; ++q) {
      int64_t i = order[q];
      v += w ? w[i] * src[i * d + j] : src[i * d + j];
    }
    out[r * d + j] = v;
  }
}
__global__ void scatter_bwd_kernel(const float* dout, const float* src, const int32_t* idx, const float* w,
                                   float* dsrc, float* dw, int64_t d, bool acc) {
  int64_t i = blockIdx.x;
  const float* g = dout + int64_t(idx[i]) * d;
  const float* s = src + i * d;
  if (dw) {
    double dot = 0.0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) dot += double(g[j]) * double(s[j]);
    dot = block_sum(dot);
    if (threadIdx.x == 0) dw[i] = acc ? dw[i] + float(dot) : float(dot);
  }
  if (dsrc) {
    float wi = w ? w[i] : 1.0f;
    float* o = dsrc + i * d;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) o[j] = acc ? o[j] + wi * g[j] : wi * g[j];
  }
}

void check_idx(const Tensor& idx, int64_t rows, const char* op) {
  int32_t bad = 0;
  int64_t i = first_out_of_range(idx.data<int32_t>(), idx.numel(), 0, rows, &bad);
  if (i >= 0) internal_error(op, ": idx[", i, "] = ", bad, " outside [0, ", rows, ")");
}

}  // namespace

void CudaBackend::router(const RouterArgs& a) {
  validate(a);
  int64_t t = a.logits.dim(0), e = a.logits.dim(1);
  int ng = a.method != RouterMethod::Greedy ? a.n_group : 1;
  DSV3_CHECK(ng <= 64, "router on CUDA: n_group ", ng, " > 64");
  size_t smem = size_t(e) * 5;
  if (t)
    router_kernel<<<unsigned(t), 128, smem>>>(a.logits.data<float>(), present(a.bias) ? a.bias.raw() : nullptr,
                                              a.bias.dtype(), a.scoring == RouterScoring::Sigmoid, int(a.method), ng,
                                              a.topk_group, a.top_k, a.norm_topk_prob, a.routed_scaling_factor, int(e),
                                              ptr<float>(a.scores), ptr<int32_t>(a.ids), ptr<float>(a.weights));
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
  int32_t bad = 0;
  int64_t i = first_out_of_range(a.ids.data<int32_t>(), n, 0, e, &bad);
  if (i >= 0) internal_error("moe_sort: expert id ", bad, " at ", i, " outside [0, ", e, ")");
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
  if (n)
    gather_kernel<<<unsigned(n), 128>>>(a.src.data<float>(), a.idx.data<int32_t>(),
                                        present(a.weight) ? a.weight.data<float>() : nullptr, ptr<float>(a.out), d,
                                        a.accumulate);
  check_launch("gather_rows");
}

void CudaBackend::scatter_add_rows(const ScatterAddRowsArgs& a) {
  validate(a);
  int64_t r = a.out.dim(0), n = a.idx.numel(), d = a.src.dim(1);
  check_idx(a.idx, r, "scatter_add_rows");
  if (n == 0 || r == 0) return;
  Scratch order(size_t(n) * 4), off(size_t(r + 1) * 4);
  stable_bucket(a.idx.data<int32_t>(), n, r, order.as<int32_t>(), off.as<int32_t>());
  scatter_kernel<<<unsigned(r), 128>>>(a.src.data<float>(), order.as<int32_t>(), off.as<int32_t>(),
                                       present(a.weight) ? a.weight.data<float>() : nullptr, ptr<float>(a.out), d);
  check_launch("scatter_add_rows");
}

void CudaBackend::scatter_add_rows_backward(const ScatterAddRowsBackwardArgs& a) {
  validate(a);
  int64_t n = a.idx.numel(), d = a.src.dim(1);
  check_idx(a.idx, a.dout.dim(0), "scatter_add_rows_backward");
  if (n)
    scatter_bwd_kernel<<<unsigned(n), 128>>>(a.dout.data<float>(), a.src.data<float>(), a.idx.data<int32_t>(),
                                             present(a.weight) ? a.weight.data<float>() : nullptr,
                                             present(a.dsrc) ? ptr<float>(a.dsrc) : nullptr,
                                             present(a.dweight) ? ptr<float>(a.dweight) : nullptr, d, a.accumulate);
  check_launch("scatter_add_rows_backward");
}

}  // namespace dsv3
