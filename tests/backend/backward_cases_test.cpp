// Backward op cases: each backward's outputs against central finite differences of the double
// reference forward, on L = Σ dy · f(inputs) with a random dy (tolerance tol::kF32Grad).
#include "harness.h"
#include "reference.h"

namespace dsv3::test {
namespace {

Tensor up(Backend& b, const Tensor& h) { return b.to_device(h); }
Tensor down(Backend& b, const Tensor& t) { return b.to_host(t); }
std::vector<int32_t> ints(const Tensor& t) {
  return std::vector<int32_t>(t.data<int32_t>(), t.data<int32_t>() + t.numel());
}

std::vector<Output> linear_bw(Backend& b, Guards& g, uint64_t seed, DType wt) {
  int64_t m = 4, n = 6, k = 5;
  Tensor x = randn({m, k}, seed, 1), w = randn({n, k}, seed, 2, 0.5f, wt), dy = randn({m, n}, seed, 3);
  Vec xv = to_vec(x), wv = to_vec(w), dyv = to_vec(dy);
  Tensor dx = g.out(DType::F32, {m, k});
  Tensor dw0 = randn({n, k}, seed, 4);
  Tensor dw = wt == DType::F32 ? g.init(dw0) : Tensor();
  b.linear_backward({up(b, dy), up(b, x), up(b, w), Tensor(), dx, dw, false, true});
  std::vector<Output> outs{
      {"dx", down(b, dx), fd_grad([&](const Vec& v) { return dot(dyv, ref::linear(v, wv, m, n, k)); }, xv),
       tol::kF32Grad}};
  if (wt == DType::F32) {
    Vec want = fd_grad([&](const Vec& v) { return dot(dyv, ref::linear(xv, v, m, n, k)); }, wv);
    for (size_t i = 0; i < want.size(); ++i) want[i] += double(dw0.data<float>()[i]);
    outs.push_back({"dw_accumulated", down(b, dw), want, tol::kF32Grad});
  }
  return outs;
}

}  // namespace

OP_CASE(linear_backward_f32) { return linear_bw(b, g, seed, DType::F32); }
OP_CASE(linear_backward_bf16_weight) { return linear_bw(b, g, seed, DType::BF16); }

OP_CASE(linear_backward_fp8_weight) {
  int64_t m = 3, n = 130, k = 129;  // partial 128×128 blocks in both dims
  Tensor x = randn({m, k}, seed, 1), dy = randn({m, n}, seed, 3);
  Tensor w = randn({n, k}, seed, 2, 2.0f).to(DType::F8_E4M3);
  Tensor s = Tensor::empty(DType::F32, {2, 2});
  for (int i = 0; i < 4; ++i) s.data<float>()[i] = 0.25f * float(i + 1);
  Vec wv = ref::dequant_fp8(w, s), dyv = to_vec(dy);
  Tensor dx = g.out(DType::F32, {m, k});
  b.linear_backward({up(b, dy), Tensor(), up(b, w), up(b, s), dx, Tensor(), false, false});
  return {{"dx", down(b, dx),
           fd_grad([&](const Vec& v) { return dot(dyv, ref::linear(v, wv, m, n, k)); }, to_vec(x)),
           tol::kF32Grad}};
}

OP_CASE(embedding_backward) {
  int64_t v = 7, d = 4, t = 12;
  Tensor ids = randi({t}, seed, 1, 0, int32_t(v)), dout = randn({t, d}, seed, 2), dt0 = randn({v, d}, seed, 3);
  Tensor dt = g.init(dt0);
  b.embedding_backward({up(b, ids), up(b, dout), dt});
  std::vector<int32_t> iv = ints(ids);
  Vec dov = to_vec(dout);
  auto f = [&](const Vec& tab) {
    double s = 0;
    for (int64_t i = 0; i < t; ++i)
      for (int64_t j = 0; j < d; ++j) s += dov[size_t(i * d + j)] * tab[size_t(iv[size_t(i)] * d + j)];
    return s;
  };
  Vec want = fd_grad(f, Vec(size_t(v * d), 0.5));
  for (size_t i = 0; i < want.size(); ++i) want[i] += double(dt0.data<float>()[i]);
  return {{"dtable", down(b, dt), want, tol::kF32Grad}};
}

OP_CASE(rmsnorm_backward) {
  int64_t m = 4, d = 9;
  Tensor x = randn({m, d}, seed, 1, 2.0f), w = randn({d}, seed, 2), dy = randn({m, d}, seed, 3);
  Tensor y = b.alloc(DType::F32, {m, d}), rstd = b.alloc(DType::F32, {m});
  Tensor xd = up(b, x), wd = up(b, w);
  b.rmsnorm({xd, wd, 1e-5f, y, rstd});
  Tensor dx = g.out(DType::F32, {m, d}), dw = g.out(DType::F32, {d});
  b.rmsnorm_backward({up(b, dy), xd, wd, rstd, dx, dw, false, false});
  Vec xv = to_vec(x), wv = to_vec(w), dyv = to_vec(dy);
  return {{"dx", down(b, dx), fd_grad([&](const Vec& v) { return dot(dyv, ref::rmsnorm(v, wv, m, d, 1e-5)); }, xv),
           tol::kF32Grad},
          {"dweight", down(b, dw),
           fd_grad([&](const Vec& v) { return dot(dyv, ref::rmsnorm(xv, v, m, d, 1e-5)); }, wv), tol::kF32Grad}};
}

namespace {

// Enough rows for several dweight chunks (CUDA's 64 rows each in the one-pass kernel, 128 in the
// two-kernel form for rows wider than 1,024 or not a multiple of 4, the last partial; the
// reduction's warps each take every 8th), rows narrower and wider than a CUDA CTA's 256 threads, and
// `alias`: dx is dy's buffer, accumulated into, and dweight accumulates onto a random start. The
// closed forms dx = r·(w∘dy − x·r²·Σ(w∘dy∘x)/d) and dw = Σ_rows dy∘x·r in double.
std::vector<Output> rmsnorm_bw_rows(Backend& b, Guards& g, uint64_t seed, int64_t m, int64_t d, bool alias) {
  const double eps = 1e-5;
  Tensor x = randn({m, d}, seed, 1, 2.0f), w = randn({d}, seed, 2), dy = randn({m, d}, seed, 3);
  Tensor dw0 = randn({d}, seed, 4);
  Tensor y = b.alloc(DType::F32, {m, d}), rstd = b.alloc(DType::F32, {m});
  Tensor xd = up(b, x), wd = up(b, w);
  b.rmsnorm({xd, wd, float(eps), y, rstd});
  Tensor dx = alias ? g.init(dy) : g.out(DType::F32, {m, d});
  Tensor dw = alias ? g.init(dw0) : g.out(DType::F32, {d});
  b.rmsnorm_backward({alias ? dx : up(b, dy), xd, wd, rstd, dx, dw, alias, alias});
  const Vec xv = to_vec(x), wv = to_vec(w), dyv = to_vec(dy), dw0v = to_vec(dw0);
  Vec wdx(size_t(m * d)), wdw(size_t(d), 0.0);
  for (int64_t i = 0; i < m; ++i) {
    double ss = 0, dot = 0;
    for (int64_t j = 0; j < d; ++j) {
      const size_t k = size_t(i * d + j);
      ss += xv[k] * xv[k];
      dot += wv[size_t(j)] * dyv[k] * xv[k];
    }
    const double r = 1 / std::sqrt(ss / double(d) + eps);
    for (int64_t j = 0; j < d; ++j) {
      const size_t k = size_t(i * d + j);
      wdx[k] = r * (wv[size_t(j)] * dyv[k] - xv[k] * r * r * dot / double(d)) + (alias ? dyv[k] : 0.0);
      wdw[size_t(j)] += dyv[k] * xv[k] * r;
    }
  }
  if (alias)
    for (int64_t j = 0; j < d; ++j) wdw[size_t(j)] += dw0v[size_t(j)];
  return {{"dx", down(b, dx), wdx, tol::kF32}, {"dweight", down(b, dw), wdw, tol::kF32}};
}

}  // namespace

OP_CASE(rmsnorm_backward_many_rows) { return rmsnorm_bw_rows(b, g, seed, 1100, 40, false); }
OP_CASE(rmsnorm_backward_wide_rows_in_place) { return rmsnorm_bw_rows(b, g, seed, 333, 1500, true); }
OP_CASE(rmsnorm_backward_wider_rows_in_place) { return rmsnorm_bw_rows(b, g, seed, 70, 2100, true); }
OP_CASE(rmsnorm_backward_rows_of_1024) { return rmsnorm_bw_rows(b, g, seed, 300, 1024, false); }
OP_CASE(rmsnorm_backward_partial_lanes_in_place) { return rmsnorm_bw_rows(b, g, seed, 150, 516, true); }
OP_CASE(rmsnorm_backward_900_wide_in_place) { return rmsnorm_bw_rows(b, g, seed, 97, 900, true); }
OP_CASE(rmsnorm_backward_width_not_multiple_of_4) { return rmsnorm_bw_rows(b, g, seed, 90, 42, false); }

OP_CASE(rope_backward_is_inverse_rotation) {
  int64_t t = 3, h = 2, w = 7, off = 1, rd = 6;
  RopeParams p;
  p.dim = rd;
  RopeTables tab = rope_tables(p, 8);
  Tensor x = randn({t, h, w}, seed, 1), dy = randn({t, h, w}, seed, 2);
  Tensor pos = randi({t}, seed, 3, 0, 8);
  Tensor dx = g.init(dy);
  b.rope({dx, up(b, pos), up(b, tab.cos), up(b, tab.sin), off, rd, true, true});
  Vec cs = to_vec(tab.cos), sn = to_vec(tab.sin), dyv = to_vec(dy);
  std::vector<int32_t> pv = ints(pos);
  auto f = [&](const Vec& v) { return dot(dyv, ref::rope(v, pv, cs, sn, t, h, w, off, rd, true, false)); };
  return {{"dx", down(b, dx), fd_grad(f, to_vec(x)), tol::kF32Grad}};
}

OP_CASE(attention_backward) {
  int64_t bs = 2, t = 4, s = 6, h = 2, dq = 5, dv = 3, off = 2;
  Tensor q = randn({bs, t, h, dq}, seed, 1), k = randn({bs, s, h, dq}, seed, 2), v = randn({bs, s, h, dv}, seed, 3);
  Tensor dout = randn({bs, t, h, dv}, seed, 4);
  float scale = 0.4f;
  Tensor qd = up(b, q), kd = up(b, k), vd = up(b, v);
  Tensor out = b.alloc(DType::F32, {bs, t, h, dv}), lse = b.alloc(DType::F32, {bs, h, t});
  b.attention({qd, kd, vd, out, lse, scale, true, off, {}, {}});
  Tensor dq_ = g.out(DType::F32, {bs, t, h, dq}), dk = g.out(DType::F32, {bs, s, h, dq});
  Tensor dvv = g.out(DType::F32, {bs, s, h, dv});
  b.attention_backward({qd, kd, vd, out, lse, up(b, dout), dq_, dk, dvv, scale, true, off, {}, {}, {}, {}});
  Vec qv = to_vec(q), kv = to_vec(k), vv = to_vec(v), gv = to_vec(dout);
  auto L = [&](const Vec& a, const Vec& bb, const Vec& c) {
    return dot(gv, ref::attention(a, bb, c, bs, t, s, h, dq, dv, scale, true, off).out);
  };
  return {{"dq", down(b, dq_), fd_grad([&](const Vec& x) { return L(x, kv, vv); }, qv), tol::kF32Grad},
          {"dk", down(b, dk), fd_grad([&](const Vec& x) { return L(qv, x, vv); }, kv), tol::kF32Grad},
          {"dv", down(b, dvv), fd_grad([&](const Vec& x) { return L(qv, kv, x); }, vv), tol::kF32Grad}};
}

namespace {
// MLA's split form: dkv (dk's first dn columns, then dv; F32, or BF16 as MLA's BF16 mode asks) and
// dk_pe (dk's rope columns summed over the heads) against finite differences of the plain
// attention over k and v built from kv, k_pe.
std::vector<Output> split_backward_case(Backend& b, Guards& g, uint64_t seed, DType dkv_type) {
  int64_t bs = 2, t = 4, s = 6, h = 3, dn = 4, dr = 2, dv = 3, off = 2, dq = dn + dr;
  Tensor q = randn({bs, t, h, dq}, seed, 1), kv = randn({bs, s, h, dn + dv}, seed, 2);
  Tensor k_pe = randn({bs, s, 1, dr}, seed, 3), dout = randn({bs, t, h, dv}, seed, 4);
  float scale = 0.4f;
  AttentionArgs f;
  f.q = up(b, q), f.kv = up(b, kv), f.k_pe = up(b, k_pe);
  f.out = b.alloc(DType::F32, {bs, t, h, dv}), f.lse = b.alloc(DType::F32, {bs, h, t});
  f.scale = scale, f.q_offset = off;
  b.attention(f);
  AttentionBackwardArgs a;
  a.q = f.q, a.kv = f.kv, a.k_pe = f.k_pe, a.out = f.out, a.lse = f.lse, a.dout = up(b, dout);
  a.dq = g.out(DType::F32, {bs, t, h, dq});
  a.dkv = g.out(dkv_type, {bs, s, h, dn + dv});
  a.dk_pe = g.out(DType::F32, {bs, s, 1, dr});
  a.scale = scale, a.q_offset = off;
  b.attention_backward(a);
  Vec qv = to_vec(q), kvv = to_vec(kv), pev = to_vec(k_pe), gv = to_vec(dout);
  auto L = [&](const Vec& qx, const Vec& kvx, const Vec& pex) {
    const ref::SplitKv kv_ = ref::split_kv(kvx, pex, bs * s, h, dn, dr, dv);
    return dot(gv, ref::attention(qx, kv_.k, kv_.v, bs, t, s, h, dq, dv, scale, true, off).out);
  };
  return {{"dq", down(b, a.dq), fd_grad([&](const Vec& x) { return L(x, kvv, pev); }, qv), tol::kF32Grad},
          {"dkv", down(b, a.dkv), fd_grad([&](const Vec& x) { return L(qv, x, pev); }, kvv),
           dkv_type == DType::BF16 ? tol::kBf16 : tol::kF32Grad},
          {"dk_pe", down(b, a.dk_pe), fd_grad([&](const Vec& x) { return L(qv, kvv, x); }, pev), tol::kF32Grad}};
}
}  // namespace

OP_CASE(attention_backward_split_kv) { return split_backward_case(b, g, seed, DType::F32); }
OP_CASE(attention_backward_split_kv_bf16_dkv) { return split_backward_case(b, g, seed, DType::BF16); }

namespace {
// F32 outputs at 15 elements, or BF16 outputs (model/moe.cpp's bf16_activations: each value rounded
// once) at 45, the CUDA kernel's four-at-a-time loop and its tail.
std::vector<Output> swiglu_bwd_outputs(Backend& b, Guards& g, uint64_t seed, DType out, Shape s) {
  Tensor gt = randn(s, seed, 1, 2.0f), u = randn(s, seed, 2), dout = randn(s, seed, 3);
  Tensor dg = g.out(out, s), du = g.out(out, s);
  b.swiglu_backward({up(b, dout), up(b, gt), up(b, u), dg, du, false});
  Vec gv = to_vec(gt), uv = to_vec(u), dv = to_vec(dout);
  const double tol = out == DType::BF16 ? tol::kBf16 : tol::kF32Grad;
  return {{"dgate", down(b, dg), fd_grad([&](const Vec& x) { return dot(dv, ref::swiglu(x, uv)); }, gv), tol},
          {"dup", down(b, du), fd_grad([&](const Vec& x) { return dot(dv, ref::swiglu(gv, x)); }, uv), tol}};
}
}  // namespace

OP_CASE(swiglu_backward) { return swiglu_bwd_outputs(b, g, seed, DType::F32, {3, 5}); }
OP_CASE(swiglu_backward_bf16_outputs) { return swiglu_bwd_outputs(b, g, seed, DType::BF16, {5, 9}); }

namespace {
std::vector<Output> router_bw(Backend& b, Guards& g, uint64_t seed, RouterScoring sc, RouterMethod m, bool norm) {
  int64_t t = 5, e = 8;
  int ng = 4, tg = 2, k = 3;
  Tensor logits = randn({t, e}, seed, 1, 2.0f), bias = randn({e}, seed, 2, 0.3f), dw = randn({t, k}, seed, 3);
  RouterArgs a;
  a.logits = up(b, logits);
  if (sc == RouterScoring::Sigmoid) a.bias = up(b, bias);
  a.scoring = sc;
  a.method = m;
  a.n_group = ng;
  a.topk_group = tg;
  a.top_k = k;
  a.norm_topk_prob = norm;
  a.routed_scaling_factor = 1.5f;
  a.scores = b.alloc(DType::F32, {t, e});
  a.ids = b.alloc(DType::I32, {t, k});
  a.weights = b.alloc(DType::F32, {t, k});
  b.router(a);
  Tensor dl0 = randn({t, e}, seed, 4);
  Tensor dl = g.init(dl0);
  b.router_backward({a.scores, a.ids, up(b, dw), sc, norm, 1.5f, dl, true});
  Vec bv = to_vec(bias), dwv = to_vec(dw);
  const Vec* bp = sc == RouterScoring::Sigmoid ? &bv : nullptr;
  auto f = [&](const Vec& l) { return dot(dwv, ref::router(l, t, e, bp, sc, m, ng, tg, k, norm, 1.5).weights); };
  Vec want = fd_grad(f, to_vec(logits));
  for (size_t i = 0; i < want.size(); ++i) want[i] += double(dl0.data<float>()[i]);
  return {{"dlogits", down(b, dl), want, tol::kF32Grad}};
}
}  // namespace

OP_CASE(router_backward_sigmoid_norm) {
  return router_bw(b, g, seed, RouterScoring::Sigmoid, RouterMethod::NoauxTc, true);
}
OP_CASE(router_backward_softmax) {
  return router_bw(b, g, seed, RouterScoring::Softmax, RouterMethod::GroupLimitedGreedy, false);
}

namespace {
// d 4: the CUDA row kernels four columns at a time; d 5: one by one.
std::vector<Output> gather_scatter_backward(Backend& b, Guards& g, uint64_t seed, int64_t d) {
  int64_t r = 5, n = 9;
  Tensor src = randn({n, d}, seed, 1), idx = randi({n}, seed, 2, 0, int32_t(r)), w = randn({n}, seed, 3);
  Tensor dout = randn({r, d}, seed, 4);
  Tensor dsrc = g.out(DType::F32, {n, d}), dw = g.out(DType::F32, {n});
  b.scatter_add_rows_backward({up(b, dout), up(b, src), up(b, idx), up(b, w), dsrc, dw, false});
  std::vector<int32_t> iv = ints(idx);
  Vec sv = to_vec(src), wv = to_vec(w), dv = to_vec(dout);
  auto scatter = [&](const Vec& s, const Vec& ww) {
    Vec o(size_t(r * d), 0.0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < d; ++j) o[size_t(iv[size_t(i)] * d + j)] += ww[size_t(i)] * s[size_t(i * d + j)];
    return dot(dv, o);
  };
  // gather_rows is scatter's adjoint: its backward is a scatter-add of dout rows.
  Tensor gsrc = randn({r, d}, seed, 5), gdout = randn({n, d}, seed, 6);
  Tensor gd = g.out(DType::F32, {r, d});
  b.fill({gd, 0.0f});
  b.scatter_add_rows({up(b, gdout), up(b, idx), up(b, w), gd});
  Vec gdv = to_vec(gdout);
  auto gather = [&](const Vec& s) {
    double acc = 0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < d; ++j) acc += gdv[size_t(i * d + j)] * wv[size_t(i)] * s[size_t(iv[size_t(i)] * d + j)];
    return acc;
  };
  return {{"dsrc", down(b, dsrc), fd_grad([&](const Vec& x) { return scatter(x, wv); }, sv), tol::kF32Grad},
          {"dweight", down(b, dw), fd_grad([&](const Vec& x) { return scatter(sv, x); }, wv), tol::kF32Grad},
          {"gather_dsrc", down(b, gd), fd_grad(gather, to_vec(gsrc)), tol::kF32Grad}};
}

// dsrc in BF16 (no accumulate): w·dout rounded once, the F32 product both backends form, so exact;
// d 8 and 5 for the CUDA kernel's two widths.
std::vector<Output> scatter_backward_bf16(Backend& b, Guards& g, uint64_t seed, int64_t d) {
  const int64_t r = 5, n = 9;
  Tensor src = randn({n, d}, seed, 1), idx = randi({n}, seed, 2, 0, int32_t(r)), w = randn({n}, seed, 3);
  Tensor dout = randn({r, d}, seed, 4);
  Tensor dsrc = g.out(DType::BF16, {n, d}), dw = g.out(DType::F32, {n});
  b.scatter_add_rows_backward({up(b, dout), up(b, src), up(b, idx), up(b, w), dsrc, dw, false});
  const std::vector<int32_t> iv = ints(idx);
  Tensor want = Tensor::empty(DType::F32, {n, d});
  Vec wdw(size_t(n), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) {
      const float gij = dout.data<float>()[iv[size_t(i)] * d + j];
      want.data<float>()[i * d + j] = w.data<float>()[i] * gij;
      wdw[size_t(i)] += double(gij) * double(src.data<float>()[i * d + j]);
    }
  return {{"dsrc", down(b, dsrc), to_vec(want.to(DType::BF16)), 0.0}, {"dweight", down(b, dw), wdw, tol::kF32}};
}
}  // namespace

OP_CASE(gather_scatter_backward) { return gather_scatter_backward(b, g, seed, 4); }
OP_CASE(scatter_backward_bf16_d8) { return scatter_backward_bf16(b, g, seed, 8); }
OP_CASE(scatter_backward_bf16_d5) { return scatter_backward_bf16(b, g, seed, 5); }
OP_CASE(gather_scatter_backward_d5) { return gather_scatter_backward(b, g, seed, 5); }

OP_CASE(cross_entropy_gradient) {
  int64_t t = 4, v = 9;
  Tensor l = randn({t, v}, seed, 1, 3.0f), tg = randi({t}, seed, 2, 0, int32_t(v));
  tg.data<int32_t>()[1] = -1;
  Tensor dl = g.out(DType::F32, {t, v});
  b.cross_entropy({up(b, l), up(b, tg), Tensor(), Tensor(), dl, 0.5f});
  std::vector<int32_t> tv = ints(tg);
  auto f = [&](const Vec& x) {
    Vec loss = ref::cross_entropy(x, tv, t, v);
    return 0.5 * std::accumulate(loss.begin(), loss.end(), 0.0);
  };
  return {{"dlogits", down(b, dl), fd_grad(f, to_vec(l)), tol::kF32Grad}};
}

OP_CASE(copy_cols_broadcast_backward) {
  // Forward: k_pe [t, 1, 3] broadcast into k [t, h, 5] at column 2; backward sums over heads.
  int64_t t = 3, h = 4;
  Tensor dk = randn({t, h, 5}, seed, 1);
  Tensor dkpe = g.out(DType::F32, {t, 1, 3});
  b.copy_cols({up(b, dk), 2, dkpe, 0, 3, false});
  Vec dkv = to_vec(dk);
  auto f = [&](const Vec& kpe) {
    double s = 0;
    for (int64_t i = 0; i < t; ++i)
      for (int64_t hh = 0; hh < h; ++hh)
        for (int64_t j = 0; j < 3; ++j) s += dkv[size_t((i * h + hh) * 5 + 2 + j)] * kpe[size_t(i * 3 + j)];
    return s;
  };
  return {{"dk_pe", down(b, dkpe), fd_grad(f, Vec(size_t(t * 3), 0.1)), tol::kF32Grad}};
}

}  // namespace dsv3::test
