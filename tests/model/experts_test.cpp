// experts_forward / experts_backward (model/moe.cpp) against one mlp_forward / mlp_backward per row
// block, on the CPU in each training precision: every output, dx and weight gradient bit for bit (the
// shared copies of x, act and the gradients are row blocks of the same per-row roundings and 1×128
// tiles). Blocks of 0, 1 and uneven row counts, with accumulate into dx; and the checks of the row
// blocks.
#include <gtest/gtest.h>

#include <cstring>

#include "../backend/harness.h"
#include "backend/fp8.h"
#include "model/model.h"

namespace dsv3::test {
namespace {

constexpr int64_t H = 256, I = 128;
const std::vector<int64_t> kRows = {37, 0, 130, 1, 64, 5};

struct Blocks {
  std::vector<MlpParams> p;
  std::vector<int64_t> offsets = {0};
  Tensor x, dout, dx0;
};

Blocks make() {
  Blocks s;
  for (size_t e = 0; e < kRows.size(); ++e) {
    auto lin = [&](int64_t n, int64_t k, uint64_t st) {
      LinearParam l;
      l.w = randn({n, k}, 60 + e, st, 0.06f);
      l.lowp = true;
      return l;
    };
    s.p.push_back({lin(I, H, 1), lin(I, H, 2), lin(H, I, 3)});
    s.offsets.push_back(s.offsets.back() + kRows[e]);
  }
  const int64_t M = s.offsets.back();
  s.x = randn({M, H}, 61, 1);
  s.dout = randn({M, H}, 61, 2);
  s.dx0 = randn({M, H}, 61, 3);
  return s;
}

std::vector<MlpParams> zero_grads(const std::vector<MlpParams>& p) {
  std::vector<MlpParams> g(p.size());
  for (size_t e = 0; e < p.size(); ++e) {
    g[e].gate_proj.w = Tensor::zeros(DType::F32, p[e].gate_proj.w.shape());
    g[e].up_proj.w = Tensor::zeros(DType::F32, p[e].up_proj.w.shape());
    g[e].down_proj.w = Tensor::zeros(DType::F32, p[e].down_proj.w.shape());
  }
  return g;
}

void expect_same(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_EQ(a.nbytes(), b.nbytes()) << what;
  EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0) << what;
}

class Experts : public ::testing::TestWithParam<LinearPrecisionMode> {
 protected:
  void SetUp() override { linear_precision() = LinearPrecision{GetParam()}; }
  void TearDown() override { linear_precision() = LinearPrecision{}; }
};

TEST_P(Experts, EqualOneMlpPerBlockBitForBit) {
  Backend& be = cpu_backend();
  const Blocks s = make();
  const int64_t M = s.offsets.back();
  // All blocks at once.
  std::vector<MlpParams> g_all = zero_grads(s.p);
  MlpActs a;
  experts_forward(be, s.p, s.offsets, s.x, a);
  Tensor dx_all = s.dx0.clone();
  experts_backward(be, s.p, g_all, s.offsets, a, s.dout, dx_all, true);
  // One block at a time.
  std::vector<MlpParams> g_one = zero_grads(s.p);
  Tensor out_one = Tensor::zeros(DType::F32, {M, H}), dx_one = s.dx0.clone();
  for (size_t e = 0; e < s.p.size(); ++e) {
    const int64_t r0 = s.offsets[e], r1 = s.offsets[e + 1];
    if (r0 == r1) continue;
    MlpActs b;
    mlp_forward(be, s.p[e], s.x.rows(r0, r1), b);
    std::memcpy(out_one.rows(r0, r1).raw(), b.out.raw(), b.out.nbytes());
    mlp_backward(be, s.p[e], g_one[e], b, s.dout.rows(r0, r1), dx_one.rows(r0, r1), true);
  }
  expect_same(a.out, out_one, "out");
  expect_same(dx_all, dx_one, "dx");
  for (size_t e = 0; e < s.p.size(); ++e) {
    expect_same(g_all[e].gate_proj.w, g_one[e].gate_proj.w, cat("gate_proj grad ", e));
    expect_same(g_all[e].up_proj.w, g_one[e].up_proj.w, cat("up_proj grad ", e));
    expect_same(g_all[e].down_proj.w, g_one[e].down_proj.w, cat("down_proj grad ", e));
  }
}

INSTANTIATE_TEST_SUITE_P(Precisions, Experts,
                         ::testing::Values(LinearPrecisionMode::F32, LinearPrecisionMode::Bf16,
                                           LinearPrecisionMode::Fp8));

TEST(ExpertsBlocks, BadOffsetsAreRefused) {
  Backend& be = cpu_backend();
  const Blocks s = make();
  MlpActs a;
  std::vector<int64_t> off = s.offsets;
  off.back() -= 1;  // does not cover the rows
  EXPECT_THROW(experts_forward(be, s.p, off, s.x, a), InternalError);
  off = s.offsets;
  off[2] = off[1] - 1;  // a block that ends before it starts
  EXPECT_THROW(experts_forward(be, s.p, off, s.x, a), InternalError);
  off = s.offsets;
  off.pop_back();  // one offset short
  EXPECT_THROW(experts_forward(be, s.p, off, s.x, a), InternalError);
}

}  // namespace
}  // namespace dsv3::test
