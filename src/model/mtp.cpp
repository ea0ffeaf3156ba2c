// Multi-token prediction module k (DESIGN §3), on B sequences of T tokens:
//   S = T − k rows per sequence;  for i < S:
//   cat_i = [enorm(Emb(t_{i+k})) ; hnorm(h^{k−1}_i)]   (embedding FIRST, as the hub weights)
//   x_i   = eh_proj(cat_i);  h^k = decoder block(x) at positions 0..S−1, causal
//   logits_k = head(shared_head.norm(h^k));  row i predicts token i+k+1.
#include "model/model.h"
#include "model/module_ops.h"
#include "model/output_head.h"

namespace dsv3 {

using modops::i32_tensor;
using modops::rmsnorm;
using modops::rmsnorm_backward;

void mtp_module_forward(Backend& be, const ModelDims& d, const MtpParams& p, const Tensor& embed_tokens,
                        const LinearParam& head, const RopeTables& tables, std::span<const int32_t> ids,
                        int64_t B, int64_t T, int k, const Tensor& h_prev, int64_t prev_len, MtpActs& a,
                        Tensor& logits) {
  const int64_t S = T - k, H = d.H, V = embed_tokens.dim(0);
  a.S = S;
  std::vector<int32_t> tok(size_t(B * S)), hrow(size_t(B * S)), pos(size_t(B * S));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < S; ++i) {
      const size_t r = size_t(b * S + i);
      tok[r] = ids[size_t(b * T + i + k)];
      hrow[r] = int32_t(b * prev_len + i);
      pos[r] = int32_t(i);
    }
  a.ids = i32_tensor(be, tok);     // [B·S]
  a.h_idx = i32_tensor(be, hrow);  // [B·S]
  a.positions = i32_tensor(be, pos);
  RopeInput rope{&tables, a.positions};

  a.emb = be.alloc(DType::F32, {B * S, H});
  EmbeddingArgs e;
  e.ids = a.ids;
  e.table = embed_tokens;
  e.out = a.emb;
  be.embedding(e);                                         // [B·S, H]  Emb(t_{i+k})
  a.e_n = rmsnorm(be, a.emb, p.enorm, d.eps, a.e_rstd);    // [B·S, H]
  a.h_prev = be.alloc(DType::F32, {B * S, H});
  modops::gather_rows(be, h_prev, a.h_idx, a.h_prev);      // [B·S, H]  h^{k−1}_i
  a.h_n = rmsnorm(be, a.h_prev, p.hnorm, d.eps, a.h_rstd); // [B·S, H]
  a.cat = be.alloc(DType::F32, {B * S, 2 * H});
  copy_cols(be, a.e_n, 0, a.cat, 0, H);                    // [B·S, 2H]  embedding first
  copy_cols(be, a.h_n, 0, a.cat, H, H);
  a.x = be.alloc(DType::F32, {B * S, H});
  a.cat_fp8 = Fp8Tiles{};
  linear_forward(be, p.eh_proj, a.cat, a.x, false, &a.cat_fp8);  // [B·S, H]

  decoder_layer_forward(be, d, p.block, rope, a.x, B, S, a.block);
  a.h = a.block.out;                                                          // [B·S, H]  h^k
  a.head_n = rmsnorm(be, a.h, p.shared_head_norm, d.eps, a.head_rstd);        // [B·S, H]
  logits = be.alloc(DType::F32, {B * S, V});
  head_forward(be, head, a.head_n, logits);                                 // [B·S, V]
}

void mtp_module_backward(Backend& be, const ModelDims& d, const MtpParams& p, const MtpParams& g,
                         const Tensor& embed_grad, const LinearParam& head, const LinearParam& head_grad,
                         const RopeTables& tables, const MtpActs& a, int64_t B, const Tensor& dlogits,
                         const Tensor& dh_next, const Tensor& router_dlogits, const Tensor& dh_prev) {
  const int64_t S = a.S, H = d.H, M = B * S;
  Tensor dhead_n = be.alloc(DType::F32, {M, H});
  head_backward(be, head, head_grad, a.head_n, dlogits, dhead_n, false);  // [M, H]
  // h^k feeds shared_head.norm and (through hnorm) module k+1.
  Tensor dh = be.alloc(DType::F32, {M, H});
  if (present(dh_next)) {
    CopyArgs c;
    c.src = dh_next;
    c.dst = dh;
    be.copy(c);
  }
  rmsnorm_backward(be, dhead_n, a.h, p.shared_head_norm, a.head_rstd, g.shared_head_norm, dh, present(dh_next));

  const RopeInput rope{&tables, a.positions};
  const Tensor& dx = dh;  // ∂L/∂(the block's input), in place of dh
  decoder_layer_backward(be, d, p.block, g.block, rope, a.block, B, S, dh, router_dlogits, dx);

  Tensor dcat = be.alloc(DType::F32, {M, 2 * H});
  linear_backward(be, p.eh_proj, g.eh_proj, a.cat, dx, dcat, false, &a.cat_fp8);  // [M, 2H]
  Tensor de_n = be.alloc(DType::F32, {M, H}), dh_n = be.alloc(DType::F32, {M, H});
  copy_cols(be, dcat, 0, de_n, 0, H);
  copy_cols(be, dcat, H, dh_n, 0, H);
  rmsnorm_backward(be, de_n, a.emb, p.enorm, a.e_rstd, g.enorm, de_n, false);
  EmbeddingBackwardArgs eb;
  eb.ids = a.ids;
  eb.dout = de_n;
  eb.dtable = embed_grad;
  be.embedding_backward(eb);
  rmsnorm_backward(be, dh_n, a.h_prev, p.hnorm, a.h_rstd, g.hnorm, dh_n, false);
  ScatterAddRowsArgs sc;  // h_prev rows were gathered from h^{k−1}
  sc.src = dh_n;
  sc.idx = a.h_idx;
  sc.out = dh_prev;
  be.scatter_add_rows(sc);
}

}  // namespace dsv3
