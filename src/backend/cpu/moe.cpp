// MoE: the router (selection and weights, DESIGN §3) and its backward, sorting picks by expert,
// and the row gather / weighted scatter-add that move tokens to experts and back.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <vector>

#include "backend/cpu/cpu_backend.h"

namespace dsv3 {

namespace {
// Indices of the k largest values, largest first; equal values: lower index first (torch.topk on
// the CPU behaves so for the cases we use). Partial sort over an index list.
void top_k(const float* val, int64_t n, int64_t k, std::vector<int>& idx, int* out) {
  idx.resize(size_t(n));
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int x, int y) {
    return val[x] > val[y] || (val[x] == val[y] && x < y);
  });
  std::copy(idx.begin(), idx.begin() + k, out);
}
}  // namespace

void CpuBackend::router(const RouterArgs& a) {
  validate(a);
  int64_t t = a.logits.dim(0), e = a.logits.dim(1), k = a.top_k;
  const float* lg = a.logits.data<float>();
  std::vector<float> bias(size_t(e), 0.0f);
  bool has_bias = present(a.bias);
  if (has_bias) convert(a.bias.raw(), a.bias.dtype(), bias.data(), DType::F32, size_t(e));
  float* sc = cpu::mut<float>(a.scores);
  int32_t* ids = cpu::mut<int32_t>(a.ids);
  float* wts = cpu::mut<float>(a.weights);
  bool grouped = a.method != RouterMethod::Greedy;
  int64_t ng = grouped ? a.n_group : 1, gsz = e / ng;
#pragma omp parallel if (t * e >= cpu::kParallelMin)
  {
    std::vector<float> choice(static_cast<size_t>(e)), gscore(static_cast<size_t>(ng));
    std::vector<int> idx, gsel(static_cast<size_t>(ng)), pick(static_cast<size_t>(k));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < t; ++i) {
      const float* l = lg + i * e;
      float* s = sc + i * e;
      if (a.scoring == RouterScoring::Sigmoid) {
        for (int64_t j = 0; j < e; ++j) s[j] = 1.0f / (1.0f + std::exp(-l[j]));
      } else {
        float mx = *std::max_element(l, l + e);
        double sum = 0.0;
        for (int64_t j = 0; j < e; ++j) sum += std::exp(double(l[j] - mx));
        for (int64_t j = 0; j < e; ++j) s[j] = float(std::exp(double(l[j] - mx)) / sum);
      }
      for (int64_t j = 0; j < e; ++j) choice[size_t(j)] = has_bias ? s[j] + bias[size_t(j)] : s[j];
      if (grouped && a.topk_group < ng) {
        for (int64_t g = 0; g < ng; ++g) {
          const float* c = choice.data() + g * gsz;
          if (a.method == RouterMethod::NoauxTc) {
            int top2[2];
            top_k(c, gsz, 2, idx, top2);
            gscore[size_t(g)] = c[top2[0]] + c[top2[1]];
          } else {
            gscore[size_t(g)] = *std::max_element(c, c + gsz);
          }
        }
        top_k(gscore.data(), ng, a.topk_group, idx, gsel.data());
        std::vector<char> keep(size_t(ng), 0);
        for (int g = 0; g < a.topk_group; ++g) keep[size_t(gsel[size_t(g)])] = 1;
        for (int64_t j = 0; j < e; ++j)
          if (!keep[size_t(j / gsz)]) choice[size_t(j)] = -std::numeric_limits<float>::infinity();
      }
      top_k(choice.data(), e, k, idx, pick.data());
      float* w = wts + i * k;
      float sum = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        ids[i * k + j] = pick[size_t(j)];
        w[j] = s[pick[size_t(j)]];
        sum += w[j];
      }
      if (a.norm_topk_prob)
        for (int64_t j = 0; j < k; ++j) w[j] /= sum + 1e-20f;
      for (int64_t j = 0; j < k; ++j) w[j] *= a.routed_scaling_factor;
    }
  }
}

void CpuBackend::router_backward(const RouterBackwardArgs& a) {
  validate(a);
  int64_t t = a.scores.dim(0), e = a.scores.dim(1), k = a.ids.dim(1);
  const float* sc = a.scores.data<float>();
  const int32_t* ids = a.ids.data<int32_t>();
  const float* dw = a.dweights.data<float>();
  float* dl = cpu::mut<float>(a.dlogits);
  float c = a.routed_scaling_factor;
  bool acc = a.accumulate;
#pragma omp parallel if (t * e >= cpu::kParallelMin)
  {
    std::vector<float> ds(static_cast<size_t>(e));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < t; ++i) {
      const float* s = sc + i * e;
      const int32_t* id = ids + i * k;
      const float* g = dw + i * k;
      std::fill(ds.begin(), ds.end(), 0.0f);
      if (a.norm_topk_prob) {
        // w_j = c·s_j / Z, Z = Σ s + 1e-20:  ∂L/∂s_j = c·(g_j / Z − Σ_i g_i s_i / Z²).
        float z = 0.0f, gs = 0.0f;
        for (int64_t j = 0; j < k; ++j) z += s[id[j]];
        z += 1e-20f;
        for (int64_t j = 0; j < k; ++j) gs += g[j] * s[id[j]];
        for (int64_t j = 0; j < k; ++j) ds[size_t(id[j])] += c * (g[j] / z - gs / (z * z));
      } else {
        for (int64_t j = 0; j < k; ++j) ds[size_t(id[j])] += c * g[j];
      }
      float* o = dl + i * e;
      if (a.scoring == RouterScoring::Sigmoid) {
        for (int64_t j = 0; j < e; ++j) {
          float v = ds[size_t(j)] * s[j] * (1.0f - s[j]);
          o[j] = acc ? o[j] + v : v;
        }
      } else {
        double dot = 0.0;
        for (int64_t j = 0; j < e; ++j) dot += double(ds[size_t(j)]) * double(s[j]);
        for (int64_t j = 0; j < e; ++j) {
          float v = s[j] * (ds[size_t(j)] - float(dot));
          o[j] = acc ? o[j] + v : v;
        }
      }
    }
  }
}

void CpuBackend::moe_sort(const MoeSortArgs& a) {
  validate(a);
  int64_t n = a.ids.numel(), k = a.ids.dim(1), e = a.n_experts;
  const int32_t* ids = a.ids.data<int32_t>();
  int32_t* counts = cpu::mut<int32_t>(a.counts);
  std::fill(counts, counts + e, 0);
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= e) internal_error("moe_sort: expert id ", ids[i], " at ", i, " outside [0, ", e, ")");
    ++counts[ids[i]];
  }
  std::vector<int64_t> next(size_t(e), 0);
  for (int64_t j = 1; j < e; ++j) next[size_t(j)] = next[size_t(j - 1)] + counts[j - 1];
  int32_t* pick = cpu::mut<int32_t>(a.pick);
  int32_t* token = cpu::mut<int32_t>(a.token);
  for (int64_t i = 0; i < n; ++i) {
    int64_t r = next[size_t(ids[i])]++;
    pick[r] = int32_t(i);
    token[r] = int32_t(i / k);
  }
}

namespace {
void check_idx(const Tensor& idx, int64_t rows, const char* op) {
  const int32_t* p = idx.data<int32_t>();
  for (int64_t i = 0; i < idx.numel(); ++i)
    if (p[i] < 0 || p[i] >= rows) internal_error(op, ": idx[", i, "] = ", p[i], " outside [0, ", rows, ")");
}
}  // namespace

void CpuBackend::gather_rows(const GatherRowsArgs& a) {
  validate(a);
  check_idx(a.idx, a.src.dim(0), "gather_rows");
  int64_t n = a.idx.numel(), d = a.src.dim(1);
  const float* src = a.src.data<float>();
  const int32_t* idx = a.idx.data<int32_t>();
  const float* w = present(a.weight) ? a.weight.data<float>() : nullptr;
  const cpu::F32Out o32(a.out);
  float* out = o32.f32();
  bool acc = a.accumulate;
#pragma omp parallel for schedule(static) if (n * d >= cpu::kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float* s = src + int64_t(idx[i]) * d;
    float* o = out + i * d;
    float wi = w ? w[i] : 1.0f;
    for (int64_t j = 0; j < d; ++j) {
      float v = w ? wi * s[j] : s[j];
      o[j] = acc ? o[j] + v : v;
    }
  }
  o32.done();
}

void CpuBackend::scatter_add_rows(const ScatterAddRowsArgs& a) {
  validate(a);
  int64_t r = a.out.dim(0), n = a.idx.numel(), d = a.src.dim(1);
  check_idx(a.idx, r, "scatter_add_rows");
  const float* src = a.src.data<float>();
  const int32_t* idx = a.idx.data<int32_t>();
  const float* w = present(a.weight) ? a.weight.data<float>() : nullptr;
  float* out = cpu::mut<float>(a.out);
  // Each thread owns a range of output rows and adds their sources in ascending i.
#pragma omp parallel if (n * d >= cpu::kParallelMin)
  {
    int nt = omp_get_num_threads(), id = omp_get_thread_num();
    int64_t lo = r * id / nt, hi = r * (id + 1) / nt;
    for (int64_t i = 0; i < n; ++i) {
      int64_t row = idx[i];
      if (row < lo || row >= hi) continue;
      float* o = out + row * d;
      const float* s = src + i * d;
      if (w)
        for (int64_t j = 0; j < d; ++j) o[j] += w[i] * s[j];
      else
        for (int64_t j = 0; j < d; ++j) o[j] += s[j];
    }
  }
}

void CpuBackend::scatter_add_rows_backward(const ScatterAddRowsBackwardArgs& a) {
  validate(a);
  int64_t n = a.idx.numel(), d = a.src.dim(1);
  check_idx(a.idx, a.dout.dim(0), "scatter_add_rows_backward");
  const float* dout = a.dout.data<float>();
  const float* src = a.src.data<float>();
  const int32_t* idx = a.idx.data<int32_t>();
  const float* w = present(a.weight) ? a.weight.data<float>() : nullptr;
  const std::optional<cpu::F32Out> d32 = present(a.dsrc) ? std::optional<cpu::F32Out>(a.dsrc) : std::nullopt;
  float* dsrc = d32 ? d32->f32() : nullptr;
  float* dw = present(a.dweight) ? cpu::mut<float>(a.dweight) : nullptr;
  bool acc = a.accumulate;
#pragma omp parallel for schedule(static) if (n * d >= cpu::kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float* g = dout + int64_t(idx[i]) * d;
    const float* s = src + i * d;
    if (dw) {
      double dot = 0.0;
      for (int64_t j = 0; j < d; ++j) dot += double(g[j]) * double(s[j]);
      dw[i] = acc ? dw[i] + float(dot) : float(dot);
    }
    if (dsrc) {
      float wi = w ? w[i] : 1.0f;
      float* o = dsrc + i * d;
      for (int64_t j = 0; j < d; ++j) o[j] = acc ? o[j] + wi * g[j] : wi * g[j];
    }
  }
  if (d32) d32->done();
}

}  // namespace dsv3
