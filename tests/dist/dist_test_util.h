// Shared pieces of the distributed tests: a tiny MoE config, deterministic inputs, and a runner
// that drives one simulated rank per thread.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "backend/ops.h"
#include "core/rng.h"
#include "dist/communicator.h"
#include "model/config.h"
#include "model/model.h"
#include "model/weights.h"

namespace dsv3::test {

// n_routed_experts / num_experts_per_tok / n_group / topk_group are substituted.
inline ModelConfig tiny_moe_config(int experts, int top_k, int n_group = 1, int topk_group = 1, int shared = 1) {
  const std::string j = std::string(R"({
  "model_type": "deepseek_v3", "vocab_size": 53, "hidden_size": 24, "intermediate_size": 32,
  "moe_intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
  "q_lora_rank": 16, "kv_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6,
  "n_routed_experts": )") + std::to_string(experts) + R"(, "n_shared_experts": )" + std::to_string(shared) +
                        R"(, "num_experts_per_tok": )" + std::to_string(top_k) + R"(, "n_group": )" +
                        std::to_string(n_group) + R"(, "topk_group": )" + std::to_string(topk_group) + R"(,
  "routed_scaling_factor": 2.5, "norm_topk_prob": true, "first_k_dense_replace": 1,
  "num_nextn_predict_layers": 0, "max_position_embeddings": 64, "rope_theta": 10000.0,
  "tie_word_embeddings": false
})";
  return parse_model_config(j, "tiny_moe");
}

inline Tensor random_rows(int64_t n, int64_t h, uint64_t seed, float scale = 1.0f) {
  Tensor t = Tensor::empty(DType::F32, {n, h});
  for (int64_t i = 0; i < n * h; ++i) t.data<float>()[i] = scale * rng_normal(seed, 0, uint64_t(i));
  return t;
}

inline bool same_bits(const Tensor& a, const Tensor& b) {
  return a.numel() == b.numel() && std::memcmp(a.data<float>(), b.data<float>(), size_t(a.numel()) * 4) == 0;
}

inline double max_rel_diff(const float* a, const float* b, int64_t n) {
  double worst = 0, scale = 1e-30;
  for (int64_t i = 0; i < n; ++i) scale = std::max(scale, double(std::fabs(b[i])));
  for (int64_t i = 0; i < n; ++i) worst = std::max(worst, std::fabs(double(a[i]) - double(b[i])) / scale);
  return worst;
}

// Whether the CPU backend's linear gives a row the same bits whatever rows share its call and
// wherever they sit in memory (for y = x·Wᵀ and for dW = dyᵀ·x over the same rows). "Expert
// parallelism equals the single process bit for bit" rests on it: a rank computes the router on
// its own tokens and an expert on rows received into its own buffers. OpenBLAS 0.3.21 has it where
// the bitwise tests were written; on an AMD EPYC (Zen kernels) it has not (measured 2026-11-30: a
// row of [20, 24]·[4, 24]ᵀ computed among 5 rows differs in the last bits), and there those tests
// hold the EP results to kEpTol instead, the bound they already check for regrouped sums.
constexpr double kEpTol = 2e-6;
inline bool probe_linear_rows_independent() {
  Backend& be = cpu_backend();
  struct Shape {
    int64_t t, k, n;
  };
  for (const Shape sh : {Shape{20, 24, 4}, Shape{20, 24, 12}, Shape{20, 12, 24}, Shape{35, 24, 24}}) {
    const Tensor x = random_rows(sh.t, sh.k, 1), w = random_rows(sh.n, sh.k, 2), dy = random_rows(sh.t, sh.n, 3);
    Tensor y = Tensor::empty(DType::F32, {sh.t, sh.n}), dw = Tensor::empty(DType::F32, {sh.n, sh.k});
    be.linear({x, w, Tensor(), y, false});
    for (const int64_t a : {int64_t(0), int64_t(1), int64_t(7)})
      for (const int64_t len : {int64_t(3), int64_t(5), int64_t(13)}) {  // (one row may take a GEMV path)
        if (a + len > sh.t) continue;
        // The rows at another offset of a fresh buffer (another alignment).
        Tensor xs = Tensor::empty(DType::F32, {len + 1, sh.k}), dys = Tensor::empty(DType::F32, {len + 1, sh.n});
        std::memcpy(xs.data<float>() + sh.k, x.data<float>() + a * sh.k, size_t(len * sh.k) * 4);
        std::memcpy(dys.data<float>() + sh.n, dy.data<float>() + a * sh.n, size_t(len * sh.n) * 4);
        Tensor ys = Tensor::empty(DType::F32, {len, sh.n}), dws = Tensor::empty(DType::F32, {sh.n, sh.k});
        be.linear({xs.rows(1, len + 1), w, Tensor(), ys, false});
        if (std::memcmp(ys.data<float>(), y.data<float>() + a * sh.n, size_t(len * sh.n) * 4) != 0) return false;
        LinearBackwardArgs ref, got;
        ref.dy = dy.rows(a, a + len);
        ref.x = x.rows(a, a + len);
        ref.dw = dw;
        be.linear_backward(ref);
        got.dy = dys.rows(1, len + 1);
        got.x = xs.rows(1, len + 1);
        got.dw = dws;
        be.linear_backward(got);
        if (!same_bits(dw, dws)) return false;
      }
  }
  return true;
}
inline bool linear_rows_independent() {
  static const bool v = [] {
    const bool r = probe_linear_rows_independent();
    if (!r)
      std::fprintf(stderr, "note: the CPU's linear is not row-independent on this machine; expert-parallel "
                           "results are compared within %g, not bit for bit\n", kEpTol);
    return r;
  }();
  return v;
}
// got equals want bit for bit where linear_rows_independent(), else within kEpTol.
inline void expect_ep_equal(const Tensor& got, const Tensor& want, const std::string& what) {
  ASSERT_EQ(got.numel(), want.numel()) << what;
  if (linear_rows_independent())
    EXPECT_TRUE(same_bits(got, want)) << what;
  else
    EXPECT_LT(max_rel_diff(got.data<float>(), want.data<float>(), got.numel()), kEpTol)
        << what << " (the CPU's linear is not row-independent here: compared within kEpTol)";
}

// Runs fn(rank, comm) on one thread per rank; rethrows the first failure.
inline void run_ranks(std::vector<std::unique_ptr<Communicator>>& world,
                      const std::function<void(int, Communicator&)>& fn) {
  std::vector<std::exception_ptr> err(world.size());
  std::vector<std::thread> th;
  for (size_t r = 0; r < world.size(); ++r)
    th.emplace_back([&, r] {
      try {
        fn(int(r), *world[r]);
      } catch (...) {
        err[r] = std::current_exception();
      }
    });
  for (auto& t : th) t.join();
  for (auto& e : err)
    if (e) std::rethrow_exception(e);
}

}  // namespace dsv3::test
