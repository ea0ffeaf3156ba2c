// The lean path of ModelRunner for steps of a few rows (see runner.h): the math of decoder_layer,
// moe_forward and mlp_forward on reused host buffers.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "infer/row_linear.h"
#include "infer/runner.h"

namespace dsv3 {

namespace {

float* grow(std::vector<float>& v, int64_t n) {
  if (v.size() < size_t(n)) v.resize(size_t(n));
  return v.data();
}

// y = x·rsqrt(mean(x²) + eps)·w per row (sum of squares in double); x rows ldx apart, y dense.
void rmsnorm_rows(const float* x, int64_t ldx, int64_t N, int64_t d, const float* w, float eps, float* y) {
  for (int64_t r = 0; r < N; ++r) {
    const float* xr = x + r * ldx;
    double ss = 0.0;
    for (int64_t j = 0; j < d; ++j) ss += double(xr[j]) * double(xr[j]);
    const float rs = float(1.0 / std::sqrt(ss / double(d) + double(eps)));
    float* yr = y + r * d;
    for (int64_t j = 0; j < d; ++j) yr[j] = w[j] * (xr[j] * rs);
  }
}

void add_into(float* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

Tensor view(float* p, const Shape& s) {
  static const std::shared_ptr<void> none(reinterpret_cast<void*>(1), [](void*) {});
  return Tensor::borrow(p, DType::F32, s, none);
}

}  // namespace

const float* ModelRunner::f32_of(const Tensor& t) {
  if (t.dtype() == DType::F32) return t.data<float>();
  std::vector<float>& v = f32_copies_[t.raw()];
  if (v.empty()) {
    v.resize(size_t(t.numel()));
    convert(t.raw(), t.dtype(), v.data(), DType::F32, v.size());
  }
  return v.data();
}

void ModelRunner::lin(const LinearParam& p, const float* x, int64_t N, float* y) {
  const int64_t out = p.w.dim(0), K = p.w.dim(1);
  if (p.w.dtype() != DType::F32) {
    linear_forward(be_, p, view(const_cast<float*>(x), {N, K}), view(y, {N, out}));
    return;
  }
  row_linear(x, K, N, p.w.data<float>(), out, K, y, out);
  if (present(p.bias)) {
    const float* b = f32_of(p.bias);
    for (int64_t r = 0; r < N; ++r) add_into(y + r * out, b, out);
  }
}

// RoPE on `heads` slices of width `stride` per row, rotating rope values from `offset` (as the
// backend's rope op: pairs (2i, 2i+1) interleaved, else (i, i + rope/2)).
void ModelRunner::rope_small(const StepRows& rows, float* x, int64_t heads, int64_t stride, int64_t offset) {
  const RopeTables& t = rope_.tables();
  const int64_t half = d_.rope / 2, step = d_.rope_interleaved ? 2 : 1, pair = d_.rope_interleaved ? 1 : half;
  for (int64_t i = 0; i < rows.size(); ++i) {
    const float* c = t.cos.data<float>() + rows.pos[size_t(i)] * half;
    const float* s = t.sin.data<float>() + rows.pos[size_t(i)] * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* r = x + (i * heads + h) * stride + offset;
      for (int64_t j = 0; j < half; ++j) {
        float* p = r + j * step;
        const float x0 = p[0], x1 = p[pair];
        p[0] = x0 * c[j] - x1 * s[j];
        p[pair] = x1 * c[j] + x0 * s[j];
      }
    }
  }
}

void ModelRunner::mlp_small(const MlpParams& p, const float* x, int64_t N, float* out, bool accumulate) {
  const int64_t I = p.gate_proj.w.dim(0), H = p.down_proj.w.dim(0);
  float* g = grow(ws_.f1, N * I);
  float* u = grow(ws_.f2, N * I);
  lin(p.gate_proj, x, N, g);
  lin(p.up_proj, x, N, u);
  for (int64_t i = 0; i < N * I; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  if (!accumulate) return lin(p.down_proj, g, N, out);
  float* t = grow(ws_.f3, N * H);
  lin(p.down_proj, g, N, t);
  add_into(out, t, N * H);
}

// Routing by the backend's router op; each used expert runs once on its rows (gathered); the
// weighted outputs are summed per row in top-k order, then the shared experts are added.
void ModelRunner::moe_small(const MoeParams& p, const float* x, int64_t N, float* out) {
  const int64_t E = d_.n_experts, k = d_.top_k, H = d_.H;
  float* logits = grow(ws_.logits, N * E);
  lin(p.gate, x, N, logits);
  if (ws_.ids.size() < size_t(N * k)) ws_.ids.resize(size_t(N * k));
  RouterArgs r;
  r.logits = view(logits, {N, E});
  r.bias = p.e_score_correction_bias;
  r.scoring = d_.scoring;
  r.method = d_.method;
  r.n_group = d_.n_group;
  r.topk_group = d_.topk_group;
  r.top_k = d_.top_k;
  r.norm_topk_prob = d_.norm_topk_prob;
  r.routed_scaling_factor = d_.routed_scaling_factor;
  r.scores = view(grow(ws_.scores, N * E), {N, E});
  r.ids = Tensor::borrow(ws_.ids.data(), DType::I32, {N, k}, std::shared_ptr<void>(ws_.ids.data(), [](void*) {}));
  r.weights = view(grow(ws_.weights, N * k), {N, k});
  be_.router(r);
  const int32_t* ids = ws_.ids.data();
  float* picks = grow(ws_.picks, N * k * H);  // expert output of pick (row, j) at row·k + j
  float* xs = grow(ws_.xs, N * k * H);
  float* ys = grow(ws_.ys, N * k * H);
  if (ws_.rows.size() < size_t(N * k)) ws_.rows.resize(size_t(N * k));
  for (int64_t e = 0; e < E; ++e) {
    int64_t c = 0;
    for (int64_t i = 0; i < N * k; ++i)
      if (ids[i] == e) {
        ws_.rows[size_t(c)] = int32_t(i);
        std::memcpy(xs + c * H, x + (i / k) * H, size_t(H) * sizeof(float));
        ++c;
      }
    if (c == 0) continue;
    mlp_small(p.experts[size_t(e)], xs, c, ys, false);
    for (int64_t j = 0; j < c; ++j) std::memcpy(picks + ws_.rows[size_t(j)] * H, ys + j * H, size_t(H) * sizeof(float));
  }
  const float* w = ws_.weights.data();
  for (int64_t t = 0; t < N; ++t) {
    float* o = out + t * H;
    std::fill(o, o + H, 0.0f);
    for (int64_t j = 0; j < k; ++j) {
      const float wj = w[t * k + j];
      const float* y = picks + (t * k + j) * H;
      for (int64_t c = 0; c < H; ++c) o[c] += wj * y[c];
    }
  }
  if (p.has_shared) mlp_small(p.shared_experts, x, N, out, true);
}

// decoder_layer on ws_.x in place.
void ModelRunner::layer_small(int64_t layer, const LayerParams& p, int64_t N, const StepRows& rows,
                              AttentionCache& cache) {
  const int64_t H = d_.H, nh = d_.nh, R = d_.kv_lora, P = d_.rope;
  const MlaParams& a = p.attn;
  float* x = ws_.x.data();
  float* h = grow(ws_.h, N * H);
  rmsnorm_rows(x, H, N, H, f32_of(p.input_layernorm), d_.eps, h);
  float* q = grow(ws_.q, N * nh * d_.qk);
  if (d_.q_lora > 0) {
    float* qa = grow(ws_.qa, N * d_.q_lora);
    lin(a.q_a_proj, h, N, qa);
    rmsnorm_rows(qa, d_.q_lora, N, d_.q_lora, f32_of(a.q_a_layernorm), d_.eps_mla, qa);
    lin(a.q_b_proj, qa, N, q);
  } else {
    lin(a.q_proj, h, N, q);
  }
  rope_small(rows, q, nh, d_.qk, d_.nope);
  float* kv = grow(ws_.kv, N * (R + P));
  lin(a.kv_a_proj_with_mqa, h, N, kv);
  float* ckv = grow(ws_.ckv, N * R);
  rmsnorm_rows(kv, R + P, N, R, f32_of(a.kv_a_layernorm), d_.eps_mla, ckv);
  float* kpe = grow(ws_.kpe, N * P);
  for (int64_t r = 0; r < N; ++r) std::memcpy(kpe + r * P, kv + r * (R + P) + R, size_t(P) * sizeof(float));
  rope_small(rows, kpe, 1, P, 0);
  float* attn = grow(ws_.attn, N * nh * d_.vd);
  cache.attend(layer, a, rows, view(q, {N, nh, d_.qk}), view(ckv, {N, R}), view(kpe, {N, P}),
               view(attn, {N, nh * d_.vd}));
  float* o = grow(ws_.o, N * H);
  lin(a.o_proj, attn, N, o);
  add_into(x, o, N * H);
  rmsnorm_rows(x, H, N, H, f32_of(p.post_attention_layernorm), d_.eps, h);
  if (p.is_moe)
    moe_small(p.moe, h, N, o);
  else
    mlp_small(p.mlp, h, N, o, false);
  add_into(x, o, N * H);
}

ModelRunner::Output ModelRunner::head_small(const float* normed, int64_t N, std::span<const int32_t> logit_rows) {
  if (logit_rows.empty()) return {};
  const int64_t n = int64_t(logit_rows.size()), H = d_.H;
  const float* src = normed + int64_t(logit_rows[0]) * H;
  bool consecutive = true;
  for (int64_t i = 0; i < n; ++i) {
    DSV3_CHECK(logit_rows[size_t(i)] >= 0 && logit_rows[size_t(i)] < N, "logit row ", logit_rows[size_t(i)]);
    consecutive = consecutive && logit_rows[size_t(i)] == logit_rows[0] + i;
  }
  if (!consecutive) {
    float* g = grow(ws_.xs, n * H);
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(g + i * H, normed + int64_t(logit_rows[size_t(i)]) * H, size_t(H) * sizeof(float));
    src = g;
  }
  Output o;
  o.logits = Tensor::empty(DType::F32, {n, params_.lm_head.w.dim(0)});
  lin(params_.lm_head, src, n, o.logits.data<float>());
  return o;
}

ModelRunner::Output ModelRunner::forward_small(AttentionCache& cache, const StepRows& rows,
                                               std::span<const int32_t> tokens, std::span<const int32_t> logit_rows) {
  const int64_t N = rows.size(), H = d_.H;
  int64_t mx = 0;
  for (int64_t p : rows.pos) mx = std::max(mx, p + 1);
  rope_for(mx);
  float* x = grow(ws_.x, N * H);
  const Tensor& emb = params_.embed_tokens;
  const size_t es = dtype_size(emb.dtype());
  for (int64_t r = 0; r < N; ++r)
    convert(static_cast<const char*>(emb.raw()) + size_t(tokens[size_t(r)]) * size_t(H) * es, emb.dtype(), x + r * H,
            DType::F32, size_t(H));
  for (size_t l = 0; l < params_.layers.size(); ++l) layer_small(int64_t(l), params_.layers[l], N, rows, cache);
  Tensor hidden = Tensor::empty(DType::F32, {N, H});
  rmsnorm_rows(ws_.x.data(), H, N, H, f32_of(params_.norm), d_.eps, hidden.data<float>());
  Output o = head_small(hidden.data<float>(), N, logit_rows);
  o.hidden = hidden;
  return o;
}

ModelRunner::Output ModelRunner::mtp_forward_small(int k, AttentionCache& cache, const StepRows& rows,
                                                   std::span<const int32_t> tokens, const Tensor& h_prev,
                                                   std::span<const int32_t> logit_rows) {
  const MtpParams& p = params_.mtp[size_t(k - 1)];
  const int64_t N = rows.size(), H = d_.H;
  int64_t mx = 0;
  for (int64_t q : rows.pos) mx = std::max(mx, q + 1);
  rope_for(mx);
  float* e = grow(ws_.h, N * H);
  const Tensor& emb = params_.embed_tokens;
  const size_t es = dtype_size(emb.dtype());
  for (int64_t r = 0; r < N; ++r)
    convert(static_cast<const char*>(emb.raw()) + size_t(tokens[size_t(r)]) * size_t(H) * es, emb.dtype(), e + r * H,
            DType::F32, size_t(H));
  // [enorm(embedding) ; hnorm(h_prev)], embedding first as the hub weights.
  float* cat = grow(ws_.cat, N * 2 * H);
  float* tmp = grow(ws_.o, N * H);
  rmsnorm_rows(e, H, N, H, f32_of(p.enorm), d_.eps, tmp);
  for (int64_t r = 0; r < N; ++r) std::memcpy(cat + r * 2 * H, tmp + r * H, size_t(H) * sizeof(float));
  rmsnorm_rows(h_prev.data<float>(), H, N, H, f32_of(p.hnorm), d_.eps, tmp);
  for (int64_t r = 0; r < N; ++r) std::memcpy(cat + r * 2 * H + H, tmp + r * H, size_t(H) * sizeof(float));
  float* x = grow(ws_.x, N * H);
  lin(p.eh_proj, cat, N, x);
  layer_small(cfg_.num_hidden_layers + k - 1, p.block, N, rows, cache);
  Tensor hidden = Tensor::empty(DType::F32, {N, H});
  std::memcpy(hidden.data<float>(), ws_.x.data(), size_t(N * H) * sizeof(float));
  float* normed = grow(ws_.h, N * H);
  rmsnorm_rows(ws_.x.data(), H, N, H, f32_of(p.shared_head_norm), d_.eps, normed);
  Output o = head_small(normed, N, logit_rows);
  o.hidden = hidden;
  return o;
}

}  // namespace dsv3
