#include "dist/routing_trace.h"

#include <nlohmann/json.hpp>

#include "io/atomic_file.h"

namespace dsv3 {

void collect_routing(const Model& m, RoutingTrace& into) {
  const ModelActs& acts = m.acts();
  into.experts = m.config().n_routed_experts;
  into.topk = m.config().num_experts_per_tok;
  size_t li = 0;
  for (size_t l = 0; l < acts.layers.size(); ++l) {
    const Tensor& ids_d = acts.layers[l].moe.ids;
    if (!present(ids_d)) continue;
    const Tensor ids = const_cast<Model&>(m).backend().to_host(ids_d);
    if (li == into.ids.size()) {
      into.ids.emplace_back();
      into.layer_index.push_back(int64_t(l));
    } else if (into.layer_index[li] != int64_t(l)) {
      internal_error("collect_routing: layer ", l, " where the trace has layer ", into.layer_index[li]);
    }
    into.ids[li].insert(into.ids[li].end(), ids.data<int32_t>(), ids.data<int32_t>() + ids.numel());
    ++li;
  }
  if (li == 0) input_error("routing trace: the model has no MoE layer activations (no MoE layers, or the forward did not keep activations)");
}

void save_routing_trace_json(const std::string& path, const RoutingTrace& t) {
  nlohmann::json j;
  j["format"] = "dsv3-routing-v1";
  j["experts"] = t.experts;
  j["topk"] = t.topk;
  j["layer_index"] = t.layer_index;
  j["layers"] = nlohmann::json::array();
  for (const auto& ids : t.ids) {
    nlohmann::json L = nlohmann::json::array();
    for (size_t i = 0; i + size_t(t.topk) <= ids.size(); i += size_t(t.topk))
      L.push_back(std::vector<int32_t>(ids.begin() + std::ptrdiff_t(i), ids.begin() + std::ptrdiff_t(i + size_t(t.topk))));
    j["layers"].push_back(std::move(L));
  }
  write_file_atomic(path, j.dump());
}

}  // namespace dsv3
