// The DeepSeek-V3 (and V2) forward pass, written once against the op interface (backend/ops.h).
//
//   tokens [B, T] → embed_tokens → decoder layers (MLA + dense MLP or DeepSeekMoE) → model.norm = h⁰
//   logits = lm_head(h⁰)                                                          [B·T, vocab]
//   MTP module k = 1..D (hub prefix model.layers.{L+k−1}., DESIGN §3):
//     x   = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k−1}_i)])        i < T−k   (embedding first)
//     h^k = decoder block(x) at positions 0..T−k−1, causal             (before shared_head.norm)
//     mtp_logits_k = head(shared_head.norm(h^k))                         [B·(T−k), vocab]
//   mtp_logits_k[b, i] predicts token i+k+1 of sequence b. The head is lm_head (shared, as in
//   training; the hub's shared_head.head copy holds the same values).
//
// Every module's forward is a flat sequence of op calls (mla.cpp, moe.cpp, mtp.cpp, model.cpp) that
// leaves what a backward needs in an explicit activations struct (the *Acts types below): inputs of
// each linear, RMSNorm rstd, attention out/lse, router scores/ids/weights, the MoE sort. A backward
// (training) walks the same structs in reverse. Plain, non-absorbed MLA only: the latent-cache decode
// of inference is a separate path (it can reuse MlaActs::c_kv_n and k_pe, which are what it caches).
//
// Usage:
//   Weights w = Weights::load(dir);           // or Weights::random(cfg, seed)
//   Model m(w, cpu_backend());
//   ForwardOutput out = m.forward(ids, B, T);  // ids: B·T token ids, row-major [B, T]
//   out.logits [B·T, V]; out.mtp_logits[k−1] [B·(T−k), V]; m.acts() holds the activations when
//   ForwardOptions::keep_activations is set.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "backend/fp8.h"
#include "backend/ops.h"
#include "model/config.h"
#include "model/weights.h"

namespace dsv3 {

// ---------------------------------------------------------------------------------------------
// Parameters bound for compute: views of Weights (no copies), grouped per module.
struct LinearParam {
  Tensor w;          // [N, K] stored dtype
  Tensor scale_inv;  // F8_E4M3 only
  Tensor bias;       // [N], optional (attention_bias)
  bool lowp = false; // the training precision (backend/fp8.h LinearPrecision) applies: not lm_head, router gate
};
struct MlaParams {
  LinearParam q_proj;               // q_lora_rank null
  LinearParam q_a_proj, q_b_proj;   // q_lora_rank set
  Tensor q_a_layernorm;
  LinearParam kv_a_proj_with_mqa;
  Tensor kv_a_layernorm;
  LinearParam kv_b_proj, o_proj;
};
struct MlpParams {
  LinearParam gate_proj, up_proj, down_proj;
};
struct MoeParams {
  LinearParam gate;                 // router [E, H]
  Tensor e_score_correction_bias;   // [E] (V3 noaux_tc), optional
  std::vector<MlpParams> experts;
  bool has_shared = false;
  MlpParams shared_experts;
};
struct LayerParams {
  int64_t index = 0;  // layer index in the hub naming
  Tensor input_layernorm, post_attention_layernorm;
  MlaParams attn;
  bool is_moe = false;
  MlpParams mlp;  // dense layers
  MoeParams moe;  // MoE layers
};
struct MtpParams {
  Tensor enorm, hnorm;
  LinearParam eh_proj;  // [H, 2H]
  LayerParams block;
  Tensor shared_head_norm;
};
struct ModelParams {
  Tensor embed_tokens;  // [V, H]
  std::vector<LayerParams> layers;
  Tensor norm;
  LinearParam lm_head;  // embed_tokens when tie_word_embeddings
  std::vector<MtpParams> mtp;
};
ModelParams bind_params(const Weights& w);

// ---------------------------------------------------------------------------------------------
// Activations (F32, on the backend's device). N = B·T rows; nh heads.
struct MlaActs {
  Tensor x;         // [N, H]           input (after input_layernorm)
  Tensor q_a;       // [N, q_lora]      q_a_proj(x)                      (q_lora_rank set)
  Tensor q_a_rstd;  // [N]
  Tensor q_a_n;     // [N, q_lora]      q_a_layernorm(q_a)
  Tensor q;         // [N, nh, qk]      [q_nope ; rope(q_pe)] per head (released as kv, below)
  Tensor kv_a;      // [N, kv_lora + rope]  kv_a_proj_with_mqa(x), unrotated
  Tensor c_kv_rstd; // [N]
  Tensor c_kv_n;    // [N, kv_lora]     kv_a_layernorm(c_kv)     (the latent a cache stores)
  Tensor k_pe;      // [N, rope]        rope(k_pe), shared by all heads (the other cached part)
  Tensor kv;        // [N, nh, nope + v] kv_b_proj(c_kv_n): [k_nope ; v] per head (keys k_nope ; k_pe);
                    // released after the forward where the attention kept its operands
  Tensor kept;      // the attention's own copy of q, k, v for its backward (AttentionArgs::keep), or empty
  Tensor attn;      // [N, nh, v]       softmax(q·kᵀ·scale)·v
  Tensor lse;       // [B, nh, T]
  Tensor out;       // [N, H]           o_proj(attn)
  // --precision fp8: the FP8 copies of the linear inputs the backward's Wgrad reads ([V3] §3.3.3):
  // x (shared by q_a/q and kv_a), q_a_n (q_b), c_kv_n (kv_b), attn (o_proj). Empty otherwise.
  Fp8Tiles x_fp8, q_a_n_fp8, c_kv_n_fp8, attn_fp8;
};
// F32, except that --precision bf16 keeps the tensors whose only readers are BF16 matmuls in BF16
// (bf16_activations in model/moe.cpp): act, and the routed experts' gathered x.
struct MlpActs {
  Tensor x;     // [M, H]
  Tensor gate;  // [M, I]  (these three empty after an FP8 forward: their tiles below stand in)
  Tensor up;    // [M, I]
  Tensor act;   // [M, I]  silu(gate)·up
  Tensor out;   // [M, H]
  // --precision fp8: x in FP8 (shared by gate and up) and the SwiGLU inputs gate, up in FP8; the
  // backward recomputes act (down_proj's input) from them. Empty otherwise.
  Fp8Tiles x_fp8, gate_fp8, up_fp8;
  // --precision bf16: act's BF16 copy (act itself where act is BF16), down_proj's input in the
  // forward and in its Wgrad (x's is in x_fp8: backend/fp8.h lowp_input_copy).
  Fp8Tiles act_copy;
};
struct MoeActs {
  Tensor x;        // [N, H]
  Tensor logits;   // [N, E]       gate(x)
  Tensor scores;   // [N, E]       sigmoid / softmax
  Tensor ids;      // [N, k] I32
  Tensor weights;  // [N, k]
  Tensor pick, token, counts;  // moe_sort: [N·k] I32, [N·k] I32, [E] I32
  std::vector<int64_t> offsets;  // [E + 1] host copy: expert e owns sorted rows offsets[e]..offsets[e+1]
  Tensor sorted_weights;  // [N·k, 1] weights in sorted order
  MlpActs routed;  // over the N·k sorted rows (x = gathered tokens, out = expert outputs)
  MlpActs shared;  // over N rows (n_shared_experts > 0)
  Tensor out;      // [N, H]
};
struct LayerActs {
  Tensor x;           // [N, H]  layer input (residual stream)
  Tensor rstd1;       // [N]
  Tensor h1;          // [N, H]  input_layernorm(x)
  MlaActs attn;
  Tensor x2;          // [N, H]  x + attn.out
  Tensor rstd2;       // [N]
  Tensor h2;          // [N, H]  post_attention_layernorm(x2)
  MlpActs mlp;        // dense layers
  MoeActs moe;        // MoE layers
  Tensor out;         // [N, H]  x2 + mlp/moe out
};
struct MtpActs {
  int64_t S = 0;      // T − k: rows per sequence
  Tensor ids;         // [B·S] I32  tokens t_{i+k}
  Tensor h_idx;       // [B·S] I32  rows of h^{k−1} used
  Tensor emb;         // [B·S, H]
  Tensor e_rstd, e_n; // enorm
  Tensor h_prev;      // [B·S, H]   h^{k−1}_i
  Tensor h_rstd, h_n; // hnorm
  Tensor cat;         // [B·S, 2H]  [e_n ; h_n]
  Fp8Tiles cat_fp8;   // --precision fp8: cat in FP8 (eh_proj's Wgrad input)
  Tensor x;           // [B·S, H]   eh_proj(cat)
  LayerActs block;
  Tensor h;           // [B·S, H]   h^k (= block.out)
  Tensor head_rstd, head_n;  // shared_head.norm(h^k)
  Tensor positions;   // [B·S] I32  0..S−1 per sequence (RoPE of the block)
};
struct ModelActs {
  int64_t B = 0, T = 0;
  Tensor ids;        // [B·T] I32
  Tensor positions;  // [B·T] I32
  Tensor emb;        // [B·T, H]
  std::vector<LayerActs> layers;
  Tensor final_rstd;
  Tensor h0;         // [B·T, H] after model.norm
  std::vector<MtpActs> mtp;
};

// ---------------------------------------------------------------------------------------------
// Fixed per-model quantities every module reads.
struct ModelDims {
  int64_t H = 0, nh = 0, nope = 0, rope = 0, qk = 0, vd = 0, kv_lora = 0, q_lora = 0;
  float eps = 1e-6f;      // rms_norm_eps: layer norms, model.norm, MTP norms
  float eps_mla = 1e-6f;  // q_a_layernorm / kv_a_layernorm: HF builds them without passing rms_norm_eps
  float softmax_scale = 1.0f;
  bool rope_interleaved = true;
  RouterScoring scoring = RouterScoring::Sigmoid;
  RouterMethod method = RouterMethod::NoauxTc;
  int n_group = 1, topk_group = 1, top_k = 1;
  int64_t n_experts = 0;
  bool norm_topk_prob = true;
  float routed_scaling_factor = 1.0f;
};
ModelDims model_dims(const ModelConfig& c);
RopeParams rope_params(const ModelConfig& c);

// Rotary tables on a backend, grown on demand (doubling, capped at max_position_embeddings or n) so
// that Model and the inference runner share one rule.
class RopeCache {
 public:
  const RopeTables& covering(Backend& be, const ModelConfig& cfg, int64_t n);
  const RopeTables& tables() const { return tables_; }  // as last grown

 private:
  RopeTables tables_;
  int64_t len_ = 0;
};

// Rotary tables plus the positions of the rows being processed.
struct RopeInput {
  const RopeTables* tables = nullptr;
  Tensor positions;  // [N] I32
};

// Module forwards (mla.cpp, moe.cpp, mtp.cpp). Each fills its Acts (allocating on `be`) and leaves
// the module output in acts.out. B sequences of T rows each, N = B·T.
void mla_forward(Backend& be, const ModelDims& d, const MlaParams& p, const RopeInput& rope,
                 const Tensor& x, int64_t B, int64_t T, MlaActs& a);
void mlp_forward(Backend& be, const MlpParams& p, const Tensor& x, MlpActs& a, bool accumulate_out = false);
// Several MLPs (the routed experts) over consecutive row blocks of x: rows offsets[e] ..
// offsets[e + 1] through p[e]. Each input is converted (or quantized) once for all blocks, the SwiGLU
// is one op over all rows, and the blocks' GEMMs are issued on the backend's lanes, so they may
// overlap. mlp_forward is the case of one block; the numbers are those of one mlp_forward per block
// (for finite inputs: backend/fp8.h Fp8Tiles on a non-finite value in an FP8 copy).
void experts_forward(Backend& be, std::span<const MlpParams> p, std::span<const int64_t> offsets, const Tensor& x,
                     MlpActs& a, bool accumulate_out = false);
void moe_forward(Backend& be, const ModelDims& d, const MoeParams& p, const Tensor& x, MoeActs& a);
// The router op with the config's routing (DESIGN §2) on gate logits [N, E]: scores [N, E], ids and
// weights [N, top_k], allocated by the caller. moe_forward and the GPU engine's MoE both route here.
void moe_route(Backend& be, const ModelDims& d, const MoeParams& p, const Tensor& logits, const Tensor& scores,
               const Tensor& ids, const Tensor& weights);
// Its backward: dx += gateᵀ(dlogits) and the gate's weight gradient into g.gate, where dlogits comes
// from dweights [N, top_k] through the saved scores/ids, plus router_dlogits (the balance loss's) if present.
void moe_route_backward(Backend& be, const ModelDims& d, const MoeParams& p, const MoeParams& g, const Tensor& x,
                        const Tensor& scores, const Tensor& ids, const Tensor& dweights, const Tensor& router_dlogits,
                        const Tensor& dx);
void decoder_layer_forward(Backend& be, const ModelDims& d, const LayerParams& p, const RopeInput& rope,
                           const Tensor& x, int64_t B, int64_t T, LayerActs& a);
// MTP module k on B sequences of T tokens (host ids [B·T]); h_prev = h^{k−1} with prev_len rows per
// sequence (T for k = 1). Writes logits [B·(T−k), V].
void mtp_module_forward(Backend& be, const ModelDims& d, const MtpParams& p, const Tensor& embed_tokens,
                        const LinearParam& head, const RopeTables& tables, std::span<const int32_t> ids,
                        int64_t B, int64_t T, int k, const Tensor& h_prev, int64_t prev_len, MtpActs& a,
                        Tensor& logits);
// y = x·Wᵀ (+ bias) with the stored weight dtype. x_fp8: the FP8 copy of x to keep (or reuse) when the
// layer runs in FP8 (backend/fp8.h linear_lowp); untouched otherwise.
void linear_forward(Backend& be, const LinearParam& p, const Tensor& x, const Tensor& y, bool accumulate = false,
                    Fp8Tiles* x_fp8 = nullptr);
// The layer runs in FP8 (--precision fp8, on either backend): its forward keeps FP8 copies for the backward.
bool fp8_layer(const LinearParam& p);

// ---------------------------------------------------------------------------------------------
// Backward (training). Gradients live in a second Weights of F32 zeros bound by the same tensor
// table, so `Grads::p` has exactly the shape of ModelParams and every module backward reads its
// parameters from `p` and accumulates its weight gradients into the matching views of `g`.
// Shared copies (MTP embed/head, tied lm_head) resolve to the main gradient, as they do for weights.
// e_score_correction_bias has a zero gradient that nothing writes (no gradient, DESIGN §3).
struct Grads {
  Weights w;       // F32 zeros, one tensor per parameter of the table
  ModelParams p;   // views of w, structured as the model's parameters
  Backend* be = nullptr;  // where the gradients live (null: host memory)
  explicit Grads(const ModelConfig& c, Backend* on = nullptr);
  void zero();
  Tensor get(const std::string& name) const { return w.get(name).w; }
};

// Each module backward takes dout (∂L/∂ module output) and writes ∂L/∂ input into dx
// (overwritten, or added when accumulate_dx), accumulating weight gradients into g.
// dy_copy: lowp_grad_copy of dy (backend/fp8.h) when several layers' backward share one dy.
void linear_backward(Backend& be, const LinearParam& p, const LinearParam& g, const Tensor& x,
                     const Tensor& dy, const Tensor& dx, bool accumulate_dx, const Fp8Tiles* x_fp8 = nullptr,
                     const Fp8Tiles* dy_copy = nullptr);
void mla_backward(Backend& be, const ModelDims& d, const MlaParams& p, const MlaParams& g,
                  const RopeInput& rope, const MlaActs& a, int64_t B, int64_t T, const Tensor& dout,
                  const Tensor& dx, bool accumulate_dx);
void mlp_backward(Backend& be, const MlpParams& p, const MlpParams& g, const MlpActs& a, const Tensor& dout,
                  const Tensor& dx, bool accumulate_dx);
// experts_forward's backward: weight gradients into g[e], dx rows of block e from p[e].
void experts_backward(Backend& be, std::span<const MlpParams> p, std::span<const MlpParams> g,
                      std::span<const int64_t> offsets, const MlpActs& a, const Tensor& dout, const Tensor& dx,
                      bool accumulate_dx);
// router_dlogits: an extra gradient on the gate logits [N, E] (the sequence-wise balance loss), optional.
void moe_backward(Backend& be, const ModelDims& d, const MoeParams& p, const MoeParams& g, const MoeActs& a,
                  const Tensor& dout, const Tensor& router_dlogits, const Tensor& dx, bool accumulate_dx);
// dx = ∂L/∂x, written; it may be dout itself (then overwritten in place, sparing two copies of [N, H]).
void decoder_layer_backward(Backend& be, const ModelDims& d, const LayerParams& p, const LayerParams& g,
                            const RopeInput& rope, const LayerActs& a, int64_t B, int64_t T,
                            const Tensor& dout, const Tensor& router_dlogits, const Tensor& dx);
// MTP module k: dlogits [B·S, V]; dh_next = ∂L/∂h^k from module k+1 (optional). Adds ∂L/∂h^{k−1}
// into dh_prev ([B·prev_len, H], accumulated) and the shared embedding/head gradients into g.
void mtp_module_backward(Backend& be, const ModelDims& d, const MtpParams& p, const MtpParams& g,
                         const Tensor& embed_grad, const LinearParam& head, const LinearParam& head_grad,
                         const RopeTables& tables, const MtpActs& a, int64_t B, const Tensor& dlogits,
                         const Tensor& dh_next, const Tensor& router_dlogits, const Tensor& dh_prev);

// What the loss hands to Model::backward (all F32 on the backend).
struct BackwardInput {
  Tensor dlogits;                      // [B·T, V]
  std::vector<Tensor> dmtp_logits;     // k = 1..D: [B·(T−k), V] (undefined: module k not in the loss)
  std::vector<Tensor> router_dlogits;  // per layer index (main then MTP) [N, E], optional each
};

struct ForwardOptions {
  bool mtp = true;               // run the MTP modules (when the model has them)
  bool keep_activations = false;  // keep every layer's activations in Model::acts() (training)
};
struct ForwardOutput {
  Tensor logits;                   // [B·T, V] F32
  std::vector<Tensor> mtp_logits;  // k = 1..D: [B·(T−k), V] F32 (empty when T ≤ k)
};

class Model {
 public:
  Model(const Weights& w, Backend& be);

  // ids: B·T token ids (row-major [B, T]); each in [0, vocab_size) else InputError;
  // T ≤ max_position_embeddings else InputError.
  ForwardOutput forward(std::span<const int32_t> ids, int64_t B, int64_t T, const ForwardOptions& opt = {});

  const ModelConfig& config() const { return cfg_; }
  const ModelDims& dims() const { return dims_; }
  const ModelParams& params() const { return params_; }
  Backend& backend() { return be_; }
  const ModelActs& acts() const { return acts_; }
  // Gradients of every parameter for the activations of the last forward (keep_activations),
  // accumulated into g (call g.zero() between optimizer steps).
  void backward(const BackwardInput& in, Grads& g);
  // Rotary tables covering positions [0, n) (grown on demand).
  const RopeTables& rope_tables_for(int64_t n);

 private:
  ModelConfig cfg_;
  Backend& be_;
  ModelDims dims_;
  ModelParams params_;
  RopeCache rope_;
  ModelActs acts_;
};

// The token ids of a "ID ID ..." string (whitespace separated); InputError naming the bad token.
std::vector<int32_t> parse_token_ids(const std::string& text, int64_t vocab_size);

}  // namespace dsv3
