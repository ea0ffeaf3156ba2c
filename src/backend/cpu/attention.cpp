// Rotary embedding and exact causal attention (forward and backward).
//
// Attention runs one OpenMP task per (batch, head), over blocks of query rows: S = scale·q·kᵀ and
// P·v through sgemm (strided straight out of the [T, H, D] layout). Scratch is one block of scores
// per thread, so memory stays O(threads · block · S) rather than O(T · S).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/vec_math.h"

namespace dsv3 {

void CpuBackend::rope(const RopeArgs& a) {
  validate(a);
  int64_t t = a.x.dim(0), h = a.x.dim(1), w = a.x.dim(2), half = a.rope_dim / 2;
  int64_t max_pos = a.cos.dim(0);
  const int32_t* pos = a.positions.data<int32_t>();
  for (int64_t i = 0; i < t; ++i)
    if (pos[i] < 0 || pos[i] >= max_pos)
      input_error("rope: position ", pos[i], " of token ", i, " is outside the table [0, ", max_pos, ")");
  const float* cs = a.cos.data<float>();
  const float* sn = a.sin.data<float>();
  float* x = cpu::mut<float>(a.x);
  float sign = a.inverse ? -1.0f : 1.0f;
  // Pair i is (x[p], x[p + stride]) with p = 2i (interleaved) or i (halves).
  int64_t step = a.interleaved ? 2 : 1, stride = a.interleaved ? 1 : half;
#pragma omp parallel for schedule(static) if (t * h * half >= cpu::kParallelMin)
  for (int64_t i = 0; i < t; ++i) {
    const float* c = cs + int64_t(pos[i]) * half;
    const float* s = sn + int64_t(pos[i]) * half;
    for (int64_t hh = 0; hh < h; ++hh) {
      float* r = x + (i * h + hh) * w + a.offset;
      for (int64_t j = 0; j < half; ++j) {
        float* p = r + j * step;
        float x0 = p[0], x1 = p[stride], cj = c[j], sj = sign * s[j];
        p[0] = x0 * cj - x1 * sj;
        p[stride] = x1 * cj + x0 * sj;
      }
    }
  }
}

namespace {

constexpr int64_t kQueryBlock = 128;
constexpr int64_t kLanes = 16;

// One score row in place: softmax over [0, lim), zeros on [lim, n); returns the logsumexp. Sums in
// double over fixed lanes (the same bits for any thread count).
[[gnu::always_inline]] inline void softmax_row_body(float* row, int64_t lim, int64_t n, float* lse) {
  float m[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) m[k] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= lim; j += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) m[k] = row[j + k] > m[k] ? row[j + k] : m[k];
  for (; j < lim; ++j) m[0] = row[j] > m[0] ? row[j] : m[0];
  float mx = m[0];
  for (int64_t k = 1; k < kLanes; ++k) mx = m[k] > mx ? m[k] : mx;
  for (j = 0; j < lim; ++j) row[j] = cpu::exp_f32(row[j] - mx);
  double acc[kLanes] = {};
  for (j = 0; j + kLanes <= lim; j += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) acc[k] += double(row[j + k]);
  for (; j < lim; ++j) acc[0] += double(row[j]);
  double sum = 0.0;
  for (int64_t k = 0; k < kLanes; ++k) sum += acc[k];
  const float inv = float(1.0 / sum);
  for (j = 0; j < lim; ++j) row[j] *= inv;
  for (j = lim; j < n; ++j) row[j] = 0.0f;
  *lse = mx + float(std::log(sum));
}
DSV3_CPU_KERNEL(softmax_row, (float* row, int64_t lim, int64_t n, float* lse), softmax_row_body, (row, lim, n, lse))

// Backward of one row: p = exp(s − lse), ds = p·(dp − d)·scale, both zero on [lim, n).
[[gnu::always_inline]] inline void softmax_grad_row_body(float* p, float* ds, int64_t lim, int64_t n, float lse,
                                                         float d, float scale) {
  for (int64_t j = 0; j < lim; ++j) {
    const float e = cpu::exp_f32(p[j] - lse);
    p[j] = e;
    ds[j] = e * (ds[j] - d) * scale;
  }
  for (int64_t j = lim; j < n; ++j) p[j] = ds[j] = 0.0f;
}
DSV3_CPU_KERNEL(softmax_grad_row, (float* p, float* ds, int64_t lim, int64_t n, float lse, float d, float scale),
                softmax_grad_row_body, (p, ds, lim, n, lse, d, scale))

struct AttnDims {
  int64_t b, t, s, h, dqk, dv;
};
AttnDims attn_dims(const Tensor& q, const Tensor& k, const Tensor& v) {
  int o = q.ndim() == 4 ? 1 : 0;
  return {o ? q.dim(0) : 1, q.dim(o), k.dim(o), q.dim(o + 1), q.dim(o + 2), v.dim(o + 2)};
}
// Keys visible to query row i: [0, limit).
inline int64_t key_limit(bool causal, int64_t q_offset, int64_t i, int64_t s) {
  return causal ? std::min(s, q_offset + i + 1) : s;
}

}  // namespace

void CpuBackend::attention(const AttentionArgs& a) {
  if (a.keep) *a.keep = Tensor();  // the CPU keeps nothing
  if (a.kv.defined() || a.k_pe.defined()) return attention_split_kv(*this, a);
  validate(a);
  AttnDims d = attn_dims(a.q, a.k, a.v);
  const float* q = a.q.data<float>();
  const float* k = a.k.data<float>();
  const float* v = a.v.data<float>();
  float* out = cpu::mut<float>(a.out);
  float* lse = present(a.lse) ? cpu::mut<float>(a.lse) : nullptr;
  int64_t ldq = d.h * d.dqk, ldv = d.h * d.dv;
  size_t blk = size_t(std::min(d.t, kQueryBlock) * std::max<int64_t>(d.s, 1));
  // One task per (batch, head); the GEMMs inside run in the task's thread. Tasks go to threads as
  // they come free (a task's result does not depend on its thread).
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < d.b * d.h; ++task) {
    int64_t b = task / d.h, hh = task % d.h;
    float* sc = cpu::scratch(blk);
    const float* qb = q + b * d.t * ldq + hh * d.dqk;
    const float* kb = k + b * d.s * ldq + hh * d.dqk;
    const float* vb = v + b * d.s * ldv + hh * d.dv;
    float* ob = out + b * d.t * ldv + hh * d.dv;
    float* lb = lse ? lse + (b * d.h + hh) * d.t : nullptr;
    for (int64_t i0 = 0; i0 < d.t; i0 += kQueryBlock) {
      int64_t i1 = std::min(d.t, i0 + kQueryBlock), nq = i1 - i0;
      int64_t kmax = key_limit(a.causal, a.q_offset, i1 - 1, d.s);
      cpu::sgemm(false, true, nq, kmax, d.dqk, a.scale, qb + i0 * ldq, ldq, kb, ldq, 0.0f, sc, kmax);
      for (int64_t r = 0; r < nq; ++r) {
        float l;
        softmax_row(sc + r * kmax, key_limit(a.causal, a.q_offset, i0 + r, d.s), kmax, &l);
        if (lb) lb[i0 + r] = l;
      }
      cpu::sgemm(false, false, nq, d.dv, kmax, 1.0f, sc, kmax, vb, ldv, 0.0f, ob + i0 * ldv, ldv);
    }
  }
}

void CpuBackend::attention_backward(const AttentionBackwardArgs& a) {
  if (a.kv.defined() || a.k_pe.defined()) return attention_backward_split_kv(*this, a);
  validate(a);
  require_operands(a, "the CPU backend cannot read kept operands in its place");
  AttnDims d = attn_dims(a.q, a.k, a.v);
  const float* q = a.q.data<float>();
  const float* k = a.k.data<float>();
  const float* v = a.v.data<float>();
  const float* out = a.out.data<float>();
  const float* dout = a.dout.data<float>();
  const float* lse = a.lse.data<float>();
  float* dq = present(a.dq) ? cpu::mut<float>(a.dq) : nullptr;
  float* dk = present(a.dk) ? cpu::mut<float>(a.dk) : nullptr;
  float* dv = present(a.dv) ? cpu::mut<float>(a.dv) : nullptr;
  int64_t ldq = d.h * d.dqk, ldv = d.h * d.dv;
  size_t blk = size_t(std::min(d.t, kQueryBlock) * std::max<int64_t>(d.s, 1));
  // One task per (batch, head): it owns that head's slices of dq, dk and dv (handed out dynamically).
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < d.b * d.h; ++task) {
    int64_t b = task / d.h, hh = task % d.h;
    float* p = cpu::scratch(blk, 0);
    float* ds = cpu::scratch(blk, 1);
    size_t qo = size_t(b * d.t * ldq + hh * d.dqk), ko = size_t(b * d.s * ldq + hh * d.dqk);
    size_t vo = size_t(b * d.s * ldv + hh * d.dv), oo = size_t(b * d.t * ldv + hh * d.dv);
    const float* lb = lse + (b * d.h + hh) * d.t;
    for (int64_t j = 0; j < d.s; ++j) {
      if (dk) std::fill(dk + ko + j * ldq, dk + ko + j * ldq + d.dqk, 0.0f);
      if (dv) std::fill(dv + vo + j * ldv, dv + vo + j * ldv + d.dv, 0.0f);
    }
    for (int64_t i0 = 0; i0 < d.t; i0 += kQueryBlock) {
      int64_t i1 = std::min(d.t, i0 + kQueryBlock), nq = i1 - i0;
      int64_t kmax = key_limit(a.causal, a.q_offset, i1 - 1, d.s);
      // P = exp(scale·q·kᵀ − lse), dP = dO·vᵀ, dS = P ⊙ (dP − rowsum(dO ⊙ O)).
      cpu::sgemm(false, true, nq, kmax, d.dqk, a.scale, q + qo + i0 * ldq, ldq, k + ko, ldq, 0.0f, p, kmax);
      cpu::sgemm(false, true, nq, kmax, d.dv, 1.0f, dout + oo + i0 * ldv, ldv, v + vo, ldv, 0.0f, ds, kmax);
      for (int64_t r = 0; r < nq; ++r) {
        const float* o_r = out + oo + (i0 + r) * ldv;
        const float* g_r = dout + oo + (i0 + r) * ldv;
        double dd = 0.0;
        for (int64_t j = 0; j < d.dv; ++j) dd += double(o_r[j]) * double(g_r[j]);
        float drow = float(dd);
        softmax_grad_row(p + r * kmax, ds + r * kmax, key_limit(a.causal, a.q_offset, i0 + r, d.s), kmax,
                         lb[i0 + r], drow, a.scale);
      }
      if (dq) cpu::sgemm(false, false, nq, d.dqk, kmax, 1.0f, ds, kmax, k + ko, ldq, 0.0f, dq + qo + i0 * ldq, ldq);
      if (dk) cpu::sgemm(true, false, kmax, d.dqk, nq, 1.0f, ds, kmax, q + qo + i0 * ldq, ldq, 1.0f, dk + ko, ldq);
      if (dv) cpu::sgemm(true, false, kmax, d.dv, nq, 1.0f, p, kmax, dout + oo + i0 * ldv, ldv, 1.0f, dv + vo, ldv);
    }
  }
}

}  // namespace dsv3
