// The tolerance policy's constants (docs/tolerances.md gives each one's reason). Every test that
// compares numbers takes its bound from here; none is loosened to make a test pass.
// Unless stated, the metric is the normalised error max|got − ref| / max|ref| over a tensor.
#pragma once

namespace dsv3::tol {

// An FP32 op against a double-precision reference of the same formula (GEMM-based ops with
// K ≤ 4096, softmax/norm reductions, elementwise ops). FP32 unit roundoff is 6e-8; a sum of K
// terms accumulates ≲ √K·u in practice, so 1e-5 leaves ~100× headroom for K = 4096 and still
// catches any wrong index, sign, scale or missing term (those give errors ≳ 1e-2).
constexpr double kF32 = 1e-5;

// An FP32 backward against central finite differences of the double-precision forward
// (h = 1e-6·max(1,|x|), so the difference quotient itself is accurate to ~1e-9). The budget is the
// FP32 backward's own rounding, as for kF32, plus the extra products of chained derivatives.
constexpr double kF32Grad = 2e-5;

// A backend that stores activations in BF16 (8 significant bits, u = 2^-8 = 3.9e-3) against the
// FP32 CPU reference: one rounding per stored tensor and a few per op chain.
constexpr double kBf16 = 1e-2;

// FP8 E4M3 GEMM with block scales against the FP32 CPU emulation of the same quantization: the
// products are exact in both, only FP32 accumulation order differs → kF32. Against an unquantized
// FP32 GEMM the metric is DeepGEMM's global cosine difference 1 − 2Σxy/(Σx²+Σy²):
constexpr double kFp8CosDiff = 1e-3;

// End to end against Hugging Face (PyTorch FP32 on the fixtures): logits per tensor.
constexpr double kModelParity = 1e-4;
// Training: loss and every parameter gradient against PyTorch autograd, ‖Δ‖₂ / ‖ref‖₂ per tensor.
constexpr double kTrainParity = 1e-4;

}  // namespace dsv3::tol
