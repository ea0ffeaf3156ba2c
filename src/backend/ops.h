// The op interface: every computation the model, trainer and inference engine run goes through one
// virtual method of `Backend`, taking one typed argument struct. The CPU backend (FP32, OpenBLAS,
// OpenMP) is the reference; a CUDA backend implements the same methods unchanged.
//
// Conventions (all ops):
// - Tensors are dense row-major views (`Tensor::rows`, `reshape`); shapes are written [dim, ...] in
//   PyTorch order (last dim contiguous). "[..., K]" means any leading dims, flattened to rows.
// - Activations, gradients and optimizer state are F32. Weights may stay in their stored dtype (F32,
//   BF16, F16, or F8_E4M3 with a block scale) and are converted inside the op, so a loaded model's
//   resident size is about its file size.
// - Outputs are overwritten unless the struct has `accumulate = true` (then out += result).
//   Optional tensors are "absent" when default-constructed (`!t.defined()` or numel 0 — use
//   `present(t)`).
// - An output may alias an input only where the struct says so.
// - Every op validates shapes and dtypes through `validate(args)` (ops.cpp), the one place these
//   rules live; a mismatch is a bug in the caller and throws InternalError naming the op and shapes.
//   Data-dependent errors (a token id outside the vocabulary) throw InputError.
// - Deterministic: for a given thread count (CPU) the result bits do not depend on scheduling;
//   reductions run in a fixed order and scatter-adds have one owner per output row.
#pragma once
#include <cstdint>
#include <exception>
#include <span>
#include <string>

#include "core/tensor.h"

namespace dsv3 {

class Backend;

// DeepSeek-V3 checkpoints store FP8 weights with one F32 scale per 128×128 block.
constexpr int64_t kFp8Block = 128;

inline bool present(const Tensor& t) { return t.defined() && t.numel() > 0; }

// ---------------------------------------------------------------------------------------------
// 1. Linear (no bias: DeepSeek's projections have none).
// y[..., N] (+)= x[..., K] · Wᵀ.  w: [N, K] in F32, BF16, F16 or F8_E4M3. For F8_E4M3,
// w_scale_inv: F32 [ceil(N/128), ceil(K/128)]; element (n, k) dequantizes to
// fp8(w[n,k]) × w_scale_inv[n/128, k/128] (edge blocks are partial). y must not alias x.
struct LinearArgs {
  Tensor x;            // [..., K] F32
  Tensor w;            // [N, K]
  Tensor w_scale_inv;  // F8_E4M3 only
  Tensor y;            // [..., N] F32
  bool accumulate = false;
};
// dx[..., K] (+)= dy · W;  dw[N, K] (+)= dyᵀ · x (F32). Either output may be absent.
struct LinearBackwardArgs {
  Tensor dy;  // [..., N] F32
  Tensor x;   // [..., K] F32 (needed for dw)
  Tensor w;   // [N, K], as in LinearArgs (needed for dx)
  Tensor w_scale_inv;
  Tensor dx;  // [..., K] F32, optional
  Tensor dw;  // [N, K] F32, optional
  bool accumulate_dx = false;
  bool accumulate_dw = false;
};
// The MoE experts' projections in one call: y[r] (+)= x[r]·W_eᵀ for the rows r of block e, blocks of
// consecutive rows (offsets, host: offsets[0] = 0, non-decreasing, offsets.back() = rows), one weight
// per block, all [N, K] of one dtype (F8_E4M3 with its scale_inv per block). The default runs linear
// on each block's rows; a GPU may batch the blocks' products (within linear's tolerance class, not
// bit for bit: its algorithm can depend on the other blocks' sizes).
struct GroupedLinearArgs {
  Tensor x;                             // [M, K] F32
  std::span<const Tensor> w;            // one [N, K] per block
  std::span<const Tensor> w_scale_inv;  // F8_E4M3: one per block; empty otherwise
  std::span<const int64_t> offsets;     // blocks + 1
  Tensor y;                             // [M, N] F32, not aliasing x
  bool accumulate = false;
};
// General F32 matrix product c[M,N] (+)= alpha · op(a) · op(b), op = transpose when the flag is set
// (a is [M,K] or [K,M]; b is [K,N] or [N,K]).
struct MatmulArgs {
  Tensor a, b, c;
  bool trans_a = false, trans_b = false;
  float alpha = 1.0f;
  bool accumulate = false;
};

// ---------------------------------------------------------------------------------------------
// 2. Embedding. out[t] = table[ids[t]] as F32. ids outside [0, V) → InputError.
struct EmbeddingArgs {
  Tensor ids;    // [T] I32
  Tensor table;  // [V, D] any float dtype
  Tensor out;    // [T, D] F32
};
// dtable[ids[t]] += dout[t] for every t (always accumulates; deterministic, no atomics).
struct EmbeddingBackwardArgs {
  Tensor ids;     // [T] I32
  Tensor dout;    // [T, D] F32
  Tensor dtable;  // [V, D] F32
};

// ---------------------------------------------------------------------------------------------
// 3. RMSNorm as HF DeepseekV3RMSNorm (in FP32): y = weight · x · rstd, rstd = 1/sqrt(mean(x²) + eps).
// y may alias x. rstd is saved for the backward (optional in inference).
struct RmsNormArgs {
  Tensor x;       // [M, D] F32 (or [..., D])
  Tensor weight;  // [D] any float dtype
  float eps = 1e-6f;
  Tensor y;     // like x, F32
  Tensor rstd;  // [M] F32, optional output
};
// dx (+)= ∂L/∂x; dweight (+)= Σ_rows dy · x · rstd (F32 [D], optional). dx may alias dy.
struct RmsNormBackwardArgs {
  Tensor dy, x, weight, rstd;  // rstd from the forward
  Tensor dx;
  Tensor dweight;
  bool accumulate_dx = false;
  bool accumulate_dweight = false;
};

// ---------------------------------------------------------------------------------------------
// 4. Rotary embedding, IN PLACE on x[t, h, offset : offset + rope_dim], pair i (i < rope_dim/2)
// rotated by the angle of table row a = positions[t]:
//   (x[p], x[q]) ← (x[p]·cos[a,i] − x[q]·sin[a,i],  x[q]·cos[a,i] + x[p]·sin[a,i]),
// with (p, q) = (2i, 2i+1) when interleaved (HF `rope_interleave: true`, DeepSeek-V3's default), or
// (i, i + rope_dim/2) otherwise (HF apply_rotary_pos_emb / rotate_half).
// Output order (interleaved): the rotated pair stays at (2i, 2i+1), as the original DeepSeek code
// and HF DeepSeek-V2 do. HF DeepSeek-V3 writes [rotated evens..., rotated odds...] instead; q and k
// get the same permutation, so q·k and attention are identical — only raw q_pe/k_pe dumps differ.
// inverse = true rotates by −angle: that is the backward (apply it to the gradient in place).
struct RopeArgs {
  Tensor x;          // [T, H, W] F32, modified in place
  Tensor positions;  // [T] I32, each in [0, max_pos)
  Tensor cos, sin;   // [max_pos, rope_dim/2] F32, from rope_tables (attention factor included)
  int64_t offset = 0;
  int64_t rope_dim = 0;  // even, offset + rope_dim <= W
  bool interleaved = true;
  bool inverse = false;
};

// RoPE configuration in HF's words (config.json `rope_theta`, `qk_rope_head_dim`,
// `max_position_embeddings`, and `rope_scaling` (hub) / `rope_parameters` (transformers 5)).
// type "default" or "yarn". Resolution as transformers 5.17 `_compute_yarn_parameters`:
//   factor absent → max_position_embeddings / original_max_position_embeddings;
//   original_max_position_embeddings absent → max_position_embeddings;
//   attention_factor absent → mscale(factor, mscale)/mscale(factor, mscale_all_dim) when both are
//   non-zero, else mscale(factor, 1); beta_fast/beta_slow 0 → 32/1.
struct RopeParams {
  std::string type = "default";
  double theta = 10000.0;
  int64_t dim = 64;  // qk_rope_head_dim
  int64_t max_position_embeddings = 2048;
  // YaRN fields; 0 / negative means "absent in the config".
  double factor = 0.0;
  int64_t original_max_position_embeddings = 0;
  double beta_fast = 0.0, beta_slow = 0.0;
  double mscale = 0.0, mscale_all_dim = 0.0;
  double attention_factor = -1.0;
  bool truncate = true;
};
struct RopeTables {
  Tensor cos, sin;               // [max_pos, dim/2] F32 on the CPU, attention factor applied
  Tensor inv_freq;               // [dim/2] F32
  double attention_factor = 1.0;  // the factor folded into cos and sin
};
// cos/sin for positions [0, max_pos) as HF computes them: inv_freq rounded to FP32 (YaRN: the
// blend of interpolation 1/(factor·θ^(2i/d)) and extrapolation 1/θ^(2i/d) with the linear ramp
// between the correction dims of beta_fast/beta_slow at original_max_position_embeddings), the
// angle position·inv_freq in FP32, cos/sin of it times the attention factor.
RopeTables rope_tables(const RopeParams& p, int64_t max_pos);
// HF's yarn_get_mscale: 0.1·mscale·ln(scale) + 1 for scale > 1, else 1.
double yarn_get_mscale(double scale, double mscale);
// The softmax scale of HF DeepseekV3Attention / DeepseekV2Attention (yarn_apply_mscale):
// qk_head_dim^-0.5, times yarn_get_mscale(factor, mscale_all_dim)² when type != "default" and
// mscale_all_dim is non-zero. `factor` here is the config's value (not derived).
double rope_softmax_scale(const RopeParams& p, int64_t qk_head_dim);

// ---------------------------------------------------------------------------------------------
// 5. Attention: out = softmax(q·kᵀ·scale + mask)·v, exact FP32. Optional leading batch dim B.
// Causal: query i sits at absolute position q_offset + i and sees keys 0..q_offset+i (chunked
// prefill); requires S >= q_offset + T. Not causal: every query sees every key.
// MLA's keys and values may come split, as the layer makes them (kv and k_pe given, k and v
// absent): kv [B?, S, H, Dn + Dv] is kv_b_proj's output, k_pe [B?, S, 1, Dr] the rotated key part
// all heads share, Dn + Dr = Dqk; then k = [kv[..., :Dn] ; k_pe] per head and v = kv[..., Dn:].
// A backend may read them in place; attention_split_kv is the composition every backend can use.
struct AttentionArgs {
  Tensor q;    // [B?, T, H, Dqk] F32
  Tensor k;    // [B?, S, H, Dqk] F32  (absent in the split form)
  Tensor v;    // [B?, S, H, Dv] F32  (Dv may differ from Dqk; absent in the split form)
  Tensor out;  // [B?, T, H, Dv] F32
  Tensor lse;  // [B?, H, T] F32 logsumexp of the scaled logits, optional (needed for backward)
  float scale = 1.0f;
  bool causal = true;
  int64_t q_offset = 0;
  Tensor kv, k_pe;  // the split form, F32 (above)
  // Optional out: a backend may leave here what its backward reads in place of q, k and v (or kv
  // and k_pe); opaque to the caller, who hands it back as AttentionBackwardArgs::kept. The CUDA BF16
  // kernels leave their BF16 heads of Q, K and V (the roundings the backward would repeat). A
  // forward that keeps nothing leaves it undefined: what an earlier call left is never handed on.
  Tensor* keep = nullptr;
};
// dq, dk, dv overwritten (each optional). Uses out and lse from the forward. In the split form
// dkv (as kv: dk's first Dn columns, then dv) and dk_pe (as k_pe: dk's last Dr columns summed over
// the heads) stand for dk and dv.
struct AttentionBackwardArgs {
  Tensor q, k, v, out, lse, dout;
  Tensor dq, dk, dv;
  float scale = 1.0f;
  bool causal = true;
  int64_t q_offset = 0;
  Tensor kv, k_pe, dkv, dk_pe;  // the split form and its gradients (each optional; F32, or dkv BF16:
                                // its F32 values rounded to nearest even, what a BF16 linear reads)
  // What the forward left in *keep, or undefined. With it q and the split form's kv may be absent
  // (dq and dkv, then required, give their shapes): only the backend that kept it can run that.
  Tensor kept{};  // (braced: the positional initializers in use may leave it out)
};
// q's and kv's shapes: theirs, or dq's and dkv's where kept operands stand for them (validated).
inline const Tensor& q_or_dq(const AttentionBackwardArgs& a) { return a.q.defined() ? a.q : a.dq; }
inline const Tensor& kv_or_dkv(const AttentionBackwardArgs& a) { return a.kv.defined() ? a.kv : a.dkv; }
// Refuses, naming it, a q or kv left out for kept operands on a path that cannot read them; why
// says which path that is.
void require_operands(const AttentionBackwardArgs& a, const char* why);
// The split form through the plain op: k and v materialized by copy_cols, then be.attention; the
// backward assembles dkv and dk_pe from dk and dv (copy_cols, the heads summed in order 0..H-1).
// Args validated here.
void attention_split_kv(Backend& be, const AttentionArgs& a);
void attention_backward_split_kv(Backend& be, const AttentionBackwardArgs& a);

// ---------------------------------------------------------------------------------------------
// 6. SwiGLU: out = silu(gate) · up, silu(g) = g·sigmoid(g). out may alias gate or up.
struct SwigluArgs {
  Tensor gate, up;  // [M, F] F32
  Tensor out;       // [M, F] F32, or BF16 (each value rounded once, RNE)
};
// dgate, dup (+)= ...; may alias dout (elementwise). Either may be BF16 without accumulate.
struct SwigluBackwardArgs {
  Tensor dout, gate, up;
  Tensor dgate, dup;
  bool accumulate = false;
};

// ---------------------------------------------------------------------------------------------
// 7. MoE router (DESIGN §3), from gate logits (the gate linear is a `linear` call):
//   scores s = sigmoid(logits) (V3) or softmax over experts (V2), FP32;
//   choice c = s + bias (bias absent for V2);
//   groups: `noaux_tc` group score = sum of the top-2 c in each of n_group groups;
//           `group_limited_greedy` = max c per group; `greedy` = no groups;
//   keep topk_group groups; experts of other groups are excluded (c = −inf, as transformers 5.17's
//   V3 router; its V2 router fills 0.0, which gives the same picks because softmax scores are > 0);
//   pick top_k experts by c; weights = s of the picks, divided by (Σ + 1e-20) when norm_topk_prob,
//   times routed_scaling_factor.
// Ties (groups and experts): the lower index wins, as torch.topk on the CPU. ids are written in
// order of decreasing c (ties by lower index).
// HF mapping: V3 (transformers 5.17 DeepseekV3TopkRouter) = Sigmoid, NoauxTc, bias, its
// norm_topk_prob; V2 (DeepseekV2TopkRouter) = Softmax, `topk_method`, no bias, norm_topk_prob
// false (5.17's V2 router ignores the field and always multiplies by routed_scaling_factor).
enum class RouterScoring : uint8_t { Sigmoid, Softmax };
enum class RouterMethod : uint8_t { NoauxTc, GroupLimitedGreedy, Greedy };
struct RouterArgs {
  Tensor logits;  // [T, E] F32
  Tensor bias;    // [E] any float dtype (e_score_correction_bias), optional
  RouterScoring scoring = RouterScoring::Sigmoid;
  RouterMethod method = RouterMethod::NoauxTc;
  int n_group = 1, topk_group = 1, top_k = 1;
  bool norm_topk_prob = true;
  float routed_scaling_factor = 1.0f;
  Tensor scores;   // [T, E] F32 output: s (saved for the backward and the balance loss)
  Tensor ids;      // [T, top_k] I32 output
  Tensor weights;  // [T, top_k] F32 output
};
// dlogits (+)= ∂L/∂logits through the weights only (selection is piecewise constant; the bias gets
// no gradient).
struct RouterBackwardArgs {
  Tensor scores, ids, dweights;  // scores/ids from the forward; dweights [T, top_k]
  RouterScoring scoring = RouterScoring::Sigmoid;
  bool norm_topk_prob = true;
  float routed_scaling_factor = 1.0f;
  Tensor dlogits;  // [T, E] F32
  bool accumulate = false;
};

// ---------------------------------------------------------------------------------------------
// 8. MoE data movement.
// Sort the T·k picks by expert (stable: by flat index t·k+j within an expert):
//   pick[r] = flat index of the r-th sorted pick, token[r] = pick[r] / k,
//   counts[e] = picks of expert e (so expert e owns rows offsets[e]..offsets[e]+counts[e]).
// counts is also the per-expert load for balancing.
struct MoeSortArgs {
  Tensor ids;     // [T, k] I32 (from router)
  int64_t n_experts = 0;
  Tensor pick;    // [T·k] I32 output
  Tensor token;   // [T·k] I32 output
  Tensor counts;  // [E] I32 output
};
// out[i] (+)= weight[i] · src[idx[i]]  (weight optional = 1).
struct GatherRowsArgs {
  Tensor src;     // [R, D] F32
  Tensor idx;     // [N] I32 in [0, R)
  Tensor weight;  // [N] F32, optional
  Tensor out;     // [N, D] F32, or BF16 without accumulate (each value rounded once, RNE)
  bool accumulate = false;
};
// out[idx[i]] += weight[i] · src[i] for i in order (weight optional = 1). Always accumulates.
// Deterministic: each output row is owned by one thread, which adds its sources in ascending i.
struct ScatterAddRowsArgs {
  Tensor src;     // [N, D] F32
  Tensor idx;     // [N] I32 in [0, R)
  Tensor weight;  // [N] F32, optional
  Tensor out;     // [R, D] F32
};
// Backward of scatter_add_rows: dsrc[i] (+)= weight[i]·dout[idx[i]]; dweight[i] (+)= dout[idx[i]]·src[i].
struct ScatterAddRowsBackwardArgs {
  Tensor dout, src, idx, weight;  // weight optional
  Tensor dsrc;     // [N, D] F32, or BF16 without accumulate; optional
  Tensor dweight;  // [N], optional
  bool accumulate = false;
};

// ---------------------------------------------------------------------------------------------
// 9. Softmax cross-entropy over the vocabulary, fused with its gradient.
// loss[t] = logsumexp(logits[t]) − logits[t, target[t]]; 0 where target = −1 (ignored).
// dlogits[t] = grad_scale · (softmax(logits[t]) − onehot(target)) (0 rows where ignored);
// dlogits may alias logits (saves a [T, V] buffer). loss_sum[0] = Σ loss (optional).
// target outside [−1, V) → InputError.
struct CrossEntropyArgs {
  Tensor logits;   // [T, V] F32
  Tensor targets;  // [T] I32
  Tensor loss;     // [T] F32 output, optional
  Tensor loss_sum;  // [1] F32 output, optional
  Tensor dlogits;  // [T, V] F32 output, optional
  float grad_scale = 1.0f;
};

// ---------------------------------------------------------------------------------------------
// 10. Elementwise and misc. Shapes: same numel unless stated; out may alias an input.
struct AddArgs {  // out = alpha·a + beta·b
  Tensor a, b, out;
  float alpha = 1.0f, beta = 1.0f;
};
struct ScaleArgs {  // out = s·x
  Tensor x, out;
  float s = 1.0f;
};
struct MulArgs {  // out (+)= a·b elementwise
  Tensor a, b, out;
  bool accumulate = false;
};
struct CopyArgs {  // dst = src converted to dst's dtype (any float dtypes, or I32→I32); dst may
                   // overlap src only in the same dtype (a move, as memmove)
  Tensor src, dst;
};
// Whether the bytes of a and b overlap (copy: only a move may).
inline bool bytes_overlap(const Tensor& a, const Tensor& b) {
  const uintptr_t x = reinterpret_cast<uintptr_t>(a.raw()), y = reinterpret_cast<uintptr_t>(b.raw());
  return a.nbytes() && b.nbytes() && y < x + size_t(a.nbytes()) && x < y + size_t(b.nbytes());
}
struct FillArgs {
  Tensor x;
  float value = 0.0f;
};
// Copy a column block: viewing src as [Rs, Cs] and dst as [Rd, Cd] (last dim = columns),
// dst[r, dst_col + c] (+)= src[r', src_col + c] for c < width, where
//   Rs == Rd: r' = r;   Rd = Rs·n: broadcast, r' = r / n;   Rs = Rd·n: dst row r gets the SUM of
//   src rows r·n .. r·n+n−1 (the backward of the broadcast).
// Concat, split, and MLA's shared k_pe broadcast over heads are all this op.
struct CopyColsArgs {
  Tensor src;
  int64_t src_col = 0;
  Tensor dst;
  int64_t dst_col = 0;
  int64_t width = 0;
  bool accumulate = false;
};
// out[0] (+)= Σ x² (accumulated in double on the CPU); for the global gradient norm.
struct SumSquaresArgs {
  Tensor x;    // F32
  Tensor out;  // [1] F32
  bool accumulate = false;
};
// AdamW exactly as torch.optim.AdamW (decoupled decay), on g = grad_scale · grad:
//   p ← p − lr·wd·p;  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;
//   p ← p − (lr / (1−β1^step)) · m / (sqrt(v) / sqrt(1−β2^step) + eps).
// m and v are F32 or BF16 (rounded to nearest after each update).
struct AdamWArgs {
  Tensor param, grad, m, v;
  float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.0f;
  float grad_scale = 1.0f;
  int64_t step = 1;  // 1-based, after increment
  // Optional, F32 or BF16: the updated param written again (the trainer's compute weights; BF16
  // rounded to nearest even), sparing a pass that reads param back.
  Tensor param_copy;
};

// ---------------------------------------------------------------------------------------------
class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;

  // Memory. alloc gives uninitialised storage on this backend's device.
  virtual Tensor alloc(DType t, const Shape& s) = 0;
  Tensor zeros(DType t, const Shape& s);
  // A copy of a CPU tensor on this device / a CPU copy of a tensor of this device.
  virtual Tensor to_device(const Tensor& host) = 0;
  virtual Tensor to_host(const Tensor& t) = 0;
  // Wait until queued work is finished (no-op on the CPU).
  virtual void synchronize() {}

  virtual void linear(const LinearArgs&) = 0;
  virtual void linear_backward(const LinearBackwardArgs&) = 0;
  virtual void matmul(const MatmulArgs&) = 0;
  virtual void embedding(const EmbeddingArgs&) = 0;
  virtual void embedding_backward(const EmbeddingBackwardArgs&) = 0;
  virtual void rmsnorm(const RmsNormArgs&) = 0;
  virtual void rmsnorm_backward(const RmsNormBackwardArgs&) = 0;
  virtual void rope(const RopeArgs&) = 0;
  virtual void attention(const AttentionArgs&) = 0;
  virtual void attention_backward(const AttentionBackwardArgs&) = 0;
  virtual void swiglu(const SwigluArgs&) = 0;
  virtual void swiglu_backward(const SwigluBackwardArgs&) = 0;
  virtual void router(const RouterArgs&) = 0;
  virtual void router_backward(const RouterBackwardArgs&) = 0;
  virtual void moe_sort(const MoeSortArgs&) = 0;
  virtual void gather_rows(const GatherRowsArgs&) = 0;
  virtual void scatter_add_rows(const ScatterAddRowsArgs&) = 0;
  virtual void scatter_add_rows_backward(const ScatterAddRowsBackwardArgs&) = 0;
  virtual void cross_entropy(const CrossEntropyArgs&) = 0;
  virtual void add(const AddArgs&) = 0;
  virtual void scale(const ScaleArgs&) = 0;
  virtual void mul(const MulArgs&) = 0;
  virtual void copy(const CopyArgs&) = 0;
  virtual void fill(const FillArgs&) = 0;
  virtual void copy_cols(const CopyColsArgs&) = 0;
  virtual void sum_squares(const SumSquaresArgs&) = 0;
  virtual void adamw(const AdamWArgs&) = 0;

  // The optimizer's per-parameter work over many tensors in one call: each element as the single
  // op computes it. On a GPU one launch walks all the tensors, not one launch per tensor (a
  // bench-0.7b step has ~1,200 parameter tensors). sum_squares_many: out (+)= the sum of squares
  // over all xs (on CUDA summed in double across the tensors and rounded once; here tensor by
  // tensor, as sum_squares with accumulate).
  virtual void adamw_many(std::span<const AdamWArgs> a) {
    for (const AdamWArgs& x : a) adamw(x);
  }
  virtual void fill_many(std::span<const FillArgs> a) {
    for (const FillArgs& x : a) fill(x);
  }
  virtual void copy_many(std::span<const CopyArgs> a) {
    for (const CopyArgs& x : a) copy(x);
  }
  virtual void sum_squares_many(std::span<const Tensor> xs, const Tensor& out, bool accumulate) {
    for (size_t i = 0; i < xs.size(); ++i) sum_squares(SumSquaresArgs{xs[i], out, accumulate || i > 0});
    if (xs.empty() && !accumulate) fill(FillArgs{out, 0.0f});
  }

  // One linear per non-empty block unless a backend batches them.
  virtual void grouped_linear(const GroupedLinearArgs& a);

  // Independent work that may overlap: between begin_lanes and end_lanes, ops issued after lane(i)
  // (i ≥ 0) may run concurrently with those issued after lane(j), i ≠ j (the MoE's per-expert GEMMs,
  // too small each to fill a GPU). Ops of one lane keep their order; end_lanes orders everything
  // after it behind all of them. No op may read or write what another lane writes. One scope at a
  // time (no nesting), begun and ended on one thread. Here (and on the CPU) every op runs in issue
  // order.
  virtual void begin_lanes() {}
  virtual void lane(int64_t i) { (void)i; }
  virtual void end_lanes() {}
};

// dst[:, dst_col : dst_col+width] = src[:, src_col : src_col+width] as one be.copy_cols (rows
// broadcast or summed as CopyColsArgs says).
void copy_cols(Backend& be, const Tensor& src, int64_t src_col, const Tensor& dst, int64_t dst_col, int64_t width);

// The process-wide CPU backend.
Backend& cpu_backend();
// "cpu" or "cuda" (the latter needs a CUDA build and a device); InputError otherwise.
Backend& backend_named(const std::string& device);

// begin_lanes … end_lanes for a scope (on = false: no lanes, ops in issue order). end_lanes runs
// also when an op throws; its own error then gives way to the one in flight.
class LaneScope {
 public:
  explicit LaneScope(Backend& be, bool on = true) : be_(be), on_(on), unwinding_(std::uncaught_exceptions()) {
    if (on_) be_.begin_lanes();
  }
  ~LaneScope() noexcept(false) {
    if (!on_) return;
    if (std::uncaught_exceptions() == unwinding_) {
      be_.end_lanes();
      return;
    }
    try {
      be_.end_lanes();
    } catch (...) {
    }
  }
  LaneScope(const LaneScope&) = delete;
  LaneScope& operator=(const LaneScope&) = delete;
  void operator()(int64_t i) {
    if (on_) be_.lane(i);
  }

 private:
  Backend& be_;
  bool on_;
  int unwinding_;
};

// Shape/dtype rules of each op, shared by every backend (ops.cpp). Throw InternalError naming the op.
void validate(const LinearArgs&);
void validate(const LinearBackwardArgs&);
void validate(const GroupedLinearArgs&);
// The reduced-precision linear layer's rules (backend/fp8.h): x (and dy) may also be BF16.
void validate(const LinearArgs&, bool bf16_x);
void validate(const LinearBackwardArgs&, bool bf16_operands);
void validate(const GroupedLinearArgs&, bool bf16_x);
void validate(const MatmulArgs&);
void validate(const EmbeddingArgs&);
void validate(const EmbeddingBackwardArgs&);
void validate(const RmsNormArgs&);
void validate(const RmsNormBackwardArgs&);
void validate(const RopeArgs&);
void validate(const AttentionArgs&);
void validate(const AttentionBackwardArgs&);
void validate(const SwigluArgs&);
void validate(const SwigluBackwardArgs&);
void validate(const RouterArgs&);
void validate(const RouterBackwardArgs&);
void validate(const MoeSortArgs&);
void validate(const GatherRowsArgs&);
void validate(const ScatterAddRowsArgs&);
void validate(const ScatterAddRowsBackwardArgs&);
void validate(const CrossEntropyArgs&);
void validate(const AddArgs&);
void validate(const ScaleArgs&);
void validate(const MulArgs&);
void validate(const CopyArgs&);
void validate(const FillArgs&);
void validate(const CopyColsArgs&);
void validate(const SumSquaresArgs&);
void validate(const AdamWArgs&);

}  // namespace dsv3
