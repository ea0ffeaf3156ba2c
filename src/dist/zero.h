// ZeRO-1 (optimizer-state sharding, Rajbhandari et al. 2020, stage 1) over the data-parallel ranks:
// the parameters are seen as one flat array in slot order, cut into size() equal blocks; rank r
// keeps the AdamW moments of block r only and updates only that block of the master weights, then
// every rank's block is all-gathered so all ranks hold the whole (identical) parameters again.
// Gradients stay fully all-reduced (GradientAllReduce), so the global gradient norm is computed on
// every rank exactly as AdamW::grad_norm does, and clipping and the skip rule give the same factor
// as the unsharded optimizer. AdamW's update is elementwise, so every parameter gets the same bits
// as without sharding (tests/dist).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "dist/communicator.h"
#include "train/optimizer.h"

namespace dsv3 {

class ZeroAdamW {
 public:
  // slots: every trainable parameter (views of the model's weights and gradients), the same list on
  // every rank. loaded: a complete AdamW (e.g. read from a checkpoint) whose state this rank's
  // block takes; null for fresh moments.
  ZeroAdamW(Communicator& c, std::vector<ParamSlot> slots, OptimizerConfig cfg, Backend* be,
            const AdamW* loaded = nullptr);

  // As AdamW::step(lr, loss, grad_scale) over all slots (gradients already summed over the ranks),
  // followed by the all-gather of the updated parameters. Collective.
  StepReport step(double lr, double loss, double grad_scale);
  // The complete state as one AdamW over all slots on `root` (nullptr elsewhere). Collective.
  std::unique_ptr<AdamW> gather(int root);

  int64_t skipped_total() const { return shard_->skipped_total(); }
  int64_t updates() const { return shard_->updates(); }
  // Flat element range [begin, end) of this rank's block, and the moment bytes it holds.
  int64_t shard_begin() const { return begin_; }
  int64_t shard_end() const { return end_; }
  int64_t moment_bytes() const;
  // What one unsharded AdamW would hold (the same moment dtype).
  int64_t full_moment_bytes() const;

 private:
  struct Piece {
    size_t slot;
    int64_t begin, end;  // element range of the slot's tensor
    int64_t flat;        // position of `begin` in the flat array
  };
  double full_grad_norm(double grad_scale) const;
  void all_gather_params();

  Communicator& c_;
  std::vector<ParamSlot> slots_;
  std::vector<int64_t> offset_;  // flat position of each slot
  OptimizerConfig cfg_;
  Backend* be_;
  int64_t total_ = 0, block_ = 0, begin_ = 0, end_ = 0;
  std::vector<Piece> pieces_;
  std::unique_ptr<AdamW> shard_;  // over the pieces, clipping off (the global factor is passed in)
};

}  // namespace dsv3
