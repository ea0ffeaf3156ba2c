#include "net/maxmin.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.h"
#include "core/threads.h"

namespace dsv3::net {

void FlowSet::add(std::span<const int32_t> links, std::span<const float> coefs, double bytes, uint8_t tg,
                  int32_t s, int32_t d) {
  bool unit = std::all_of(coefs.begin(), coefs.end(), [](float c) { return c == 1.0f; });
  bool weighted = !coef.empty() || !unit;
  if (weighted) coef.resize(link.size(), 1.0f);
  link.insert(link.end(), links.begin(), links.end());
  if (weighted) {
    if (coefs.empty()) coef.insert(coef.end(), links.size(), 1.0f);
    else coef.insert(coef.end(), coefs.begin(), coefs.end());
  }
  off.push_back(link.size());
  size.push_back(bytes);
  tag.push_back(tg);
  src.push_back(s);
  dst.push_back(d);
}

void FlowSet::reserve(size_t flows, size_t entries) {
  off.reserve(flows + 1);
  size.reserve(flows);
  tag.reserve(flows);
  src.reserve(flows);
  dst.reserve(flows);
  link.reserve(entries);
}

void FlowSet::append(const FlowSet& o) {
  bool weighted = !coef.empty() || !o.coef.empty();
  if (weighted) coef.resize(link.size(), 1.0f);
  uint64_t base = link.size();
  link.insert(link.end(), o.link.begin(), o.link.end());
  if (weighted) {
    if (o.coef.empty()) coef.insert(coef.end(), o.link.size(), 1.0f);
    else coef.insert(coef.end(), o.coef.begin(), o.coef.end());
  }
  for (size_t f = 1; f < o.off.size(); ++f) off.push_back(base + o.off[f]);
  size.insert(size.end(), o.size.begin(), o.size.end());
  tag.insert(tag.end(), o.tag.begin(), o.tag.end());
  src.insert(src.end(), o.src.begin(), o.src.end());
  dst.insert(dst.end(), o.dst.begin(), o.dst.end());
}

namespace {

// Union-find over links; returns the flows of each component.
std::vector<std::vector<int32_t>> components(const FlowSet& fs, size_t nlinks) {
  std::vector<int32_t> parent(nlinks);
  std::iota(parent.begin(), parent.end(), 0);
  auto find = [&](int32_t x) {
    while (parent[x] != x) x = parent[x] = parent[parent[x]];
    return x;
  };
  for (size_t f = 0; f < fs.count(); ++f) {
    auto ls = fs.links_of(f);
    for (size_t i = 1; i < ls.size(); ++i) {
      int32_t a = find(ls[0]), b = find(ls[i]);
      if (a != b) parent[a] = b;
    }
  }
  std::vector<int32_t> comp_of_root(nlinks, -1);
  std::vector<std::vector<int32_t>> comps;
  std::vector<int32_t> lonely;  // flows without links
  for (size_t f = 0; f < fs.count(); ++f) {
    auto ls = fs.links_of(f);
    if (ls.empty()) {
      lonely.push_back((int32_t)f);
      continue;
    }
    int32_t r = find(ls[0]);
    if (comp_of_root[r] < 0) comp_of_root[r] = (int32_t)comps.size(), comps.emplace_back();
    comps[comp_of_root[r]].push_back((int32_t)f);
  }
  if (!lonely.empty()) comps.push_back(std::move(lonely));
  return comps;
}

// One component: link incidence built once, then any number of solves over the still-active flows.
// Link ids stay global in the flow set; `map` (global -> local, -1 elsewhere, owned by the caller
// and restored on destruction) gives the component's compact link index.
struct Component {
  const FlowSet& fs;
  const std::vector<double>& cap;
  std::vector<int32_t>& map;
  std::vector<int32_t> flows;   // global flow ids
  std::vector<int32_t> links;   // local -> global link id
  std::vector<uint64_t> inc_off;  // local link -> entries
  std::vector<int32_t> inc_flow;  // local flow index
  std::vector<float> inc_coef;    // empty when every coefficient is 1

  Component(const FlowSet& f, const std::vector<double>& c, std::vector<int32_t>& m, std::vector<int32_t> ids)
      : fs(f), cap(c), map(m), flows(std::move(ids)) {
    for (int32_t g : flows)
      for (uint64_t e = fs.off[g]; e < fs.off[g + 1]; ++e) {
        int32_t l = fs.link[e];
        if (map[l] < 0) map[l] = (int32_t)links.size(), links.push_back(l);
      }
    inc_off.assign(links.size() + 1, 0);
    for (int32_t g : flows)
      for (uint64_t e = fs.off[g]; e < fs.off[g + 1]; ++e) ++inc_off[map[fs.link[e]] + 1];
    for (size_t l = 0; l < links.size(); ++l) inc_off[l + 1] += inc_off[l];
    inc_flow.resize(inc_off.back());
    if (!fs.coef.empty()) inc_coef.resize(inc_off.back());
    std::vector<uint64_t> pos(inc_off.begin(), inc_off.end() - 1);
    for (size_t i = 0; i < flows.size(); ++i)
      for (uint64_t e = fs.off[flows[i]]; e < fs.off[flows[i] + 1]; ++e) {
        uint64_t p = pos[map[fs.link[e]]]++;
        inc_flow[p] = (int32_t)i;
        if (!inc_coef.empty()) inc_coef[p] = fs.coef[e];
      }
  }
  ~Component() {
    for (int32_t l : links) map[l] = -1;
  }

  // Progressive filling over flows with active[i]; writes rate[i]. Returns the number of levels.
  int64_t solve(const std::vector<uint8_t>& active, std::vector<double>& rate) {
    const size_t L = links.size();
    std::vector<double> rem(L), wsum(L, 0);
    std::vector<int32_t> cnt(L, 0);
    for (size_t l = 0; l < L; ++l) {
      rem[l] = cap[links[l]];
      for (uint64_t e = inc_off[l]; e < inc_off[l + 1]; ++e)
        if (active[inc_flow[e]]) wsum[l] += inc_coef.empty() ? 1.0 : inc_coef[e], ++cnt[l];
    }
    std::vector<uint8_t> frozen(flows.size(), 0);
    for (size_t i = 0; i < flows.size(); ++i) {
      if (!active[i]) frozen[i] = 1;
      else if (fs.off[flows[i]] == fs.off[flows[i] + 1])
        rate[i] = std::numeric_limits<double>::infinity(), frozen[i] = 1;
    }
    std::vector<int32_t> live;
    for (size_t l = 0; l < L; ++l)
      if (cnt[l]) live.push_back((int32_t)l);
    int64_t rounds = 0;
    std::vector<int32_t> sat;
    while (!live.empty()) {
      double best = std::numeric_limits<double>::infinity();
      size_t w = 0;
      for (int32_t l : live) {
        if (!cnt[l]) continue;
        live[w++] = l;
        best = std::min(best, std::max(rem[l], 0.0) / wsum[l]);
      }
      live.resize(w);
      if (live.empty()) break;
      ++rounds;
      double thr = best * (1 + 1e-9) + 1e-300;
      sat.clear();
      for (int32_t l : live)
        if (std::max(rem[l], 0.0) / wsum[l] <= thr) sat.push_back(l);
      for (int32_t l : sat)
        for (uint64_t e = inc_off[l]; e < inc_off[l + 1]; ++e) {
          int32_t f = inc_flow[e];
          if (frozen[f]) continue;
          frozen[f] = 1;
          rate[f] = best;
          int32_t g = flows[f];
          for (uint64_t k = fs.off[g]; k < fs.off[g + 1]; ++k) {
            int32_t m = map[fs.link[k]];
            double c = fs.coef.empty() ? 1.0 : fs.coef[k];
            rem[m] -= c * best;
            wsum[m] -= c;
            --cnt[m];
          }
        }
    }
    return rounds;
  }
};

int resolve_threads(int t) { return t > 0 ? t : num_threads(); }

}  // namespace

std::vector<double> max_min_rates(const FlowSet& fs, const std::vector<double>& cap, MaxMinStats* st) {
  std::vector<double> rate(fs.count(), 0.0);
  auto comps = components(fs, cap.size());
  int64_t rounds = 0;
#pragma omp parallel num_threads(resolve_threads(0)) reduction(+ : rounds)
  {
    std::vector<int32_t> map(cap.size(), -1);
#pragma omp for schedule(dynamic, 1)
    for (size_t ci = 0; ci < comps.size(); ++ci) {
      Component c(fs, cap, map, std::move(comps[ci]));
      std::vector<uint8_t> active(c.flows.size(), 1);
      std::vector<double> r(c.flows.size(), 0.0);
      rounds += c.solve(active, r);
      for (size_t i = 0; i < c.flows.size(); ++i) rate[c.flows[i]] = r[i];
    }
  }
  if (st) st->rounds = rounds, st->components = (int)comps.size();
  return rate;
}

SimResult simulate_fluid(const FlowSet& fs, const std::vector<double>& cap, const SimOptions& o) {
  SimResult res;
  res.finish.assign(fs.count(), 0.0);
  auto comps = components(fs, cap.size());
  res.components = (int)comps.size();
  const double inf = std::numeric_limits<double>::infinity();
  int64_t events = 0, solves = 0, rounds = 0, stalled = 0;
#pragma omp parallel num_threads(resolve_threads(o.threads)) reduction(+ : events, solves, rounds, stalled)
  {
  std::vector<int32_t> map(cap.size(), -1);
#pragma omp for schedule(dynamic, 1)
  for (size_t ci = 0; ci < comps.size(); ++ci) {
    // Lower bound of this component: its most loaded link's bytes / capacity. The batching window
    // is batch_tol × max(now, bound), so a component needs at most about 1/batch_tol re-solves
    // after its bound has passed, however spread its flow sizes are.
    double bound = 0;
    {
      std::vector<double> load;
      std::vector<int32_t> ls;
      for (int32_t g : comps[ci])
        for (uint64_t e = fs.off[g]; e < fs.off[g + 1]; ++e) {
          int32_t l = fs.link[e];
          if (map[l] < 0) map[l] = (int32_t)ls.size(), ls.push_back(l), load.push_back(0);
          load[map[l]] += fs.size[g] * fs.coef_at(e);
        }
      for (size_t i = 0; i < ls.size(); ++i) {
        if (cap[ls[i]] > 0) bound = std::max(bound, load[i] / cap[ls[i]]);
        map[ls[i]] = -1;
      }
    }
    std::vector<int32_t> ids;
    std::vector<double> remaining;
    for (int32_t g : comps[ci])
      if (fs.size[g] > 0) ids.push_back(g), remaining.push_back(fs.size[g]);
    comps[ci].clear();
    comps[ci].shrink_to_fit();
    double t = 0;
    // Rebuild the incidence lists over the flows still running whenever half of them finished, so
    // late re-solves cost what is left, not what was there.
    while (!ids.empty()) {
      Component c(fs, cap, map, ids);
      const size_t F = c.flows.size();
      std::vector<double> rate(F, 0.0);
      std::vector<uint8_t> active(F, 1);
      size_t left = F;
      bool stall = false;
      while (left && left * 2 > F) {
        rounds += c.solve(active, rate);
        ++solves;
        double dt = inf;
        for (size_t i = 0; i < F; ++i)
          if (active[i] && rate[i] > 0) dt = std::min(dt, remaining[i] / rate[i]);
        if (dt == inf) {  // every remaining flow crosses a failed link
          for (size_t i = 0; i < F; ++i)
            if (active[i]) res.finish[c.flows[i]] = inf, ++stalled;
          stall = true;
          break;
        }
        ++events;
        double t_next = t + dt, cut = t_next + o.batch_tol * std::max(t_next, bound);
        for (size_t i = 0; i < F; ++i) {
          if (!active[i]) continue;
          double tf = rate[i] > 0 ? t + remaining[i] / rate[i] : inf;
          if (tf <= cut) {
            res.finish[c.flows[i]] = tf;
            active[i] = 0;
            --left;
          } else {
            remaining[i] -= rate[i] * dt;
          }
        }
        t = t_next;
      }
      if (stall) break;
      std::vector<int32_t> next;
      std::vector<double> rem2;
      for (size_t i = 0; i < F; ++i)
        if (active[i]) next.push_back(c.flows[i]), rem2.push_back(remaining[i]);
      ids.swap(next);
      remaining.swap(rem2);
    }
  }
  }
  res.events = events, res.solves = solves, res.rounds = rounds, res.stalled = (int)stalled;
  for (double f : res.finish)
    if (f > res.makespan) res.makespan = f;
  return res;
}

}  // namespace dsv3::net
