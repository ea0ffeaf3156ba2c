// The expert-parallel MoE layer (simulated ranks on threads) against the single-process
// moe_forward/moe_backward on the same tokens: the concatenation of every rank's tokens.
#include <cmath>
#include <limits>
#include <map>
#include <set>
#include <utility>

#include "backend/fp8.h"
#include "dist/data_parallel.h"
#include "dist/expert_parallel.h"
#include "dist_test_util.h"

namespace dsv3 {
namespace {
using test::max_rel_diff;
using test::random_rows;
using test::run_ranks;
using test::expect_ep_equal;
using test::same_bits;

constexpr double kTol = 2e-6;  // FP32 regrouped sums (docs/distributed.md)

struct Case {
  ModelConfig cfg;
  int P = 2, rpn = 0;
  int64_t N = 6;  // tokens per rank
  EpOptions opt;
  std::vector<float> bias;  // router bias ([] = zeros)
  std::vector<std::pair<int64_t, float>> x_set = {};  // (flat index into x [P·N, H], value) put into x
};

struct Result {
  Tensor out_ref, dx_ref, out, dx;  // [P·N, H]
  std::unique_ptr<Grads> gref;
  std::vector<std::unique_ptr<Grads>> g;  // per rank
  std::vector<EpStats> stats;
  std::vector<CountingCommunicator::Counts> calls_fwd, calls_bwd;  // per rank, one forward / backward
  std::vector<std::vector<EpRow>> rows;
  std::vector<Tensor> xin;
  Tensor x;
};

Result run_case(const Case& cs) {
  Backend& be = cpu_backend();
  Weights w = Weights::random(cs.cfg, 5, 0.3f);
  ModelParams mp = bind_params(w);
  MoeParams& p = mp.layers[1].moe;
  const ModelDims d = model_dims(cs.cfg);
  if (!cs.bias.empty()) std::copy(cs.bias.begin(), cs.bias.end(), p.e_score_correction_bias.data<float>());
  const int64_t N = cs.N, H = d.H, T = N * cs.P;
  Result res;
  res.x = random_rows(T, H, 9);
  for (const auto& [i, v] : cs.x_set) res.x.data<float>()[i] = v;
  const Tensor dout = random_rows(T, H, 10);

  MoeActs ra;
  moe_forward(be, d, p, res.x, ra);
  res.out_ref = ra.out;
  res.gref = std::make_unique<Grads>(cs.cfg);
  res.dx_ref = be.alloc(DType::F32, {T, H});
  moe_backward(be, d, p, res.gref->p.layers[1].moe, ra, dout, Tensor(), res.dx_ref, false);

  res.out = Tensor::zeros(DType::F32, {T, H});
  res.dx = Tensor::zeros(DType::F32, {T, H});
  res.stats.resize(size_t(cs.P));
  res.calls_fwd.resize(size_t(cs.P));
  res.calls_bwd.resize(size_t(cs.P));
  res.rows.resize(size_t(cs.P));
  res.xin.resize(size_t(cs.P));
  for (int r = 0; r < cs.P; ++r) res.g.push_back(std::make_unique<Grads>(cs.cfg));
  auto world = make_thread_world(cs.P, cs.rpn);
  run_ranks(world, [&](int r, Communicator& inner) {
    CountingCommunicator c(inner);
    ExpertParallelMoe ep(c, d, cs.opt);
    EpMoeActs a;
    ep.forward(be, p, res.x.rows(r * N, (r + 1) * N), a);
    res.calls_fwd[size_t(r)] = c.counts();
    c.reset_counts();
    Tensor dx = be.alloc(DType::F32, {N, H});
    ep.backward(be, p, res.g[size_t(r)]->p.layers[1].moe, a, dout.rows(r * N, (r + 1) * N), Tensor(), dx, false);
    res.calls_bwd[size_t(r)] = c.counts();
    std::copy(a.local.out.data<float>(), a.local.out.data<float>() + N * H, res.out.data<float>() + r * N * H);
    std::copy(dx.data<float>(), dx.data<float>() + N * H, res.dx.data<float>() + r * N * H);
    res.stats[size_t(r)] = ep.stats();
    res.rows[size_t(r)] = a.rows;
    res.xin[size_t(r)] = a.xin;
  });
  return res;
}

// Expert e's gradients live on its owner and equal the single-process ones bitwise; the gate and
// shared-expert gradients are per-rank partial sums whose total matches within kTol.
void check_grads(const Case& cs, const Result& res) {
  const int64_t E = cs.cfg.n_routed_experts, epr = E / cs.P;
  for (int64_t e = 0; e < E; ++e) {
    const MlpParams& ref = res.gref->p.layers[1].moe.experts[size_t(e)];
    const MlpParams& got = res.g[size_t(e / epr)]->p.layers[1].moe.experts[size_t(e)];
    const std::string ex = "expert " + std::to_string(e);
    expect_ep_equal(got.gate_proj.w, ref.gate_proj.w, ex + " gate_proj");
    expect_ep_equal(got.up_proj.w, ref.up_proj.w, ex + " up_proj");
    expect_ep_equal(got.down_proj.w, ref.down_proj.w, ex + " down_proj");
    for (int r = 0; r < cs.P; ++r)
      if (r != e / epr) {
        const Tensor& t = res.g[size_t(r)]->p.layers[1].moe.experts[size_t(e)].down_proj.w;
        for (int64_t i = 0; i < t.numel(); ++i) ASSERT_EQ(t.data<float>()[i], 0.0f) << "expert " << e << " on rank " << r;
      }
  }
  auto summed = [&](auto get) {
    const Tensor& ref = get(res.gref->p.layers[1].moe);
    std::vector<float> s(size_t(ref.numel()), 0.0f);
    for (int r = 0; r < cs.P; ++r) {
      const Tensor& t = get(res.g[size_t(r)]->p.layers[1].moe);
      for (int64_t i = 0; i < ref.numel(); ++i) s[size_t(i)] += t.data<float>()[i];
    }
    return max_rel_diff(s.data(), ref.data<float>(), ref.numel());
  };
  EXPECT_LT(summed([](const MoeParams& m) -> const Tensor& { return m.gate.w; }), kTol);
  if (cs.cfg.n_shared_experts > 0) {
    EXPECT_LT(summed([](const MoeParams& m) -> const Tensor& { return m.shared_experts.down_proj.w; }), kTol);
  }
}

TEST(ExpertParallel, OneExpertPerRankIsBitwise) {
  Case cs{test::tiny_moe_config(4, 2), 4, 0, 5, {}, {}};
  Result res = run_case(cs);
  expect_ep_equal(res.out, res.out_ref, "out");
  expect_ep_equal(res.dx, res.dx_ref, "dx");
  check_grads(cs, res);
  // Each token's hidden state crosses to a rank at most once per rank holding one of its experts.
  int64_t rows = 0;
  for (auto& s : res.stats) rows += s.dispatch_rows;
  EXPECT_LE(rows, 4 * 5 * 2);
}

// The reduced precisions: each rank's experts go through experts_forward/experts_backward as the
// single process's do, on the same rows in the same order, so with one expert per rank the layer's
// output, dx and the experts' gradients are the same bits. (The gate's and shared experts' gradients
// are partial sums per rank; in FP8 their Wgrad groups 128 tokens of each rank, not of the batch.)
TEST(ExpertParallel, OneExpertPerRankIsBitwiseInBf16AndFp8) {
  struct Restore {
    ~Restore() { linear_precision() = LinearPrecision{}; }
  } restore;
  for (LinearPrecisionMode mode : {LinearPrecisionMode::Bf16, LinearPrecisionMode::Fp8}) {
    SCOPED_TRACE(mode == LinearPrecisionMode::Bf16 ? "bf16" : "fp8");
    linear_precision() = LinearPrecision{mode};
    Case cs{test::tiny_moe_config(4, 2), 4, 0, 5, {}, {}};
    Result res = run_case(cs);
    expect_ep_equal(res.out, res.out_ref, "out");
    expect_ep_equal(res.dx, res.dx_ref, "dx");
    for (int64_t e = 0; e < 4; ++e) {
      const MlpParams& ref = res.gref->p.layers[1].moe.experts[size_t(e)];
      const MlpParams& got = res.g[size_t(e)]->p.layers[1].moe.experts[size_t(e)];
      const std::string ex = "expert " + std::to_string(e);
      expect_ep_equal(got.gate_proj.w, ref.gate_proj.w, ex + " gate_proj");
      expect_ep_equal(got.up_proj.w, ref.up_proj.w, ex + " up_proj");
      expect_ep_equal(got.down_proj.w, ref.down_proj.w, ex + " down_proj");
    }
  }
}

TEST(ExpertParallel, SeveralExpertsPerRankWithinTolerance) {
  for (int P : {1, 2}) {
    Case cs{test::tiny_moe_config(8, 3), P, 0, 7, {}, {}};
    Result res = run_case(cs);
    if (P == 1) {
      EXPECT_TRUE(same_bits(res.out, res.out_ref));
    }
    EXPECT_LT(max_rel_diff(res.out.data<float>(), res.out_ref.data<float>(), res.out.numel()), kTol) << "P=" << P;
    EXPECT_LT(max_rel_diff(res.dx.data<float>(), res.dx_ref.data<float>(), res.dx.numel()), kTol) << "P=" << P;
    check_grads(cs, res);
    // Deduplication: rows sent = Σ_tokens (distinct ranks among its experts) ≤ tokens × min(k, P).
    for (int r = 0; r < P; ++r) EXPECT_LE(res.stats[size_t(r)].dispatch_rows, 7 * 2 * std::min(3, P));
  }
}

TEST(ExpertParallel, SkewedRoutingEveryTokenToOneExpert) {
  // top-1 routing with a bias that makes expert 0 win everywhere: ranks 1..3 receive nothing.
  Case cs{test::tiny_moe_config(4, 1), 4, 0, 5, {}, {100.0f, 0, 0, 0}};
  Result res = run_case(cs);
  EXPECT_EQ(res.rows[0].size(), size_t(20));
  for (int r = 1; r < 4; ++r) EXPECT_TRUE(res.rows[size_t(r)].empty());
  expect_ep_equal(res.out, res.out_ref, "out");
  expect_ep_equal(res.dx, res.dx_ref, "dx");
  check_grads(cs, res);
}

// The direct path (hidden states as one block per rank from the backend's memory) and the host-row
// path it replaced for single-hop F32 dispatch move the same rows in the same order: same bits.
TEST(ExpertParallel, DirectPathEqualsHostRows) {
  for (auto [experts, ranks] : {std::pair{4, 4}, std::pair{8, 2}}) {
    Case cs{test::tiny_moe_config(experts, 2), ranks, 0, 6, {}, {}};
    Result direct = run_case(cs);
    cs.opt.host_rows = true;
    Result rows = run_case(cs);
    EXPECT_TRUE(same_bits(direct.out, rows.out)) << experts << " experts on " << ranks << " ranks";
    EXPECT_TRUE(same_bits(direct.dx, rows.dx)) << experts << " experts on " << ranks << " ranks";
    for (int r = 0; r < ranks; ++r) {
      ASSERT_EQ(direct.rows[size_t(r)].size(), rows.rows[size_t(r)].size());
      for (size_t i = 0; i < rows.rows[size_t(r)].size(); ++i) {
        EXPECT_EQ(direct.rows[size_t(r)][i].src, rows.rows[size_t(r)][i].src);
        EXPECT_EQ(direct.rows[size_t(r)][i].token, rows.rows[size_t(r)][i].token);
        EXPECT_EQ(direct.rows[size_t(r)][i].experts, rows.rows[size_t(r)][i].experts);
      }
      EXPECT_TRUE(same_bits(direct.xin[size_t(r)], rows.xin[size_t(r)]));
      // The same payload bytes (hidden states, partial sums, dout, input gradients); the direct path
      // leaves out the metadata the receiver already has: in the forward combine, and in the
      // backward's dispatch and combine, where only the gate-weight gradients (4 bytes per pick of
      // a returned row) travel besides the payload.
      int64_t back = 0, back_picks = 0, sent = 0;  // rows returned to other ranks, their picks; rows sent to others
      for (const EpRow& m : rows.rows[size_t(r)]) {
        if (m.src == r) continue;
        ++back;
        back_picks += int64_t(m.experts.size());
      }
      for (int q = 0; q < ranks; ++q)
        for (const EpRow& m : rows.rows[size_t(q)]) sent += q != r && m.src == r;
      const int64_t meta = 8 + 8 * cs.cfg.num_experts_per_tok;
      EXPECT_EQ(direct.stats[size_t(r)].dispatch_bytes, rows.stats[size_t(r)].dispatch_bytes);
      EXPECT_EQ(direct.stats[size_t(r)].combine_bytes, rows.stats[size_t(r)].combine_bytes - back * meta);
      EXPECT_EQ(direct.stats[size_t(r)].backward_bytes,
                rows.stats[size_t(r)].backward_bytes - (sent + back) * meta + 4 * back_picks);
    }
    check_grads(cs, rows);
    // The direct path's gradients are the host-row path's, bit for bit (router gate and experts).
    for (int r = 0; r < ranks; ++r) {
      const MoeParams& gd = direct.g[size_t(r)]->p.layers[1].moe;
      const MoeParams& gr = rows.g[size_t(r)]->p.layers[1].moe;
      EXPECT_TRUE(same_bits(gd.gate.w, gr.gate.w)) << "rank " << r;
      for (size_t e = 0; e < gd.experts.size(); ++e) {
        EXPECT_TRUE(same_bits(gd.experts[e].gate_proj.w, gr.experts[e].gate_proj.w)) << "rank " << r << " expert " << e;
        EXPECT_TRUE(same_bits(gd.experts[e].up_proj.w, gr.experts[e].up_proj.w)) << "rank " << r << " expert " << e;
        EXPECT_TRUE(same_bits(gd.experts[e].down_proj.w, gr.experts[e].down_proj.w)) << "rank " << r << " expert " << e;
      }
    }
  }
}

// Per rank and layer step: one routing plan (one host copy of the router's ids and weights), and
// only the exchanges that carry something new. Direct path: forward = counts, metadata rows,
// hidden states, partial sums; backward = dout, input gradients, gate-weight gradients (the counts
// and metadata are the forward's). FP8 dispatch: the forward's rows carry counts and metadata with
// the payload, its combine and backward are direct. Host rows: every exchange sends its counts first.
TEST(ExpertParallel, OnePlanAndNoRepeatedExchangesPerLayerStep) {
  struct Want {
    bool host_rows, fp8;
    int64_t fwd, bwd;
  };
  for (const Want& w : {Want{false, false, 4, 3}, Want{false, true, 3, 3}, Want{true, false, 4, 4}}) {
    Case cs{test::tiny_moe_config(8, 3), 4, 0, 6, {}, {}};
    cs.opt.host_rows = w.host_rows;
    cs.opt.fp8_dispatch = w.fp8;
    Result res = run_case(cs);
    for (int r = 0; r < 4; ++r) {
      const std::string what = cat("host_rows ", w.host_rows, " fp8 ", w.fp8, " rank ", r);
      EXPECT_EQ(res.stats[size_t(r)].plans, 1) << what;
      EXPECT_EQ(res.calls_fwd[size_t(r)].all_to_all_v, w.fwd) << what;
      EXPECT_EQ(res.calls_bwd[size_t(r)].all_to_all_v, w.bwd) << what;
      EXPECT_EQ(res.calls_fwd[size_t(r)].total(), w.fwd) << what;
      EXPECT_EQ(res.calls_bwd[size_t(r)].total(), w.bwd) << what;
    }
    if (!w.fp8) check_grads(cs, res);
  }
}

TEST(ExpertParallel, TwoHopMatchesDirect) {
  Case cs{test::tiny_moe_config(8, 4), 4, 2, 6, {}, {}};
  Result direct = run_case(cs);
  cs.opt.two_hop = true;
  Result hop = run_case(cs);
  EXPECT_LT(max_rel_diff(hop.out.data<float>(), hop.out_ref.data<float>(), hop.out.numel()), kTol);
  EXPECT_LT(max_rel_diff(hop.dx.data<float>(), hop.dx_ref.data<float>(), hop.dx.numel()), kTol);
  check_grads(cs, hop);
  // Same rows arrive at the experts; across nodes only between equal local ranks, so no more
  // inter-node bytes than the direct path.
  for (int r = 0; r < 4; ++r) {
    ASSERT_EQ(hop.rows[size_t(r)].size(), direct.rows[size_t(r)].size());
    EXPECT_LE(hop.stats[size_t(r)].inter_node_bytes, direct.stats[size_t(r)].inter_node_bytes);
  }
}

TEST(ExpertParallel, Fp8DispatchCarriesQuantizedRows) {
  Case cs{test::tiny_moe_config(4, 2), 2, 0, 5, {}, {}};
  cs.opt.fp8_dispatch = true;
  Result res = run_case(cs);
  // What arrives is exactly dequantize(quantize_1x128(x)) of the source row (power-of-two scales).
  const int64_t H = res.x.dim(1), T = res.x.dim(0);
  Tensor q = Tensor::empty(DType::F8_E4M3, {T, H}), s = Tensor::empty(DType::F32, {T, (H + 127) / 128});
  QuantizeFp8Args qa;
  qa.x = res.x;
  qa.q = q;
  qa.scale = s;
  qa.pow2_scale = true;
  quantize_fp8(qa);
  Tensor xq = Tensor::empty(DType::F32, {T, H});
  dequantize_fp8(q, s, xq);
  int64_t checked = 0;
  for (int r = 0; r < 2; ++r)
    for (size_t i = 0; i < res.rows[size_t(r)].size(); ++i) {
      const EpRow& row = res.rows[size_t(r)][i];
      const float* got = res.xin[size_t(r)].data<float>() + int64_t(i) * H;
      const float* want = xq.data<float>() + (row.src * cs.N + row.token) * H;
      for (int64_t h = 0; h < H; ++h) ASSERT_EQ(got[h], want[h]);
      ++checked;
    }
  EXPECT_GT(checked, 0);
  // The FP8 payload is H + 4·⌈H/128⌉ bytes instead of 4·H.
  int64_t f32_bytes = 0, fp8_bytes = 0, rows = 0;
  for (auto& st : res.stats) fp8_bytes += st.dispatch_bytes, rows += st.dispatch_rows;
  cs.opt.fp8_dispatch = false;
  Result plain = run_case(cs);
  for (auto& st : plain.stats) f32_bytes += st.dispatch_bytes;
  EXPECT_LT(fp8_bytes, f32_bytes);
}

// A non-finite activation reaches the experts as NaN through the FP8 dispatch (its tile's scale), on
// every rank, instead of the quantizer throwing on one rank while the others wait in the exchange, or
// E4M3 saturating an Inf: the token's output is NaN, so the loss shows the divergence; the other
// tokens are untouched.
TEST(ExpertParallel, Fp8DispatchCarriesNonFiniteRowsAsNaN) {
  Case cs{test::tiny_moe_config(4, 2), 2, 0, 5, {}, {}};
  cs.opt.fp8_dispatch = true;
  const int64_t H = 24;
  cs.x_set = {{1 * H + 3, std::numeric_limits<float>::quiet_NaN()},
              {(cs.N + 2) * H + 7, std::numeric_limits<float>::infinity()}};
  const Result res = run_case(cs);
  auto poisoned = [&](int64_t token) { return token == 1 || token == cs.N + 2; };
  int64_t bad_rows = 0;
  for (int r = 0; r < 2; ++r)
    for (size_t i = 0; i < res.rows[size_t(r)].size(); ++i) {
      const EpRow& row = res.rows[size_t(r)][i];
      const float* got = res.xin[size_t(r)].data<float>() + int64_t(i) * H;
      const bool bad = poisoned(row.src * cs.N + row.token);
      bad_rows += bad;
      for (int64_t h = 0; h < H; ++h) ASSERT_EQ(std::isnan(got[h]), bad) << "rank " << r << " row " << i << " h " << h;
    }
  EXPECT_GT(bad_rows, 0);
  for (int64_t t = 0; t < 2 * cs.N; ++t)
    for (int64_t h = 0; h < H; ++h)
      ASSERT_EQ(std::isfinite(res.out.data<float>()[t * H + h]), !poisoned(t)) << "token " << t << " h " << h;
}

TEST(ExpertParallel, NodeLimitedRoutingEqualsGroupLimitedRouterOnNodeGroups) {
  // 4 nodes of 2 experts, 4 picks on at most 2 nodes (top-2 sum per node) is exactly the V3 router
  // with n_group = 4, topk_group = 2.
  const ModelConfig grouped = test::tiny_moe_config(8, 4, 4, 2);
  const ModelDims d = model_dims(grouped);
  const int64_t N = 40;
  Tensor logits = random_rows(N, 8, 3);
  Tensor bias = random_rows(1, 8, 4, 0.1f).reshape({8});
  Tensor scores = Tensor::empty(DType::F32, {N, 8}), ids = Tensor::empty(DType::I32, {N, 4}),
         w = Tensor::empty(DType::F32, {N, 4});
  RouterArgs r;
  r.logits = logits;
  r.bias = bias;
  r.n_group = 4;
  r.topk_group = 2;
  r.top_k = 4;
  r.norm_topk_prob = d.norm_topk_prob;
  r.routed_scaling_factor = d.routed_scaling_factor;
  r.scores = scores;
  r.ids = ids;
  r.weights = w;
  cpu_backend().router(r);
  Tensor ids2 = Tensor::empty(DType::I32, {N, 4}), w2 = Tensor::empty(DType::F32, {N, 4});
  node_limited_topk(scores, bias, 4, 2, 4, d.norm_topk_prob, d.routed_scaling_factor, ids2, w2);
  for (int64_t t = 0; t < N; ++t) {
    std::vector<std::pair<int32_t, float>> a, b;
    for (int j = 0; j < 4; ++j) {
      a.push_back({ids.data<int32_t>()[t * 4 + j], w.data<float>()[t * 4 + j]});
      b.push_back({ids2.data<int32_t>()[t * 4 + j], w2.data<float>()[t * 4 + j]});
    }
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    for (int j = 0; j < 4; ++j) {
      ASSERT_EQ(a[size_t(j)].first, b[size_t(j)].first) << "token " << t;
      ASSERT_NEAR(a[size_t(j)].second, b[size_t(j)].second, 1e-6f) << "token " << t;
    }
  }
}

TEST(ExpertParallel, NodeLimitedRoutingBoundsNodesPerToken) {
  // No group limit in the model; node limit M = 1 over 2 nodes of 2 ranks.
  Case cs{test::tiny_moe_config(8, 2), 4, 2, 6, {}, {}};
  cs.opt.node_limit = 1;
  Result res = run_case(cs);
  std::map<std::pair<int, int>, std::set<int>> nodes;  // (src, token) → nodes of the ranks it reached
  for (int r = 0; r < 4; ++r)
    for (const EpRow& row : res.rows[size_t(r)]) nodes[{row.src, row.token}].insert(r / 2);
  EXPECT_EQ(nodes.size(), size_t(4 * 6));
  for (auto& [tok, ns] : nodes) EXPECT_EQ(ns.size(), size_t(1)) << "rank " << tok.first << " token " << tok.second;
}

TEST(ExpertParallel, BadLayoutIsAnInputError) {
  auto world = make_thread_world(3);
  const ModelDims d = model_dims(test::tiny_moe_config(4, 2));
  EXPECT_THROW(ExpertParallelMoe(*world[0], d), InputError);
}

}  // namespace
}  // namespace dsv3

namespace dsv3 {
namespace {

// DP × EP on 4 ranks: two replicas (DP) of a 2-rank EP group. Expert gradients summed over the DP
// group and gate gradients over all ranks match the single-process layer on all 4 ranks' tokens.
TEST(ExpertParallel, DataTimesExpertParallel) {
  Backend& be = cpu_backend();
  const ModelConfig cfg = test::tiny_moe_config(4, 2);
  Weights w = Weights::random(cfg, 5, 0.3f);
  ModelParams mp = bind_params(w);
  const MoeParams& p = mp.layers[1].moe;
  const ModelDims d = model_dims(cfg);
  const int64_t N = 5, H = d.H, T = 4 * N;
  const Tensor x = random_rows(T, H, 9), dout = random_rows(T, H, 10);
  MoeActs ra;
  moe_forward(be, d, p, x, ra);
  Grads gref(cfg);
  Tensor dx_ref = be.alloc(DType::F32, {T, H});
  moe_backward(be, d, p, gref.p.layers[1].moe, ra, dout, Tensor(), dx_ref, false);

  std::vector<std::unique_ptr<Grads>> g;
  for (int r = 0; r < 4; ++r) g.push_back(std::make_unique<Grads>(cfg));
  Tensor out = Tensor::zeros(DType::F32, {T, H});
  auto world = make_thread_world(4);
  run_ranks(world, [&](int r, Communicator& c) {
    auto ep_comm = c.split(r / 2, r);  // EP group: {0,1}, {2,3}
    auto dp_comm = c.split(r % 2, r);  // DP group: same EP index
    ExpertParallelMoe ep(*ep_comm, d);
    EpMoeActs a;
    ep.forward(be, p, x.rows(r * N, (r + 1) * N), a);
    Tensor dx = be.alloc(DType::F32, {N, H});
    MoeParams& gm = g[size_t(r)]->p.layers[1].moe;
    ep.backward(be, p, gm, a, dout.rows(r * N, (r + 1) * N), Tensor(), dx, false);
    std::copy(a.local.out.data<float>(), a.local.out.data<float>() + N * H, out.data<float>() + r * N * H);
    EXPECT_LT(max_rel_diff(dx.data<float>(), dx_ref.rows(r * N, (r + 1) * N).data<float>(), N * H), kTol);
    std::vector<Tensor> expert_grads;
    for (int64_t e = ep.first_expert(); e < ep.first_expert() + ep.experts_per_rank(); ++e)
      for (const Tensor& t : {gm.experts[size_t(e)].gate_proj.w, gm.experts[size_t(e)].up_proj.w, gm.experts[size_t(e)].down_proj.w})
        expert_grads.push_back(t);
    GradientAllReduce(*dp_comm, expert_grads, 256).run(1.0f);
    GradientAllReduce(c, {gm.gate.w, gm.shared_experts.down_proj.w}, 256).run(1.0f);
  });
  EXPECT_LT(max_rel_diff(out.data<float>(), ra.out.data<float>(), out.numel()), kTol);
  for (int64_t e = 0; e < 4; ++e) {
    const int owner = int(e / 2);  // EP index; ranks owner and owner + 2 hold it
    for (int r : {owner, owner + 2}) {
      const Tensor& got = g[size_t(r)]->p.layers[1].moe.experts[size_t(e)].down_proj.w;
      const Tensor& ref = gref.p.layers[1].moe.experts[size_t(e)].down_proj.w;
      EXPECT_LT(max_rel_diff(got.data<float>(), ref.data<float>(), ref.numel()), kTol) << "expert " << e << " rank " << r;
    }
  }
  for (int r = 0; r < 4; ++r)
    EXPECT_LT(max_rel_diff(g[size_t(r)]->p.layers[1].moe.gate.w.data<float>(), gref.p.layers[1].moe.gate.w.data<float>(),
                           gref.p.layers[1].moe.gate.w.numel()),
              kTol);
}

}  // namespace
}  // namespace dsv3
