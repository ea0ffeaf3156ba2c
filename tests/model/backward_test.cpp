// The backward pass: whole-model gradient parity with PyTorch autograd on every non-FP8 HF fixture
// (tests/data/fixtures/*/expected.safetensors: loss_total and grad.<hub name>, float64 reference),
// and central finite differences of the total loss (with MTP and the balance loss) on a tiny
// random F32 model.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>

#include "io/safetensors.h"
#include "model/loss.h"
#include "model/model.h"
#include "model/weights.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

std::vector<std::string> grad_fixture_dirs() {
  std::vector<std::string> out;
  const fs::path root = fs::path(DSV3_SOURCE_DIR) / "tests" / "data" / "fixtures";
  if (!fs::is_directory(root)) return out;
  for (const auto& e : fs::directory_iterator(root)) {
    if (!fs::exists(e.path() / "expected.safetensors")) continue;
    SafetensorsFile f = SafetensorsFile::open((e.path() / "expected.safetensors").string());
    if (f.find("loss_total")) out.push_back(e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// ‖a − b‖₂ / ‖b‖₂ (‖a − b‖₂ when b is zero).
double norm_rel_err(const Tensor& a, const Tensor& b) {
  if (!(a.shape() == b.shape())) return INFINITY;
  Tensor fa = a.to(DType::F32), fb = b.to(DType::F32);
  double num = 0, den = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double x = fa.data<float>()[i], y = fb.data<float>()[i];
    if (!std::isfinite(x)) return INFINITY;
    num += (x - y) * (x - y);
    den += y * y;
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

TEST(BackwardFixtures, LossAndEveryGradientMatchPyTorch) {
  const auto dirs = grad_fixture_dirs();
  ASSERT_GE(dirs.size(), 5u) << "expected the five non-FP8 fixtures with gradients";
  for (const std::string& dir : dirs) {
    SCOPED_TRACE(dir);
    const std::string fx = fs::path(dir).filename().string();
    Weights w = Weights::load(dir);
    SafetensorsFile exp = SafetensorsFile::open(dir + "/expected.safetensors");
    Tensor ids64 = exp.tensor("input_ids");
    std::vector<int32_t> ids;
    for (int64_t i = 0; i < ids64.numel(); ++i) ids.push_back(int32_t(ids64.data<int64_t>()[i]));
    const int64_t T = int64_t(ids.size());
    Model m(w, cpu_backend());
    ForwardOptions fo;
    fo.keep_activations = true;
    ForwardOutput out = m.forward(ids, 1, T, fo);
    LossOptions lo;
    lo.mtp_lambda = exp.tensor("mtp_lambda").data<float>()[0];
    LossResult r = compute_loss(cpu_backend(), m, out, ids, 1, T, T, lo);
    const double ref_total = exp.tensor("loss_total").data<float>()[0];
    const double ref_main = exp.tensor("loss_main").data<float>()[0];
    EXPECT_NEAR(r.main, ref_main, 1e-5 * std::fabs(ref_main)) << "loss_main";
    EXPECT_NEAR(r.total, ref_total, 1e-5 * std::fabs(ref_total)) << "loss_total";
    for (size_t k = 0; k < r.mtp.size(); ++k) {
      const double ref = exp.tensor(cat("loss_mtp_", k + 1)).data<float>()[0];
      EXPECT_NEAR(r.mtp[k], ref, 1e-5 * std::fabs(ref)) << "loss_mtp_" << k + 1;
    }

    Grads g(w.config());
    m.backward(r.grad, g);
    double worst = 0;
    std::string worst_name;
    int compared = 0;
    for (const Param& p : g.w.params()) {
      const std::string key = "grad." + p.spec.name;
      if (p.spec.kind == TensorKind::router_bias) {
        EXPECT_EQ(exp.find(key), nullptr) << key;
        continue;
      }
      ASSERT_NE(exp.find(key), nullptr) << "fixture lacks " << key;
      const double e = norm_rel_err(p.w, exp.tensor(key));
      EXPECT_LE(e, 1e-4) << p.spec.name;
      if (e > worst) worst = e, worst_name = p.spec.name;
      ++compared;
    }
    std::printf("  %-28s loss_total %.8f (ref %.8f)  %d grads, worst %.2e at %s\n", fx.c_str(), r.total,
                ref_total, compared, worst, worst_name.c_str());
  }
}

// ---------------------------------------------------------------------------------------------
// Finite differences on a tiny random model: every feature on, balance loss included.

const char* kTinyFd = R"({
  "model_type": "deepseek_v3", "vocab_size": 61, "hidden_size": 24, "intermediate_size": 40,
  "moe_intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
  "q_lora_rank": 16, "kv_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6,
  "n_routed_experts": 6, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 3, "topk_group": 2,
  "routed_scaling_factor": 2.5, "norm_topk_prob": true, "first_k_dense_replace": 1,
  "num_nextn_predict_layers": 2, "max_position_embeddings": 64, "rope_theta": 10000.0,
  "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16,
                   "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
  "tie_word_embeddings": false
})";

// Each named tensor's largest gradient element against central differences of the loss.
void check_finite_differences(double mtp_lambda, const std::vector<std::string>& names) {
  const ModelConfig c = parse_model_config(kTinyFd, "tiny_fd");
  Weights w = Weights::random(c, 11, 0.15f);
  for (Param& p : w.params())
    if (p.spec.kind == TensorKind::router_bias)
      for (int64_t i = 0; i < p.w.numel(); ++i) p.w.data<float>()[i] = 0.02f * float(i % 3);
  const int64_t B = 2, T = 7, Lb = T + 1;
  std::vector<int32_t> labels(size_t(B * Lb));
  for (size_t i = 0; i < labels.size(); ++i) labels[i] = int32_t((i * 37 + 5) % size_t(c.vocab_size));
  std::vector<int32_t> ids;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) ids.push_back(labels[size_t(b * Lb + t)]);
  LossOptions lo;
  lo.mtp_lambda = mtp_lambda;
  lo.balance_alpha = 0.05;  // large enough that its gradient shows
  ForwardOptions fo;
  fo.keep_activations = true;

  Model m(w, cpu_backend());
  auto loss_at = [&]() {
    ForwardOutput out = m.forward(ids, B, T, fo);
    LossOptions l2 = lo;
    l2.need_grad = false;
    return compute_loss(cpu_backend(), m, out, labels, B, T, Lb, l2).total;
  };
  ForwardOutput out = m.forward(ids, B, T, fo);
  LossResult r = compute_loss(cpu_backend(), m, out, labels, B, T, Lb, lo);
  Grads g(c);
  m.backward(r.grad, g);

  int checked = 0;
  for (const std::string& name : names) {
    SCOPED_TRACE(name);
    Param* p = w.find(name);
    ASSERT_NE(p, nullptr);
    const Tensor gt = g.get(name);
    // The element with the largest gradient (clear of FP32 noise).
    int64_t best = 0;
    for (int64_t i = 0; i < gt.numel(); ++i)
      if (std::fabs(gt.data<float>()[i]) > std::fabs(gt.data<float>()[best])) best = i;
    float* x = p->w.data<float>() + best;
    const float x0 = *x, h = 2e-3f * std::max(1.0f, std::fabs(x0));
    *x = x0 + h;
    const double lp = loss_at();
    *x = x0 - h;
    const double lm = loss_at();
    *x = x0;
    const double fd = (lp - lm) / (double(x0 + h) - double(x0 - h));
    const double an = gt.data<float>()[best];
    // FP32 forward: loss rounding ~1e-6 over a 4e-3 step, plus O(h²) curvature.
    EXPECT_NEAR(an, fd, 2e-2 * std::fabs(an) + 2e-4) << "element " << best;
    ++checked;
  }
  EXPECT_EQ(checked, int(names.size()));
}

TEST(BackwardFiniteDifference, WholeModelParameters) {
  check_finite_differences(
      0.3, {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.kv_b_proj.weight",
            "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.0.mlp.up_proj.weight",
            "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.2.down_proj.weight",
            "model.layers.1.mlp.shared_experts.gate_proj.weight", "model.layers.1.self_attn.kv_a_layernorm.weight",
            "model.layers.2.eh_proj.weight", "model.layers.2.hnorm.weight", "model.layers.3.enorm.weight",
            "model.layers.3.mlp.gate.weight", "model.layers.3.shared_head.norm.weight"});
}

// λ = 0 leaves the MTP modules' cross-entropy out, but their routers' balance loss is still in the
// total: its gradient reaches the modules' routers and, through them, the main model.
TEST(BackwardFiniteDifference, MtpRoutersBalanceLossWithoutMtpLoss) {
  check_finite_differences(0.0, {"model.layers.2.mlp.gate.weight", "model.layers.3.mlp.gate.weight",
                                 "model.layers.3.eh_proj.weight", "model.norm.weight"});
}

// A diverged MTP module (non-finite logits where it has targets) makes the total non-finite, as the
// main loss would, so the trainer sees a diverged step by its loss too; with λ = 0 it does not
// count, and a module without targets (its NaN "no target" mean) adds nothing.
TEST(Loss, MtpModuleCountsWhenItHasTargets) {
  const ModelConfig c = parse_model_config(kTinyFd, "tiny_fd");
  const Weights w = Weights::random(c, 11, 0.15f);
  Model m(w, cpu_backend());
  auto run = [&](int64_t T, int64_t Lb, double lambda, bool diverge) {
    std::vector<int32_t> labels(static_cast<size_t>(Lb)), ids;
    for (int64_t i = 0; i < Lb; ++i) labels[size_t(i)] = int32_t((i * 37 + 5) % c.vocab_size);
    ids.assign(labels.begin(), labels.begin() + T);
    ForwardOutput out = m.forward(ids, 1, T, ForwardOptions{});
    if (diverge) {
      Tensor& l = out.mtp_logits[0];
      std::fill(l.data<float>(), l.data<float>() + l.numel(), std::numeric_limits<float>::quiet_NaN());
    }
    LossOptions lo;
    lo.mtp_lambda = lambda;
    lo.balance_alpha = 0;
    lo.need_grad = false;
    return compute_loss(cpu_backend(), m, out, labels, 1, T, Lb, lo);
  };
  const LossResult fine = run(6, 7, 0.3, false);
  ASSERT_TRUE(std::isfinite(fine.mtp[0]) && std::isfinite(fine.mtp[1]));
  EXPECT_NEAR(fine.total, fine.main + 0.15 * (fine.mtp[0] + fine.mtp[1]), 1e-12 * fine.total);
  const LossResult diverged = run(6, 7, 0.3, true);
  EXPECT_TRUE(std::isnan(diverged.mtp[0]));
  EXPECT_TRUE(std::isnan(diverged.total));
  const LossResult unweighted = run(6, 7, 0.0, true);
  EXPECT_EQ(unweighted.total, unweighted.main);
  const LossResult no_targets = run(2, 2, 0.3, false);  // module 1 sees no label past the window
  ASSERT_EQ(no_targets.mtp.size(), 1u);                  // (module 2 has no position at T 2)
  EXPECT_TRUE(std::isnan(no_targets.mtp[0]));
  EXPECT_EQ(no_targets.total, no_targets.main);
}

}  // namespace
}  // namespace dsv3
