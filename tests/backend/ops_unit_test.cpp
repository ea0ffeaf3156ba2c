// Hand-checked unit tests of individual ops: every expected value is worked out here from the
// formula (or by hand in a comment), independently of the backend's code.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>

#include "backend/ops.h"
#include "backend/tolerance.h"
#include "harness.h"

namespace dsv3::test {
namespace {

Backend& cpu() { return cpu_backend(); }
Tensor f32(const Shape& s, std::initializer_list<float> v) {
  Tensor t = Tensor::empty(DType::F32, s);
  size_t i = 0;
  for (float x : v) t.data<float>()[i++] = x;
  return t;
}
Tensor i32(const Shape& s, std::initializer_list<int32_t> v) {
  Tensor t = Tensor::empty(DType::I32, s);
  size_t i = 0;
  for (int32_t x : v) t.data<int32_t>()[i++] = x;
  return t;
}

TEST(RmsNorm, HandExample) {
  // x = [3, 4]: mean(x²) = 12.5; y = w · x / sqrt(12.5 + eps).
  Tensor x = f32({1, 2}, {3, 4}), w = f32({2}, {1, 2}), y = Tensor::empty(DType::F32, {1, 2});
  Tensor r = Tensor::empty(DType::F32, {1});
  cpu().rmsnorm({x, w, 0.5f, y, r});
  double rs = 1 / std::sqrt(12.5 + 0.5);
  EXPECT_NEAR(r.data<float>()[0], rs, 1e-7);
  EXPECT_NEAR(y.data<float>()[0], 3 * rs, 1e-6);
  EXPECT_NEAR(y.data<float>()[1], 8 * rs, 1e-6);
}

TEST(Rope, DefaultTablesFollowTheFormula) {
  RopeParams p;
  p.theta = 10000;
  p.dim = 8;
  RopeTables t = rope_tables(p, 5);
  EXPECT_EQ(t.attention_factor, 1.0);
  for (int pos = 0; pos < 5; ++pos)
    for (int i = 0; i < 4; ++i) {
      double inv = std::pow(10000.0, -2.0 * i / 8);
      EXPECT_NEAR(t.inv_freq.data<float>()[i], inv, 1e-7 * inv);
      EXPECT_NEAR(t.cos.data<float>()[pos * 4 + i], std::cos(pos * inv), 1e-6);
      EXPECT_NEAR(t.sin.data<float>()[pos * 4 + i], std::sin(pos * inv), 1e-6);
    }
}

TEST(Rope, YarnTablesForDeepSeekV3) {
  // DeepSeek-V3's hub config: rope_theta 10000, qk_rope_head_dim 64, factor 40,
  // original_max_position_embeddings 4096, beta_fast 32, beta_slow 1, mscale = mscale_all_dim = 1.
  RopeParams p;
  p.type = "yarn";
  p.theta = 10000;
  p.dim = 64;
  p.max_position_embeddings = 163840;
  p.factor = 40;
  p.original_max_position_embeddings = 4096;
  p.beta_fast = 32;
  p.beta_slow = 1;
  p.mscale = 1;
  p.mscale_all_dim = 1;
  RopeTables t = rope_tables(p, 3);
  EXPECT_EQ(t.attention_factor, 1.0);  // mscale / mscale_all_dim with equal arguments
  // Correction dims d·ln(L/(2πβ)) / (2 ln θ): β = 32 → 10.47… → floor 10; β = 1 → 22.49… → ceil 23.
  auto corr = [](double beta) { return 64 * std::log(4096 / (beta * 2 * M_PI)) / (2 * std::log(10000.0)); };
  double low = std::floor(corr(32)), high = std::ceil(corr(1));
  ASSERT_EQ(low, 10);
  ASSERT_EQ(high, 23);
  for (int i = 0; i < 32; ++i) {
    double base = std::pow(10000.0, 2.0 * i / 64);
    double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
    double want = (1 / (40 * base)) * ramp + (1 / base) * (1 - ramp);
    EXPECT_NEAR(t.inv_freq.data<float>()[i], want, 2e-7 * want) << "i = " << i;
    if (i <= 10) {
      EXPECT_NEAR(t.inv_freq.data<float>()[i], 1 / base, 2e-7 / base);  // extrapolated
    }
    if (i >= 23) {
      EXPECT_NEAR(t.inv_freq.data<float>()[i], 1 / (40 * base), 2e-7 / (40 * base));  // interpolated
    }
    EXPECT_NEAR(t.cos.data<float>()[2 * 32 + i], std::cos(2 * double(t.inv_freq.data<float>()[i])), 1e-6);
  }
  // Softmax scale: 192^-0.5 · (0.1·1·ln 40 + 1)².
  double m = 0.1 * std::log(40.0) + 1;
  EXPECT_NEAR(rope_softmax_scale(p, 192), m * m / std::sqrt(192.0), 1e-12);
  p.type = "default";
  EXPECT_NEAR(rope_softmax_scale(p, 192), 1 / std::sqrt(192.0), 1e-12);
}

TEST(Rope, YarnAttentionFactorAndDerivedFactor) {
  RopeParams p;
  p.type = "yarn";
  p.dim = 16;
  p.max_position_embeddings = 64;
  p.original_max_position_embeddings = 16;  // factor absent → 64/16 = 4
  p.mscale = 0.707;
  p.mscale_all_dim = 1.0;
  RopeTables t = rope_tables(p, 2);
  double want = (0.1 * 0.707 * std::log(4.0) + 1) / (0.1 * std::log(4.0) + 1);
  EXPECT_NEAR(t.attention_factor, want, 1e-12);
  EXPECT_NEAR(t.cos.data<float>()[0], want, 1e-6);  // cos(0)·attention_factor
  p.mscale = 0;                                      // absent → mscale(factor, 1)
  EXPECT_NEAR(rope_tables(p, 1).attention_factor, 0.1 * std::log(4.0) + 1, 1e-12);
  p.attention_factor = 0.5;  // explicit override wins
  EXPECT_EQ(rope_tables(p, 1).attention_factor, 0.5);
  p.type = "linear";
  EXPECT_THROW(rope_tables(p, 1), InputError);
}

TEST(Rope, RotatesPairsInPlaceInBothLayouts) {
  // One head, W = 4, one pair per half: angle θ at position 1 for pair 0, 0 for pair 1.
  double th = 0.3;
  Tensor cs = f32({2, 2}, {1, 1, float(std::cos(th)), 1}), sn = f32({2, 2}, {0, 0, float(std::sin(th)), 0});
  Tensor pos = i32({1}, {1});
  Tensor x = f32({1, 1, 4}, {1, 2, 3, 4});
  cpu().rope({x, pos, cs, sn, 0, 4, true, false});  // pairs (0,1) by θ, (2,3) by 0
  EXPECT_NEAR(x.data<float>()[0], std::cos(th) - 2 * std::sin(th), 1e-6);
  EXPECT_NEAR(x.data<float>()[1], 2 * std::cos(th) + std::sin(th), 1e-6);
  EXPECT_EQ(x.data<float>()[2], 3);
  EXPECT_EQ(x.data<float>()[3], 4);
  Tensor y = f32({1, 1, 4}, {1, 2, 3, 4});
  cpu().rope({y, pos, cs, sn, 0, 4, false, false});  // pairs (0,2) by θ, (1,3) by 0
  EXPECT_NEAR(y.data<float>()[0], std::cos(th) - 3 * std::sin(th), 1e-6);
  EXPECT_NEAR(y.data<float>()[2], 3 * std::cos(th) + std::sin(th), 1e-6);
  EXPECT_EQ(y.data<float>()[1], 2);
  cpu().rope({y, pos, cs, sn, 0, 4, false, true});  // inverse restores
  EXPECT_NEAR(y.data<float>()[0], 1, 1e-6);
  EXPECT_NEAR(y.data<float>()[2], 3, 1e-6);
  Tensor bad = i32({1}, {2});
  EXPECT_THROW(cpu().rope({x, bad, cs, sn, 0, 4, true, false}), InputError);
}

TEST(Rope, InterleavedScoresEqualHfDeinterleavedOrder) {
  // HF DeepSeek-V3 writes [rotated evens, rotated odds]; a dot product of q and k is the same.
  RopeParams p;
  p.dim = 8;
  RopeTables t = rope_tables(p, 10);
  Tensor q = randn({1, 1, 8}, 7, 1), k = randn({1, 1, 8}, 7, 2);
  Vec q0 = to_vec(q), k0 = to_vec(k);
  Tensor pq = i32({1}, {7}), pk = i32({1}, {3});
  cpu().rope({q, pq, t.cos, t.sin, 0, 8, true, false});
  cpu().rope({k, pk, t.cos, t.sin, 0, 8, true, false});
  auto hf = [&](const Vec& x, int pos) {  // apply_rotary_pos_emb_interleave, written out
    Vec o(8);
    for (int i = 0; i < 4; ++i) {
      double c = t.cos.data<float>()[pos * 4 + i], s = t.sin.data<float>()[pos * 4 + i];
      o[size_t(i)] = x[size_t(2 * i)] * c - x[size_t(2 * i + 1)] * s;
      o[size_t(4 + i)] = x[size_t(2 * i + 1)] * c + x[size_t(2 * i)] * s;
    }
    return o;
  };
  EXPECT_NEAR(dot(to_vec(q), to_vec(k)), dot(hf(q0, 7), hf(k0, 3)), 1e-5);
}

TEST(Attention, HandExampleAndCausalOffset) {
  // q = [1, 0]; keys [1, 0] and [0, 1] → logits [1, 0], p = [e, 1]/(e + 1);
  // values [1, 0] and [0, 2] → out = [e, 2]/(e + 1).
  Tensor q = f32({1, 1, 2}, {1, 0}), k = f32({2, 1, 2}, {1, 0, 0, 1}), v = f32({2, 1, 2}, {1, 0, 0, 2});
  Tensor out = Tensor::empty(DType::F32, {1, 1, 2}), lse = Tensor::empty(DType::F32, {1, 1});
  double e = std::exp(1.0);
  cpu().attention({q, k, v, out, lse, 1.0f, true, 1, {}, {}});  // query at position 1 sees both keys
  EXPECT_NEAR(out.data<float>()[0], e / (e + 1), 1e-6);
  EXPECT_NEAR(out.data<float>()[1], 2 / (e + 1), 1e-6);
  EXPECT_NEAR(lse.data<float>()[0], std::log(e + 1), 1e-6);
  cpu().attention({q, k, v, out, lse, 1.0f, true, 0, {}, {}});  // position 0 sees key 0 only
  EXPECT_NEAR(out.data<float>()[0], 1, 1e-7);
  EXPECT_NEAR(out.data<float>()[1], 0, 1e-7);
  EXPECT_NEAR(lse.data<float>()[0], 1, 1e-7);
  EXPECT_THROW(cpu().attention({q, k, v, out, lse, 1.0f, true, 2, {}, {}}), InternalError);  // S < q_offset + T
}

// The split form's rules: kv with k or v, k_pe of the wrong width or with more than one head, dk
// beside dkv, and dkv without the split form are refused, naming what is wrong.
TEST(Attention, SplitFormRules) {
  const auto z = [](Shape s) { return Tensor::zeros(DType::F32, s); };
  AttentionArgs a;
  a.q = z({3, 2, 6}), a.kv = z({3, 2, 4 + 5}), a.k_pe = z({3, 1, 2}), a.out = z({3, 2, 5});
  cpu().attention(a);  // Dn 4, Dr 2, Dv 5
  const auto refused = [](auto&& call, const char* what) {
    try {
      call();
      ADD_FAILURE() << "accepted: " << what;
    } catch (const InternalError& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  AttentionArgs b = a;
  b.k = z({3, 2, 6});
  refused([&] { cpu().attention(b); }, "k and v must be absent");
  b = a;
  b.k_pe = z({3, 1, 3});
  refused([&] { cpu().attention(b); }, "Dn + Dr");
  b = a;
  b.k_pe = z({3, 2, 2});
  refused([&] { cpu().attention(b); }, "one");
  b = a;
  b.q = z({3, 0, 6}), b.kv = z({3, 0, 9}), b.out = z({3, 0, 5});
  refused([&] { cpu().attention(b); }, "at least one head");
  b = a;
  b.kv = Tensor();
  refused([&] { cpu().attention(b); }, "kv is missing");
  AttentionBackwardArgs g;
  g.q = a.q, g.kv = a.kv, g.k_pe = a.k_pe, g.out = a.out, g.lse = z({2, 3}), g.dout = z({3, 2, 5});
  g.dk = z({3, 2, 6});
  refused([&] { cpu().attention_backward(g); }, "dk and dv must be absent");
  g.dk = Tensor();
  g.dkv = z({3, 2, 8});
  refused([&] { cpu().attention_backward(g); }, "differ in shape");
  // q and kv may be absent only where the forward's kept operands stand for them, dq and dkv giving
  // their shapes, and only the backend that kept them can read them.
  g.kv = Tensor();
  g.dkv = z({3, 2, 9});
  refused([&] { cpu().attention_backward(g); }, "kv is missing");
  g.kept = z({4});
  g.dkv = Tensor();
  refused([&] { cpu().attention_backward(g); }, "kv is missing");
  g.dkv = z({3, 2, 9});
  refused([&] { cpu().attention_backward(g); }, "kv is missing, and the composed split form cannot read");
  g.kv = a.kv, g.q = Tensor();
  refused([&] { cpu().attention_backward(g); }, "q is missing: only");
  g.dq = z({3, 2, 6});
  refused([&] { cpu().attention_backward(g); }, "q is missing, and the composed split form cannot read");
  g.kept = Tensor();
  refused([&] { cpu().attention_backward(g); }, "q is missing: only");
  g.q = a.q, g.dq = g.dkv = Tensor();
  AttentionBackwardArgs plain;
  plain.q = a.q, plain.k = z({3, 2, 6}), plain.v = z({3, 2, 5}), plain.out = a.out, plain.lse = g.lse;
  plain.dout = g.dout, plain.dkv = z({3, 2, 9});
  refused([&] { cpu().attention_backward(plain); }, "need the split form");
  plain.dkv = Tensor(), plain.q = Tensor(), plain.dq = z({3, 2, 6}), plain.kept = z({4});
  refused([&] { cpu().attention_backward(plain); }, "q is missing, and the CPU backend cannot read");
  // A forward that keeps nothing (the CPU) drops what an earlier call left in *keep.
  Tensor stale = z({4});
  AttentionArgs kept_none = a;
  kept_none.keep = &stale;
  cpu().attention(kept_none);
  EXPECT_FALSE(stale.defined());
  AttentionArgs kv_less;
  kv_less.q = a.q, kv_less.k = z({3, 2, 6}), kv_less.v = z({3, 2, 5}), kv_less.out = a.out;
  refused([&] { attention_split_kv(cpu(), kv_less); }, "needs the split form");
  // copy_cols from no rows into some (what H = 0 heads would ask of the composition) divided by zero.
  CopyColsArgs c;
  c.src = z({0, 4}), c.dst = z({3, 4}), c.width = 4;
  refused([&] { cpu().copy_cols(c); }, "not equal or multiples");
}

RouterArgs router_args(const Tensor& logits, const Tensor& bias, int64_t e, int ng, int tg, int k) {
  RouterArgs a;
  a.logits = logits;
  a.bias = bias;
  a.n_group = ng;
  a.topk_group = tg;
  a.top_k = k;
  a.norm_topk_prob = true;
  a.routed_scaling_factor = 2.5f;
  int64_t t = logits.dim(0);
  a.scores = Tensor::empty(DType::F32, {t, e});
  a.ids = Tensor::empty(DType::I32, {t, k});
  a.weights = Tensor::empty(DType::F32, {t, k});
  return a;
}

TEST(Router, GroupMaskingAndTiesHandWorked) {
  // logits 0 → s = 0.5 for every expert; the bias alone decides. 8 experts in 4 groups of 2.
  // Token 0: c = [.6 .5 | .7 .7 | .5 .5 | .8 0]: group scores (top-2 sums) 1.1, 1.4, 1.0, 0.8
  //   → groups 1 and 0; the best c in them: experts 2 and 3 tie at .7 → 2 first, then 3.
  Tensor logits = Tensor::zeros(DType::F32, {1, 8});
  Tensor bias = f32({8}, {0.1f, 0.0f, 0.2f, 0.2f, 0.0f, 0.0f, 0.3f, -0.5f});
  RouterArgs a = router_args(logits, bias, 8, 4, 2, 2);
  cpu().router(a);
  EXPECT_EQ(a.ids.data<int32_t>()[0], 2);
  EXPECT_EQ(a.ids.data<int32_t>()[1], 3);
  // weights = unbiased s = 0.5 each, normalised (0.5 / (1 + 1e-20)), times 2.5.
  EXPECT_FLOAT_EQ(a.weights.data<float>()[0], 1.25f);
  EXPECT_FLOAT_EQ(a.weights.data<float>()[1], 1.25f);
  EXPECT_FLOAT_EQ(a.scores.data<float>()[5], 0.5f);

  // Tied groups (values exact in binary): c = [.75 .625 | .5 .5 | .75 .625 | .875 .125]: sums
  // 1.375, 1.0, 1.375, 1.0 → groups 0 and 2; experts 0 and 4 tie at .75 → 0 then 4. Expert 6
  // (c = .875, the largest) is masked out with its group.
  Tensor bias2 = f32({8}, {0.25f, 0.125f, 0.0f, 0.0f, 0.25f, 0.125f, 0.375f, -0.375f});
  RouterArgs b2 = router_args(logits, bias2, 8, 4, 2, 2);
  cpu().router(b2);
  EXPECT_EQ(b2.ids.data<int32_t>()[0], 0);
  EXPECT_EQ(b2.ids.data<int32_t>()[1], 4);
  // topk_group 3: groups 0, 2, then the tie at 1.0 between groups 1 and 3 → group 1.
  RouterArgs b3 = router_args(logits, bias2, 8, 4, 3, 3);
  cpu().router(b3);
  EXPECT_EQ(b3.ids.data<int32_t>()[0], 0);
  EXPECT_EQ(b3.ids.data<int32_t>()[1], 4);
  EXPECT_EQ(b3.ids.data<int32_t>()[2], 1);  // .625 at experts 1 and 5 → 1; expert 6 stays masked
}

TEST(Router, MaskedExpertsAreExcludedEvenWhenKeptScoresAreNegative) {
  // c = [-.3 -.4 | -.45 -.49]: group sums -.7, -.94 → keep group 0 and pick expert 0. Filling the
  // masked group with 0.0 (older HF code) would pick expert 2 instead.
  Tensor logits = Tensor::zeros(DType::F32, {1, 4});
  Tensor bias = f32({4}, {-0.8f, -0.9f, -0.95f, -0.99f});
  RouterArgs a = router_args(logits, bias, 4, 2, 1, 1);
  cpu().router(a);
  EXPECT_EQ(a.ids.data<int32_t>()[0], 0);
  EXPECT_FLOAT_EQ(a.weights.data<float>()[0], 2.5f);  // normalised single pick = 1, × 2.5
}

TEST(Router, V2GroupLimitedGreedyUsesGroupMax) {
  // softmax scores ∝ exp(logits). logits [2, 0 | 1.5, 1.5 | 0, 0]: group max 2 > 1.5 > 0;
  // group sums would prefer group 1 (top-2 sum). topk_group 1, top_k 2 → experts 0 then 1.
  Tensor logits = f32({1, 6}, {2, 0, 1.5f, 1.5f, 0, 0});
  RouterArgs a = router_args(logits, Tensor(), 6, 3, 1, 2);
  a.scoring = RouterScoring::Softmax;
  a.method = RouterMethod::GroupLimitedGreedy;
  a.norm_topk_prob = false;
  a.routed_scaling_factor = 1.0f;
  cpu().router(a);
  EXPECT_EQ(a.ids.data<int32_t>()[0], 0);
  EXPECT_EQ(a.ids.data<int32_t>()[1], 1);
  double z = std::exp(2.0) + 1 + 2 * std::exp(1.5) + 2;
  EXPECT_NEAR(a.weights.data<float>()[0], std::exp(2.0) / z, 1e-7);
  EXPECT_NEAR(a.weights.data<float>()[1], 1 / z, 1e-7);
}

TEST(Linear, Fp8BlockScalesHandExample) {
  // W [2, 130] in FP8: every element 1.5 (exact in E4M3); column block 0 scaled by 2, block 1
  // (the two edge columns) by 0.25. x = ones → y = 128·1.5·2 + 2·1.5·0.25 = 384.75.
  Tensor w = Tensor::empty(DType::F32, {2, 130});
  w.fill(1.5f);
  w = w.to(DType::F8_E4M3);
  Tensor s = f32({1, 2}, {2.0f, 0.25f});
  Tensor x = Tensor::empty(DType::F32, {1, 130});
  x.fill(1.0f);
  Tensor y = Tensor::empty(DType::F32, {1, 2});
  cpu().linear({x, w, s, y, false});
  EXPECT_EQ(y.data<float>()[0], 384.75f);
  EXPECT_EQ(y.data<float>()[1], 384.75f);
  Tensor bad = f32({1, 1}, {1.0f});
  EXPECT_THROW(cpu().linear({x, w, bad, y, false}), InternalError);  // wrong scale grid
}

TEST(Linear, ZeroRowsLeaveOutputsAlone) {
  // An expert that received no tokens: x has no rows; dw is zeroed (or kept when accumulating).
  Tensor w = Tensor::zeros(DType::BF16, {4, 3}), x = Tensor::empty(DType::F32, {0, 3});
  Tensor y = Tensor::empty(DType::F32, {0, 4}), dy = Tensor::empty(DType::F32, {0, 4});
  cpu().linear({x, w, Tensor(), y, false});
  Tensor wf = Tensor::zeros(DType::F32, {4, 3}), dw = Tensor::empty(DType::F32, {4, 3});
  dw.fill(7.0f);
  cpu().linear_backward({dy, x, wf, Tensor(), Tensor(), dw, false, true});
  EXPECT_EQ(dw.data<float>()[5], 7.0f);
  cpu().linear_backward({dy, x, wf, Tensor(), Tensor(), dw, false, false});
  EXPECT_EQ(dw.data<float>()[5], 0.0f);
}

TEST(Validation, GroupedLinearRefusesBlocksThatDoNotTileTheRows) {
  Tensor x = Tensor::zeros(DType::F32, {5, 8}), y = Tensor::zeros(DType::F32, {5, 4});
  const std::vector<Tensor> w = {Tensor::zeros(DType::BF16, {4, 8}), Tensor::zeros(DType::BF16, {4, 8})};
  auto call = [&](std::vector<int64_t> off, std::span<const Tensor> ws) { cpu().grouped_linear({x, ws, {}, off, y}); };
  EXPECT_NO_THROW(call({0, 2, 5}, w));
  EXPECT_THROW(call({0, 2, 4}, w), InternalError);  // rows 4..5 in no block
  EXPECT_THROW(call({0, 3, 4, 5}, w), InternalError);  // four offsets for two blocks
  EXPECT_THROW(call({0, 3, 2}, w), InternalError);  // a block ending before it starts
  const std::vector<Tensor> mixed = {w[0], Tensor::zeros(DType::F32, {4, 8})};
  EXPECT_THROW(call({0, 2, 5}, mixed), InternalError);  // weights of two dtypes
}

// copy may overlap its source only as a move of the same dtype; a conversion in place is refused.
TEST(Validation, CopyOverlapsOnlyInTheSameDtype) {
  Tensor buf = Tensor::zeros(DType::F32, {8});
  for (int i = 0; i < 8; ++i) buf.data<float>()[i] = float(i);
  cpu().copy({buf.rows(0, 6), buf.rows(2, 8)});  // a move: memmove's result
  EXPECT_EQ(std::vector<float>(buf.data<float>(), buf.data<float>() + 8), (std::vector<float>{0, 1, 0, 1, 2, 3, 4, 5}));
  const std::shared_ptr<void> lives_in_buf(buf.raw(), [](void*) {});
  const Tensor half = Tensor::borrow(buf.raw(), DType::BF16, {8}, lives_in_buf);  // buf's first 16 bytes
  try {
    cpu().copy({buf.rows(0, 8), half});
    FAIL() << "an overlapping conversion was accepted";
  } catch (const InternalError& e) {
    EXPECT_NE(std::string(e.what()).find("overlap in memory"), std::string::npos) << e.what();
  }
  Tensor apart = Tensor::zeros(DType::BF16, {8});
  EXPECT_NO_THROW(cpu().copy({buf, apart}));
}

TEST(Validation, ErrorsNameTheOpAndShapes) {
  Tensor x = Tensor::zeros(DType::F32, {2, 3}), w = Tensor::zeros(DType::F32, {4, 5});
  Tensor y = Tensor::zeros(DType::F32, {2, 4});
  try {
    cpu().linear({x, w, Tensor(), y, false});
    FAIL() << "no error";
  } catch (const InternalError& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("linear"), std::string::npos) << m;
    EXPECT_NE(m.find("[2, 3]"), std::string::npos) << m;
    EXPECT_NE(m.find("[4, 5]"), std::string::npos) << m;
  }
  Tensor table = Tensor::zeros(DType::F32, {4, 2}), out = Tensor::zeros(DType::F32, {1, 2});
  EXPECT_THROW(cpu().embedding({i32({1}, {4}), table, out}), InputError);
  Tensor l = Tensor::zeros(DType::F32, {1, 3});
  EXPECT_THROW(cpu().cross_entropy({l, i32({1}, {3}), Tensor(), Tensor(), Tensor(), 1.0f}), InputError);
}

TEST(CrossEntropy, StableForHugeLogits) {
  Tensor l = f32({1, 3}, {1e4f, 0.0f, -1e4f}), loss = Tensor::empty(DType::F32, {1});
  cpu().cross_entropy({l, i32({1}, {1}), loss, Tensor(), Tensor(), 1.0f});
  EXPECT_NEAR(loss.data<float>()[0], 1e4, 1e-2);
}

TEST(MoeSort, CountsAndStableOrder) {
  // ids [[2, 0], [0, 1]] → expert 0: picks 1, 2; expert 1: pick 3; expert 2: pick 0.
  Tensor ids = i32({2, 2}, {2, 0, 0, 1});
  Tensor pick = Tensor::empty(DType::I32, {4}), tok = Tensor::empty(DType::I32, {4});
  Tensor counts = Tensor::empty(DType::I32, {3});
  cpu().moe_sort({ids, 3, pick, tok, counts});
  std::vector<int32_t> p(pick.data<int32_t>(), pick.data<int32_t>() + 4), t(tok.data<int32_t>(), tok.data<int32_t>() + 4);
  std::vector<int32_t> c(counts.data<int32_t>(), counts.data<int32_t>() + 3);
  EXPECT_EQ(p, (std::vector<int32_t>{1, 2, 3, 0}));
  EXPECT_EQ(t, (std::vector<int32_t>{0, 1, 1, 0}));
  EXPECT_EQ(c, (std::vector<int32_t>{2, 1, 1}));
}

}  // namespace
}  // namespace dsv3::test
