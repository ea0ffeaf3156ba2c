// Absorbed MLA over the paged latent cache against the golden fixtures (transformers, float64):
// prefill + step-by-step decode must give the reference logits at every position (≤ 1e-4 relative,
// max|Δ|/max|ref|, the forward tolerance of docs/), for every fixture; MTP modules too.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <tuple>

#include "infer/runner.h"
#include "infer_test_util.h"

namespace dsv3 {
namespace {

using testing::Expected;
using testing::rel_err;

constexpr double kTol = 1e-4;

struct Rig {
  Weights w;
  ModelRunner runner;
  LatentKvPool pool;
  BlockTable table;
  LatentAttention cache;
  // small_rows: steps up to this many rows take the runner's lean path (0: the general path only).
  explicit Rig(const std::string& fixture, DType cache_dtype = DType::F32, int64_t block = 4, int64_t small_rows = 8)
      : w(Weights::load(testing::fixture_dir(fixture))),
        runner(w),
        pool(w.config().num_layers_total(), w.config().kv_lora_rank, w.config().qk_rope_head_dim,
             KvCacheOptions{block, uint64_t(1) << 22, cache_dtype}),
        cache(pool, runner.absorbed(), runner.dims()) {
    cache.tables = {&table};
    runner.set_small_rows(small_rows);
  }
  // Feed ids[p0, p1) as one chunk; returns logits of every row [p1 − p0, V] and the hidden rows.
  ModelRunner::Output feed(const std::vector<int32_t>& ids, int64_t p0, int64_t p1) {
    EXPECT_TRUE(pool.reserve(table, p1));
    StepRows rows;
    std::vector<int32_t> toks, lr;
    for (int64_t p = p0; p < p1; ++p) {
      rows.seq.push_back(0);
      rows.pos.push_back(p);
      toks.push_back(ids[size_t(p)]);
      lr.push_back(int32_t(p - p0));
    }
    auto o = runner.forward(cache, rows, toks, lr);
    table.length = p1;
    return o;
  }
};

// Logits of every position from chunks of `chunk` tokens (chunk 1 = token-by-token decode after a
// prefill of `prefill` tokens).
std::vector<float> run_chunks(Rig& r, const std::vector<int32_t>& ids, int64_t prefill, int64_t chunk,
                              std::vector<float>* hidden = nullptr) {
  const int64_t T = int64_t(ids.size()), V = r.w.config().vocab_size, H = r.w.config().hidden_size;
  std::vector<float> all(size_t(T * V));
  if (hidden) hidden->assign(size_t(T * H), 0.0f);
  for (int64_t p0 = 0; p0 < T;) {
    const int64_t p1 = std::min(T, p0 == 0 ? prefill : p0 + chunk);
    auto o = r.feed(ids, p0, p1);
    std::copy(o.logits.data<float>(), o.logits.data<float>() + (p1 - p0) * V, all.begin() + p0 * V);
    if (hidden) std::copy(o.hidden.data<float>(), o.hidden.data<float>() + (p1 - p0) * H, hidden->begin() + p0 * H);
    p0 = p1;
  }
  return all;
}

class AbsorbedFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(AbsorbedFixture, PrefillThenDecodeMatchesReferenceAtEveryPosition) {
  const Expected e = testing::load_expected(GetParam());
  Rig r(GetParam());
  const int64_t T = int64_t(e.ids.size()), V = r.w.config().vocab_size;
  const std::vector<float> got = run_chunks(r, e.ids, 5, 1);
  const Tensor ref = e.row_major("logits");
  double worst = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    const double err = rel_err(got.data() + t * V, ref.data<float>() + t * V, V);
    worst = std::max(worst, err);
    EXPECT_LE(err, kTol) << GetParam() << " position " << t;
  }
  std::printf("[absorbed] %-26s prefill 5 + decode: max rel err %.3g over %lld positions\n", GetParam().c_str(),
              worst, (long long)T);
}

// One-shot through the general path (backend ops), chunks of 3 through the lean path.
TEST_P(AbsorbedFixture, ChunkedPrefillEqualsOneShot) {
  const Expected e = testing::load_expected(GetParam());
  Rig one(GetParam(), DType::F32, 4, 0), chunked(GetParam());
  const int64_t T = int64_t(e.ids.size()), V = one.w.config().vocab_size;
  const std::vector<float> a = run_chunks(one, e.ids, T, T);
  const std::vector<float> b = run_chunks(chunked, e.ids, 3, 3);
  const Tensor ref = e.row_major("logits");
  for (int64_t t = 0; t < T; ++t) {
    EXPECT_LE(rel_err(a.data() + t * V, ref.data<float>() + t * V, V), kTol) << "one-shot, position " << t;
    // Same math, different row grouping of the GEMMs: F32 rounding only.
    EXPECT_LE(rel_err(b.data() + t * V, a.data() + t * V, V), 1e-5) << "chunked vs one-shot, position " << t;
  }
}

// The lean path (runner_small.cpp) against the general one on the same steps: a prefill of 5, then
// steps of 1, 2 and 3 rows (decode and verification shapes); logits and hidden states.
TEST_P(AbsorbedFixture, LeanPathEqualsGeneralPath) {
  const Expected e = testing::load_expected(GetParam());
  Rig lean(GetParam()), general(GetParam(), DType::F32, 4, 0);
  const int64_t T = int64_t(e.ids.size()), V = lean.w.config().vocab_size, H = lean.w.config().hidden_size;
  ASSERT_GE(T, 11);
  int64_t p0 = 0;
  for (int64_t n : {int64_t(5), int64_t(1), int64_t(2), int64_t(3)}) {
    auto a = lean.feed(e.ids, p0, p0 + n);
    auto b = general.feed(e.ids, p0, p0 + n);
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_LE(rel_err(a.logits.data<float>() + i * V, b.logits.data<float>() + i * V, V), 1e-5)
          << "logits, step of " << n << " rows, position " << p0 + i;
      EXPECT_LE(rel_err(a.hidden.data<float>() + i * H, b.hidden.data<float>() + i * H, H), 1e-5)
          << "hidden, step of " << n << " rows, position " << p0 + i;
    }
    p0 += n;
  }
}

TEST_P(AbsorbedFixture, PlainPerHeadCacheMatchesReference) {
  const Expected e = testing::load_expected(GetParam());
  Weights w = Weights::load(testing::fixture_dir(GetParam()));
  ModelRunner runner(w);
  PlainAttention plain(cpu_backend(), runner.dims(), w.config().num_layers_total());
  PlainSeqCache seq;
  plain.seqs = {&seq};
  const int64_t T = int64_t(e.ids.size()), V = w.config().vocab_size;
  const Tensor ref = e.row_major("logits");
  for (int64_t p0 = 0; p0 < T;) {
    const int64_t p1 = p0 == 0 ? 4 : p0 + 1;
    StepRows rows;
    std::vector<int32_t> toks, lr;
    for (int64_t p = p0; p < p1; ++p) {
      rows.seq.push_back(0);
      rows.pos.push_back(p);
      toks.push_back(e.ids[size_t(p)]);
      lr.push_back(int32_t(p - p0));
    }
    auto o = runner.forward(plain, rows, toks, lr);
    for (int64_t p = p0; p < p1; ++p)
      EXPECT_LE(rel_err(o.logits.data<float>() + (p - p0) * V, ref.data<float>() + p * V, V), kTol) << "position " << p;
    p0 = p1;
  }
}

TEST_P(AbsorbedFixture, Bf16CacheStaysClose) {
  // BF16 storage rounds each cached value to 8 significant bits (relative 2^-9); through the
  // softmax and the layers that gives logit errors of order 1e-3..1e-2 relative on these tiny
  // random models, so this checks the mode works (3e-2), not parity.
  const Expected e = testing::load_expected(GetParam());
  Rig r(GetParam(), DType::BF16, 8);
  const int64_t T = int64_t(e.ids.size()), V = r.w.config().vocab_size;
  const std::vector<float> got = run_chunks(r, e.ids, 6, 1);
  const Tensor ref = e.row_major("logits");
  for (int64_t t = 0; t < T; ++t) EXPECT_LE(rel_err(got.data() + t * V, ref.data<float>() + t * V, V), 3e-2);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, AbsorbedFixture, ::testing::ValuesIn(testing::all_fixtures()),
                         [](const auto& i) { return i.param; });

class MtpFixture : public ::testing::TestWithParam<std::string> {};

// Module k at positions 0..T−k−1 over its own latent cache layer, chained from h⁰ (model.norm output).
TEST_P(MtpFixture, ModulesMatchReferenceThroughTheLatentCache) {
  for (int64_t small_rows : {int64_t(16), int64_t(0)}) {  // lean path, general path
    const Expected e = testing::load_expected(GetParam());
    Rig r(GetParam(), DType::F32, 4, small_rows);
    const ModelConfig& c = r.w.config();
    const int64_t T = int64_t(e.ids.size()), V = c.vocab_size, H = c.hidden_size;
    std::vector<float> h;
    run_chunks(r, e.ids, T, T, &h);
    for (int k = 1; k <= int(c.num_nextn_predict_layers); ++k) {
      const int64_t S = T - k;
      StepRows rows;
      std::vector<int32_t> toks, lr;
      for (int64_t i = 0; i < S; ++i) {
        rows.seq.push_back(0);
        rows.pos.push_back(i);
        toks.push_back(e.ids[size_t(i + k)]);
        lr.push_back(int32_t(i));
      }
      Tensor hp = Tensor::empty(DType::F32, {S, H});
      std::copy(h.begin(), h.begin() + S * H, hp.data<float>());
      auto o = r.runner.mtp_forward(k, r.cache, rows, toks, hp, lr);
      const Tensor ref = e.row_major(cat("mtp_logits_", k));
      double worst = 0.0;
      for (int64_t i = 0; i < S; ++i) {
        const double err = rel_err(o.logits.data<float>() + i * V, ref.data<float>() + i * V, V);
        worst = std::max(worst, err);
        EXPECT_LE(err, kTol) << "module " << k << " position " << i;
      }
      std::printf("[absorbed] %-26s MTP module %d (%s path): max rel err %.3g\n", GetParam().c_str(), k,
                  small_rows ? "lean" : "general", worst);
      h.assign(o.hidden.data<float>(), o.hidden.data<float>() + S * H);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, MtpFixture, ::testing::ValuesIn(testing::mtp_fixtures()),
                         [](const auto& i) { return i.param; });

// An FP8 kv_b_proj on the 128 grid (nope 256: two row blocks per head's W_UK) keeps its blocks for
// the GEMV when asked: W_UKᵀ and W_UV as FP8 with their scales stand for exactly the dequantized
// split's values (the bytes moved, not re-quantized); sizes off the 128 grid keep no FP8 copy.
TEST(SplitKvB, Fp8BlocksStandForTheDequantizedSplit) {
  ModelDims d;
  d.nh = 3;
  d.nope = 256;
  d.vd = 128;
  d.kv_lora = 256;
  Tensor w = Tensor::empty(DType::F32, {d.nh * (d.nope + d.vd), d.kv_lora});
  for (int64_t i = 0; i < w.numel(); ++i)  // blocks of different magnitudes: distinct scales
    w.data<float>()[i] = std::ldexp(std::sin(0.37 * double(i)), int((i / d.kv_lora / 128 + i % d.kv_lora / 128) % 5));
  LinearParam kv_b;
  std::tie(kv_b.w, kv_b.scale_inv) = quantize_fp8_blocks(w);
  EXPECT_FALSE(present(split_kv_b(kv_b, d).uk_t_fp8.w)) << "kept only when asked";
  const AbsorbedKvB a = split_kv_b(kv_b, d, true);
  ASSERT_TRUE(present(a.uk_t_fp8.w) && present(a.uv_fp8.w));
  const Tensor uk_t = dequantize_fp8_blocks(a.uk_t_fp8.w, a.uk_t_fp8.scale_inv);
  const Tensor uv = dequantize_fp8_blocks(a.uv_fp8.w, a.uv_fp8.scale_inv);
  ASSERT_EQ(uk_t.numel(), a.w_uk.numel());
  ASSERT_EQ(uv.numel(), a.w_uv.numel());
  const int64_t R = d.kv_lora;
  for (int64_t h = 0; h < d.nh; ++h)
    for (int64_t k = 0; k < d.nope; ++k)
      for (int64_t i = 0; i < R; ++i)
        ASSERT_EQ(uk_t.data<float>()[(h * R + i) * d.nope + k], a.w_uk.data<float>()[(h * d.nope + k) * R + i])
            << "head " << h << " row " << k << " column " << i;
  for (int64_t i = 0; i < uv.numel(); ++i) ASSERT_EQ(uv.data<float>()[i], a.w_uv.data<float>()[i]) << i;
  d.nope = 96;  // heads no longer on the 128-row grid
  LinearParam off;
  std::tie(off.w, off.scale_inv) = quantize_fp8_blocks(w.rows(0, d.nh * (d.nope + d.vd)));
  const AbsorbedKvB b = split_kv_b(off, d, true);
  EXPECT_FALSE(present(b.uk_t_fp8.w));
  EXPECT_FALSE(present(b.uv_fp8.w));
}

}  // namespace
}  // namespace dsv3
