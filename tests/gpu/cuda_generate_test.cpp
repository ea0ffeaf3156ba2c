// Greedy generation on the GPU equals the CPU's on every HF fixture (V3 and V2, BF16 and FP8
// block-scaled weights): the fixture's prompt, 12 new tokens, each the argmax of a full forward over
// the sequence so far (the model's forward on each backend; the serving engine's latent cache is the
// CPU's). A step where the CPU's two best logits are closer than the parity tolerance could
// legitimately go either way; the test stops there instead of guessing, and requires at least 4
// compared tokens per fixture.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>

#include "../backend/harness.h"
#include "backend/cuda/cuda_backend.h"
#include "io/safetensors.h"
#include "model/model.h"

namespace dsv3::test {
namespace {

namespace fs = std::filesystem;

Weights to_device(const Weights& host, Backend& be) {
  Weights w = host;
  for (Param& p : w.params()) {
    p.w = be.to_device(p.w);
    if (present(p.scale_inv)) p.scale_inv = be.to_device(p.scale_inv);
  }
  return w;
}

struct Pick {
  int32_t id = -1;
  double margin = 0, scale = 0;  // best − second best; max |logit|
};

Pick last_argmax(const Tensor& logits_host, int64_t V) {
  const float* row = logits_host.data<float>() + (logits_host.dim(0) - 1) * V;
  Pick p;
  double best = -INFINITY, second = -INFINITY;
  for (int64_t v = 0; v < V; ++v) {
    double x = row[v];
    p.scale = std::max(p.scale, std::fabs(x));
    if (x > best) {
      second = best;
      best = x;
      p.id = int32_t(v);
    } else if (x > second) {
      second = x;
    }
  }
  p.margin = best - second;
  return p;
}

TEST(CudaGenerate, GreedyEqualsCpuOnFixtures) {
  ASSERT_GT(cuda_device_count(), 0);
  const fs::path root = fs::path(DSV3_SOURCE_DIR) / "tests" / "data" / "fixtures";
  int fixtures = 0;
  for (const auto& e : fs::directory_iterator(root)) {
    if (!fs::exists(e.path() / "expected.safetensors")) continue;
    SCOPED_TRACE(e.path().filename().string());
    ++fixtures;
    Weights w = Weights::load(e.path().string());
    SafetensorsFile exp = SafetensorsFile::open((e.path() / "expected.safetensors").string());
    Tensor ids64 = exp.tensor("input_ids");
    std::vector<int32_t> ids;
    for (int64_t i = 0; i < std::min<int64_t>(ids64.numel(), 8); ++i) ids.push_back(int32_t(ids64.data<int64_t>()[i]));
    const int64_t V = w.config().vocab_size;
    Model cpu(w, cpu_backend());
    Weights wd = to_device(w, cuda_backend());
    Model gpu(wd, cuda_backend());
    ForwardOptions fo;
    fo.mtp = false;
    int compared = 0;
    for (int step = 0; step < 12; ++step) {
      Pick c = last_argmax(cpu.forward(ids, 1, int64_t(ids.size()), fo).logits, V);
      Pick g = last_argmax(cuda_backend().to_host(gpu.forward(ids, 1, int64_t(ids.size()), fo).logits), V);
      if (c.margin < tol::kModelParity * c.scale) break;  // a near tie: either token is correct
      ASSERT_EQ(g.id, c.id) << "step " << step << " (cpu margin " << c.margin << ")";
      ++compared;
      ids.push_back(c.id);
    }
    EXPECT_GE(compared, 4) << "too many near ties to compare";
  }
  EXPECT_GE(fixtures, 6);
}

}  // namespace
}  // namespace dsv3::test
