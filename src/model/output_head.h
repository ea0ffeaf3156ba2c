// The output head's linear (lm_head, which the MTP modules share): F32 in F32 training, BF16
// operands with FP32 accumulation under `--precision bf16` and `fp8` alike — the head is one of the
// parts the FP8 recipe keeps in higher precision ([V3] §3.3.1), and BF16 is what transformers runs
// it in. Inference (infer/runner.h) does not come here.
#pragma once
#include "model/model.h"

namespace dsv3 {

void head_forward(Backend& be, const LinearParam& p, const Tensor& x, const Tensor& y);
// dx = dy·W (accumulate_dx: +=), dW += dyᵀ·x.
void head_backward(Backend& be, const LinearParam& p, const LinearParam& g, const Tensor& x, const Tensor& dy,
                   const Tensor& dx, bool accumulate_dx);

}  // namespace dsv3
