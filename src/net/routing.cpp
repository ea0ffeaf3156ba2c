#include "net/routing.h"

#include <algorithm>
#include <queue>
#include <unordered_map>

#include "core/error.h"
#include "core/rng.h"

namespace dsv3::net {

const char* routing_name(Routing r) {
  switch (r) {
    case Routing::ECMP: return "ecmp";
    case Routing::Adaptive: return "adaptive";
    case Routing::Spray: return "spray";
  }
  return "?";
}

Routing parse_routing(const std::string& s) {
  if (s == "ecmp") return Routing::ECMP;
  if (s == "adaptive" || s == "ar") return Routing::Adaptive;
  if (s == "spray" || s == "spraying") return Routing::Spray;
  input_error("--routing: unknown '", s, "' (expected ecmp, adaptive or spray)");
}

Router::Router(const Network& n, Routing mode, uint64_t seed) : n_(n), mode_(mode), seed_(seed) {
  const int S = n.switches;
  leaf_idx_.assign(S, -1);
  std::vector<int> leaves;
  for (int i = 0; i < n.nics; ++i) {
    int s = n.nic_leaf[i] - n.nics;
    if (leaf_idx_[s] < 0) leaf_idx_[s] = (int)leaves.size(), leaves.push_back(s);
  }
  dist_.assign((size_t)leaves.size() * S, 255);
  std::vector<int> qu(S);
  for (size_t li = 0; li < leaves.size(); ++li) {
    uint8_t* d = &dist_[li * S];
    size_t head = 0, tail = 0;
    d[leaves[li]] = 0;
    qu[tail++] = leaves[li];
    while (head < tail) {
      int u = qu[head++], vu = u + n.nics;
      for (int e = n.out_off[vu]; e < n.out_off[vu + 1]; ++e) {
        const Link& l = n.links[n.out_link[e]];
        if (!l.up || l.kind != LinkKind::SwSw) continue;
        int w = l.to - n.nics;
        if (d[w] == 255) d[w] = (uint8_t)(d[u] + 1), qu[tail++] = w;
      }
    }
  }
  if (mode == Routing::Adaptive) load_.assign(n.links.size(), 0.0);
  if ((size_t)leaves.size() * S <= (size_t)64 << 20) nh_idx_.assign((size_t)leaves.size() * S, -1);
}

bool Router::prepare_concurrent() {
  if (mode_ == Routing::Adaptive || nh_idx_.empty()) return false;
  for (int s = 0; s < n_.switches; ++s)
    if (leaf_idx_[s] >= 0)
      for (int u = 0; u < n_.switches; ++u) next_hops(u + n_.nics, s + n_.nics);
  return true;
}

std::span<const int32_t> Router::next_hops(int u, int dst) {
  const size_t key = (size_t)leaf_idx_[dst - n_.nics] * n_.switches + (u - n_.nics);
  if (!nh_idx_.empty() && nh_idx_[key] >= 0) {
    const int32_t* p = &nh_pool_[nh_idx_[key]];
    return {p + 1, (size_t)p[0]};
  }
  cand_.clear();
  int du = dist(dst, u);
  for (int e = n_.out_off[u]; e < n_.out_off[u + 1]; ++e) {
    const Link& l = n_.links[n_.out_link[e]];
    if (l.up && l.kind == LinkKind::SwSw && dist(dst, l.to) == du - 1) cand_.push_back(n_.out_link[e]);
  }
  if (nh_idx_.empty()) return cand_;
  nh_idx_[key] = (int32_t)nh_pool_.size();
  nh_pool_.push_back((int32_t)cand_.size());
  nh_pool_.insert(nh_pool_.end(), cand_.begin(), cand_.end());
  return {nh_pool_.data() + nh_idx_[key] + 1, cand_.size()};
}

int Router::dist(int leaf_vertex, int sw_vertex) const {
  int li = leaf_idx_[leaf_vertex - n_.nics];
  return dist_[(size_t)li * n_.switches + (sw_vertex - n_.nics)];
}

bool Router::reachable(int a, int b) const {
  const Link& up = n_.links[n_.nic_up[a]];
  const Link& dn = n_.links[n_.nic_down[b]];
  return up.up && dn.up && dist(n_.nic_leaf[b], n_.nic_leaf[a]) != 255;
}

bool Router::route(int a, int b, double bytes, uint64_t key, std::vector<int32_t>& links,
                   std::vector<float>& coefs, int* crossed) {
  if (!reachable(a, b)) return false;
  const int src = n_.nic_leaf[a], dst = n_.nic_leaf[b];
  int d0 = dist(dst, src);
  if (crossed) *crossed = d0 + 1;
  links.push_back(n_.nic_up[a]);
  coefs.push_back(1.0f);
  if (mode_ == Routing::Spray) {
    std::unordered_map<int, double> frac{{src, 1.0}}, next;
    for (int h = d0; h > 0; --h) {
      next.clear();
      for (auto [u, w] : frac) {
        auto cand = next_hops(u, dst);
        double share = w / (double)cand.size();
        for (int l : cand) {
          links.push_back(l);
          coefs.push_back((float)share);
          next[n_.links[l].to] += share;
        }
      }
      std::swap(frac, next);
    }
  } else {
    int u = src, hop = 0;
    const size_t first = links.size();
    while (u != dst) {
      auto cand = next_hops(u, dst);
      DSV3_CHECK(!cand.empty(), "no next hop on a reachable path");
      int pick;
      if (mode_ == Routing::ECMP) {
        pick = cand[rng_u64(seed_, key, (uint64_t)hop) % cand.size()];
      } else {
        size_t off = rng_u64(seed_, key, (uint64_t)hop) % cand.size();
        pick = cand[off];
        for (size_t i = 0; i < cand.size(); ++i) {
          int c = cand[(off + i) % cand.size()];
          if (load_[c] < load_[pick]) pick = c;
        }
      }
      links.push_back(pick);
      coefs.push_back(1.0f);
      u = n_.links[pick].to;
      ++hop;
    }
    if (mode_ == Routing::Adaptive)
      for (size_t i = first; i < links.size(); ++i) load_[links[i]] += bytes;
  }
  links.push_back(n_.nic_down[b]);
  coefs.push_back(1.0f);
  return true;
}

}  // namespace dsv3::net
