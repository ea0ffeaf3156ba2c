// Network topologies: closed-form counts (for the cost model and any size) and an explicit graph
// (for validation and the flow simulator). Endpoints are NIC ports; GPUs sit behind NICs, and the
// GPUs of one node share an NVLink switch (scale-up domain) modelled as one egress and one ingress
// link per GPU.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dsv3::net {

enum class TopoKind { FT2, MPFT, MRFT, FT3, SF, DF };

const char* topo_name(TopoKind k);
// Parses ft2|mpft|mrft|ft3|sf|df; InputError naming `what` otherwise.
TopoKind parse_topo(const std::string& s, const std::string& what = "--topology");

struct TopoSpec {
  TopoKind kind = TopoKind::FT2;
  int radix = 64;          // switch ports
  int planes = 8;          // MPFT planes (one NIC per GPU per plane); MRFT rails
  int gpus_per_node = 8;   // GPUs (and NICs) per node
  int64_t endpoints = 0;   // 0 = the largest the topology supports (the cost-table convention)
  int q = 0;               // Slim Fly: 0 = largest q whose radix fits
  bool exact = false;      // Slim Fly: require q to be a prime power (constructible)
  int df_p = 0, df_a = 0, df_h = 0, df_g = 0;  // Dragonfly; 0 = balanced from the radix
};

// Closed-form counts. `links` counts switch-to-switch links only (the Table 3 convention).
struct TopoCounts {
  int64_t endpoints = 0, switches = 0, links = 0;
  int radix_used = 0;       // ports per switch actually needed
  int diameter = 0;         // switch-to-switch hops between the farthest endpoints' switches
  double bisection = 0;     // links across the natural bisection
  std::vector<std::string> warnings;
  // Slim Fly / Dragonfly parameters as resolved.
  int q = 0, sf_kprime = 0, sf_p = 0;
  int df_p = 0, df_a = 0, df_h = 0, df_g = 0;
};

// Throws InputError naming the parameter for impossible requests.
TopoCounts topo_counts(const TopoSpec& s);

bool is_prime_power(int q, int* p = nullptr, int* m = nullptr);

enum class LinkKind : uint8_t { NicUp, NicDown, SwSw, NvlUp, NvlDown };

struct Link {
  int32_t from, to;  // vertex ids
  double cap;        // bytes per second
  LinkKind kind;
  int16_t plane;
  bool up = true;
  int32_t twin = -1;  // reverse direction
};

struct NetParams {
  double nic_bw = 50e9;     // bytes/s per NIC port and switch port (400 Gb/s usable)
  double nvlink_bw = 160e9;  // bytes/s per GPU into/out of the NVLink domain
  bool rail_placement = false;  // MRFT: NIC r of every node on rail-r leaves
};

// Explicit graph. Vertices: [0, nics) NICs, [nics, nics+switches) switches, then one NVLink
// switch per node. GPU g = node*gpus_per_node + rank. NIC of GPU g in plane p:
// nic_of(g, p) (p is ignored for single-plane networks).
struct Network {
  TopoSpec spec;
  NetParams params;
  int planes = 1;
  int gpus = 0, gpus_per_node = 8, nodes = 0;
  int nics = 0, switches = 0;
  std::vector<Link> links;
  std::vector<int32_t> out_off, out_link;  // CSR of out-links per vertex
  std::vector<int32_t> nic_leaf;           // switch vertex of each NIC
  std::vector<int16_t> sw_plane;           // plane of each switch (index - nics)
  std::vector<int8_t> sw_layer;            // 0 leaf/router, 1 spine/agg, 2 core
  std::vector<int32_t> nic_up, nic_down;   // link ids per NIC
  std::vector<int32_t> nvl_up, nvl_down;   // link ids per GPU
  int64_t swsw_links = 0;                  // undirected switch-switch links

  int nic_of(int gpu, int plane) const;
  int plane_of_nic(int nic) const { return sw_plane[nic_leaf[nic] - nics]; }
  int node_of(int gpu) const { return gpu / gpus_per_node; }
  int vertices() const { return nics + switches + nodes; }
  void rebuild_csr();
};

// Builds the explicit graph for `gpus` GPUs (NIC endpoints = gpus × planes for MPFT, else gpus).
// Fat trees are built partially populated (as many leaves/pods as needed, non-blocking).
Network build_network(const TopoSpec& s, int gpus, const NetParams& p = {});

struct Validation {
  int min_degree = 0, max_degree = 0;  // switch ports used
  int diameter = 0;                    // switch hops, BFS from one switch of each class
  int64_t bisection_links = 0;         // links across the natural cut
  bool connected = true;
};
// Checks ports per switch ≤ radix (InternalError otherwise) and measures the rest.
Validation validate(const Network& n, int bfs_sources = 8);

// Failures. Each fails both directions of the chosen links; returns the number of cables failed.
int fail_random_links(Network& n, double fraction, uint64_t seed);  // switch-switch links only
void fail_switch(Network& n, int switch_index);
void fail_plane(Network& n, int plane);
void fail_link(Network& n, int link_id);

}  // namespace dsv3::net
