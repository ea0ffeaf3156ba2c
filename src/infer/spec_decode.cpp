#include "infer/spec_decode.h"

#include "core/error.h"
#include "infer/sampler.h"

namespace dsv3 {

SpecVerdict speculative_verify(std::span<const int32_t> drafts, const std::vector<std::vector<float>>& q,
                               const std::vector<std::vector<float>>& p, Rng& rng) {
  const size_t N = drafts.size();
  DSV3_CHECK(q.size() == N && p.size() == N + 1, "drafts ", N, " q ", q.size(), " p ", p.size());
  SpecVerdict v;
  for (size_t i = 0; i < N; ++i) {
    const int32_t d = drafts[i];
    const double pd = p[i][size_t(d)], qd = q[i][size_t(d)];
    DSV3_CHECK(qd > 0.0, "draft ", d, " has zero draft probability");
    const double u = rng.uniform();
    if (u < pd / qd) {
      ++v.accepted;
      continue;
    }
    // Rejected: draw from the normalised residual max(0, p − q).
    std::vector<float> r(p[i].size());
    double mass = 0.0;
    for (size_t t = 0; t < r.size(); ++t) {
      const double x = double(p[i][t]) - double(q[i][t]);
      r[t] = x > 0.0 ? float(x) : 0.0f;
      mass += r[t];
    }
    // p == q up to rounding makes the residual empty; then p itself is the right law.
    v.next = mass > 0.0 ? sample_from(r, rng) : sample_from(p[i], rng);
    return v;
  }
  v.next = sample_from(p[N], rng);
  return v;
}

void SpecStats::record(int n_drafts, int n_accepted, int produced) {
  if (proposed.size() < size_t(n_drafts)) {
    proposed.resize(size_t(n_drafts), 0);
    accepted.resize(size_t(n_drafts), 0);
  }
  // Position s is reached only when every earlier draft was kept.
  for (int s = 0; s < n_drafts && s <= n_accepted; ++s) {
    ++proposed[size_t(s)];
    if (s < n_accepted) ++accepted[size_t(s)];
  }
  ++rounds;
  tokens += produced;
}

}  // namespace dsv3
