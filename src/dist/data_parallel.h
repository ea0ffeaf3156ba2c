// Data parallelism: every rank runs the same model on its share of the global batch; gradients
// are summed over ranks and scaled, in buckets of consecutive tensors in the order given (the
// tensor table's order), so the summation order is fixed and every rank ends with identical bits
// (Communicator::all_reduce_sum). Gradients on a GPU stay there: the same reduce-scatter +
// all-gather runs on device buffers through NCCL, the chunks summed in rank order by the backend's
// add, so the bits are those of the host formula ((g₀ + g₁) + g₂) + …. Expert loads are summed exactly (integers) so every rank
// applies the same aux-loss-free bias update.
#pragma once
#include <cstdint>
#include <vector>

#include "backend/ops.h"
#include "core/tensor.h"
#include "dist/communicator.h"

namespace dsv3 {

class GradientAllReduce {
 public:
  // grads: F32 tensors, reduced in this order, all on the host or all on the GPU (which needs a
  // communicator that takes device buffers, unless it has one rank: then nothing is exchanged and
  // run only scales). bucket_bytes: ≥ 4 (one float), or 0 for the default of the gradients'
  // device (8 MiB on the host, 64 MiB on GPUs).
  GradientAllReduce(Communicator& c, std::vector<Tensor> grads, int64_t bucket_bytes = 0);
  // g ← scale · Σ_ranks g for every tensor (scale = 1/size for the mean over the global batch
  // when each rank's loss is the mean over its own equal share).
  void run(float scale);
  int64_t buckets() const { return int64_t(buckets_.size()); }
  int64_t floats() const { return total_; }

 private:
  struct Piece {
    size_t tensor;
    int64_t begin, end;  // float range of the tensor
  };
  Communicator& c_;
  std::vector<Tensor> grads_;
  std::vector<std::vector<Piece>> buckets_;
  int64_t total_ = 0;
  std::vector<float> buf_;
  Backend* dev_ = nullptr;  // the GPU backend when the gradients live there
  Tensor pack_, parts_;     // device: the packed bucket and the chunks arriving from each rank, [P · ⌈cap/P⌉] each
  void run_device(float scale);
};

// loads[layer][expert] ← Σ over ranks (exact).
void all_reduce_loads(Communicator& c, std::vector<std::vector<int64_t>>& loads);

// The contiguous share [begin, end) of `total` items that rank `rank` of `size` takes (equal shares
// when size divides total; InputError naming `what` otherwise, so no rank silently gets less).
std::pair<int64_t, int64_t> rank_share(int64_t total, int rank, int size, const char* what);

}  // namespace dsv3
