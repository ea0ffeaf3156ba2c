// Forward op cases for the generic backend harness: each op on random inputs against the naive
// double-precision reference (reference.h). Sizes cross the CPU backend's block boundaries
// (256-row weight blocks, 128-row query blocks, partial FP8 blocks).
#include <cstring>

#include "harness.h"
#include "reference.h"

namespace dsv3::test {
namespace {

Tensor up(Backend& b, const Tensor& h) { return b.to_device(h); }
Tensor down(Backend& b, const Tensor& t) { return b.to_host(t); }
std::vector<int32_t> ints(const Tensor& t) {
  return std::vector<int32_t>(t.data<int32_t>(), t.data<int32_t>() + t.numel());
}
Vec ints_vec(const std::vector<int32_t>& v) { return Vec(v.begin(), v.end()); }

// linear with weights of every stored dtype; N and K cross 128/256 boundaries unevenly.
std::vector<Output> linear_case(Backend& b, Guards& g, uint64_t seed, DType wt, bool accumulate) {
  int64_t m = 5, n = 300, k = 200;
  Tensor x = randn({m, k}, seed, 1);
  Tensor w = randn({n, k}, seed, 2, 0.5f, wt == DType::F8_E4M3 ? DType::F32 : wt);
  Tensor sinv;
  Vec wd;
  if (wt == DType::F8_E4M3) {
    sinv = Tensor::empty(DType::F32, {3, 2});
    for (int i = 0; i < 6; ++i) sinv.data<float>()[i] = 0.01f * float(i + 1);
    w = w.to(DType::F8_E4M3);
    wd = ref::dequant_fp8(w, sinv);
  } else {
    wd = to_vec(w);
  }
  Tensor y0 = randn({m, n}, seed, 3);
  Tensor y = accumulate ? g.init(y0) : g.out(DType::F32, {m, n});
  b.linear({up(b, x), up(b, w), present(sinv) ? up(b, sinv) : Tensor(), y, accumulate});
  Vec want = ref::linear(to_vec(x), wd, m, n, k);
  if (accumulate)
    for (size_t i = 0; i < want.size(); ++i) want[i] += double(y0.data<float>()[i]);
  return {{"y", down(b, y), want, tol::kF32}};
}

// grouped_linear over uneven blocks (an empty one; one over several of the CUDA path's 128-row
// chunks; the last chunk reading past x), each block against linear's reference on its rows; FP8
// weights with each block's own scales.
std::vector<Output> grouped_case(Backend& b, Guards& g, uint64_t seed, DType wt, bool accumulate) {
  const std::vector<int64_t> off = {0, 3, 3, 300, 301, 420};
  const int64_t m = off.back(), n = 96, k = 200;
  Tensor x = randn({m, k}, seed, 1);
  std::vector<Tensor> w, wd, sd;
  std::vector<Vec> wref;
  for (size_t e = 0; e + 1 < off.size(); ++e) {
    if (wt == DType::F8_E4M3) {  // block scales [1, 2] per weight, different per block
      Tensor sinv = Tensor::empty(DType::F32, {1, 2});
      for (int i = 0; i < 2; ++i) sinv.data<float>()[i] = 0.01f * float(e + 1) + 0.005f * float(i);
      w.push_back(randn({n, k}, seed, 10 + e, 0.5f).to(DType::F8_E4M3));
      wref.push_back(ref::dequant_fp8(w.back(), sinv));
      sd.push_back(up(b, sinv));
    } else {
      w.push_back(randn({n, k}, seed, 10 + e, 0.5f, wt));
      wref.push_back(to_vec(w.back()));
    }
    wd.push_back(up(b, w.back()));
  }
  Tensor y0 = randn({m, n}, seed, 3);
  Tensor y = accumulate ? g.init(y0) : g.out(DType::F32, {m, n});
  b.grouped_linear({up(b, x), wd, sd, off, y, accumulate});
  Vec want(size_t(m * n));
  const Vec xv = to_vec(x);
  for (size_t e = 0; e + 1 < off.size(); ++e) {
    const int64_t r0 = off[e], rows = off[e + 1] - r0;
    const Vec part = ref::linear(Vec(xv.begin() + r0 * k, xv.begin() + (r0 + rows) * k), wref[e], rows, n, k);
    std::copy(part.begin(), part.end(), want.begin() + r0 * n);
  }
  if (accumulate)
    for (size_t i = 0; i < want.size(); ++i) want[i] += double(y0.data<float>()[i]);
  return {{"y", down(b, y), want, tol::kF32}};
}

}  // namespace

OP_CASE(grouped_linear_f32) { return grouped_case(b, g, seed, DType::F32, false); }
OP_CASE(grouped_linear_bf16) { return grouped_case(b, g, seed, DType::BF16, false); }
OP_CASE(grouped_linear_bf16_accumulate) { return grouped_case(b, g, seed, DType::BF16, true); }
OP_CASE(grouped_linear_fp8_block_scaled) { return grouped_case(b, g, seed, DType::F8_E4M3, false); }
OP_CASE(linear_f32) { return linear_case(b, g, seed, DType::F32, false); }
OP_CASE(linear_f32_accumulate) { return linear_case(b, g, seed, DType::F32, true); }
OP_CASE(linear_bf16) { return linear_case(b, g, seed, DType::BF16, false); }
OP_CASE(linear_bf16_accumulate) { return linear_case(b, g, seed, DType::BF16, true); }
OP_CASE(linear_f16_accumulate) { return linear_case(b, g, seed, DType::F16, true); }
OP_CASE(linear_fp8_block_scaled) { return linear_case(b, g, seed, DType::F8_E4M3, false); }
OP_CASE(linear_fp8_block_scaled_accumulate) { return linear_case(b, g, seed, DType::F8_E4M3, true); }

OP_CASE(matmul_transposes) {
  std::vector<Output> outs;
  int64_t m = 6, n = 5, k = 7;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      Tensor a = randn(ta ? Shape{k, m} : Shape{m, k}, seed, 10 + uint64_t(ta));
      Tensor bm = randn(tb ? Shape{n, k} : Shape{k, n}, seed, 20 + uint64_t(tb));
      Tensor c0 = randn({m, n}, seed, 30);
      Tensor c = g.init(c0);
      b.matmul({up(b, a), up(b, bm), c, ta == 1, tb == 1, 0.5f, true});
      Vec av = to_vec(a), bv = to_vec(bm), want(static_cast<size_t>(m * n));
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) {
          double s = 0;
          for (int64_t l = 0; l < k; ++l)
            s += av[size_t(ta ? l * m + i : i * k + l)] * bv[size_t(tb ? j * k + l : l * n + j)];
          want[size_t(i * n + j)] = 0.5 * s + double(c0.data<float>()[i * n + j]);
        }
      outs.push_back({cat("c_ta", ta, "_tb", tb), down(b, c), want, tol::kF32});
    }
  return outs;
}

OP_CASE(embedding_bf16_table) {
  int64_t v = 11, d = 6, t = 9;
  Tensor table = randn({v, d}, seed, 1, 1.0f, DType::BF16);
  Tensor ids = randi({t}, seed, 2, 0, int32_t(v));
  Tensor out = g.out(DType::F32, {t, d});
  b.embedding({up(b, ids), up(b, table), out});
  Vec tv = to_vec(table), want;
  for (int32_t id : ints(ids))
    for (int64_t j = 0; j < d; ++j) want.push_back(tv[size_t(id * d + j)]);
  return {{"out", down(b, out), want, 0.0}};
}

OP_CASE(rmsnorm_bf16_weight) {
  int64_t m = 5, d = 37;
  Tensor x = randn({m, d}, seed, 1, 3.0f);
  Tensor w = randn({d}, seed, 2, 1.0f, DType::BF16);
  Tensor y = g.out(DType::F32, {m, d}), rstd = g.out(DType::F32, {m});
  b.rmsnorm({up(b, x), up(b, w), 1e-6f, y, rstd});
  Vec xv = to_vec(x), want_r;
  for (int64_t i = 0; i < m; ++i) {
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += xv[size_t(i * d + j)] * xv[size_t(i * d + j)];
    want_r.push_back(1 / std::sqrt(ss / double(d) + 1e-6));
  }
  return {{"y", down(b, y), ref::rmsnorm(xv, to_vec(w), m, d, 1e-6), tol::kF32},
          {"rstd", down(b, rstd), want_r, tol::kF32}};
}

namespace {
std::vector<Output> rope_case(Backend& b, Guards& g, uint64_t seed, bool interleaved, bool inverse) {
  int64_t t = 4, h = 3, w = 10, off = 2, rd = 8, max_pos = 16;
  RopeParams p;
  p.type = "yarn";
  p.dim = rd;
  p.theta = 10000;
  p.factor = 4;
  p.original_max_position_embeddings = 4;
  p.max_position_embeddings = 16;
  p.mscale = 0.9;
  p.mscale_all_dim = 0.7;
  RopeTables tab = rope_tables(p, max_pos);
  Tensor x = randn({t, h, w}, seed, 1);
  Tensor pos = randi({t}, seed, 2, 0, int32_t(max_pos));
  Tensor xd = g.init(x);
  b.rope({xd, up(b, pos), up(b, tab.cos), up(b, tab.sin), off, rd, interleaved, inverse});
  Vec want = ref::rope(to_vec(x), ints(pos), to_vec(tab.cos), to_vec(tab.sin), t, h, w, off, rd, interleaved,
                       inverse);
  return {{"x", down(b, xd), want, tol::kF32}};
}
}  // namespace

OP_CASE(rope_interleaved_yarn) { return rope_case(b, g, seed, true, false); }
OP_CASE(rope_halves_inverse) { return rope_case(b, g, seed, false, true); }

namespace {
std::vector<Output> attention_case(Backend& b, Guards& g, uint64_t seed, int64_t bsz, int64_t t, int64_t s,
                                   int64_t h, int64_t dq, int64_t dv, bool causal, int64_t q_off) {
  auto shp = [&](int64_t len, int64_t d) { return bsz ? Shape{bsz, len, h, d} : Shape{len, h, d}; };
  int64_t bb = bsz ? bsz : 1;
  Tensor q = randn(shp(t, dq), seed, 1), k = randn(shp(s, dq), seed, 2), v = randn(shp(s, dv), seed, 3);
  Tensor out = g.out(DType::F32, shp(t, dv));
  Tensor lse = g.out(DType::F32, bsz ? Shape{bsz, h, t} : Shape{h, t});
  float scale = float(1 / std::sqrt(double(dq)));
  b.attention({up(b, q), up(b, k), up(b, v), out, lse, scale, causal, q_off, {}, {}});
  ref::AttnOut r = ref::attention(to_vec(q), to_vec(k), to_vec(v), bb, t, s, h, dq, dv, scale, causal, q_off);
  return {{"out", down(b, out), r.out, tol::kF32}, {"lse", down(b, lse), r.lse, tol::kF32}};
}
}  // namespace

namespace {
// MLA's split form (ops.h): k = [kv[..., :dn] ; k_pe] per head, v = kv[..., dn:]. The reference is
// the plain attention over k and v built here.
std::vector<Output> attention_split_case(Backend& b, Guards& g, uint64_t seed, int64_t bsz, int64_t t, int64_t s,
                                         int64_t h, int64_t dn, int64_t dr, int64_t dv, int64_t q_off) {
  auto shp = [&](int64_t len, int64_t heads, int64_t d) {
    return bsz ? Shape{bsz, len, heads, d} : Shape{len, heads, d};
  };
  const int64_t bb = bsz ? bsz : 1, dq = dn + dr;
  Tensor q = randn(shp(t, h, dq), seed, 1), kv = randn(shp(s, h, dn + dv), seed, 2);
  Tensor k_pe = randn(shp(s, 1, dr), seed, 3);
  Tensor out = g.out(DType::F32, shp(t, h, dv));
  Tensor lse = g.out(DType::F32, bsz ? Shape{bsz, h, t} : Shape{h, t});
  const float scale = float(1 / std::sqrt(double(dq)));
  AttentionArgs a;
  a.q = up(b, q), a.kv = up(b, kv), a.k_pe = up(b, k_pe), a.out = out, a.lse = lse;
  a.scale = scale, a.q_offset = q_off;
  b.attention(a);
  const ref::SplitKv kv_ = ref::split_kv(to_vec(kv), to_vec(k_pe), bb * s, h, dn, dr, dv);
  ref::AttnOut r = ref::attention(to_vec(q), kv_.k, kv_.v, bb, t, s, h, dq, dv, scale, true, q_off);
  return {{"out", down(b, out), r.out, tol::kF32}, {"lse", down(b, lse), r.lse, tol::kF32}};
}
}  // namespace

OP_CASE(attention_split_kv_batched_offset) { return attention_split_case(b, g, seed, 2, 5, 7, 3, 4, 4, 6, 2); }
OP_CASE(attention_split_kv_mla_heads) { return attention_split_case(b, g, seed, 0, 9, 9, 2, 128, 64, 128, 0); }

OP_CASE(attention_causal_batched_offset) { return attention_case(b, g, seed, 2, 5, 7, 3, 6, 4, true, 2); }
OP_CASE(attention_full_unbatched) { return attention_case(b, g, seed, 0, 5, 7, 2, 6, 8, false, 0); }
OP_CASE(attention_causal_two_query_blocks) { return attention_case(b, g, seed, 0, 130, 130, 2, 8, 4, true, 0); }
// No keys (S = 0, not causal): the output is the empty sum, zeros; lse is −inf, so only out is
// compared. Widths of 8 take the CUDA tiled kernel, 4 the per-row one.
OP_CASE(attention_full_no_keys) { return {attention_case(b, g, seed, 0, 3, 0, 2, 8, 4, false, 0).front()}; }
OP_CASE(attention_full_no_keys_tiled) { return {attention_case(b, g, seed, 2, 3, 0, 2, 8, 8, false, 0).front()}; }

// 45 elements: the CUDA kernel's four-at-a-time loop and its tail.
OP_CASE(swiglu) {
  Tensor gt = randn({5, 9}, seed, 1, 3.0f), u = randn({5, 9}, seed, 2);
  Tensor out = g.out(DType::F32, {5, 9});
  b.swiglu({up(b, gt), up(b, u), out});
  return {{"out", down(b, out), ref::swiglu(to_vec(gt), to_vec(u)), tol::kF32}};
}

// BF16 output (model/moe.cpp's bf16_activations): each value rounded once.
OP_CASE(swiglu_bf16_out) {
  Tensor gt = randn({5, 9}, seed, 1, 3.0f), u = randn({5, 9}, seed, 2);
  Tensor out = g.out(DType::BF16, {5, 9});
  b.swiglu({up(b, gt), up(b, u), out});
  return {{"out", down(b, out), ref::swiglu(to_vec(gt), to_vec(u)), tol::kBf16}};
}

// The elementwise maps on views one float past a 16-byte boundary (the CUDA kernels' one-by-one
// path); mul accumulates into its output.
OP_CASE(elementwise_unaligned) {
  const int64_t n = 21;
  Tensor x = randn({n + 1, 1}, seed, 1, 2.0f), y = randn({n + 1, 1}, seed, 2);
  const Tensor xd = up(b, x), yd = up(b, y), xs = xd.rows(1, n + 1), ys = yd.rows(1, n + 1);
  Tensor add = g.out(DType::F32, {n + 1, 1}), sw = g.out(DType::F32, {n + 1, 1}), mul = g.init(y);
  b.add({xs, ys, add.rows(1, n + 1), 2.0f, -0.5f});
  b.swiglu({xs, ys, sw.rows(1, n + 1)});
  b.mul({xs, ys, mul.rows(1, n + 1), true});
  const Vec xa = to_vec(x), ya = to_vec(y), xv(xa.begin() + 1, xa.end()), yv(ya.begin() + 1, ya.end());
  Vec wa, wm;
  for (int64_t i = 0; i < n; ++i) {
    wa.push_back(2 * xv[size_t(i)] - 0.5 * yv[size_t(i)]);
    wm.push_back(xv[size_t(i)] * yv[size_t(i)] + yv[size_t(i)]);
  }
  return {{"add", down(b, add.rows(1, n + 1)), wa, tol::kF32},
          {"swiglu", down(b, sw.rows(1, n + 1)), ref::swiglu(xv, yv), tol::kF32},
          {"mul", down(b, mul.rows(1, n + 1)), wm, tol::kF32}};
}

namespace {
std::vector<Output> router_case(Backend& b, Guards& g, uint64_t seed, RouterScoring sc, RouterMethod m,
                                bool bias, bool norm) {
  int64_t t = 7, e = 16;
  int ng = 4, tg = 2, k = 3;
  Tensor logits = randn({t, e}, seed, 1, 2.0f);
  Tensor bt = bias ? randn({e}, seed, 2, 0.5f) : Tensor();
  Tensor scores = g.out(DType::F32, {t, e}), ids = g.out(DType::I32, {t, k}), w = g.out(DType::F32, {t, k});
  RouterArgs a;
  a.logits = up(b, logits);
  if (bias) a.bias = up(b, bt);
  a.scoring = sc;
  a.method = m;
  a.n_group = ng;
  a.topk_group = tg;
  a.top_k = k;
  a.norm_topk_prob = norm;
  a.routed_scaling_factor = 2.5f;
  a.scores = scores;
  a.ids = ids;
  a.weights = w;
  b.router(a);
  Vec bv = bias ? to_vec(bt) : Vec();
  ref::RouterOut r = ref::router(to_vec(logits), t, e, bias ? &bv : nullptr, sc, m, ng, tg, k, norm, 2.5);
  return {{"ids", down(b, ids), ints_vec(r.ids), 0.0},
          {"weights", down(b, w), r.weights, tol::kF32},
          {"scores", down(b, scores), r.scores, tol::kF32}};
}
}  // namespace

OP_CASE(router_v3_noaux_tc) {
  return router_case(b, g, seed, RouterScoring::Sigmoid, RouterMethod::NoauxTc, true, true);
}
OP_CASE(router_v2_group_limited_greedy) {
  return router_case(b, g, seed, RouterScoring::Softmax, RouterMethod::GroupLimitedGreedy, false, false);
}
OP_CASE(router_greedy_softmax_norm) {
  return router_case(b, g, seed, RouterScoring::Softmax, RouterMethod::Greedy, false, true);
}

OP_CASE(moe_sort) {
  int64_t t = 9, k = 3, e = 5;
  Tensor ids = randi({t, k}, seed, 1, 0, int32_t(e));
  Tensor pick = g.out(DType::I32, {t * k}), token = g.out(DType::I32, {t * k}), counts = g.out(DType::I32, {e});
  b.moe_sort({up(b, ids), e, pick, token, counts});
  std::vector<int32_t> iv = ints(ids);
  Vec wp, wt, wc(size_t(e), 0.0);
  for (int32_t ex = 0; ex < e; ++ex)
    for (int64_t i = 0; i < t * k; ++i)
      if (iv[size_t(i)] == ex) {
        wp.push_back(double(i));
        wt.push_back(double(i / k));
        wc[size_t(ex)] += 1;
      }
  return {{"pick", down(b, pick), wp, 0.0}, {"token", down(b, token), wt, 0.0}, {"counts", down(b, counts), wc, 0.0}};
}

namespace {
// d 5: the CUDA row kernels' one-by-one path; d 8: four columns at a time.
std::vector<Output> gather_case(Backend& b, Guards& g, uint64_t seed, int64_t d) {
  int64_t r = 6, n = 10;
  Tensor src = randn({r, d}, seed, 1), idx = randi({n}, seed, 2, 0, int32_t(r)), w = randn({n}, seed, 3);
  Tensor o0 = randn({n, d}, seed, 4);
  Tensor out = g.init(o0);
  b.gather_rows({up(b, src), up(b, idx), up(b, w), out, true});
  Vec sv = to_vec(src), wv = to_vec(w), want = to_vec(o0);
  std::vector<int32_t> iv = ints(idx);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) want[size_t(i * d + j)] += wv[size_t(i)] * sv[size_t(iv[size_t(i)] * d + j)];
  return {{"out", down(b, out), want, tol::kF32}};
}

std::vector<Output> scatter_case(Backend& b, Guards& g, uint64_t seed, int64_t d) {
  int64_t r = 6, n = 14;
  Tensor src = randn({n, d}, seed, 1), idx = randi({n}, seed, 2, 0, int32_t(r)), w = randn({n}, seed, 3);
  Tensor o0 = randn({r, d}, seed, 4);
  Tensor out = g.init(o0);
  b.scatter_add_rows({up(b, src), up(b, idx), up(b, w), out});
  Vec sv = to_vec(src), wv = to_vec(w), want = to_vec(o0);
  std::vector<int32_t> iv = ints(idx);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) want[size_t(iv[size_t(i)] * d + j)] += wv[size_t(i)] * sv[size_t(i * d + j)];
  return {{"out", down(b, out), want, tol::kF32}};
}

// Into BF16 (no accumulate): w·src rounded once, the F32 product both backends form, so exact.
std::vector<Output> gather_bf16_case(Backend& b, Guards& g, uint64_t seed, int64_t d) {
  const int64_t r = 6, n = 10;
  Tensor src = randn({r, d}, seed, 1), idx = randi({n}, seed, 2, 0, int32_t(r)), w = randn({n}, seed, 3);
  Tensor out = g.out(DType::BF16, {n, d});
  b.gather_rows({up(b, src), up(b, idx), up(b, w), out, false});
  const std::vector<int32_t> iv = ints(idx);
  Tensor want = Tensor::empty(DType::F32, {n, d});
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j)
      want.data<float>()[i * d + j] = w.data<float>()[i] * src.data<float>()[iv[size_t(i)] * d + j];
  return {{"out", down(b, out), to_vec(want.to(DType::BF16)), 0.0}};
}
}  // namespace

OP_CASE(gather_rows_to_bf16_d5) { return gather_bf16_case(b, g, seed, 5); }
OP_CASE(gather_rows_to_bf16_d8) { return gather_bf16_case(b, g, seed, 8); }
OP_CASE(gather_rows_weighted_accumulate) { return gather_case(b, g, seed, 5); }
OP_CASE(gather_rows_weighted_accumulate_d8) { return gather_case(b, g, seed, 8); }
OP_CASE(scatter_add_rows_weighted) { return scatter_case(b, g, seed, 5); }
OP_CASE(scatter_add_rows_weighted_d8) { return scatter_case(b, g, seed, 8); }

OP_CASE(cross_entropy_with_ignored) {
  int64_t t = 6, v = 50;
  Tensor l = randn({t, v}, seed, 1, 4.0f), tg = randi({t}, seed, 2, 0, int32_t(v));
  tg.data<int32_t>()[2] = -1;
  Tensor loss = g.out(DType::F32, {t}), sum = g.out(DType::F32, {1}), dl = g.out(DType::F32, {t, v});
  b.cross_entropy({up(b, l), up(b, tg), loss, sum, dl, 0.25f});
  Vec lv = to_vec(l), want = ref::cross_entropy(lv, ints(tg), t, v);
  double s = 0;
  for (double x : want) s += x;
  Vec wd(size_t(t * v), 0.0);
  for (int64_t i = 0; i < t; ++i) {
    int32_t y = tg.data<int32_t>()[i];
    if (y < 0) continue;
    double mx = -INFINITY, z = 0;
    for (int64_t j = 0; j < v; ++j) mx = std::max(mx, lv[size_t(i * v + j)]);
    for (int64_t j = 0; j < v; ++j) z += std::exp(lv[size_t(i * v + j)] - mx);
    for (int64_t j = 0; j < v; ++j) wd[size_t(i * v + j)] = 0.25 * (std::exp(lv[size_t(i * v + j)] - mx) / z - (j == y));
  }
  return {{"loss", down(b, loss), want, tol::kF32},
          {"loss_sum", down(b, sum), {s}, tol::kF32},
          {"dlogits", down(b, dl), wd, tol::kF32}};
}

namespace {
// Vocabularies the CUDA register kernel takes (4, 8 and 16 float4 chunks per thread; the first two
// with masked columns past v), one row's target ignored.
std::vector<Output> cross_entropy_wide(Backend& b, Guards& g, uint64_t seed, int64_t v) {
  const int64_t t = 3;
  Tensor l = randn({t, v}, seed, 1, 4.0f), tg = randi({t}, seed, 2, 0, int32_t(v));
  tg.data<int32_t>()[1] = -1;
  Tensor loss = g.out(DType::F32, {t}), dl = g.out(DType::F32, {t, v});
  b.cross_entropy({up(b, l), up(b, tg), loss, Tensor(), dl, 0.5f});
  const Vec lv = to_vec(l);
  Vec wl(size_t(t), 0.0), wd(size_t(t * v), 0.0);
  for (int64_t i = 0; i < t; ++i) {
    const int32_t y = tg.data<int32_t>()[i];
    if (y < 0) continue;
    double mx = -INFINITY, z = 0;
    for (int64_t j = 0; j < v; ++j) mx = std::max(mx, lv[size_t(i * v + j)]);
    for (int64_t j = 0; j < v; ++j) z += std::exp(lv[size_t(i * v + j)] - mx);
    wl[size_t(i)] = mx + std::log(z) - lv[size_t(i * v + y)];
    for (int64_t j = 0; j < v; ++j) wd[size_t(i * v + j)] = 0.5 * (std::exp(lv[size_t(i * v + j)] - mx) / z - (j == y));
  }
  return {{"loss", down(b, loss), wl, tol::kF32}, {"dlogits", down(b, dl), wd, tol::kF32}};
}
}  // namespace

OP_CASE(cross_entropy_vocab_3000) { return cross_entropy_wide(b, g, seed, 3000); }
OP_CASE(cross_entropy_vocab_12000) { return cross_entropy_wide(b, g, seed, 12000); }
OP_CASE(cross_entropy_vocab_32768) { return cross_entropy_wide(b, g, seed, 32768); }

OP_CASE(cross_entropy_in_place) {
  int64_t t = 3, v = 20;
  Tensor l = randn({t, v}, seed, 1, 4.0f), tg = randi({t}, seed, 2, 0, int32_t(v));
  Tensor ld = g.init(l);
  b.cross_entropy({ld, up(b, tg), Tensor(), Tensor(), ld, 1.0f});
  Vec lv = to_vec(l), wd(static_cast<size_t>(t * v));
  for (int64_t i = 0; i < t; ++i) {
    double mx = -INFINITY, z = 0;
    for (int64_t j = 0; j < v; ++j) mx = std::max(mx, lv[size_t(i * v + j)]);
    for (int64_t j = 0; j < v; ++j) z += std::exp(lv[size_t(i * v + j)] - mx);
    for (int64_t j = 0; j < v; ++j)
      wd[size_t(i * v + j)] = std::exp(lv[size_t(i * v + j)] - mx) / z - (j == tg.data<int32_t>()[i]);
  }
  return {{"dlogits", down(b, ld), wd, tol::kF32}};
}

OP_CASE(elementwise) {
  int64_t n = 37;
  Tensor x = randn({n}, seed, 1), y = randn({n}, seed, 2);
  Vec xv = to_vec(x), yv = to_vec(y);
  Tensor add = g.out(DType::F32, {n}), sc = g.out(DType::F32, {n}), mul = g.init(y), fill = g.out(DType::F32, {n});
  b.add({up(b, x), up(b, y), add, 2.0f, -0.5f});
  b.scale({up(b, x), sc, 3.0f});
  b.mul({up(b, x), up(b, y), mul, true});
  b.fill({fill, 1.25f});
  // Zero (CUDA: a memset) in F32 and BF16, over outputs that start as NaN bytes.
  Tensor zb = g.out(DType::BF16, {n}), zf = g.out(DType::F32, {n});
  b.fill({zb, 0.0f});
  b.fill({zf, 0.0f});
  Vec wa, ws, wm, wf(size_t(n), 1.25), wz(size_t(n), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    wa.push_back(2 * xv[size_t(i)] - 0.5 * yv[size_t(i)]);
    ws.push_back(3 * xv[size_t(i)]);
    wm.push_back(xv[size_t(i)] * yv[size_t(i)] + yv[size_t(i)]);
  }
  return {{"add", down(b, add), wa, tol::kF32},
          {"scale", down(b, sc), ws, tol::kF32},
          {"mul", down(b, mul), wm, tol::kF32},
          {"fill", down(b, fill), wf, 0.0},
          {"fill_zero_bf16", down(b, zb), wz, 0.0},
          {"fill_zero_f32", down(b, zf), wz, 0.0}};
}

OP_CASE(copy_convert) {
  Tensor x = randn({4, 5}, seed, 1, 1.0f, DType::BF16);
  Tensor f = g.out(DType::F32, {4, 5});
  b.copy({up(b, x), f});
  Tensor back = g.out(DType::BF16, {20});
  b.copy({f, back});
  return {{"bf16_to_f32", down(b, f), to_vec(x), 0.0}, {"f32_to_bf16", down(b, back), to_vec(x), 0.0}};
}

// Overlapping views of one buffer (CopyArgs: a move in the same dtype), both ways: 8 MB of rows
// shifted down by one row and up by one, each as memmove moves them (a copy engine reading and
// writing such a range in pieces would overwrite rows before reading them).
OP_CASE(copy_overlapping_views) {
  const int64_t rows = 1025, w = 2048;
  Tensor x = randn({rows, w}, seed, 1);
  Tensor buf = g.init(x);
  b.copy({buf.rows(0, rows - 1), buf.rows(1, rows)});
  const Vec xv = to_vec(x);
  Vec down_one(xv);
  for (size_t i = size_t(w); i < xv.size(); ++i) down_one[i] = xv[i - size_t(w)];
  Tensor buf2 = g.init(x);
  b.copy({buf2.rows(1, rows), buf2.rows(0, rows - 1)});
  Vec up_one(xv);
  for (size_t i = 0; i + size_t(w) < xv.size(); ++i) up_one[i] = xv[i + size_t(w)];
  return {{"down", down(b, buf), down_one, 0.0}, {"up", down(b, buf2), up_one, 0.0}};
}

namespace {
// concat: dst [rows, cd] ← src [rows, cs] columns [sc, sc + cw) at column dc; broadcast [2, 1, kw] →
// [2, 3, bw] at column bc; the broadcast reduced back with accumulate.
struct CopyColsShape {
  int64_t rows, cs, sc, cd, dc, cw, kw, bw, bc;
};
std::vector<Output> copy_cols_case(Backend& b, Guards& g, uint64_t seed, const CopyColsShape& s) {
  Tensor a = randn({s.rows, s.cs}, seed, 1), d0 = randn({s.rows, s.cd}, seed, 2);
  Tensor c = g.init(d0);
  b.copy_cols({up(b, a), s.sc, c, s.dc, s.cw, false});
  Vec want_c = to_vec(d0), av = to_vec(a);
  for (int64_t r = 0; r < s.rows; ++r)
    for (int64_t j = 0; j < s.cw; ++j) want_c[size_t(r * s.cd + s.dc + j)] = av[size_t(r * s.cs + s.sc + j)];
  Tensor kpe = randn({2, 1, s.kw}, seed, 3);
  Tensor bc = g.out(DType::F32, {2, 3, s.bw});
  b.fill({bc, 0.0f});
  b.copy_cols({up(b, kpe), 0, bc, s.bc, s.kw, false});
  Vec kv = to_vec(kpe), want_b(size_t(6 * s.bw), 0.0);
  for (int64_t t = 0; t < 2; ++t)
    for (int64_t h = 0; h < 3; ++h)
      for (int64_t j = 0; j < s.kw; ++j) want_b[size_t((t * 3 + h) * s.bw + s.bc + j)] = kv[size_t(t * s.kw + j)];
  Tensor red0 = randn({2, 1, s.kw}, seed, 4);
  Tensor red = g.init(red0);
  b.copy_cols({bc, s.bc, red, 0, s.kw, true});
  Vec want_r = to_vec(red0);
  for (int64_t t = 0; t < 2; ++t)
    for (int64_t j = 0; j < s.kw; ++j) want_r[size_t(t * s.kw + j)] += 3 * kv[size_t(t * s.kw + j)];
  return {{"concat", down(b, c), want_c, 0.0},
          {"broadcast", down(b, bc), want_b, 0.0},
          {"reduce", down(b, red), want_r, tol::kF32}};
}
}  // namespace

OP_CASE(copy_cols_concat_broadcast_reduce) { return copy_cols_case(b, g, seed, {3, 4, 0, 7, 3, 4, 5, 8, 2}); }
// Column offsets, widths and row lengths all multiples of 4 (CUDA's float4 path).
OP_CASE(copy_cols_four_aligned) { return copy_cols_case(b, g, seed, {6, 16, 4, 24, 8, 12, 8, 16, 4}); }

OP_CASE(sum_squares_accumulate) {
  Tensor x = randn({70000}, seed, 1);
  Tensor out = g.init(host_f32({1}, {2.0}));
  b.sum_squares({up(b, x), out, true});
  Vec xv = to_vec(x);
  return {{"sum", down(b, out), {2.0 + dot(xv, xv)}, tol::kF32}};
}

namespace {
// copy: a param_copy of that dtype (U8: none), which must hold the updated param converted.
std::vector<Output> adamw_case(Backend& b, Guards& g, uint64_t seed, DType moments, DType copy = DType::U8) {
  int64_t n = 33;
  Tensor p0 = randn({n}, seed, 1), gr = randn({n}, seed, 2), m0 = randn({n}, seed, 3, 0.1f, moments);
  Tensor v0 = randn({n}, seed, 4, 0.1f, moments);
  for (int64_t i = 0; i < n; ++i) {  // v ≥ 0
    float f = std::fabs(load_as_float(v0.raw(), moments, size_t(i)));
    convert(&f, DType::F32, static_cast<char*>(v0.raw()) + size_t(i) * dtype_size(moments), moments, 1);
  }
  Tensor p = g.init(p0), m = g.init(m0), v = g.init(v0);
  AdamWArgs a{p, up(b, gr), m, v, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f, 3, {}};
  if (copy != DType::U8) a.param_copy = g.out(copy, {n});
  b.adamw(a);
  Vec pv = to_vec(p0), gv = to_vec(gr), mv = to_vec(m0), vv = to_vec(v0);
  double b1 = double(0.9f), b2 = double(0.95f), lr = double(1e-2f), wd = double(0.1f);
  for (int64_t i = 0; i < n; ++i) {
    double gi = 0.5 * gv[size_t(i)];
    pv[size_t(i)] *= 1 - lr * wd;
    mv[size_t(i)] = b1 * mv[size_t(i)] + (1 - b1) * gi;
    vv[size_t(i)] = b2 * vv[size_t(i)] + (1 - b2) * gi * gi;
    double denom = std::sqrt(vv[size_t(i)]) / std::sqrt(1 - std::pow(b2, 3)) + double(1e-8f);
    pv[size_t(i)] -= lr / (1 - std::pow(b1, 3)) * mv[size_t(i)] / denom;
  }
  double mt = moments == DType::BF16 ? tol::kBf16 : tol::kF32;
  // The parameter is F32 either way: BF16 moments only round m and v after this step.
  std::vector<Output> outs{{"param", down(b, p), pv, tol::kF32}, {"m", down(b, m), mv, mt}, {"v", down(b, v), vv, mt}};
  if (copy != DType::U8) {
    // The copy is this backend's param converted, bit for bit (1 where they differ).
    const Tensor hc = down(b, a.param_copy), want = down(b, p).to(copy);
    Tensor d = Tensor::zeros(DType::F32, {n});
    for (int64_t i = 0; i < n; ++i)
      d.data<float>()[i] = std::memcmp(static_cast<const char*>(hc.raw()) + size_t(i) * dtype_size(copy),
                                       static_cast<const char*>(want.raw()) + size_t(i) * dtype_size(copy),
                                       dtype_size(copy)) != 0;
    outs.push_back({"param_copy", hc, pv, copy == DType::BF16 ? tol::kBf16 : tol::kF32});
    outs.push_back({"param_copy_bits_differ", d, Vec(size_t(n), 0.0), 0.0});
  }
  return outs;
}
}  // namespace

OP_CASE(adamw_f32_moments) { return adamw_case(b, g, seed, DType::F32); }
OP_CASE(adamw_bf16_moments) { return adamw_case(b, g, seed, DType::BF16); }
OP_CASE(adamw_bf16_param_copy) { return adamw_case(b, g, seed, DType::F32, DType::BF16); }
OP_CASE(adamw_f32_param_copy_bf16_moments) { return adamw_case(b, g, seed, DType::BF16, DType::F32); }

// The multi-tensor ops: AdamW over several tensors against the single op per tensor on the same
// backend, bit for bit (on CUDA both run the multi-tensor kernel, so this checks its chunk table and
// per-tensor factors; the single op is checked against the reference above); the others against
// references. Tensors of several sizes (one spans two of the CUDA kernel's 8,192-element chunks,
// one is empty), mixed moment dtypes and weight decays.
OP_CASE(adamw_many_equals_adamw) {
  const int64_t sizes[] = {33, 9000, 0, 700};
  const DType mt[] = {DType::F32, DType::BF16, DType::F32, DType::BF16};
  std::vector<AdamWArgs> many, one;
  std::vector<Output> outs;
  for (int j = 0; j < 4; ++j) {
    const int64_t n = sizes[j];
    Tensor p0 = randn({n}, seed, 10 + uint64_t(j)), gr = up(b, randn({n}, seed, 20 + uint64_t(j)));
    Tensor m0 = randn({n}, seed, 30 + uint64_t(j), 0.1f, mt[j]), v0 = Tensor::zeros(mt[j], {n});
    AdamWArgs a{g.init(p0), gr, g.init(m0), g.init(v0), 1e-2f, 0.9f, 0.95f, 1e-8f, j % 2 ? 0.1f : 0.0f, 0.5f, 2, {}};
    many.push_back(a);
    a.param = g.init(p0);
    a.m = g.init(m0);
    a.v = g.init(v0);
    one.push_back(a);
  }
  b.adamw_many(many);
  for (const AdamWArgs& a : one) b.adamw(a);
  // 1 where the bits differ: all zero on every backend (backends may differ from each other in the
  // last bit, which the single-op cases check against the reference).
  auto differs = [&](const Tensor& x, const Tensor& y) {
    const Tensor hx = down(b, x), hy = down(b, y);
    Tensor d = Tensor::zeros(DType::F32, {hx.numel()});
    const size_t es = dtype_size(hx.dtype());
    for (int64_t i = 0; i < hx.numel(); ++i)
      d.data<float>()[i] = std::memcmp(static_cast<const char*>(hx.raw()) + size_t(i) * es,
                                       static_cast<const char*>(hy.raw()) + size_t(i) * es, es) != 0;
    return d;
  };
  for (int j = 0; j < 4; ++j) {
    const std::string k = std::to_string(j);
    const AdamWArgs &x = many[size_t(j)], &y = one[size_t(j)];
    const Vec zero(size_t(x.param.numel()), 0.0);
    outs.push_back({"param" + k + " bits differ", differs(x.param, y.param), zero, 0.0});
    outs.push_back({"m" + k + " bits differ", differs(x.m, y.m), zero, 0.0});
    outs.push_back({"v" + k + " bits differ", differs(x.v, y.v), zero, 0.0});
  }
  return outs;
}

OP_CASE(fill_many_copy_many_sum_squares_many) {
  Tensor a = g.out(DType::F32, {9000}), c = g.out(DType::BF16, {5}), e = g.out(DType::F32, {0});
  const FillArgs fills[] = {{a, 1.5f}, {c, -0.3f}, {e, 2.0f}};
  b.fill_many(fills);
  Tensor xs = randn({8193}, seed, 1), ys = randn({40}, seed, 2, 1.0f, DType::BF16);
  Tensor xb = g.out(DType::BF16, {8193}), yf = g.out(DType::F32, {40});
  const CopyArgs copies[] = {{up(b, xs), xb}, {up(b, ys), yf}};
  b.copy_many(copies);
  Vec xr = to_vec(xs.to(DType::BF16));
  Tensor s1 = randn({70000}, seed, 3), s2 = randn({5}, seed, 4), s3 = randn({20000}, seed, 5);
  const Tensor sq[] = {up(b, s1), up(b, s2), up(b, s3)};
  Tensor sum = g.init(host_f32({1}, {2.0}));
  b.sum_squares_many(sq, sum, true);
  double want = 2.0;
  for (const Tensor& t : {s1, s2, s3}) {
    Vec v = to_vec(t);
    want += dot(v, v);
  }
  Tensor none = g.out(DType::F32, {1});
  b.sum_squares_many({}, none, false);
  return {{"fill_f32", down(b, a), Vec(9000, 1.5), 0.0},
          {"fill_bf16", down(b, c), Vec(5, double(bf16_to_float(float_to_bf16(-0.3f)))), 0.0},
          {"copy_to_bf16", down(b, xb), xr, 0.0},
          {"copy_to_f32", down(b, yf), to_vec(ys), 0.0},
          {"sum_squares", down(b, sum), {want}, tol::kF32},
          {"sum_squares_none", down(b, none), {0.0}, 0.0}};
}

}  // namespace dsv3::test
