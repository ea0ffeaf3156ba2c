// The decode GEMV (cuda_small_linear) against the double reference, shared by the GPU engine's and
// the FP8 decode tests.
#pragma once
#include <gtest/gtest.h>

#include "../backend/harness.h"
#include "../backend/reference.h"
#include "backend/cuda/cuda_backend.h"
#include "infer/cuda_decode_ops.h"

namespace dsv3::test {

// y = x·wᵀ (+ y0 when acc) by cuda_small_linear(p) against the double reference over w_host, the
// values p's weight stands for (F32 on the host: the dequantized blocks of an FP8 weight), under
// kF32, with y inside guard bytes.
inline void expect_small_linear_matches(const LinearParam& p, const Tensor& w_host, const Tensor& x, const Tensor& y0,
                                        bool acc) {
  CudaBackend& be = cuda_backend();
  const int64_t n = x.dim(0), M = p.w.dim(0), K = p.w.dim(1);
  Vec want = ref::linear(to_vec(x), to_vec(w_host), n, M, K);
  if (acc)
    for (size_t i = 0; i < want.size(); ++i) want[i] += double(y0.data<float>()[i]);
  const Tensor xd = be.to_device(x);
  Guards g(be);  // y inside guard bytes: a write past it shows up
  Tensor y = g.init(y0);
  ASSERT_TRUE(cuda_small_linear_ok(p, xd));
  cuda_small_linear(p, xd, y, acc);
  const Err e = compare(be.to_host(y), want);
  EXPECT_LE(e.norm_err, tol::kF32) << "worst " << e.worst;
  EXPECT_EQ(e.non_finite, 0);
  EXPECT_EQ(g.damaged(), "");
}
inline void expect_small_linear_matches(const LinearParam& p, const Tensor& x, const Tensor& y0, bool acc) {
  expect_small_linear_matches(p, cuda_backend().to_host(p.w), x, y0, acc);
}

// The per-head GEMV (the absorbed W_UK / W_UV form): output row (h, i) of W [nh·head_rows, K]
// reads x's head-h slice (heads head_x apart) and goes to y[q, h·head_y + i], on top of y0's values;
// against the double reference over w_host under kF32, the columns between heads' outputs
// untouched, y inside guard bytes. W: BF16 or FP8 (scale: its block scales on the device).
inline void expect_heads_gemv_matches(const Tensor& W, const Tensor& scale, const Tensor& w_host, int64_t nh,
                                      int64_t head_rows, int64_t head_x, int64_t head_y, const Tensor& x,
                                      const Tensor& y0) {
  CudaBackend& be = cuda_backend();
  const int64_t n = x.dim(0), K = W.dim(1);
  Vec want = to_vec(y0);
  for (int64_t q = 0; q < n; ++q)
    for (int64_t h = 0; h < nh; ++h)
      for (int64_t i = 0; i < head_rows; ++i) {
        double s = 0;
        for (int64_t k = 0; k < K; ++k)
          s += double(w_host.data<float>()[(h * head_rows + i) * K + k]) *
               double(x.data<float>()[q * nh * head_x + h * head_x + k]);
        want[size_t(q * nh * head_y + h * head_y + i)] = s;
      }
  const Tensor xd = be.to_device(x);
  Guards guards(be);  // outputs inside guard bytes: a write past them shows up
  Tensor yd = guards.init(y0);
  GemvArgs g;
  g.x = xd.data<float>();
  g.n = int(n);
  g.K = int(K);
  g.ldx = nh * head_x;
  g.head_x = head_x;
  g.head_rows = int(head_rows);
  set_gemv_weight(g, W, scale);
  g.n_out = int(nh * head_rows);
  g.y = yd.data<float>();
  g.ldy = nh * head_y;
  g.head_y = head_y;
  cuda_rows_gemv(g);
  const Vec got = to_vec(be.to_host(yd));
  const Err e = compare(be.to_host(yd), want);
  EXPECT_LE(e.norm_err, tol::kF32) << "worst " << e.worst;
  EXPECT_EQ(e.non_finite, 0);
  for (int64_t q = 0; q < n; ++q)
    for (int64_t h = 0; h < nh; ++h)
      for (int64_t c = head_rows; c < head_y; ++c) {
        const size_t at = size_t(q * nh * head_y + h * head_y + c);
        ASSERT_EQ(got[at], want[at]) << "row " << q << " head " << h << " column " << c << " was written";
      }
  EXPECT_EQ(guards.damaged(), "");
}

}  // namespace dsv3::test
