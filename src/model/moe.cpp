// The feed-forward half of a decoder layer: the dense SwiGLU MLP (layers below
// first_k_dense_replace, and the shared experts) and DeepSeekMoE:
//   router (DESIGN §3) → sort the N·k picks by expert → gather token rows → one GEMM chain per expert
//   over its contiguous rows → scatter-add weighted outputs back to tokens → + shared experts.
// No token dropping. The decoder layer (pre-norm residual blocks) is here too.
#include "model/model.h"
#include "model/moe_hook.h"
#include "model/module_ops.h"

namespace dsv3 {
using modops::add;
using modops::rmsnorm;
using modops::rmsnorm_backward;

namespace {
thread_local MoeLayerHook* tl_moe_hook = nullptr;
}  // namespace

MoeLayerHook* set_moe_layer_hook(MoeLayerHook* h) {
  MoeLayerHook* prev = tl_moe_hook;
  tl_moe_hook = h;
  return prev;
}

namespace {

Fp8Tiles block(const Fp8Tiles& t, int64_t r0, int64_t r1) { return t.defined() ? t.rows(r0, r1) : Fp8Tiles{}; }

// Row blocks: offsets[0] = 0, non-decreasing, offsets.back() = the rows; one per MLP.
void check_blocks(size_t n, std::span<const int64_t> offsets, int64_t rows, const char* where) {
  DSV3_CHECK(offsets.size() == n + 1 && offsets.front() == 0 && offsets.back() == rows, where, ": ", n,
             " blocks do not fit offsets over ", rows, " rows");
  for (size_t e = 0; e < n; ++e) DSV3_CHECK(offsets[e] <= offsets[e + 1], where, ": block ", e, " ends before it starts");
}

// The experts' GEMMs run on tensor cores in BF16 and FP8; lanes pay off for those (the backend's
// SGEMM stays in order).
bool lowp_gemms(const MlpParams& p) { return p.gate_proj.lowp && linear_precision().mode != LinearPrecisionMode::F32; }

// fn(e, r0, r1) for each non-empty block, block e issued on lane e when `lanes` and there are
// several blocks.
template <class F>
void each_block(Backend& be, std::span<const MlpParams> p, std::span<const int64_t> offsets, bool lanes, F fn) {
  LaneScope lane(be, lanes && p.size() > 1);
  for (size_t e = 0; e < p.size(); ++e) {
    if (offsets[e] == offsets[e + 1]) continue;
    lane(int64_t(e));
    fn(e, offsets[e], offsets[e + 1]);
  }
}

bool no_bias(std::span<const MlpParams> p) {
  for (const MlpParams& m : p)
    for (const LinearParam* l : {&m.gate_proj, &m.up_proj, &m.down_proj})
      if (present(l->bias)) return false;
  return true;
}

// Whether the blocks' lowp GEMMs go through the grouped calls: no bias (none of DeepSeek's experts
// has one; linear_forward / linear_backward add it per block).
bool lowp_grouped(std::span<const MlpParams> p) { return lowp_gemms(p[0]) && no_bias(p); }

// --precision bf16 with the grouped calls: the tensors read only by the BF16 matmuls (the gathered
// rows, act, and the gradients at the experts' outputs and at gate / up) are made in BF16 by the op
// that produces them, rounded once where the matmul would round them: the same products, without
// an F32 write, a read and a conversion pass per tensor.
bool bf16_activations(std::span<const MlpParams> p) {
  return lowp_grouped(p) && linear_precision().mode == LinearPrecisionMode::Bf16;
}

// One projection's weights (and FP8 scale_inv) of every MLP.
struct ProjWeights {
  std::vector<Tensor> w, s;
  ProjWeights(std::span<const MlpParams> p, LinearParam MlpParams::*proj) {
    for (const MlpParams& m : p) {
      w.push_back((m.*proj).w);
      if (present((m.*proj).scale_inv)) s.push_back((m.*proj).scale_inv);
    }
  }
};

// y (+)= x·Wᵀ per block of rows for one projection of every MLP, in one call: grouped_linear in
// F32 math (a GPU batches the blocks), linear_lowp_grouped in Bf16 / Fp8 (x_copy: x's BF16 copy or
// FP8 tiles). The blocks must have no bias.
void grouped(Backend& be, std::span<const MlpParams> p, std::span<const int64_t> offsets, LinearParam MlpParams::*proj,
             const Tensor& x, const Tensor& y, bool accumulate, const Fp8Tiles& x_copy) {
  const ProjWeights pw(p, proj);
  if (lowp_gemms(p[0]))
    linear_lowp_grouped(linear_precision(), {x, pw.w, pw.s, offsets, y, accumulate}, x_copy);
  else
    be.grouped_linear({x, pw.w, pw.s, offsets, y, accumulate});
}

// Its backward: every block's weight gradient accumulated in g, dx written or accumulated.
void grouped_lowp_backward(std::span<const MlpParams> p, std::span<const MlpParams> g,
                           std::span<const int64_t> offsets, LinearParam MlpParams::*proj, const Tensor& x,
                           const Tensor& dy, const Tensor& dx, bool accumulate_dx, const Fp8Tiles& x_copy) {
  const ProjWeights pw(p, proj), gw(g, proj);
  linear_backward_lowp_grouped(linear_precision(), {x, dy, pw.w, pw.s, gw.w, offsets, dx, accumulate_dx}, x_copy);
}

}  // namespace

void mlp_forward(Backend& be, const MlpParams& p, const Tensor& x, MlpActs& a, bool accumulate_out) {
  const int64_t offsets[2] = {0, x.dim(0)};
  experts_forward(be, std::span(&p, 1), offsets, x, a, accumulate_out);
}

void experts_forward(Backend& be, std::span<const MlpParams> p, std::span<const int64_t> offsets, const Tensor& x,
                     MlpActs& a, bool accumulate_out) {
  check_blocks(p.size(), offsets, x.dim(0), "experts_forward");
  a.x = x;
  if (p.empty()) return;  // no experts, no rows
  const int64_t M = x.dim(0), I = p[0].gate_proj.w.dim(0), H = p[0].down_proj.w.dim(0);
  a.gate = be.alloc(DType::F32, {M, I});
  a.up = be.alloc(DType::F32, {M, I});
  a.act = be.alloc(bf16_activations(p) ? DType::BF16 : DType::F32, {M, I});
  const LinearPrecision& prec = linear_precision();
  const bool lowp = p[0].gate_proj.lowp;
  // Rows are independent, so a row block of a copy is the copy of that block.
  a.x_fp8 = lowp ? lowp_input_copy(prec, x, "linear input") : Fp8Tiles{};
  a.gate_fp8 = a.up_fp8 = a.act_copy = Fp8Tiles{};
  const bool batched = no_bias(p);
  if (batched) {
    grouped(be, p, offsets, &MlpParams::gate_proj, x, a.gate, false, a.x_fp8);  // [M, I]
    grouped(be, p, offsets, &MlpParams::up_proj, x, a.up, false, a.x_fp8);      // [M, I]
  } else {
    each_block(be, p, offsets, lowp_gemms(p[0]), [&](size_t e, int64_t r0, int64_t r1) {
      Fp8Tiles xe = block(a.x_fp8, r0, r1);
      linear_forward(be, p[e].gate_proj, x.rows(r0, r1), a.gate.rows(r0, r1), false, &xe);  // [c, I]
      linear_forward(be, p[e].up_proj, x.rows(r0, r1), a.up.rows(r0, r1), false, &xe);      // [c, I]
    });
  }
  SwigluArgs s;
  s.gate = a.gate;
  s.up = a.up;
  s.out = a.act;
  Fp8Tiles act;
  if (fp8_layer(p[0].down_proj)) {
    // FP8 keeps the SwiGLU inputs as 1×128 tiles and recomputes act from them in the backward
    // ([V3] §3.3.3); the tiles of gate, up and act come out of one pass with act.
    const SwigluTiles t = swiglu_fp8(be, s, prec.pow2_scale);  // [M, I] silu(gate)·up
    a.gate_fp8 = t.gate;
    a.up_fp8 = t.up;
    if (lowp) act = t.out;
  } else {
    be.swiglu(s);
    if (lowp) act = lowp_input_copy(prec, a.act, "linear input");
  }
  if (!accumulate_out) a.out = be.alloc(DType::F32, {M, H});
  if (batched)
    grouped(be, p, offsets, &MlpParams::down_proj, a.act, a.out, accumulate_out, act);  // [M, H]
  else
    each_block(be, p, offsets, lowp_gemms(p[0]), [&](size_t e, int64_t r0, int64_t r1) {
      Fp8Tiles ae = block(act, r0, r1);
      linear_forward(be, p[e].down_proj, a.act.rows(r0, r1), a.out.rows(r0, r1), accumulate_out, &ae);  // [c, H]
    });
  // FP8 recomputes act in the backward from the SwiGLU inputs' FP8 copies instead, and keeps gate,
  // up and act as tiles only: their F32 forms go (12 bytes per element of the MLPs' width, ~6 GB of
  // a bench-0.7b step's activations).
  if (prec.mode == LinearPrecisionMode::Bf16) a.act_copy = act;
  if (a.gate_fp8.defined()) a.gate = a.up = a.act = Tensor();
}

void moe_route(Backend& be, const ModelDims& d, const MoeParams& p, const Tensor& logits, const Tensor& scores,
               const Tensor& ids, const Tensor& weights) {
  RouterArgs r;
  r.logits = logits;
  r.bias = p.e_score_correction_bias;
  r.scoring = d.scoring;
  r.method = d.method;
  r.n_group = d.n_group;
  r.topk_group = d.topk_group;
  r.top_k = d.top_k;
  r.norm_topk_prob = d.norm_topk_prob;
  r.routed_scaling_factor = d.routed_scaling_factor;
  r.scores = scores;
  r.ids = ids;
  r.weights = weights;
  be.router(r);
}

void moe_route_backward(Backend& be, const ModelDims& d, const MoeParams& p, const MoeParams& g, const Tensor& x,
                        const Tensor& scores, const Tensor& ids, const Tensor& dweights, const Tensor& router_dlogits,
                        const Tensor& dx) {
  // The gradient reaches the gate logits through the unbiased scores of the picks.
  Tensor dlogits = be.alloc(DType::F32, {x.dim(0), d.n_experts});
  RouterBackwardArgs rb;
  rb.scores = scores;
  rb.ids = ids;
  rb.dweights = dweights;
  rb.scoring = d.scoring;
  rb.norm_topk_prob = d.norm_topk_prob;
  rb.routed_scaling_factor = d.routed_scaling_factor;
  rb.dlogits = dlogits;
  be.router_backward(rb);
  if (present(router_dlogits)) {
    AddArgs ad;
    ad.a = dlogits;
    ad.b = router_dlogits;
    ad.out = dlogits;
    be.add(ad);
  }
  linear_backward(be, p.gate, g.gate, x, dlogits, dx, true);
}

void moe_gate_and_route(Backend& be, const ModelDims& d, const MoeParams& p, const Tensor& x, MoeActs& a) {
  const int64_t N = x.dim(0), E = d.n_experts, k = d.top_k;
  a.x = x;  // [N, H]
  // Routing in FP32 on gate logits.
  a.logits = be.alloc(DType::F32, {N, E});
  linear_forward(be, p.gate, x, a.logits);  // [N, E]
  a.scores = be.alloc(DType::F32, {N, E});
  a.ids = be.alloc(DType::I32, {N, k});
  a.weights = be.alloc(DType::F32, {N, k});
  moe_route(be, d, p, a.logits, a.scores, a.ids, a.weights);
}

void moe_group_picks(Backend& be, const ModelDims& d, MoeActs& a) {
  const int64_t N = a.ids.dim(0), k = d.top_k;
  a.pick = be.alloc(DType::I32, {N * k});
  a.token = be.alloc(DType::I32, {N * k});
  a.counts = be.alloc(DType::I32, {d.n_experts});
  MoeSortArgs s;
  s.ids = a.ids;
  s.n_experts = d.n_experts;
  s.pick = a.pick;
  s.token = a.token;
  s.counts = a.counts;
  be.moe_sort(s);
}

void moe_forward(Backend& be, const ModelDims& d, const MoeParams& p, const Tensor& x, MoeActs& a) {
  const int64_t N = x.dim(0), E = d.n_experts, k = d.top_k, H = d.H;
  moe_gate_and_route(be, d, p, x, a);
  moe_group_picks(be, d, a);  // the N·k picks by expert
  const Tensor counts = be.to_host(a.counts);
  a.offsets.assign(size_t(E + 1), 0);
  for (int64_t e = 0; e < E; ++e) a.offsets[size_t(e + 1)] = a.offsets[size_t(e)] + counts.data<int32_t>()[e];

  // Gather the token rows in expert order and run each expert on its contiguous block.
  MlpActs& m = a.routed;
  m.x = be.alloc(bf16_activations(p.experts) ? DType::BF16 : DType::F32, {N * k, H});
  GatherRowsArgs g;
  g.src = x;
  g.idx = a.token;
  g.out = m.x;
  be.gather_rows(g);  // [N·k, H]
  experts_forward(be, p.experts, a.offsets, m.x, m);

  // Combine: out[token] += weight · expert output, in a fixed order per token.
  a.sorted_weights = be.alloc(DType::F32, {N * k, 1});
  GatherRowsArgs gw;
  gw.src = a.weights.reshape({N * k, 1});
  gw.idx = a.pick;
  gw.out = a.sorted_weights;
  be.gather_rows(gw);  // [N·k, 1]
  Tensor routed = be.zeros(DType::F32, {N, H});
  ScatterAddRowsArgs sc;
  sc.src = m.out;
  sc.idx = a.token;
  sc.weight = a.sorted_weights.reshape({N * k});
  sc.out = routed;
  be.scatter_add_rows(sc);  // [N, H]

  if (p.has_shared) {
    mlp_forward(be, p.shared_experts, x, a.shared);  // [N, H]
    a.out = add(be, routed, a.shared.out);
  } else {
    a.out = routed;
  }
}

void decoder_layer_forward(Backend& be, const ModelDims& d, const LayerParams& p, const RopeInput& rope,
                           const Tensor& x, int64_t B, int64_t T, LayerActs& a) {
  a.x = x;                                                                // [N, H]
  a.h1 = rmsnorm(be, x, p.input_layernorm, d.eps, a.rstd1);              // [N, H]
  mla_forward(be, d, p.attn, rope, a.h1, B, T, a.attn);                   // [N, H]
  a.x2 = add(be, x, a.attn.out);                                          // [N, H]
  a.h2 = rmsnorm(be, a.x2, p.post_attention_layernorm, d.eps, a.rstd2);  // [N, H]
  if (p.is_moe) {
    if (tl_moe_hook)
      tl_moe_hook->forward(be, d, p.moe, a.h2, a.moe);
    else
      moe_forward(be, d, p.moe, a.h2, a.moe);
    a.out = add(be, a.x2, a.moe.out);
  } else {
    mlp_forward(be, p.mlp, a.h2, a.mlp);
    a.out = add(be, a.x2, a.mlp.out);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward.

void mlp_backward(Backend& be, const MlpParams& p, const MlpParams& g, const MlpActs& a, const Tensor& dout,
                  const Tensor& dx, bool accumulate_dx) {
  const int64_t offsets[2] = {0, a.x.dim(0)};
  experts_backward(be, std::span(&p, 1), std::span(&g, 1), offsets, a, dout, dx, accumulate_dx);
}

void experts_backward(Backend& be, std::span<const MlpParams> p, std::span<const MlpParams> g,
                      std::span<const int64_t> offsets, const MlpActs& a, const Tensor& dout, const Tensor& dx,
                      bool accumulate_dx) {
  const int64_t M = a.x.dim(0);
  DSV3_CHECK(g.size() == p.size(), "experts_backward: ", p.size(), " experts, ", g.size(), " gradients");
  check_blocks(p.size(), offsets, M, "experts_backward");
  if (M == 0) return;
  const int64_t I = (a.gate_fp8.defined() ? a.gate_fp8.q : a.gate).dim(-1);
  Tensor dact = be.alloc(DType::F32, {M, I});
  const LinearPrecision& prec = linear_precision();
  const bool lowp = p[0].gate_proj.lowp;
  // FP8: act (and its tiles) is recomputed from the SwiGLU inputs' FP8 copies, which the SwiGLU's
  // gradient reads too.
  const bool fp8 = a.gate_fp8.defined();
  Tensor act = a.act;
  Fp8Tiles act_copy = a.act_copy;
  SwigluRecompute r;
  if (fp8) {
    r = swiglu_fp8_recompute(be, a.gate_fp8, a.up_fp8, prec.pow2_scale);
    act = r.out;
    if (lowp) act_copy = r.out_tiles;
  } else if (!act_copy.defined() && lowp) {
    act_copy = lowp_input_copy(prec, act, "linear input");
  }
  const bool lowp_batched = lowp_grouped(p);
  const Fp8Tiles dout_copy = lowp && !lowp_batched ? lowp_grad_copy(prec, dout) : Fp8Tiles{};
  if (lowp_batched)
    grouped_lowp_backward(p, g, offsets, &MlpParams::down_proj, act, dout, dact, false, act_copy);  // [M, I]
  else
    each_block(be, p, offsets, lowp_gemms(p[0]), [&](size_t e, int64_t r0, int64_t r1) {
      const Fp8Tiles ae = block(act_copy, r0, r1), de = block(dout_copy, r0, r1);
      linear_backward(be, p[e].down_proj, g[e].down_proj, act.rows(r0, r1), dout.rows(r0, r1), dact.rows(r0, r1),
                      false, &ae, &de);  // [c, I]
    });
  SwigluBackwardArgs s;
  s.dout = dact;
  s.gate = fp8 ? r.gate : a.gate;
  s.up = fp8 ? r.up : a.up;
  const bool bf16 = bf16_activations(p);
  Tensor dup = be.alloc(bf16 ? DType::BF16 : DType::F32, {M, I});
  s.dgate = bf16 ? be.alloc(DType::BF16, {M, I}) : dact;  // in F32 it aliases dout (elementwise)
  s.dup = dup;
  if (fp8) swiglu_backward_fp8(be, s, a.gate_fp8, a.up_fp8);
  else be.swiglu_backward(s);
  if (lowp_batched) {
    grouped_lowp_backward(p, g, offsets, &MlpParams::gate_proj, a.x, s.dgate, dx, accumulate_dx, a.x_fp8);  // [M, H]
    grouped_lowp_backward(p, g, offsets, &MlpParams::up_proj, a.x, dup, dx, true, a.x_fp8);
    return;
  }
  const Fp8Tiles dgate_copy = lowp ? lowp_grad_copy(prec, dact) : Fp8Tiles{};
  const Fp8Tiles dup_copy = lowp ? lowp_grad_copy(prec, dup) : Fp8Tiles{};
  each_block(be, p, offsets, lowp_gemms(p[0]), [&](size_t e, int64_t r0, int64_t r1) {
    const Fp8Tiles xe = block(a.x_fp8, r0, r1), ge = block(dgate_copy, r0, r1), ue = block(dup_copy, r0, r1);
    const Tensor x = a.x.rows(r0, r1), dxe = dx.rows(r0, r1);
    linear_backward(be, p[e].gate_proj, g[e].gate_proj, x, dact.rows(r0, r1), dxe, accumulate_dx, &xe, &ge);  // [c, H]
    linear_backward(be, p[e].up_proj, g[e].up_proj, x, dup.rows(r0, r1), dxe, true, &xe, &ue);
  });
}

void moe_backward(Backend& be, const ModelDims& d, const MoeParams& p, const MoeParams& g, const MoeActs& a,
                  const Tensor& dout, const Tensor& router_dlogits, const Tensor& dx, bool accumulate_dx) {
  const int64_t N = a.x.dim(0), k = d.top_k, H = d.H;
  if (!accumulate_dx) {
    FillArgs f;
    f.x = dx;
    be.fill(f);
  }
  if (p.has_shared) mlp_backward(be, p.shared_experts, g.shared_experts, a.shared, dout, dx, true);

  // Combine: routed[token[r]] += w[r]·expert_out[r]  →  d expert_out and d w (sorted order).
  const MlpActs& m = a.routed;
  Tensor dm_out = be.alloc(bf16_activations(p.experts) ? DType::BF16 : DType::F32, {N * k, H});
  Tensor dsorted_w = be.alloc(DType::F32, {N * k});
  ScatterAddRowsBackwardArgs sb;
  sb.dout = dout;
  sb.src = m.out;
  sb.idx = a.token;
  sb.weight = a.sorted_weights.reshape({N * k});
  sb.dsrc = dm_out;
  sb.dweight = dsorted_w;
  be.scatter_add_rows_backward(sb);
  // Back to [N, k] order: dweights[pick[r]] = dsorted_w[r] (pick is a permutation).
  Tensor dweights = be.zeros(DType::F32, {N, k});
  ScatterAddRowsArgs sw;
  sw.src = dsorted_w.reshape({N * k, 1});
  sw.idx = a.pick;
  sw.out = dweights.reshape({N * k, 1});
  be.scatter_add_rows(sw);

  // Each expert on its rows, then the gather's backward: dx[token[r]] += dm_x[r].
  Tensor dm_x = be.alloc(DType::F32, {N * k, H});
  experts_backward(be, p.experts, g.experts, a.offsets, m, dm_out, dm_x, false);
  ScatterAddRowsArgs sx;
  sx.src = dm_x;
  sx.idx = a.token;
  sx.out = dx;
  be.scatter_add_rows(sx);

  moe_route_backward(be, d, p, g, a.x, a.scores, a.ids, dweights, router_dlogits, dx);
}

void decoder_layer_backward(Backend& be, const ModelDims& d, const LayerParams& p, const LayerParams& g,
                            const RopeInput& rope, const LayerActs& a, int64_t B, int64_t T,
                            const Tensor& dout, const Tensor& router_dlogits, const Tensor& dx) {
  const int64_t N = B * T, H = d.H;
  // out = x2 + ffn(norm2(x2)): dx2 = dout + norm2ᵀ(ffnᵀ(dout)).
  Tensor dh2 = be.alloc(DType::F32, {N, H});
  if (p.is_moe && tl_moe_hook)
    tl_moe_hook->backward(be, d, p.moe, g.moe, a.moe, dout, router_dlogits, dh2, false);
  else if (p.is_moe)
    moe_backward(be, d, p.moe, g.moe, a.moe, dout, router_dlogits, dh2, false);
  else
    mlp_backward(be, p.mlp, g.mlp, a.mlp, dout, dh2, false);
  // dx2 and then dx are summed in dx itself: no copy where dx is dout's buffer (the model's loop).
  if (dx.raw() != dout.raw()) {
    CopyArgs c;
    c.src = dout;
    c.dst = dx;
    be.copy(c);
  }
  rmsnorm_backward(be, dh2, a.x2, p.post_attention_layernorm, a.rstd2, g.post_attention_layernorm, dx, true);
  // x2 = x + attn(norm1(x)): dx += norm1ᵀ(attnᵀ(dx2)).
  Tensor dh1 = be.alloc(DType::F32, {N, H});
  mla_backward(be, d, p.attn, g.attn, rope, a.attn, B, T, dx, dh1, false);
  rmsnorm_backward(be, dh1, a.x, p.input_layernorm, a.rstd1, g.input_layernorm, dx, true);
}

}  // namespace dsv3
