// Multi-head latent attention, plain (non-absorbed) form, as HF DeepseekV3Attention computes it:
//   q   = q_b_proj(q_a_layernorm(q_a_proj(x)))   or q_proj(x)         per head [q_nope ; q_pe]
//   kv_a = kv_a_proj_with_mqa(x) = [c_kv ; k_pe]; kv = kv_b_proj(kv_a_layernorm(c_kv)) per head [k_nope ; v]
//   RoPE on q_pe and on the single k_pe shared by all heads; causal softmax(q·kᵀ·scale)·v; o_proj.
#include "model/model.h"
#include "model/module_ops.h"

namespace dsv3 {

void linear_forward(Backend& be, const LinearParam& p, const Tensor& x, const Tensor& y, bool accumulate) {
  LinearArgs a;
  a.x = x;
  a.w = p.w;
  a.w_scale_inv = p.scale_inv;
  a.y = y;
  a.accumulate = accumulate;
  be.linear(a);
  if (present(p.bias)) {
    // Broadcast the [N] bias over every row: copy_cols with Rd = Rs·rows.
    CopyColsArgs b;
    b.src = p.bias.reshape({1, p.bias.numel()});
    b.dst = y;
    b.width = p.bias.numel();
    b.accumulate = true;
    be.copy_cols(b);
  }
}

namespace {

using modops::copy_cols;
using modops::rmsnorm;

void rope(Backend& be, const RopeInput& r, const Tensor& x, int64_t offset, int64_t dim, bool interleaved) {
  RopeArgs a;
  a.x = x;
  a.positions = r.positions;
  a.cos = r.tables->cos;
  a.sin = r.tables->sin;
  a.offset = offset;
  a.rope_dim = dim;
  a.interleaved = interleaved;
  be.rope(a);
}

}  // namespace

void mla_forward(Backend& be, const ModelDims& d, const MlaParams& p, const RopeInput& r, const Tensor& x,
                 int64_t B, int64_t T, MlaActs& a) {
  const int64_t N = B * T, nh = d.nh;
  a.x = x;  // [N, H]

  // Queries: [N, nh, qk] with per-head [q_nope ; q_pe].
  a.q = be.alloc(DType::F32, {N, nh, d.qk});
  const Tensor q2 = a.q.reshape({N, nh * d.qk});
  if (d.q_lora > 0) {
    a.q_a = be.alloc(DType::F32, {N, d.q_lora});
    linear_forward(be, p.q_a_proj, x, a.q_a);                          // [N, q_lora]
    a.q_a_n = rmsnorm(be, a.q_a, p.q_a_layernorm, d.eps_mla, a.q_a_rstd);  // [N, q_lora]
    linear_forward(be, p.q_b_proj, a.q_a_n, q2);                       // [N, nh·qk]
  } else {
    linear_forward(be, p.q_proj, x, q2);  // [N, nh·qk]
  }
  rope(be, r, a.q, d.nope, d.rope, d.rope_interleaved);  // q_pe rotated in place

  // Keys and values from the latent.
  a.kv_a = be.alloc(DType::F32, {N, d.kv_lora + d.rope});
  linear_forward(be, p.kv_a_proj_with_mqa, x, a.kv_a);  // [N, kv_lora + rope]
  Tensor c_kv = be.alloc(DType::F32, {N, d.kv_lora});
  copy_cols(be, a.kv_a, 0, c_kv, 0, d.kv_lora);                  // [N, kv_lora]
  a.c_kv_n = rmsnorm(be, c_kv, p.kv_a_layernorm, d.eps_mla, a.c_kv_rstd);
  a.k_pe = be.alloc(DType::F32, {N, d.rope});
  copy_cols(be, a.kv_a, d.kv_lora, a.k_pe, 0, d.rope);           // [N, rope]
  rope(be, r, a.k_pe.reshape({N, 1, d.rope}), 0, d.rope, d.rope_interleaved);

  a.kv = be.alloc(DType::F32, {N, nh, d.nope + d.vd});
  linear_forward(be, p.kv_b_proj, a.c_kv_n, a.kv.reshape({N, nh * (d.nope + d.vd)}));  // [N, nh·(nope+v)]
  a.k = be.alloc(DType::F32, {N, nh, d.qk});
  a.v = be.alloc(DType::F32, {N, nh, d.vd});
  const Tensor kv_rows = a.kv.reshape({N * nh, d.nope + d.vd});
  const Tensor k_rows = a.k.reshape({N * nh, d.qk});
  copy_cols(be, kv_rows, 0, k_rows, 0, d.nope);                      // k_nope
  copy_cols(be, a.k_pe, 0, k_rows, d.nope, d.rope);                  // k_pe broadcast over heads
  copy_cols(be, kv_rows, d.nope, a.v.reshape({N * nh, d.vd}), 0, d.vd);  // v

  // Causal attention per sequence: [B, T, nh, ·].
  a.attn = be.alloc(DType::F32, {N, nh, d.vd});
  a.lse = be.alloc(DType::F32, {B, nh, T});
  AttentionArgs at;
  at.q = a.q.reshape({B, T, nh, d.qk});
  at.k = a.k.reshape({B, T, nh, d.qk});
  at.v = a.v.reshape({B, T, nh, d.vd});
  at.out = a.attn.reshape({B, T, nh, d.vd});
  at.lse = a.lse;
  at.scale = d.softmax_scale;
  at.causal = true;
  be.attention(at);

  a.out = be.alloc(DType::F32, {N, d.H});
  linear_forward(be, p.o_proj, a.attn.reshape({N, nh * d.vd}), a.out);  // [N, H]
}

}  // namespace dsv3
