// Training on the GPU follows the CPU: the `tiny` preset (MLA with q compression, grouped noaux_tc
// routing with a shared expert, a dense first layer, one MTP module), the same random weights and
// batches, forward + loss (main CE, λ-weighted MTP CE, sequence balance loss) + backward + AdamW on
// each backend. The first step's gradients must agree per tensor and every step's loss must stay on
// the CPU's curve, both under the training-parity tolerance (docs/tolerances.md).
#include <gtest/gtest.h>

#include <cstring>

#include "../backend/harness.h"
#include "backend/cuda/cuda_backend.h"
#include "model/loss.h"
#include "model/model.h"
#include "model/presets.h"
#include "train/optimizer.h"

namespace dsv3::test {
namespace {

Tensor own_copy_tensor(const Tensor& t) {
  Tensor c = Tensor::empty(t.dtype(), t.shape());
  std::memcpy(c.raw(), t.raw(), t.nbytes());
  return c;
}

// A copy with its own storage (AdamW updates the master weights in place), on `be`'s device.
Weights own_copy(const Weights& host, Backend& be) {
  Weights w = host;
  for (Param& p : w.params()) {
    if (be.device() != Device::CPU) {
      p.w = be.to_device(p.w);
      continue;
    }
    p.w = own_copy_tensor(p.w);
  }
  return w;
}

struct TrainRun {
  std::vector<double> losses;
  std::vector<std::pair<std::string, Tensor>> first_grads;  // host copies
};

TrainRun train(Backend& be, const Weights& init, const ModelConfig& cfg, int steps) {
  const int64_t B = 2, T = 32;
  Weights w = own_copy(init, be);
  Model model(w, be);
  Grads g(cfg, be.device() == Device::CPU ? nullptr : &be);
  std::vector<ParamSlot> slots;
  for (Param& p : w.params())
    if (p.spec.trainable) slots.push_back({p.spec.name, p.w, g.get(p.spec.name), p.spec.weight_decay});
  OptimizerConfig oc;
  AdamW opt(slots, oc, be.device() == Device::CPU ? nullptr : &be);
  LossOptions lo;
  lo.balance_alpha = 1e-2;
  TrainRun r;
  for (int s = 0; s < steps; ++s) {
    std::vector<int32_t> lab(size_t(B * (T + 1)));
    for (size_t i = 0; i < lab.size(); ++i)
      lab[i] = int32_t((uint64_t(i + 131 * size_t(s)) * 2654435761u >> 7) % uint64_t(cfg.vocab_size));
    std::vector<int32_t> ids;
    for (int64_t b = 0; b < B; ++b)
      ids.insert(ids.end(), lab.begin() + b * (T + 1), lab.begin() + b * (T + 1) + T);
    g.zero();
    ForwardOptions fo;
    fo.keep_activations = true;
    ForwardOutput out = model.forward(ids, B, T, fo);
    LossResult lr = compute_loss(be, model, out, lab, B, T, T + 1, lo);
    model.backward(lr.grad, g);
    if (s == 0)
      for (const Param& p : g.w.params()) r.first_grads.emplace_back(p.spec.name, be.device() == Device::CPU ? own_copy_tensor(p.w) : be.to_host(p.w));
    opt.step(1e-3, lr.total, 1.0);
    r.losses.push_back(lr.total);
  }
  return r;
}

TEST(CudaTrain, TinyStepsFollowCpu) {
  ASSERT_GT(cuda_device_count(), 0);
  ModelConfig cfg = preset_config("tiny");
  Weights w = Weights::random(cfg, 11, 0.02f);
  const int steps = 6;
  TrainRun cpu = train(cpu_backend(), w, cfg, steps);
  TrainRun gpu = train(cuda_backend(), w, cfg, steps);
  ASSERT_EQ(cpu.first_grads.size(), gpu.first_grads.size());
  for (size_t i = 0; i < cpu.first_grads.size(); ++i) {
    ASSERT_EQ(cpu.first_grads[i].first, gpu.first_grads[i].first);
    Err e = compare(gpu.first_grads[i].second, to_vec(cpu.first_grads[i].second));
    EXPECT_EQ(e.non_finite, 0) << cpu.first_grads[i].first;
    EXPECT_LE(e.norm_err, tol::kTrainParity) << "gradient of " << cpu.first_grads[i].first;
  }
  for (int s = 0; s < steps; ++s) {
    EXPECT_TRUE(std::isfinite(gpu.losses[size_t(s)]));
    EXPECT_LE(std::fabs(gpu.losses[size_t(s)] - cpu.losses[size_t(s)]), tol::kTrainParity * cpu.losses[size_t(s)])
        << "step " << s << ": cpu " << cpu.losses[size_t(s)] << " gpu " << gpu.losses[size_t(s)];
  }
  // The curve moved: the test would notice a GPU optimizer that did nothing.
  EXPECT_LT(cpu.losses.back(), cpu.losses.front());
}

}  // namespace
}  // namespace dsv3::test
