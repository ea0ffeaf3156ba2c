// Absorbed-MLA decode over the paged latent cache on the GPU against a double-precision host
// reference, for every compiled kernel shape (mla_decode_configs) and several splits of the block
// range (one split: the CTA writes out/lse itself; more: the merge kernel): sequences of uneven
// lengths (one token, 63/64/65, partial blocks, contexts past 4096), blocks placed out of order in
// the pool, two layers (reading the second), 16/20/64/128 heads (partial and several head groups).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "../backend/harness.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/mla_decode.h"

namespace dsv3::test {
namespace {

constexpr int64_t kW = 576, kR = 512, kBs = 64;

struct Case {
  int64_t heads;
  std::vector<int32_t> lens;
  int64_t layers, layer;
  float q_scale;
  uint64_t seed;
};

struct Built {
  Tensor table, pool, q, lens;  // host
  int64_t max_blocks = 0, max_len = 0;
  Vec want, want_lse;
};

Built build(const Case& c) {
  Built d;
  const int64_t B = int64_t(c.lens.size()), H = c.heads;
  int64_t total_blocks = 0;
  for (int32_t l : c.lens) {
    d.max_blocks = std::max<int64_t>(d.max_blocks, (l + kBs - 1) / kBs);
    d.max_len = std::max<int64_t>(d.max_len, l);
    total_blocks += (l + kBs - 1) / kBs;
  }
  // Pool blocks handed out in a scrambled order, with spare blocks.
  std::vector<int32_t> perm(size_t(total_blocks + 3));
  std::iota(perm.begin(), perm.end(), 0);
  std::reverse(perm.begin(), perm.end());
  std::rotate(perm.begin(), perm.begin() + 5, perm.end());
  d.table = Tensor::zeros(DType::I32, {B, d.max_blocks});
  size_t next = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < (c.lens[size_t(b)] + kBs - 1) / kBs; ++i)
      d.table.data<int32_t>()[b * d.max_blocks + i] = perm[next++];
  d.pool = randn({int64_t(perm.size()) * c.layers * kBs, kW}, c.seed, 1, 1.0f, DType::BF16);
  d.q = randn({B, H, kW}, c.seed, 2, c.q_scale);
  d.lens = Tensor::empty(DType::I32, {B});
  std::copy(c.lens.begin(), c.lens.end(), d.lens.data<int32_t>());
  const double scale = 1 / std::sqrt(192.0);
  Vec pv = to_vec(d.pool), qv = to_vec(d.q);
  d.want.assign(size_t(B * H * kR), 0.0);
  d.want_lse.assign(size_t(B * H), 0.0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = c.lens[size_t(b)];
    std::vector<int64_t> rows(static_cast<size_t>(n));
    for (int64_t t = 0; t < n; ++t)
      rows[size_t(t)] = (d.table.data<int32_t>()[b * d.max_blocks + t / kBs] * c.layers + c.layer) * kBs + t % kBs;
    for (int64_t h = 0; h < H; ++h) {
      Vec s(static_cast<size_t>(n));
      double mx = -INFINITY;
      const double* qh = &qv[size_t((b * H + h) * kW)];
      for (int64_t t = 0; t < n; ++t) {
        const double* r = &pv[size_t(rows[size_t(t)] * kW)];
        double acc = 0;
        for (int64_t j = 0; j < kW; ++j) acc += qh[j] * r[j];
        s[size_t(t)] = scale * acc;
        mx = std::max(mx, s[size_t(t)]);
      }
      double z = 0;
      for (double& x : s) z += (x = std::exp(x - mx));
      d.want_lse[size_t(b * H + h)] = mx + std::log(z);
      double* o = &d.want[size_t((b * H + h) * kR)];
      for (int64_t t = 0; t < n; ++t) {
        const double* r = &pv[size_t(rows[size_t(t)] * kW)];
        const double w = s[size_t(t)] / z;
        for (int64_t j = 0; j < kR; ++j) o[j] += w * r[j];
      }
    }
  }
  return d;
}

// The kernel's arguments for a built case, inputs on the device; out and lse are the caller's.
MlaDecodeArgs device_args(const Case& c, const Built& d) {
  CudaBackend& be = cuda_backend();
  MlaDecodeArgs a;
  a.q = be.to_device(d.q);
  a.pool = be.to_device(d.pool);
  a.block_table = be.to_device(d.table);
  a.lengths = be.to_device(d.lens);
  a.layers = c.layers;
  a.layer = c.layer;
  a.block_size = kBs;
  a.kv_lora_rank = kR;
  a.max_len = d.max_len;
  a.scale = float(1 / std::sqrt(192.0));
  return a;
}

// Runs every compiled kernel shape with at least min_heads_per_cta heads per CTA, with several
// splits (0 = the automatic choice), on one case.
void check_all(const Case& c, int min_heads_per_cta = 0) {
  CudaBackend& be = cuda_backend();
  Built d = build(c);
  const int64_t B = int64_t(c.lens.size()), H = c.heads;
  MlaDecodeArgs a = device_args(c, d);
  const int64_t nblk = d.max_blocks;
  for (MlaDecodeConfig cfg : mla_decode_configs())
    for (int splits : {0, 1, 3, int(nblk)}) {
      if (cfg.heads_per_cta < min_heads_per_cta) continue;
      cfg.splits = splits;
      SCOPED_TRACE(cat(mla_decode_config_name(cfg), " splits ", splits, " heads ", H));
      // NaN-filled outputs inside guard bytes: an element the kernel fails to write shows up as
      // non-finite, a write outside them as a damaged guard.
      Guards g(be);
      a.out = g.out(DType::F32, {B, H, kR});
      a.lse = g.out(DType::F32, {B, H});
      cuda_mla_decode_with(a, cfg);
      Err e = compare(be.to_host(a.out), d.want), el = compare(be.to_host(a.lse), d.want_lse);
      EXPECT_EQ(e.non_finite, 0);
      EXPECT_EQ(el.non_finite, 0);
      EXPECT_EQ(g.damaged(), "");
      // BF16 tensor cores: q and the softmax weights are rounded to BF16 operands.
      EXPECT_LE(e.norm_err, tol::kBf16);
      EXPECT_LE(el.norm_err, tol::kBf16);
    }
  // The default entry point, without lse.
  a.out = be.alloc(DType::F32, {B, H, kR});
  a.lse = Tensor();
  cuda_mla_decode(a);
  Err e = compare(be.to_host(a.out), d.want);
  EXPECT_EQ(e.non_finite, 0);
  EXPECT_LE(e.norm_err, tol::kBf16);
}

// Split results are merged in a fixed order: repeated calls give bitwise equal outputs, whatever
// order the CTAs ran in.
TEST(CudaMlaDecode, SplitMergeIsDeterministic) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  const Case c{16, {4133, 700, 64, 1, 2049, 3000, 128, 4000}, 1, 0, 0.3f, 21};
  Built d = build(c);
  const int64_t B = int64_t(c.lens.size()), H = c.heads;
  MlaDecodeArgs a = device_args(c, d);
  for (MlaDecodeConfig cfg : mla_decode_configs()) {
    cfg.splits = 7;
    SCOPED_TRACE(mla_decode_config_name(cfg));
    Tensor first_out, first_lse;
    for (int rep = 0; rep < 3; ++rep) {
      a.out = be.alloc(DType::F32, {B, H, kR});
      a.lse = be.alloc(DType::F32, {B, H});
      ASSERT_GT(cuda_mla_decode_with(a, cfg), 1);
      Tensor o = be.to_host(a.out), l = be.to_host(a.lse);
      if (rep == 0) {
        first_out = o;
        first_lse = l;
        EXPECT_LE(compare(o, d.want).norm_err, tol::kBf16);
        continue;
      }
      EXPECT_EQ(std::memcmp(o.raw(), first_out.raw(), size_t(o.numel()) * 4), 0) << "call " << rep;
      EXPECT_EQ(std::memcmp(l.raw(), first_lse.raw(), size_t(l.numel()) * 4), 0) << "call " << rep;
    }
  }
}

TEST(CudaMlaDecode, MatchesReferenceOverPagedCache) {
  ASSERT_GT(cuda_device_count(), 0);
  // 20 heads: two 16-head groups, the second partial; a 64-head CTA with 44 empty heads.
  check_all({20, {1, 130, 700}, 2, 1, 0.08f, 5});
}

TEST(CudaMlaDecode, SixteenHeadsBlockEdgesAndLongContext) {
  ASSERT_GT(cuda_device_count(), 0);
  check_all({16, {63, 4133, 1, 64, 65, 2049}, 1, 0, 0.3f, 11});
}

TEST(CudaMlaDecode, SixtyFourHeads) {
  ASSERT_GT(cuda_device_count(), 0);
  check_all({64, {77, 1, 1000}, 2, 0, 0.3f, 12});
}

TEST(CudaMlaDecode, HundredTwentyEightHeadsLongContext) {
  ASSERT_GT(cuda_device_count(), 0);
  // The 16-head shapes already run over several head groups above; here the 64-head ones (two CTAs
  // per sequence), which keeps the test short under compute-sanitizer.
  check_all({128, {4133, 5, 128}, 1, 0, 0.3f, 13}, 64);
}

}  // namespace
}  // namespace dsv3::test
