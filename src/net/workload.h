// Workloads turned into flows. Flows are aggregated per connection (NIC pair per plane, GPU pair
// inside a node): forwarding through a GPU (PXN, DeepEP's NVLink hop) is modelled as two pipelined
// stages, an IB flow and an NVLink flow, which run concurrently and share no link.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "net/maxmin.h"
#include "net/routing.h"
#include "net/topology.h"

namespace dsv3::net {

enum FlowTag : uint8_t { TagIB = 0, TagNVL = 1 };

struct FlowBuilder {
  FlowBuilder(const Network& n, Router& r) : net(n), router(r) {}
  const Network& net;
  Router& router;
  FlowSet fs;
  std::vector<int32_t> lk;
  std::vector<float> cf;
  int64_t rerouted = 0;  // flows moved to another plane because theirs was cut (PXN fallback)
  int64_t unroutable = 0;
  int32_t failed_link = -1;  // any failed link, found at the first unroutable flow: where such flows stall

  // IB flow NIC a -> NIC b. On multi-plane networks, a cut pair is forwarded over NVLink through
  // the first plane that connects both nodes.
  void ib(int a, int b, double bytes, uint64_t key);
  void nvl(int gpu_a, int gpu_b, double bytes);
};

// Uniform all-to-all: every GPU sends `bytes` to every other GPU. pxn = NCCL PXN (inter-node
// traffic leaves through the NIC on the destination's rail/plane after an NVLink hop); without
// it every GPU pair is its own flow from its own NIC (single-plane networks only).
FlowSet all_to_all(const Network& n, Router& r, double bytes, bool pxn, int64_t* rerouted = nullptr);

// Random permutation among NICs (one flow per NIC).
FlowSet permutation(const Network& n, Router& r, double bytes, uint64_t seed);

// Ring all-reduce of `bytes` per GPU: one ring per GPU rank c (channel), inter-node hop through the
// rank-c NIC, each hop carrying 2 (n-1)/n × bytes / channels.
FlowSet ring_allreduce(const Network& n, Router& r, double bytes);

// DeepEP-style MoE (normal kernels), expert parallelism over all GPUs of the network.
struct MoeParams {
  int tokens_per_gpu = 4096;
  int hidden = 7168;
  int experts = 0;       // 0 = max(256, GPUs): V3's 256 up to EP 256, then one per GPU
  int topk = 8;
  int node_limit = 4;    // M: nodes per token
  double zipf = 0;       // expert-popularity skew (0 = uniform)
  uint64_t seed = 1;
  int dispatch_bytes() const { return hidden + hidden / 128 * 4; }  // FP8 + fp32 scale per 128
  int combine_bytes() const { return hidden * 2; }                   // BF16
};

// Routing decisions: token t (ordered by source GPU, tokens_per_gpu each) -> topk expert ids.
struct ExpertRouting {
  int tokens = 0, topk = 0, experts = 0;
  std::vector<int32_t> ids;  // tokens × topk
};

// Synthetic node-limited routing (see docs/network.md): experts drawn by popularity (Zipf with a
// seeded random ranking) until `node_limit` distinct nodes are hit, the rest drawn inside those
// nodes; no repeats.
ExpertRouting synthetic_routing(const MoeParams& p, int gpus, int gpus_per_node);
int moe_experts(const MoeParams& p, int gpus);  // resolves experts = 0

// Trace file: per-layer per-token expert ids (see docs/network.md). JSON
// {"format":"dsv3-routing-v1","experts":E,"topk":K,"layers":[[[e,...],...],...]} or binary
// "DSV3RTE1", u32 layers, u32 tokens, u32 topk, u32 experts, i32 ids[layers][tokens][topk] (LE).
std::vector<ExpertRouting> load_routing_trace(const std::string& path);
void save_routing_trace(const std::string& path, const std::vector<ExpertRouting>& layers, bool binary);

struct MoeFlows {
  FlowSet dispatch, combine;
  double rdma_bytes_per_gpu = 0;  // mean dispatch bytes a GPU sends over IB
  double nvl_bytes_per_gpu = 0;
  double remote_nodes_per_token = 0;
  double recv_imbalance = 0;  // max / mean tokens received per GPU
};
// `trace` = nullptr: synthetic routing generated on the fly (never stored, so 16K GPUs fit).
MoeFlows moe_flows(const Network& n, Router& r, const MoeParams& p, const ExpertRouting* trace = nullptr);

}  // namespace dsv3::net
