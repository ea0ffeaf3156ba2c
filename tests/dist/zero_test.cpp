// ZeRO-1 on simulated ranks (threads): ZeroAdamW against one unsharded AdamW on the same gradients,
// bitwise — blocks that cut tensors, a rank whose block is empty, clipping, a skipped
// non-finite step, BF16 moments — and the gathered state equals the unsharded state.
#include "dist/zero.h"

#include <cmath>
#include <limits>

#include <nlohmann/json.hpp>

#include "backend/ops.h"
#include "dist_test_util.h"

namespace dsv3 {
namespace {

// Parameters and gradients of `sizes`, deterministic; every rank builds the same.
struct Model {
  std::vector<Tensor> w, g;
  explicit Model(const std::vector<Shape>& shapes) {
    for (size_t i = 0; i < shapes.size(); ++i) {
      w.push_back(Tensor::empty(DType::F32, shapes[i]));
      g.push_back(Tensor::zeros(DType::F32, shapes[i]));
      for (int64_t k = 0; k < w.back().numel(); ++k) w.back().data<float>()[k] = rng_normal(1, i, uint64_t(k));
    }
  }
  std::vector<ParamSlot> slots() const {
    std::vector<ParamSlot> s;
    for (size_t i = 0; i < w.size(); ++i) s.push_back({cat("t", i), w[i], g[i], w[i].ndim() >= 2});
    return s;
  }
  // Step s's gradient: huge at step 1 (clipping), NaN at step 2 (skipped).
  void set_grads(int step) {
    for (size_t i = 0; i < g.size(); ++i)
      for (int64_t k = 0; k < g[i].numel(); ++k)
        g[i].data<float>()[k] = (step == 1 ? 50.0f : 1.0f) * rng_normal(2 + uint64_t(step), i, uint64_t(k));
    if (step == 2) g.back().data<float>()[0] = std::numeric_limits<float>::quiet_NaN();
  }
};

void check(int P, const std::vector<Shape>& shapes, DType moments) {
  SCOPED_TRACE(cat(P, " ranks, moments ", dtype_name(moments)));
  OptimizerConfig cfg;
  cfg.clip_norm = 1.0;
  cfg.moment_dtype = moments;
  Backend& be = cpu_backend();
  Model ref(shapes);
  AdamW plain(ref.slots(), cfg, &be);
  std::vector<StepReport> want;
  for (int s = 0; s < 4; ++s) {
    ref.set_grads(s);
    want.push_back(plain.step(1e-2, 1.0, 0.5));
  }
  auto world = make_thread_world(P);
  test::run_ranks(world, [&](int, Communicator& c) {
    Model m(shapes);
    ZeroAdamW z(c, m.slots(), cfg, &be);
    for (int s = 0; s < 4; ++s) {
      m.set_grads(s);
      const StepReport r = z.step(1e-2, 1.0, 0.5);
      EXPECT_EQ(r.applied, want[size_t(s)].applied) << "step " << s;
      EXPECT_EQ(r.clip_scale, want[size_t(s)].clip_scale) << "step " << s;
      if (r.applied) {
        EXPECT_EQ(r.grad_norm, want[size_t(s)].grad_norm) << "step " << s;
      }
    }
    EXPECT_GT(want[1].clip_scale, 0.0);
    EXPECT_LT(want[1].clip_scale, 1.0);  // the clipping path ran
    EXPECT_FALSE(want[2].applied);       // and the skip
    EXPECT_EQ(z.skipped_total(), 1);
    EXPECT_EQ(z.updates(), 3);
    for (size_t i = 0; i < m.w.size(); ++i) EXPECT_TRUE(test::same_bits(m.w[i], ref.w[i])) << "parameter " << i;
    std::unique_ptr<AdamW> full = z.gather(0);
    ASSERT_EQ(full != nullptr, c.rank() == 0);
    if (full) {
      const auto a = full->state_tensors(), b = plain.state_tensors();
      ASSERT_EQ(a.size(), b.size());
      for (size_t i = 0; i < a.size(); ++i) {
        EXPECT_EQ(a[i].name, b[i].name);
        EXPECT_EQ(0, std::memcmp(a[i].tensor.raw(), b[i].tensor.raw(), b[i].tensor.nbytes())) << a[i].name;
      }
      EXPECT_EQ(full->updates(), plain.updates());
      EXPECT_EQ(full->skipped_total(), plain.skipped_total());
    }
    // A shard resumed from the complete state continues exactly like the unsharded optimizer.
    std::unique_ptr<AdamW> src = std::make_unique<AdamW>(m.slots(), cfg, &be);
    src->load_state(
        [&](const std::string& n) {
          for (const auto& s : plain.state_tensors())
            if (s.name == n) return s.tensor;
          return Tensor();
        },
        plain.state_json(), "test");
    ZeroAdamW resumed(c, m.slots(), cfg, &be, src.get());
    EXPECT_EQ(resumed.updates(), 3);
    int64_t mine = resumed.moment_bytes();
    std::vector<int64_t> sum{mine};
    c.all_reduce_sum(std::span<int64_t>(sum));
    EXPECT_EQ(sum[0], resumed.full_moment_bytes());
  });
}

TEST(Zero1, ShardedAdamWEqualsUnshardedBitwise) {
  const std::vector<Shape> shapes{{3, 5}, {7}, {2, 2, 2}, {4, 3}};  // 42 elements
  for (int P : {1, 2, 3, 4}) check(P, shapes, DType::F32);
  check(3, shapes, DType::BF16);
  check(4, {{5}}, DType::F32);  // blocks of 2: the last rank's block is empty
  // Blocks cutting tensors at offsets that are not multiples of any SIMD width (the backend's
  // vector loop and its scalar tail must give the same bits).
  for (int P : {3, 4}) check(P, {{37, 29}, {100}, {33, 3}}, DType::F32);
}

}  // namespace
}  // namespace dsv3
