// End to end on the GPU: the `tiny` preset (every V3 feature: q compression, grouped noaux_tc
// routing, a shared expert, a dense first layer, one MTP module) with random weights, run forward on
// the CPU backend and on the CUDA backend (weights copied to the device); the logits of the main
// head and of the MTP module must agree within the whole-model parity tolerance, and so must the
// mean cross-entropy over the sequence.
#include <gtest/gtest.h>

#include <numeric>

#include "../backend/harness.h"
#include "backend/cuda/cuda_backend.h"
#include "model/model.h"
#include "model/presets.h"

namespace dsv3::test {
namespace {

Weights to_device(const Weights& host, Backend& be) {
  Weights w = host;
  for (Param& p : w.params()) {
    p.w = be.to_device(p.w);
    if (present(p.scale_inv)) p.scale_inv = be.to_device(p.scale_inv);
  }
  return w;
}

double mean_ce(Backend& be, const Tensor& logits, const std::vector<int32_t>& targets) {
  int64_t t = logits.dim(0);
  Tensor tg = Tensor::empty(DType::I32, {t});
  std::copy(targets.begin(), targets.end(), tg.data<int32_t>());
  Tensor sum = be.alloc(DType::F32, {1});
  be.cross_entropy({logits, be.to_device(tg), Tensor(), sum, Tensor(), 1.0f});
  return double(be.to_host(sum).data<float>()[0]) / double(t);
}

TEST(CudaModel, TinyForwardMatchesCpu) {
  ASSERT_GT(cuda_device_count(), 0);
  ModelConfig cfg = preset_config("tiny");
  Weights w = Weights::random(cfg, 42, 0.05f);
  const int64_t B = 2, T = 24;
  std::vector<int32_t> ids(size_t(B * T));
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = int32_t((i * 2654435761u) % uint64_t(cfg.vocab_size));
  Model cpu(w, cpu_backend());
  ForwardOutput ref = cpu.forward(ids, B, T);
  Weights wd = to_device(w, cuda_backend());
  Model gpu(wd, cuda_backend());
  ForwardOutput got = gpu.forward(ids, B, T);
  ASSERT_EQ(got.mtp_logits.size(), ref.mtp_logits.size());
  Err e = compare(cuda_backend().to_host(got.logits), to_vec(ref.logits));
  EXPECT_EQ(e.non_finite, 0);
  EXPECT_LE(e.norm_err, tol::kModelParity) << "main logits";
  for (size_t k = 0; k < ref.mtp_logits.size(); ++k) {
    Err ek = compare(cuda_backend().to_host(got.mtp_logits[k]), to_vec(ref.mtp_logits[k]));
    EXPECT_LE(ek.norm_err, tol::kModelParity) << "MTP logits k=" << k + 1;
  }
  // Next-token loss over each sequence (targets = the following token, last position ignored).
  std::vector<int32_t> targets(ids.size(), -1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i + 1 < T; ++i) targets[size_t(b * T + i)] = ids[size_t(b * T + i + 1)];
  double lc = mean_ce(cpu_backend(), ref.logits, targets), lg = mean_ce(cuda_backend(), got.logits, targets);
  EXPECT_LE(std::fabs(lg - lc), tol::kModelParity * std::fabs(lc)) << "loss cpu " << lc << " gpu " << lg;
}

}  // namespace
}  // namespace dsv3::test
