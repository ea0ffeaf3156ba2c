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

void FlowSet::clear() {
  off.assign(1, 0);
  link.clear(), coef.clear(), size.clear(), tag.clear(), src.clear(), dst.clear();
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

// Connected components over links (union-find), as a flat list: flows of component c are
// flows[off[c] .. off[c+1]), in increasing id order; flows without links form the last one.
struct Components {
  std::vector<uint64_t> off{0};
  std::vector<int32_t> flows;
  size_t count() const { return off.size() - 1; }
};

Components components(const FlowSet& fs, size_t nlinks) {
  std::vector<int32_t> parent(nlinks);
  std::iota(parent.begin(), parent.end(), 0);
  auto find = [&](int32_t x) {
    while (parent[x] != x) x = parent[x] = parent[parent[x]];
    return x;
  };
  const size_t F = fs.count();
  for (size_t f = 0; f < F; ++f) {
    uint64_t b = fs.off[f], e = fs.off[f + 1];
    for (uint64_t i = b + 1; i < e; ++i) {
      int32_t a = find(fs.link[b]), c = find(fs.link[i]);
      if (a != c) parent[a] = c;
    }
  }
  // Component of each flow, numbered in order of first appearance; then a counting sort.
  std::vector<int32_t> comp_of_root(nlinks, -1), comp(F);
  int32_t nc = 0;
  bool lonely = false;
  for (size_t f = 0; f < F; ++f) {
    if (fs.off[f] == fs.off[f + 1]) {
      comp[f] = -1, lonely = true;
      continue;
    }
    int32_t r = find(fs.link[fs.off[f]]);
    if (comp_of_root[r] < 0) comp_of_root[r] = nc++;
    comp[f] = comp_of_root[r];
  }
  const int32_t total = nc + (lonely ? 1 : 0);
  Components c;
  c.off.assign(total + 1, 0);
  for (size_t f = 0; f < F; ++f) ++c.off[(comp[f] < 0 ? nc : comp[f]) + 1];
  for (int32_t i = 0; i < total; ++i) c.off[i + 1] += c.off[i];
  c.flows.resize(F);
  std::vector<uint64_t> pos(c.off.begin(), c.off.end() - 1);
  for (size_t f = 0; f < F; ++f) c.flows[pos[comp[f] < 0 ? nc : comp[f]]++] = (int32_t)f;
  return c;
}

// One component with compact local numbering: per-flow link lists (local link ids) and per-link
// incidence lists (local flow ids), both flat. Local links are numbered in order of first
// appearance and incidence lists are in flow order, so the filling order (and therefore every
// rounding) is the same however the component is reached. `map` (global -> local link, -1
// elsewhere) is the caller's scratch, restored before construction returns.
struct Component {
  std::vector<int32_t> flows;  // local -> global flow id
  std::vector<int32_t> links;  // local -> global link id
  std::vector<uint64_t> fo;    // flow -> entries
  std::vector<int32_t> fl;     // local link of each entry
  std::vector<float> fc;       // coefficient of each entry; empty when all are 1
  std::vector<uint64_t> lo;    // link -> incidence entries
  std::vector<int32_t> lf;     // local flow of each incidence entry
  std::vector<double> cap;     // per local link
  // Sums over the flows still present (see retire()).
  std::vector<double> wsum;
  std::vector<int32_t> cnt;

  Component(const FlowSet& fs, const std::vector<double>& gcap, std::vector<int32_t>& map, const int32_t* ids,
            size_t n)
      : flows(ids, ids + n) {
    const bool weighted = !fs.coef.empty();
    fo.resize(n + 1);
    fo[0] = 0;
    for (size_t i = 0; i < n; ++i) fo[i + 1] = fo[i] + (fs.off[ids[i] + 1] - fs.off[ids[i]]);
    fl.resize(fo[n]);
    if (weighted) fc.resize(fo[n]);
    for (size_t i = 0; i < n; ++i) {
      uint64_t b = fs.off[ids[i]], e = fs.off[ids[i] + 1], o = fo[i];
      for (uint64_t k = b; k < e; ++k, ++o) {
        int32_t l = fs.link[k];
        if (map[l] < 0) map[l] = (int32_t)links.size(), links.push_back(l);
        fl[o] = map[l];
        if (weighted) fc[o] = fs.coef[k];
      }
    }
    for (int32_t l : links) map[l] = -1;
    const size_t L = links.size();
    cap.resize(L);
    for (size_t l = 0; l < L; ++l) cap[l] = gcap[links[l]];
    lo.assign(L + 1, 0);
    for (int32_t l : fl) ++lo[l + 1];
    for (size_t l = 0; l < L; ++l) lo[l + 1] += lo[l];
    lf.resize(fo[n]);
    std::vector<uint64_t> pos(lo.begin(), lo.end() - 1);
    for (size_t i = 0; i < n; ++i)
      for (uint64_t k = fo[i]; k < fo[i + 1]; ++k) lf[pos[fl[k]]++] = (int32_t)i;
    wsum.assign(L, 0.0);
    cnt.assign(L, 0);
    for (size_t l = 0; l < L; ++l) {
      cnt[l] = (int32_t)(lo[l + 1] - lo[l]);
      if (fc.empty()) wsum[l] = cnt[l];
    }
    if (!fc.empty()) {
      // Incidence order (flow order within each link), as the filling itself accumulates.
      std::vector<uint64_t> p2(lo.begin(), lo.end() - 1);
      std::vector<float> lc(fo[n]);
      for (size_t i = 0; i < n; ++i)
        for (uint64_t k = fo[i]; k < fo[i + 1]; ++k) lc[p2[fl[k]]++] = fc[k];
      for (size_t l = 0; l < L; ++l)
        for (uint64_t e = lo[l]; e < lo[l + 1]; ++e) wsum[l] += lc[e];
    }
  }

  size_t size() const { return flows.size(); }
  float coef(uint64_t k) const { return fc.empty() ? 1.0f : fc[k]; }

  // Flow i leaves the component (finished): its links lose its weight.
  void retire(size_t i) {
    for (uint64_t k = fo[i]; k < fo[i + 1]; ++k) wsum[fl[k]] -= coef(k), --cnt[fl[k]];
  }

  struct Scratch {
    std::vector<double> rem, w;
    std::vector<int32_t> c, sat;
    std::vector<uint8_t> frozen;
    std::vector<std::pair<double, int32_t>> heap;
  };

  // Progressive filling over the flows with active[i] (retired flows must be inactive); writes
  // rate[i]. A min-heap holds each live link under a lower bound of its fair share: freezing a
  // flow at the current level never lowers the share of its other links, so a popped entry whose
  // share grew is pushed back with the new value (lazy update). Returns the number of levels.
  int64_t solve(const std::vector<uint8_t>& active, std::vector<double>& rate, Scratch& s) const {
    const size_t L = links.size(), F = flows.size();
    s.rem.assign(cap.begin(), cap.end());
    s.w.assign(wsum.begin(), wsum.end());
    s.c.assign(cnt.begin(), cnt.end());
    s.frozen.resize(F);
    for (size_t i = 0; i < F; ++i) {
      s.frozen[i] = !active[i];
      if (active[i] && fo[i] == fo[i + 1]) rate[i] = std::numeric_limits<double>::infinity(), s.frozen[i] = 1;
    }
    auto share = [&](int32_t l) { return std::max(s.rem[l], 0.0) / s.w[l]; };
    auto greater = [](const std::pair<double, int32_t>& a, const std::pair<double, int32_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second > b.second);
    };
    s.heap.clear();
    for (size_t l = 0; l < L; ++l)
      if (s.c[l]) s.heap.push_back({share((int32_t)l), (int32_t)l});
    std::make_heap(s.heap.begin(), s.heap.end(), greater);
    auto pop = [&] {
      std::pop_heap(s.heap.begin(), s.heap.end(), greater);
      auto t = s.heap.back();
      s.heap.pop_back();
      return t;
    };
    auto push = [&](double k, int32_t l) {
      s.heap.push_back({k, l});
      std::push_heap(s.heap.begin(), s.heap.end(), greater);
    };
    int64_t rounds = 0;
    while (true) {
      double best = 0;
      bool found = false;
      while (!s.heap.empty()) {
        auto [k, l] = s.heap.front();
        if (!s.c[l]) {
          pop();
          continue;
        }
        double sh = share(l);
        if (sh > k) {
          pop();
          push(sh, l);
          continue;
        }
        best = sh, found = true;
        break;
      }
      if (!found) break;
      ++rounds;
      const double thr = best * (1 + 1e-9) + 1e-300;
      s.sat.clear();
      while (!s.heap.empty() && s.heap.front().first <= thr) {
        int32_t l = pop().second;
        if (!s.c[l]) continue;
        double sh = share(l);
        if (sh <= thr) s.sat.push_back(l);
        else push(sh, l);
      }
      std::sort(s.sat.begin(), s.sat.end());
      // A link's count of unfrozen flows reaches 0 when its last one freezes: stop there rather
      // than step over the frozen rest of its list.
      for (int32_t l : s.sat)
        for (uint64_t e = lo[l]; e < lo[l + 1] && s.c[l] > 0; ++e) {
          int32_t f = lf[e];
          if (s.frozen[f]) continue;
          s.frozen[f] = 1;
          rate[f] = best;
          for (uint64_t k = fo[f]; k < fo[f + 1]; ++k) {
            int32_t m = fl[k];
            double c = coef(k);
            s.rem[m] -= c * best;
            s.w[m] -= c;
            --s.c[m];
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
  const Components comps = components(fs, cap.size());
  int64_t rounds = 0;
#pragma omp parallel num_threads(resolve_threads(0)) reduction(+ : rounds)
  {
    std::vector<int32_t> map(cap.size(), -1);
    Component::Scratch scratch;
    std::vector<double> r;
    std::vector<uint8_t> active;
#pragma omp for schedule(dynamic, 1)
    for (size_t ci = 0; ci < comps.count(); ++ci) {
      Component c(fs, cap, map, comps.flows.data() + comps.off[ci], comps.off[ci + 1] - comps.off[ci]);
      active.assign(c.size(), 1);
      r.assign(c.size(), 0.0);
      rounds += c.solve(active, r, scratch);
      for (size_t i = 0; i < c.size(); ++i) rate[c.flows[i]] = r[i];
    }
  }
  if (st) st->rounds = rounds, st->components = (int)comps.count();
  return rate;
}

SimResult simulate_fluid(const FlowSet& fs, const std::vector<double>& cap, const SimOptions& o) {
  // A negative or NaN tolerance would retire no flow, and the loop would never end.
  if (!(o.batch_tol >= 0 && std::isfinite(o.batch_tol)))
    input_error("simulate_fluid: batch tolerance ", o.batch_tol, " must be finite and at least 0");
  SimResult res;
  res.finish.assign(fs.count(), 0.0);
  const Components comps = components(fs, cap.size());
  res.components = (int)comps.count();
  const double inf = std::numeric_limits<double>::infinity();
  int64_t events = 0, solves = 0, rounds = 0, stalled = 0;
#pragma omp parallel num_threads(resolve_threads(o.threads)) reduction(+ : events, solves, rounds, stalled)
  {
    std::vector<int32_t> map(cap.size(), -1);
    Component::Scratch scratch;
    std::vector<double> load, rate, remaining, rem2;
    std::vector<int32_t> ids, next, ls;
    std::vector<uint8_t> active;
#pragma omp for schedule(dynamic, 1)
    for (size_t ci = 0; ci < comps.count(); ++ci) {
      const int32_t* cf = comps.flows.data() + comps.off[ci];
      const size_t cn = comps.off[ci + 1] - comps.off[ci];
      // Lower bound of this component: its most loaded link's bytes / capacity. The batching
      // window is batch_tol x max(now, bound), so a component needs at most about 1/batch_tol
      // re-solves after its bound has passed, however spread its flow sizes are.
      double bound = 0;
      ls.clear(), load.clear();
      for (size_t j = 0; j < cn; ++j) {
        int32_t g = cf[j];
        for (uint64_t e = fs.off[g]; e < fs.off[g + 1]; ++e) {
          int32_t l = fs.link[e];
          if (map[l] < 0) map[l] = (int32_t)ls.size(), ls.push_back(l), load.push_back(0);
          load[map[l]] += fs.size[g] * fs.coef_at(e);
        }
      }
      for (size_t i = 0; i < ls.size(); ++i) {
        if (cap[ls[i]] > 0) bound = std::max(bound, load[i] / cap[ls[i]]);
        map[ls[i]] = -1;
      }
      ids.clear(), remaining.clear();
      for (size_t j = 0; j < cn; ++j)
        if (fs.size[cf[j]] > 0) ids.push_back(cf[j]), remaining.push_back(fs.size[cf[j]]);
      double t = 0;
      // Rebuild the component over the flows still running whenever half of them finished, so
      // late re-solves cost what is left, not what was there.
      while (!ids.empty()) {
        Component c(fs, cap, map, ids.data(), ids.size());
        const size_t F = c.size();
        rate.assign(F, 0.0);
        active.assign(F, 1);
        size_t left = F;
        bool stall = false;
        while (left && left * 2 > F) {
          rounds += c.solve(active, rate, scratch);
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
              c.retire(i);
              --left;
            } else {
              remaining[i] -= rate[i] * dt;
            }
          }
          t = t_next;
        }
        if (stall) break;
        next.clear(), rem2.clear();
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
