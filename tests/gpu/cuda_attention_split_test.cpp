// MLA's split keys and values (AttentionArgs::kv, k_pe; ops.h) on the CUDA backend's BF16 attention,
// which reads them in place: its outputs must be bit for bit those of the same kernels given k and
// v materialized (the same BF16 operands; dkv is dk's first Dn columns and dv, dk_pe the sum of dk's
// rope columns over the heads in copy_cols' order), for the wgmma and the mma.sync kernels, and
// within kBf16 of the CPU backend's split form. Shapes: bench-0.7b's heads (128 + 64, v 128) with a
// batch dim, a chunked causal one (q_offset, S > T), a non-causal one, a narrow one (16 + 16, v 32:
// the 64-wide kernels), and one the in-place path declines (Dn not a multiple of 8), which
// composes; some outputs only, dQ by either path, and a misaligned k_pe (composed). At each shape
// also the forward's kept operands standing for q and kv in the backward.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "../backend/harness.h"
#include "../backend/reference.h"
#include "backend/cuda/attention_bf16.h"
#include "backend/cuda/cuda_backend.h"

namespace dsv3::test {
namespace {

struct SplitShape {
  int64_t b;  // 0: no batch dim
  int64_t t, s, h, dn, dr, dv;
  int64_t q_off;
  bool causal = true;
};

Shape dims(const SplitShape& c, int64_t rows, int64_t heads, int64_t width) {
  return c.b ? Shape{c.b, rows, heads, width} : Shape{rows, heads, width};
}

struct Inputs {
  Tensor q, kv, k_pe, k, v, dout;  // k and v: kv and k_pe materialized on the host
  float scale;
};
Inputs make_inputs(const SplitShape& c, uint64_t seed) {
  const int64_t dqk = c.dn + c.dr, bb = c.b ? c.b : 1;
  Inputs in{randn(dims(c, c.t, c.h, dqk), seed, 1), randn(dims(c, c.s, c.h, c.dn + c.dv), seed, 2),
            randn(dims(c, c.s, 1, c.dr), seed, 3),  Tensor(), Tensor(), randn(dims(c, c.t, c.h, c.dv), seed, 4),
            1.0f / std::sqrt(float(dqk))};
  const ref::SplitKv kv = ref::split_kv(to_vec(in.kv), to_vec(in.k_pe), bb * c.s, c.h, c.dn, c.dr, c.dv);
  in.k = host_f32(dims(c, c.s, c.h, dqk), kv.k);  // exact: doubles holding floats
  in.v = host_f32(dims(c, c.s, c.h, c.dv), kv.v);
  return in;
}

struct Results {
  Tensor out, lse, dq, dkv, dk_pe;  // host copies
  std::string damaged;
  bool kept = false;  // the forward filled AttentionArgs::keep (the backward then ran without kv, and q)
};

// Which of the backward's outputs a run asks for, k_pe placed off 16-byte alignment (the in-place
// path declines it), and dkv in BF16 (MLA's BF16 mode).
struct Ask {
  bool dq = true, dkv = true, dk_pe = true, misaligned_k_pe = false, dkv_bf16 = false;
  bool keep = false;  // the forward keeps its operands (AttentionArgs::keep); the backward gets them, not q, kv
};

// A device copy of host x one float into its buffer: 4 bytes off 16-byte alignment.
Tensor misaligned(Backend& be, const Tensor& x) {
  Tensor h = Tensor::zeros(DType::F32, {x.numel() + 1});
  std::memcpy(h.data<float>() + 1, x.raw(), size_t(x.numel()) * 4);
  auto dev = std::make_shared<Tensor>(be.to_device(h));
  return Tensor::borrow(static_cast<float*>(dev->raw()) + 1, DType::F32, x.shape(), dev, be.device());
}

// Forward and backward in the split form, outputs guarded and pre-filled with NaN (those not asked
// for stay empty).
Results run_split(Backend& be, const SplitShape& c, const Inputs& in, const Ask& ask = {}) {
  Guards g(be);
  const int64_t dqk = c.dn + c.dr;
  AttentionArgs f;
  f.q = be.to_device(in.q);
  f.kv = be.to_device(in.kv);
  f.k_pe = ask.misaligned_k_pe ? misaligned(be, in.k_pe) : be.to_device(in.k_pe);
  f.out = g.out(DType::F32, dims(c, c.t, c.h, c.dv));
  f.lse = g.out(DType::F32, c.b ? Shape{c.b, c.h, c.t} : Shape{c.h, c.t});
  f.scale = in.scale;
  f.causal = c.causal;
  f.q_offset = c.q_off;
  Tensor kept;
  if (ask.keep) f.keep = &kept;
  be.attention(f);
  AttentionBackwardArgs b;
  b.q = f.q, b.kv = f.kv, b.k_pe = f.k_pe, b.out = f.out, b.lse = f.lse;
  if (kept.defined()) {  // the kept operands stand for kv, and for q where dq gives its shape
    b.kept = kept, b.kv = Tensor();
    if (ask.dq) b.q = Tensor();
  }
  b.dout = be.to_device(in.dout);
  if (ask.dq) b.dq = g.out(DType::F32, dims(c, c.t, c.h, dqk));
  if (ask.dkv) b.dkv = g.out(ask.dkv_bf16 ? DType::BF16 : DType::F32, dims(c, c.s, c.h, c.dn + c.dv));
  if (ask.dk_pe) b.dk_pe = g.out(DType::F32, dims(c, c.s, 1, c.dr));
  b.scale = in.scale;
  b.causal = c.causal;
  b.q_offset = c.q_off;
  be.attention_backward(b);
  auto host = [&](const Tensor& t) { return present(t) ? be.to_host(t) : Tensor(); };
  return {be.to_host(f.out), be.to_host(f.lse), host(b.dq), host(b.dkv), host(b.dk_pe), g.damaged(), kept.defined()};
}

// The same through k and v, with dkv and dk_pe assembled on the host (dk_pe summed over the heads
// from head 0 up, in FP32).
Results run_materialized(Backend& be, const SplitShape& c, const Inputs& in) {
  const int64_t dqk = c.dn + c.dr, bb = c.b ? c.b : 1;
  Tensor q = be.to_device(in.q), k = be.to_device(in.k), v = be.to_device(in.v);
  Tensor out = be.alloc(DType::F32, dims(c, c.t, c.h, c.dv));
  Tensor lse = be.alloc(DType::F32, c.b ? Shape{c.b, c.h, c.t} : Shape{c.h, c.t});
  be.attention({q, k, v, out, lse, in.scale, c.causal, c.q_off, {}, {}});
  Tensor dq = be.alloc(DType::F32, dims(c, c.t, c.h, dqk)), dk = be.alloc(DType::F32, dims(c, c.s, c.h, dqk));
  Tensor dv = be.alloc(DType::F32, dims(c, c.s, c.h, c.dv));
  be.attention_backward(
      {q, k, v, out, lse, be.to_device(in.dout), dq, dk, dv, in.scale, c.causal, c.q_off, {}, {}, {}, {}});
  Results r{be.to_host(out), be.to_host(lse), be.to_host(dq), Tensor::empty(DType::F32, in.kv.shape()),
            Tensor::empty(DType::F32, in.k_pe.shape()), ""};
  const Tensor hk = be.to_host(dk), hv = be.to_host(dv);
  for (int64_t tok = 0; tok < bb * c.s; ++tok) {
    float* pe = r.dk_pe.data<float>() + tok * c.dr;
    for (int64_t hh = 0; hh < c.h; ++hh) {
      const float* dkr = hk.data<float>() + (tok * c.h + hh) * dqk;
      const float* dvr = hv.data<float>() + (tok * c.h + hh) * c.dv;
      float* kvr = r.dkv.data<float>() + (tok * c.h + hh) * (c.dn + c.dv);
      for (int64_t j = 0; j < c.dn; ++j) kvr[j] = dkr[j];
      for (int64_t j = 0; j < c.dv; ++j) kvr[c.dn + j] = dvr[j];
      for (int64_t j = 0; j < c.dr; ++j) pe[j] = hh == 0 ? dkr[c.dn + j] : pe[j] + dkr[c.dn + j];
    }
  }
  return r;
}

void expect_same_bits(const Tensor& got, const Tensor& want, const std::string& what) {
  ASSERT_EQ(got.numel(), want.numel()) << what;
  int64_t differ = 0, first = -1;
  for (int64_t i = 0; i < got.numel(); ++i)
    if (std::memcmp(got.data<float>() + i, want.data<float>() + i, 4) != 0 && differ++ == 0) first = i;
  EXPECT_EQ(differ, 0) << what << ": " << differ << " elements differ, first at " << first << " ("
                       << (first >= 0 ? got.data<float>()[first] : 0.0f) << " against "
                       << (first >= 0 ? want.data<float>()[first] : 0.0f) << ")";
}

void expect_close(const Tensor& got, const Tensor& want, const std::string& what) {
  Err e = compare(got, to_vec(want));
  EXPECT_EQ(e.non_finite, 0) << what;
  EXPECT_LE(e.norm_err, tol::kBf16) << what << " worst element " << e.worst;
}

struct Bf16Scope {
  explicit Bf16Scope(bool wgmma, bool dq_matmul = true)
      : prev_wgmma(cuda_attention_wgmma()), prev_matmul(cuda_attention_dq_matmul()) {
    cuda_set_attention_bf16(true);
    cuda_set_attention_wgmma(wgmma);
    cuda_set_attention_dq_matmul(dq_matmul);
  }
  ~Bf16Scope() {
    cuda_set_attention_bf16(false);
    cuda_set_attention_wgmma(prev_wgmma);
    cuda_set_attention_dq_matmul(prev_matmul);
  }
  bool prev_wgmma, prev_matmul;
};

// got against the materialized run (bits) and the CPU (kBf16), output by output; absent outputs
// must stay absent.
void compare_all(const Results& got, const Results& mat, const Results& want, const Ask& ask, const std::string& at) {
  EXPECT_EQ(got.damaged, "") << at;
  expect_same_bits(got.out, mat.out, at + " out");
  expect_same_bits(got.lse, mat.lse, at + " lse");
  expect_close(got.out, want.out, at + " out against the CPU");
  expect_close(got.lse, want.lse, at + " lse against the CPU");
  const std::pair<const char*, const Tensor Results::*> grads[] = {
      {"dq", &Results::dq}, {"dkv", &Results::dkv}, {"dk_pe", &Results::dk_pe}};
  const bool asked[] = {ask.dq, ask.dkv, ask.dk_pe};
  for (int i = 0; i < 3; ++i) {
    const auto [name, m] = grads[i];
    EXPECT_EQ(present(got.*m), asked[i]) << at << " " << name;
    if (!asked[i]) continue;
    expect_same_bits(got.*m, mat.*m, at + " " + name);
    expect_close(got.*m, want.*m, at + " " + name + " against the CPU");
  }
}

// The forward's kept operands (AttentionArgs::keep) in q's and kv's place: the in-place kernels
// keep their BF16 heads of Q, K and V (the wgmma forward writes out the Q tiles it rounds, the
// mma.sync path rounds them apart) and the backward reads them, so every output is bit for bit the
// run's without them (dkv F32 and BF16, some outputs only: without dq, q stays); where the split
// declines nothing is kept and q and kv stay.
void check_kept(const SplitShape& c, const Inputs& in, bool in_place) {
  Ask some;
  some.dq = some.dk_pe = false;
  for (bool wgmma : {true, false})
    for (Ask ask : {Ask{}, some}) {
      ask.dkv_bf16 = !ask.dq;
      const Bf16Scope scope(wgmma);
      const std::string at = cat(wgmma ? "wgmma" : "mma.sync", ask.dq ? "" : ", dkv alone in BF16");
      const Results base = run_split(cuda_backend(), c, in, ask);
      ask.keep = true;
      const Results got = run_split(cuda_backend(), c, in, ask);
      EXPECT_EQ(got.kept, in_place) << at;
      EXPECT_EQ(got.damaged, "") << at;
      expect_same_bits(got.out, base.out, at + " out");
      expect_same_bits(got.lse, base.lse, at + " lse");
      if (ask.dq) expect_same_bits(got.dq, base.dq, at + " dq");
      if (ask.dk_pe) expect_same_bits(got.dk_pe, base.dk_pe, at + " dk_pe");
      expect_same_bits(got.dkv.to(DType::F32), base.dkv.to(DType::F32), at + " dkv");
    }
}

// Both kernel families, dQ by the matmul; in place (the counter) unless the split declines; then
// the same shape with kept operands.
void check_split(const SplitShape& c, uint64_t seed, bool in_place) {
  ASSERT_GT(cuda_device_count(), 0);
  const Inputs in = make_inputs(c, seed);
  const Results want = run_split(cpu_backend(), c, in);
  EXPECT_EQ(want.damaged, "");
  for (bool wgmma : {true, false}) {
    const Bf16Scope scope(wgmma);
    const std::string at = wgmma ? "wgmma" : "mma.sync";
    const int64_t before = cuda_attention_split_in_place();
    const Results got = run_split(cuda_backend(), c, in);
    EXPECT_EQ(cuda_attention_split_in_place() - before, in_place ? 2 : 0) << at << ": forward and backward in place";
    compare_all(got, run_materialized(cuda_backend(), c, in), want, Ask{}, at);
  }
  check_kept(c, in, in_place);
}

TEST(CudaAttnSplit, Bench07bHeadsBatched) { check_split({2, 130, 130, 4, 128, 64, 128, 0}, 61, true); }
TEST(CudaAttnSplit, ChunkedCausal) { check_split({1, 70, 150, 3, 128, 64, 128, 80}, 62, true); }
TEST(CudaAttnSplit, NonCausal) { check_split({1, 90, 130, 3, 128, 64, 128, 0, false}, 65, true); }
TEST(CudaAttnSplit, NarrowHeads) { check_split({0, 100, 100, 4, 16, 16, 32, 0}, 63, true); }
TEST(CudaAttnSplit, UnalignedSplitComposes) { check_split({0, 64, 64, 2, 12, 4, 16, 0}, 64, false); }

// Some of the backward's outputs only (each kernel writes what it is given), dQ by the dq kernel
// instead of the matmul, and a misaligned k_pe (composed instead of read in place).
TEST(CudaAttnSplit, PartialOutputsDqKernelMisaligned) {
  ASSERT_GT(cuda_device_count(), 0);
  const SplitShape c{1, 100, 120, 2, 128, 64, 128, 20};
  const Inputs in = make_inputs(c, 66);
  const Results want = run_split(cpu_backend(), c, in);
  const Ask asks[] = {{false, true, false, false}, {false, false, true, false}, {true, false, false, false},
                      {true, true, true, true}};
  for (bool dq_matmul : {true, false})
    for (bool wgmma : {true, false}) {
      const Bf16Scope scope(wgmma, dq_matmul);
      const Results mat = run_materialized(cuda_backend(), c, in);
      for (const Ask& ask : asks) {
        const std::string at = cat(wgmma ? "wgmma" : "mma.sync", dq_matmul ? ", dq matmul" : ", dq kernel",
                                   ", asked dq ", ask.dq, " dkv ", ask.dkv, " dk_pe ", ask.dk_pe,
                                   ask.misaligned_k_pe ? ", k_pe misaligned" : "");
        const int64_t before = cuda_attention_split_in_place();
        const Results got = run_split(cuda_backend(), c, in, ask);
        EXPECT_EQ(cuda_attention_split_in_place() - before, ask.misaligned_k_pe ? 0 : 2) << at;
        compare_all(got, mat, want, ask, at);
      }
    }
}

// dkv in BF16: each value the F32 run's rounded to nearest even (the other outputs unchanged), by
// both kernel families in place and by the composition where the split declines.
void check_bf16_dkv(const SplitShape& c, uint64_t seed, bool in_place) {
  ASSERT_GT(cuda_device_count(), 0);
  const Inputs in = make_inputs(c, seed);
  for (bool wgmma : {true, false}) {
    const Bf16Scope scope(wgmma);
    const std::string at = wgmma ? "wgmma" : "mma.sync";
    const Results f32 = run_split(cuda_backend(), c, in);
    const int64_t before = cuda_attention_split_in_place();
    Ask ask;
    ask.dkv_bf16 = true;
    const Results got = run_split(cuda_backend(), c, in, ask);
    EXPECT_EQ(cuda_attention_split_in_place() - before, in_place ? 2 : 0) << at;
    EXPECT_EQ(got.damaged, "") << at;
    ASSERT_EQ(got.dkv.dtype(), DType::BF16) << at;
    expect_same_bits(got.dkv.to(DType::F32), f32.dkv.to(DType::BF16).to(DType::F32), at + " dkv");
    expect_same_bits(got.dq, f32.dq, at + " dq");
    expect_same_bits(got.dk_pe, f32.dk_pe, at + " dk_pe");
  }
}

// Kept operands send the backward to the BF16 kernels whatever cuda_set_attention_bf16 says by then
// (the FP32 kernels could not read them), with the same bits; kept operands of another size or type
// are refused by name.
TEST(CudaAttnSplit, KeptHeadsChecked) {
  ASSERT_GT(cuda_device_count(), 0);
  const SplitShape c{1, 64, 64, 2, 128, 64, 128, 0};
  const Inputs in = make_inputs(c, 73);
  Backend& be = cuda_backend();
  AttentionArgs f;
  f.q = be.to_device(in.q), f.kv = be.to_device(in.kv), f.k_pe = be.to_device(in.k_pe);
  f.out = be.alloc(DType::F32, dims(c, c.t, c.h, c.dv));
  f.lse = be.alloc(DType::F32, {c.b, c.h, c.t});
  f.scale = in.scale;
  Tensor kept;
  {
    const Bf16Scope scope(true);
    f.keep = &kept;
    be.attention(f);
  }
  ASSERT_TRUE(kept.defined());
  AttentionBackwardArgs b;
  b.k_pe = f.k_pe, b.out = f.out, b.lse = f.lse, b.scale = in.scale;
  b.dout = be.to_device(in.dout);
  b.dq = be.alloc(DType::F32, in.q.shape());
  b.dkv = be.alloc(DType::F32, in.kv.shape());
  b.kept = kept;
  be.attention_backward(b);  // the FP32 setting, yet the kept operands' kernels
  const Tensor dq = be.to_host(b.dq), dkv = be.to_host(b.dkv);
  const Results base = [&] {
    const Bf16Scope scope(true);
    return run_split(be, c, in);
  }();
  expect_same_bits(dq, base.dq, "dq from kept operands under the FP32 setting");
  expect_same_bits(dkv, base.dkv, "dkv from kept operands under the FP32 setting");
  for (const Tensor& bad : {kept.rows(0, kept.numel() - 8), be.alloc(DType::F32, kept.shape())}) {
    b.kept = bad;
    try {
      be.attention_backward(b);
      ADD_FAILURE() << "accepted kept " << bad.shape().str();
    } catch (const InternalError& e) {
      EXPECT_NE(std::string(e.what()).find("is not what this forward keeps"), std::string::npos) << e.what();
    }
  }
}

TEST(CudaAttnSplit, Bf16DkvInPlace) { check_bf16_dkv({2, 130, 130, 4, 128, 64, 128, 0}, 67, true); }
TEST(CudaAttnSplit, Bf16DkvComposed) { check_bf16_dkv({0, 64, 64, 2, 12, 4, 16, 0}, 68, false); }

}  // namespace
}  // namespace dsv3::test
