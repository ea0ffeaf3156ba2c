#include "model/loss.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.h"

namespace dsv3 {

namespace {

// Cross-entropy mean over rows with a target; fills dlogits (aliasing logits) scaled by weight/count.
double ce_mean(Backend& be, const Tensor& logits, const std::vector<int32_t>& targets, double weight,
               bool need_grad, Tensor* dlogits) {
  int64_t n = 0;
  for (int32_t t : targets) n += t >= 0;
  if (n == 0) return std::numeric_limits<double>::quiet_NaN();
  Tensor th = Tensor::empty(DType::I32, {int64_t(targets.size())});
  std::copy(targets.begin(), targets.end(), th.data<int32_t>());
  Tensor sum = be.alloc(DType::F32, {1});
  CrossEntropyArgs a;
  a.logits = logits;
  a.targets = be.to_device(th);
  a.loss_sum = sum;
  if (need_grad) {
    a.dlogits = logits;
    a.grad_scale = float(weight / double(n));
    *dlogits = logits;
  }
  be.cross_entropy(a);
  return double(be.to_host(sum).data<float>()[0]) / double(n);
}

}  // namespace

double sequence_balance_loss(const Tensor& scores, int64_t B, int64_t top_k, RouterScoring scoring, double alpha,
                             const Tensor& dlogits) {
  const int64_t rows = scores.dim(0), E = scores.dim(1), T = rows / B;
  DSV3_CHECK(rows == B * T && T > 0);
  const float* s = scores.data<float>();
  float* dl = dlogits.defined() ? const_cast<Tensor&>(dlogits).data<float>() : nullptr;
  double loss = 0;
  const size_t ne = size_t(E);
  std::vector<double> f(ne), P(ne), ds(ne);
  std::vector<int64_t> order(ne);
  for (int64_t b = 0; b < B; ++b) {
    std::fill(f.begin(), f.end(), 0.0);
    std::fill(P.begin(), P.end(), 0.0);
    for (int64_t t = b * T; t < (b + 1) * T; ++t) {
      const float* st = s + t * E;
      std::iota(order.begin(), order.end(), int64_t(0));
      std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                        [&](int64_t x, int64_t y) { return st[x] > st[y] || (st[x] == st[y] && x < y); });
      for (int64_t j = 0; j < top_k; ++j) f[size_t(order[size_t(j)])] += double(E) / double(top_k * T);
      double z = 0;
      for (int64_t i = 0; i < E; ++i) z += st[i];
      for (int64_t i = 0; i < E; ++i) P[size_t(i)] += st[i] / z / double(T);
    }
    double lb = 0;
    for (int64_t i = 0; i < E; ++i) lb += f[size_t(i)] * P[size_t(i)];
    loss += alpha * lb / double(B);
    if (!dl) continue;
    // ∂L/∂s'_{t,i} = α f_i /(B·T); through s' = s/Σs, then the scoring function.
    for (int64_t t = b * T; t < (b + 1) * T; ++t) {
      const float* st = s + t * E;
      double z = 0, gs = 0;
      for (int64_t i = 0; i < E; ++i) z += st[i];
      for (int64_t i = 0; i < E; ++i) gs += alpha * f[size_t(i)] / double(B * T) * st[i] / z;
      for (int64_t i = 0; i < E; ++i) ds[size_t(i)] = (alpha * f[size_t(i)] / double(B * T) - gs) / z;
      if (scoring == RouterScoring::Sigmoid) {
        for (int64_t i = 0; i < E; ++i) dl[t * E + i] += float(ds[size_t(i)] * st[i] * (1.0 - st[i]));
      } else {  // softmax: ∂s_i/∂x_j = s_i(δ_ij − s_j)
        double dot = 0;
        for (int64_t i = 0; i < E; ++i) dot += ds[size_t(i)] * st[i];
        for (int64_t i = 0; i < E; ++i) dl[t * E + i] += float(st[i] * (ds[size_t(i)] - dot));
      }
    }
  }
  return loss;
}

LossResult compute_loss(Backend& be, const Model& m, ForwardOutput& out, std::span<const int32_t> labels,
                        int64_t B, int64_t T, int64_t Lb, const LossOptions& o) {
  if (Lb < T || int64_t(labels.size()) != B * Lb)
    throw InternalError(cat("compute_loss: ", labels.size(), " labels for B=", B, " T=", T, " Lb=", Lb));
  LossResult r;
  std::vector<int32_t> tg(size_t(B * T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      tg[size_t(b * T + t)] = t + 1 < Lb ? labels[size_t(b * Lb + t + 1)] : -1;
      r.main_targets += t + 1 < Lb;
    }
  r.main = ce_mean(be, out.logits, tg, 1.0, o.need_grad, &r.grad.dlogits);
  r.total = r.main;

  const int64_t D = int64_t(out.mtp_logits.size());
  r.grad.dmtp_logits.resize(size_t(D));
  for (int64_t k = 1; k <= D; ++k) {
    const int64_t S = T - k;
    std::vector<int32_t> tk(size_t(B * S));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < S; ++i)
        tk[size_t(b * S + i)] = i + k + 1 < Lb ? labels[size_t(b * Lb + i + k + 1)] : -1;
    const double w = o.mtp_lambda / double(m.config().num_nextn_predict_layers);
    const double l = ce_mean(be, out.mtp_logits[size_t(k - 1)], tk, w, o.need_grad && w != 0.0,
                             &r.grad.dmtp_logits[size_t(k - 1)]);
    r.mtp.push_back(l);
    // A module without targets (NaN by ce_mean) adds nothing; a diverged one (NaN or Inf with
    // targets) makes the total non-finite, as the main loss would, unless its weight is 0.
    const bool has_targets = std::any_of(tk.begin(), tk.end(), [](int32_t t) { return t >= 0; });
    if (has_targets && w != 0.0) r.total += w * l;
  }

  if (o.balance_alpha > 0) {
    const ModelActs& a = m.acts();
    const ModelDims& d = m.dims();
    const size_t L = m.params().layers.size();
    r.grad.router_dlogits.resize(L + a.mtp.size());
    auto layer = [&](const LayerActs& la, int64_t rows_per_seq, size_t idx) {
      if (!present(la.moe.scores)) return;
      Tensor s = be.to_host(la.moe.scores);
      Tensor dl;
      if (o.need_grad) dl = Tensor::zeros(DType::F32, s.shape());
      r.balance += sequence_balance_loss(s, s.dim(0) / rows_per_seq, d.top_k, d.scoring, o.balance_alpha, dl);
      if (o.need_grad) r.grad.router_dlogits[idx] = be.to_device(dl);
    };
    if (a.layers.size() != L) throw InternalError("compute_loss: the balance loss needs keep_activations");
    for (size_t l = 0; l < L; ++l) layer(a.layers[l], T, l);
    for (size_t k = 0; k < a.mtp.size(); ++k)
      if (a.mtp[k].S > 0) layer(a.mtp[k].block, a.mtp[k].S, L + k);
    r.total += r.balance;
  }
  return r;
}

}  // namespace dsv3
