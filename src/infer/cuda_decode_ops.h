// Device pieces of the runner's forward on the CUDA backend that avoid host synchronisation
// (CUDA builds only: the implementation is cuda_decode_ops.cu). The backend's rope and moe_sort
// range-check their inputs on the device and read the verdict back (a synchronisation each), and
// moe_forward reads the expert counts back to slice rows per expert: ~6 synchronisations per MoE
// layer. Here positions are valid by construction (the runner grows its RoPE tables to cover
// them) and expert ids come from the router, so these run without a read-back. Plain C++ header.
#pragma once
#include <cstdint>

#include "model/model.h"

namespace dsv3 {

// The latent half of kv_a_proj's output in one kernel: c_kv_n = kv_a_layernorm(kv_a[:, :R]) and
// k_pe = RoPE(kv_a[:, R:]) at positions (inside the tables) — the backend's copy_cols, rmsnorm,
// copy_cols and rope. With q [N, heads, q_nope + rope], q's RoPE columns are rotated in place at the
// same positions too (the backend's rope on q, offset q_nope). kv_a_older: kv_a was written by a
// kernel launched before the last one in the stream (q_b's GEMV came between): the kernel then reads
// it before its programmatic-launch wait. beside: the kernel goes to a side stream forked from
// cuda::stream() here, so that the next launches on the stream (the W_UK GEMV, which reads only
// q's other columns) run beside it; cuda_join_beside() orders the stream after it again, and must
// come before anything reads c_kv_n, k_pe or q's RoPE columns.
void cuda_kv_latent(const Tensor& kv_a, const Tensor& norm_w, float eps, const Tensor& positions, const Tensor& cos,
                    const Tensor& sin, bool interleaved, const Tensor& c_kv_n, const Tensor& k_pe,
                    const Tensor* q = nullptr, int64_t q_nope = 0, bool kv_a_older = false, bool beside = false);
// Joins a kernel forked by cuda_kv_latent(…, beside = true) back into cuda::stream() (a no-op when
// none is pending on this thread).
void cuda_join_beside();
// Whether one-row decode steps fork cuda_kv_latent beside the W_UK GEMV (on by default; the same
// kernels and bits either way, one dependent launch fewer per layer; DSV3_DECODE_BESIDE=0 at start-up
// turns it off).
void cuda_set_decode_beside(bool on);
bool cuda_decode_beside();
int64_t cuda_decode_beside_forks();  // forks so far (a test's way to see the path taken)

// One MoE layer's routed experts as device pointer tables (gate, up, down per expert).
struct CudaMoeTables {
  Tensor ptrs;  // I64 [3 (FP8: 6, the block scales after), E (+1: the shared experts, when fused)] on the device
  int64_t E = 0, H = 0, I = 0;
  DType wt = DType::F32;  // the experts' weights: F32, BF16 or FP8
  bool shared = false;  // the shared experts run as group E (F32, the routed experts' shape)
};
// Whether the layer's experts can take the grouped path (F32, BF16 or FP8 weights without bias,
// 16-byte aligned rows, E ≤ 1024, hidden size ≤ 8192).
bool cuda_moe_supported(const MoeParams& p);
CudaMoeTables cuda_moe_tables(const MoeParams& p);

// moe_forward for a few rows without a host round trip: router (backend op) → picks grouped by
// expert on the device (stable: token order within an expert) → each expert's weight rows read
// once for all its picks (gate/up with SwiGLU, then down) → per token Σ_j weight_j·y_j in top-k
// order, plus the shared experts. Returns out [N, H]; with `residual`, residual + that (one add
// less; the same order of additions as the runner's x2 + ffn).
// small_gemv: the router's gate through cuda_small_linear (when it applies). cuda_moe_fits says
// whether N rows of top-k picks fit its grouping kernel (one CTA, shared memory).
inline bool cuda_moe_fits(const CudaMoeTables& t, int64_t N, int64_t top_k) {
  return top_k <= 32 && (2 * t.E + 1 + N * top_k) * int64_t(sizeof(int32_t)) <= 48 * 1024;
}
// next_norm: also out = RMSNorm(the result)·weight (the next block's input norm), inside the
// combine kernel when it writes the final rows (the backend's rmsnorm otherwise).
struct CudaNextNorm {
  Tensor weight;
  float eps = 0.0f;
  Tensor out;  // [N, H]: allocated by the call unless given
};
// router_logits: the router's logits for x, already computed (cuda_norm_router). into: an [N, H] F32
// tensor to write the result to (returned), allocated by the call when absent.
Tensor cuda_moe_forward(Backend& be, const ModelDims& d, const MoeParams& p, const CudaMoeTables& t,
                        const Tensor& x, const Tensor* residual = nullptr, bool small_gemv = false,
                        CudaNextNorm* next_norm = nullptr, const Tensor* router_logits = nullptr,
                        const Tensor& into = Tensor());

// h = RMSNorm(x)·norm_w (the backend's rmsnorm, bit for bit) and logits = h·gateᵀ (F32 FMAs) in one
// launch: the post-attention norm with the MoE router's GEMV. cuda_norm_router_ok: an F32 or BF16
// gate of 16-byte aligned rows without bias, hidden size ≤ 2048, at most 2¹⁷ gate weights (every
// row's CTA reads them all).
bool cuda_norm_router_ok(const LinearParam& gate, const Tensor& x);
int64_t cuda_norm_router_min_rows();  // the runner fuses from this many rows
void cuda_norm_router(const Tensor& x, const Tensor& norm_w, float eps, const LinearParam& gate, const Tensor& h,
                      const Tensor& logits);

// The most rows of x the decode GEMV kernels take (the runner's device_gemv_rows, the absorbed
// W_UK / W_UV GEMV).
constexpr int64_t kCudaGemvMaxRows = 128;

// y (+)= x·Wᵀ for at most kCudaGemvMaxRows rows of x without cuBLAS: one kernel, each weight row
// read from HBM once (beyond 16 rows of x in the row-range kernel, or 64, the CTAs of each part read
// it again, mostly from L2); F32, BF16 or FP8 weights without bias, F32 math; cuda_small_linear_ok
// says whether it applies.
// With norm_w, x is RMSNorm'ed first (the backend's rmsnorm, eps) inside the kernel; with p2, a
// second weight over the same x writes y2 in the same launch. The weights are read before the
// previous kernel in the stream has finished (programmatic dependent launch): they must not be the
// output of a kernel still in flight — model weights, copied once, never are (as for the experts).
bool cuda_small_linear_ok(const LinearParam& p, const Tensor& x);
bool cuda_small_linear_fuses_norm(const LinearParam& p);  // whether norm_w may be given for p
// Whether an FP8 weight (with its scale_inv) takes the tensor-core kernels: on the device, rows of
// a multiple of 16 columns, 16-byte aligned, scales [⌈N/128⌉, ⌈K/128⌉]; not with DSV3_DECODE_FP8=0.
bool cuda_decode_fp8_ok(const LinearParam& p);
// Whether a dense MLP's three projections take cuda_small_linear for x (gate and up of one dtype).
bool cuda_small_mlp_ok(const MlpParams& m, const Tensor& x);
void cuda_small_linear(const LinearParam& p, const Tensor& x, const Tensor& y, bool accumulate,
                       const Tensor* norm_w = nullptr, float eps = 0.0f, const LinearParam* p2 = nullptr,
                       const Tensor* y2 = nullptr);

// BF16 weights take a tensor-core path (mma.sync with x split into two BF16 terms, ~16 bits of x
// kept: cuda_decode_mma.cuh has the error bound) in the GEMV and the grouped experts for steps of
// at least cuda_decode_mma_rows() rows of x (tokens, for the experts); fewer rows, F32 weights and
// the fused RMSNorm keep the F32-FMA kernels. 0 turns the path off (DSV3_DECODE_MMA=0 at start-up).
// FP8 weights (E4M3, 128×128 block scales in LinearParam::scale_inv; rows of a multiple of 16) take
// the tensor-core kernels at every row count, whatever this setting: there is no F32-FMA kernel for
// them, and the RMSNorm is not fused into their GEMV (cuda_small_linear_fuses_norm).
void cuda_set_decode_mma_rows(int rows);
int cuda_decode_mma_rows();
// Whether the tensor-core GEMVs of many row steps (the lm_head) take 32 rows of x per CTA instead
// of parts of 16 (the same bits; DSV3_DECODE_GEMV_WIDE=0 at start-up turns it off).
void cuda_set_decode_gemv_wide(bool on);
bool cuda_decode_gemv_wide();

// The kernel behind it, on raw device pointers, with rows of W grouped in heads: output row j uses
// x + q·ldx + (j / head_rows)·head_x and goes to y[q·ldy + (j / head_rows)·head_y + j % head_rows]
// (a block-diagonal product: the absorbed W_UK / W_UV per head). Rows of W2 (plain) follow.
struct GemvArgs {
  const float* x = nullptr;
  int n = 0, K = 0;
  int64_t ldx = 0, head_x = 0;
  int head_rows = 1;
  const void* W = nullptr;  // F32, BF16 or FP8 (wt), as W2
  DType wt = DType::F32;
  const float* scale = nullptr;  // FP8: W's 128×128 block scales, rows ld_scale apart (likewise W2's)
  int64_t ld_scale = 0;
  const float* scale2 = nullptr;
  int64_t ld_scale2 = 0;
  int64_t ldw = 0;  // W's row stride in elements when it is not K (a K-slice of a wider W: gemv_rows only)
  int n_out = 0;
  float* y = nullptr;
  int64_t ldy = 0, head_y = 0;
  bool acc = false;
  const void* norm_w = nullptr;
  DType norm_t = DType::F32;
  float eps = 0.0f;
  const void* W2 = nullptr;
  int n_out2 = 0;
  float* y2 = nullptr;
  int64_t ldy2 = 0;
};
void cuda_rows_gemv(const GemvArgs& g);
// W, its dtype and, for FP8, its block scales (scale_inv [⌈N/128⌉, ⌈K/128⌉]).
inline void set_gemv_weight(GemvArgs& g, const Tensor& w, const Tensor& scale_inv) {
  g.W = w.raw();
  g.wt = w.dtype();
  const bool f8 = w.dtype() == DType::F8_E4M3;
  g.scale = f8 ? scale_inv.data<float>() : nullptr;
  g.ld_scale = f8 ? scale_inv.dim(1) : 0;
}

}  // namespace dsv3
