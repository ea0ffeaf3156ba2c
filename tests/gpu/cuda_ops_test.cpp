// The generic backend harness on the GPU: every op case of tests/backend (compiled into this binary
// from their sources by the backend_*_cases_test.cpp files here) runs on the CPU and on CUDA
// and is compared against the double reference and the CPU's output, with guard and NaN/Inf checks; plus cases at DeepSeek-V3's real dimensions
// (MLA heads qk 192 / v 128, absorbed 576/512 latent heads, 256 experts top-8 in 8 groups top-4,
// a 129,280-token vocabulary, hidden 7168). This binary (label `gpu`) needs a CUDA device: it fails,
// rather than skips, without one, and scripts/test.sh leaves it out of the CPU-only CI run.
#include "../backend/backend_ops_test.cpp"
#include "../backend/reference.h"
#include "backend/cuda/cuda_backend.h"

namespace dsv3::test {
namespace {

const bool cuda_registered = [] {
  if (cuda_device_count() > 0) registered_backends().push_back(&cuda_backend());
  return true;
}();

TEST(CudaDevice, IsPresentAndRegistered) {
  ASSERT_GT(cuda_device_count(), 0) << "no CUDA device: this binary must run on the GPU machine";
  ASSERT_TRUE(cuda_registered);
  EXPECT_EQ(test_backends().back()->device(), Device::CUDA);
}

// The caching allocator's counters (cuda_memory_stats): a tensor adds its block (the request
// rounded up to 512 bytes, or a cached block of at most twice that) to the bytes in use and to the
// peak; freeing it takes the block off the bytes in use but not off the peak until a reset; what
// the allocator holds from cudaMalloc covers what it hands out.
TEST(CudaDevice, AllocatorCountsItsBytes) {
  ASSERT_GT(cuda_device_count(), 0);
  const int64_t n = (int64_t(3) << 18) + 25;  // F32 elements: 3 MiB + 100 bytes
  const size_t rounded = (size_t(n) * 4 + 511) & ~size_t(511);
  cuda_reset_peak_memory();
  const CudaMemoryStats s0 = cuda_memory_stats();
  EXPECT_EQ(s0.peak, s0.in_use);
  size_t block = 0;
  {
    const Tensor t = cuda_backend().alloc(DType::F32, {n});
    const CudaMemoryStats s1 = cuda_memory_stats();
    block = s1.in_use - s0.in_use;
    EXPECT_GE(block, rounded);
    EXPECT_LE(block, 2 * rounded);
    EXPECT_EQ(s1.peak, s1.in_use);
    EXPECT_GE(s1.reserved, s1.in_use);
  }
  const CudaMemoryStats s2 = cuda_memory_stats();
  EXPECT_EQ(s2.in_use, s0.in_use);
  EXPECT_EQ(s2.peak, s0.in_use + block);
  cuda_reset_peak_memory();
  EXPECT_EQ(cuda_memory_stats().peak, s0.in_use);
}

Tensor dev(Backend& b, const Tensor& h) { return b.to_device(h); }

OP_CASE(v3_attention_mla_heads_causal) {
  int64_t t = 300, h = 4, dq = 192, dv = 128;
  Tensor q = randn({t, h, dq}, seed, 1), k = randn({t, h, dq}, seed, 2), v = randn({t, h, dv}, seed, 3);
  Tensor out = g.out(DType::F32, {t, h, dv}), lse = g.out(DType::F32, {h, t});
  float scale = float(1 / std::sqrt(192.0));
  b.attention({dev(b, q), dev(b, k), dev(b, v), out, lse, scale, true, 0, {}, {}});
  ref::AttnOut r = ref::attention(to_vec(q), to_vec(k), to_vec(v), 1, t, t, h, dq, dv, scale, true, 0);
  return {{"out", b.to_host(out), r.out, tol::kF32}, {"lse", b.to_host(lse), r.lse, tol::kF32}};
}

// Absorbed-MLA decode shape: 16 heads of 576 (latent + rope) attending to a 520-token cache, values
// of 512 (the latent itself).
OP_CASE(v3_attention_absorbed_latent_heads) {
  int64_t bs = 2, t = 1, s = 520, h = 16, dq = 576, dv = 512;
  Tensor q = randn({bs, t, h, dq}, seed, 1, 0.2f), k = randn({bs, s, h, dq}, seed, 2, 0.2f);
  Tensor v = randn({bs, s, h, dv}, seed, 3);
  Tensor out = g.out(DType::F32, {bs, t, h, dv}), lse = g.out(DType::F32, {bs, h, t});
  float scale = float(1 / std::sqrt(192.0));
  b.attention({dev(b, q), dev(b, k), dev(b, v), out, lse, scale, true, s - 1, {}, {}});
  ref::AttnOut r = ref::attention(to_vec(q), to_vec(k), to_vec(v), bs, t, s, h, dq, dv, scale, true, s - 1);
  return {{"out", b.to_host(out), r.out, tol::kF32}, {"lse", b.to_host(lse), r.lse, tol::kF32}};
}

OP_CASE(v3_attention_backward_mla_heads) {
  int64_t bs = 2, t = 150, s = 170, h = 3, dq = 192, dv = 128, off = 20;
  Tensor q = randn({bs, t, h, dq}, seed, 1), k = randn({bs, s, h, dq}, seed, 2), v = randn({bs, s, h, dv}, seed, 3);
  Tensor dout = randn({bs, t, h, dv}, seed, 4);
  float scale = float(1 / std::sqrt(192.0));
  auto run = [&](Backend& be, Tensor dq_, Tensor dk, Tensor dvv) {
    Tensor qd = dev(be, q), kd = dev(be, k), vd = dev(be, v);
    Tensor out = be.alloc(DType::F32, {bs, t, h, dv}), lse = be.alloc(DType::F32, {bs, h, t});
    be.attention({qd, kd, vd, out, lse, scale, true, off, {}, {}});
    be.attention_backward({qd, kd, vd, out, lse, dev(be, dout), dq_, dk, dvv, scale, true, off, {}, {}, {}, {}});
  };
  Tensor dq_ = g.out(DType::F32, {bs, t, h, dq}), dk = g.out(DType::F32, {bs, s, h, dq});
  Tensor dvv = g.out(DType::F32, {bs, s, h, dv});
  run(b, dq_, dk, dvv);
  // The CPU backend is the reference here: finite differences at this size would take minutes
  // (its backward is checked against finite differences by the small case above).
  Backend& c = cpu_backend();
  Tensor cq = c.alloc(DType::F32, {bs, t, h, dq}), ck = c.alloc(DType::F32, {bs, s, h, dq});
  Tensor cv = c.alloc(DType::F32, {bs, s, h, dv});
  run(c, cq, ck, cv);
  return {{"dq", b.to_host(dq_), to_vec(cq), tol::kF32Grad},
          {"dk", b.to_host(dk), to_vec(ck), tol::kF32Grad},
          {"dv", b.to_host(dvv), to_vec(cv), tol::kF32Grad}};
}

// FP8 weights with 128×128 block scales, each a different power-of-two-free value (as a checkpoint's).
Tensor fp8_scales(int64_t n, int64_t k, uint64_t salt) {
  Tensor s = Tensor::empty(DType::F32, {(n + 127) / 128, (k + 127) / 128});
  for (int64_t i = 0; i < s.numel(); ++i) s.data<float>()[i] = 0.003f + 0.0007f * float((i * 7 + int64_t(salt)) % 13);
  return s;
}

// linear with an FP8 weight at V3's block grid (grouped_linear.cu's two BF16 terms per weight, taken
// from 256 rows): K over two of the matmul's 2,048-column slices, the last scale block 64 columns
// wide, accumulating.
OP_CASE(v3_linear_fp8_long_k_accumulate) {
  const int64_t m = 300, n = 260, k = 4160;
  Tensor x = randn({m, k}, seed, 1);
  Tensor w = randn({n, k}, seed, 2, 0.5f).to(DType::F8_E4M3), sinv = fp8_scales(n, k, 1);
  Tensor y0 = randn({m, n}, seed, 3, 0.05f);  // below |x·Wᵀ|, so the products' error shows
  Tensor y = g.init(y0);
  b.linear({dev(b, x), dev(b, w), dev(b, sinv), y, true});
  Vec want = ref::linear(to_vec(x), ref::dequant_fp8(w, sinv), m, n, k);
  for (size_t i = 0; i < want.size(); ++i) want[i] += double(y0.data<float>()[i]);
  return {{"y", b.to_host(y), want, tol::kF32}};
}

// grouped_linear with FP8 weights in runs of one block (the terms' budget at one byte; blocks
// without rows between them), accumulating, and again in one run (each weight's terms in a slot).
OP_CASE(grouped_linear_fp8_runs_accumulate) {
  const std::vector<int64_t> off = {0, 0, 40, 40, 41, 300, 300};
  const int64_t m = off.back(), n = 132, k = 392;
  Tensor x = randn({m, k}, seed, 1);
  std::vector<Tensor> w, wd, sd;
  std::vector<Vec> wref;
  for (size_t e = 0; e + 1 < off.size(); ++e) {
    Tensor sinv = fp8_scales(n, k, e);
    w.push_back(randn({n, k}, seed, 10 + e, 0.5f).to(DType::F8_E4M3));
    wref.push_back(ref::dequant_fp8(w.back(), sinv));
    wd.push_back(dev(b, w.back()));
    sd.push_back(dev(b, sinv));
  }
  Tensor y0 = randn({m, n}, seed, 3, 0.05f);
  Vec want(size_t(m * n));
  const Vec xv = to_vec(x);
  for (size_t e = 0; e + 1 < off.size(); ++e) {
    const int64_t r0 = off[e], rows = off[e + 1] - r0;
    const Vec part = ref::linear(Vec(xv.begin() + r0 * k, xv.begin() + (r0 + rows) * k), wref[e], rows, n, k);
    for (size_t i = 0; i < part.size(); ++i) want[size_t(r0 * n) + i] = part[i] + double(y0.data<float>()[r0 * n + i]);
  }
  std::vector<Output> outs;
  for (size_t budget : {size_t(1), size_t(256) << 20}) {
    cuda_set_fp8_terms_budget(budget);
    Tensor y = g.init(y0);
    b.grouped_linear({dev(b, x), wd, sd, off, y, true});
    outs.push_back({budget == 1 ? "y (runs of one block)" : "y (one run)", b.to_host(y), want, tol::kF32});
  }
  return outs;
}

// The router op on x (routed_scaling_factor 2.5, norm_topk_prob on), inputs copied to x's device.
void run_router(Backend& x, const Tensor& logits, const Tensor* bias, RouterScoring sc, RouterMethod m, int ng, int tg,
                int k, const Tensor& scores, const Tensor& ids, const Tensor& w) {
  RouterArgs a;
  a.logits = dev(x, logits);
  if (bias) a.bias = dev(x, *bias);
  a.scoring = sc;
  a.method = m;
  a.n_group = ng;
  a.topk_group = tg;
  a.top_k = k;
  a.routed_scaling_factor = 2.5f;
  a.scores = scores;
  a.ids = ids;
  a.weights = w;
  x.router(a);
}

OP_CASE(v3_router_256_experts_8_groups) {
  int64_t t = 64, e = 256;
  int ng = 8, tg = 4, k = 8;
  Tensor logits = randn({t, e}, seed, 1, 2.0f), bias = randn({e}, seed, 2, 0.3f);
  Tensor scores = g.out(DType::F32, {t, e}), ids = g.out(DType::I32, {t, k}), w = g.out(DType::F32, {t, k});
  run_router(b, logits, &bias, RouterScoring::Sigmoid, RouterMethod::NoauxTc, ng, tg, k, scores, ids, w);
  Vec bv = to_vec(bias);
  ref::RouterOut r = ref::router(to_vec(logits), t, e, &bv, RouterScoring::Sigmoid, RouterMethod::NoauxTc, ng, tg, k,
                                 true, 2.5);
  return {{"ids", b.to_host(ids), Vec(r.ids.begin(), r.ids.end()), 0.0},
          {"weights", b.to_host(w), r.weights, tol::kF32},
          {"scores", b.to_host(scores), r.scores, tol::kF32}};
}

// The router against the CPU backend on logits (and biases) rounded to a coarse grid, so that many
// scores and group scores tie: the picks must be the CPU's (ties to the lower index), the weights
// and scores within kF32. The grid is offset by a quarter step, so no two logits are opposite
// (σ(x) + σ(−x) = 1 would tie group sums only up to each backend's rounding of exp). Shapes for
// several widths of the warp-per-token kernel, and the serial kernel beyond 1024 experts.
std::vector<Output> router_ties(Backend& b, Guards& g, uint64_t seed, int64_t t, int64_t e, RouterScoring sc,
                                RouterMethod m, int ng, int tg, int k, bool bias, float step) {
  Tensor logits = randn({t, e}, seed, 1, 2.0f), bt = randn({e}, seed, 2, 0.3f);
  if (step > 0) {
    for (int64_t i = 0; i < logits.numel(); ++i)
      logits.data<float>()[i] = (std::round(logits.data<float>()[i] / step) + 0.25f) * step;
    for (int64_t i = 0; i < e; ++i) bt.data<float>()[i] = std::round(bt.data<float>()[i] / step) * step / 2;
  }
  auto run = [&](Backend& x, const Tensor& scores, const Tensor& ids, const Tensor& w) {
    run_router(x, logits, bias ? &bt : nullptr, sc, m, ng, tg, k, scores, ids, w);
  };
  Tensor scores = g.out(DType::F32, {t, e}), ids = g.out(DType::I32, {t, k}), w = g.out(DType::F32, {t, k});
  run(b, scores, ids, w);
  Backend& c = cpu_backend();
  Tensor cs = c.alloc(DType::F32, {t, e}), ci = c.alloc(DType::I32, {t, k}), cw = c.alloc(DType::F32, {t, k});
  run(c, cs, ci, cw);
  Vec want_ids(ci.data<int32_t>(), ci.data<int32_t>() + t * k);
  return {{"ids", b.to_host(ids), want_ids, 0.0},
          {"weights", b.to_host(w), to_vec(cw), tol::kF32},
          {"scores", b.to_host(scores), to_vec(cs), tol::kF32}};
}

OP_CASE(router_bench07b_ties) {  // 32 experts, 4 groups top-2, top-4
  return router_ties(b, g, seed, 40, 32, RouterScoring::Sigmoid, RouterMethod::NoauxTc, 4, 2, 4, true, 0.5f);
}
OP_CASE(router_v3_ties) {
  return router_ties(b, g, seed, 33, 256, RouterScoring::Sigmoid, RouterMethod::NoauxTc, 8, 4, 8, true, 0.5f);
}
OP_CASE(router_v2_softmax_160_ties) {  // DeepSeek-V2: 160 experts, 8 groups of 20
  return router_ties(b, g, seed, 9, 160, RouterScoring::Softmax, RouterMethod::GroupLimitedGreedy, 8, 3, 6, false,
                     0.5f);
}
OP_CASE(router_64_groups_of_8) {
  return router_ties(b, g, seed, 5, 512, RouterScoring::Sigmoid, RouterMethod::NoauxTc, 64, 6, 12, true, 1.0f);
}
OP_CASE(router_greedy_1536_serial) {
  return router_ties(b, g, seed, 3, 1536, RouterScoring::Sigmoid, RouterMethod::Greedy, 1, 1, 8, true, 0.0f);
}

OP_CASE(v3_moe_sort_gather_scatter_7168) {
  int64_t t = 40, k = 8, e = 256, d = 7168;
  Tensor ids = randi({t, k}, seed, 1, 0, int32_t(e));
  Tensor pick = g.out(DType::I32, {t * k}), token = g.out(DType::I32, {t * k}), counts = g.out(DType::I32, {e});
  b.moe_sort({dev(b, ids), e, pick, token, counts});
  std::vector<int32_t> iv(ids.data<int32_t>(), ids.data<int32_t>() + t * k);
  Vec wp, wt, wc(size_t(e), 0.0);
  for (int32_t ex = 0; ex < e; ++ex)
    for (int64_t i = 0; i < t * k; ++i)
      if (iv[size_t(i)] == ex) {
        wp.push_back(double(i));
        wt.push_back(double(i / k));
        wc[size_t(ex)] += 1;
      }
  // Move rows to expert order and back with weights: out[t] = Σ w·x[t] over the token's picks.
  Tensor x = randn({t, d}, seed, 2), w = randn({t * k}, seed, 3);
  Tensor xs = b.alloc(DType::F32, {t * k, d});
  b.gather_rows({dev(b, x), token, Tensor(), xs, false});
  Tensor out = g.out(DType::F32, {t, d});
  b.fill({out, 0.0f});
  b.scatter_add_rows({xs, token, dev(b, w), out});
  Vec xv = to_vec(x), wv = to_vec(w), want(size_t(t * d), 0.0);
  for (size_t r = 0; r < wp.size(); ++r) {
    int64_t tok = int64_t(wt[r]);
    for (int64_t j = 0; j < d; ++j) want[size_t(tok * d + j)] += wv[r] * xv[size_t(tok * d + j)];
  }
  return {{"pick", b.to_host(pick), wp, 0.0},
          {"token", b.to_host(token), wt, 0.0},
          {"counts", b.to_host(counts), wc, 0.0},
          {"combined", b.to_host(out), want, tol::kF32}};
}

OP_CASE(v3_cross_entropy_vocab_129280) {
  int64_t t = 3, v = 129280;
  Tensor l = randn({t, v}, seed, 1, 3.0f), tg = randi({t}, seed, 2, 0, int32_t(v));
  Tensor loss = g.out(DType::F32, {t}), sum = g.out(DType::F32, {1});
  b.cross_entropy({dev(b, l), dev(b, tg), loss, sum, Tensor(), 1.0f});
  std::vector<int32_t> tv(tg.data<int32_t>(), tg.data<int32_t>() + t);
  Vec want = ref::cross_entropy(to_vec(l), tv, t, v);
  double s = 0;
  for (double x : want) s += x;
  return {{"loss", b.to_host(loss), want, tol::kF32}, {"loss_sum", b.to_host(sum), Vec{s}, tol::kF32}};
}

OP_CASE(v3_rmsnorm_7168_1536_and_latent_512) {  // hidden, q_lora_rank, kv_lora_rank
  std::vector<Output> outs;
  for (int64_t d : {int64_t(7168), int64_t(1536), int64_t(512)}) {
    int64_t m = 33;
    Tensor x = randn({m, d}, seed, uint64_t(d)), w = randn({d}, seed, uint64_t(d) + 1, 1.0f, DType::BF16);
    Tensor y = g.out(DType::F32, {m, d}), rstd = g.out(DType::F32, {m});
    b.rmsnorm({dev(b, x), dev(b, w), 1e-6f, y, rstd});
    outs.push_back({cat("y", d), b.to_host(y), ref::rmsnorm(to_vec(x), to_vec(w), m, d, 1e-6), tol::kF32});
  }
  return outs;
}

OP_CASE(v3_linear_bf16_kv_a_proj) {
  // kv_a_proj_with_mqa: 7168 → 576, a handful of tokens.
  int64_t m = 6, n = 576, k = 7168;
  Tensor x = randn({m, k}, seed, 1), w = randn({n, k}, seed, 2, 0.02f, DType::BF16);
  Tensor y = g.out(DType::F32, {m, n});
  b.linear({dev(b, x), dev(b, w), Tensor(), y, false});
  return {{"y", b.to_host(y), ref::linear(to_vec(x), to_vec(w), m, n, k), tol::kF32}};
}

}  // namespace
}  // namespace dsv3::test
