// Shared pieces of the distributed tests: a tiny MoE config, deterministic inputs, and a runner
// that drives one simulated rank per thread.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <exception>
#include <functional>
#include <string>
#include <thread>
#include <vector>

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
