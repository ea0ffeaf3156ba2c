#include "infer/mla_absorbed.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "backend/cpu/cpu_backend.h"
#include "core/threads.h"
#include "model/weights.h"

namespace dsv3 {

AbsorbedKvB split_kv_b(const LinearParam& kv_b, const ModelDims& d, bool fp8_blocks) {
  const int64_t per = d.nope + d.vd;
  DSV3_CHECK(kv_b.w.dim(0) == d.nh * per && kv_b.w.dim(1) == d.kv_lora, "kv_b_proj ", kv_b.w.shape().str());
  const Tensor w = kv_b.w.dtype() == DType::F8_E4M3 ? dequantize_fp8_blocks(kv_b.w, kv_b.scale_inv)
                                                    : kv_b.w.to(DType::F32);
  AbsorbedKvB a;
  a.w_uk = Tensor::empty(DType::F32, {d.nh, d.nope, d.kv_lora});
  a.w_uv = Tensor::empty(DType::F32, {d.nh, d.vd, d.kv_lora});
  const float* src = w.data<float>();
  const size_t R = size_t(d.kv_lora);
  for (int64_t h = 0; h < d.nh; ++h) {
    std::memcpy(a.w_uk.data<float>() + size_t(h * d.nope) * R, src + size_t(h * per) * R,
                size_t(d.nope) * R * sizeof(float));
    std::memcpy(a.w_uv.data<float>() + size_t(h * d.vd) * R, src + size_t(h * per + d.nope) * R,
                size_t(d.vd) * R * sizeof(float));
  }
  constexpr int64_t B = 128;
  if (!fp8_blocks || kv_b.w.dtype() != DType::F8_E4M3 || d.nope % B || d.vd % B || d.kv_lora % B) return a;
  const uint8_t* q = static_cast<const uint8_t*>(kv_b.w.raw());
  const float* sc = kv_b.scale_inv.data<float>();
  const int64_t cb = d.kv_lora / B;  // kv_b's scale columns
  a.uk_t_fp8.w = Tensor::empty(DType::F8_E4M3, {d.nh * d.kv_lora, d.nope});
  a.uk_t_fp8.scale_inv = Tensor::empty(DType::F32, {d.nh * cb, d.nope / B});
  a.uv_fp8.w = Tensor::empty(DType::F8_E4M3, {d.nh * d.vd, d.kv_lora});
  a.uv_fp8.scale_inv = Tensor::empty(DType::F32, {d.nh * d.vd / B, cb});
  uint8_t* uk = static_cast<uint8_t*>(a.uk_t_fp8.w.raw());
  float* uks = a.uk_t_fp8.scale_inv.data<float>();
  for (int64_t h = 0; h < d.nh; ++h) {
    for (int64_t i = 0; i < d.kv_lora; ++i)
      for (int64_t k = 0; k < d.nope; ++k) uk[(h * d.kv_lora + i) * d.nope + k] = q[(h * per + k) * R + size_t(i)];
    const int64_t kbs = d.nope / B;  // a head's W_UK row blocks become its W_UKᵀ column blocks
    for (int64_t ib = 0; ib < cb; ++ib)
      for (int64_t kb = 0; kb < kbs; ++kb) uks[(h * cb + ib) * kbs + kb] = sc[(h * per / B + kb) * cb + ib];
    std::memcpy(static_cast<uint8_t*>(a.uv_fp8.w.raw()) + size_t(h * d.vd) * R, q + size_t(h * per + d.nope) * R,
                size_t(d.vd) * R);
    std::memcpy(a.uv_fp8.scale_inv.data<float>() + (h * d.vd / B) * cb, sc + ((h * per + d.nope) / B) * cb,
                size_t(d.vd / B * cb) * sizeof(float));
  }
  return a;
}

void mla_absorbed_attention(const LatentKvPool& pool, int64_t layer, const std::vector<BlockTable*>& tables,
                            const StepRows& rows, const AbsorbedKvB& w, const ModelDims& d, const Tensor& q,
                            const Tensor& out) {
  const int64_t N = rows.size(), nh = d.nh, R = d.kv_lora, P = d.rope, W = R + P, bs = pool.block_size();
  DSV3_CHECK(q.numel() == N * nh * d.qk && out.numel() == N * nh * d.vd);
  const float* qd = q.data<float>();
  float* od = const_cast<Tensor&>(out).data<float>();
  const float* wuk = w.w_uk.data<float>();
  const float* wuv = w.w_uv.data<float>();
  const float scale = d.softmax_scale;
  const bool direct = pool.dtype() == DType::F32;

  // Queries in cache-row form: qcat[r, h] = [W_UK[h]ᵀ·q_nope[r, h] ; q_pe[r, h]]  [N, nh, W].
  std::vector<float> qcat(static_cast<size_t>(N * nh * W));
  for (int64_t h = 0; h < nh; ++h)
    cpu::sgemm(false, false, N, R, d.nope, 1.0f, qd + h * d.qk, nh * d.qk, wuk + h * d.nope * R, R, 0.0f,
               qcat.data() + h * W, nh * W);
  for (int64_t i = 0; i < N * nh; ++i)
    std::memcpy(qcat.data() + i * W + R, qd + i * d.qk + d.nope, size_t(P) * sizeof(float));

  // Per (row, group of heads): scores = scale·qcat·Cᵀ over the sequence's blocks, softmax, then
  // lat = P·C[:, :R]. Groups split the heads when there are fewer rows than threads (batch 1).
  std::vector<float> lat(static_cast<size_t>(N * nh * R));
  const int64_t T = num_threads(), splits = N >= T ? 1 : std::min(nh, (T + N - 1) / N);
  const int64_t G = (nh + splits - 1) / splits, groups = (nh + G - 1) / G;
  int64_t work = 0;
  for (int64_t r = 0; r < N; ++r) work += (rows.pos[size_t(r)] + 1) * W * nh;
#pragma omp parallel num_threads(int(T)) if (work > (int64_t(1) << 16) && N * groups > 1)
  {
    std::vector<float> scores, buf(direct ? 0 : static_cast<size_t>(bs * W));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < N * groups; ++task) {
      const int64_t r = task / groups, h0 = (task % groups) * G, hn = std::min(G, nh - h0);
      const BlockTable& t = *tables[size_t(rows.seq[size_t(r)])];
      const int64_t S = rows.pos[size_t(r)] + 1, nb = (S + bs - 1) / bs;
      scores.resize(static_cast<size_t>(hn * S));
      auto rows_of = [&](int64_t b) -> const float* {
        if (direct) return pool.block_rows_f32(t.blocks[size_t(b)], layer);
        pool.read_rows(t, layer, b * bs, std::min(bs, S - b * bs), buf.data());
        return buf.data();
      };
      const float* qr = qcat.data() + (r * nh + h0) * W;
      for (int64_t b = 0; b < nb; ++b)
        cpu::sgemm(false, true, hn, std::min(bs, S - b * bs), W, scale, qr, W, rows_of(b), W, 0.0f,
                   scores.data() + b * bs, S);
      for (int64_t h = 0; h < hn; ++h) {
        float* s = scores.data() + h * S;
        const float mx = *std::max_element(s, s + S);
        double sum = 0.0;
        for (int64_t j = 0; j < S; ++j) sum += s[j] = std::exp(s[j] - mx);
        const float inv = float(1.0 / sum);
        for (int64_t j = 0; j < S; ++j) s[j] *= inv;
      }
      float* lr = lat.data() + (r * nh + h0) * R;
      for (int64_t b = 0; b < nb; ++b)
        cpu::sgemm(false, false, hn, R, std::min(bs, S - b * bs), 1.0f, scores.data() + b * bs, S, rows_of(b), W,
                   b == 0 ? 0.0f : 1.0f, lr, R);
    }
  }
  // o[r, h] = W_UV[h]·lat[r, h]  [N, nh, vd]
  for (int64_t h = 0; h < nh; ++h)
    cpu::sgemm(false, true, N, d.vd, R, 1.0f, lat.data() + h * R, nh * R, wuv + h * d.vd * R, R, 0.0f,
               od + h * d.vd, nh * d.vd);
}

void LatentAttention::attend(int64_t layer, const MlaParams&, const StepRows& rows, const Tensor& q,
                             const Tensor& c_kv_n, const Tensor& k_pe, const Tensor& out) {
  const float* c = c_kv_n.data<float>();
  const float* k = k_pe.data<float>();
  for (int64_t r = 0; r < rows.size(); ++r)
    pool_.write(*tables[size_t(rows.seq[size_t(r)])], layer, rows.pos[size_t(r)], c + r * d_.kv_lora, k + r * d_.rope);
  mla_absorbed_attention(pool_, layer, tables, rows, absorbed_[size_t(layer)], d_, q, out);
}

void PlainAttention::attend(int64_t layer, const MlaParams& p, const StepRows& rows, const Tensor& q,
                            const Tensor& c_kv_n, const Tensor& k_pe, const Tensor& out) {
  const int64_t N = rows.size(), nh = d_.nh, qk = d_.qk, vd = d_.vd, nope = d_.nope;
  // Up-project this step's latents to per-head keys and values.
  Tensor kv = be_.alloc(DType::F32, {N, nh * (nope + vd)});
  linear_forward(be_, p.kv_b_proj, c_kv_n, kv);
  const float* kvd = kv.data<float>();
  const float* kp = k_pe.data<float>();
  for (int64_t r = 0; r < N; ++r) {
    PlainSeqCache& s = *seqs[size_t(rows.seq[size_t(r)])];
    if (s.k.size() < size_t(layers_)) {
      s.k.resize(size_t(layers_));
      s.v.resize(size_t(layers_));
    }
    const int64_t pos = rows.pos[size_t(r)];
    auto& K = s.k[size_t(layer)];
    auto& V = s.v[size_t(layer)];
    if (K.size() < size_t((pos + 1) * nh * qk)) {
      K.resize(size_t((pos + 1) * nh * qk));
      V.resize(size_t((pos + 1) * nh * vd));
    }
    for (int64_t h = 0; h < nh; ++h) {
      const float* src = kvd + (r * nh + h) * (nope + vd);
      float* kd = K.data() + (pos * nh + h) * qk;
      std::memcpy(kd, src, size_t(nope) * sizeof(float));
      std::memcpy(kd + nope, kp + r * d_.rope, size_t(d_.rope) * sizeof(float));
      std::memcpy(V.data() + (pos * nh + h) * vd, src + nope, size_t(vd) * sizeof(float));
    }
  }
  // One attention call per run of consecutive rows of a sequence.
  auto noop = std::shared_ptr<void>(reinterpret_cast<void*>(1), [](void*) {});
  for (int64_t r0 = 0; r0 < N;) {
    int64_t r1 = r0 + 1;
    while (r1 < N && rows.seq[size_t(r1)] == rows.seq[size_t(r0)]) ++r1;
    PlainSeqCache& s = *seqs[size_t(rows.seq[size_t(r0)])];
    const int64_t T = r1 - r0, q0 = rows.pos[size_t(r0)], S = rows.pos[size_t(r1 - 1)] + 1;
    AttentionArgs a;
    a.q = q.rows(r0, r1).reshape({1, T, nh, qk});
    a.k = Tensor::borrow(s.k[size_t(layer)].data(), DType::F32, {1, S, nh, qk}, noop);
    a.v = Tensor::borrow(s.v[size_t(layer)].data(), DType::F32, {1, S, nh, vd}, noop);
    a.out = out.rows(r0, r1).reshape({1, T, nh, vd});
    a.scale = d_.softmax_scale;
    a.causal = true;
    a.q_offset = q0;
    be_.attention(a);
    r0 = r1;
  }
}

}  // namespace dsv3
