// MLA's split keys and values (AttentionArgs::kv, k_pe; ops.h) on the CUDA backend's BF16 attention,
// which reads them in place: its outputs must be bit for bit those of the same kernels given k and
// v materialized (the same BF16 operands; dkv is dk's first Dn columns and dv, dk_pe the sum of dk's
// rope columns over the heads in copy_cols' order), for the wgmma and the mma.sync kernels, and
// within kBf16 of the CPU backend's split form. Shapes: bench-0.7b's heads (128 + 64, v 128) with a
// batch dim, a chunked causal one (q_offset, S > T), a narrow one (16 + 16, v 32: the 64-wide
// kernels), and one the in-place path declines (Dn not a multiple of 8), which composes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "../backend/harness.h"
#include "backend/cuda/attention_bf16.h"
#include "backend/cuda/cuda_backend.h"

namespace dsv3::test {
namespace {

struct SplitShape {
  int64_t b;  // 0: no batch dim
  int64_t t, s, h, dn, dr, dv;
  int64_t q_off;
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
            randn(dims(c, c.s, 1, c.dr), seed, 3),  Tensor::empty(DType::F32, dims(c, c.s, c.h, dqk)),
            Tensor::empty(DType::F32, dims(c, c.s, c.h, c.dv)), randn(dims(c, c.t, c.h, c.dv), seed, 4),
            1.0f / std::sqrt(float(dqk))};
  for (int64_t tok = 0; tok < bb * c.s; ++tok)
    for (int64_t hh = 0; hh < c.h; ++hh) {
      const float* kv = in.kv.data<float>() + (tok * c.h + hh) * (c.dn + c.dv);
      float* k = in.k.data<float>() + (tok * c.h + hh) * dqk;
      float* v = in.v.data<float>() + (tok * c.h + hh) * c.dv;
      for (int64_t j = 0; j < c.dn; ++j) k[j] = kv[j];
      for (int64_t j = 0; j < c.dr; ++j) k[c.dn + j] = in.k_pe.data<float>()[tok * c.dr + j];
      for (int64_t j = 0; j < c.dv; ++j) v[j] = kv[c.dn + j];
    }
  return in;
}

struct Results {
  Tensor out, lse, dq, dkv, dk_pe;  // host copies
  std::string damaged;
};

// Forward and backward in the split form, outputs guarded and pre-filled with NaN.
Results run_split(Backend& be, const SplitShape& c, const Inputs& in) {
  Guards g(be);
  const int64_t dqk = c.dn + c.dr;
  AttentionArgs f;
  f.q = be.to_device(in.q);
  f.kv = be.to_device(in.kv);
  f.k_pe = be.to_device(in.k_pe);
  f.out = g.out(DType::F32, dims(c, c.t, c.h, c.dv));
  f.lse = g.out(DType::F32, c.b ? Shape{c.b, c.h, c.t} : Shape{c.h, c.t});
  f.scale = in.scale;
  f.q_offset = c.q_off;
  be.attention(f);
  AttentionBackwardArgs b;
  b.q = f.q, b.kv = f.kv, b.k_pe = f.k_pe, b.out = f.out, b.lse = f.lse;
  b.dout = be.to_device(in.dout);
  b.dq = g.out(DType::F32, dims(c, c.t, c.h, dqk));
  b.dkv = g.out(DType::F32, dims(c, c.s, c.h, c.dn + c.dv));
  b.dk_pe = g.out(DType::F32, dims(c, c.s, 1, c.dr));
  b.scale = in.scale;
  b.q_offset = c.q_off;
  be.attention_backward(b);
  return {be.to_host(f.out), be.to_host(f.lse), be.to_host(b.dq), be.to_host(b.dkv), be.to_host(b.dk_pe),
          g.damaged()};
}

// The same through k and v, with dkv and dk_pe assembled on the host (dk_pe summed over the heads
// from head 0 up, in FP32).
Results run_materialized(Backend& be, const SplitShape& c, const Inputs& in) {
  const int64_t dqk = c.dn + c.dr, bb = c.b ? c.b : 1;
  Tensor q = be.to_device(in.q), k = be.to_device(in.k), v = be.to_device(in.v);
  Tensor out = be.alloc(DType::F32, dims(c, c.t, c.h, c.dv));
  Tensor lse = be.alloc(DType::F32, c.b ? Shape{c.b, c.h, c.t} : Shape{c.h, c.t});
  be.attention({q, k, v, out, lse, in.scale, true, c.q_off, {}, {}});
  Tensor dq = be.alloc(DType::F32, dims(c, c.t, c.h, dqk)), dk = be.alloc(DType::F32, dims(c, c.s, c.h, dqk));
  Tensor dv = be.alloc(DType::F32, dims(c, c.s, c.h, c.dv));
  be.attention_backward({q, k, v, out, lse, be.to_device(in.dout), dq, dk, dv, in.scale, true, c.q_off, {}, {}, {}, {}});
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
  explicit Bf16Scope(bool wgmma) : prev_wgmma(cuda_attention_wgmma()) {
    cuda_set_attention_bf16(true);
    cuda_set_attention_wgmma(wgmma);
  }
  ~Bf16Scope() {
    cuda_set_attention_bf16(false);
    cuda_set_attention_wgmma(prev_wgmma);
  }
  bool prev_wgmma;
};

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
    const Results mat = run_materialized(cuda_backend(), c, in);
    EXPECT_EQ(got.damaged, "") << at;
    expect_same_bits(got.out, mat.out, at + " out");
    expect_same_bits(got.lse, mat.lse, at + " lse");
    expect_same_bits(got.dq, mat.dq, at + " dq");
    expect_same_bits(got.dkv, mat.dkv, at + " dkv");
    expect_same_bits(got.dk_pe, mat.dk_pe, at + " dk_pe");
    expect_close(got.out, want.out, at + " out against the CPU");
    expect_close(got.lse, want.lse, at + " lse against the CPU");
    expect_close(got.dq, want.dq, at + " dq against the CPU");
    expect_close(got.dkv, want.dkv, at + " dkv against the CPU");
    expect_close(got.dk_pe, want.dk_pe, at + " dk_pe against the CPU");
  }
}

TEST(CudaAttnSplit, Bench07bHeadsBatched) { check_split({2, 130, 130, 4, 128, 64, 128, 0}, 61, true); }
TEST(CudaAttnSplit, ChunkedCausal) { check_split({1, 70, 150, 3, 128, 64, 128, 80}, 62, true); }
TEST(CudaAttnSplit, NarrowHeads) { check_split({0, 100, 100, 4, 16, 16, 32, 0}, 63, true); }
TEST(CudaAttnSplit, UnalignedSplitComposes) { check_split({0, 64, 64, 2, 12, 4, 16, 0}, 64, false); }

}  // namespace
}  // namespace dsv3::test
