// grouped_linear, and linear with a BF16 weight as its one-block case: F32 x against BF16 weights on
// tensor cores. x is split into two BF16 terms once (16 bits of x; products of BF16 values are exact
// in FP32, so y = W·hi + W·lo is in tolerances.md's kF32 class, as the decode GEMVs'), every block
// cut into chunks of at most `chunk` rows, each (chunk, term) one matmul of a cuBLASLt pointer-array
// batch into its own [chunk, N] slice of scratch (K beyond 2,048 in slices, one batch each, added
// in F32), and one kernel adds each row's two products into y. A bench-0.7b prefill of 4,096
// tokens ran its experts as ~100 linears per layer (split, matmul, add each: ~3,900 launches and
// ~1,150 cuBLASLt calls, whose host time bounded the step); here a projection is one split, one
// matmul per K slice and one add. Widening the weights for SGEMM instead made that
// prefill's linears run at ~30 TFLOP/s.
#include <algorithm>
#include <climits>
#include <cstring>
#include <vector>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/lt_gemm.h"
#include "backend/cuda/stream.h"

namespace dsv3 {
using namespace cuda;

namespace {

// y[r] = (acc ? y[r] + hi : hi) + lo, the two products of row r: in chunk j (starts[j] ≤ r <
// starts[j + 1]) at row j·chunk + r − starts[j] of the hi and lo slices. One CTA per row (grid-stride).
__global__ void add_chunk_halves_kernel(const float4* hi, const float4* lo, const int32_t* starts, int chunks,
                                        int64_t chunk, int64_t rows, int64_t n4, float4* y, bool acc) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    int lo_j = 0, hi_j = chunks - 1;  // the last chunk starting at or before r
    while (lo_j < hi_j) {
      const int mid = (lo_j + hi_j + 1) / 2;
      if (starts[mid] <= r)
        lo_j = mid;
      else
        hi_j = mid - 1;
    }
    const int64_t src = (int64_t(lo_j) * chunk + (r - starts[lo_j])) * n4;
    for (int64_t c = threadIdx.x; c < n4; c += blockDim.x) {
      const float4 t = hi[src + c], b = lo[src + c];
      float4 v = t;
      if (acc) {
        const float4 o = y[r * n4 + c];
        v = make_float4(o.x + t.x, o.y + t.y, o.z + t.z, o.w + t.w);
      }
      y[r * n4 + c] = make_float4(v.x + b.x, v.y + b.y, v.z + b.z, v.w + b.w);
    }
  }
}

// The chunk height: among multiples of 64 (at least 128, or the largest block rounded up to 16 when
// smaller), the one with the fewest padded rows, a chunk costing 64 rows more (a matmul's fixed
// share). Blocks larger than the chunk take several chunks.
int64_t chunk_rows(std::span<const int64_t> counts) {
  const int64_t mx = *std::max_element(counts.begin(), counts.end());
  if (mx <= 128) return (mx + 15) / 16 * 16;
  int64_t best = 0, best_cost = 0;
  for (int64_t c = 128; c < mx + 64; c += 64) {
    int64_t cost = 0;
    for (int64_t n : counts)
      if (n > 0) cost += ((n + c - 1) / c) * (c + 64);
    if (best == 0 || cost < best_cost) {
      best = c;
      best_cost = cost;
    }
  }
  return best;
}

constexpr int64_t kSliceK = 2048;  // columns per matmul (a multiple of 8: 16-byte aligned slices)

uint32_t align_bytes(uintptr_t p) {
  uint32_t a = 256;
  while (a > 1 && (p & (a - 1))) a >>= 1;
  return a;
}

}  // namespace

bool cuda::split_bf16_grouped(const GroupedLinearArgs& a) {
  const int64_t M = a.x.dim(0), N = a.w[0].dim(0), K = a.w[0].dim(1);
  if (a.w[0].dtype() != DType::BF16 || K == 0 || K % 8 != 0 || N % 4 != 0 || M > INT32_MAX || !aligned16(a.y.raw()))
    return false;
  for (const Tensor& w : a.w)
    if (!aligned16(w.raw())) return false;
  std::vector<int64_t> counts(a.w.size());
  for (size_t e = 0; e < a.w.size(); ++e) counts[e] = a.offsets[e + 1] - a.offsets[e];
  const int64_t chunk = chunk_rows(counts);
  // Chunks in row order: (first row, weight).
  std::vector<int32_t> starts;
  std::vector<const void*> weights;
  for (size_t e = 0; e < a.w.size(); ++e)
    for (int64_t r = a.offsets[e]; r < a.offsets[e + 1]; r += chunk) {
      starts.push_back(int32_t(r));
      weights.push_back(a.w[e].raw());
    }
  const int64_t J = int64_t(starts.size());
  const int64_t slack = std::max<int64_t>(0, starts.back() + chunk - M);  // rows a chunk reads past x
  starts.push_back(int32_t(M));
  // K in slices of at most kSliceK columns, each slice's products added into the last's by the
  // matmul's epilogue (beta 1, F32). The tensor cores' accumulation within one matmul loses more
  // than round-to-nearest F32 over long K (V3's kv_a_proj, K 7168, in one matmul: 1.07e-5 of max|y|
  // against kF32's 1e-5); a slice keeps each chain to the length the decode GEMVs are checked at.
  const int64_t S = (K + kSliceK - 1) / kSliceK;
  // Device scratch: x's terms [M + slack, K] each (the last chunk may read past the last row: the
  // slack is zeroed, its products unused), the products [J·chunk, N] per term, then the pointer
  // arrays (C: 2J, then per slice A and B: 2J each; in each the hi terms' matmuls, then the lo
  // terms') and the chunk starts.
  auto up256 = [](size_t b) { return (b + 255) / 256 * 256; };
  const size_t term_bytes = up256(size_t((M + slack) * K) * 2), prod_bytes = up256(size_t(J * chunk * N) * 4);
  const size_t n_ptrs = size_t(2 * J + 4 * J * S);
  const size_t table_bytes = n_ptrs * sizeof(void*) + starts.size() * sizeof(int32_t);
  Scratch buf(2 * term_bytes + 2 * prod_bytes + table_bytes);
  char* base = buf.as<char>();
  __nv_bfloat16* hi = reinterpret_cast<__nv_bfloat16*>(base);
  __nv_bfloat16* lo = reinterpret_cast<__nv_bfloat16*>(base + term_bytes);
  float* prod_hi = reinterpret_cast<float*>(base + 2 * term_bytes);
  float* prod_lo = reinterpret_cast<float*>(base + 2 * term_bytes + prod_bytes);
  char* table = base + 2 * term_bytes + 2 * prod_bytes;
  std::vector<const void*> ptrs(n_ptrs);
  uint32_t align = 256;
  for (int64_t j = 0; j < J; ++j) {
    const int64_t r = starts[size_t(j)];
    const void* c[2] = {prod_hi + j * chunk * N, prod_lo + j * chunk * N};
    for (int t = 0; t < 2; ++t) {
      ptrs[size_t(t * J + j)] = c[t];
      align = std::min(align, align_bytes(reinterpret_cast<uintptr_t>(c[t])));
    }
    for (int64_t sl = 0; sl < S; ++sl) {
      const int64_t k0 = sl * kSliceK;
      const void* v[4] = {hi + r * K + k0, lo + r * K + k0, static_cast<const __nv_bfloat16*>(weights[size_t(j)]) + k0,
                          static_cast<const __nv_bfloat16*>(weights[size_t(j)]) + k0};
      void const** p = ptrs.data() + 2 * J + 4 * J * sl;
      for (int t = 0; t < 2; ++t) {
        p[t * J + j] = v[t];              // A (our x's term)
        p[2 * J + t * J + j] = v[2 + t];  // B (the weight)
      }
      for (const void* q : v) align = std::min(align, align_bytes(reinterpret_cast<uintptr_t>(q)));
    }
  }
  const cudaStream_t s = stream();
  std::vector<char> host(table_bytes);
  std::memcpy(host.data(), ptrs.data(), ptrs.size() * sizeof(void*));
  std::memcpy(host.data() + ptrs.size() * sizeof(void*), starts.data(), starts.size() * sizeof(int32_t));
  DSV3_CUDA_CHECK(cudaMemcpyAsync(table, host.data(), table_bytes, cudaMemcpyHostToDevice, s));
  const int32_t* d_starts = reinterpret_cast<const int32_t*>(table + ptrs.size() * sizeof(void*));
  f32_split_bf16(a.x.data<float>(), M, K, K, hi, lo);
  if (slack > 0) {
    DSV3_CUDA_CHECK(cudaMemsetAsync(hi + M * K, 0, size_t(slack * K) * 2, s));
    DSV3_CUDA_CHECK(cudaMemsetAsync(lo + M * K, 0, size_t(slack * K) * 2, s));
  }
  for (int64_t sl = 0; sl < S; ++sl) {
    const char* p = table + (2 * J + 4 * J * sl) * sizeof(void*);
    LtMatmul g = lt_row_major(false, true, chunk, N, std::min(kSliceK, K - sl * kSliceK), p, K,
                              p + 2 * J * sizeof(void*), K, table, N, sl > 0);
    g.batch = 2 * J;
    g.pointer_array = true;
    g.align = align;
    if (!lt_try_matmul(g)) return false;  // no algorithm: y untouched, the caller runs linear per block
  }
  const int64_t n4 = N / 4;
  add_chunk_halves_kernel<<<unsigned(std::min<int64_t>(M, int64_t(sm_count()) * 32)), 128, 0, s>>>(
      reinterpret_cast<const float4*>(prod_hi), reinterpret_cast<const float4*>(prod_lo), d_starts, int(J), chunk, M,
      n4, reinterpret_cast<float4*>(ptr<float>(a.y)), a.accumulate);
  check_launch("grouped_linear: adding the split terms' products");
  return true;
}

void CudaBackend::grouped_linear(const GroupedLinearArgs& a) {
  validate(a);
  if (a.w.empty() || a.x.dim(0) == 0) return;
  if (!split_bf16_grouped(a)) Backend::grouped_linear(a);
}

}  // namespace dsv3
