// BF16 tensor-core flash attention for training (forward and backward) on the CUDA backend.
// Plain C++: the trainer and tests include it. When the flag is on, CudaBackend::attention and
// attention_backward take these kernels for the shapes they support (head dims multiples of 16,
// qk ≤ 256, v ≤ 128); everything else keeps the exact FP32 kernels. Semantics: q, k, v, dout
// rounded to BF16 (RNE) as MMA operands, P and dS rounded to BF16 for their products, FP32
// accumulation and softmax statistics, FP32 outputs — compared with the FP32 reference under kBf16.
#pragma once

#include <cstdint>

namespace dsv3 {

// Process-wide; off by default (the FP32 kernels run, bit for bit as before).
void cuda_set_attention_bf16(bool on);
bool cuda_attention_bf16();

// dQ of the backward: from the dk/dv kernel's stored BF16 dSᵀ by a cuBLASLt matmul (on by default;
// DSV3_ATTN_DQ_MATMUL=0 turns it off) or by its own kernel (off, or dSᵀ over 2 GiB). Both round
// the same dS to BF16; only the order of the FP32 sums differs.
void cuda_set_attention_dq_matmul(bool on);
bool cuda_attention_dq_matmul();
// Backward calls in this process whose dQ took the matmul (tests: which path ran).
int64_t cuda_attention_dq_matmuls();
// The forward and the dk/dv kernel on Hopper's wgmma (on by default; DSV3_ATTN_WGMMA=0 turns it off)
// or on mma.sync: the same roundings, only the order of the FP32 sums differs. Forward and backward
// calls that took wgmma, one count each (tests).
void cuda_set_attention_wgmma(bool on);
bool cuda_attention_wgmma();
int64_t cuda_attention_wgmma_calls();
// Causal dQ matmul in n blocks of query rows, each over the keys its last row sees (default 4,
// DSV3_ATTN_DQ_BLOCKS; 1 is the whole square): the same nonzero products, in the matmul's order.
void cuda_set_attention_dq_blocks(int n);
int cuda_attention_dq_blocks();
// The query rows per block for T queries in n blocks (rounded up to 64; the last block may be short).
int64_t cuda_attention_dq_block_rows(int64_t t, int n);

// Calls (forward and backward, one count each) that read MLA's split form (AttentionArgs::kv, k_pe)
// in place rather than composing it (tests).
int64_t cuda_attention_split_in_place();

// Whether the BF16 kernels take a problem with these head dims.
bool cuda_attention_bf16_supported(int64_t dqk, int64_t dv);

struct AttentionArgs;
struct AttentionBackwardArgs;
// The kernels themselves, regardless of the flag (args already validated, device tensors). They
// return false, doing nothing, when the head dims are not supported. The backward needs the lse
// the forward wrote (either path's: both are the FP32 logsumexp of the scaled logits).
bool cuda_attention_bf16_forward(const AttentionArgs& a);
bool cuda_attention_bf16_backward(const AttentionBackwardArgs& a);

}  // namespace dsv3
