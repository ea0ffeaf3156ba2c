// The CUDA backend: every op of ops.h on one NVIDIA GPU (built for sm_90a). Tensors live in device
// memory from a caching allocator; kernels run on the legacy default stream (or the thread's
// cuda::stream(), stream.h: the experts' lanes below, a graph capture), so to_host and to_device
// order themselves after queued work without explicit events. Numbers are FP32 like the
// CPU reference (cuBLAS SGEMM with TF32 off), so the generic harness compares both under kF32.
// This header has no CUDA types: tests and benchmarks include it from plain C++.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "backend/fp8.h"
#include "backend/ops.h"

namespace dsv3 {

class CudaBackend final : public Backend {
 public:
  CudaBackend();
  Device device() const override { return Device::CUDA; }
  std::string name() const override { return "cuda"; }
  Tensor alloc(DType t, const Shape& s) override;
  Tensor to_device(const Tensor& host) override;
  Tensor to_host(const Tensor& t) override;
  void synchronize() override;

  void linear(const LinearArgs&) override;
  void linear_backward(const LinearBackwardArgs&) override;
  void grouped_linear(const GroupedLinearArgs&) override;
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
  void adamw_many(std::span<const AdamWArgs>) override;
  void fill_many(std::span<const FillArgs>) override;
  void copy_many(std::span<const CopyArgs>) override;
  void sum_squares_many(std::span<const Tensor> xs, const Tensor& out, bool accumulate) override;
  // Lanes are CUDA streams (DSV3_CUDA_LANES, default 4; 1 turns them off), taken in turn by lane(i).
  // Only launch sites that take cuda::stream() follow a lane (the cuBLASLt GEMMs among them); the
  // rest stay on the legacy stream, which the lane streams synchronise with. Memory freed inside a
  // lane scope goes back to the caching allocator at end_lanes, after the join, so no lane reuses a
  // block another lane may still be using.
  void begin_lanes() override;
  void lane(int64_t i) override;
  void end_lanes() override;
};

// The caching allocator's bytes: blocks handed out now (tensors and scratch, in whole blocks; a block
// freed inside a lane scope counts as free), their most since the last reset, and what it holds from
// cudaMalloc (handed out or cached).
struct CudaMemoryStats {
  size_t in_use = 0, peak = 0, reserved = 0;
};
CudaMemoryStats cuda_memory_stats();
void cuda_reset_peak_memory();  // peak = in_use

// The number of lane streams (CudaBackend::begin_lanes), 0 to 8; below 2 turns lanes off. Not
// inside a lane scope. Tests and benchmarks compare with and without.
void cuda_set_lanes(int n);
int cuda_lanes();  // 0 when off

// Bytes of BF16 weight terms an FP8 grouped_linear writes at once (default 256 MiB; each block
// takes 4 bytes per weight, and at least one block is written whatever the budget). Tests set it
// low to run the blocks in several runs.
void cuda_set_fp8_terms_budget(size_t bytes);

// Tests: every op's device scratch (Scratch) is filled with 0xFF bytes (NaN as F32 and BF16) when
// it is taken, so an op that reads scratch it never wrote produces NaN. Off by default.
void cuda_set_scratch_poison(bool on);

// The process-wide CUDA backend (registers the CUDA allocator with core on first use).
// Throws InputError when no CUDA device is usable.
CudaBackend& cuda_backend();
// Number of visible CUDA devices (0 when the driver or device is missing; never throws).
int cuda_device_count();

// FP8 on the GPU, same contracts as backend/fp8.h but on CUDA tensors.
// quantize: Fp32 reference semantics of quantize_fp8 (non-finite inputs are counted, never thrown).
Fp8Status cuda_quantize_fp8(const QuantizeFp8Args& args);
// c[M,N] (+)= (qa·sa)·(qb·sb)ᵀ through cuBLASLt's block-scaled FP8 matmul: a scaled per 1×128
// (VEC128_32F), b per 128×128 (BLK128x128_32F) or per 1×128. K must be a multiple of 128 and M, N
// multiples of 16 (cuBLASLt's requirement for these scale modes); c F32 or BF16. Fp32 accum only.
void cuda_fp8_gemm(const Fp8GemmArgs& args);

}  // namespace dsv3
