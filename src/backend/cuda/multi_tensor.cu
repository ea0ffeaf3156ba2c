// The optimizer's per-parameter ops over many tensors (ops.h *_many) in one launch each: a table of
// tensors is walked in fixed chunks, a chunk's tensor found by binary search over the chunks' starts.
// One launch per tensor cost more than the work at bench-0.7b (~1,200 parameter tensors, four ops
// per step). The single AdamW goes through the same kernel, so both compute every element alike.
#include <cmath>
#include <vector>

#include "backend/cuda/common.cuh"

namespace dsv3 {
using namespace cuda;

namespace {

constexpr int64_t kChunk = 8192;

struct AdamwItem {
  float* p;
  const float* g;
  void* m;
  void* v;
  int64_t n, first;
  float b1, b2, eps, gs, decay, step_size, bc2_sqrt;
  bool mb, vb, vec;  // vec: every array aligned to 4 elements (apply4)
  void* copy;        // param_copy (F32 or BF16, copy_bf16), or null
  bool copy_bf16;
  // Element i of an F32 or BF16 array (stores rounded to nearest even).
  static __device__ float load1(const void* a, bool bf, int64_t i) {
    return bf ? __bfloat162float(static_cast<const __nv_bfloat16*>(a)[i]) : static_cast<const float*>(a)[i];
  }
  static __device__ void store1(void* a, bool bf, int64_t i, float x) {
    if (bf) static_cast<__nv_bfloat16*>(a)[i] = __float2bfloat16_rn(x);
    else static_cast<float*>(a)[i] = x;
  }
  // One element: m, v and p from the gradient (p, m, v updated in place).
  __device__ void update(float gr, float& pi, float& mi, float& vi) const {
    const float gi = gr * gs;
    mi = b1 * mi + (1.0f - b1) * gi;
    vi = b2 * vi + (1.0f - b2) * gi * gi;
    pi = pi * decay - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
  }
  __device__ void apply(int64_t i) const {
    float mi = load1(m, mb, i), vi = load1(v, vb, i), pi = p[i];
    update(g[i], pi, mi, vi);
    p[i] = pi;
    store1(m, mb, i, mi);
    store1(v, vb, i, vi);
    if (copy) store1(copy, copy_bf16, i, pi);
  }
  // Four F32 (one 16-byte access) or BF16 (one 8-byte access) values from element i on.
  static __device__ float4 load4(const void* a, bool bf, int64_t i) {
    if (!bf) return static_cast<const float4*>(a)[i / 4];
    const uint2 u = static_cast<const uint2*>(a)[i / 4];
    const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
    const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
    return make_float4(lo.x, lo.y, hi.x, hi.y);
  }
  static __device__ void store4(void* a, bool bf, int64_t i, float4 x) {
    if (!bf) {
      static_cast<float4*>(a)[i / 4] = x;
      return;
    }
    const __nv_bfloat162 lo = __floats2bfloat162_rn(x.x, x.y), hi = __floats2bfloat162_rn(x.z, x.w);
    static_cast<uint2*>(a)[i / 4] =
        make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
  }
  // Elements i..i + 3 by vector loads and stores (the optimizer pass is memory-bound); each
  // element's arithmetic and rounding are apply's.
  __device__ void apply4(int64_t i) const {
    float4 pv = reinterpret_cast<const float4*>(p)[i / 4], mv = load4(m, mb, i), vv = load4(v, vb, i);
    const float4 gv = reinterpret_cast<const float4*>(g)[i / 4];
    update(gv.x, pv.x, mv.x, vv.x);
    update(gv.y, pv.y, mv.y, vv.y);
    update(gv.z, pv.z, mv.z, vv.z);
    update(gv.w, pv.w, mv.w, vv.w);
    reinterpret_cast<float4*>(p)[i / 4] = pv;
    store4(m, mb, i, mv);
    store4(v, vb, i, vv);
    if (copy) store4(copy, copy_bf16, i, pv);
  }
};

struct FillItem {
  void* x;
  DType t;
  float value;
  int64_t n, first;
  __device__ void apply(int64_t i) const { store_f(x, t, i, value); }
};

struct CopyItem {
  const void* s;
  void* d;
  DType st, dt;
  int64_t n, first;
  bool vec;  // F32 → BF16 (the trainer's weight copies), 16- and 8-byte aligned: apply4
  __device__ void apply(int64_t i) const { store_f(d, dt, i, load_f(s, st, i)); }
  __device__ void apply4(int64_t i) const {
    const float4 x = static_cast<const float4*>(s)[i / 4];
    const __nv_bfloat162 lo = __floats2bfloat162_rn(x.x, x.y), hi = __floats2bfloat162_rn(x.z, x.w);
    static_cast<uint2*>(d)[i / 4] =
        make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
  }
};

struct SumsqItem {
  const float* x;
  int64_t n, first;
};

// The item whose chunks include chunk c (items sorted by first chunk).
template <class Item> __device__ const Item& item_of(const Item* items, int count, int64_t c) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (items[mid].first <= c) lo = mid;
    else hi = mid - 1;
  }
  return items[lo];
}

template <class Item> __global__ void for_each_kernel(const Item* items, int count, int64_t chunks) {
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const Item& it = item_of(items, count, c);
    const int64_t b = (c - it.first) * kChunk, e = b + kChunk < it.n ? b + kChunk : it.n;
    int64_t i = b + threadIdx.x;
    if constexpr (requires { it.apply4(b); }) {
      if (it.vec) {  // b is a multiple of kChunk, so of 4
        const int64_t e4 = b + (e - b) / 4 * 4;
        for (int64_t j = b + 4 * int64_t(threadIdx.x); j < e4; j += 4 * int64_t(blockDim.x)) it.apply4(j);
        i = e4 + threadIdx.x;
      }
    }
    for (; i < e; i += blockDim.x) it.apply(i);
  }
}

__global__ void sumsq_chunks_kernel(const SumsqItem* items, int count, int64_t chunks, double* part) {
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const SumsqItem& it = item_of(items, count, c);
    const int64_t b = (c - it.first) * kChunk, e = b + kChunk < it.n ? b + kChunk : it.n;
    double s = 0.0;
    for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) s += double(it.x[i]) * double(it.x[i]);
    s = block_sum(s);
    if (threadIdx.x == 0) part[c] = s;
  }
}
// The chunks' partial sums in chunk order (deterministic), rounded once.
__global__ void sumsq_total_kernel(const double* part, int64_t chunks, float* out, bool acc) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < chunks; i += blockDim.x) s += part[i];
  s = block_sum(s);
  if (threadIdx.x == 0) out[0] = acc ? float(double(out[0]) + s) : float(s);
}

// Numbers the items' chunks (dropping empty tensors), uploads the table and returns the chunk count.
template <class Item> int64_t upload(std::vector<Item>& items, Scratch& table) {
  std::erase_if(items, [](const Item& it) { return it.n == 0; });
  int64_t chunks = 0;
  for (Item& it : items) {
    it.first = chunks;
    chunks += (it.n + kChunk - 1) / kChunk;
  }
  if (chunks)  // pageable source: staged before the call returns, so `items` may go
    DSV3_CUDA_CHECK(cudaMemcpyAsync(table.as<void>(), items.data(), items.size() * sizeof(Item),
                                    cudaMemcpyHostToDevice, 0));
  return chunks;
}

unsigned grid_for(int64_t chunks) { return unsigned(std::min<int64_t>(chunks, int64_t(sm_count()) * 8)); }

template <class Item> void run(std::vector<Item>& items, const char* op) {
  Scratch table(std::max<size_t>(1, items.size() * sizeof(Item)));
  const int64_t chunks = upload(items, table);
  if (chunks == 0) return;
  for_each_kernel<Item><<<grid_for(chunks), 256>>>(table.as<Item>(), int(items.size()), chunks);
  check_launch(op);
}

}  // namespace

void CudaBackend::adamw(const AdamWArgs& a) { adamw_many(std::span<const AdamWArgs>(&a, 1)); }

void CudaBackend::adamw_many(std::span<const AdamWArgs> args) {
  std::vector<AdamwItem> items;
  items.reserve(args.size());
  for (const AdamWArgs& a : args) {
    validate(a);
    const double bc1 = 1.0 - std::pow(double(a.beta1), double(a.step));
    const double bc2 = 1.0 - std::pow(double(a.beta2), double(a.step));
    const bool mb = a.m.dtype() == DType::BF16, vb = a.v.dtype() == DType::BF16;
    const bool has_copy = present(a.param_copy), copy_bf16 = has_copy && a.param_copy.dtype() == DType::BF16;
    auto aligned4 = [](const Tensor& t, bool bf) { return reinterpret_cast<uintptr_t>(t.raw()) % (bf ? 8 : 16) == 0; };
    const bool vec = aligned16(a.param.raw()) && aligned16(a.grad.raw()) && aligned4(a.m, mb) && aligned4(a.v, vb) &&
                     (!has_copy || aligned4(a.param_copy, copy_bf16));
    items.push_back({ptr<float>(a.param), a.grad.data<float>(), ptr<void>(a.m), ptr<void>(a.v), a.param.numel(), 0,
                     a.beta1, a.beta2, a.eps, a.grad_scale, 1.0f - a.lr * a.weight_decay, float(double(a.lr) / bc1),
                     float(std::sqrt(bc2)), mb, vb, vec, has_copy ? ptr<void>(a.param_copy) : nullptr, copy_bf16});
  }
  run(items, "adamw");
}

void CudaBackend::fill_many(std::span<const FillArgs> args) {
  std::vector<FillItem> items;
  for (const FillArgs& a : args) {
    validate(a);
    if (a.x.dtype() == DType::I32) fill(a);  // not a float store
    else items.push_back({ptr<void>(a.x), a.x.dtype(), a.value, a.x.numel(), 0});
  }
  run(items, "fill_many");
}

void CudaBackend::copy_many(std::span<const CopyArgs> args) {
  std::vector<CopyItem> items;
  for (const CopyArgs& a : args) {
    validate(a);
    if (a.src.dtype() == a.dst.dtype() || a.src.dtype() == DType::I32 || a.dst.dtype() == DType::I32)
      copy(a);  // bytes as they are (a float round trip would narrow F64 and touch NaN payloads)
    else
      items.push_back({a.src.raw(), ptr<void>(a.dst), a.src.dtype(), a.dst.dtype(), a.src.numel(), 0,
                       a.src.dtype() == DType::F32 && a.dst.dtype() == DType::BF16 && aligned16(a.src.raw()) &&
                           reinterpret_cast<uintptr_t>(a.dst.raw()) % 8 == 0});
  }
  run(items, "copy_many");
}

void CudaBackend::sum_squares_many(std::span<const Tensor> xs, const Tensor& out, bool accumulate) {
  std::vector<SumsqItem> items;
  for (const Tensor& x : xs) {
    validate(SumSquaresArgs{x, out, accumulate});
    items.push_back({x.data<float>(), x.numel(), 0});
  }
  Scratch table(std::max<size_t>(1, items.size() * sizeof(SumsqItem)));
  const int64_t chunks = upload(items, table);
  Scratch part(size_t(std::max<int64_t>(chunks, 1)) * sizeof(double));
  if (chunks)
    sumsq_chunks_kernel<<<grid_for(chunks), 256>>>(table.as<SumsqItem>(), int(items.size()), chunks,
                                                   part.as<double>());
  sumsq_total_kernel<<<1, 256>>>(part.as<double>(), chunks, ptr<float>(out), accumulate);
  check_launch("sum_squares_many");
}

}  // namespace dsv3
