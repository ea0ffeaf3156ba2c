// Batches of token windows for training and validation.
//
// A prepared dataset is a directory written by `dsv3 data prepare`:
//   dataset.json   {"format": "dsv3-token-dataset", "version": 1, "vocab_size": V,
//                   "dtype": "U16"|"I32", "eos_token_id": E|null, "tokenizer": "...",
//                   "splits": {"train": {"tokens": N, "documents": D,
//                                        "shards": [{"file": "train-00000.tok", "tokens": n,
//                                                    "crc32": "xxxxxxxx"}, ...]},
//                              "val": {...}},
//                   "sources": [{"file": "...", "bytes": B, "split": "train"|"val"}, ...]}
//   *.tok          token shards (io/token_dataset.h)
//
// Sampling: each shard is cut into windows of T+1 tokens starting at multiples of T (consecutive
// windows share one token, so every token is a target exactly once per epoch). An epoch visits
// every window of every shard once, in an order that is a pure function of (seed, epoch): a
// Fisher–Yates shuffle driven by the counter-based RNG. The position is (epoch, index within the
// epoch), so saving and restoring it resumes the exact sequence of batches.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "core/tensor.h"
#include "io/token_dataset.h"

namespace dsv3 {

constexpr const char* kDatasetFileName = "dataset.json";

// The shards of one split.
class TokenDataset {
 public:
  // Open split `split` ("train" or "val") of the dataset directory `dir`: reads dataset.json and
  // every shard it lists, and checks each shard's size, checksum and vocabulary against it.
  static TokenDataset open(const std::string& dir, const std::string& split);
  // A dataset of explicit shard files (all must share one vocabulary size).
  static TokenDataset from_shards(const std::vector<std::string>& paths);

  uint64_t vocab_size() const { return vocab_size_; }
  uint64_t tokens() const;
  const std::vector<TokenShard>& shards() const { return shards_; }
  std::string describe() const;  // "3 shards, 1,234,567 tokens"

 private:
  std::vector<TokenShard> shards_;
  uint64_t vocab_size_ = 0;
};

struct SamplerState {
  uint64_t seed = 0;
  uint64_t epoch = 0;
  uint64_t index = 0;  // windows already taken in this epoch
  nlohmann::json to_json() const;
  static SamplerState from_json(const nlohmann::json& j, const std::string& where);
};

class BatchSampler {
 public:
  // shuffle=false visits windows in file order (validation: the same batches every time).
  BatchSampler(const TokenDataset& data, int64_t batch, int64_t seq_len, uint64_t seed,
               bool shuffle = true);

  // The next [batch, seq_len+1] I32 tensor: inputs are [:, :T], targets [:, 1:].
  Tensor next();
  uint64_t windows_per_epoch() const { return total_windows_; }
  const SamplerState& state() const { return state_; }
  // Continue from a saved position. InputError when it does not fit this dataset and seed.
  void restore(const SamplerState& s, const std::string& where);
  // Back to the start of epoch 0 (validation passes).
  void rewind();

 private:
  uint64_t window_at(uint64_t slot) const;  // window id at position `slot` of the current epoch
  void locate(uint64_t window, size_t* shard, uint64_t* start) const;
  void shuffle_epoch();

  const TokenDataset* data_;
  int64_t batch_, seq_len_;
  bool shuffle_;
  std::vector<uint64_t> first_window_;  // prefix sums of windows per shard
  uint64_t total_windows_ = 0;
  std::vector<uint64_t> order_;  // this epoch's permutation (empty when not shuffling)
  SamplerState state_;
};

}  // namespace dsv3
