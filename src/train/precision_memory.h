// Activation memory per token that the backward needs from the linear layers, per training precision
// (`dsv3 info --train`; docs/fp8.md). Counted: the input of every linear layer the precision applies
// to (q_a/q_b or q, kv_a, kv_b, o_proj, dense MLP, routed experts once per pick, shared experts, MTP
// eh_proj) and the SwiGLU inputs (gate and up outputs) of every MLP. Inputs shared by several
// projections (x of q_a and kv_a; x of gate and up) count once; down_proj's input silu(gate)·up is
// recomputed from the cached SwiGLU inputs, as [V3] §3.3.3 does. FP8 is E4M3 plus one FP32 scale per
// 1×128 tile of each cached tensor (partial tiles count whole), which is what the model stores
// (tests/train/fp8_cache_test.cpp compares it with a forward's caches). Not counted (the same in every
// precision, kept in BF16/FP32): norms' outputs and rstd, attention q/k/v/out/lse, router state,
// residual stream, the lm_head input.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"

namespace dsv3 {

struct PrecisionActivationBytes {
  std::string precision;       // fp32 | bf16 | fp8
  double bytes_per_elem = 0;   // 4, 2, or about 1 + 4/128 for fp8 (total / elements)
  int64_t elements = 0;        // cached elements per token (same for every precision)
  double linear_inputs = 0;    // bytes per token
  double swiglu_inputs = 0;    // bytes per token
  double total() const { return linear_inputs + swiglu_inputs; }
};
std::vector<PrecisionActivationBytes> activation_bytes_per_token(const ModelConfig& c);

}  // namespace dsv3
