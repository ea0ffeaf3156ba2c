// Absorbed-MLA decode over the paged latent cache on the GPU against a double-precision host
// reference: several sequences of uneven lengths (one token, partial blocks, many blocks), blocks
// placed out of order in the pool, two layers (reading the second), heads beyond one 16-head group.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "../backend/harness.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/mla_decode.h"

namespace dsv3::test {
namespace {

TEST(CudaMlaDecode, MatchesReferenceOverPagedCache) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  const int64_t B = 3, H = 20, W = 576, R = 512, layers = 2, layer = 1, bs = 64;
  const std::vector<int32_t> len = {1, 130, 700};
  int64_t max_blocks = 0, total_blocks = 0;
  for (int32_t l : len) {
    max_blocks = std::max<int64_t>(max_blocks, (l + bs - 1) / bs);
    total_blocks += (l + bs - 1) / bs;
  }
  // Pool blocks handed out in a scrambled order.
  std::vector<int32_t> perm(size_t(total_blocks + 3));
  std::iota(perm.begin(), perm.end(), 0);
  std::reverse(perm.begin(), perm.end());
  std::rotate(perm.begin(), perm.begin() + 5, perm.end());
  Tensor table = Tensor::zeros(DType::I32, {B, max_blocks});
  size_t next = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < (len[size_t(b)] + bs - 1) / bs; ++i) table.data<int32_t>()[b * max_blocks + i] = perm[next++];
  int64_t pool_rows = int64_t(perm.size()) * layers * bs;
  Tensor pool = randn({pool_rows, W}, 5, 1, 1.0f, DType::BF16);
  Tensor q = randn({B, H, W}, 5, 2, 0.08f);
  Tensor lens = Tensor::empty(DType::I32, {B});
  std::copy(len.begin(), len.end(), lens.data<int32_t>());
  float scale = float(1 / std::sqrt(192.0));
  Tensor out = be.alloc(DType::F32, {B, H, R}), lse = be.alloc(DType::F32, {B, H});
  MlaDecodeArgs a;
  a.q = be.to_device(q);
  a.pool = be.to_device(pool);
  a.block_table = be.to_device(table);
  a.lengths = be.to_device(lens);
  a.layers = layers;
  a.layer = layer;
  a.block_size = bs;
  a.kv_lora_rank = R;
  a.max_len = 700;
  a.scale = scale;
  a.out = out;
  a.lse = lse;
  cuda_mla_decode(a);
  Vec pv = to_vec(pool), qv = to_vec(q), want(size_t(B * H * R)), want_lse(size_t(B * H));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      int64_t n = len[size_t(b)];
      Vec s(static_cast<size_t>(n));
      double mx = -INFINITY;
      for (int64_t t = 0; t < n; ++t) {
        int64_t blk = table.data<int32_t>()[b * max_blocks + t / bs];
        int64_t row = (blk * layers + layer) * bs + t % bs;
        double d = 0;
        for (int64_t j = 0; j < W; ++j) d += qv[size_t((b * H + h) * W + j)] * pv[size_t(row * W + j)];
        s[size_t(t)] = scale * d;
        mx = std::max(mx, s[size_t(t)]);
      }
      double z = 0;
      for (double& x : s) z += (x = std::exp(x - mx));
      want_lse[size_t(b * H + h)] = mx + std::log(z);
      for (int64_t t = 0; t < n; ++t) {
        int64_t blk = table.data<int32_t>()[b * max_blocks + t / bs];
        int64_t row = (blk * layers + layer) * bs + t % bs;
        for (int64_t j = 0; j < R; ++j) want[size_t((b * H + h) * R + j)] += s[size_t(t)] / z * pv[size_t(row * W + j)];
      }
    }
  Err e = compare(be.to_host(out), want), el = compare(be.to_host(lse), want_lse);
  EXPECT_EQ(e.non_finite, 0);
  // The kernel runs on BF16 tensor cores: q and the softmax weights are rounded to BF16 operands.
  EXPECT_LE(e.norm_err, tol::kBf16);
  EXPECT_LE(el.norm_err, tol::kBf16);
}

}  // namespace
}  // namespace dsv3::test
