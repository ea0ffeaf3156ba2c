// Sizes above the CPU backend's serial threshold (cpu::kParallelMin), so the threaded paths run:
// forward cases against the double reference (registered with the harness), and every backward
// at 1 and 2 threads, which must agree bitwise for the row-local ops and within kF32 where a GEMM's
// split depends on the thread count.
#include <gtest/gtest.h>

#include <cstring>

#include "backend/cpu/cpu_backend.h"
#include "core/threads.h"
#include "harness.h"
#include "reference.h"

namespace dsv3::test {
namespace {

Tensor up(Backend& b, const Tensor& h) { return b.to_device(h); }
Tensor down(Backend& b, const Tensor& t) { return b.to_host(t); }

}  // namespace

OP_CASE(parallel_rmsnorm_swiglu_elementwise) {
  int64_t m = 1100, d = 128;
  EXPECT_GE(m * d, cpu::kParallelMin);
  Tensor x = randn({m, d}, seed, 1), w = randn({d}, seed, 2), u = randn({m, d}, seed, 3);
  Tensor y = g.out(DType::F32, {m, d}), r = g.out(DType::F32, {m}), s = g.out(DType::F32, {m, d});
  Tensor sum = g.out(DType::F32, {m, d});
  b.rmsnorm({up(b, x), up(b, w), 1e-6f, y, r});
  b.swiglu({up(b, x), up(b, u), s});
  b.add({up(b, x), up(b, u), sum, 1.0f, 2.0f});
  Vec xv = to_vec(x), uv = to_vec(u), want_sum(xv.size());
  for (size_t i = 0; i < xv.size(); ++i) want_sum[i] = xv[i] + 2 * uv[i];
  return {{"rmsnorm", down(b, y), ref::rmsnorm(xv, to_vec(w), m, d, 1e-6), tol::kF32},
          {"swiglu", down(b, s), ref::swiglu(xv, uv), tol::kF32},
          {"add", down(b, sum), want_sum, tol::kF32}};
}

OP_CASE(parallel_embedding_gather_scatter) {
  int64_t v = 50, d = 128, t = 1100;
  EXPECT_GE(t * d, cpu::kParallelMin);
  Tensor table = randn({v, d}, seed, 1), ids = randi({t}, seed, 2, 0, int32_t(v)), w = randn({t}, seed, 3);
  Tensor emb = g.out(DType::F32, {t, d});
  b.embedding({up(b, ids), up(b, table), emb});
  Tensor sc0 = randn({v, d}, seed, 4);
  Tensor sc = g.init(sc0);
  b.scatter_add_rows({emb, up(b, ids), up(b, w), sc});
  Vec tv = to_vec(table), wv = to_vec(w), want_e, want_s = to_vec(sc0);
  for (int64_t i = 0; i < t; ++i) {
    int32_t id = ids.data<int32_t>()[i];
    for (int64_t j = 0; j < d; ++j) {
      want_e.push_back(tv[size_t(id * d + j)]);
      want_s[size_t(id * d + j)] += wv[size_t(i)] * tv[size_t(id * d + j)];
    }
  }
  return {{"embedding", down(b, emb), want_e, 0.0}, {"scatter_add", down(b, sc), want_s, tol::kF32}};
}

OP_CASE(parallel_router_and_cross_entropy) {
  int64_t t = 8400, e = 16, vt = 40, vv = 4000;
  EXPECT_GE(t * e, cpu::kParallelMin);
  EXPECT_GE(vt * vv, cpu::kParallelMin);
  Tensor logits = randn({t, e}, seed, 1, 2.0f), bias = randn({e}, seed, 2, 0.3f);
  RouterArgs a;
  a.logits = up(b, logits);
  a.bias = up(b, bias);
  a.n_group = 4;
  a.topk_group = 2;
  a.top_k = 3;
  a.routed_scaling_factor = 2.5f;
  a.scores = g.out(DType::F32, {t, e});
  a.ids = g.out(DType::I32, {t, 3});
  a.weights = g.out(DType::F32, {t, 3});
  b.router(a);
  Vec bv = to_vec(bias);
  ref::RouterOut r = ref::router(to_vec(logits), t, e, &bv, RouterScoring::Sigmoid, RouterMethod::NoauxTc, 4, 2, 3,
                                 true, 2.5);
  Tensor cl = randn({vt, vv}, seed, 3, 3.0f), tg = randi({vt}, seed, 4, 0, int32_t(vv));
  Tensor loss = g.out(DType::F32, {vt});
  b.cross_entropy({up(b, cl), up(b, tg), loss, Tensor(), Tensor(), 1.0f});
  std::vector<int32_t> tv(tg.data<int32_t>(), tg.data<int32_t>() + vt);
  return {{"ids", down(b, a.ids), Vec(r.ids.begin(), r.ids.end()), 0.0},
          {"weights", down(b, a.weights), r.weights, tol::kF32},
          {"loss", down(b, loss), ref::cross_entropy(to_vec(cl), tv, vt, vv), tol::kF32}};
}

OP_CASE(parallel_rope) {
  int64_t t = 300, h = 8, rd = 128;
  EXPECT_GE(t * h * rd / 2, cpu::kParallelMin);
  RopeParams p;
  p.dim = rd;
  RopeTables tab = rope_tables(p, 100);
  Tensor x = randn({t, h, rd}, seed, 1), pos = randi({t}, seed, 2, 0, 100);
  Tensor xd = g.init(x);
  b.rope({xd, up(b, pos), up(b, tab.cos), up(b, tab.sin), 0, rd, true, false});
  std::vector<int32_t> pv(pos.data<int32_t>(), pos.data<int32_t>() + t);
  return {{"x", down(b, xd), ref::rope(to_vec(x), pv, to_vec(tab.cos), to_vec(tab.sin), t, h, rd, 0, rd, true, false),
           tol::kF32}};
}

namespace {

// Runs f with n threads and returns its outputs (host copies).
std::vector<Tensor> with_threads(int n, const std::function<std::vector<Tensor>()>& f) {
  int saved = num_threads();
  set_num_threads(n);
  std::vector<Tensor> r = f();
  set_num_threads(saved);
  return r;
}

void expect_same(const std::vector<Tensor>& a, const std::vector<Tensor>& b, double tol, const char* what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    if (tol == 0.0) {
      EXPECT_EQ(std::memcmp(a[i].raw(), b[i].raw(), a[i].nbytes()), 0) << what << " output " << i;
    } else {
      Err e = compare(b[i], to_vec(a[i]));
      EXPECT_LE(e.norm_err, tol) << what << " output " << i;
    }
  }
}

TEST(ParallelBackward, RowLocalOpsAreBitwiseEqualAcrossThreadCounts) {
  Backend& b = cpu_backend();
  int64_t m = 1100, d = 128, v = 50;
  ASSERT_GE(m * d, cpu::kParallelMin);
  Tensor x = randn({m, d}, 5, 1), w = randn({d}, 5, 2), dy = randn({m, d}, 5, 3), u = randn({m, d}, 5, 4);
  Tensor ids = randi({m}, 5, 5, 0, int32_t(v)), sw = randn({m}, 5, 6), src = randn({m, d}, 5, 7);
  auto run = [&] {
    Tensor y = Tensor::empty(DType::F32, {m, d}), r = Tensor::empty(DType::F32, {m});
    b.rmsnorm({x, w, 1e-6f, y, r});
    Tensor dx = Tensor::empty(DType::F32, {m, d}), dw = Tensor::empty(DType::F32, {d});
    b.rmsnorm_backward({dy, x, w, r, dx, dw, false, false});
    Tensor dg = Tensor::empty(DType::F32, {m, d}), du = Tensor::empty(DType::F32, {m, d});
    b.swiglu_backward({dy, x, u, dg, du, false});
    Tensor dt = Tensor::zeros(DType::F32, {v, d});
    b.embedding_backward({ids, dy, dt});
    Tensor ds = Tensor::empty(DType::F32, {m, d}), dsw = Tensor::empty(DType::F32, {m});
    b.scatter_add_rows_backward({randn({v, d}, 5, 8), src, ids, sw, ds, dsw, false});
    return std::vector<Tensor>{dx, dw, dg, du, dt, ds, dsw};
  };
  expect_same(with_threads(1, run), with_threads(2, run), 0.0, "row-local backward");
}

TEST(ParallelBackward, GemmOpsAgreeAcrossThreadCounts) {
  Backend& b = cpu_backend();
  int64_t bs = 2, t = 150, h = 3, dq = 24, dv = 16, m = 200, k = 96, n = 300;
  Tensor q = randn({bs, t, h, dq}, 6, 1), kk = randn({bs, t, h, dq}, 6, 2), vv = randn({bs, t, h, dv}, 6, 3);
  Tensor dout = randn({bs, t, h, dv}, 6, 4), x = randn({m, k}, 6, 5), w = randn({n, k}, 6, 6, 0.1f);
  Tensor wb = w.to(DType::BF16), dy = randn({m, n}, 6, 7);
  const int64_t rt = 8400;
  ASSERT_GE(rt * 16, cpu::kParallelMin);
  Tensor logits = randn({rt, 16}, 6, 8), dwts = randn({rt, 3}, 6, 9);
  auto run = [&] {
    Tensor o = Tensor::empty(DType::F32, dout.shape()), lse = Tensor::empty(DType::F32, {bs, h, t});
    b.attention({q, kk, vv, o, lse, 0.2f, true, 0, {}, {}});
    Tensor gq = Tensor::empty(DType::F32, q.shape()), gk = Tensor::empty(DType::F32, kk.shape());
    Tensor gv = Tensor::empty(DType::F32, vv.shape());
    b.attention_backward({q, kk, vv, o, lse, dout, gq, gk, gv, 0.2f, true, 0, {}, {}, {}, {}});
    Tensor dx = Tensor::empty(DType::F32, {m, k}), dw = Tensor::empty(DType::F32, {n, k});
    b.linear_backward({dy, x, w, Tensor(), dx, dw, false, false});
    Tensor dxb = Tensor::empty(DType::F32, {m, k});
    b.linear_backward({dy, x, wb, Tensor(), dxb, Tensor(), false, false});
    RouterArgs a;
    a.logits = logits;
    a.n_group = 4;
    a.topk_group = 2;
    a.top_k = 3;
    a.scores = Tensor::empty(DType::F32, {rt, 16});
    a.ids = Tensor::empty(DType::I32, {rt, 3});
    a.weights = Tensor::empty(DType::F32, {rt, 3});
    b.router(a);
    Tensor dl = Tensor::empty(DType::F32, {rt, 16});
    b.router_backward({a.scores, a.ids, dwts, RouterScoring::Sigmoid, true, 1.0f, dl, false});
    return std::vector<Tensor>{o, gq, gk, gv, dx, dw, dxb, dl};
  };
  expect_same(with_threads(1, run), with_threads(2, run), tol::kF32, "GEMM-based backward");
}

}  // namespace
}  // namespace dsv3::test
