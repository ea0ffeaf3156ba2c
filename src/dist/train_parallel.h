// The trainer's view of several ranks (TrainParallel, src/train/trainer.h) over a Communicator:
// data parallel over every rank of `world`, expert parallel inside groups of `ep` consecutive ranks
// (each group holds every expert once; the groups are data-parallel replicas of each other), and
// optionally ZeRO-1. See docs/distributed.md ("Training on several ranks").
#pragma once
#include <cstdint>
#include <memory>

#include "dist/communicator.h"
#include "dist/expert_parallel.h"
#include "dist/zero.h"
#include "train/trainer.h"

namespace dsv3 {

struct TrainParallelOptions {
  int ep = 1;                      // EP group size: divides the world size and n_routed_experts
  EpOptions ep_options;            // node-limited routing, two-hop dispatch, FP8 dispatch
  bool zero1 = false;              // shard AdamW's moments and update over the ranks
  int64_t bucket_bytes = 0;        // gradient all-reduce bucket; 0: the device's default (GradientAllReduce)
};

// InputError (on every rank) when the options do not fit the world or the model.
std::unique_ptr<TrainParallel> make_train_parallel(Communicator& world, const TrainParallelOptions& o,
                                                   const ModelConfig& model);

// What the implementation measured, for reports and tests (null pointers when not in use).
struct TrainParallelInfo {
  const ZeroAdamW* zero = nullptr;
  const EpStats* ep = nullptr;
  const Communicator* ep_comm = nullptr;
};
TrainParallelInfo train_parallel_info(const TrainParallel& p);

}  // namespace dsv3
