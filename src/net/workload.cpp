#include "net/workload.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <memory>
#include <numeric>

#include "core/error.h"
#include "core/rng.h"

namespace dsv3::net {

static uint64_t pair_key(int a, int b) { return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b; }

void FlowBuilder::ib(int a, int b, double bytes, uint64_t key) {
  if (bytes <= 0) return;
  lk.clear();
  cf.clear();
  if (router.route(a, b, bytes, key, lk, cf)) {
    fs.add(lk, cf, bytes, TagIB, a, b);
    return;
  }
  for (int p = 0; p < net.planes && net.planes > 1; ++p) {
    int a2 = net.nic_of(a, p), b2 = net.nic_of(b, p);
    if (a2 == a || !router.reachable(a2, b2)) continue;
    lk.clear();
    cf.clear();
    router.route(a2, b2, bytes, key, lk, cf);
    fs.add(lk, cf, bytes, TagIB, a2, b2);
    nvl(a, a2, bytes);
    nvl(b2, b, bytes);
    ++rerouted;
    return;
  }
  ++unroutable;
  // Kept visible on a failed link, so that it stalls (the NIC's own uplink is up unless the NIC or
  // its leaf failed: a pair cut by switch-switch failures ran at line rate on it).
  if (failed_link < 0) {
    const auto down = std::find_if(net.links.begin(), net.links.end(), [](const Link& l) { return !l.up; });
    if (down == net.links.end()) internal_error("flow ", a, " -> ", b, " is unroutable, yet no link has failed");
    failed_link = int32_t(down - net.links.begin());
  }
  lk.assign(1, failed_link);
  cf.assign(1, 1.0f);
  fs.add(lk, cf, bytes, TagIB, a, b);
}

void FlowBuilder::nvl(int a, int b, double bytes) {
  if (bytes <= 0 || a == b) return;
  int32_t l[2] = {net.nvl_up[a], net.nvl_down[b]};
  fs.add(l, {}, bytes, TagNVL, a, b);
}

FlowSet all_to_all(const Network& n, Router& r, double bytes, bool pxn, int64_t* rerouted) {
  FlowBuilder fb(n, r);
  const int G = n.gpus_per_node, N = n.nodes;
  if (pxn) {
    fb.fs.reserve((size_t)N * N * G + (size_t)N * G * G, (size_t)N * N * G * 5);
    for (int i = 0; i < N; ++i)
      for (int s = 0; s < G; ++s) {
        int a = i * G + s;
        for (int j = 0; j < N; ++j)
          if (j != i) fb.ib(a, j * G + s, bytes * G, pair_key(a, j * G + s));
        for (int t = 0; t < G; ++t)
          if (t != s) fb.nvl(i * G + t, a, bytes * N);
      }
  } else {
    if (n.planes > 1)
      input_error("--pxn: a multi-plane network cannot send across planes without forwarding; use --pxn");
    fb.fs.reserve((size_t)n.gpus * n.gpus, (size_t)n.gpus * n.gpus * 5);
    for (int a = 0; a < n.gpus; ++a)
      for (int b = 0; b < n.gpus; ++b) {
        if (a == b) continue;
        if (n.node_of(a) == n.node_of(b)) fb.nvl(a, b, bytes);
        else fb.ib(a, b, bytes, pair_key(a, b));
      }
  }
  if (rerouted) *rerouted = fb.rerouted;
  return std::move(fb.fs);
}

FlowSet permutation(const Network& n, Router& r, double bytes, uint64_t seed) {
  FlowBuilder fb(n, r);
  std::vector<int> perm(n.nics);
  std::iota(perm.begin(), perm.end(), 0);
  Rng rng{seed, 0};
  for (int i = n.nics - 1; i > 0; --i) std::swap(perm[i], perm[rng.below(i + 1)]);
  for (int a = 0; a < n.nics; ++a)
    if (perm[a] != a) fb.ib(a, perm[a], bytes, pair_key(a, perm[a]));
  return std::move(fb.fs);
}

FlowSet ring_allreduce(const Network& n, Router& r, double bytes) {
  FlowBuilder fb(n, r);
  const int G = n.gpus_per_node, N = n.nodes, tot = n.gpus;
  double hop = 2.0 * (tot - 1) / tot * bytes / G;
  for (int c = 0; c < G; ++c)
    for (int i = 0; i < N; ++i) {
      for (int k = 0; k + 1 < G; ++k) fb.nvl(i * G + (c + k) % G, i * G + (c + k + 1) % G, hop);
      fb.nvl(i * G + (c + G - 1) % G, i * G + c, hop);  // ring closure or PXN hop to the rail-c NIC
      if (N > 1) fb.ib(i * G + c, ((i + 1) % N) * G + c, hop, pair_key(i, c));
    }
  return std::move(fb.fs);
}

int moe_experts(const MoeParams& p, int gpus) {
  int e = p.experts ? p.experts : std::max(256, gpus);
  if (e % gpus) input_error("--experts ", e, ": must be a multiple of the EP size ", gpus);
  return e;
}

namespace {

// Walker alias table for O(1) weighted draws.
struct Alias {
  std::vector<double> prob;
  std::vector<int32_t> alias;
  explicit Alias(const std::vector<double>& w) {
    size_t n = w.size();
    double sum = std::accumulate(w.begin(), w.end(), 0.0);
    prob.resize(n);
    alias.assign(n, 0);
    std::vector<int32_t> small, large;
    std::vector<double> sc(n);
    for (size_t i = 0; i < n; ++i) {
      sc[i] = w[i] * n / sum;
      (sc[i] < 1 ? small : large).push_back((int32_t)i);
    }
    while (!small.empty() && !large.empty()) {
      int s = small.back(), l = large.back();
      small.pop_back();
      prob[s] = sc[s];
      alias[s] = l;
      sc[l] -= 1 - sc[s];
      if (sc[l] < 1) large.pop_back(), small.push_back(l);
    }
    for (int i : small) prob[i] = 1;
    for (int i : large) prob[i] = 1;
  }
  int draw(uint64_t u) const {
    size_t i = (u >> 32) % prob.size();
    double f = (double)(u & 0xffffffffu) / 4294967296.0;
    return f < prob[i] ? (int)i : alias[i];
  }
};

struct SyntheticRouter {
  const MoeParams& p;
  int E, gpus, G, nodes, per_node, M;
  std::vector<double> w;
  Alias alias;
  SyntheticRouter(const MoeParams& p_, int gpus_, int G_)
      : p(p_), E(moe_experts(p_, gpus_)), gpus(gpus_), G(G_), nodes(gpus_ / G_),
        per_node(E / nodes), M(std::min(p_.node_limit, gpus_ / G_)), w(make_w(p_, E)), alias(w) {
    if (M < 1) input_error("--node-limit ", p.node_limit, ": must be at least 1");
    if (p.topk < 1 || p.topk > E) input_error("--topk ", p.topk, ": must be in 1..", E);
    if ((int64_t)M * per_node < p.topk)
      input_error("--node-limit ", p.node_limit, ": ", M, " nodes hold only ", M * per_node, " experts, fewer than --topk ",
                  p.topk);
    if (M > 64) input_error("--node-limit ", p.node_limit, ": at most 64");
    if ((int64_t)M * per_node > 4096)
      input_error("--experts ", E, ": ", per_node, " experts per node × ", M, " nodes exceeds 4096 candidates per token");
  }
  static std::vector<double> make_w(const MoeParams& p, int E) {
    std::vector<int> rank(E);
    std::iota(rank.begin(), rank.end(), 0);
    Rng rng{p.seed, 7};
    for (int i = E - 1; i > 0; --i) std::swap(rank[i], rank[rng.below(i + 1)]);
    std::vector<double> w(E);
    for (int e = 0; e < E; ++e) w[e] = std::pow(rank[e] + 1.0, -p.zipf);
    return w;
  }
  // Fills out[0..topk) for global token t. Draw i of token t is rng_u64(seed, t, i); the per-token
  // part of that hash is computed once.
  void route(int64_t t, int32_t* out) const {
    const uint64_t base = splitmix64(p.seed ^ splitmix64((uint64_t)t));
    auto draw = [&](uint64_t i) { return splitmix64(base + i); };
    int chosen_nodes[64];
    int nn = 0, k = 0;
    uint64_t ctr = 0;
    auto has = [&](int e) {
      for (int i = 0; i < k; ++i)
        if (out[i] == e) return true;
      return false;
    };
    while (k < p.topk && nn < M) {
      int e = alias.draw(draw(ctr++));
      if (has(e)) continue;
      int nd = e / per_node;
      bool seen = false;
      for (int i = 0; i < nn; ++i) seen |= chosen_nodes[i] == nd;
      if (!seen) chosen_nodes[nn++] = nd;
      out[k++] = e;
    }
    if (k == p.topk) return;
    // The rest: weighted draws without replacement among the unchosen experts of the chosen nodes.
    // Candidates in node order, then expert order, skipping the k already chosen (each of which
    // lies in one of the chosen nodes: mark its slot instead of searching `out` per candidate).
    double cw[4096];
    int ce[4096], nc = 0, slot[64];
    for (int x = 0; x < k; ++x) {
      int nd = out[x] / per_node, i = 0;
      while (chosen_nodes[i] != nd) ++i;
      slot[x] = i * per_node + (out[x] - nd * per_node);
    }
    std::sort(slot, slot + k);
    double mass = 0;
    for (int i = 0, s = 0, x = 0; i < nn; ++i)
      for (int e = chosen_nodes[i] * per_node; e < (chosen_nodes[i] + 1) * per_node; ++e, ++s) {
        if (x < k && slot[x] == s) {
          ++x;
          continue;
        }
        ce[nc] = e, cw[nc] = w[e], mass += w[e], ++nc;
      }
    while (k < p.topk && nc > 0) {
      uint64_t u = draw(ctr++);
      double x = (double)(u >> 11) / 9007199254740992.0 * mass;
      int j = 0;
      while (j + 1 < nc && x >= cw[j]) x -= cw[j++];
      out[k++] = ce[j];
      mass -= cw[j];
      ce[j] = ce[nc - 1], cw[j] = cw[nc - 1], --nc;
    }
  }
};

}  // namespace

ExpertRouting synthetic_routing(const MoeParams& p, int gpus, int G) {
  SyntheticRouter sr(p, gpus, G);
  ExpertRouting r;
  r.tokens = gpus * p.tokens_per_gpu;
  r.topk = p.topk;
  r.experts = sr.E;
  r.ids.resize((size_t)r.tokens * r.topk);
  for (int64_t t = 0; t < r.tokens; ++t) sr.route(t, &r.ids[(size_t)t * r.topk]);
  return r;
}

MoeFlows moe_flows(const Network& n, Router& r, const MoeParams& p, const ExpertRouting* trace) {
  const int G = n.gpus_per_node, N = n.nodes, gpus = n.gpus;
  int E, K, T;
  std::unique_ptr<SyntheticRouter> sr;
  if (trace) {
    E = trace->experts, K = trace->topk;
    if (E % gpus) input_error("routing trace: ", E, " experts cannot be spread evenly over ", gpus, " GPUs");
    if (trace->tokens % gpus) input_error("routing trace: ", trace->tokens, " tokens are not a multiple of ", gpus, " GPUs");
    T = trace->tokens / gpus;
  } else {
    sr = std::make_unique<SyntheticRouter>(p, gpus, G);
    E = sr->E, K = p.topk, T = p.tokens_per_gpu;
  }
  if (K > 64) input_error("--topk ", K, ": at most 64");
  const int per_gpu = E / gpus;
  if (per_gpu < 1) input_error("--experts ", E, ": fewer experts than GPUs");
  const double db = p.dispatch_bytes(), cb = p.combine_bytes();
  if (trace)
    for (int32_t e : trace->ids)
      if (e < 0 || e >= E) input_error("routing trace: expert id ", e, " outside 0..", E - 1);
  std::vector<int64_t> nvl_cnt((size_t)N * G * G, 0), recv(gpus, 0);
  std::vector<int32_t> gpu_of(E), node_of(gpus);  // no divisions in the token loop
  for (int e = 0; e < E; ++e) gpu_of[e] = e / per_gpu;
  for (int g = 0; g < gpus; ++g) node_of[g] = g / G;
  FlowBuilder fd(n, r), fc(n, r);
  int64_t remote = 0, rdma_tok = 0, nvl_tok = 0;
  // Token routing runs in parallel over source GPUs, a chunk at a time. Each GPU's flows go to its
  // own slot and the slots are appended in GPU order, so the result does not depend on the thread
  // count; the IB flows are routed in the parallel part too unless the router needs them in order
  // (adaptive). Counters are per thread and summed at the end (integers: order-independent).
  const bool concurrent = r.prepare_concurrent();
  const int chunk = 256;
  std::vector<std::vector<std::pair<int32_t, int32_t>>> ib_list(chunk);  // (target node, tokens)
  std::vector<FlowBuilder> slot_d(chunk, FlowBuilder(n, r)), slot_c(chunk, FlowBuilder(n, r));
#pragma omp parallel reduction(+ : remote, rdma_tok, nvl_tok)
  {
    std::vector<int32_t> ib_cnt(N, 0), ids(K);
    std::vector<int64_t> my_nvl(nvl_cnt.size(), 0), my_recv(gpus, 0);
    auto emit = [&](int g, FlowBuilder& d, FlowBuilder& c) {
      for (auto [j, cnt] : ib_list[g % chunk]) {
        int b = j * G + g % G;
        d.ib(g, b, cnt * db, pair_key(g, b));
        c.ib(b, g, cnt * cb, pair_key(b, g));
      }
    };
    for (int g0 = 0; g0 < gpus; g0 += chunk) {
      int g1 = std::min(gpus, g0 + chunk);
#pragma omp for schedule(dynamic, 4)
      for (int g = g0; g < g1; ++g) {
        const int i = node_of[g], rk = g - i * G;
        auto& lst = ib_list[g - g0];
        lst.clear();
        for (int t = 0; t < T; ++t) {
          int64_t tok = (int64_t)g * T + t;
          const int32_t* e = trace ? &trace->ids[(size_t)tok * K] : (sr->route(tok, ids.data()), ids.data());
          int tg[64], nt = 0;
          for (int k = 0; k < K; ++k) {
            int gg = gpu_of[e[k]];
            bool seen = false;
            for (int x = 0; x < nt; ++x) seen |= tg[x] == gg;
            if (!seen) tg[nt++] = gg;
          }
          int nodes_hit[64], nn = 0;
          for (int x = 0; x < nt; ++x) {
            int j = node_of[tg[x]], tr = tg[x] - j * G;
            ++my_recv[tg[x]];
            bool seen = false;
            for (int y = 0; y < nn; ++y) seen |= nodes_hit[y] == j;
            if (!seen) {
              nodes_hit[nn++] = j;
              if (j != i) {
                if (!ib_cnt[j]++) lst.push_back({j, 0});
                ++remote, ++rdma_tok;
              }
            }
            if (tr != rk) {
              ++my_nvl[((size_t)j * G + rk) * G + tr];
              ++nvl_tok;
            }
          }
        }
        std::sort(lst.begin(), lst.end());
        for (auto& [j, c] : lst) c = ib_cnt[j], ib_cnt[j] = 0;
        if (concurrent) {
          slot_d[g - g0].fs.clear(), slot_c[g - g0].fs.clear();
          emit(g, slot_d[g - g0], slot_c[g - g0]);
        }
      }
      // The implicit barrier above ends the chunk; one thread collects it in GPU order.
#pragma omp single
      for (int g = g0; g < g1; ++g) {
        if (concurrent) {
          fd.fs.append(slot_d[g - g0].fs), fc.fs.append(slot_c[g - g0].fs);
          fd.rerouted += slot_d[g - g0].rerouted, fc.rerouted += slot_c[g - g0].rerouted;
          slot_d[g - g0].rerouted = slot_c[g - g0].rerouted = 0;
        } else {
          emit(g, fd, fc);
        }
      }
    }
#pragma omp critical
    {
      for (size_t x = 0; x < my_nvl.size(); ++x) nvl_cnt[x] += my_nvl[x];
      for (int x = 0; x < gpus; ++x) recv[x] += my_recv[x];
    }
  }
  for (int j = 0; j < N; ++j)
    for (int a = 0; a < G; ++a)
      for (int b = 0; b < G; ++b) {
        int64_t c = nvl_cnt[((size_t)j * G + a) * G + b];
        if (!c) continue;
        fd.nvl(j * G + a, j * G + b, c * db);
        fc.nvl(j * G + b, j * G + a, c * cb);
      }
  MoeFlows m;
  m.dispatch = std::move(fd.fs);
  m.combine = std::move(fc.fs);
  m.rdma_bytes_per_gpu = (double)rdma_tok * db / gpus;
  m.nvl_bytes_per_gpu = (double)nvl_tok * db / gpus;
  m.remote_nodes_per_token = (double)remote / ((double)gpus * T);
  double mean = 0, mx = 0;
  for (auto v : recv) mean += (double)v, mx = std::max(mx, (double)v);
  mean /= gpus;
  m.recv_imbalance = mean > 0 ? mx / mean : 0;
  return m;
}

std::vector<ExpertRouting> load_routing_trace(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) input_error("routing trace ", path, ": cannot open");
  char magic[8] = {};
  f.read(magic, 8);
  std::vector<ExpertRouting> out;
  if (f.gcount() == 8 && std::memcmp(magic, "DSV3RTE1", 8) == 0) {
    uint32_t hdr[4];
    f.read(reinterpret_cast<char*>(hdr), sizeof hdr);
    if (!f) input_error("routing trace ", path, ": truncated header (expected 4 u32 after the magic)");
    unsigned long long per = 0;
    if (mul_overflows(hdr[1], hdr[2], &per) || per > (1ull << 34))
      input_error("routing trace ", path, ": tokens × topk too large");
    auto fsize = std::filesystem::file_size(path);
    if (fsize != 24 + (uint64_t)hdr[0] * per * 4)
      input_error("routing trace ", path, ": size ", fsize, " bytes, expected ", 24 + (uint64_t)hdr[0] * per * 4,
                  " for ", hdr[0], " layers × ", hdr[1], " tokens × ", hdr[2], " experts");
    for (uint32_t l = 0; l < hdr[0]; ++l) {
      ExpertRouting r{(int)hdr[1], (int)hdr[2], (int)hdr[3], std::vector<int32_t>(per)};
      f.read(reinterpret_cast<char*>(r.ids.data()), (std::streamsize)(per * 4));
      out.push_back(std::move(r));
    }
  } else {
    f.clear();
    f.seekg(0);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(f);
    } catch (const std::exception& e) {
      input_error("routing trace ", path, ": neither binary (magic DSV3RTE1) nor valid JSON: ", e.what());
    }
    if (!j.is_object() || j.value("format", "") != "dsv3-routing-v1" || !j.contains("layers") ||
        !j["layers"].is_array() || !j.contains("experts") || !j.contains("topk"))
      input_error("routing trace ", path,
                  ": expected {\"format\":\"dsv3-routing-v1\",\"experts\":E,\"topk\":K,\"layers\":[[[ids]]]}");
    int E = j["experts"].get<int>(), K = j["topk"].get<int>();
    if (E < 1 || K < 1) input_error("routing trace ", path, ": experts and topk must be positive");
    for (size_t l = 0; l < j["layers"].size(); ++l) {
      auto& L = j["layers"][l];
      ExpertRouting r{(int)L.size(), K, E, {}};
      for (size_t t = 0; t < L.size(); ++t) {
        if (!L[t].is_array() || (int)L[t].size() != K)
          input_error("routing trace ", path, ": layer ", l, " token ", t, ": expected ", K, " expert ids");
        for (auto& v : L[t]) r.ids.push_back(v.get<int>());
      }
      out.push_back(std::move(r));
    }
  }
  for (size_t l = 0; l < out.size(); ++l)
    for (int32_t e : out[l].ids)
      if (e < 0 || e >= out[l].experts)
        input_error("routing trace ", path, ": layer ", l, ": expert id ", e, " outside 0..", out[l].experts - 1);
  if (out.empty()) input_error("routing trace ", path, ": no layers");
  return out;
}

void save_routing_trace(const std::string& path, const std::vector<ExpertRouting>& layers, bool binary) {
  std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    if (!f) input_error("routing trace ", path, ": cannot write");
    if (binary) {
      f.write("DSV3RTE1", 8);
      uint32_t hdr[4] = {(uint32_t)layers.size(), (uint32_t)(layers.empty() ? 0 : layers[0].tokens),
                         (uint32_t)(layers.empty() ? 0 : layers[0].topk),
                         (uint32_t)(layers.empty() ? 0 : layers[0].experts)};
      f.write(reinterpret_cast<const char*>(hdr), sizeof hdr);
      for (auto& l : layers) f.write(reinterpret_cast<const char*>(l.ids.data()), (std::streamsize)(l.ids.size() * 4));
    } else {
      nlohmann::json j;
      j["format"] = "dsv3-routing-v1";
      j["experts"] = layers.empty() ? 0 : layers[0].experts;
      j["topk"] = layers.empty() ? 0 : layers[0].topk;
      j["layers"] = nlohmann::json::array();
      for (auto& l : layers) {
        nlohmann::json L = nlohmann::json::array();
        for (int t = 0; t < l.tokens; ++t)
          L.push_back(std::vector<int32_t>(l.ids.begin() + (size_t)t * l.topk, l.ids.begin() + (size_t)(t + 1) * l.topk));
        j["layers"].push_back(std::move(L));
      }
      f << j.dump();
    }
    if (!f) input_error("routing trace ", path, ": write failed");
  }
  std::filesystem::rename(tmp, path);
}

}  // namespace dsv3::net
