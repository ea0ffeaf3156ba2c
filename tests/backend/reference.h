// Naive double-precision references of the ops, written from the formulas in ops.h (no code shared
// with the backends). Row-major, shapes passed as ints.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "harness.h"

namespace dsv3::test::ref {

// y[m,n] = Σ_k x[m,k]·w[n,k]
inline Vec linear(const Vec& x, const Vec& w, int64_t m, int64_t n, int64_t k) {
  Vec y(size_t(m * n), 0.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t l = 0; l < k; ++l) s += x[size_t(i * k + l)] * w[size_t(j * k + l)];
      y[size_t(i * n + j)] = s;
    }
  return y;
}

// FP8 weight [n,k] with block scales [⌈n/128⌉, ⌈k/128⌉] dequantized in double.
inline Vec dequant_fp8(const Tensor& w, const Tensor& s) {
  int64_t n = w.dim(0), k = w.dim(1), kb = s.dim(1);
  Vec out(static_cast<size_t>(n * k));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < k; ++j)
      out[size_t(i * k + j)] = double(e4m3_to_float(w.data<f8e4m3>()[i * k + j].bits)) *
                               double(s.data<float>()[(i / 128) * kb + j / 128]);
  return out;
}

inline Vec rmsnorm(const Vec& x, const Vec& w, int64_t m, int64_t d, double eps) {
  Vec y(x.size());
  for (int64_t i = 0; i < m; ++i) {
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += x[size_t(i * d + j)] * x[size_t(i * d + j)];
    double r = 1.0 / std::sqrt(ss / double(d) + eps);
    for (int64_t j = 0; j < d; ++j) y[size_t(i * d + j)] = w[size_t(j)] * x[size_t(i * d + j)] * r;
  }
  return y;
}

// x [t, h, w]; the rope part at offset, pairs as in ops.h.
inline Vec rope(Vec x, const std::vector<int32_t>& pos, const Vec& cs, const Vec& sn, int64_t t, int64_t h,
                int64_t w, int64_t off, int64_t rd, bool interleaved, bool inverse) {
  int64_t half = rd / 2;
  for (int64_t i = 0; i < t; ++i)
    for (int64_t hh = 0; hh < h; ++hh)
      for (int64_t j = 0; j < half; ++j) {
        size_t base = size_t((i * h + hh) * w + off);
        size_t p = base + size_t(interleaved ? 2 * j : j), q = base + size_t(interleaved ? 2 * j + 1 : j + half);
        double c = cs[size_t(pos[size_t(i)] * half + j)], s = sn[size_t(pos[size_t(i)] * half + j)];
        if (inverse) s = -s;
        double a = x[p], b = x[q];
        x[p] = a * c - b * s;
        x[q] = b * c + a * s;
      }
  return x;
}

struct AttnOut {
  Vec out, lse;
};
struct SplitKv {
  Vec k, v;
};
// MLA's split keys (backend/ops.h) over `tokens` rows of h heads: k = [kv[..., :dn] ; k_pe] per
// head, v = kv[..., dn:] (kv [tokens, h, dn + dv], k_pe [tokens, dr]).
inline SplitKv split_kv(const Vec& kv, const Vec& k_pe, int64_t tokens, int64_t h, int64_t dn, int64_t dr,
                        int64_t dv) {
  const int64_t dq = dn + dr;
  SplitKv r{Vec(size_t(tokens * h * dq)), Vec(size_t(tokens * h * dv))};
  for (int64_t tok = 0; tok < tokens; ++tok)
    for (int64_t hh = 0; hh < h; ++hh) {
      const size_t row = size_t(tok * h + hh);
      for (int64_t j = 0; j < dq; ++j)
        r.k[row * dq + j] = j < dn ? kv[row * (dn + dv) + j] : k_pe[size_t(tok * dr + j - dn)];
      for (int64_t j = 0; j < dv; ++j) r.v[row * dv + j] = kv[row * (dn + dv) + dn + j];
    }
  return r;
}
// q [b,t,h,dq], k [b,s,h,dq], v [b,s,h,dv]
inline AttnOut attention(const Vec& q, const Vec& k, const Vec& v, int64_t b, int64_t t, int64_t s, int64_t h,
                         int64_t dq, int64_t dv, double scale, bool causal, int64_t q_off) {
  AttnOut r{Vec(size_t(b * t * h * dv), 0.0), Vec(size_t(b * h * t), 0.0)};
  for (int64_t bb = 0; bb < b; ++bb)
    for (int64_t hh = 0; hh < h; ++hh)
      for (int64_t i = 0; i < t; ++i) {
        int64_t lim = causal ? std::min(s, q_off + i + 1) : s;
        Vec l(static_cast<size_t>(lim));
        double mx = -INFINITY;
        for (int64_t j = 0; j < lim; ++j) {
          double d = 0;
          for (int64_t c = 0; c < dq; ++c)
            d += q[size_t(((bb * t + i) * h + hh) * dq + c)] * k[size_t(((bb * s + j) * h + hh) * dq + c)];
          l[size_t(j)] = d * scale;
          mx = std::max(mx, l[size_t(j)]);
        }
        double sum = 0;
        for (double x : l) sum += std::exp(x - mx);
        for (int64_t j = 0; j < lim; ++j) {
          double p = std::exp(l[size_t(j)] - mx) / sum;
          for (int64_t c = 0; c < dv; ++c)
            r.out[size_t(((bb * t + i) * h + hh) * dv + c)] += p * v[size_t(((bb * s + j) * h + hh) * dv + c)];
        }
        r.lse[size_t((bb * h + hh) * t + i)] = mx + std::log(sum);
      }
  return r;
}

inline Vec swiglu(const Vec& g, const Vec& u) {
  Vec o(g.size());
  for (size_t i = 0; i < g.size(); ++i) o[i] = g[i] / (1 + std::exp(-g[i])) * u[i];
  return o;
}

struct RouterOut {
  std::vector<int32_t> ids;
  Vec weights, scores;
};
// Written independently of the backend: stable sorts of (value desc, index asc) lists.
inline RouterOut router(const Vec& logits, int64_t t, int64_t e, const Vec* bias, RouterScoring scoring,
                        RouterMethod method, int n_group, int topk_group, int top_k, bool norm, double rsf) {
  RouterOut r;
  r.scores.resize(size_t(t * e));
  auto order = [](const Vec& v) {
    std::vector<int> o(v.size());
    std::iota(o.begin(), o.end(), 0);
    std::stable_sort(o.begin(), o.end(), [&](int a, int b) { return v[size_t(a)] > v[size_t(b)]; });
    return o;
  };
  for (int64_t i = 0; i < t; ++i) {
    Vec s(static_cast<size_t>(e)), c(static_cast<size_t>(e));
    double mx = -INFINITY, z = 0;
    for (int64_t j = 0; j < e; ++j) mx = std::max(mx, logits[size_t(i * e + j)]);
    for (int64_t j = 0; j < e; ++j) z += std::exp(logits[size_t(i * e + j)] - mx);
    for (int64_t j = 0; j < e; ++j) {
      double l = logits[size_t(i * e + j)];
      s[size_t(j)] = scoring == RouterScoring::Sigmoid ? 1 / (1 + std::exp(-l)) : std::exp(l - mx) / z;
      c[size_t(j)] = s[size_t(j)] + (bias ? (*bias)[size_t(j)] : 0.0);
      r.scores[size_t(i * e + j)] = s[size_t(j)];
    }
    if (method != RouterMethod::Greedy) {
      int64_t gs = e / n_group;
      Vec gscore(static_cast<size_t>(n_group));
      for (int g = 0; g < n_group; ++g) {
        Vec part(c.begin() + g * gs, c.begin() + (g + 1) * gs);
        std::sort(part.rbegin(), part.rend());
        gscore[size_t(g)] = method == RouterMethod::NoauxTc ? part[0] + part[1] : part[0];
      }
      std::vector<int> go = order(gscore);
      std::vector<bool> keep(size_t(n_group), false);
      for (int g = 0; g < topk_group; ++g) keep[size_t(go[size_t(g)])] = true;
      for (int64_t j = 0; j < e; ++j)
        if (!keep[size_t(j / gs)]) c[size_t(j)] = -INFINITY;
    }
    std::vector<int> eo = order(c);
    double sum = 0;
    for (int j = 0; j < top_k; ++j) sum += s[size_t(eo[size_t(j)])];
    for (int j = 0; j < top_k; ++j) {
      r.ids.push_back(eo[size_t(j)]);
      double w = s[size_t(eo[size_t(j)])];
      if (norm) w /= sum + 1e-20;
      r.weights.push_back(w * rsf);
    }
  }
  return r;
}

// Per-row loss of softmax cross-entropy (0 for ignored rows).
inline Vec cross_entropy(const Vec& l, const std::vector<int32_t>& tg, int64_t t, int64_t v) {
  Vec loss(size_t(t), 0.0);
  for (int64_t i = 0; i < t; ++i) {
    if (tg[size_t(i)] < 0) continue;
    double mx = -INFINITY, s = 0;
    for (int64_t j = 0; j < v; ++j) mx = std::max(mx, l[size_t(i * v + j)]);
    for (int64_t j = 0; j < v; ++j) s += std::exp(l[size_t(i * v + j)] - mx);
    loss[size_t(i)] = mx + std::log(s) - l[size_t(i * v + tg[size_t(i)])];
  }
  return loss;
}

}  // namespace dsv3::test::ref
