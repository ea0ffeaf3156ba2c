// Multi-head latent attention, plain (non-absorbed) form, as HF DeepseekV3Attention computes it:
//   q   = q_b_proj(q_a_layernorm(q_a_proj(x)))   or q_proj(x)         per head [q_nope ; q_pe]
//   kv_a = kv_a_proj_with_mqa(x) = [c_kv ; k_pe]; kv = kv_b_proj(kv_a_layernorm(c_kv)) per head [k_nope ; v]
//   RoPE on q_pe and on the single k_pe shared by all heads; causal softmax(q·kᵀ·scale)·v; o_proj.
#include "backend/fp8.h"
#include "model/model.h"
#include "model/module_ops.h"

namespace dsv3 {

// Either backend: linear_lowp runs on CPU and CUDA tensors.
bool fp8_layer(const LinearParam& p) {
  return p.lowp && linear_precision().mode == LinearPrecisionMode::Fp8;
}

void linear_forward(Backend& be, const LinearParam& p, const Tensor& x, const Tensor& y, bool accumulate,
                    Fp8Tiles* x_fp8) {
  LinearArgs a;
  a.x = x;
  a.w = p.w;
  a.w_scale_inv = p.scale_inv;
  a.y = y;
  a.accumulate = accumulate;
  if (p.lowp && linear_precision().mode != LinearPrecisionMode::F32) {
    check_lowp_copy(linear_precision(), x_fp8, "linear_forward");
    linear_lowp(linear_precision(), a, x_fp8);
  } else {
    be.linear(a);
  }
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
// The layer's matmuls take BF16 operands (--precision bf16): a BF16 dy is what they would read.
bool bf16_layer(const LinearParam& p) {
  return p.lowp && linear_precision().mode == LinearPrecisionMode::Bf16;
}

using modops::rmsnorm;
using modops::rmsnorm_backward;

void rope(Backend& be, const RopeInput& r, const Tensor& x, int64_t offset, int64_t dim, bool interleaved,
          bool inverse = false) {
  RopeArgs a;
  a.x = x;
  a.positions = r.positions;
  a.cos = r.tables->cos;
  a.sin = r.tables->sin;
  a.offset = offset;
  a.rope_dim = dim;
  a.interleaved = interleaved;
  a.inverse = inverse;
  be.rope(a);
}

}  // namespace

void mla_forward(Backend& be, const ModelDims& d, const MlaParams& p, const RopeInput& r, const Tensor& x,
                 int64_t B, int64_t T, MlaActs& a) {
  const int64_t N = B * T, nh = d.nh;
  a.x = x;  // [N, H]
  a.x_fp8 = a.q_a_n_fp8 = a.c_kv_n_fp8 = a.attn_fp8 = Fp8Tiles{};  // filled by this forward's FP8 layers

  // Queries: [N, nh, qk] with per-head [q_nope ; q_pe].
  a.q = be.alloc(DType::F32, {N, nh, d.qk});
  const Tensor q2 = a.q.reshape({N, nh * d.qk});
  if (d.q_lora > 0) {
    a.q_a = be.alloc(DType::F32, {N, d.q_lora});
    linear_forward(be, p.q_a_proj, x, a.q_a, false, &a.x_fp8);         // [N, q_lora]
    a.q_a_n = rmsnorm(be, a.q_a, p.q_a_layernorm, d.eps_mla, a.q_a_rstd);  // [N, q_lora]
    linear_forward(be, p.q_b_proj, a.q_a_n, q2, false, &a.q_a_n_fp8);  // [N, nh·qk]
  } else {
    linear_forward(be, p.q_proj, x, q2, false, &a.x_fp8);  // [N, nh·qk]
  }
  rope(be, r, a.q, d.nope, d.rope, d.rope_interleaved);  // q_pe rotated in place

  // Keys and values from the latent.
  a.kv_a = be.alloc(DType::F32, {N, d.kv_lora + d.rope});
  linear_forward(be, p.kv_a_proj_with_mqa, x, a.kv_a, false, &a.x_fp8);  // [N, kv_lora + rope]
  Tensor c_kv = be.alloc(DType::F32, {N, d.kv_lora});
  copy_cols(be, a.kv_a, 0, c_kv, 0, d.kv_lora);                  // [N, kv_lora]
  a.c_kv_n = rmsnorm(be, c_kv, p.kv_a_layernorm, d.eps_mla, a.c_kv_rstd);
  a.k_pe = be.alloc(DType::F32, {N, d.rope});
  copy_cols(be, a.kv_a, d.kv_lora, a.k_pe, 0, d.rope);           // [N, rope]
  rope(be, r, a.k_pe.reshape({N, 1, d.rope}), 0, d.rope, d.rope_interleaved);

  a.kv = be.alloc(DType::F32, {N, nh, d.nope + d.vd});
  linear_forward(be, p.kv_b_proj, a.c_kv_n, a.kv.reshape({N, nh * (d.nope + d.vd)}), false,
                 &a.c_kv_n_fp8);  // [N, nh·(nope+v)]

  // Causal attention per sequence: [B, T, nh, ·], with k = [k_nope ; k_pe] and v read from kv and
  // k_pe as they are (the split form: no per-head copies of k and v).
  a.attn = be.alloc(DType::F32, {N, nh, d.vd});
  a.lse = be.alloc(DType::F32, {B, nh, T});
  AttentionArgs at;
  at.q = a.q.reshape({B, T, nh, d.qk});
  at.kv = a.kv.reshape({B, T, nh, d.nope + d.vd});
  at.k_pe = a.k_pe.reshape({B, T, 1, d.rope});
  at.out = a.attn.reshape({B, T, nh, d.vd});
  at.lse = a.lse;
  at.scale = d.softmax_scale;
  at.causal = true;
  at.keep = &a.kept;  // (the backend drops what the last forward kept before it runs)
  be.attention(at);
  // The backward reads the kept operands in q's and kv's place (the CUDA BF16 kernels' BF16 heads:
  // 0.57 of q's and kv's bytes at V3's and bench-0.7b's widths), so they need not outlive the forward.
  if (a.kept.defined()) a.q = a.kv = Tensor();

  a.out = be.alloc(DType::F32, {N, d.H});
  linear_forward(be, p.o_proj, a.attn.reshape({N, nh * d.vd}), a.out, false, &a.attn_fp8);  // [N, H]
}

// ---------------------------------------------------------------------------------------------
// Backward.

namespace {

// dbias[N] += Σ_rows dy (copy_cols sums src rows when Rs = Rd·n).
void bias_backward(Backend& be, const Tensor& dy, const Tensor& dbias) {
  CopyColsArgs b;
  b.src = dy.reshape({dy.numel() / dy.dim(-1), dy.dim(-1)});
  b.dst = dbias.reshape({1, dbias.numel()});
  b.width = dbias.numel();
  b.accumulate = true;
  be.copy_cols(b);
}

}  // namespace

void linear_backward(Backend& be, const LinearParam& p, const LinearParam& g, const Tensor& x, const Tensor& dy,
                     const Tensor& dx, bool accumulate_dx, const Fp8Tiles* x_fp8, const Fp8Tiles* dy_copy) {
  if (x.numel() == 0) return;
  LinearBackwardArgs a;
  a.dy = dy;
  a.x = x;
  a.w = p.w;
  a.w_scale_inv = p.scale_inv;
  a.dx = dx;
  a.dw = g.w;
  a.accumulate_dx = accumulate_dx;
  a.accumulate_dw = true;
  if (p.lowp && linear_precision().mode != LinearPrecisionMode::F32) {
    check_lowp_copy(linear_precision(), x_fp8, "linear_backward");
    check_lowp_copy(linear_precision(), dy_copy, "linear_backward");
    linear_backward_lowp(linear_precision(), a, x_fp8, dy_copy);
  } else {
    be.linear_backward(a);
  }
  if (present(p.bias)) bias_backward(be, dy, g.bias);
}

void mla_backward(Backend& be, const ModelDims& d, const MlaParams& p, const MlaParams& g, const RopeInput& r,
                  const MlaActs& a, int64_t B, int64_t T, const Tensor& dout, const Tensor& dx,
                  bool accumulate_dx) {
  const int64_t N = B * T, nh = d.nh;
  Tensor dattn = be.alloc(DType::F32, {N, nh, d.vd});
  linear_backward(be, p.o_proj, g.o_proj, a.attn.reshape({N, nh * d.vd}), dout,
                  dattn.reshape({N, nh * d.vd}), false, &a.attn_fp8);  // [N, nh·v]

  // Keys and values back to kv_b_proj's output and to the shared k_pe (summed over heads).
  Tensor dq = be.alloc(DType::F32, {N, nh, d.qk});
  // dkv feeds only kv_b_proj's backward: in BF16 mode the attention writes it in BF16 (the values
  // that linear would round it to), sparing an F32 copy and its conversion (a bias's gradient would
  // read it too, in F32).
  const bool dkv_bf16 = bf16_layer(p.kv_b_proj) && !present(p.kv_b_proj.bias);
  Tensor dkv = be.alloc(dkv_bf16 ? DType::BF16 : DType::F32, {N, nh, d.nope + d.vd});
  Tensor dk_pe = be.alloc(DType::F32, {N, d.rope});
  AttentionBackwardArgs at;
  if (a.q.defined()) at.q = a.q.reshape({B, T, nh, d.qk});
  if (a.kv.defined()) at.kv = a.kv.reshape({B, T, nh, d.nope + d.vd});
  at.kept = a.kept;
  at.k_pe = a.k_pe.reshape({B, T, 1, d.rope});
  at.out = a.attn.reshape({B, T, nh, d.vd});
  at.lse = a.lse;
  at.dout = dattn.reshape({B, T, nh, d.vd});
  at.dq = dq.reshape({B, T, nh, d.qk});
  at.dkv = dkv.reshape({B, T, nh, d.nope + d.vd});
  at.dk_pe = dk_pe.reshape({B, T, 1, d.rope});
  at.scale = d.softmax_scale;
  at.causal = true;
  be.attention_backward(at);
  rope(be, r, dk_pe.reshape({N, 1, d.rope}), 0, d.rope, d.rope_interleaved, true);

  Tensor dc_kv_n = be.alloc(DType::F32, {N, d.kv_lora});
  linear_backward(be, p.kv_b_proj, g.kv_b_proj, a.c_kv_n, dkv.reshape({N, nh * (d.nope + d.vd)}), dc_kv_n,
                  false, &a.c_kv_n_fp8);
  Tensor c_kv = be.alloc(DType::F32, {N, d.kv_lora});
  copy_cols(be, a.kv_a, 0, c_kv, 0, d.kv_lora);
  Tensor dkv_a = be.alloc(DType::F32, {N, d.kv_lora + d.rope});
  Tensor dc_kv = be.alloc(DType::F32, {N, d.kv_lora});
  rmsnorm_backward(be, dc_kv_n, c_kv, p.kv_a_layernorm, a.c_kv_rstd, g.kv_a_layernorm, dc_kv, false);
  copy_cols(be, dc_kv, 0, dkv_a, 0, d.kv_lora);
  copy_cols(be, dk_pe, 0, dkv_a, d.kv_lora, d.rope);
  linear_backward(be, p.kv_a_proj_with_mqa, g.kv_a_proj_with_mqa, a.x, dkv_a, dx, accumulate_dx, &a.x_fp8);

  // Queries: undo the rotation of q_pe, then the projections.
  rope(be, r, dq, d.nope, d.rope, d.rope_interleaved, true);
  const Tensor dq2 = dq.reshape({N, nh * d.qk});
  if (d.q_lora > 0) {
    Tensor dq_a_n = be.alloc(DType::F32, {N, d.q_lora});
    linear_backward(be, p.q_b_proj, g.q_b_proj, a.q_a_n, dq2, dq_a_n, false, &a.q_a_n_fp8);
    rmsnorm_backward(be, dq_a_n, a.q_a, p.q_a_layernorm, a.q_a_rstd, g.q_a_layernorm, dq_a_n, false);
    linear_backward(be, p.q_a_proj, g.q_a_proj, a.x, dq_a_n, dx, true, &a.x_fp8);
  } else {
    linear_backward(be, p.q_proj, g.q_proj, a.x, dq2, dx, true, &a.x_fp8);
  }
}

}  // namespace dsv3
