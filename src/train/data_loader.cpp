#include "train/data_loader.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "core/rng.h"
#include "io/checksum.h"

namespace dsv3 {

namespace {

std::string with_commas(uint64_t v) {
  const std::string digits = std::to_string(v);
  std::string out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

nlohmann::json read_json_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) input_error(path, ": cannot open (is this a dataset directory from `dsv3 data prepare`?)");
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    return nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::exception& e) {
    input_error(path, ": not valid JSON: ", e.what());
  }
}

}  // namespace

TokenDataset TokenDataset::open(const std::string& dir, const std::string& split) {
  const std::string meta_path = dir + "/" + kDatasetFileName;
  nlohmann::json meta = read_json_file(meta_path);
  TokenDataset ds;
  try {
    if (meta.at("format").get<std::string>() != "dsv3-token-dataset")
      input_error(meta_path, ": field 'format' is not \"dsv3-token-dataset\"");
    if (meta.at("version").get<int>() != 1)
      input_error(meta_path, ": field 'version' is ", meta.at("version"), ", expected 1");
    ds.vocab_size_ = meta.at("vocab_size").get<uint64_t>();
    const auto& splits = meta.at("splits");
    if (!splits.contains(split))
      input_error(meta_path, ": has no split '", split, "' (it has ", splits.size(), " splits)");
    const auto& sp = splits.at(split);
    for (const auto& sh : sp.at("shards")) {
      std::string file = sh.at("file").get<std::string>();
      if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..")
        input_error(meta_path, ": shard file name '", file, "' must be a plain file name");
      TokenShard s = TokenShard::open(dir + "/" + file);
      if (s.size() != sh.at("tokens").get<uint64_t>())
        input_error(meta_path, ": shard ", file, " has ", s.size(), " tokens, the description says ",
                    sh.at("tokens").get<uint64_t>());
      if (crc_hex(s.info().data_crc) != sh.at("crc32").get<std::string>())
        input_error(meta_path, ": shard ", file, " has checksum ", crc_hex(s.info().data_crc),
                    ", the description says ", sh.at("crc32").get<std::string>(),
                    " (a shard from another preparation?)");
      if (s.info().vocab_size != ds.vocab_size_)
        input_error(meta_path, ": shard ", file, " has vocabulary size ", s.info().vocab_size,
                    ", the description says ", ds.vocab_size_);
      ds.shards_.push_back(std::move(s));
    }
  } catch (const nlohmann::json::exception& e) {
    input_error(meta_path, ": ", e.what());
  }
  if (ds.shards_.empty()) input_error(meta_path, ": split '", split, "' lists no shards");
  return ds;
}

TokenDataset TokenDataset::from_shards(const std::vector<std::string>& paths) {
  TokenDataset ds;
  if (paths.empty()) input_error("a token dataset needs at least one shard");
  for (const auto& p : paths) {
    TokenShard s = TokenShard::open(p);
    if (ds.shards_.empty()) ds.vocab_size_ = s.info().vocab_size;
    if (s.info().vocab_size != ds.vocab_size_)
      input_error(p, ": vocabulary size ", s.info().vocab_size, " differs from ", paths.front(),
                  "'s ", ds.vocab_size_);
    ds.shards_.push_back(std::move(s));
  }
  return ds;
}

uint64_t TokenDataset::tokens() const {
  uint64_t n = 0;
  for (const auto& s : shards_) n += s.size();
  return n;
}

std::string TokenDataset::describe() const {
  return cat(shards_.size(), shards_.size() == 1 ? " shard, " : " shards, ", with_commas(tokens()),
             " tokens, vocabulary ", vocab_size_);
}

nlohmann::json SamplerState::to_json() const {
  return {{"seed", seed}, {"epoch", epoch}, {"index", index}};
}

SamplerState SamplerState::from_json(const nlohmann::json& j, const std::string& where) {
  SamplerState s;
  try {
    s.seed = j.at("seed").get<uint64_t>();
    s.epoch = j.at("epoch").get<uint64_t>();
    s.index = j.at("index").get<uint64_t>();
  } catch (const nlohmann::json::exception& e) {
    input_error(where, ": data position: ", e.what());
  }
  return s;
}

BatchSampler::BatchSampler(const TokenDataset& data, int64_t batch, int64_t seq_len, uint64_t seed,
                           bool shuffle)
    : data_(&data), batch_(batch), seq_len_(seq_len), shuffle_(shuffle) {
  if (batch < 1 || seq_len < 1)
    input_error("batch size ", batch, " and sequence length ", seq_len, " must be ≥ 1");
  for (const auto& s : data.shards()) {
    first_window_.push_back(total_windows_);
    // Windows start at k·T and need T+1 tokens.
    uint64_t n = s.size() > uint64_t(seq_len) ? (s.size() - 1) / uint64_t(seq_len) : 0;
    total_windows_ += n;
  }
  if (total_windows_ < uint64_t(batch))
    input_error("the data (", data.describe(), ") has only ", total_windows_, " windows of ",
                seq_len + 1, " tokens, fewer than one batch of ", batch,
                "; use more text or a smaller batch/sequence length");
  state_.seed = seed;
  shuffle_epoch();
}

void BatchSampler::shuffle_epoch() {
  order_.clear();
  if (!shuffle_) return;
  order_.resize(total_windows_);
  for (uint64_t i = 0; i < total_windows_; ++i) order_[i] = i;
  for (uint64_t i = total_windows_; i > 1; --i) {
    uint64_t j = rng_u64(state_.seed, 0xda7a0000ull + state_.epoch, i) % i;
    std::swap(order_[i - 1], order_[j]);
  }
}

uint64_t BatchSampler::window_at(uint64_t slot) const { return shuffle_ ? order_[slot] : slot; }

void BatchSampler::locate(uint64_t window, size_t* shard, uint64_t* start) const {
  auto it = std::upper_bound(first_window_.begin(), first_window_.end(), window);
  // Shards with no windows share a prefix value; upper_bound lands past all of them.
  size_t s = size_t(it - first_window_.begin()) - 1;
  *shard = s;
  *start = (window - first_window_[s]) * uint64_t(seq_len_);
}

Tensor BatchSampler::next() {
  Tensor out = Tensor::empty(DType::I32, Shape{batch_, seq_len_ + 1});
  int32_t* p = out.data<int32_t>();
  for (int64_t b = 0; b < batch_; ++b) {
    if (state_.index == total_windows_) {
      ++state_.epoch;
      state_.index = 0;
      shuffle_epoch();
    }
    size_t shard;
    uint64_t start;
    locate(window_at(state_.index++), &shard, &start);
    data_->shards()[shard].read(start, uint64_t(seq_len_) + 1, p + b * (seq_len_ + 1));
  }
  return out;
}

void BatchSampler::restore(const SamplerState& s, const std::string& where) {
  if (s.seed != state_.seed)
    input_error(where, ": data sampler seed ", s.seed, " differs from this run's ", state_.seed,
                " (resume with the same --seed)");
  if (s.index > total_windows_)
    input_error(where, ": data position ", s.index, " is past the ", total_windows_,
                " windows of an epoch of this dataset (a different dataset or sequence length?)");
  bool new_epoch = s.epoch != state_.epoch;
  state_ = s;
  if (new_epoch) shuffle_epoch();
}

void BatchSampler::rewind() {
  bool new_epoch = state_.epoch != 0;
  state_.epoch = 0;
  state_.index = 0;
  if (new_epoch) shuffle_epoch();
}

}  // namespace dsv3
