// The CPU backend: the FP32 reference every other backend is tested against.
// All threading is OpenMP: GEMMs call single-threaded OpenBLAS on a fixed split of the output per
// thread (or one call per task inside a parallel loop), other ops loop over rows. Every split is a
// function of the thread count only, so results are bitwise reproducible for a given count.
#pragma once
#include <cstring>
#include <vector>

#include "backend/ops.h"

namespace dsv3 {

class CpuBackend final : public Backend {
 public:
  Device device() const override { return Device::CPU; }
  std::string name() const override { return "cpu"; }
  Tensor alloc(DType t, const Shape& s) override { return Tensor::empty(t, s); }
  Tensor to_device(const Tensor& host) override { return host.clone(); }
  Tensor to_host(const Tensor& t) override { return t.clone(); }

  void linear(const LinearArgs&) override;
  void linear_backward(const LinearBackwardArgs&) override;
  void matmul(const MatmulArgs&) override;
  void embedding(const EmbeddingArgs&) override;
  void embedding_backward(const EmbeddingBackwardArgs&) override;
  void rmsnorm(const RmsNormArgs&) override;
  void rmsnorm_backward(const RmsNormBackwardArgs&) override;
  void rope(const RopeArgs&) override;
  void attention(const AttentionArgs&) override;
  void attention_backward(const AttentionBackwardArgs&) override;
  void swiglu(const SwigluArgs&) override;
  void swiglu_backward(const SwigluBackwardArgs&) override;
  void router(const RouterArgs&) override;
  void router_backward(const RouterBackwardArgs&) override;
  void moe_sort(const MoeSortArgs&) override;
  void gather_rows(const GatherRowsArgs&) override;
  void scatter_add_rows(const ScatterAddRowsArgs&) override;
  void scatter_add_rows_backward(const ScatterAddRowsBackwardArgs&) override;
  void cross_entropy(const CrossEntropyArgs&) override;
  void add(const AddArgs&) override;
  void scale(const ScaleArgs&) override;
  void mul(const MulArgs&) override;
  void copy(const CopyArgs&) override;
  void fill(const FillArgs&) override;
  void copy_cols(const CopyColsArgs&) override;
  void sum_squares(const SumSquaresArgs&) override;
  void adamw(const AdamWArgs&) override;
};

namespace cpu {

// Row-major C[m,n] = alpha·op(A)·op(B) + beta·C with leading dimensions, through cblas_sgemm.
// Outside a parallel region, large products are split over num_threads() OpenMP threads; inside
// one, it runs in the calling thread.
void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
           int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// Rows [r0, r1) of weight w [N, K] (any weight dtype, FP8 with its block scales) as F32 into out
// (r1−r0)×K, converted in parallel.
void weight_rows_to_f32(const Tensor& w, const Tensor& scale_inv, int64_t r0, int64_t r1, float* out);

// Loops over fewer elements than this run in the calling thread: starting the team would cost
// more than the work (and far more on a loaded machine, where each barrier waits for a time slice).
// With SIMD row kernels, 2^17 elements take ~20-100 µs; a fork/join of passive OpenMP threads
// costs ~10-50 µs idle and more under load. (2^15 gave the tiny training step ~480 parallel
// regions; 2^17 with the GEMM threshold below gives ~260.)
constexpr int64_t kParallelMin = 1 << 17;

// Scratch that grows and is reused between calls (one per calling thread).
float* scratch(size_t n, int slot = 0);

// Writable data of an output tensor held in a const argument struct (tensors are handles).
template <class T> T* mut(const Tensor& t) { return const_cast<Tensor&>(t).data<T>(); }

// An op output that may be BF16 (ops.h says which): the kernels write F32 into f32() — the output
// itself, or a temporary that done() rounds into it (RNE, as Tensor::to).
class F32Out {
 public:
  explicit F32Out(const Tensor& out)
      : out_(out), f32_(out.dtype() == DType::F32 ? out : Tensor::empty(DType::F32, out.shape())) {}
  float* f32() const { return mut<float>(f32_); }
  void done() const {
    if (out_.dtype() == DType::F32) return;
    const Tensor r = f32_.to(out_.dtype());
    std::memcpy(const_cast<Tensor&>(out_).raw(), r.raw(), r.nbytes());
  }

 private:
  Tensor out_, f32_;
};

inline int64_t last_dim(const Tensor& t) { return t.ndim() ? t.dim(-1) : 1; }
inline int64_t rows_of(const Tensor& t) {
  int64_t l = last_dim(t);
  return l ? t.numel() / l : 0;
}

}  // namespace cpu
}  // namespace dsv3
