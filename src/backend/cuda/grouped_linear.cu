// grouped_linear, and linear with a BF16 or FP8 weight as its one-block case: F32 x against BF16
// weights on tensor cores. x is split into two BF16 terms once (16 bits of x; products of BF16
// values are exact in FP32, so y = W·hi + W·lo is in tolerances.md's kF32 class, as the decode
// GEMVs'), and each term's product is a cuBLASLt matmul adding into the last in F32 (beta 1). A
// linear's matmuls write y itself; blocks are cut into chunks of at most `chunk` rows, each
// (chunk, term) one matmul of a pointer-array batch into the chunk's [chunk, N] slice of scratch
// (K beyond 2,048 in slices, one batch per term and slice), and one kernel moves each row's
// product into y. A bench-0.7b prefill of 4,096 tokens ran its experts as ~100 linears per layer
// (split, matmul, add each: ~3,900 launches and ~1,150 cuBLASLt calls, whose host time bounded the
// step); here a projection is one split, two batches per K slice and one move. Widening the weights
// for SGEMM instead made that prefill's linears run at ~30 TFLOP/s. FP8 weights (128×128 block
// scales) are written as two BF16 terms each, hi and lo of the dequantized F32 value, for one more
// matmul batch (x_hi·W_lo).
#include <algorithm>
#include <climits>
#include <cstring>
#include <vector>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/lt_gemm.h"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/stream.h"

namespace dsv3 {
using namespace cuda;

namespace {

// y[r] = (acc ? y[r] : 0) + p, p row r's product: in chunk j (starts[j] ≤ r < starts[j + 1]) at row
// j·chunk + r − starts[j] of prod. One CTA per row (grid-stride).
__global__ void gather_chunk_rows_kernel(const float4* prod, const int32_t* starts, int chunks, int64_t chunk,
                                         int64_t rows, int64_t n4, float4* y, bool acc) {
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
      const float4 v = prod[src + c];
      if (acc) {
        const float4 o = y[r * n4 + c];
        y[r * n4 + c] = make_float4(o.x + v.x, o.y + v.y, o.z + v.z, o.w + v.w);
      } else {
        y[r * n4 + c] = v;
      }
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

// Columns per matmul: K in S slices of at most kMaxSliceK, equal ones where K allows (a multiple of
// 128 dividing K, S ≤ s < 2S slices: every slice's base 256-byte aligned, so all of a linear's
// matmuls share one cuBLASLt plan key), else kMaxSliceK and the rest last.
constexpr int64_t kMaxSliceK = 2048;
int64_t slice_k(int64_t K) {
  const int64_t S = (K + kMaxSliceK - 1) / kMaxSliceK;
  if (S == 1) return K;
  for (int64_t s = S; s < 2 * S; ++s)
    if (K % s == 0 && (K / s) % 128 == 0) return K / s;
  return kMaxSliceK;
}

uint32_t align_bytes(uintptr_t p) {
  uint32_t a = 256;
  while (a > 1 && (p & (a - 1))) a >>= 1;
  return a;
}

// FP8 weights as two BF16 terms each: v = e4m3·scale in F32 (the CPU's dequantized value, as
// dequantize_fp8_blocks rounds it), hi = bf16(v), lo = bf16(v − hi), |v − hi − lo| ≤ 2⁻¹⁶|v|
// (split_bf16x2). Weight blockIdx.y of the table into slot blockIdx.y of hi and lo (`slot` elements
// apart); eight columns (inside one 128-column scale block) per thread and pass, rows over the CTAs.
constexpr int kMaxFp8Run = 64;  // weights per launch (the table goes as a kernel parameter)
struct Fp8Table {
  const uint8_t* q[kMaxFp8Run];
  const float* s[kMaxFp8Run];
};
__global__ void fp8_split_bf16_kernel(const __grid_constant__ Fp8Table t, int64_t N, int64_t K, int64_t slot,
                                      __nv_bfloat16* hi, __nv_bfloat16* lo) {
  const uint8_t* q = t.q[blockIdx.y];
  const float* scale = t.s[blockIdx.y];
  const int64_t base = int64_t(blockIdx.y) * slot, k8 = K / 8, lds = (K + 127) / 128;
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const float* srow = scale + (r / 128) * lds;
    for (int64_t c8 = threadIdx.x; c8 < k8; c8 += blockDim.x) {
      const uint2 v = *reinterpret_cast<const uint2*>(q + r * K + 8 * c8);
      const float sc = srow[(8 * c8) / 128];
      const uint32_t w[2] = {v.x, v.y};
      uint32_t h[4], l[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t two = (w[i / 2] >> (16 * (i % 2))) & 0xffffu;
        const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(two), __NV_E4M3)));
        split_bf16x2(f.x * sc, f.y * sc, h[i], l[i]);
      }
      const int64_t o = base + r * K + 8 * c8;
      *reinterpret_cast<uint4*>(hi + o) = make_uint4(h[0], h[1], h[2], h[3]);
      *reinterpret_cast<uint4*>(lo + o) = make_uint4(l[0], l[1], l[2], l[3]);
    }
  }
}

size_t& fp8_terms_budget() {
  static size_t bytes = size_t(256) << 20;
  return bytes;
}

// The matmuls for blocks whose weights are BF16 terms: w_hi[e] (and, for FP8, w_lo[e]: x_hi·w_lo
// added too; x_lo·w_lo, ≤ 2⁻¹⁸ of each |w·x|, is left out), offsets from 0 to x's rows. Every
// product after the first adds into the sum so far in the matmul's F32 epilogue (beta 1), K in
// slices (slice_k): the tensor cores' accumulation within one matmul loses more than
// round-to-nearest F32 over long K (V3's kv_a_proj, K 7168, in one matmul: 1.07e-5 of max|y|
// against kF32's 1e-5); a slice keeps each chain to the length the decode GEMVs are checked at.
// False, y untouched, when cuBLASLt has no algorithm.
bool split_core(const Tensor& x, std::span<const int64_t> offsets, std::span<const void* const> w_hi,
                std::span<const void* const> w_lo, int64_t N, const Tensor& y, bool accumulate) {
  const int64_t M = x.dim(0), K = x.dim(1), ks = slice_k(K), S = (K + ks - 1) / ks;
  const bool two_w = !w_lo.empty();
  const int terms = two_w ? 3 : 2;  // per slice: x_hi·w_hi, x_lo·w_hi (and x_hi·w_lo)
  const cudaStream_t s = stream();
  auto up256 = [](size_t b) { return (b + 255) / 256 * 256; };
  if (w_hi.size() == 1 && K % ks == 0) {
    // One block (a linear) whose slices share a shape: every matmul straight into y. Only the first
    // can find no algorithm (the rest are its shape, its plan), so y is untouched when it does. The
    // two products to scratch and an add kernel before cost the bench-0.7b batch-32 prefill no
    // measurable time with BF16 weights and 3% with FP8 ones (three products; docs/cuda.md).
    const size_t term_bytes = up256(size_t(M * K) * 2);
    Scratch buf(2 * term_bytes);
    auto* hi = buf.as<__nv_bfloat16>();
    auto* lo = reinterpret_cast<__nv_bfloat16*>(buf.as<char>() + term_bytes);
    f32_split_bf16(x.data<float>(), M, K, K, hi, lo);
    const auto* wh = static_cast<const __nv_bfloat16*>(w_hi[0]);
    const auto* wl = two_w ? static_cast<const __nv_bfloat16*>(w_lo[0]) : wh;
    const __nv_bfloat16* a[3] = {hi, lo, hi};
    const __nv_bfloat16* b[3] = {wh, wh, wl};
    for (int64_t sl = 0; sl < S; ++sl)
      for (int t = 0; t < terms; ++t) {
        const bool first = sl == 0 && t == 0;
        const int64_t k0 = sl * ks;
        if (lt_try_matmul(lt_row_major(false, true, M, N, ks, a[t] + k0, K, b[t] + k0, K, ptr<float>(y), N,
                                       accumulate || !first)))
          continue;
        if (first) return false;
        internal_error("grouped_linear: cuBLASLt has no algorithm for a ", M, "×", ks, " · ", ks, "×", N,
                       " matmul after running one of that shape");
      }
    return true;
  }
  std::vector<int64_t> counts(w_hi.size());
  for (size_t e = 0; e < w_hi.size(); ++e) counts[e] = offsets[e + 1] - offsets[e];
  const int64_t chunk = chunk_rows(counts);
  // Chunks in row order: (first row, block).
  std::vector<int32_t> starts;
  std::vector<size_t> block;
  for (size_t e = 0; e < w_hi.size(); ++e)
    for (int64_t r = offsets[e]; r < offsets[e + 1]; r += chunk) {
      starts.push_back(int32_t(r));
      block.push_back(e);
    }
  const int64_t J = int64_t(starts.size());
  const int64_t slack = std::max<int64_t>(0, starts.back() + chunk - M);  // rows a chunk reads past x
  starts.push_back(int32_t(M));
  // Device scratch: x's terms [M + slack, K] each (the last chunk may read past the last row: the
  // slack is zeroed, its products unused), the products [J·chunk, N], then the pointer arrays (C:
  // J; per slice, A: the hi terms' J then the lo terms', B: the w_hi J and the w_lo J) and the
  // chunk starts.
  const size_t term_bytes = up256(size_t((M + slack) * K) * 2), prod_bytes = up256(size_t(J * chunk * N) * 4);
  const int64_t per_slice = (two_w ? 4 : 3) * J;
  const size_t n_ptrs = size_t(J + per_slice * S);
  const size_t table_bytes = n_ptrs * sizeof(void*) + starts.size() * sizeof(int32_t);
  Scratch buf(2 * term_bytes + prod_bytes + table_bytes);
  char* base = buf.as<char>();
  __nv_bfloat16* hi = reinterpret_cast<__nv_bfloat16*>(base);
  __nv_bfloat16* lo = reinterpret_cast<__nv_bfloat16*>(base + term_bytes);
  float* prod = reinterpret_cast<float*>(base + 2 * term_bytes);
  char* table = base + 2 * term_bytes + prod_bytes;
  std::vector<const void*> ptrs(n_ptrs);
  uint32_t align = 256;
  for (int64_t j = 0; j < J; ++j) {
    const int64_t r = starts[size_t(j)];
    ptrs[size_t(j)] = prod + j * chunk * N;
    align = std::min(align, align_bytes(reinterpret_cast<uintptr_t>(ptrs[size_t(j)])));
    for (int64_t sl = 0; sl < S; ++sl) {
      const int64_t k0 = sl * ks;
      const auto* wh = static_cast<const __nv_bfloat16*>(w_hi[block[size_t(j)]]) + k0;
      const void* v[4] = {hi + r * K + k0, lo + r * K + k0, wh,
                          two_w ? static_cast<const __nv_bfloat16*>(w_lo[block[size_t(j)]]) + k0 : wh};
      const void** p = ptrs.data() + J + per_slice * sl;
      for (int i = 0; i < (two_w ? 4 : 3); ++i) p[i * J + j] = v[i];
      for (const void* q : v) align = std::min(align, align_bytes(reinterpret_cast<uintptr_t>(q)));
    }
  }
  std::vector<char> host(table_bytes);
  std::memcpy(host.data(), ptrs.data(), ptrs.size() * sizeof(void*));
  std::memcpy(host.data() + ptrs.size() * sizeof(void*), starts.data(), starts.size() * sizeof(int32_t));
  DSV3_CUDA_CHECK(cudaMemcpyAsync(table, host.data(), table_bytes, cudaMemcpyHostToDevice, s));
  const int32_t* d_starts = reinterpret_cast<const int32_t*>(table + ptrs.size() * sizeof(void*));
  f32_split_bf16(x.data<float>(), M, K, K, hi, lo);
  if (slack > 0) {
    DSV3_CUDA_CHECK(cudaMemsetAsync(hi + M * K, 0, size_t(slack * K) * 2, s));
    DSV3_CUDA_CHECK(cudaMemsetAsync(lo + M * K, 0, size_t(slack * K) * 2, s));
  }
  // Per slice: the hi terms' batch, the lo terms' into the same products, then x_hi·w_lo.
  const int a_of[3] = {0, 1, 0}, b_of[3] = {2, 2, 3};
  for (int64_t sl = 0; sl < S; ++sl) {
    const char* p = table + (J + per_slice * sl) * sizeof(void*);
    const int64_t w = std::min(ks, K - sl * ks);
    for (int t = 0; t < terms; ++t) {
      LtMatmul g = lt_row_major(false, true, chunk, N, w, p + a_of[t] * J * sizeof(void*), K,
                                p + b_of[t] * J * sizeof(void*), K, table, N, sl > 0 || t > 0);
      g.batch = J;
      g.pointer_array = true;
      g.align = align;
      if (!lt_try_matmul(g)) return false;  // no algorithm: y untouched, the caller runs linear per block
    }
  }
  gather_chunk_rows_kernel<<<unsigned(std::min<int64_t>(M, int64_t(sm_count()) * 32)), 128, 0, s>>>(
      reinterpret_cast<const float4*>(prod), d_starts, int(J), chunk, M, N / 4, reinterpret_cast<float4*>(ptr<float>(y)),
      accumulate);
  check_launch("grouped_linear: the chunks' products into y");
  return true;
}

}  // namespace

void cuda_set_fp8_terms_budget(size_t bytes) { fp8_terms_budget() = std::max<size_t>(bytes, 1); }

size_t cuda::split_bf16_grouped(const GroupedLinearArgs& a) {
  const int64_t N = a.w[0].dim(0), K = a.w[0].dim(1);
  const DType wt = a.w[0].dtype();
  const bool f8 = wt == DType::F8_E4M3;
  // DSV3_LINEAR_FP8_SPLIT=0 at start-up: FP8 weights widened to F32 for SGEMM, as before (comparison).
  static const bool f8_on = on_unless_env_zero("DSV3_LINEAR_FP8_SPLIT");
  // Below kFp8SplitRows rows an FP8 weight's widening to F32 and SGEMM costs less than its terms and
  // three matmuls (bench-0.7b batch-1 prefill on the H200: a 128-token prompt split 3.67 against
  // 3.25 ms widened; from 256 rows split is ahead, bench/gpu_fp8_prefill.sh).
  constexpr int64_t kFp8SplitRows = 256;
  const bool takes = wt == DType::BF16 || (f8 && f8_on && a.x.dim(0) >= kFp8SplitRows);
  if (!takes || K == 0 || K % 8 != 0 || N % 4 != 0 || a.x.dim(0) > INT32_MAX || !aligned16(a.y.raw())) return 0;
  for (size_t e = 0; e < a.w.size(); ++e) {
    const Tensor& w = a.w[e];
    if (f8 ? reinterpret_cast<uintptr_t>(w.raw()) % 8 != 0 || a.w_scale_inv.size() != a.w.size() ||
                 a.w_scale_inv[e].dtype() != DType::F32 || a.w_scale_inv[e].ndim() != 2 ||
                 a.w_scale_inv[e].dim(0) != (N + 127) / 128 || a.w_scale_inv[e].dim(1) != (K + 127) / 128
           : !aligned16(w.raw()))
      return 0;
  }
  const size_t B = a.w.size();
  if (!f8) {
    std::vector<const void*> w(B);
    for (size_t e = 0; e < B; ++e) w[e] = a.w[e].raw();
    return split_core(a.x, a.offsets, w, {}, N, a.y, a.accumulate) ? B : 0;
  }
  // FP8: runs of consecutive blocks whose used weights' BF16 terms fit the budget (at least one
  // block each), each run's terms written by one launch, then its matmuls. A run that finds no
  // algorithm ends the call: the caller takes the blocks from it on.
  const size_t per_block = size_t(N * K) * 4;
  const size_t fit = std::clamp<size_t>(fp8_terms_budget() / per_block, 1, kMaxFp8Run);
  for (size_t b0 = 0; b0 < B;) {
    std::vector<size_t> used;
    size_t b1 = b0;
    for (; b1 < B && used.size() < fit; ++b1)
      if (a.offsets[b1 + 1] > a.offsets[b1]) used.push_back(b1);
    if (used.empty()) break;
    // Blocks without rows between used ones have none, so the run's rows are contiguous in x.
    const int64_t r0 = a.offsets[b0], r1 = a.offsets[b1];
    const size_t U = used.size();
    const int64_t slot = (N * K + 127) / 128 * 128;  // elements per weight's term (256-byte starts)
    Scratch buf(2 * U * size_t(slot) * 2);
    auto* hi = buf.as<__nv_bfloat16>();
    auto* lo = hi + int64_t(U) * slot;
    Fp8Table t{};
    std::vector<const void*> wh(U), wl(U);
    std::vector<int64_t> off = {0};
    for (size_t u = 0; u < U; ++u) {
      const size_t e = used[u];
      t.q[u] = static_cast<const uint8_t*>(a.w[e].raw());
      t.s[u] = a.w_scale_inv[e].data<float>();
      wh[u] = hi + int64_t(u) * slot;
      wl[u] = lo + int64_t(u) * slot;
      off.push_back(off.back() + a.offsets[e + 1] - a.offsets[e]);
    }
    const unsigned rows_grid = unsigned(std::min<int64_t>(N, std::max<int64_t>(1, int64_t(sm_count()) * 8 / int64_t(U))));
    fp8_split_bf16_kernel<<<dim3(rows_grid, unsigned(U)), 128, 0, stream()>>>(t, N, K, slot, hi, lo);
    check_launch("grouped_linear: FP8 weights into BF16 terms");
    if (!split_core(a.x.rows(r0, r1), off, wh, wl, N, a.y.rows(r0, r1), a.accumulate)) return b0;
    b0 = b1;
  }
  return B;
}

void CudaBackend::grouped_linear(const GroupedLinearArgs& a) {
  validate(a);
  if (a.w.empty() || a.x.dim(0) == 0) return;
  const size_t done = split_bf16_grouped(a);
  if (done == a.w.size()) return;
  // The blocks from `done` on, linear per block (weights widened for SGEMM).
  const int64_t r0 = a.offsets[done];
  std::vector<int64_t> off;
  for (size_t e = done; e < a.offsets.size(); ++e) off.push_back(a.offsets[e] - r0);
  const int64_t M = a.x.dim(0);
  Backend::grouped_linear({a.x.rows(r0, M), a.w.subspan(done),
                           a.w_scale_inv.empty() ? a.w_scale_inv : a.w_scale_inv.subspan(done), off,
                           a.y.rows(r0, M), a.accumulate});
}

}  // namespace dsv3
