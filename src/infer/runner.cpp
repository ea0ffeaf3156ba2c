#include "infer/runner.h"

#include <algorithm>

#include "backend/cuda/graph.h"
#include "backend/cuda/unchecked_ops.h"
#include "model/module_ops.h"

namespace dsv3 {

namespace {
// A step's token ids in the vocabulary (an InputError: they may come from a user) and its logits
// rows increasing, each in [0, N).
void check_step_inputs(std::span<const int32_t> tokens, int64_t vocab, std::span<const int32_t> logit_rows, int64_t N) {
  for (int32_t t : tokens)
    if (t < 0 || t >= vocab) input_error("token id ", t, " is outside the model's vocabulary [0, ", vocab, ")");
  for (size_t i = 0; i < logit_rows.size(); ++i)
    DSV3_CHECK(logit_rows[i] >= 0 && logit_rows[i] < N && (i == 0 || logit_rows[i] > logit_rows[i - 1]),
               "logit row ", logit_rows[i], " at ", i, " of a ", N, "-row step (increasing, in [0, N) expected)");
}
}  // namespace

using modops::i32_tensor;
using modops::rmsnorm;

ModelRunner::ModelRunner(const Weights& w, Backend& be)
    : cfg_(w.config()), be_(be), d_(model_dims(cfg_)), params_(bind_params(w)) {
  // The split is host code: device weights come back for it, and the halves go to the device.
  auto split = [&](const LinearParam& kv_b) {
    if (kv_b.w.device() == Device::CPU) return split_kv_b(kv_b, d_);
    LinearParam h = kv_b;
    h.w = be_.to_host(kv_b.w);
    if (present(kv_b.scale_inv)) h.scale_inv = be_.to_host(kv_b.scale_inv);
    AbsorbedKvB a = split_kv_b(h, d_, true);  // the device's GEMV may read an FP8 kv_b's blocks
    a.w_uk = be_.to_device(a.w_uk);
    a.w_uv = be_.to_device(a.w_uv);
    for (LinearParam* f : {&a.uk_t_fp8, &a.uv_fp8})
      if (present(f->w)) {
        f->w = be_.to_device(f->w);
        f->scale_inv = be_.to_device(f->scale_inv);
      }
    return a;
  };
  for (const LayerParams& l : params_.layers) absorbed_.push_back(split(l.attn.kv_b_proj));
  for (const MtpParams& m : params_.mtp) absorbed_.push_back(split(m.block.attn.kv_b_proj));
#ifdef DSV3_HAVE_CUDA
  if (be_.device() == Device::CUDA) {
    auto tables = [&](const LayerParams& l) {
      return l.is_moe && cuda_moe_supported(l.moe) ? cuda_moe_tables(l.moe) : CudaMoeTables{};
    };
    for (const LayerParams& l : params_.layers) moe_tables_.push_back(tables(l));
    for (const MtpParams& m : params_.mtp) moe_tables_.push_back(tables(m.block));
  }
#endif
}

// The backend's rope, or on CUDA without its range check (a synchronisation): the step's positions
// were made on the host and rope_for grew the tables to cover them.
void ModelRunner::rope(const Tensor& positions, const Tensor& x, int64_t offset) {
  RopeArgs a;
  a.x = x;
  a.positions = positions;
  a.cos = rope_.tables().cos;
  a.sin = rope_.tables().sin;
  a.offset = offset;
  a.rope_dim = d_.rope;
  a.interleaved = d_.rope_interleaved;
#ifdef DSV3_HAVE_CUDA
  if (be_.device() == Device::CUDA && sync_free_) return cuda_rope_unchecked(a);
#endif
  be_.rope(a);
}

const RopeTables& ModelRunner::rope_for(int64_t n) { return rope_.covering(be_, cfg_, n); }

void ModelRunner::set_device_gemv_rows(int64_t n) {
  if (n < 0 || n > kDeviceGemvMaxRows)
    input_error("device GEMV rows ", n, " is out of range (expected 0..", kDeviceGemvMaxRows, ")");
  device_gemv_rows_ = n;
}

std::pair<Tensor, Tensor> ModelRunner::ids_and_positions(std::span<const int32_t> tokens, const StepRows& rows) {
  const int64_t N = rows.size();
  std::vector<int32_t> tp(tokens.begin(), tokens.end());
  int64_t mx = 0;
  for (int64_t p : rows.pos) {
    tp.push_back(int32_t(p));
    mx = std::max(mx, p + 1);
  }
  rope_for(mx);
  const Tensor both = i32_tensor(be_, tp);
  return {both.rows(0, N), both.rows(N, 2 * N)};
}

void ModelRunner::linear(const LinearParam& p, const Tensor& x, const Tensor& y, bool accumulate) {
#ifdef DSV3_HAVE_CUDA
  if (small_gemv(x.dim(0)) && cuda_small_linear_ok(p, x)) {
    cuda_small_linear(p, x, y, accumulate);
    return;
  }
  cuda_graph_mark_unsafe("a linear through the backend");  // cuBLAS(Lt) and its scratch
#endif
  linear_forward(be_, p, x, y, accumulate);
}

// One decoder block; the MLA projections are those of mla_forward, the attention is the cache's.
Tensor ModelRunner::decoder_layer(int64_t layer, const LayerParams& p, const Tensor& x, const StepRows& rows,
                                  const Tensor& positions, AttentionCache& cache, const Tensor& h1_in,
                                  [[maybe_unused]] const Tensor* next_norm, [[maybe_unused]] Tensor* next_h) {
  const int64_t N = x.dim(0), nh = d_.nh;
  const MlaParams& a = p.attn;
  Tensor rstd;
  Tensor q = be_.alloc(DType::F32, {N, nh, d_.qk});
  const Tensor q2 = q.reshape({N, nh * d_.qk});
  Tensor kv_a = be_.alloc(DType::F32, {N, d_.kv_lora + d_.rope});
  const LinearParam& q_first = d_.q_lora > 0 ? a.q_a_proj : a.q_proj;
  // Small steps on CUDA: q_a (or q) and kv_a in one GEMV launch; up to small_rows that launch also
  // applies input_layernorm and q_b's applies q_a_layernorm (beyond, every CTA would recompute them).
  bool pair = false, fuse_norms = false;
#ifdef DSV3_HAVE_CUDA
  pair = small_gemv(N) && cuda_small_linear_ok(q_first, x) && cuda_small_linear_ok(a.kv_a_proj_with_mqa, x) &&
         q_first.w.dtype() == a.kv_a_proj_with_mqa.w.dtype();
  fuse_norms = pair && N <= small_rows_ && cuda_small_linear_fuses_norm(q_first);
#endif
  const Tensor h1 = fuse_norms      ? x
                    : present(h1_in) ? h1_in
                                     : rmsnorm(be_, x, p.input_layernorm, d_.eps, rstd);  // [N, H]
  const Tensor first = d_.q_lora > 0 ? be_.alloc(DType::F32, {N, d_.q_lora}) : q2;
#ifdef DSV3_HAVE_CUDA
  if (pair)
    cuda_small_linear(q_first, h1, first, false, fuse_norms ? &p.input_layernorm : nullptr, d_.eps,
                      &a.kv_a_proj_with_mqa, &kv_a);
#endif
  if (!pair) {
    linear(q_first, h1, first);              // [N, q_lora] or [N, nh·qk]
    linear(a.kv_a_proj_with_mqa, h1, kv_a);  // [N, kv_lora + rope]
  }
  if (d_.q_lora > 0) {
    bool q_b_done = false;
#ifdef DSV3_HAVE_CUDA
    q_b_done = fuse_norms && cuda_small_linear_ok(a.q_b_proj, first) && cuda_small_linear_fuses_norm(a.q_b_proj);
    if (q_b_done) cuda_small_linear(a.q_b_proj, first, q2, false, &a.q_a_layernorm, d_.eps_mla);
#endif
    if (!q_b_done) linear(a.q_b_proj, rmsnorm(be_, first, a.q_a_layernorm, d_.eps_mla, rstd), q2);  // [N, nh·qk]
  }
  Tensor c_kv_n, k_pe = be_.alloc(DType::F32, {N, d_.rope});
  bool latent_done = false;
#ifdef DSV3_HAVE_CUDA
  if (be_.device() == Device::CUDA && sync_free_) {  // q's RoPE too
    c_kv_n = be_.alloc(DType::F32, {N, d_.kv_lora});
    const RopeTables& t = rope_.tables();
    // With q_lora, q_b's launches came after kv_a's producer, so cuda_kv_latent may read kv_a early.
    // On the GEMV path of a one-row step it runs beside the attention's W_UK GEMV, which attend()
    // issues first (at 32 rows it measured no gain, within the A/B's spread: gpu_decode_beside.json).
    const bool beside = N == 1 && small_gemv(N) && cuda_decode_beside() && cache.joins_beside();
    cuda_kv_latent(kv_a, a.kv_a_layernorm, d_.eps_mla, positions, t.cos, t.sin, d_.rope_interleaved, c_kv_n, k_pe,
                   &q, d_.nope, d_.q_lora > 0, beside);
    latent_done = true;
  }
#endif
  if (!latent_done) {
    rope(positions, q, d_.nope);
    Tensor c_kv = be_.alloc(DType::F32, {N, d_.kv_lora});
    copy_cols(be_, kv_a, 0, c_kv, 0, d_.kv_lora);
    c_kv_n = rmsnorm(be_, c_kv, a.kv_a_layernorm, d_.eps_mla, rstd);  // cached latent
    copy_cols(be_, kv_a, d_.kv_lora, k_pe, 0, d_.rope);
    rope(positions, k_pe.reshape({N, 1, d_.rope}), 0);
  }

  Tensor attn = be_.alloc(DType::F32, {N, nh * d_.vd});
  cache.attend(layer, a, rows, q, c_kv_n, k_pe, attn);
  // The grouped MoE on the device (small steps): the residual adds are folded into o_proj's GEMM
  // (accumulating into x, which nothing reads afterwards) and into the experts' combine kernel.
  const CudaMoeTables* dev_moe = p.is_moe && sync_free_ && size_t(layer) < moe_tables_.size() &&
                                         present(moe_tables_[size_t(layer)].ptrs) && N <= kDeviceMoeRows &&
                                         cuda_moe_fits(moe_tables_[size_t(layer)], N, d_.top_k)
                                     ? &moe_tables_[size_t(layer)]
                                     : nullptr;
  Tensor x2;
  AddArgs add;
  if (dev_moe) {
    x2 = x;
    linear(a.o_proj, attn, x2, true);  // x2 = x + o_proj(attn)
  } else {
    x2 = be_.alloc(DType::F32, {N, d_.H});
    linear(a.o_proj, attn, x2);  // o_proj(attn)
    add.a = x2;
    add.b = x;
    add.out = x2;
    be_.add(add);  // x2 = x + attn
  }

  // The grouped MoE's router GEMV runs inside the post-attention norm's launch when its weight is
  // small (bench-0.7b's 32 × 1024) and the step wide (cuda_norm_router_min_rows).
  Tensor h2, router_logits;
#ifdef DSV3_HAVE_CUDA
  if (dev_moe && N >= cuda_norm_router_min_rows() && cuda_norm_router_ok(p.moe.gate, x2)) {
    h2 = be_.alloc(DType::F32, {N, d_.H});
    router_logits = be_.alloc(DType::F32, {N, p.moe.gate.w.dim(0)});
    cuda_norm_router(x2, p.post_attention_layernorm, d_.eps, p.moe.gate, h2, router_logits);
  }
#endif
  if (!present(h2)) h2 = rmsnorm(be_, x2, p.post_attention_layernorm, d_.eps, rstd);
  Tensor ffn;
  bool small_mlp = false;
#ifdef DSV3_HAVE_CUDA
  small_mlp = !p.is_moe && small_gemv(N) && cuda_small_mlp_ok(p.mlp, h2);
#endif
  if (dev_moe) {
#ifdef DSV3_HAVE_CUDA
    CudaNextNorm nn;
    if (next_norm) {
      nn.weight = *next_norm;
      nn.eps = d_.eps;
    }
    Tensor out = cuda_moe_forward(be_, d_, p.moe, *dev_moe, h2, &x2, small_gemv(N), next_norm ? &nn : nullptr,
                                  present(router_logits) ? &router_logits : nullptr);
    if (next_norm) *next_h = nn.out;
    return out;  // x2 + ffn
#endif
  } else if (small_mlp) {
#ifdef DSV3_HAVE_CUDA
    // The dense MLP of a small step: gate and up in one GEMV launch, SwiGLU, then down accumulated
    // into x2 (x2 + down(·), the order of the add below).
    const int64_t I = p.mlp.gate_proj.w.dim(0);
    Tensor g = be_.alloc(DType::F32, {N, I}), u = be_.alloc(DType::F32, {N, I}), act = be_.alloc(DType::F32, {N, I});
    cuda_small_linear(p.mlp.gate_proj, h2, g, false, nullptr, 0.0f, &p.mlp.up_proj, &u);
    SwigluArgs sw;
    sw.gate = g;
    sw.up = u;
    sw.out = act;
    be_.swiglu(sw);
    linear(p.mlp.down_proj, act, x2, true);
    return x2;
#endif
  } else if (p.is_moe) {
#ifdef DSV3_HAVE_CUDA
    cuda_graph_mark_unsafe("the backend's MoE");
#endif
    MoeActs m;
    moe_forward(be_, d_, p.moe, h2, m);
    ffn = m.out;
  } else {
#ifdef DSV3_HAVE_CUDA
    cuda_graph_mark_unsafe("the backend's MLP");
#endif
    MlpActs m;
    mlp_forward(be_, p.mlp, h2, m);
    ffn = m.out;
  }
  add.a = x2;
  add.b = ffn;
  add.out = x2;
  be_.add(add);
  return x2;
}

Tensor ModelRunner::head(const Tensor& normed, std::span<const int32_t> logit_rows) {
  const int64_t V = params_.lm_head.w.dim(0);
  if (logit_rows.empty()) return Tensor();
  const Tensor sel = select_rows(normed, logit_rows);
  Tensor logits = be_.alloc(DType::F32, {int64_t(logit_rows.size()), V});
  linear(params_.lm_head, sel, logits);
  return logits;
}

ModelRunner::Output ModelRunner::forward(AttentionCache& cache, const StepRows& rows, std::span<const int32_t> tokens,
                                         std::span<const int32_t> logit_rows, bool graph_ok) {
  const int64_t N = rows.size();
  DSV3_CHECK(N > 0 && int64_t(tokens.size()) == N);
  check_step_inputs(tokens, cfg_.vocab_size, logit_rows, N);
  if (use_small(N)) return forward_small(cache, rows, tokens, logit_rows);
  if (graph_ok && graphs_ && small_gemv(N))
    if (std::optional<Output> o = forward_graph(cache, rows, tokens, logit_rows)) return std::move(*o);
  const auto [ids, positions] = ids_and_positions(tokens, rows);  // ids checked above
  return forward_body(cache, rows, ids, positions, logit_rows);
}

Tensor ModelRunner::embed(const Tensor& ids) {
  Tensor x = be_.alloc(DType::F32, {ids.numel(), d_.H});
  EmbeddingArgs e;
  e.ids = ids;
  e.table = params_.embed_tokens;
  e.out = x;
#ifdef DSV3_HAVE_CUDA
  if (be_.device() == Device::CUDA && sync_free_)
    cuda_embedding_unchecked(e);  // the ids were checked on the host
  else
#endif
    be_.embedding(e);
  return x;
}

ModelRunner::Output ModelRunner::forward_body(AttentionCache& cache, const StepRows& rows, const Tensor& ids,
                                              const Tensor& positions, std::span<const int32_t> logit_rows) {
  const int64_t N = rows.size();
  Tensor x = embed(ids);
  // Each block's output norm comes from the block when it can compute it (the next block's input
  // norm is only used beyond small_rows, where the GEMV does not fuse it; the final norm always).
  Tensor h;
  const size_t L = params_.layers.size();
  for (size_t l = 0; l < L; ++l) {
    const bool last = l + 1 == L;
    const Tensor* next = last ? &params_.norm : N > small_rows_ ? &params_.layers[l + 1].input_layernorm : nullptr;
    Tensor next_h;
    x = decoder_layer(int64_t(l), params_.layers[l], x, rows, positions, cache, h, next, &next_h);
    h = next_h;
  }
  Tensor rstd;
  Output o;
  o.hidden = present(h) ? h : rmsnorm(be_, x, params_.norm, d_.eps, rstd);  // h⁰
  o.logits = head(o.hidden, logit_rows);
  return o;
}

ModelRunner::Output ModelRunner::mtp_forward(int k, AttentionCache& cache, const StepRows& rows,
                                             std::span<const int32_t> tokens, const Tensor& h_prev,
                                             std::span<const int32_t> logit_rows, bool graph_ok) {
  DSV3_CHECK(k >= 1 && k <= num_mtp());
  const int64_t N = rows.size();
  DSV3_CHECK(N > 0 && int64_t(tokens.size()) == N && h_prev.device() == Device::CPU && h_prev.dim(0) == N &&
             h_prev.dim(1) == d_.H && h_prev.dtype() == DType::F32);
  check_step_inputs(tokens, cfg_.vocab_size, logit_rows, N);
  if (use_small(N)) return mtp_forward_small(k, cache, rows, tokens, h_prev, logit_rows);
  auto eager = [&](std::span<const int32_t> out_rows) {
    const auto [ids, positions] = ids_and_positions(tokens, rows);  // ids checked above
    const Tensor h = be_.device() == Device::CPU ? h_prev : be_.to_device(h_prev);
    return mtp_body(k, cache, rows, ids, positions, h, out_rows);
  };
  if (!small_gemv(N)) return eager(logit_rows);
  std::vector<int32_t> every(static_cast<size_t>(N));
  for (int64_t r = 0; r < N; ++r) every[size_t(r)] = int32_t(r);
  std::optional<Output> o;
  if (graph_ok && graphs_ && !gstats_.mtp_disabled) o = mtp_forward_graph(k, cache, rows, tokens, h_prev, every);
  if (!o) o = eager(every);
  o->logits = select_rows(o->logits, logit_rows);
  return std::move(*o);
}

Tensor ModelRunner::select_rows(const Tensor& x, std::span<const int32_t> rows) {
  if (rows.empty()) return Tensor();
  bool consecutive = true;
  for (size_t i = 1; consecutive && i < rows.size(); ++i) consecutive = rows[i] == rows[i - 1] + 1;
  if (consecutive) return x.rows(rows.front(), rows.back() + 1);
  Tensor sel = be_.alloc(DType::F32, {int64_t(rows.size()), x.dim(1)});
  modops::gather_rows(be_, x, i32_tensor(be_, std::vector<int32_t>(rows.begin(), rows.end())), sel);
  return sel;
}

ModelRunner::Output ModelRunner::mtp_body(int k, AttentionCache& cache, const StepRows& rows, const Tensor& ids,
                                          const Tensor& positions, const Tensor& h_prev,
                                          std::span<const int32_t> logit_rows) {
  const MtpParams& p = params_.mtp[size_t(k - 1)];
  const int64_t N = rows.size(), H = d_.H;
  const Tensor emb = embed(ids);
  Tensor rstd;
  const Tensor e_n = rmsnorm(be_, emb, p.enorm, d_.eps, rstd);
  const Tensor h_n = rmsnorm(be_, h_prev, p.hnorm, d_.eps, rstd);
  Tensor cat = be_.alloc(DType::F32, {N, 2 * H});
  copy_cols(be_, e_n, 0, cat, 0, H);  // embedding first, as the hub weights
  copy_cols(be_, h_n, 0, cat, H, H);
  Tensor x = be_.alloc(DType::F32, {N, H});
  linear(p.eh_proj, cat, x);
  Output o;
  o.hidden = decoder_layer(cfg_.num_hidden_layers + k - 1, p.block, x, rows, positions, cache);  // h^k
  o.logits = head(rmsnorm(be_, o.hidden, p.shared_head_norm, d_.eps, rstd), logit_rows);
  return o;
}

}  // namespace dsv3
