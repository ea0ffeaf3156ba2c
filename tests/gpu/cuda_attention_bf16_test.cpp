// The BF16 tensor-core flash attention (attention_bf16.cu) against the CPU backend's exact FP32
// attention, forward (out, lse) and backward (dq, dk, dv), under the BF16-operand tolerance kBf16:
// its q, k, v, dout, P and dS are rounded to BF16 for the MMAs. Shapes: tiny's heads (qk 48 padded
// to the 64-wide kernel, v 32), bench-0.7b's (16 heads, 192/128), V3's (192/128) with a batch dim,
// chunked causal (q_offset, S > T), non-causal, T and S not multiples of the tiles; the forward and
// dk/dv by both kernels each (wgmma, mma.sync), dq by both paths (the matmul from the stored dSᵀ and
// the dq kernel). Also: NaN/Inf and guard bytes, determinism, that with the flag off the FP32
// kernels run unchanged, and the causal dQ matmul in blocks of rows over poisoned scratch.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "../backend/harness.h"
#include "backend/cuda/attention_bf16.h"
#include "backend/cuda/cuda_backend.h"

namespace dsv3::test {
namespace {

struct Shape6 {
  int64_t b;  // 0: no batch dim
  int64_t t, s, h, dqk, dv;
  bool causal;
  int64_t q_off;
  float logit_scale = 1.0f;  // multiplies the softmax scale: sharper attention
};

// Sets the process-wide switch for a scope and restores "off".
struct Bf16On {
  explicit Bf16On(bool on) { cuda_set_attention_bf16(on); }
  ~Bf16On() { cuda_set_attention_bf16(false); }
};
// The backward's dQ path for a scope (matmul from the stored dSᵀ, or the dq kernel); restores the
// previous setting.
struct DqMatmul {
  explicit DqMatmul(bool on) : prev(cuda_attention_dq_matmul()) { cuda_set_attention_dq_matmul(on); }
  ~DqMatmul() { cuda_set_attention_dq_matmul(prev); }
  bool prev;
};

// The forward and dk/dv kernels for a scope (wgmma, the default, or mma.sync); restores the previous
// setting.
struct Wgmma {
  explicit Wgmma(bool on) : prev(cuda_attention_wgmma()) { cuda_set_attention_wgmma(on); }
  ~Wgmma() { cuda_set_attention_wgmma(prev); }
  bool prev;
};

Shape dims(const Shape6& c, int64_t rows, int64_t width) {
  return c.b ? Shape{c.b, rows, c.h, width} : Shape{rows, c.h, width};
}
Shape lse_dims(const Shape6& c) { return c.b ? Shape{c.b, c.h, c.t} : Shape{c.h, c.t}; }

struct Inputs {
  Tensor q, k, v, dout;
  float scale;
};
Inputs make_inputs(const Shape6& c, uint64_t seed) {
  return {randn(dims(c, c.t, c.dqk), seed, 1), randn(dims(c, c.s, c.dqk), seed, 2), randn(dims(c, c.s, c.dv), seed, 3),
          randn(dims(c, c.t, c.dv), seed, 4), c.logit_scale / std::sqrt(float(c.dqk))};
}

struct Results {
  Tensor out, lse, dq, dk, dv;  // host copies
  std::string damaged;
};

// Forward then backward on backend `be` (outputs guarded, pre-filled with NaN).
Results run(Backend& be, const Shape6& c, const Inputs& in, bool backward = true) {
  Guards g(be);
  Tensor q = be.to_device(in.q), k = be.to_device(in.k), v = be.to_device(in.v);
  Tensor out = g.out(DType::F32, dims(c, c.t, c.dv)), lse = g.out(DType::F32, lse_dims(c));
  be.attention({q, k, v, out, lse, in.scale, c.causal, c.q_off, {}, {}});
  Results r;
  r.out = be.to_host(out);
  r.lse = be.to_host(lse);
  if (backward) {
    Tensor dq = g.out(DType::F32, dims(c, c.t, c.dqk)), dk = g.out(DType::F32, dims(c, c.s, c.dqk));
    Tensor dv = g.out(DType::F32, dims(c, c.s, c.dv));
    be.attention_backward(
        {q, k, v, out, lse, be.to_device(in.dout), dq, dk, dv, in.scale, c.causal, c.q_off, {}, {}, {}, {}});
    r.dq = be.to_host(dq);
    r.dk = be.to_host(dk);
    r.dv = be.to_host(dv);
  }
  r.damaged = g.damaged();
  return r;
}

double max_err(const Tensor& got, const Tensor& want, const char* name, double tol) {
  Err e = compare(got, to_vec(want));
  EXPECT_EQ(e.non_finite, 0) << name;
  EXPECT_LE(e.norm_err, tol) << name << " worst element " << e.worst;
  return e.norm_err;
}

Tensor round_bf16(const Tensor& t) { return t.to(DType::BF16).to(DType::F32); }

// `rounded_reference`: the CPU reference sees q, k, v, dout already rounded to BF16 (as the kernel's
// operands are), so only the kernel's own roundings (P, dS) and its summation order remain.
void check_bf16(const Shape6& c, uint64_t seed, bool backward = true, bool rounded_reference = false) {
  ASSERT_GT(cuda_device_count(), 0);
  Inputs in = make_inputs(c, seed);
  Inputs ref_in = in;
  if (rounded_reference) ref_in = {round_bf16(in.q), round_bf16(in.k), round_bf16(in.v), round_bf16(in.dout), in.scale};
  Results want = run(cpu_backend(), c, ref_in, backward);
  Bf16On on(true);
  const DqMatmul matmul(true);
  const Wgmma wgmma(true);
  const int64_t matmuls = cuda_attention_dq_matmuls(), fwds = cuda_attention_wgmma_calls();
  Results got = run(cuda_backend(), c, in, backward);
  EXPECT_EQ(cuda_attention_dq_matmuls() - matmuls, backward ? 1 : 0) << "dQ did not take the matmul";
  EXPECT_EQ(cuda_attention_wgmma_calls() - fwds, backward ? 2 : 1) << "forward or dk/dv did not take wgmma";
  EXPECT_EQ(got.damaged, "");
  double e_out = max_err(got.out, want.out, "out", tol::kBf16);
  double e_lse = max_err(got.lse, want.lse, "lse", tol::kBf16);
  std::string msg = cat("out ", e_out, " lse ", e_lse);
  {  // the mma.sync forward and dk/dv kernels against the same reference
    const Wgmma off(false);
    const int64_t before = cuda_attention_wgmma_calls();
    Results sync = run(cuda_backend(), c, in, backward);
    EXPECT_EQ(cuda_attention_wgmma_calls(), before) << "the mma.sync kernels were asked for";
    EXPECT_EQ(sync.damaged, "");
    msg += cat(" (mma.sync: out ", max_err(sync.out, want.out, "out (mma.sync)", tol::kBf16), " lse ",
               max_err(sync.lse, want.lse, "lse (mma.sync)", tol::kBf16));
    if (backward)
      msg += cat(" dq ", max_err(sync.dq, want.dq, "dq (mma.sync)", tol::kBf16), " dk ",
                 max_err(sync.dk, want.dk, "dk (mma.sync)", tol::kBf16), " dv ",
                 max_err(sync.dv, want.dv, "dv (mma.sync)", tol::kBf16));
    msg += ")";
  }
  if (backward) {
    // Both dQ paths (got: the matmul from dSᵀ; then the dq kernel), each against the reference;
    // dk and dv come from the same kernel either way.
    Results kernel;
    {
      DqMatmul off(false);
      const int64_t before = cuda_attention_dq_matmuls();
      kernel = run(cuda_backend(), c, in, backward);
      EXPECT_EQ(cuda_attention_dq_matmuls(), before) << "the dq kernel was asked for";
    }
    EXPECT_EQ(kernel.damaged, "");
    double e_dq = max_err(got.dq, want.dq, "dq (matmul)", tol::kBf16);
    double e_dqk = max_err(kernel.dq, want.dq, "dq (kernel)", tol::kBf16);
    double e_dk = max_err(got.dk, want.dk, "dk", tol::kBf16);
    double e_dv = max_err(got.dv, want.dv, "dv", tol::kBf16);
    msg += cat(" dq ", e_dq, " (dq kernel ", e_dqk, ") dk ", e_dk, " dv ", e_dv);
  }
  if (rounded_reference) {  // what the input rounding alone does, for the log
    Results exact = run(cpu_backend(), c, in, backward);
    msg += cat(" | rounded-input CPU vs exact CPU: out ", compare(want.out, to_vec(exact.out)).norm_err);
    if (backward) msg += cat(" dq ", compare(want.dq, to_vec(exact.dq)).norm_err);
  }
  // Recorded in the log: the measured errors (docs/cuda.md quotes them).
  ::testing::Test::RecordProperty("errors", msg);
  std::printf("[ errors   ] %s\n", msg.c_str());
}

TEST(CudaAttnBf16, TinyHeads) { check_bf16({0, 100, 100, 4, 48, 32, true, 0}, 11); }
TEST(CudaAttnBf16, TinyHeadsBatched) { check_bf16({3, 64, 64, 4, 48, 32, true, 0}, 12); }
TEST(CudaAttnBf16, Bench07bHeads) { check_bf16({0, 512, 512, 16, 192, 128, true, 0}, 13); }
TEST(CudaAttnBf16, V3HeadsBatchedRagged) { check_bf16({2, 200, 200, 3, 192, 128, true, 0}, 14); }
// Chunked prefill: the chunk's queries sit at q_offset.., S > T, neither a multiple of a tile.
TEST(CudaAttnBf16, ChunkedCausalWithOffset) { check_bf16({2, 150, 170, 3, 192, 128, true, 20}, 15); }
TEST(CudaAttnBf16, ChunkedCausalLongPrefix) { check_bf16({0, 37, 300, 2, 192, 128, true, 263}, 16); }
// Keys past the last query's position (S > q_offset + T): masked for every row, whole key tiles
// with no query to see them.
TEST(CudaAttnBf16, CausalKeysPastTheLastQuery) { check_bf16({1, 100, 330, 2, 192, 128, true, 40}, 28); }
TEST(CudaAttnBf16, NonCausal) { check_bf16({2, 90, 130, 3, 192, 128, false, 0}, 17); }
TEST(CudaAttnBf16, NonCausalSmallHeads) { check_bf16({0, 70, 33, 5, 48, 32, false, 0}, 18); }
// The other kernel widths: 128/128 (qk 112 padded) and 256/128.
TEST(CudaAttnBf16, Width128) { check_bf16({0, 130, 130, 2, 112, 96, true, 0}, 19); }
TEST(CudaAttnBf16, Width256) { check_bf16({1, 130, 140, 2, 256, 128, true, 10}, 20); }
// Sharper softmax (logits ×4, std 4): the online rescaling and the rounding of P matter more. Here
// the rounding of the inputs alone moves scores by ~6e-3 rms and the outputs by ~1e-2 of their
// range (measured on the H200: out 1.1e-2, dq 1.0e-2 against the unrounded reference), which is
// the BF16 format and not the kernel, so the reference gets the same rounded inputs.
TEST(CudaAttnBf16, SharpSoftmax) { check_bf16({0, 300, 300, 2, 192, 128, true, 0, 4.0f}, 21, true, true); }
TEST(CudaAttnBf16, SharpSoftmaxChunked) { check_bf16({2, 150, 230, 3, 192, 128, true, 80, 4.0f}, 27, true, true); }
TEST(CudaAttnBf16, ForwardOnlyWithoutLse) {
  ASSERT_GT(cuda_device_count(), 0);
  Shape6 c{0, 80, 80, 2, 192, 128, true, 0};
  Inputs in = make_inputs(c, 22);
  Results want = run(cpu_backend(), c, in, false);
  Bf16On on(true);
  CudaBackend& be = cuda_backend();
  Guards g(be);
  Tensor out = g.out(DType::F32, dims(c, c.t, c.dv));
  be.attention({be.to_device(in.q), be.to_device(in.k), be.to_device(in.v), out, Tensor(), in.scale, true, 0, {}, {}});
  max_err(be.to_host(out), want.out, "out", tol::kBf16);
  EXPECT_EQ(g.damaged(), "");
}

// The causal dQ matmul in blocks of query rows: each block reads dSᵀ only up to the keys its last
// row sees, and the dk/dv kernels (wgmma and mma.sync, each run) zero the masked entries only
// within that reach. Scratch is
// poisoned with NaN, so a block that read an entry nobody wrote gives NaN. Every block count
// against the reference (kBf16) and against one block over the whole square (the same BF16
// products, FP32 sums in another order: kF32); the backward's counter says the matmul ran.
struct ScratchPoison {
  ScratchPoison() { cuda_set_scratch_poison(true); }
  ~ScratchPoison() { cuda_set_scratch_poison(false); }
};
struct DqBlocks {
  explicit DqBlocks(int n) : prev(cuda_attention_dq_blocks()) { cuda_set_attention_dq_blocks(n); }
  ~DqBlocks() { cuda_set_attention_dq_blocks(prev); }
  int prev;
};
TEST(CudaAttnBf16, DqMatmulRowBlocksReadOnlyWhatTheyNeed) {
  ASSERT_GT(cuda_device_count(), 0);
  const Shape6 shapes[] = {{0, 512, 512, 2, 192, 128, true, 0},  {1, 333, 333, 2, 192, 128, true, 0},
                           {2, 150, 230, 3, 192, 128, true, 80}, {0, 37, 300, 2, 192, 128, true, 263},
                           {1, 300, 300, 2, 48, 32, true, 0},    {0, 260, 330, 2, 256, 128, true, 40}};
  uint64_t seed = 40;
  for (const Shape6& c : shapes) {
    Inputs in = make_inputs(c, ++seed);
    Results want = run(cpu_backend(), c, in);
    Bf16On on(true);
    const DqMatmul matmul(true);
    const ScratchPoison poison;
    for (bool wgmma_kernels : {true, false}) {  // both dk/dv kernels write and zero dSᵀ
      const Wgmma kernels(wgmma_kernels);
      Results whole;
      for (int n : {1, 2, 3, 4, 8, 64}) {
        const DqBlocks blocks(n);
        const int64_t before = cuda_attention_dq_matmuls();
        Results got = run(cuda_backend(), c, in);
        const std::string at = cat("T ", c.t, " S ", c.s, " q_offset ", c.q_off, ", ", n, " blocks, ",
                                   wgmma_kernels ? "wgmma" : "mma.sync");
        EXPECT_EQ(cuda_attention_dq_matmuls() - before, 1) << at;
        EXPECT_EQ(got.damaged, "") << at;
        SCOPED_TRACE(at);
        max_err(got.dq, want.dq, "dq", tol::kBf16);
        max_err(got.dk, want.dk, "dk", tol::kBf16);
        if (n == 1)
          whole = got;
        else
          max_err(got.dq, whole.dq, "dq against one block", tol::kF32);
      }
    }
  }
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  return a.numel() == b.numel() && std::memcmp(a.raw(), b.raw(), size_t(a.numel()) * 4) == 0;
}

TEST(CudaAttnBf16, DeterministicAcrossRuns) {
  ASSERT_GT(cuda_device_count(), 0);
  Shape6 c{2, 150, 170, 3, 192, 128, true, 20};
  Inputs in = make_inputs(c, 23);
  Bf16On on(true);
  Results a = run(cuda_backend(), c, in), b = run(cuda_backend(), c, in);
  EXPECT_TRUE(bitwise_equal(a.out, b.out));
  EXPECT_TRUE(bitwise_equal(a.lse, b.lse));
  EXPECT_TRUE(bitwise_equal(a.dq, b.dq));
  EXPECT_TRUE(bitwise_equal(a.dk, b.dk));
  EXPECT_TRUE(bitwise_equal(a.dv, b.dv));
}

// Flag off: the FP32 kernels, bit for bit the same before and after a BF16 run, within kF32 of the
// CPU; flag on gives a different (BF16-rounded) result, so the switch really switches.
TEST(CudaAttnBf16, FlagOffKeepsFp32Path) {
  ASSERT_GT(cuda_device_count(), 0);
  EXPECT_FALSE(cuda_attention_bf16());
  Shape6 c{2, 150, 170, 3, 192, 128, true, 20};
  Inputs in = make_inputs(c, 24);
  Results want = run(cpu_backend(), c, in);
  Results before = run(cuda_backend(), c, in);
  Results bf;
  {
    Bf16On on(true);
    EXPECT_TRUE(cuda_attention_bf16());
    bf = run(cuda_backend(), c, in);
  }
  EXPECT_FALSE(cuda_attention_bf16());
  Results after = run(cuda_backend(), c, in);
  EXPECT_TRUE(bitwise_equal(before.out, after.out));
  EXPECT_TRUE(bitwise_equal(before.dq, after.dq));
  EXPECT_TRUE(bitwise_equal(before.dk, after.dk));
  EXPECT_TRUE(bitwise_equal(before.dv, after.dv));
  max_err(after.out, want.out, "out", tol::kF32);
  max_err(after.dq, want.dq, "dq", tol::kF32Grad);
  max_err(after.dk, want.dk, "dk", tol::kF32Grad);
  EXPECT_GT(compare(bf.out, to_vec(after.out)).norm_err, tol::kF32);
  EXPECT_GT(compare(bf.dk, to_vec(after.dk)).norm_err, tol::kF32Grad);
}

// Head dims the BF16 kernels do not take (not multiples of 16) fall back to the FP32 kernels even
// with the flag on: results within kF32 of the CPU.
TEST(CudaAttnBf16, UnsupportedDimsFallBackToFp32) {
  ASSERT_GT(cuda_device_count(), 0);
  EXPECT_FALSE(cuda_attention_bf16_supported(40, 32));
  EXPECT_FALSE(cuda_attention_bf16_supported(272, 128));
  EXPECT_FALSE(cuda_attention_bf16_supported(192, 144));
  EXPECT_TRUE(cuda_attention_bf16_supported(192, 128));
  Shape6 c{0, 70, 70, 2, 40, 24, true, 0};
  Inputs in = make_inputs(c, 25);
  Results want = run(cpu_backend(), c, in);
  Bf16On on(true);
  Results got = run(cuda_backend(), c, in);
  max_err(got.out, want.out, "out", tol::kF32);
  max_err(got.dq, want.dq, "dq", tol::kF32Grad);
  max_err(got.dv, want.dv, "dv", tol::kF32Grad);
}

// Large logits (×12: scores of ±40): no overflow in exp2, no NaN/Inf anywhere, and the logsumexp
// (dominated by the largest score) within kBf16. The outputs themselves are not compared: a BF16
// rounding of q·k at this size moves scores by ~0.02, which is the format, not the kernel.
TEST(CudaAttnBf16, LargeLogitsStayFinite) {
  ASSERT_GT(cuda_device_count(), 0);
  Shape6 c{0, 130, 130, 2, 192, 128, true, 0, 12.0f};
  Inputs in = make_inputs(c, 26);
  Results want = run(cpu_backend(), c, in, false);
  Bf16On on(true);
  Results got = run(cuda_backend(), c, in);
  max_err(got.lse, want.lse, "lse", tol::kBf16);
  for (const Tensor* t : {&got.out, &got.dq, &got.dk, &got.dv}) EXPECT_EQ(compare(*t, to_vec(*t)).non_finite, 0);
  EXPECT_EQ(got.damaged, "");
}

}  // namespace
}  // namespace dsv3::test
