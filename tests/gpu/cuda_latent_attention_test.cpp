// The generic kernel of CudaLatentAttention (every width but V3's 512 + 64 on 64-token blocks, which
// cuda_mla_decode serves) against the host LatentAttention over a BF16 pool, under kBf16, in each
// way the launch can split a row's positions: one CTA per row and head group (many rows), a cluster
// of up to 8 splits merged through distributed shared memory (few rows, up to 16 tiles of 32
// positions; with uneven and empty splits), and partials merged by a second kernel (few rows, long
// contexts). Also: a second head group that is partly empty, rows without 16-byte loads. Each shape
// runs on the FP32 path and, where its widths allow (kv_lora_rank ≤ 256 and a multiple of 8, rows of
// ≤ 320 values and a multiple of 16), on the tensor-core path; a launch count shows which ran. Large
// prefills on the tensor-core path take the prefill kernel (groups of consecutive query rows per
// CTA), compared with the row kernel too.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>

#include "attention_dims.h"
#include "../backend/harness.h"
#include "backend/cuda/cuda_backend.h"
#include "infer/cuda_latent_attention.h"
#include "infer/kv_cache.h"

namespace dsv3::test {
namespace {

// Host and device attention over the same random absorbed weights and the same block tables,
// reserved one block at a time, round robin: every sequence owns scattered blocks.
struct Pair {
  std::unique_ptr<LatentKvPool> hp, dp;
  std::unique_ptr<LatentAttention> host;
  std::unique_ptr<CudaLatentAttention> dev;
  std::vector<AbsorbedKvB> wh, wd;  // the attention objects keep references to these
  std::vector<BlockTable> th, td;
  Pair(const ModelDims& d, int64_t bs, const std::vector<int64_t>& lens) : th(lens.size()), td(lens.size()) {
    CudaBackend& be = cuda_backend();
    const int64_t layers = 1;
    int64_t blocks = 0;
    for (int64_t l : lens) blocks += (l + 2 + bs - 1) / bs + 1;
    KvCacheOptions o;
    o.block_size = bs;
    o.dtype = DType::BF16;
    o.budget_bytes = uint64_t(d.kv_lora + d.rope) * uint64_t(layers) * 2 * uint64_t(bs) * uint64_t(blocks);
    hp = std::make_unique<LatentKvPool>(layers, d.kv_lora, d.rope, o);
    o.host_storage = false;
    dp = std::make_unique<LatentKvPool>(layers, d.kv_lora, d.rope, o);
    AbsorbedKvB a;
    a.w_uk = randn({d.nh, d.nope, d.kv_lora}, 21, 0, float(1.0 / std::sqrt(double(d.nope))));
    a.w_uv = randn({d.nh, d.vd, d.kv_lora}, 21, 1, 0.05f);
    wh = {a};
    wd = {{be.to_device(a.w_uk), be.to_device(a.w_uv), {}, {}}};
    host = std::make_unique<LatentAttention>(*hp, wh, d);
    dev = std::make_unique<CudaLatentAttention>(*dp, wd, d);
    dev->set_use_mla_decode(false);
    const int64_t most = *std::max_element(lens.begin(), lens.end()) + 2;
    for (int64_t upto = 1; (upto - 1) * bs < most; ++upto)
      for (size_t s = 0; s < lens.size(); ++s) {
        const int64_t want = std::min(lens[s] + 2, upto * bs);
        if (!hp->reserve(th[s], want) || !dp->reserve(td[s], want)) throw std::runtime_error("pool too small");
      }
    for (size_t s = 0; s < lens.size(); ++s) {
      host->tables.push_back(&th[s]);
      dev->tables.push_back(&td[s]);
    }
  }
};

// Every sequence's prompt as the rows of one step.
StepRows prefill_rows(const std::vector<int64_t>& lens) {
  StepRows pre;
  for (size_t s = 0; s < lens.size(); ++s)
    for (int64_t p = 0; p < lens[s]; ++p) {
      pre.seq.push_back(int32_t(s));
      pre.pos.push_back(p);
    }
  return pre;
}

// Prefill of every sequence in one step, then two decode steps (one row per sequence). With
// vs_fp32 (the tensor-core path on), each step runs again on the FP32 path, over the same pool, and
// the two must agree within kF32: the tensor cores' operands keep q and P to 2⁻¹⁶ (two BF16 terms
// each), where BF16 operands alone (2⁻⁹) would differ by ~1e-3; worst_vs_fp32 gets the largest.
// A prefill of more rows than the absorbed GEMV's takes the prefill kernel on the tensor-core path
// (cuda_latent_prefill.h); the row kernel's tensor-core path runs it again there, and must agree
// within kF32 too.
void against_host_once(const ModelDims& d, int64_t bs, const std::vector<int64_t>& lens, bool vs_fp32,
                       double& worst_vs_fp32) {
  CudaBackend& be = cuda_backend();
  const int64_t S = int64_t(lens.size());
  Pair pair(d, bs, lens);
  LatentAttention& host = *pair.host;
  CudaLatentAttention& dev = *pair.dev;
  MlaParams unused;
  worst_vs_fp32 = 0;
  auto step = [&](const StepRows& rows, uint64_t seed) {
    const int64_t N = rows.size();
    SCOPED_TRACE(cat(N, " rows"));
    const Tensor q = randn({N, d.nh, d.qk}, seed, 0), c = randn({N, d.kv_lora}, seed, 1);
    const Tensor k = randn({N, d.rope}, seed, 2);
    Tensor out_h = Tensor::empty(DType::F32, {N, d.nh * d.vd});
    host.attend(0, unused, rows, q, c, k, out_h);
    Tensor out_d = be.alloc(DType::F32, {N, d.nh * d.vd});
    const int64_t prefill_before = cuda_latent_prefill_launches();
    dev.attend(0, unused, rows, be.to_device(q), be.to_device(c), be.to_device(k), out_d);
    const Tensor got = be.to_host(out_d);
    const Err e = compare(got, to_vec(out_h));
    EXPECT_EQ(e.non_finite, 0);
    EXPECT_LE(e.norm_err, tol::kBf16) << "worst element " << e.worst;
    if (!vs_fp32) return;
    Tensor out_f = be.alloc(DType::F32, {N, d.nh * d.vd});
    cuda_set_latent_attention_mma(false);  // the same rows again (the new rows' writes repeat them)
    dev.attend(0, unused, rows, be.to_device(q), be.to_device(c), be.to_device(k), out_f);
    cuda_set_latent_attention_mma(true);
    const Err ef = compare(got, to_vec(be.to_host(out_f)));
    EXPECT_LE(ef.norm_err, tol::kF32) << "tensor cores against the FP32 path, worst element " << ef.worst;
    worst_vs_fp32 = std::max(worst_vs_fp32, ef.norm_err);
    if (cuda_latent_prefill_launches() == prefill_before) return;
    const int setting = cuda_latent_prefill_rows();
    cuda_set_latent_prefill_rows(0);
    dev.attend(0, unused, rows, be.to_device(q), be.to_device(c), be.to_device(k), out_f);
    cuda_set_latent_prefill_rows(setting);
    const Err er = compare(got, to_vec(be.to_host(out_f)));
    EXPECT_LE(er.norm_err, tol::kF32) << "prefill kernel against the row kernel, worst element " << er.worst;
  };
  step(prefill_rows(lens), 31);
  for (int64_t i = 0; i < 2; ++i) {
    StepRows dec;
    for (size_t s = 0; s < size_t(S); ++s) {
      dec.seq.push_back(int32_t(s));
      dec.pos.push_back(lens[s] + i);
    }
    step(dec, 32 + uint64_t(i));
  }
}

// Both paths: mma_shape says whether the widths take the tensor-core one.
void against_host(const ModelDims& d, int64_t bs, const std::vector<int64_t>& lens, bool mma_shape = true) {
  const bool setting = cuda_latent_attention_mma();
  for (bool mma : {false, true}) {
    SCOPED_TRACE(mma ? "tensor cores" : "FP32");
    cuda_set_latent_attention_mma(mma);
    const int64_t before = cuda_latent_attention_mma_launches();
    double vs_fp32 = 0;
    against_host_once(d, bs, lens, mma && mma_shape, vs_fp32);
    EXPECT_EQ(cuda_latent_attention_mma_launches() > before, mma && mma_shape) << "the path taken";
    if (mma && mma_shape) ::testing::Test::RecordProperty("tensor_cores_vs_fp32", std::to_string(vs_fp32));
  }
  cuda_set_latent_attention_mma(setting);
}

const ModelDims kBench07b = dims(16, 128, 64, 128, 256);  // rows of 256 + 64

TEST(CudaLatentAttention, ClusterOfEightUnevenSplits) {
  ASSERT_GT(cuda_device_count(), 0);
  against_host(kBench07b, 64, {300});  // 10 tiles over 8 splits
}

TEST(CudaLatentAttention, PartialsForLongContexts) {
  ASSERT_GT(cuda_device_count(), 0);
  against_host(dims(4, 32, 64, 32, 256), 64, {1100, 40});  // 35 tiles: one split per tile
}

TEST(CudaLatentAttention, BatchWithEmptySplits) {
  ASSERT_GT(cuda_device_count(), 0);
  std::vector<int64_t> lens;
  for (int64_t s = 0; s < 40; ++s) lens.push_back(1 + (s * 37) % 230);  // 1..229: splits outnumber some rows' tiles
  against_host(kBench07b, 64, lens);
}

TEST(CudaLatentAttention, SecondHeadGroupPartlyEmpty) {
  ASSERT_GT(cuda_device_count(), 0);
  against_host(dims(20, 16, 32, 24, 64), 16, {77, 300});
}

// Tensor-core edge shapes: rows of 48 values (three 16-column k-steps: the two width halves
// unequal), a latent of 40 (five 8-column output tiles), 32-token blocks; rows of 16 values (one
// k-step: the second half has none) on 8-token blocks.
TEST(CudaLatentAttention, OddStepCountsAndNarrowRows) {
  ASSERT_GT(cuda_device_count(), 0);
  against_host(dims(4, 16, 8, 16, 40), 32, {100, 7, 33});
  against_host(dims(2, 8, 8, 8, 8), 8, {50, 2});
}

TEST(CudaLatentAttention, RowsWithoutSixteenByteLoads) {
  ASSERT_GT(cuda_device_count(), 0);
  against_host(dims(5, 16, 16, 32, 70), 16, {600, 3}, false);  // rows of 86: synchronous loads, partials
}

// The prefill kernel (groups of 2 or 4 consecutive rows of one sequence per CTA) against the row
// kernel on the tensor cores: the same bits while the row kernel runs one split per row (1,300 rows
// of one head group: two CTAs per SM on up to 650 SMs), and kBf16 against the host. 1,300 rows
// make 330 groups of up to 4 (the kernel takes a step of at least two groups per SM; 132 on the
// H200). Prompts whose lengths leave groups of 1–3 rows at their ends, one of one row, a second
// head group partly empty.
TEST(CudaLatentAttention, PrefillGroupsEqualTheRowKernel) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  const int setting = cuda_latent_prefill_rows();
  for (const ModelDims& d : {kBench07b, dims(20, 16, 32, 24, 64)}) {
    const std::vector<int64_t> lens = {700, 1, 77, 129, 34, 64, 3, 300};
    Pair pair(d, 64, lens);
    const StepRows rows = prefill_rows(lens);
    const int64_t N = rows.size();
    ASSERT_EQ(N, 1308);
    const Tensor q = randn({N, d.nh, d.qk}, 41, 0), c = randn({N, d.kv_lora}, 41, 1), k = randn({N, d.rope}, 41, 2);
    Tensor out_h = Tensor::empty(DType::F32, {N, d.nh * d.vd});
    MlaParams unused;
    pair.host->attend(0, unused, rows, q, c, k, out_h);
    auto run = [&](int per_cta) {
      cuda_set_latent_prefill_rows(per_cta);
      Tensor out = be.alloc(DType::F32, {N, d.nh * d.vd});
      const int64_t before = cuda_latent_prefill_launches();
      pair.dev->attend(0, unused, rows, be.to_device(q), be.to_device(c), be.to_device(k), out);
      EXPECT_EQ(cuda_latent_prefill_launches() - before, per_cta ? 1 : 0) << per_cta << " rows per CTA";
      return to_vec(be.to_host(out));
    };
    const Vec row = run(0);
    for (int per_cta : {2, 4}) {
      SCOPED_TRACE(cat(per_cta, " rows per CTA, ", d.nh, " heads"));
      const Vec got = run(per_cta);
      ASSERT_EQ(got.size(), row.size());
      int64_t differ = 0;
      for (size_t i = 0; i < got.size(); ++i) differ += got[i] != row[i];
      EXPECT_EQ(differ, 0) << "elements that differ from the row kernel's";
      Tensor t = Tensor::empty(DType::F32, {N, d.nh * d.vd});
      std::copy(got.begin(), got.end(), t.data<float>());
      const Err e = compare(t, to_vec(out_h));
      EXPECT_EQ(e.non_finite, 0);
      EXPECT_LE(e.norm_err, tol::kBf16) << "against the host, worst element " << e.worst;
    }
  }
  cuda_set_latent_prefill_rows(setting);
  EXPECT_THROW(cuda_set_latent_prefill_rows(3), std::exception);
}

}  // namespace
}  // namespace dsv3::test
