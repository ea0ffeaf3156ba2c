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
  auto next_hops = [&](int u) {
    cand_.clear();
    int du = dist(dst, u);
    for (int e = n_.out_off[u]; e < n_.out_off[u + 1]; ++e) {
      const Link& l = n_.links[n_.out_link[e]];
      if (l.up && l.kind == LinkKind::SwSw && dist(dst, l.to) == du - 1) cand_.push_back(n_.out_link[e]);
    }
  };
  if (mode_ == Routing::Spray) {
    std::unordered_map<int, double> frac{{src, 1.0}}, next;
    for (int h = d0; h > 0; --h) {
      next.clear();
      for (auto [u, w] : frac) {
        next_hops(u);
        double share = w / (double)cand_.size();
        for (int l : cand_) {
          links.push_back(l);
          coefs.push_back((float)share);
          next[n_.links[l].to] += share;
        }
      }
      std::swap(frac, next);
    }
  } else {
    int u = src, hop = 0;
    std::vector<int32_t> path;
    while (u != dst) {
      next_hops(u);
      DSV3_CHECK(!cand_.empty(), "no next hop on a reachable path");
      int pick;
      if (mode_ == Routing::ECMP) {
        pick = cand_[rng_u64(seed_, key, (uint64_t)hop) % cand_.size()];
      } else {
        size_t off = rng_u64(seed_, key, (uint64_t)hop) % cand_.size();
        pick = cand_[off];
        for (size_t i = 0; i < cand_.size(); ++i) {
          int c = cand_[(off + i) % cand_.size()];
          if (load_[c] < load_[pick]) pick = c;
        }
      }
      path.push_back(pick);
      u = n_.links[pick].to;
      ++hop;
    }
    for (int l : path) {
      links.push_back(l);
      coefs.push_back(1.0f);
      if (mode_ == Routing::Adaptive) load_[l] += bytes;
    }
  }
  links.push_back(n_.nic_down[b]);
  coefs.push_back(1.0f);
  return true;
}

}  // namespace dsv3::net
