// The reduced-precision linear layer of backend/fp8.h (the trainer's --precision bf16 / fp8) on CUDA
// tensors. backend/fp8.cpp's linear_lowp, linear_backward_lowp, fp8_tiles and dequantize call these
// when their tensors live on the GPU. Plain C++ (no CUDA types).
//   Bf16: x, W, dy rounded to BF16 (RNE) on the device, cuBLAS BF16 GEMMs on tensor cores with FP32
//         accumulation and FP32 outputs: the CPU's BF16-operand emulation up to summation order.
//   Fp8:  the recipe's three GEMMs with the same quantization bytes and scales as the CPU (quantize.cu)
//         through cuBLASLt's block-scaled FP8 matmul (gemm_fp8.cu). Operands that miss its shape
//         rules (K a multiple of 128, M and N multiples of 16) are zero-padded on the device (zero
//         codes add nothing); the one form it lacks, 128×128 blocks on both operands (the
//         dgrad_block negative control's Dgrad), is the FP32 product of the dequantized operands.
// Non-finite values: a tile holding NaN/Inf gets a NaN scale (no host read-back), and a GEMM any of
// whose operand scales is NaN writes an all-NaN output, as the CPU does; Fp8Tiles::nonfinite stays 0
// on the GPU (the scale grid carries it).
#pragma once
#include <span>

#include "backend/fp8.h"

namespace dsv3 {

void cuda_linear_lowp(const LinearPrecision& prec, const LinearArgs& a, Fp8Tiles* x_fp8);
void cuda_linear_backward_lowp(const LinearPrecision& prec, const LinearBackwardArgs& a, const Fp8Tiles* x_fp8,
                               const Fp8Tiles* dy_copy);
// linear_lowp_grouped / linear_backward_lowp_grouped on CUDA tensors: in Fp8 mode with x's FP8 copy
// given, when every block fits the direct path; in Bf16 mode with BF16 weights, 16-byte aligned rows,
// two or more blocks with rows and at most twice the rows computed in chunks. False (nothing done)
// otherwise.
bool cuda_linear_lowp_grouped(const LinearPrecision& prec, const GroupedLinearArgs& a, const Fp8Tiles& x_copy);
bool cuda_linear_backward_lowp_grouped(const LinearPrecision& prec, const GroupedLinearBackwardArgs& a,
                                       const Fp8Tiles& x_copy);
// Bf16-mode grouped calls that ran as batched matmuls so far (a test's way to see the path taken).
int64_t cuda_bf16_grouped_batches();
// The Bf16-mode grouped backward's Wgrad: every block's in one launch (grouped_wgrad.cu; on by
// default, DSV3_GROUPED_WGRAD=0 at start-up turns it off) or one cuBLASLt matmul per block.
void cuda_set_grouped_wgrad(bool on);
bool cuda_grouped_wgrad();
Fp8Tiles cuda_fp8_tiles(const Tensor& x, bool pow2_scale);
Tensor cuda_dequantize(const Fp8Tiles& t);

// quantize_fp8 without the host read-back: non-finite elements are added to *nonfinite (a device
// counter; may be null) and, with nan_mark, their tile's scale is written as NaN.
void cuda_quantize_fp8_async(const QuantizeFp8Args& a, unsigned long long* nonfinite, bool nan_mark);
// Wgrad's x̂: FP8 1×128 tiles src [M, K] dequantized and quantized again in 128×1 tiles with the
// transposed output (q [K, M], scale [K, ⌈M/128⌉]) in one pass, NaN-marking as above; the bytes of
// dequantize_fp8 followed by quantize_fp8(Col128x1, transpose_out).
void cuda_requantize_cols_t(const Fp8Tiles& src, bool pow2_scale, const Tensor& q, const Tensor& scale);
// swiglu_fp8, swiglu_fp8_recompute and swiglu_backward_fp8 (backend/fp8.h) in one launch each
// (swiglu_fp8.cu): false, nothing done, unless the rows are a multiple of 128 wide, the outputs F32
// (the gradients written, not accumulated) and the arrays 16-byte aligned.
bool cuda_swiglu_fp8(const SwigluArgs& a, bool pow2_scale, SwigluTiles& out);
bool cuda_swiglu_fp8_recompute(const Fp8Tiles& gate, const Fp8Tiles& up, bool pow2_scale, SwigluRecompute& out);
bool cuda_swiglu_backward_fp8(const SwigluBackwardArgs& a, const Fp8Tiles& gate, const Fp8Tiles& up);

namespace cuda {

// dw[e] += dy[rows of e]ᵀ · x[rows of e] for every block e (offsets: blocks + 1) in one launch on
// cuda::stream(): dy [M, N] and x [M, K] BF16, row-major and 16-byte aligned, dw[e] F32 [N, K].
// False, nothing launched, unless N and K are multiples of 8 and there are at most 256 blocks.
bool grouped_wgrad_bf16(const void* dy, const void* x, int64_t N, int64_t K, std::span<const int64_t> offsets,
                        std::span<const Tensor> dw);
int64_t grouped_wgrad_launches();  // launches so far (a test's way to see the path taken)

// One matmul of a grouped FP8 launch (grouped_fp8_gemm.cu), its operands as the preparation
// launches below write them for cuBLASLt: c[M, N] (+)= a·bᵀ, a [≥ M rows, K] and b [N, K] E4M3
// row-major with row stride K (a multiple of 128), a's VEC128 scales sa [K/128, sa_ld] (row m's at
// sa[kb·sa_ld + m], sa_ld ≥ M), b's BLK128x128 scales [⌈N/128⌉, sb_ld] (b_block) or VEC128 scales
// [K/128, sb_ld]; c F32 with row stride N. Each k-block's partial sum is scaled and added in FP32.
struct Fp8GroupItem {
  const void* a = nullptr;
  const float* sa = nullptr;
  int64_t sa_ld = 0;
  const void* b = nullptr;
  const float* sb = nullptr;
  int64_t sb_ld = 0;
  float* c = nullptr;
  int64_t M = 0, K = 0;
  bool b_block = true, accumulate = false;
};
// Every item's matmul (items with M = 0 skipped), up to 64 per launch on cuda::stream(); the
// experts' Fprop, and their Dgrad and Wgrad together, in Fp8 mode. False, nothing launched, when it
// is turned off (DSV3_GROUPED_FP8=0 at start-up, or set_grouped_fp8) or an operand misses the rules
// above: N a multiple of 16, K a positive multiple of 128; a, b, c, sa and a per-column sb 16-byte
// aligned; sa_ld ≥ M and a per-column sb_ld ≥ N, both multiples of 4.
bool grouped_fp8_gemm(std::span<const Fp8GroupItem> items, int64_t N);
int64_t grouped_fp8_launches();
void set_grouped_fp8(bool on);
bool grouped_fp8();
// Its tile height, 64 or 128 rows (128 unless DSV3_GROUPED_FP8_ROWS=64 at start-up).
void set_grouped_fp8_rows(int rows);
int grouped_fp8_rows();
// The warp-specialised persistent kernel (128-row tiles; off unless DSV3_GROUPED_FP8_WS=1 at
// start-up): same bits as the 128-row one.
void set_grouped_fp8_ws(bool on);
bool grouped_fp8_ws();
// The 64- and 128-row kernels' tiles out through bulk copies from shared memory (accumulating ones by
// bulk FP32 adds) instead of loads, adds and stores from registers: on unless DSV3_GROUPED_FP8_BULK=0
// at start-up (the same bits, subnormal old values of an accumulating tile included; 3% less kernel
// time over a bench-0.7b FP8 step, H200 2026-12-06).
void set_grouped_fp8_bulk(bool on);
bool grouped_fp8_bulk();

// The FP8 linear layer's GEMM preparation (quantize.cu): one launch per pass (Fprop; Dgrad and Wgrad
// together) writes every FP8 operand in the form cuBLASLt reads — the reduction dimension zero-padded
// to 128 by the quantizers themselves, scales in cuBLASLt's layouts (VEC128: [K/128, rows], rows
// contiguous; BLK128x128: [⌈rows/128⌉, ld4], ld4 = ⌈K/128⌉ rounded up to 4) — so that a GEMM costs
// that launch and the matmul. Codes and scales are the CPU's (quantize_fp8), the transposed weight's
// 128×128 tiles being the weight's own tiles transposed.
// Non-finite values, with no host read-back and no pass over the outputs: a tile holding NaN/Inf gets
// a NaN scale and flags its operand in a device word; the launch's last CTA then writes NaN over a
// whole scale array of each GEMM that operand feeds (every output of such a GEMM is then NaN, as on
// the CPU) and clears the word. The word is per stream (quantize.cu's nan_slot), so launches on
// different streams (the experts' lanes) do not share it.

// The weight operand: W [N, K] in any float dtype (FP8 with its 128×128 scale_inv) → 128×128 tiles,
// q [N, ldq] (Fprop) or, with transpose, Wᵀ as q [K, ldq] (Dgrad); ldq the reduction dimension
// rounded up to 128 (code 0 beyond it); scale_lt in BLK128x128 layout.
struct WeightSide {
  const void* w = nullptr;
  DType wtype = DType::BF16;
  const float* w_scale_inv = nullptr;
  int64_t N = 0, K = 0;
  bool transpose = false;
  uint8_t* q = nullptr;
  int64_t ldq = 0;
  float* scale_lt = nullptr;
  int64_t ld4 = 0;
};

// Fprop, K (= w.K) a multiple of 128: the weight, and x's 1×128 tiles — quantized here from x [M, K]
// F32 (16-byte aligned) into the cache xq [M, K] / x_scale [M, K/128] when x is set, else read from
// that cache. cuBLASLt takes the token count only in multiples of 4, so the GEMM's operand is
// q_lt [M_lt, K], M_lt = M rounded up to 4, its rows M..M_lt zero: q_lt is xq when x is set (xq then
// has M_lt rows) or when M_lt = M, else a buffer the cached codes are copied into; scales in VEC128
// layout x_scale_lt [K/128, M_lt] (1 for the padding rows).
struct FpropPrep {
  bool pow2 = false;
  WeightSide w;
  int64_t M = 0, M_lt = 0;
  const float* x = nullptr;
  uint8_t* xq = nullptr;
  float* x_scale = nullptr;
  uint8_t* q_lt = nullptr;
  float* x_scale_lt = nullptr;
};

// Both backward GEMMs from dy [M, N] F32, read once. Dgrad (q1 set, 4-byte aligned): dy's 1×128
// tiles q1 [M1, ld1] (ld1 = N rounded up to 128, M1 = M rounded up to cuBLASLt's 4, the padding
// rows zero) with VEC128 scales s1_lt [ld1/128, M1], and the weight side (transpose, ldq = ld1).
// Wgrad (q2 set): dyᵀ's 128×1 tiles q2 [N, ld2] (ld2 = M rounded up to 128; a multiple of 16 at
// least) with VEC128 scales s2_lt [ld2/128, N], and x̂ᵀ q3 [K, ld2], s3_lt [ld2/128, K] re-quantized
// from the forward's FP8 tiles xs_q [M, K] / xs_scale [M, ⌈K/128⌉] (x̂ = e4m3·scale, as
// cuda_requantize_cols_t; K a multiple of 16 and xs_q 16-byte aligned: x̂ is read 16 codes per
// load; q2 and q3 16-byte aligned: their codes are written 16 per store).
struct BackwardPrep {
  bool pow2 = false;
  int64_t M = 0, N = 0, K = 0;
  const float* dy = nullptr;
  uint8_t* q1 = nullptr;
  int64_t ld1 = 0, M1 = 0;
  float* s1_lt = nullptr;
  uint8_t* q2 = nullptr;
  int64_t ld2 = 0;
  float* s2_lt = nullptr;
  const uint8_t* xs_q = nullptr;
  const float* xs_scale = nullptr;
  uint8_t* q3 = nullptr;
  float* s3_lt = nullptr;
  WeightSide w;
};

// The preparations p (one, or the MoE's experts: a few MB each, where a launch of its own cost more
// than its work, its code fetched cold on every SM), kPrepGroup per launch; each keeps its own NaN
// propagation, and its bytes and scales do not depend on the others.
constexpr int kPrepGroup = 32;
void fp8_fprop_prep(std::span<const FpropPrep> p);
void fp8_backward_prep(std::span<const BackwardPrep> p);

// c[M, N] (+)= a·bᵀ on cuBLASLt's block-scaled FP8 matmul with operands already in its layouts:
// a [M, K] E4M3 with VEC128 scales [K/128, M]; b [N, K] with BLK128x128 scales [⌈N/128⌉, ld4] or
// VEC128 scales [K/128, N]; K a multiple of 128; c F32 with row stride N.
void fp8_gemm_lt(const uint8_t* a, const float* a_scale, int64_t M, const uint8_t* b, const float* b_scale,
                 bool b_block, int64_t N, int64_t K, float* c, bool accumulate);

}  // namespace cuda

}  // namespace dsv3
