// FP8 (E4M3) quantization and block-scaled FP8 GEMM: the DeepSeek-V3 training recipe (docs/fp8.md).
//
// These are free functions on CPU tensors: they are the exact reference a GPU path (cuBLASLt's
// VEC128/BLK128x128 scaled FP8 matmul or our own kernels) is tested against. Shapes follow ops.h.
//
// Scales are *dequantization* multipliers (HF's `scale_inv`): element x ≈ e4m3(q) · s with
//   s = amax(tile) / 448 in FP32  (or, with pow2_scale, the smallest power of two ≥ amax/448, the
//   UE8M0 form: dividing by it is exact, so q is the RNE of x·2^-e), and q = e4m3_rne_sat(x / s).
// An all-zero tile gets s = 1 (its q are all +0, so it dequantizes to 0 and nothing divides by 0).
// A tile whose amax/448 underflows FP32 gets the smallest positive FP32 as its scale.
//
// Non-finite inputs: NaN/Inf cannot be represented by a scale (amax would be Inf/NaN and poison the
// whole tile), so quantize_fp8 counts them. With `on_nonfinite = Throw` (the default) the op throws an
// InputError naming `name`, the first offending element and the count; with `Report` it only returns
// the count (the tile is then quantized from its finite values, non-finite elements saturated to
// ±448·s or NaN→0x7F) so that a trainer can skip the step and report it.
#pragma once
#include <cstdint>
#include <string>

#include "backend/ops.h"

namespace dsv3 {

// How elements of x[M, K] are grouped under one scale.
enum class Fp8Tiling : uint8_t {
  Row1x128,      // activations: per row (token), per 128 columns.   scale [M, ceil(K/128)]
  Col128x1,      // re-quantized activations for Wgrad: per column, per 128 rows. scale [ceil(M/128), K]
  Block128x128,  // weights (and the negative control for gradients). scale [ceil(M/128), ceil(K/128)]
};
const char* fp8_tiling_name(Fp8Tiling t);

enum class NonFinitePolicy : uint8_t { Throw, Report };

// q = quantize(x) per tile. With transpose_out, q is written as [K, M] and the scale grid is
// transposed too (so Col128x1 of x gives the Row1x128 layout of xᵀ, the form fp8_gemm takes for
// Wgrad; Block128x128 of W gives the blocks of Wᵀ for Dgrad). Edge tiles are partial.
struct QuantizeFp8Args {
  Tensor x;  // [M, K] F32 (or [..., K])
  Fp8Tiling tiling = Fp8Tiling::Row1x128;
  bool pow2_scale = false;
  bool transpose_out = false;
  Tensor q;      // [M, K] (or [K, M]) F8_E4M3 output
  Tensor scale;  // F32 output, grid as above (transposed with transpose_out)
  std::string name = "tensor";  // named in the non-finite error
  NonFinitePolicy on_nonfinite = NonFinitePolicy::Throw;
};
struct Fp8Status {
  int64_t nonfinite = 0;  // NaN/Inf elements seen in x
};
Fp8Status quantize_fp8(const QuantizeFp8Args& args);
// x = e4m3(q) · scale, the inverse map (F32 out, same layout as q). The grid is read from scale's
// shape like fp8_gemm's operands: [R, ceil(C/128)] per row, [ceil(R/128), ceil(C/128)] per block,
// [ceil(R/128), C] per column (R, C = q's dims).
void dequantize_fp8(const Tensor& q, const Tensor& scale, const Tensor& out);

// Accumulation inside the GEMM.
//   Fp32: the reference. For each output, K is walked in chunks of 128 (the scale granularity): the
//     chunk's products e4m3·e4m3 are exact in FP32 and summed in ascending k in FP32, the chunk sum is
//     multiplied by (sa·sb) and added to an FP32 accumulator, chunks in ascending order. (This is
//     DeepGEMM's two-level scheme; it equals Σ_k (qa·sa)(qb·sb) up to FP32 summation error.)
//   Limited: an emulation of Hopper tensor-core accumulation ([V3] §3.5.2). Each product is scaled
//     by sa·sb in FP32 (exact when the scales are powers of two), products are taken in groups of 32
//     (one WGMMA k-step), aligned to the largest exponent among them — and among the running
//     accumulator too when acc_in_alignment — and truncated toward zero to `acc_bits` significant
//     bits (14 = 13 fraction bits + the implicit one, the FP22 register of [ISCA] §3.1.1); the group
//     is summed exactly into the accumulator and the sum truncated to `acc_bits` significant bits.
//     The DeepSeek papers do not say whether the accumulator joins the alignment; the tensor-core
//     models that do (a multi-term fused sum with the accumulator, one RZ normalisation: docs/fp8.md
//     "Accumulation" has the sources) say it does, hence the default acc_in_alignment = true; false
//     (products only) is kept as a sensitivity check (bench/fp8_accum.cpp reports both). With promote_every = N_C > 0 the limited accumulator is
//     added into an FP32 accumulator and cleared every N_C elements of K (the paper's promotion to
//     CUDA cores, N_C = 128); 0 = never. N_C must be a multiple of 32.
enum class Fp8Accum : uint8_t { Fp32, Limited };

// c[M, N] (+)= a · bᵀ with a = e4m3(qa)·sa: [M, K], b = e4m3(qb)·sb: [N, K] (the "NT" GEMM; every
// linear-layer GEMM is written in this form: Fprop x·Wᵀ, Dgrad dy·(Wᵀ)ᵀ, Wgrad (dyᵀ)·(xᵀ)ᵀ).
// Each operand's scale grid is per row and 128 along K ([R, ceil(K/128)]) or per 128×128 block
// ([ceil(R/128), ceil(K/128)]); the shape says which (R = 1 is the same either way).
// c is F32 or BF16 (rounded once, RNE, from the FP32 result; accumulate adds in FP32 first).
struct Fp8GemmArgs {
  Tensor a, a_scale;  // [M, K] F8_E4M3, F32 grid
  Tensor b, b_scale;  // [N, K] F8_E4M3, F32 grid
  Tensor c;           // [M, N] F32 or BF16
  bool accumulate = false;
  Fp8Accum accum = Fp8Accum::Fp32;
  int acc_bits = 14;
  int64_t promote_every = 0;  // Limited only; 0 = never
  bool acc_in_alignment = true;  // Limited only
};
void fp8_gemm(const Fp8GemmArgs& args);

// Fast CPU paths of the same ops, used by the reduced-precision linear layer: bit-identical to
// quantize_fp8 / dequantize_fp8 / fp8_gemm with Fp8Accum::Fp32 (quantization bytes and scales, GEMM
// output bits; tests/backend/fp8_fast_test.cpp). Division x/s stays a division (vectorized) so every
// byte matches; the E4M3 rounding is done on the FP32 bits.
Fp8Status quantize_fp8_fast(const QuantizeFp8Args& args);
void dequantize_fp8_fast(const Tensor& q, const Tensor& scale, const Tensor& out);
void fp8_gemm_fast(const Fp8GemmArgs& args);  // Fp8Accum::Fp32 only

void validate(const QuantizeFp8Args&);
void validate(const Fp8GemmArgs&);

// ---------------------------------------------------------------------------------------------
// Linear layers in reduced precision (the trainer's --precision). One object, read by the model's
// linear_forward / linear_backward for the projections marked eligible (attention projections, dense
// MLP, routed and shared experts, MTP eh_proj); embedding, lm_head, router gate, norms and attention
// stay in FP32.
//   F32:  plain FP32 GEMMs.
//   Bf16: operands (x, W, dy) rounded to BF16 (RNE), products and sums in FP32.
//   Fp8:  Fprop  y  = Q1x128(x) · Q128x128(W)ᵀ
//         Dgrad  dx = Q1x128(dy) · Q128x128(W)            (dy per token, 128 output channels)
//         Wgrad  dW = Q128x1(dy)ᵀ · Q128x1(x̂)             (both per channel, 128 tokens; x̂ is the
//                dequantized FP8 copy of x that the forward cached: re-quantized, as on the GPU)
//         dgrad_block = true: the paper's negative control, dy quantized per 128×128 block in both
//         backward GEMMs.
enum class LinearPrecisionMode : uint8_t { F32, Bf16, Fp8 };
struct LinearPrecision {
  LinearPrecisionMode mode = LinearPrecisionMode::F32;
  bool pow2_scale = false;
  bool dgrad_block = false;
};
// Non-finite values in any operand make that GEMM's output all NaN (quantized with Report), so the
// trainer's non-finite-step check (--max-skips) sees a diverged step instead of a saturated one.
// The process-wide setting (the trainer sets it once before building the model; F32 by default).
LinearPrecision& linear_precision();

// An activation kept in FP8 for the backward ([V3] §3.3.3): E4M3 in 1×128 tiles, q [rows, K] and
// scale [rows, ceil(K/128)], exactly what the forward's Fprop quantized (same bits). Rows are
// independent, so rows(r0, r1) is the cache of x.rows(r0, r1) — except for `nonfinite`, which a row
// block keeps whole: on the CPU a NaN/Inf anywhere in a shared copy (the MoE's rows) makes the FP8
// GEMMs of every block NaN, where CUDA, which marks the bad tiles' scales, makes only that block's
// NaN. Either way the step is non-finite and the trainer skips it.
struct Fp8Tiles {
  Tensor q, scale;
  int64_t nonfinite = 0;
  bool defined() const { return q.defined(); }
  int64_t bytes() const;  // what is stored: q plus its scales
  Fp8Tiles rows(int64_t r0, int64_t r1) const;
};
// x [..., K] F32 → its 1×128 tiles (non-finite values counted, not thrown: the linear layer turns
// them into a NaN output).
Fp8Tiles fp8_tiles(const Tensor& x, bool pow2_scale, const char* name);
Tensor dequantize(const Fp8Tiles& t);  // F32 [rows, K]
// What linear_lowp keeps in its x_fp8 slot (below) for an input that several calls share, made up
// front (the MoE's gathered rows, sliced per expert): x's 1×128 FP8 tiles in Fp8 mode, its BF16 copy
// in Bf16 mode on CUDA tensors (x itself when x is BF16), nothing otherwise.
Fp8Tiles lowp_input_copy(const LinearPrecision& prec, const Tensor& x, const char* name);
// The same for an output gradient dy that the backward GEMMs of several row blocks share (the MoE's
// experts): its BF16 copy in Bf16 mode on CUDA tensors, nothing otherwise (FP8 quantizes dy in each
// block's own tilings).
Fp8Tiles lowp_grad_copy(const LinearPrecision& prec, const Tensor& dy);

// The MLPs' SwiGLU in Fp8 mode (model/moe.cpp): a.out = silu(gate)·up as be.swiglu, with the
// 1×128 tiles of gate and up (the backward keeps them) and of out (down_proj's input): fp8_tiles of
// each, the same bits. On CUDA tensors whose rows are a multiple of 128 wide, one pass.
struct SwigluTiles {
  Fp8Tiles gate, up, out;
};
SwigluTiles swiglu_fp8(Backend& be, const SwigluArgs& a, bool pow2_scale);
// The backward's recomputation from those tiles: out = silu(gate)·up of the dequantized tiles and
// out's tiles, as dequantize, be.swiglu and fp8_tiles give them; gate and up are the dequantized
// tiles where the composition made them (undefined after the GPU's one pass).
struct SwigluRecompute {
  Tensor out;
  Fp8Tiles out_tiles;
  Tensor gate, up;
};
SwigluRecompute swiglu_fp8_recompute(Backend& be, const Fp8Tiles& gate, const Fp8Tiles& up, bool pow2_scale);
// be.swiglu_backward(a) with gate and up the dequantized tiles: a.gate and a.up when given (the
// recomputation's), else dequantized here or, on the GPU, read from the tiles in one pass.
void swiglu_backward_fp8(Backend& be, SwigluBackwardArgs a, const Fp8Tiles& gate, const Fp8Tiles& up);

// A cached copy of x (or dy) holds FP8 tiles in Fp8 mode and a BF16 copy in Bf16 mode: a precision
// switched between a forward and its backward must not hand one to the other's kernels. Throws,
// naming `where`; null or an empty copy passes.
void check_lowp_copy(const LinearPrecision& prec, const Fp8Tiles* copy, const char* where);

// The three GEMMs of a linear layer under `prec` (F32 CPU tensors, y/dx/dw [..] as LinearArgs).
// x_fp8: the forward's FP8 copy of x. linear_lowp fills it when it is empty and otherwise uses it
// in place of quantizing x again (an input shared by several projections is quantized once);
// linear_backward_lowp's Wgrad reads it instead of re-quantizing a.x. In Bf16 mode on CUDA tensors
// the slot keeps x's BF16 copy instead (q BF16, no scale), so x is converted once per step, not
// once per GEMM; the CPU rounds x itself and leaves the slot alone. Either way the numbers are those
// of the uncached path, bit for bit. In Bf16 mode x and dy may themselves be BF16 (activations the
// model keeps in BF16, model/moe.cpp): the same values the rounding would give. dy_copy: lowp_grad_copy(dy) (or a row block of it), read in
// place of converting dy; ignored where that makes nothing.
void linear_lowp(const LinearPrecision& prec, const LinearArgs& a, Fp8Tiles* x_fp8 = nullptr);
void linear_backward_lowp(const LinearPrecision& prec, const LinearBackwardArgs& a, const Fp8Tiles* x_fp8 = nullptr,
                          const Fp8Tiles* dy_copy = nullptr);

// The MoE's experts: one projection of every row block (rows offsets[e]..offsets[e + 1] of x and y
// against w[e]), each block as linear_lowp with x_copy.rows(...) as its cache — the same bits (in
// Bf16 mode on a GPU the same products, summed in another order). On CUDA tensors in Fp8 mode the
// blocks' GEMM preparations share launches (a launch per block cost more than its work) and their
// matmuls run on the backend's lanes; in Bf16 mode with BF16 weights and blocks large enough the
// blocks' matmuls are batched; otherwise one linear_lowp per block (on lanes on a GPU). x_copy:
// lowp_input_copy of x, or undefined (each block quantizes or converts its rows).
void linear_lowp_grouped(const LinearPrecision& prec, const GroupedLinearArgs& a, const Fp8Tiles& x_copy);

// Its backward: per block linear_backward_lowp with dw[e] accumulated into, dx (if present) written
// or accumulated (accumulate_dx) per block's rows, x_copy as above. In Bf16 mode on a GPU dy is
// converted once for all blocks, Dgrad is batched as the forward and the blocks' Wgrads are one
// grouped launch (or, for shapes it does not take, one matmul per block on a lane).
struct GroupedLinearBackwardArgs {
  Tensor x, dy;                                // [M, K], [M, N] F32
  std::span<const Tensor> w, w_scale_inv, dw;  // per block: [N, K]; scale_inv for FP8 weights (else empty); [N, K]
  std::span<const int64_t> offsets;            // blocks + 1
  Tensor dx;                                   // [M, K] F32, or absent
  bool accumulate_dx = false;
};
void linear_backward_lowp_grouped(const LinearPrecision& prec, const GroupedLinearBackwardArgs& a,
                                  const Fp8Tiles& x_copy);

}  // namespace dsv3
