#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "dist/routing_trace.h"
#include "dist_test_util.h"

namespace dsv3 {
namespace {

TEST(RoutingTrace, JsonHoldsEveryMoeLayersPicksPerToken) {
  const ModelConfig cfg = test::tiny_moe_config(4, 2);
  Weights w = Weights::random(cfg, 3, 0.2f);
  Model m(w, cpu_backend());
  ForwardOptions fo;
  fo.keep_activations = true;
  RoutingTrace t;
  const std::vector<int32_t> a{1, 5, 9, 2, 7}, b{3, 3, 8};
  m.forward(a, 1, int64_t(a.size()), fo);
  collect_routing(m, t);
  const Tensor ids_a = m.acts().layers[1].moe.ids.clone();
  m.forward(b, 1, int64_t(b.size()), fo);
  collect_routing(m, t);  // appends the second pass's tokens
  const Tensor ids_b = m.acts().layers[1].moe.ids.clone();

  const std::string path = (std::filesystem::temp_directory_path() / "dsv3_routing_trace_test.json").string();
  save_routing_trace_json(path, t);
  std::ifstream f(path);
  const nlohmann::json j = nlohmann::json::parse(f);
  EXPECT_EQ(j["format"], "dsv3-routing-v1");
  EXPECT_EQ(j["experts"], 4);
  EXPECT_EQ(j["topk"], 2);
  ASSERT_EQ(j["layers"].size(), size_t(1));  // layer 0 is dense (first_k_dense_replace = 1)
  EXPECT_EQ(j["layer_index"][0], 1);
  const auto& L = j["layers"][0];
  ASSERT_EQ(L.size(), a.size() + b.size());
  for (size_t tok = 0; tok < L.size(); ++tok)
    for (int k = 0; k < 2; ++k) {
      const int32_t want = tok < a.size() ? ids_a.data<int32_t>()[tok * 2 + size_t(k)]
                                          : ids_b.data<int32_t>()[(tok - a.size()) * 2 + size_t(k)];
      EXPECT_EQ(L[tok][size_t(k)].get<int32_t>(), want) << "token " << tok;
    }
  std::filesystem::remove(path);
}

TEST(RoutingTrace, WithoutActivationsIsAnInputError) {
  const ModelConfig cfg = test::tiny_moe_config(4, 2);
  Weights w = Weights::random(cfg, 3, 0.2f);
  Model m(w, cpu_backend());
  const std::vector<int32_t> a{1, 2};
  m.forward(a, 1, 2);
  RoutingTrace t;
  EXPECT_THROW(collect_routing(m, t), InputError);
}

}  // namespace
}  // namespace dsv3
