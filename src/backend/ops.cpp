// Backend-neutral parts of the op interface: shape/dtype validation (one place for every backend),
// RoPE/YaRN tables, and Backend helpers.
#include "backend/ops.h"

#include <cmath>
#include <vector>

namespace dsv3 {

namespace {

// Throws InternalError "<op>: <what>" when cond is false. A macro so that the message (desc() builds
// strings) is only evaluated on failure: validation runs on every op call, decode makes hundreds.
#define REQ(cond, op, ...)                                  \
  do {                                                      \
    if (!(cond)) internal_error(op, ": ", __VA_ARGS__);     \
  } while (0)

int64_t last_dim(const Tensor& t) { return t.ndim() ? t.dim(-1) : 1; }
int64_t rows_of(const Tensor& t) {
  int64_t l = last_dim(t);
  return l ? t.numel() / l : 0;
}
std::string desc(const Tensor& t) { return cat(dtype_name(t.dtype()), t.shape().str()); }

void f32(const Tensor& t, const char* op, const char* name) {
  REQ(t.defined(), op, name, " is missing");
  REQ(t.dtype() == DType::F32, op, name, " must be F32, got ", desc(t));
}
// F32, or BF16 where allowed: the reduced-precision linear layer's operands and the activations
// that feed only it (model/moe.cpp keeps those in BF16 in --precision bf16).
void f32_or_bf16(const Tensor& t, bool bf16_ok, const char* op, const char* name) {
  REQ(t.defined(), op, name, " is missing");
  REQ(t.dtype() == DType::F32 || (bf16_ok && t.dtype() == DType::BF16), op, name,
      bf16_ok ? " must be F32 or BF16, got " : " must be F32, got ", desc(t));
}
void i32(const Tensor& t, const char* op, const char* name) {
  REQ(t.defined(), op, name, " is missing");
  REQ(t.dtype() == DType::I32, op, name, " must be I32, got ", desc(t));
}
void floating(const Tensor& t, const char* op, const char* name) {
  REQ(t.defined(), op, name, " is missing");
  REQ(is_float(t.dtype()), op, name, " must be a float dtype, got ", desc(t));
}
void same_numel(const Tensor& a, const Tensor& b, const char* op, const char* an, const char* bn) {
  REQ(a.numel() == b.numel(), op, an, " ", desc(a), " and ", bn, " ", desc(b), " differ in size");
}
void same_shape(const Tensor& a, const Tensor& b, const char* op, const char* an, const char* bn) {
  REQ(a.shape() == b.shape(), op, an, " ", desc(a), " and ", bn, " ", desc(b), " differ in shape");
}
void weight_ok(const Tensor& w, const Tensor& scale_inv, const char* op) {
  REQ(w.defined() && w.ndim() == 2, op, "w must be [N, K], got ", desc(w));
  DType t = w.dtype();
  REQ(t == DType::F32 || t == DType::BF16 || t == DType::F16 || t == DType::F8_E4M3, op,
      "w dtype must be F32, BF16, F16 or F8_E4M3, got ", desc(w));
  if (t == DType::F8_E4M3) {
    int64_t nb = (w.dim(0) + kFp8Block - 1) / kFp8Block, kb = (w.dim(1) + kFp8Block - 1) / kFp8Block;
    REQ(present(scale_inv) && scale_inv.dtype() == DType::F32 && scale_inv.shape() == Shape({nb, kb}),
        op, "F8_E4M3 weight ", desc(w), " needs scale_inv F32[", nb, ", ", kb, "], got ",
        present(scale_inv) ? desc(scale_inv) : std::string("none"));
  } else {
    REQ(!present(scale_inv), op, "scale_inv given for a ", dtype_name(t), " weight");
  }
}

}  // namespace

void copy_cols(Backend& be, const Tensor& src, int64_t src_col, const Tensor& dst, int64_t dst_col, int64_t width) {
  CopyColsArgs c;
  c.src = src;
  c.src_col = src_col;
  c.dst = dst;
  c.dst_col = dst_col;
  c.width = width;
  be.copy_cols(c);
}

Tensor Backend::zeros(DType t, const Shape& s) {
  Tensor x = alloc(t, s);
  if (is_float(t)) fill({x, 0.0f});
  else if (device() == Device::CPU) x.fill(0.0f);
  else internal_error("Backend::zeros: only float tensors on ", device_name(device()));
  return x;
}

void Backend::grouped_linear(const GroupedLinearArgs& a) {
  validate(a);
  for (size_t e = 0; e < a.w.size(); ++e) {
    const int64_t r0 = a.offsets[e], r1 = a.offsets[e + 1];
    if (r0 == r1) continue;
    linear({a.x.rows(r0, r1), a.w[e], a.w_scale_inv.empty() ? Tensor() : a.w_scale_inv[e], a.y.rows(r0, r1),
            a.accumulate});
  }
}

void validate(const LinearArgs& a) { validate(a, false); }
void validate(const LinearArgs& a, bool bf16_x) {
  const char* op = "linear";
  weight_ok(a.w, a.w_scale_inv, op);
  f32_or_bf16(a.x, bf16_x, op, "x");
  f32(a.y, op, "y");
  REQ(last_dim(a.x) == a.w.dim(1), op, "x ", desc(a.x), " last dim != K of w ", desc(a.w));
  REQ(last_dim(a.y) == a.w.dim(0), op, "y ", desc(a.y), " last dim != N of w ", desc(a.w));
  REQ(rows_of(a.x) == rows_of(a.y), op, "x ", desc(a.x), " and y ", desc(a.y), " differ in rows");
  REQ(a.x.raw() != a.y.raw() || a.x.numel() == 0, op, "y must not alias x");
}

void validate(const GroupedLinearArgs& a) { validate(a, false); }
void validate(const GroupedLinearArgs& a, bool bf16_x) {
  const char* op = "grouped_linear";
  f32_or_bf16(a.x, bf16_x, op, "x");
  f32(a.y, op, "y");
  REQ(a.x.ndim() == 2 && a.y.ndim() == 2 && a.x.dim(0) == a.y.dim(0), op, "x ", desc(a.x), " and y ", desc(a.y),
      " must be [M, K] and [M, N]");
  REQ(a.offsets.size() == a.w.size() + 1 && a.offsets.front() == 0 && a.offsets.back() == a.x.dim(0), op,
      a.w.size(), " blocks need ", a.w.size() + 1, " offsets from 0 to ", a.x.dim(0), ", got ", a.offsets.size());
  const bool scaled = !a.w_scale_inv.empty();
  REQ(!scaled || a.w_scale_inv.size() == a.w.size(), op, a.w_scale_inv.size(), " scales for ", a.w.size(), " weights");
  for (size_t e = 0; e < a.w.size(); ++e) {
    REQ(a.offsets[e] <= a.offsets[e + 1], op, "block ", e, " ends (", a.offsets[e + 1], ") before it starts (",
        a.offsets[e], ")");
    weight_ok(a.w[e], scaled ? a.w_scale_inv[e] : Tensor(), op);
    REQ(a.w[e].shape() == a.w[0].shape() && a.w[e].dtype() == a.w[0].dtype(), op, "weight ", e, " ", desc(a.w[e]),
        " differs from weight 0 ", desc(a.w[0]));
  }
  if (a.w.empty()) return;
  REQ(a.x.dim(1) == a.w[0].dim(1) && a.y.dim(1) == a.w[0].dim(0), op, "x ", desc(a.x), ", y ", desc(a.y),
      " do not match w ", desc(a.w[0]));
  REQ(a.x.raw() != a.y.raw() || a.x.numel() == 0, op, "y must not alias x");
}

void validate(const LinearBackwardArgs& a) { validate(a, false); }
void validate(const LinearBackwardArgs& a, bool bf16_operands) {
  const char* op = "linear_backward";
  f32_or_bf16(a.dy, bf16_operands, op, "dy");
  if (present(a.dx)) {
    weight_ok(a.w, a.w_scale_inv, op);
    f32(a.dx, op, "dx");
    REQ(last_dim(a.dy) == a.w.dim(0) && last_dim(a.dx) == a.w.dim(1), op, "dy ", desc(a.dy), ", dx ",
        desc(a.dx), " do not match w ", desc(a.w));
    REQ(rows_of(a.dx) == rows_of(a.dy), op, "dx and dy differ in rows");
  }
  if (present(a.dw)) {
    f32(a.dw, op, "dw");
    f32_or_bf16(a.x, bf16_operands, op, "x");
    REQ(a.dw.ndim() == 2 && a.dw.dim(0) == last_dim(a.dy) && a.dw.dim(1) == last_dim(a.x), op, "dw ",
        desc(a.dw), " must be [N, K] for dy ", desc(a.dy), ", x ", desc(a.x));
    REQ(rows_of(a.x) == rows_of(a.dy), op, "x and dy differ in rows");
  }
}

void validate(const MatmulArgs& a) {
  const char* op = "matmul";
  f32(a.a, op, "a");
  f32(a.b, op, "b");
  f32(a.c, op, "c");
  REQ(a.a.ndim() == 2 && a.b.ndim() == 2 && a.c.ndim() == 2, op, "operands must be 2-D: ", desc(a.a),
      " ", desc(a.b), " ", desc(a.c));
  int64_t m = a.trans_a ? a.a.dim(1) : a.a.dim(0), k = a.trans_a ? a.a.dim(0) : a.a.dim(1);
  int64_t kb = a.trans_b ? a.b.dim(1) : a.b.dim(0), n = a.trans_b ? a.b.dim(0) : a.b.dim(1);
  REQ(k == kb && a.c.dim(0) == m && a.c.dim(1) == n, op, "shapes do not chain: a ", desc(a.a),
      a.trans_a ? "ᵀ" : "", " b ", desc(a.b), a.trans_b ? "ᵀ" : "", " c ", desc(a.c));
}

void validate(const EmbeddingArgs& a) {
  const char* op = "embedding";
  i32(a.ids, op, "ids");
  floating(a.table, op, "table");
  f32(a.out, op, "out");
  REQ(a.table.ndim() == 2, op, "table must be [V, D], got ", desc(a.table));
  REQ(a.out.ndim() == 2 && a.out.dim(0) == a.ids.numel() && a.out.dim(1) == a.table.dim(1), op,
      "out ", desc(a.out), " must be [T, D] for ids ", desc(a.ids), ", table ", desc(a.table));
}

void validate(const EmbeddingBackwardArgs& a) {
  const char* op = "embedding_backward";
  i32(a.ids, op, "ids");
  f32(a.dout, op, "dout");
  f32(a.dtable, op, "dtable");
  REQ(a.dtable.ndim() == 2 && a.dout.ndim() == 2 && a.dout.dim(0) == a.ids.numel() &&
          a.dout.dim(1) == a.dtable.dim(1),
      op, "dout ", desc(a.dout), " must be [T, D] for ids ", desc(a.ids), ", dtable ", desc(a.dtable));
}

void validate(const RmsNormArgs& a) {
  const char* op = "rmsnorm";
  f32(a.x, op, "x");
  f32(a.y, op, "y");
  floating(a.weight, op, "weight");
  same_shape(a.x, a.y, op, "x", "y");
  REQ(a.weight.numel() == last_dim(a.x), op, "weight ", desc(a.weight), " does not match x ", desc(a.x));
  if (present(a.rstd)) {
    f32(a.rstd, op, "rstd");
    REQ(a.rstd.numel() == rows_of(a.x), op, "rstd ", desc(a.rstd), " must have one value per row of x ",
        desc(a.x));
  }
}

void validate(const RmsNormBackwardArgs& a) {
  const char* op = "rmsnorm_backward";
  f32(a.dy, op, "dy");
  f32(a.x, op, "x");
  f32(a.rstd, op, "rstd");
  floating(a.weight, op, "weight");
  same_shape(a.dy, a.x, op, "dy", "x");
  REQ(a.weight.numel() == last_dim(a.x), op, "weight ", desc(a.weight), " does not match x ", desc(a.x));
  REQ(a.rstd.numel() == rows_of(a.x), op, "rstd ", desc(a.rstd), " does not match x ", desc(a.x));
  if (present(a.dx)) {
    f32(a.dx, op, "dx");
    same_shape(a.dx, a.x, op, "dx", "x");
  }
  if (present(a.dweight)) {
    f32(a.dweight, op, "dweight");
    REQ(a.dweight.numel() == last_dim(a.x), op, "dweight ", desc(a.dweight), " does not match x");
  }
}

void validate(const RopeArgs& a) {
  const char* op = "rope";
  f32(a.x, op, "x");
  i32(a.positions, op, "positions");
  f32(a.cos, op, "cos");
  f32(a.sin, op, "sin");
  REQ(a.x.ndim() == 3, op, "x must be [T, H, W], got ", desc(a.x));
  REQ(a.positions.numel() == a.x.dim(0), op, "positions ", desc(a.positions), " do not match x ",
      desc(a.x));
  REQ(a.rope_dim > 0 && a.rope_dim % 2 == 0 && a.offset >= 0 && a.offset + a.rope_dim <= a.x.dim(2), op,
      "rope_dim ", a.rope_dim, " at offset ", a.offset, " does not fit x ", desc(a.x));
  REQ(a.cos.ndim() == 2 && a.cos.dim(1) == a.rope_dim / 2 && a.sin.shape() == a.cos.shape(), op,
      "cos ", desc(a.cos), " / sin ", desc(a.sin), " must be [max_pos, ", a.rope_dim / 2, "]");
}

namespace {
// Leading batch dim optional: returns B (1 when absent) and checks ranks.
int64_t attn_batch(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const char* op) {
  int n = q.ndim();
  REQ(n == 3 || n == 4, op, "q must be [B?, T, H, D], got ", desc(q));
  REQ(k.ndim() == n && v.ndim() == n && out.ndim() == n, op, "q, k, v, out must have the same rank: ",
      desc(q), desc(k), desc(v), desc(out));
  int o = n - 3;
  if (o) REQ(k.dim(0) == q.dim(0) && v.dim(0) == q.dim(0) && out.dim(0) == q.dim(0), op, "batch sizes differ");
  REQ(k.dim(o + 1) == q.dim(o + 1) && v.dim(o + 1) == q.dim(o + 1) && out.dim(o + 1) == q.dim(o + 1), op,
      "head counts differ: q ", desc(q), " k ", desc(k), " v ", desc(v), " out ", desc(out));
  REQ(k.dim(o + 2) == q.dim(o + 2), op, "q ", desc(q), " and k ", desc(k), " differ in head dim");
  REQ(v.dim(o) == k.dim(o), op, "k ", desc(k), " and v ", desc(v), " differ in length");
  REQ(out.dim(o) == q.dim(o) && out.dim(o + 2) == v.dim(o + 2), op, "out ", desc(out),
      " must be [B?, T, H, Dv] for q ", desc(q), ", v ", desc(v));
  return o ? q.dim(0) : 1;
}
void attn_mask_ok(const Tensor& q, const Tensor& k, bool causal, int64_t q_offset, const char* op) {
  int o = q.ndim() - 3;
  REQ(q_offset >= 0, op, "q_offset ", q_offset, " < 0");
  if (causal)
    REQ(k.dim(o) >= q_offset + q.dim(o), op, "causal attention needs S >= q_offset + T: S ", k.dim(o),
        ", q_offset ", q_offset, ", T ", q.dim(o));
}
void lse_ok(const Tensor& lse, const Tensor& q, const char* op) {
  f32(lse, op, "lse");
  int o = q.ndim() - 3;
  int64_t b = o ? q.dim(0) : 1;
  REQ(lse.numel() == b * q.dim(o + 1) * q.dim(o), op, "lse ", desc(lse), " must be [B?, H, T] for q ",
      desc(q));
}
}  // namespace

namespace {
// The split form's shapes (ops.h): kv [B?, S, H, Dn + Dv] and k_pe [B?, S, 1, Dr] for q [B?, T, H,
// Dn + Dr] and out [B?, T, H, Dv]; k and v absent.
void split_kv_ok(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& kv, const Tensor& k_pe,
                 const Tensor& out, bool causal, int64_t q_offset, const char* op) {
  REQ(!present(k) && !present(v), op, "k and v must be absent when kv or k_pe is given (the split form)");
  f32(k_pe, op, "k_pe");
  const int n = q.ndim(), o = n - 3;
  REQ(n == 3 || n == 4, op, "q must be [B?, T, H, D], got ", desc(q));
  REQ(kv.ndim() == n && k_pe.ndim() == n && out.ndim() == n, op, "q, kv, k_pe, out must have the same rank: ",
      desc(q), desc(kv), desc(k_pe), desc(out));
  if (o) REQ(kv.dim(0) == q.dim(0) && k_pe.dim(0) == q.dim(0) && out.dim(0) == q.dim(0), op, "batch sizes differ");
  const int64_t dv = out.dim(o + 2), dn = kv.dim(o + 2) - dv, dr = q.dim(o + 2) - dn;
  REQ(kv.dim(o + 1) == q.dim(o + 1) && out.dim(o + 1) == q.dim(o + 1) && k_pe.dim(o + 1) == 1, op,
      "kv ", desc(kv), " and out ", desc(out), " need q's heads ", desc(q), ", k_pe ", desc(k_pe), " one");
  // dk_pe sums dk over the heads: with none it would be zeros that no kernel writes.
  REQ(q.dim(o + 1) > 0, op, "the split form needs at least one head, got q ", desc(q));
  REQ(dn > 0 && dr > 0 && k_pe.dim(o + 2) == dr, op, "kv ", desc(kv), " must be [B?, S, H, Dn + Dv] and k_pe ",
      desc(k_pe), " [B?, S, 1, Dr] with Dn + Dr = q's ", q.dim(o + 2), " and Dv = out's ", dv);
  REQ(k_pe.dim(o) == kv.dim(o), op, "kv ", desc(kv), " and k_pe ", desc(k_pe), " differ in length");
  REQ(out.dim(o) == q.dim(o), op, "out ", desc(out), " must be [B?, T, H, Dv] for q ", desc(q));
  attn_mask_ok(q, kv, causal, q_offset, op);
}
}  // namespace

void validate(const AttentionArgs& a) {
  const char* op = "attention";
  f32(a.q, op, "q");
  f32(a.out, op, "out");
  if (a.kv.defined() || a.k_pe.defined()) {
    f32(a.kv, op, "kv");
    split_kv_ok(a.q, a.k, a.v, a.kv, a.k_pe, a.out, a.causal, a.q_offset, op);
  } else {
    f32(a.k, op, "k");
    f32(a.v, op, "v");
    attn_batch(a.q, a.k, a.v, a.out, op);
    attn_mask_ok(a.q, a.k, a.causal, a.q_offset, op);
  }
  if (present(a.lse)) lse_ok(a.lse, a.q, op);
}

void validate(const AttentionBackwardArgs& a) {
  const char* op = "attention_backward";
  // The forward's kept operands may stand for q and (the split form) kv; dq and dkv, then required,
  // give their shapes.
  if (a.q.defined()) {
    f32(a.q, op, "q");
  } else {
    REQ(a.kept.defined() && a.dq.defined(), op,
        "q is missing: only the forward's kept operands (kept) stand for it, with dq giving its shape");
  }
  const Tensor& q = q_or_dq(a);
  for (auto [t, n] : {std::pair{&a.out, "out"}, {&a.dout, "dout"}}) f32(*t, op, n);
  if (a.kv.defined() || a.k_pe.defined()) {
    if (a.kv.defined()) {
      f32(a.kv, op, "kv");
    } else {
      REQ(a.kept.defined() && a.dkv.defined(), op,
          "kv is missing: only the forward's kept operands (kept) stand for it, with dkv giving its shape");
    }
    split_kv_ok(q, a.k, a.v, kv_or_dkv(a), a.k_pe, a.out, a.causal, a.q_offset, op);
    REQ(!present(a.dk) && !present(a.dv), op, "dk and dv must be absent in the split form (dkv and dk_pe)");
    if (present(a.dkv) && a.kv.defined()) same_shape(a.dkv, a.kv, op, "dkv", "kv");
    if (present(a.dk_pe)) same_shape(a.dk_pe, a.k_pe, op, "dk_pe", "k_pe");
  } else {
    f32(a.k, op, "k");
    f32(a.v, op, "v");
    attn_batch(q, a.k, a.v, a.out, op);
    attn_mask_ok(q, a.k, a.causal, a.q_offset, op);
    REQ(!present(a.dkv) && !present(a.dk_pe), op, "dkv and dk_pe need the split form (kv and k_pe)");
    if (present(a.dk)) same_shape(a.dk, a.k, op, "dk", "k");
    if (present(a.dv)) same_shape(a.dv, a.v, op, "dv", "v");
  }
  lse_ok(a.lse, q, op);
  same_shape(a.dout, a.out, op, "dout", "out");
  if (present(a.dq) && a.q.defined()) same_shape(a.dq, a.q, op, "dq", "q");
  for (auto [t, n] : {std::pair{&a.dq, "dq"}, {&a.dk, "dk"}, {&a.dv, "dv"}, {&a.dk_pe, "dk_pe"}})
    if (present(*t)) f32(*t, op, n);
  if (present(a.dkv)) f32_or_bf16(a.dkv, true, op, "dkv");
}

namespace {
// The split form's k and v materialized ([B?, S, H, Dqk] and [B?, S, H, Dv]) and its widths.
struct SplitKv {
  Tensor k, v;
  int64_t dn, dr, dv;
};
SplitKv materialize_split_kv(Backend& be, const Tensor& q, const Tensor& kv, const Tensor& k_pe, const Tensor& out) {
  const int o = q.ndim() - 3;
  SplitKv s;
  s.dv = out.dim(o + 2);
  s.dn = kv.dim(o + 2) - s.dv;
  s.dr = q.dim(o + 2) - s.dn;
  Shape ks = kv.shape(), vs = kv.shape();
  ks.d[size_t(o + 2)] = s.dn + s.dr;
  vs.d[size_t(o + 2)] = s.dv;
  s.k = be.alloc(DType::F32, ks);
  s.v = be.alloc(DType::F32, vs);
  const int64_t rows = rows_of(kv);
  const Tensor kv_rows = kv.reshape({rows, s.dn + s.dv}), k_pe_rows = k_pe.reshape({rows_of(k_pe), s.dr});
  const Tensor k_rows = s.k.reshape({rows, s.dn + s.dr}), v_rows = s.v.reshape({rows, s.dv});
  copy_cols(be, kv_rows, 0, k_rows, 0, s.dn);
  copy_cols(be, k_pe_rows, 0, k_rows, s.dn, s.dr);  // broadcast over the heads
  copy_cols(be, kv_rows, s.dn, v_rows, 0, s.dv);
  return s;
}
}  // namespace

void require_operands(const AttentionBackwardArgs& a, const char* why) {
  REQ(a.q.defined() && (a.kv.defined() || !a.k_pe.defined()), "attention_backward", a.q.defined() ? "kv" : "q",
      " is missing, and ", why);
}

void attention_split_kv(Backend& be, const AttentionArgs& a) {
  REQ(a.kv.defined() || a.k_pe.defined(), "attention", "attention_split_kv needs the split form (kv and k_pe)");
  validate(a);
  SplitKv s = materialize_split_kv(be, a.q, a.kv, a.k_pe, a.out);
  AttentionArgs p = a;
  p.k = s.k;
  p.v = s.v;
  p.kv = p.k_pe = Tensor();
  p.keep = nullptr;  // the composed backward reads q and kv, not what the plain form would keep
  be.attention(p);
}

void attention_backward_split_kv(Backend& be, const AttentionBackwardArgs& a) {
  REQ(a.kv.defined() || a.k_pe.defined(), "attention_backward",
      "attention_backward_split_kv needs the split form (kv and k_pe)");
  validate(a);
  require_operands(a, "the composed split form cannot read kept operands in its place");
  SplitKv s = materialize_split_kv(be, a.q, a.kv, a.k_pe, a.out);
  AttentionBackwardArgs p = a;
  p.k = s.k;
  p.v = s.v;
  p.kv = p.k_pe = p.dkv = p.dk_pe = p.kept = Tensor();  // (k and v are these copies' roundings now)
  if (present(a.dkv) || present(a.dk_pe)) p.dk = be.alloc(DType::F32, s.k.shape());
  if (present(a.dkv)) p.dv = be.alloc(DType::F32, s.v.shape());
  be.attention_backward(p);
  const int64_t rows = rows_of(s.k);
  if (present(a.dkv)) {  // a BF16 dkv: assembled in F32, then rounded
    const bool bf16 = a.dkv.dtype() == DType::BF16;
    const Tensor dkv = bf16 ? be.alloc(DType::F32, a.dkv.shape()) : a.dkv;
    const Tensor dkv_rows = dkv.reshape({rows, s.dn + s.dv});
    copy_cols(be, p.dk.reshape({rows, s.dn + s.dr}), 0, dkv_rows, 0, s.dn);
    copy_cols(be, p.dv.reshape({rows, s.dv}), 0, dkv_rows, s.dn, s.dv);
    if (bf16) be.copy(CopyArgs{dkv, a.dkv});
  }
  if (present(a.dk_pe))  // Σ over the heads (copy_cols sums H source rows per destination row)
    copy_cols(be, p.dk.reshape({rows, s.dn + s.dr}), s.dn, a.dk_pe.reshape({rows_of(a.dk_pe), s.dr}), 0, s.dr);
}

void validate(const SwigluArgs& a) {
  const char* op = "swiglu";
  f32(a.gate, op, "gate");
  f32(a.up, op, "up");
  f32_or_bf16(a.out, true, op, "out");
  same_numel(a.gate, a.up, op, "gate", "up");
  same_numel(a.gate, a.out, op, "gate", "out");
}

void validate(const SwigluBackwardArgs& a) {
  const char* op = "swiglu_backward";
  f32(a.dout, op, "dout");
  f32(a.gate, op, "gate");
  f32(a.up, op, "up");
  same_numel(a.gate, a.up, op, "gate", "up");
  same_numel(a.gate, a.dout, op, "gate", "dout");
  if (present(a.dgate)) {
    f32_or_bf16(a.dgate, !a.accumulate, op, "dgate");
    same_numel(a.gate, a.dgate, op, "gate", "dgate");
  }
  if (present(a.dup)) {
    f32_or_bf16(a.dup, !a.accumulate, op, "dup");
    same_numel(a.gate, a.dup, op, "gate", "dup");
  }
}

void validate(const RouterArgs& a) {
  const char* op = "router";
  f32(a.logits, op, "logits");
  REQ(a.logits.ndim() == 2, op, "logits must be [T, E], got ", desc(a.logits));
  int64_t t = a.logits.dim(0), e = a.logits.dim(1);
  REQ(a.top_k >= 1 && a.top_k <= e, op, "top_k ", a.top_k, " must be in [1, ", e, "]");
  if (a.method != RouterMethod::Greedy) {
    REQ(a.n_group >= 1 && e % a.n_group == 0, op, "n_group ", a.n_group, " must divide ", e, " experts");
    REQ(a.topk_group >= 1 && a.topk_group <= a.n_group, op, "topk_group ", a.topk_group,
        " must be in [1, n_group = ", a.n_group, "]");
    REQ(int64_t(a.topk_group) * (e / a.n_group) >= a.top_k, op, "topk_group ", a.topk_group, " groups of ",
        e / a.n_group, " experts cannot hold top_k ", a.top_k);
  }
  if (a.method == RouterMethod::NoauxTc)
    REQ(e / a.n_group >= 2, op, "noaux_tc sums the top-2 scores of a group: groups of ", e / a.n_group);
  if (present(a.bias)) {
    floating(a.bias, op, "bias");
    REQ(a.bias.numel() == e, op, "bias ", desc(a.bias), " must have ", e, " values");
  }
  f32(a.scores, op, "scores");
  same_shape(a.scores, a.logits, op, "scores", "logits");
  i32(a.ids, op, "ids");
  f32(a.weights, op, "weights");
  REQ(a.ids.shape() == Shape({t, a.top_k}) && a.weights.shape() == Shape({t, a.top_k}), op, "ids ",
      desc(a.ids), " and weights ", desc(a.weights), " must be [", t, ", ", a.top_k, "]");
}

void validate(const RouterBackwardArgs& a) {
  const char* op = "router_backward";
  f32(a.scores, op, "scores");
  i32(a.ids, op, "ids");
  f32(a.dweights, op, "dweights");
  f32(a.dlogits, op, "dlogits");
  REQ(a.scores.ndim() == 2 && a.ids.ndim() == 2 && a.ids.dim(0) == a.scores.dim(0), op, "scores ",
      desc(a.scores), " and ids ", desc(a.ids), " must be [T, E] and [T, k]");
  same_shape(a.ids, a.dweights, op, "ids", "dweights");
  same_shape(a.scores, a.dlogits, op, "scores", "dlogits");
}

void validate(const MoeSortArgs& a) {
  const char* op = "moe_sort";
  i32(a.ids, op, "ids");
  i32(a.pick, op, "pick");
  i32(a.token, op, "token");
  i32(a.counts, op, "counts");
  REQ(a.ids.ndim() == 2, op, "ids must be [T, k], got ", desc(a.ids));
  REQ(a.pick.numel() == a.ids.numel() && a.token.numel() == a.ids.numel(), op, "pick ", desc(a.pick),
      " and token ", desc(a.token), " must have T·k = ", a.ids.numel(), " values");
  REQ(a.n_experts >= 1 && a.counts.numel() == a.n_experts, op, "counts ", desc(a.counts), " must have ",
      a.n_experts, " values");
}

void validate(const GatherRowsArgs& a) {
  const char* op = "gather_rows";
  f32(a.src, op, "src");
  i32(a.idx, op, "idx");
  f32_or_bf16(a.out, !a.accumulate, op, "out");
  REQ(a.src.ndim() == 2 && a.out.ndim() == 2 && a.out.dim(0) == a.idx.numel() &&
          a.out.dim(1) == a.src.dim(1),
      op, "out ", desc(a.out), " must be [N, D] for src ", desc(a.src), ", idx ", desc(a.idx));
  if (present(a.weight)) {
    f32(a.weight, op, "weight");
    REQ(a.weight.numel() == a.idx.numel(), op, "weight ", desc(a.weight), " does not match idx");
  }
}

void validate(const ScatterAddRowsArgs& a) {
  const char* op = "scatter_add_rows";
  f32(a.src, op, "src");
  i32(a.idx, op, "idx");
  f32(a.out, op, "out");
  REQ(a.src.ndim() == 2 && a.out.ndim() == 2 && a.src.dim(0) == a.idx.numel() &&
          a.out.dim(1) == a.src.dim(1),
      op, "src ", desc(a.src), " must be [N, D] for idx ", desc(a.idx), ", out ", desc(a.out));
  if (present(a.weight)) {
    f32(a.weight, op, "weight");
    REQ(a.weight.numel() == a.idx.numel(), op, "weight ", desc(a.weight), " does not match idx");
  }
}

void validate(const ScatterAddRowsBackwardArgs& a) {
  const char* op = "scatter_add_rows_backward";
  f32(a.dout, op, "dout");
  i32(a.idx, op, "idx");
  f32(a.src, op, "src");
  REQ(a.src.ndim() == 2 && a.dout.ndim() == 2 && a.src.dim(0) == a.idx.numel() &&
          a.dout.dim(1) == a.src.dim(1),
      op, "src ", desc(a.src), " must be [N, D] for idx ", desc(a.idx), ", dout ", desc(a.dout));
  if (present(a.weight)) {
    f32(a.weight, op, "weight");
    REQ(a.weight.numel() == a.idx.numel(), op, "weight does not match idx");
  }
  if (present(a.dsrc)) {
    f32_or_bf16(a.dsrc, !a.accumulate, op, "dsrc");
    same_shape(a.dsrc, a.src, op, "dsrc", "src");
  }
  if (present(a.dweight)) {
    f32(a.dweight, op, "dweight");
    REQ(a.dweight.numel() == a.idx.numel(), op, "dweight does not match idx");
  }
}

void validate(const CrossEntropyArgs& a) {
  const char* op = "cross_entropy";
  f32(a.logits, op, "logits");
  i32(a.targets, op, "targets");
  REQ(a.logits.ndim() == 2 && a.targets.numel() == a.logits.dim(0), op, "logits ", desc(a.logits),
      " must be [T, V] for targets ", desc(a.targets));
  if (present(a.loss)) {
    f32(a.loss, op, "loss");
    REQ(a.loss.numel() == a.logits.dim(0), op, "loss ", desc(a.loss), " must have T values");
  }
  if (present(a.loss_sum)) {
    f32(a.loss_sum, op, "loss_sum");
    REQ(a.loss_sum.numel() == 1, op, "loss_sum must be [1]");
  }
  if (present(a.dlogits)) {
    f32(a.dlogits, op, "dlogits");
    same_shape(a.dlogits, a.logits, op, "dlogits", "logits");
  }
}

void validate(const AddArgs& a) {
  f32(a.a, "add", "a");
  f32(a.b, "add", "b");
  f32(a.out, "add", "out");
  same_numel(a.a, a.b, "add", "a", "b");
  same_numel(a.a, a.out, "add", "a", "out");
}
void validate(const ScaleArgs& a) {
  f32(a.x, "scale", "x");
  f32(a.out, "scale", "out");
  same_numel(a.x, a.out, "scale", "x", "out");
}
void validate(const MulArgs& a) {
  f32(a.a, "mul", "a");
  f32(a.b, "mul", "b");
  f32(a.out, "mul", "out");
  same_numel(a.a, a.b, "mul", "a", "b");
  same_numel(a.a, a.out, "mul", "a", "out");
}
void validate(const CopyArgs& a) {
  const char* op = "copy";
  REQ(a.src.defined() && a.dst.defined(), op, "src or dst missing");
  same_numel(a.src, a.dst, op, "src", "dst");
  bool ok = (is_float(a.src.dtype()) && is_float(a.dst.dtype())) || a.src.dtype() == a.dst.dtype();
  REQ(ok, op, "cannot convert ", desc(a.src), " to ", desc(a.dst));
  // Overlapping bytes only as a move (the same dtype): a conversion in place would read values it
  // had already overwritten, in an order each backend chooses.
  REQ(!bytes_overlap(a.src, a.dst) || a.src.dtype() == a.dst.dtype(), op, "src ", desc(a.src), " and dst ", desc(a.dst),
      " overlap in memory: only a copy of the same dtype may (it moves, as memmove)");
}
void validate(const FillArgs& a) { floating(a.x, "fill", "x"); }
void validate(const CopyColsArgs& a) {
  const char* op = "copy_cols";
  f32(a.src, op, "src");
  f32(a.dst, op, "dst");
  int64_t cs = last_dim(a.src), cd = last_dim(a.dst), rs = rows_of(a.src), rd = rows_of(a.dst);
  REQ(a.width >= 0 && a.src_col >= 0 && a.dst_col >= 0 && a.src_col + a.width <= cs &&
          a.dst_col + a.width <= cd,
      op, "columns [", a.src_col, ", +", a.width, ") of src ", desc(a.src), " → [", a.dst_col, ", +", a.width,
      ") of dst ", desc(a.dst), " out of range");
  bool rows_ok = rs == rd || (rs > 0 && rd % rs == 0) || (rd > 0 && rs > 0 && rs % rd == 0);
  REQ(rows_ok, op, "rows of src ", desc(a.src), " and dst ", desc(a.dst), " are not equal or multiples");
  REQ(a.src.raw() != a.dst.raw() || a.src.numel() == 0, op, "src and dst must not alias");
}
void validate(const SumSquaresArgs& a) {
  f32(a.x, "sum_squares", "x");
  f32(a.out, "sum_squares", "out");
  REQ(a.out.numel() == 1, "sum_squares", "out must be [1], got ", desc(a.out));
}
void validate(const AdamWArgs& a) {
  const char* op = "adamw";
  f32(a.param, op, "param");
  f32(a.grad, op, "grad");
  for (auto [t, n] : {std::pair{&a.m, "m"}, {&a.v, "v"}}) {
    REQ(t->defined() && (t->dtype() == DType::F32 || t->dtype() == DType::BF16), op, n,
        " must be F32 or BF16, got ", t->defined() ? desc(*t) : std::string("none"));
    same_numel(a.param, *t, op, "param", n);
  }
  same_numel(a.param, a.grad, op, "param", "grad");
  if (present(a.param_copy)) {
    f32_or_bf16(a.param_copy, true, op, "param_copy");
    same_numel(a.param, a.param_copy, op, "param", "param_copy");
    REQ(a.param_copy.raw() != a.param.raw(), op, "param_copy must not be param itself");
  }
  REQ(a.step >= 1, op, "step ", a.step, " must be >= 1");
}

// ---------------------------------------------------------------------------------------------
// RoPE tables.

double yarn_get_mscale(double scale, double mscale) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

double rope_softmax_scale(const RopeParams& p, int64_t qk_head_dim) {
  double s = std::pow(double(qk_head_dim), -0.5);
  if (p.type != "default" && p.mscale_all_dim != 0.0) {
    double m = yarn_get_mscale(p.factor, p.mscale_all_dim);
    s = s * m * m;
  }
  return s;
}

RopeTables rope_tables(const RopeParams& p, int64_t max_pos) {
  if (p.type != "default" && p.type != "yarn")
    input_error("rope type \"", p.type, "\" is not supported (expected \"default\" or \"yarn\")");
  if (p.dim <= 0 || p.dim % 2) input_error("qk_rope_head_dim ", p.dim, " must be positive and even");
  if (max_pos <= 0) input_error("rope table length ", max_pos, " must be positive");
  int64_t half = p.dim / 2;
  RopeTables r;
  r.inv_freq = Tensor::empty(DType::F32, {half});
  float* inv = r.inv_freq.data<float>();
  // pos_freqs = θ^(2i/d) in FP32 as torch does (exponent and power rounded to float).
  std::vector<float> pos_freqs(size_t(half), 0.0f);
  for (int64_t i = 0; i < half; ++i)
    pos_freqs[size_t(i)] = float(std::pow(double(float(p.theta)), double(float(2 * i) / float(p.dim))));
  r.attention_factor = 1.0;
  if (p.type == "default") {
    for (int64_t i = 0; i < half; ++i) inv[i] = 1.0f / pos_freqs[size_t(i)];
  } else {
    int64_t orig = p.original_max_position_embeddings > 0 ? p.original_max_position_embeddings
                                                          : p.max_position_embeddings;
    if (orig <= 0) input_error("yarn needs original_max_position_embeddings or max_position_embeddings");
    double factor = p.factor > 0 ? p.factor : double(p.max_position_embeddings) / double(orig);
    if (p.attention_factor >= 0) r.attention_factor = p.attention_factor;
    else if (p.mscale != 0.0 && p.mscale_all_dim != 0.0)
      r.attention_factor = yarn_get_mscale(factor, p.mscale) / yarn_get_mscale(factor, p.mscale_all_dim);
    else r.attention_factor = yarn_get_mscale(factor, 1.0);
    double beta_fast = p.beta_fast != 0.0 ? p.beta_fast : 32.0;
    double beta_slow = p.beta_slow != 0.0 ? p.beta_slow : 1.0;
    const double kPi = 3.14159265358979323846;
    auto correction_dim = [&](double rot) {
      return double(p.dim) * std::log(double(orig) / (rot * 2 * kPi)) / (2 * std::log(p.theta));
    };
    double low = correction_dim(beta_fast), high = correction_dim(beta_slow);
    if (p.truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, double(p.dim - 1));
    if (low == high) high += 0.001;  // HF's guard against a zero-width ramp
    // HF computes the ramp in FP32: (arange − low) / (high − low), clamped to [0, 1].
    float flow = float(low), fspan = float(high - low);
    for (int64_t i = 0; i < half; ++i) {
      float ramp = std::min(std::max((float(i) - flow) / fspan, 0.0f), 1.0f);
      float extra = 1.0f - ramp;  // inv_freq_extrapolation_factor
      float f_extra = 1.0f / pos_freqs[size_t(i)];
      float f_inter = 1.0f / (float(factor) * pos_freqs[size_t(i)]);
      inv[i] = f_inter * (1.0f - extra) + f_extra * extra;
    }
  }
  r.cos = Tensor::empty(DType::F32, {max_pos, half});
  r.sin = Tensor::empty(DType::F32, {max_pos, half});
  float* c = r.cos.data<float>();
  float* s = r.sin.data<float>();
  float af = float(r.attention_factor);
  for (int64_t t = 0; t < max_pos; ++t)
    for (int64_t i = 0; i < half; ++i) {
      float ang = float(t) * inv[i];
      c[t * half + i] = float(std::cos(double(ang))) * af;
      s[t * half + i] = float(std::sin(double(ang))) * af;
    }
  return r;
}

}  // namespace dsv3
#undef REQ
