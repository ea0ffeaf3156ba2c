#include "dist/zero.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "backend/ops.h"

namespace dsv3 {

namespace {

Tensor flat_range(const Tensor& t, int64_t begin, int64_t end) { return t.reshape({t.numel()}).rows(begin, end); }

std::string piece_name(const std::string& slot, int64_t begin, int64_t end) {
  return cat(slot, "[", begin, ":", end, "]");
}

}  // namespace

ZeroAdamW::ZeroAdamW(Communicator& c, std::vector<ParamSlot> slots, OptimizerConfig cfg, Backend* be,
                     const AdamW* loaded)
    : c_(c), slots_(std::move(slots)), cfg_(cfg), be_(be) {
  if (!be_) internal_error("ZeroAdamW: needs a backend (the update and the norm run through it)");
  for (const ParamSlot& s : slots_) {
    if (s.param.device() != Device::CPU)
      internal_error("ZeroAdamW: parameter ", s.name, " is not in host memory (the all-gather is host-side)");
    offset_.push_back(total_);
    total_ += s.param.numel();
  }
  const int64_t P = c_.size();
  block_ = (total_ + P - 1) / P;
  begin_ = std::min(total_, int64_t(c_.rank()) * block_);
  end_ = std::min(total_, begin_ + block_);
  std::vector<ParamSlot> mine;
  for (size_t i = 0; i < slots_.size(); ++i) {
    const int64_t lo = std::max(begin_, offset_[i]), hi = std::min(end_, offset_[i] + slots_[i].param.numel());
    if (lo >= hi) continue;
    const Piece p{i, lo - offset_[i], hi - offset_[i], lo};
    pieces_.push_back(p);
    const ParamSlot& s = slots_[i];
    mine.push_back({piece_name(s.name, p.begin, p.end), flat_range(s.param, p.begin, p.end),
                    flat_range(s.grad, p.begin, p.end), s.decay});
  }
  OptimizerConfig shard_cfg = cfg_;
  shard_cfg.clip_norm = 0.0;  // the global clip factor is folded into grad_scale by step()
  shard_ = std::make_unique<AdamW>(std::move(mine), shard_cfg, be_);
  if (loaded) {
    std::map<std::string, Tensor> full;
    for (const AdamW::NamedState& s : loaded->state_tensors()) full[s.name] = s.tensor;
    std::map<std::string, Tensor> want;
    for (const Piece& p : pieces_)
      for (const char* suffix : {".exp_avg", ".exp_avg_sq"}) {
        const std::string& name = slots_[p.slot].name;
        auto it = full.find(name + suffix);
        if (it == full.end()) internal_error("ZeroAdamW: the loaded optimizer has no ", name, suffix);
        want[piece_name(name, p.begin, p.end) + suffix] = flat_range(be_->to_host(it->second), p.begin, p.end);
      }
    shard_->load_state(
        [&](const std::string& n) {
          auto it = want.find(n);
          return it == want.end() ? Tensor() : it->second;
        },
        loaded->state_json(), "ZeRO-1 shard of the loaded optimizer state");
  }
}

int64_t ZeroAdamW::moment_bytes() const { return 2 * (end_ - begin_) * int64_t(dtype_size(cfg_.moment_dtype)); }
int64_t ZeroAdamW::full_moment_bytes() const { return 2 * total_ * int64_t(dtype_size(cfg_.moment_dtype)); }

double ZeroAdamW::full_grad_norm(double grad_scale) const {
  // The same backend calls in the same order as AdamW::grad_norm over the same (full) gradients.
  Tensor acc = be_->alloc(DType::F32, Shape{1});
  be_->fill(FillArgs{acc, 0.0f});
  for (size_t i = 0; i < slots_.size(); ++i) be_->sum_squares(SumSquaresArgs{slots_[i].grad, acc, i > 0});
  const double total = double(be_->to_host(acc).data<float>()[0]);
  return std::abs(grad_scale) * std::sqrt(total);
}

StepReport ZeroAdamW::step(double lr, double loss, double grad_scale) {
  const double norm = full_grad_norm(grad_scale);
  double clip = 1.0;
  if (std::isfinite(norm) && cfg_.clip_norm > 0.0 && norm > cfg_.clip_norm) clip = cfg_.clip_norm / (norm + 1e-6);
  // A non-finite global norm must skip on every rank, whatever this rank's block holds.
  const double scale = std::isfinite(norm) ? grad_scale * clip : std::numeric_limits<double>::quiet_NaN();
  StepReport r = shard_->step(lr, loss, scale);
  r.grad_norm = norm;
  r.clip_scale = clip;
  if (r.applied) all_gather_params();
  return r;
}

void ZeroAdamW::all_gather_params() {
  std::vector<float> mine(size_t(block_), 0.0f), all(size_t(block_) * size_t(c_.size()));
  for (const Piece& p : pieces_) {
    const float* src = slots_[p.slot].param.data<float>() + p.begin;
    std::copy(src, src + (p.end - p.begin), mine.begin() + (p.flat - begin_));
  }
  c_.all_gather(mine.data(), all.data(), block_ * 4);
  for (size_t i = 0; i < slots_.size(); ++i) {
    float* dst = slots_[i].param.data<float>();
    std::copy(all.begin() + offset_[i], all.begin() + offset_[i] + slots_[i].param.numel(), dst);
  }
}

std::unique_ptr<AdamW> ZeroAdamW::gather(int root) {
  const size_t es = dtype_size(cfg_.moment_dtype);
  const std::vector<AdamW::NamedState> st = shard_->state_tensors();  // per piece: exp_avg, exp_avg_sq
  std::vector<std::vector<uint8_t>> flat(2);
  for (int k = 0; k < 2; ++k) {
    std::vector<uint8_t> mine(size_t(block_) * es, 0);
    for (size_t j = 0; j < pieces_.size(); ++j) {
      const Tensor h = be_->to_host(st[2 * j + size_t(k)].tensor);
      std::memcpy(mine.data() + size_t(pieces_[j].flat - begin_) * es, h.raw(), h.nbytes());
    }
    flat[size_t(k)].resize(mine.size() * size_t(c_.size()));
    c_.all_gather(mine.data(), flat[size_t(k)].data(), int64_t(mine.size()));
  }
  if (c_.rank() != root) return nullptr;
  auto full = std::make_unique<AdamW>(slots_, cfg_, be_);
  std::map<std::string, Tensor> by_name;
  for (size_t i = 0; i < slots_.size(); ++i)
    for (int k = 0; k < 2; ++k) {
      uint8_t* at = flat[size_t(k)].data() + size_t(offset_[i]) * es;
      by_name[slots_[i].name + (k ? ".exp_avg_sq" : ".exp_avg")] =
          Tensor::borrow(at, cfg_.moment_dtype, slots_[i].param.shape(), std::shared_ptr<void>(at, [](void*) {}));
    }
  full->load_state(
      [&](const std::string& n) {
        auto it = by_name.find(n);
        return it == by_name.end() ? Tensor() : it->second;
      },
      shard_->state_json(), "ZeRO-1 gathered optimizer state");
  return full;
}

}  // namespace dsv3
