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
#include "backend/fp8.h"

namespace dsv3 {

void cuda_linear_lowp(const LinearPrecision& prec, const LinearArgs& a, Fp8Tiles* x_fp8);
void cuda_linear_backward_lowp(const LinearPrecision& prec, const LinearBackwardArgs& a, const Fp8Tiles* x_fp8);
Fp8Tiles cuda_fp8_tiles(const Tensor& x, bool pow2_scale);
Tensor cuda_dequantize(const Fp8Tiles& t);

// quantize_fp8 without the host read-back: non-finite elements are added to *nonfinite (a device
// counter; may be null) and, with nan_mark, their tile's scale is written as NaN.
void cuda_quantize_fp8_async(const QuantizeFp8Args& a, unsigned long long* nonfinite, bool nan_mark);
// Wgrad's x̂: FP8 1×128 tiles src [M, K] dequantized and quantized again in 128×1 tiles with the
// transposed output (q [K, M], scale [K, ⌈M/128⌉]) in one pass, NaN-marking as above; the bytes of
// dequantize_fp8 followed by quantize_fp8(Col128x1, transpose_out).
void cuda_requantize_cols_t(const Fp8Tiles& src, bool pow2_scale, const Tensor& q, const Tensor& scale);

}  // namespace dsv3
