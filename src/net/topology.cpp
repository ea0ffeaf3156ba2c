#include "net/topology.h"

#include <algorithm>
#include <cmath>
#include <queue>

#include "core/error.h"
#include "core/rng.h"

namespace dsv3::net {

const char* topo_name(TopoKind k) {
  switch (k) {
    case TopoKind::FT2: return "FT2";
    case TopoKind::MPFT: return "MPFT";
    case TopoKind::MRFT: return "MRFT";
    case TopoKind::FT3: return "FT3";
    case TopoKind::SF: return "SF";
    case TopoKind::DF: return "DF";
  }
  return "?";
}

TopoKind parse_topo(const std::string& s, const std::string& what) {
  std::string l = s;
  for (auto& c : l) c = (char)std::tolower((unsigned char)c);
  if (l == "ft2") return TopoKind::FT2;
  if (l == "mpft") return TopoKind::MPFT;
  if (l == "mrft") return TopoKind::MRFT;
  if (l == "ft3") return TopoKind::FT3;
  if (l == "sf" || l == "slimfly") return TopoKind::SF;
  if (l == "df" || l == "dragonfly") return TopoKind::DF;
  input_error(what, ": unknown topology '", s, "' (expected ft2, mpft, mrft, ft3, sf or df)");
}

bool is_prime_power(int q, int* p_out, int* m_out) {
  if (q < 2) return false;
  int p = 2;
  while (p * p <= q && q % p) ++p;
  if (q % p) p = q;  // q is prime
  int m = 0, r = q;
  while (r % p == 0) r /= p, ++m;
  if (r != 1) return false;
  if (p_out) *p_out = p;
  if (m_out) *m_out = m;
  return true;
}

namespace {

// Upper-layer switches needed so that L lower switches with u uplinks each fit on k-port switches,
// uplink i of every lower switch going to upper switch i mod S (so every lower switch sees the
// same set of uppers).
int spread(int64_t L, int u, int k) {
  if (L > k) internal_error("spread: ", L, " lower switches cannot share ", k, "-port upper switches");
  int64_t S = (L * u + k - 1) / k;
  if (S < 1) S = 1;
  while (L * ((u + S - 1) / S) > k) ++S;
  return (int)S;
}

void check_radix_ft(int k, const char* what) {
  if (k < 4 || k % 2) input_error("--radix ", k, ": a ", what, " needs an even switch radix of at least 4");
}

struct FtPlan {
  int64_t leaves = 0, spines = 0, pods = 0, aggs = 0, core_per_group = 0, cores = 0;
  int64_t switches = 0, links = 0;
  int tiers = 2;
};

// Non-blocking fat tree over `leaves` leaf switches of radix k: two tiers when leaves ≤ k (or
// forced), else three (k/2-edge pods, k/2 aggregation switches per pod, k/2 core groups).
FtPlan plan_fat_tree(int64_t leaves, int k, int tiers) {
  FtPlan f;
  f.leaves = leaves;
  f.tiers = tiers;
  int h = k / 2;
  if (tiers == 2) {
    f.spines = leaves > 1 ? spread(leaves, h, k) : 0;
    f.switches = leaves + f.spines;
    f.links = leaves > 1 ? leaves * h : 0;
  } else {
    f.pods = (leaves + h - 1) / h;
    f.aggs = f.pods * h;
    f.core_per_group = f.pods > 1 ? spread(f.pods, h, k) : 0;
    f.cores = f.core_per_group * h;
    f.switches = leaves + f.aggs + f.cores;
    f.links = leaves * h + (f.pods > 1 ? f.aggs * h : 0);
  }
  return f;
}

struct SfParams {
  int q, delta, kprime, p;
};
SfParams sf_params(int q) {
  int r = q % 4;
  int delta = r == 0 ? 0 : (r == 1 ? 1 : (r == 3 ? -1 : 2));
  SfParams s{q, delta, 0, 0};
  if (delta == 2) return s;  // q ≡ 2 mod 4 has no MMS construction
  s.kprime = (3 * q - delta) / 2;
  s.p = (s.kprime + 1) / 2;
  return s;
}

}  // namespace

TopoCounts topo_counts(const TopoSpec& s) {
  TopoCounts c;
  const int k = s.radix;
  if (k < 2) input_error("--radix ", k, ": a switch needs at least 2 ports");
  // Far past any switch, and small enough that k³ (three-tier endpoints) fits 64 bits.
  if (k > 65536) input_error("--radix ", k, ": at most 65,536 ports");
  auto check_endpoints = [&](int64_t max) {
    if (s.endpoints < 0) input_error("--endpoints ", s.endpoints, ": must not be negative");
    if (s.endpoints > max)
      input_error("--endpoints ", s.endpoints, ": more endpoints than ports; ", topo_name(s.kind),
                  " with radix ", k, " holds at most ", max);
    return s.endpoints ? s.endpoints : max;
  };
  switch (s.kind) {
    case TopoKind::FT2:
    case TopoKind::MPFT:
    case TopoKind::MRFT: {
      check_radix_ft(k, "fat tree");
      int64_t per_plane_max = (int64_t)k * k / 2;
      int P = s.kind == TopoKind::MPFT ? s.planes : 1;
      if (P < 1) input_error("--planes ", P, ": must be at least 1");
      int64_t max = s.kind == TopoKind::MRFT ? (int64_t)k * k * k / 4 : P * per_plane_max;
      int64_t N = check_endpoints(max);
      c.endpoints = N;
      if (s.kind == TopoKind::MPFT) {
        int64_t per = (N + P - 1) / P;
        FtPlan f = plan_fat_tree((per + k / 2 - 1) / (k / 2), k, 2);
        c.switches = P * f.switches;
        c.links = P * f.links;
        c.diameter = f.leaves > 1 ? 2 : 0;
      } else {
        int64_t leaves = (N + k / 2 - 1) / (k / 2);
        int tiers = leaves <= k ? 2 : 3;
        FtPlan f = plan_fat_tree(leaves, k, tiers);
        c.switches = f.switches;
        c.links = f.links;
        c.diameter = tiers == 2 ? (leaves > 1 ? 2 : 0) : (f.pods > 1 ? 4 : 2);
        if (s.kind == TopoKind::MRFT && tiers == 3)
          c.warnings.push_back(cat("MRFT with ", N, " endpoints exceeds one 2-tier plane (", per_plane_max,
                                   "); built as a 3-tier rail-optimised fat tree"));
      }
      c.radix_used = k;
      c.bisection = N / 2.0;
      break;
    }
    case TopoKind::FT3: {
      check_radix_ft(k, "three-tier fat tree");
      int64_t N = check_endpoints((int64_t)k * k * k / 4);
      FtPlan f = plan_fat_tree((N + k / 2 - 1) / (k / 2), k, 3);
      c.endpoints = N;
      c.switches = f.switches;
      c.links = f.links;
      c.diameter = f.pods > 1 ? 4 : 2;
      c.radix_used = k;
      c.bisection = N / 2.0;
      break;
    }
    case TopoKind::SF: {
      int q = s.q;
      if (q == 0) {
        for (int t = 2; t < 4 * k; ++t) {
          SfParams sp = sf_params(t);
          if (sp.delta == 2 || (s.exact && !is_prime_power(t))) continue;
          if (sp.kprime + sp.p <= k) q = t;
        }
        if (q == 0) input_error("--radix ", k, ": too small for any Slim Fly (needs at least 5 ports)");
      }
      if (q < 2) input_error("--q ", q, ": must be at least 2");
      SfParams sp = sf_params(q);
      if (sp.delta == 2) input_error("--q ", q, ": Slim Fly needs q = 4w + d with d in {-1, 0, 1}; q mod 4 = 2");
      if (!is_prime_power(q)) {
        if (s.exact) input_error("--q ", q, ": not a prime power, so no MMS graph exists (use e.g. ", q - 1, " or ", q + 1, ")");
        c.warnings.push_back(cat("Slim Fly q = ", q,
                                 " is not a prime power: no MMS graph exists; counts use the formulas only"));
      }
      if (sp.kprime + sp.p > k)
        input_error("--radix ", k, ": Slim Fly q = ", q, " needs ", sp.kprime, " network + ", sp.p,
                    " endpoint ports = ", sp.kprime + sp.p);
      c.q = q;
      c.sf_kprime = sp.kprime;
      c.sf_p = sp.p;
      c.switches = 2LL * q * q;
      c.links = (int64_t)q * q * sp.kprime;
      c.endpoints = check_endpoints(c.switches * sp.p);
      c.radix_used = sp.kprime + sp.p;
      c.diameter = 2;
      break;
    }
    case TopoKind::DF: {
      int p = s.df_p, a = s.df_a, h = s.df_h;
      if (!p && !a && !h) {
        p = h = (k + 1) / 4;
        a = 2 * p;
      }
      if (p < 1 || a < 1 || h < 1)
        input_error("--df-p/--df-a/--df-h: all three must be at least 1 (got p=", p, " a=", a, " h=", h, ")");
      int need = p + a - 1 + h;
      if (need > k) input_error("--radix ", k, ": Dragonfly p + a - 1 + h = ", need, " ports needed");
      int64_t gmax = (int64_t)a * h + 1;
      int64_t g = s.df_g ? s.df_g : gmax;
      if (g < 2) input_error("--df-g ", g, ": a Dragonfly needs at least 2 groups");
      if (g > gmax) input_error("--df-g ", g, ": at most a*h + 1 = ", gmax, " groups");
      if (g < gmax)
        c.warnings.push_back(cat("Dragonfly g = ", g, " < a*h + 1 = ", gmax,
                                 ": some group pairs share more than one global link"));
      if ((g * a * h) % 2) c.warnings.push_back("g*a*h is odd: one global port stays unused");
      c.df_p = p, c.df_a = a, c.df_h = h, c.df_g = (int)g;
      c.switches = g * a;
      c.links = g * a * (a - 1) / 2 + g * a * h / 2;
      c.endpoints = check_endpoints(c.switches * p);
      c.radix_used = need;
      c.diameter = 3;
      c.bisection = (double)(g / 2) * (g - g / 2) * a * h / (double)(g - 1);
      break;
    }
  }
  return c;
}

int Network::nic_of(int gpu, int plane) const {
  if (planes == 1) return gpu;
  int r = gpu % gpus_per_node;
  return gpu - r + (r - r % planes) + plane;
}

void Network::rebuild_csr() {
  int V = vertices();
  out_off.assign(V + 1, 0);
  for (auto& l : links)
    if (l.from >= 0) ++out_off[l.from + 1];
  for (int v = 0; v < V; ++v) out_off[v + 1] += out_off[v];
  out_link.assign(out_off[V], 0);
  std::vector<int32_t> pos(out_off.begin(), out_off.end() - 1);
  for (size_t i = 0; i < links.size(); ++i)
    if (links[i].from >= 0) out_link[pos[links[i].from]++] = (int32_t)i;
}

namespace {

struct Builder {
  Network& n;
  int add_switch(int plane, int layer) {
    n.sw_plane.push_back((int16_t)plane);
    n.sw_layer.push_back((int8_t)layer);
    return n.nics + n.switches++;
  }
  int add_link(int a, int b, double cap, LinkKind kind, int plane) {
    int id = (int)n.links.size();
    n.links.push_back({a, b, cap, kind, (int16_t)plane, true, -1});
    return id;
  }
  void add_cable(int a, int b, int plane) {
    int x = add_link(a, b, n.params.nic_bw, LinkKind::SwSw, plane);
    int y = add_link(b, a, n.params.nic_bw, LinkKind::SwSw, plane);
    n.links[x].twin = y, n.links[y].twin = x;
    ++n.swsw_links;
  }
  // Returns leaf switch vertices of one fat tree.
  std::vector<int> fat_tree(int64_t leaves, int k, int tiers, int plane) {
    FtPlan f = plan_fat_tree(leaves, k, tiers);
    int h = k / 2;
    std::vector<int> leaf(leaves);
    for (auto& v : leaf) v = add_switch(plane, 0);
    if (tiers == 2) {
      std::vector<int> spine(f.spines);
      for (auto& v : spine) v = add_switch(plane, 1);
      if (f.spines)
        for (int64_t l = 0; l < leaves; ++l)
          for (int u = 0; u < h; ++u) add_cable(leaf[l], spine[u % f.spines], plane);
    } else {
      std::vector<int> agg(f.aggs);
      for (auto& v : agg) v = add_switch(plane, 1);
      std::vector<int> core(f.cores);
      for (auto& v : core) v = add_switch(plane, 2);
      for (int64_t l = 0; l < leaves; ++l)
        for (int u = 0; u < h; ++u) add_cable(leaf[l], agg[(l / h) * h + u], plane);
      if (f.core_per_group)
        for (int64_t a = 0; a < f.aggs; ++a)
          for (int u = 0; u < h; ++u)
            add_cable(agg[a], core[(a % h) * f.core_per_group + u % f.core_per_group], plane);
    }
    return leaf;
  }
};

// GF(q) for q = p^m: elements are integers 0..q-1 read as base-p digit polynomials.
struct GF {
  int q, p = 2, m = 1;
  std::vector<int> mul_t, add_t;
  explicit GF(int q_) : q(q_) {
    is_prime_power(q, &p, &m);
    std::vector<int> poly(m + 1, 0);  // monic irreducible of degree m, found by search
    auto to_digits = [&](int x) {
      std::vector<int> d(m);
      for (int i = 0; i < m; ++i) d[i] = x % p, x /= p;
      return d;
    };
    auto from_digits = [&](const std::vector<int>& d) {
      int x = 0;
      for (int i = m - 1; i >= 0; --i) x = x * p + d[i];
      return x;
    };
    add_t.resize(q * q);
    for (int a = 0; a < q; ++a)
      for (int b = 0; b < q; ++b) {
        auto da = to_digits(a), db = to_digits(b);
        for (int i = 0; i < m; ++i) da[i] = (da[i] + db[i]) % p;
        add_t[a * q + b] = from_digits(da);
      }
    auto try_poly = [&](int code) {
      // poly = x^m + sum c_i x^i; irreducible iff the resulting multiplication has no zero divisors.
      std::vector<int> c = to_digits(code);
      std::vector<int> mt(q * q);
      for (int a = 0; a < q; ++a)
        for (int b = 0; b < q; ++b) {
          auto da = to_digits(a), db = to_digits(b);
          std::vector<int> prod(2 * m, 0);
          for (int i = 0; i < m; ++i)
            for (int j = 0; j < m; ++j) prod[i + j] = (prod[i + j] + da[i] * db[j]) % p;
          for (int d = 2 * m - 1; d >= m; --d) {
            int t = prod[d];
            if (!t) continue;
            prod[d] = 0;
            for (int i = 0; i < m; ++i) prod[d - m + i] = ((prod[d - m + i] - t * c[i]) % p + p) % p;
          }
          prod.resize(m);
          int r = from_digits(prod);
          if (a && b && !r) return false;
          mt[a * q + b] = r;
        }
      mul_t = std::move(mt);
      return true;
    };
    for (int code = 0; code < q; ++code)
      if (try_poly(code)) break;
  }
  int add(int a, int b) const { return add_t[a * q + b]; }
  int mul(int a, int b) const { return mul_t[a * q + b]; }
  int neg(int a) const {
    for (int b = 0; b < q; ++b)
      if (add(a, b) == 0) return b;
    return 0;
  }
  int primitive() const {
    for (int x = 2; x < q || x == 1; ++x) {
      int y = 1, ord = 0;
      do y = mul(y, x), ++ord;
      while (y != 1);
      if (ord == q - 1) return x;
    }
    return 1;
  }
};

void build_slimfly(Builder& b, int q, int p_per_router, std::vector<int>& routers) {
  GF f(q);
  SfParams sp = sf_params(q);
  int xi = f.primitive();
  std::vector<int> pw(2 * q);
  pw[0] = 1;
  for (int i = 1; i < 2 * q; ++i) pw[i] = f.mul(pw[i - 1], xi);
  std::vector<int> X, Xp;
  if (sp.delta == 1) {
    for (int i = 0; i <= q - 3; i += 2) X.push_back(pw[i]);
    for (int i = 1; i <= q - 2; i += 2) Xp.push_back(pw[i]);
  } else if (sp.delta == -1) {
    int w = (q + 1) / 4;
    for (int i = 0; i <= 2 * w - 2; i += 2) X.push_back(pw[i]);
    for (int i = 2 * w - 1; i <= 4 * w - 3; i += 2) X.push_back(pw[i]);
    for (int i = 1; i <= 2 * w - 1; i += 2) Xp.push_back(pw[i]);
    for (int i = 2 * w; i <= 4 * w - 2; i += 2) Xp.push_back(pw[i]);
  } else {
    for (int i = 0; i <= q - 2; i += 2) X.push_back(pw[i]);
    for (int i = 1; i <= q - 1; i += 2) Xp.push_back(pw[i]);
  }
  (void)p_per_router;
  routers.assign(2 * q * q, 0);
  for (auto& r : routers) r = b.add_switch(0, 0);
  auto id = [&](int s, int x, int y) { return routers[s * q * q + x * q + y]; };
  auto in = [](const std::vector<int>& v, int e) { return std::find(v.begin(), v.end(), e) != v.end(); };
  for (int s = 0; s < 2; ++s)
    for (int x = 0; x < q; ++x)
      for (int y = 0; y < q; ++y)
        for (int y2 = y + 1; y2 < q; ++y2)
          if (in(s ? Xp : X, f.add(y, f.neg(y2)))) b.add_cable(id(s, x, y), id(s, x, y2), 0);
  for (int x = 0; x < q; ++x)
    for (int y = 0; y < q; ++y)
      for (int m = 0; m < q; ++m) {
        int c = f.add(y, f.neg(f.mul(m, x)));  // y = m x + c
        b.add_cable(id(0, x, y), id(1, m, c), 0);
      }
}

void build_dragonfly(Builder& b, const TopoCounts& c, std::vector<int>& routers) {
  int a = c.df_a, h = c.df_h, g = c.df_g;
  routers.assign((size_t)a * g, 0);
  for (auto& r : routers) r = b.add_switch(0, 0);
  for (int gi = 0; gi < g; ++gi)
    for (int i = 0; i < a; ++i)
      for (int j = i + 1; j < a; ++j) b.add_cable(routers[gi * a + i], routers[gi * a + j], 0);
  std::vector<int> next(g, 0);  // next free global port per group; port -> router port / h
  auto connect = [&](int x, int y) {
    if (x == y || next[x] >= a * h || next[y] >= a * h) return;  // few groups: no cable to itself
    b.add_cable(routers[x * a + next[x]++ / h], routers[y * a + next[y]++ / h], 0);
  };
  for (int x = 0; x < g; ++x)
    for (int y = x + 1; y < g; ++y) connect(x, y);
  int extra = a * h - (g - 1);
  for (int t = 0; t < extra / 2; ++t)
    for (int x = 0; x < g; ++x) connect(x, (x + t + 1) % g);
}

}  // namespace

Network build_network(const TopoSpec& s, int gpus, const NetParams& p) {
  TopoCounts c = topo_counts(s);
  Network n;
  n.spec = s;
  n.params = p;
  n.gpus_per_node = s.gpus_per_node;
  if (n.gpus_per_node < 1) input_error("--gpus-per-node ", n.gpus_per_node, ": must be at least 1");
  if (gpus < 1 || gpus % n.gpus_per_node)
    input_error("--gpus ", gpus, ": must be a positive multiple of --gpus-per-node ", n.gpus_per_node);
  n.gpus = gpus;
  n.nodes = gpus / n.gpus_per_node;
  n.nics = gpus;
  n.planes = s.kind == TopoKind::MPFT ? s.planes : 1;
  if (n.planes > 1 && n.gpus_per_node % n.planes)
    input_error("--planes ", n.planes, ": must divide --gpus-per-node ", n.gpus_per_node,
                " (each GPU-NIC pair sits in one plane)");
  // Against the topology's maximum: --endpoints only scales the cost row.
  TopoSpec full = s;
  full.endpoints = 0;
  const int64_t max_ep = s.endpoints == 0 ? c.endpoints : topo_counts(full).endpoints;
  if (gpus > max_ep)
    input_error("--gpus ", gpus, ": more endpoints than ports; ", topo_name(s.kind), " with radix ", s.radix,
                " holds at most ", max_ep);
  if (s.kind == TopoKind::SF && !is_prime_power(c.q))
    input_error("--q ", c.q, ": not a prime power, so the Slim Fly graph cannot be built (counts only)");
  Builder b{n};
  n.nic_leaf.assign(n.nics, -1);
  const int k = s.radix, h = k / 2;
  switch (s.kind) {
    case TopoKind::FT2:
    case TopoKind::FT3:
    case TopoKind::MRFT: {
      int64_t leaves;
      std::vector<int64_t> leaf_of(n.nics);
      if (s.kind == TopoKind::MRFT) {
        int64_t lpr = (n.nodes + h - 1) / h;  // leaves per rail
        leaves = lpr * n.gpus_per_node;
        for (int i = 0; i < n.nics; ++i) leaf_of[i] = (i % n.gpus_per_node) * lpr + (i / n.gpus_per_node) / h;
      } else {
        leaves = (n.nics + h - 1) / h;
        for (int i = 0; i < n.nics; ++i) leaf_of[i] = i / h;
      }
      int tiers = s.kind == TopoKind::FT3 ? 3 : (leaves <= k ? 2 : 3);
      if (s.kind == TopoKind::FT2 && leaves > k)
        input_error("--gpus ", gpus, ": FT2 with radix ", k, " holds at most ", (int64_t)k * h);
      auto lv = b.fat_tree(leaves, k, tiers, 0);
      for (int i = 0; i < n.nics; ++i) n.nic_leaf[i] = lv[leaf_of[i]];
      break;
    }
    case TopoKind::MPFT: {
      int per_plane = n.nodes * (n.gpus_per_node / n.planes);
      int64_t leaves = (per_plane + h - 1) / h;
      if (leaves > k) input_error("--gpus ", gpus, ": each MPFT plane holds at most ", (int64_t)k * h, " NICs");
      for (int pl = 0; pl < n.planes; ++pl) {
        auto lv = b.fat_tree(leaves, k, 2, pl);
        int idx = 0;
        for (int i = 0; i < n.nics; ++i)
          if ((i % n.gpus_per_node) % n.planes == pl) n.nic_leaf[i] = lv[idx++ / h];
      }
      break;
    }
    case TopoKind::SF:
    case TopoKind::DF: {
      std::vector<int> routers;
      int per = s.kind == TopoKind::SF ? c.sf_p : c.df_p;
      if (s.kind == TopoKind::SF) build_slimfly(b, c.q, per, routers);
      else build_dragonfly(b, c, routers);
      for (int i = 0; i < n.nics; ++i) n.nic_leaf[i] = routers[i / per];
      break;
    }
  }
  n.nic_up.resize(n.nics);
  n.nic_down.resize(n.nics);
  for (int i = 0; i < n.nics; ++i) {
    int pl = n.sw_plane[n.nic_leaf[i] - n.nics];
    n.nic_up[i] = b.add_link(i, n.nic_leaf[i], p.nic_bw, LinkKind::NicUp, pl);
    n.nic_down[i] = b.add_link(n.nic_leaf[i], i, p.nic_bw, LinkKind::NicDown, pl);
    n.links[n.nic_up[i]].twin = n.nic_down[i];
    n.links[n.nic_down[i]].twin = n.nic_up[i];
  }
  n.nvl_up.resize(gpus);
  n.nvl_down.resize(gpus);
  int nv0 = n.nics + n.switches;
  for (int g = 0; g < gpus; ++g) {
    n.nvl_up[g] = b.add_link(-1, nv0 + g / n.gpus_per_node, p.nvlink_bw, LinkKind::NvlUp, -1);
    n.nvl_down[g] = b.add_link(nv0 + g / n.gpus_per_node, -1, p.nvlink_bw, LinkKind::NvlDown, -1);
  }
  n.rebuild_csr();
  return n;
}

Validation validate(const Network& n, int bfs_sources) {
  Validation v;
  const int S = n.switches;
  std::vector<int> deg(S, 0);
  for (auto& l : n.links)
    if (l.from >= n.nics && l.from < n.nics + S) ++deg[l.from - n.nics];
  v.min_degree = S ? *std::min_element(deg.begin(), deg.end()) : 0;
  v.max_degree = S ? *std::max_element(deg.begin(), deg.end()) : 0;
  if (v.max_degree > n.spec.radix)
    internal_error("topology uses ", v.max_degree, " ports on a switch of radix ", n.spec.radix);
  // BFS over switches from the first switch of each (plane, layer) class and a few spread-out others.
  std::vector<int> src;
  for (int i = 0; i < S; ++i)
    if (i == 0 || n.sw_layer[i] != n.sw_layer[i - 1] || n.sw_plane[i] != n.sw_plane[i - 1]) src.push_back(i);
  for (int t = 1; t < bfs_sources && S; ++t) src.push_back((int)((int64_t)t * S / bfs_sources));
  std::vector<int> dist(S);
  for (int s0 : src) {
    std::fill(dist.begin(), dist.end(), -1);
    std::queue<int> qu;
    dist[s0] = 0;
    qu.push(s0);
    while (!qu.empty()) {
      int u = qu.front();
      qu.pop();
      int vu = u + n.nics;
      for (int e = n.out_off[vu]; e < n.out_off[vu + 1]; ++e) {
        const Link& l = n.links[n.out_link[e]];
        if (!l.up || l.kind != LinkKind::SwSw) continue;
        int w = l.to - n.nics;
        if (dist[w] < 0) dist[w] = dist[u] + 1, qu.push(w);
      }
    }
    for (int i = 0; i < S; ++i) {
      if (n.sw_plane[i] != n.sw_plane[s0]) continue;
      if (dist[i] < 0) v.connected = false;
      // Diameter between switches that hold endpoints (leaves / routers).
      if (n.sw_layer[i] == 0 && n.sw_layer[s0] == 0) v.diameter = std::max(v.diameter, dist[i]);
    }
  }
  // Natural cut: first half of each (plane, layer) class of switches against the second half.
  std::vector<int> side(S, 0), cls_count, cls_of(S);
  std::vector<std::pair<int, int>> keys;
  for (int i = 0; i < S; ++i) {
    std::pair<int, int> key{n.sw_plane[i], n.sw_layer[i]};
    auto it = std::find(keys.begin(), keys.end(), key);
    if (it == keys.end()) keys.push_back(key), cls_count.push_back(0), it = keys.end() - 1;
    cls_of[i] = (int)(it - keys.begin());
    ++cls_count[cls_of[i]];
  }
  std::vector<int> seen(keys.size(), 0);
  for (int i = 0; i < S; ++i) side[i] = seen[cls_of[i]]++ >= cls_count[cls_of[i]] / 2;
  for (auto& l : n.links)
    if (l.kind == LinkKind::SwSw && l.from < l.to && side[l.from - n.nics] != side[l.to - n.nics])
      ++v.bisection_links;
  return v;
}

static void fail_pair(Network& n, int id) {
  n.links[id].up = false;
  if (n.links[id].twin >= 0) n.links[n.links[id].twin].up = false;
}

void fail_link(Network& n, int id) {
  if (id < 0 || id >= (int)n.links.size()) input_error("--fail-link ", id, ": no such link (0..", n.links.size() - 1, ")");
  fail_pair(n, id);
}

int fail_random_links(Network& n, double fraction, uint64_t seed) {
  if (!(fraction >= 0 && fraction <= 1)) input_error("--fail-links ", fraction, ": must be a fraction in [0, 1]");
  std::vector<int> cables;
  for (size_t i = 0; i < n.links.size(); ++i)
    if (n.links[i].kind == LinkKind::SwSw && n.links[i].from < n.links[i].to && n.links[i].up) cables.push_back((int)i);
  int want = (int)std::llround(fraction * (double)cables.size());
  Rng rng{seed, 0};
  for (int i = 0; i < want; ++i) {  // partial Fisher-Yates
    int j = i + (int)(rng.next_u64() % (uint64_t)(cables.size() - i));
    std::swap(cables[i], cables[j]);
    fail_pair(n, cables[i]);
  }
  return want;
}

void fail_switch(Network& n, int sw) {
  if (sw < 0 || sw >= n.switches) input_error("--fail-switch ", sw, ": no such switch (0..", n.switches - 1, ")");
  int v = n.nics + sw;
  for (size_t i = 0; i < n.links.size(); ++i)
    if (n.links[i].from == v || n.links[i].to == v) n.links[i].up = false;
}

void fail_plane(Network& n, int plane) {
  if (plane < 0 || plane >= n.planes) input_error("--fail-plane ", plane, ": no such plane (0..", n.planes - 1, ")");
  for (auto& l : n.links)
    if (l.plane == plane && l.kind != LinkKind::NvlUp && l.kind != LinkKind::NvlDown) l.up = false;
}

}  // namespace dsv3::net
