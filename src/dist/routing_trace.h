// Routing traces for the network simulator (`dsv3 net sim --trace FILE`, src/net/workload.h):
// per MoE layer, per token, the routed expert ids the model picked. JSON form
//   {"format":"dsv3-routing-v1","experts":E,"topk":K,"layers":[[[e,...],...],...]}
// with tokens in row order (sequence-major), which the simulator assigns to source GPUs in
// consecutive blocks. Written atomically (a failed write leaves no partial file).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "model/model.h"

namespace dsv3 {

struct RoutingTrace {
  int64_t experts = 0, topk = 0;
  std::vector<int64_t> layer_index;          // hub layer index of each traced MoE layer
  std::vector<std::vector<int32_t>> ids;     // per traced layer: tokens × topk
};

// The routing of the main model's MoE layers in the activations of the last forward (which
// needs ForwardOptions::keep_activations). Appends the tokens to an existing trace (several
// forward passes, same layers) when `into` already holds layers.
void collect_routing(const Model& m, RoutingTrace& into);
void save_routing_trace_json(const std::string& path, const RoutingTrace& t);

}  // namespace dsv3
