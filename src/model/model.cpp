#include "model/model.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <map>
#include <sstream>

#include "model/module_ops.h"
#include "model/output_head.h"

namespace dsv3 {

using modops::i32_tensor;
using modops::rmsnorm;

namespace {

LinearParam linear_param(const Weights& w, const std::string& name, bool with_bias = false) {
  const Param& p = w.get(name + ".weight");
  LinearParam l;
  l.w = p.w;
  l.scale_inv = p.scale_inv;
  l.lowp = true;
  if (with_bias) l.bias = w.get(name + ".bias").w;
  return l;
}

MlpParams mlp_params(const Weights& w, const std::string& prefix) {
  return {linear_param(w, prefix + "gate_proj"), linear_param(w, prefix + "up_proj"),
          linear_param(w, prefix + "down_proj")};
}

LayerParams layer_params(const Weights& w, int64_t i) {
  const ModelConfig& c = w.config();
  const std::string p = cat("model.layers.", i, ".");
  const std::string a = p + "self_attn.";
  LayerParams l;
  l.index = i;
  l.input_layernorm = w.get(p + "input_layernorm.weight").w;
  l.post_attention_layernorm = w.get(p + "post_attention_layernorm.weight").w;
  const bool bias = c.attention_bias;
  if (c.q_lora_rank) {
    l.attn.q_a_proj = linear_param(w, a + "q_a_proj", bias);
    l.attn.q_a_layernorm = w.get(a + "q_a_layernorm.weight").w;
    l.attn.q_b_proj = linear_param(w, a + "q_b_proj");
  } else {
    l.attn.q_proj = linear_param(w, a + "q_proj");
  }
  l.attn.kv_a_proj_with_mqa = linear_param(w, a + "kv_a_proj_with_mqa", bias);
  l.attn.kv_a_layernorm = w.get(a + "kv_a_layernorm.weight").w;
  l.attn.kv_b_proj = linear_param(w, a + "kv_b_proj");
  l.attn.o_proj = linear_param(w, a + "o_proj", bias);

  l.is_moe = c.is_moe_layer(i);
  const std::string m = p + "mlp.";
  if (!l.is_moe) {
    l.mlp = mlp_params(w, m);
    return l;
  }
  l.moe.gate = linear_param(w, m + "gate");
  l.moe.gate.lowp = false;
  if (c.has_router_bias()) l.moe.e_score_correction_bias = w.get(m + "gate.e_score_correction_bias").w;
  for (int64_t e = 0; e < c.n_routed_experts; ++e) l.moe.experts.push_back(mlp_params(w, cat(m, "experts.", e, ".")));
  l.moe.has_shared = c.has_shared_experts();
  if (l.moe.has_shared) l.moe.shared_experts = mlp_params(w, m + "shared_experts.");
  return l;
}

}  // namespace

ModelParams bind_params(const Weights& w) {
  const ModelConfig& c = w.config();
  ModelParams p;
  p.embed_tokens = w.get("model.embed_tokens.weight").w;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) p.layers.push_back(layer_params(w, i));
  p.norm = w.get("model.norm.weight").w;
  p.lm_head = linear_param(w, c.tie_word_embeddings ? "model.embed_tokens" : "lm_head");
  p.lm_head.lowp = false;
  for (int64_t k = 1; k <= c.num_nextn_predict_layers; ++k) {
    const int64_t i = c.num_hidden_layers + k - 1;
    const std::string pre = cat("model.layers.", i, ".");
    MtpParams m;
    m.enorm = w.get(pre + "enorm.weight").w;
    m.hnorm = w.get(pre + "hnorm.weight").w;
    m.eh_proj = linear_param(w, pre + "eh_proj");
    m.block = layer_params(w, i);
    m.shared_head_norm = w.get(pre + "shared_head.norm.weight").w;
    p.mtp.push_back(std::move(m));
  }
  return p;
}

ModelDims model_dims(const ModelConfig& c) {
  ModelDims d;
  d.H = c.hidden_size;
  d.nh = c.num_attention_heads;
  d.nope = c.qk_nope_head_dim;
  d.rope = c.qk_rope_head_dim;
  d.qk = c.qk_head_dim();
  d.vd = c.v_head_dim;
  d.kv_lora = c.kv_lora_rank;
  d.q_lora = c.q_lora_rank.value_or(0);
  d.eps = float(c.rms_norm_eps);
  d.softmax_scale = float(c.softmax_scale());
  // HF DeepseekV2 always rotates interleaved pairs (complex multiply); V3 follows rope_interleave.
  d.rope_interleaved = c.is_v3() ? c.rope_interleave : true;
  d.scoring = c.scoring_func == "softmax" ? RouterScoring::Softmax : RouterScoring::Sigmoid;
  d.method = c.topk_method == "greedy"                 ? RouterMethod::Greedy
             : c.topk_method == "group_limited_greedy" ? RouterMethod::GroupLimitedGreedy
                                                       : RouterMethod::NoauxTc;
  d.n_group = int(c.n_group);
  d.topk_group = int(c.topk_group);
  d.top_k = int(c.num_experts_per_tok);
  d.n_experts = c.n_routed_experts;
  // HF DeepseekV2Moe never normalises the top-k weights (norm_topk_prob is ignored there).
  d.norm_topk_prob = c.is_v3() ? c.norm_topk_prob : false;
  d.routed_scaling_factor = float(c.routed_scaling_factor);
  return d;
}

RopeParams rope_params(const ModelConfig& c) {
  RopeParams r;
  r.theta = c.rope_theta;
  r.dim = c.qk_rope_head_dim;
  r.max_position_embeddings = c.max_position_embeddings;
  if (c.rope_scaling) {
    const RopeScaling& s = *c.rope_scaling;
    r.type = "yarn";
    r.factor = s.factor;
    r.original_max_position_embeddings = s.original_max_position_embeddings;
    r.beta_fast = s.beta_fast;
    r.beta_slow = s.beta_slow;
    r.mscale = s.mscale.value_or(0.0);
    r.mscale_all_dim = s.mscale_all_dim.value_or(0.0);
    r.attention_factor = s.attention_factor.value_or(-1.0);
    r.truncate = s.truncate;
  }
  return r;
}

Model::Model(const Weights& w, Backend& be)
    : cfg_(w.config()), be_(be), dims_(model_dims(cfg_)), params_(bind_params(w)) {}

const RopeTables& RopeCache::covering(Backend& be, const ModelConfig& cfg, int64_t n) {
  if (n > len_) {
    int64_t len = 64;
    while (len < n) len *= 2;
    len = std::min(len, std::max(n, cfg.max_position_embeddings));
    RopeTables t = rope_tables(rope_params(cfg), len);
    t.cos = be.to_device(t.cos);
    t.sin = be.to_device(t.sin);
    tables_ = std::move(t);
    len_ = len;
  }
  return tables_;
}

const RopeTables& Model::rope_tables_for(int64_t n) { return rope_.covering(be_, cfg_, n); }

ForwardOutput Model::forward(std::span<const int32_t> ids, int64_t B, int64_t T, const ForwardOptions& opt) {
  if (B < 1 || T < 1 || int64_t(ids.size()) != B * T)
    input_error("forward: ", ids.size(), " token ids for a batch of ", B, " x ", T, " (expected B·T ≥ 1)");
  if (T > cfg_.max_position_embeddings)
    input_error("forward: sequence of ", T, " tokens is longer than max_position_embeddings ",
                cfg_.max_position_embeddings);
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] < 0 || ids[i] >= cfg_.vocab_size)
      input_error("forward: token id ", ids[i], " at position ", i, " is outside the vocabulary [0, ",
                  cfg_.vocab_size, ")");
  const ModelDims& d = dims_;
  const int64_t N = B * T;
  ModelActs& a = acts_;
  a = ModelActs{};
  a.B = B;
  a.T = T;
  a.ids = i32_tensor(be_, std::vector<int32_t>(ids.begin(), ids.end()));
  std::vector<int32_t> pos(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) pos[size_t(i)] = int32_t(i % T);
  a.positions = i32_tensor(be_, pos);
  RopeInput rope{&rope_tables_for(T), a.positions};

  a.emb = be_.alloc(DType::F32, {N, d.H});
  EmbeddingArgs e;
  e.ids = a.ids;
  e.table = params_.embed_tokens;
  e.out = a.emb;
  be_.embedding(e);  // [N, H]

  Tensor x = a.emb;
  if (opt.keep_activations) a.layers.resize(params_.layers.size());
  for (size_t l = 0; l < params_.layers.size(); ++l) {
    LayerActs scratch;
    LayerActs& la = opt.keep_activations ? a.layers[l] : scratch;
    decoder_layer_forward(be_, d, params_.layers[l], rope, x, B, T, la);  // [N, H]
    x = la.out;
  }
  a.h0 = rmsnorm(be_, x, params_.norm, d.eps, a.final_rstd);  // [N, H]

  ForwardOutput out;
  out.logits = be_.alloc(DType::F32, {N, cfg_.vocab_size});
  head_forward(be_, params_.lm_head, a.h0, out.logits);  // [N, V]

  if (opt.mtp && !params_.mtp.empty()) {
    if (opt.keep_activations) a.mtp.resize(params_.mtp.size());
    Tensor h_prev = a.h0;
    int64_t prev_len = T;
    for (size_t k = 1; k <= params_.mtp.size() && int64_t(k) < T; ++k) {
      MtpActs scratch;
      MtpActs& ma = opt.keep_activations ? a.mtp[k - 1] : scratch;
      Tensor logits;
      mtp_module_forward(be_, d, params_.mtp[k - 1], params_.embed_tokens, params_.lm_head, rope_.tables(), ids, B, T,
                         int(k), h_prev, prev_len, ma, logits);
      out.mtp_logits.push_back(logits);
      h_prev = ma.h;
      prev_len = ma.S;
    }
  }
  return out;
}

Grads::Grads(const ModelConfig& c, Backend* on) : be(on) {
  std::map<std::string, Tensor> t;
  for_each_tensor(c, [&](const TensorSpec& s) {
    if (s.shared_with.empty()) t.emplace(s.name, be ? be->alloc(DType::F32, s.shape) : Tensor::zeros(DType::F32, s.shape));
  });
  w = Weights::from_tensors(c, std::move(t), "gradients");
  p = bind_params(w);
  if (be) zero();
}

void Grads::zero() {
  if (be) {
    std::vector<FillArgs> f;
    for (Param& q : w.params()) f.push_back(FillArgs{q.w, 0.0f});
    be->fill_many(f);
    return;
  }
  for (Param& q : w.params()) std::fill_n(q.w.data<float>(), q.w.numel(), 0.0f);
}

void Model::backward(const BackwardInput& in, Grads& g) {
  const ModelDims& d = dims_;
  const ModelActs& a = acts_;
  const int64_t B = a.B, T = a.T, N = B * T, H = d.H;
  if (a.layers.size() != params_.layers.size())
    throw InternalError("Model::backward: the last forward did not keep its activations");
  auto router_grad = [&](size_t layer) {
    return layer < in.router_dlogits.size() ? in.router_dlogits[layer] : Tensor();
  };
  const size_t L = params_.layers.size();

  // ∂L/∂h⁰: the main head, plus module 1's hnorm path. MTP modules run last to first, each handing
  // ∂L/∂h^{k−1} to the one before.
  Tensor dh0 = be_.alloc(DType::F32, {N, H});
  head_backward(be_, params_.lm_head, g.p.lm_head, a.h0, in.dlogits, dh0, false);  // [N, H]
  Tensor dh_next;
  for (size_t k = a.mtp.size(); k >= 1; --k) {
    const MtpActs& ma = a.mtp[k - 1];
    if (ma.S <= 0) continue;  // not run: T ≤ k
    const bool in_loss = k - 1 < in.dmtp_logits.size() && present(in.dmtp_logits[k - 1]);
    // A module outside the loss (λ = 0) still backs its router's balance loss, which the total counts.
    if (!in_loss && !present(dh_next) && !present(router_grad(L + k - 1))) continue;
    Tensor dlog = in_loss ? in.dmtp_logits[k - 1] : be_.zeros(DType::F32, {B * ma.S, cfg_.vocab_size});
    Tensor dprev = k == 1 ? dh0 : be_.zeros(DType::F32, {B * a.mtp[k - 2].S, H});
    mtp_module_backward(be_, d, params_.mtp[k - 1], g.p.mtp[k - 1], g.p.embed_tokens, params_.lm_head,
                        g.p.lm_head, rope_.tables(), ma, B, dlog, dh_next, router_grad(L + k - 1), dprev);
    dh_next = dprev;
  }

  Tensor dx = be_.alloc(DType::F32, {N, H});
  const Tensor& x_last = L ? a.layers[L - 1].out : a.emb;
  modops::rmsnorm_backward(be_, dh0, x_last, params_.norm, a.final_rstd, g.p.norm, dx, false);
  RopeInput rope{&rope_.tables(), a.positions};
  for (size_t l = L; l >= 1; --l)  // in place: dx goes from ∂L/∂out of layer l to ∂L/∂x of it
    decoder_layer_backward(be_, d, params_.layers[l - 1], g.p.layers[l - 1], rope, a.layers[l - 1], B, T, dx,
                           router_grad(l - 1), dx);
  EmbeddingBackwardArgs eb;
  eb.ids = a.ids;
  eb.dout = dx;
  eb.dtable = g.p.embed_tokens;
  be_.embedding_backward(eb);
}

std::vector<int32_t> parse_token_ids(const std::string& text, int64_t vocab_size) {
  std::vector<int32_t> out;
  std::istringstream in(text);
  std::string tok;
  while (in >> tok) {
    errno = 0;
    char* end = nullptr;
    const long long v = std::strtoll(tok.c_str(), &end, 10);
    if (end == tok.c_str() || *end != '\0' || errno == ERANGE)
      input_error("--tokens: '", tok, "' (token ", out.size(), ") is not an integer token id");
    if (v < 0 || v >= vocab_size)
      input_error("--tokens: token id ", v, " (token ", out.size(), ") is outside the vocabulary [0, ", vocab_size,
                  ")");
    out.push_back(int32_t(v));
  }
  if (out.empty()) input_error("--tokens: no token ids given (expected \"ID ID ...\")");
  return out;
}

}  // namespace dsv3
