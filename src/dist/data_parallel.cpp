#include "dist/data_parallel.h"

#include <algorithm>

namespace dsv3 {

GradientAllReduce::GradientAllReduce(Communicator& c, std::vector<Tensor> grads, int64_t bucket_bytes)
    : c_(c), grads_(std::move(grads)) {
  const int64_t cap = std::max<int64_t>(1, bucket_bytes / 4);
  std::vector<Piece> cur;
  int64_t fill = 0;
  for (size_t i = 0; i < grads_.size(); ++i) {
    if (grads_[i].dtype() != DType::F32) internal_error("GradientAllReduce: tensor ", i, " is not F32");
    const int64_t n = grads_[i].numel();
    total_ += n;
    for (int64_t b = 0; b < n;) {
      const int64_t take = std::min(n - b, cap - fill);
      cur.push_back({i, b, b + take});
      b += take;
      fill += take;
      if (fill == cap) {
        buckets_.push_back(std::move(cur));
        cur.clear();
        fill = 0;
      }
    }
  }
  if (!cur.empty()) buckets_.push_back(std::move(cur));
  const int64_t len = std::min(cap, std::max<int64_t>(total_, 1));
  const bool on_gpu = !grads_.empty() && grads_[0].device() != Device::CPU;
  for (const Tensor& g : grads_)
    if ((g.device() != Device::CPU) != on_gpu) internal_error("GradientAllReduce: gradients on two devices");
  if (!on_gpu) {
    buf_.resize(size_t(len));
    return;
  }
  if (!c_.device_buffers())
    internal_error("GradientAllReduce: GPU gradients need a communicator that takes device buffers (NCCL), got ",
                   c_.name());
  dev_ = &backend_named("cuda");
  send_ = dev_->alloc(DType::F32, {len});
  gathered_ = dev_->alloc(DType::F32, {int64_t(c_.size()) * len});
}

namespace {
Tensor flat(const Tensor& t, int64_t begin, int64_t end) { return t.reshape({t.numel()}).rows(begin, end); }
}  // namespace

// Pack on the device, all-gather, then Σ_r in rank order into the pack buffer and scatter it back.
void GradientAllReduce::run_device(float scale) {
  const int P = c_.size();
  for (const auto& bucket : buckets_) {
    int64_t n = 0;
    for (const Piece& p : bucket) {
      dev_->copy(CopyArgs{flat(grads_[p.tensor], p.begin, p.end), flat(send_, n, n + p.end - p.begin)});
      n += p.end - p.begin;
    }
    c_.all_gather(send_.raw(), gathered_.raw(), n * int64_t(sizeof(float)));
    const Tensor sum = flat(send_, 0, n);
    if (P == 1) dev_->copy(CopyArgs{flat(gathered_, 0, n), sum});
    for (int r = 1; r < P; ++r)
      dev_->add(AddArgs{r == 1 ? flat(gathered_, 0, n) : sum, flat(gathered_, r * n, (r + 1) * n), sum});
    n = 0;
    for (const Piece& p : bucket) {
      const Tensor src = flat(send_, n, n + p.end - p.begin), dst = flat(grads_[p.tensor], p.begin, p.end);
      if (scale == 1.0f)
        dev_->copy(CopyArgs{src, dst});
      else
        dev_->scale(ScaleArgs{src, dst, scale});
      n += p.end - p.begin;
    }
  }
}

void GradientAllReduce::run(float scale) {
  if (dev_) return run_device(scale);
  for (const auto& bucket : buckets_) {
    int64_t n = 0;
    for (const Piece& p : bucket) {
      const float* g = grads_[p.tensor].data<float>();
      std::copy(g + p.begin, g + p.end, buf_.begin() + n);
      n += p.end - p.begin;
    }
    c_.all_reduce_sum(std::span<float>(buf_.data(), size_t(n)));
    n = 0;
    for (const Piece& p : bucket) {
      float* g = const_cast<float*>(grads_[p.tensor].data<float>());
      for (int64_t i = p.begin; i < p.end; ++i) g[i] = scale == 1.0f ? buf_[size_t(n++)] : buf_[size_t(n++)] * scale;
    }
  }
}

void all_reduce_loads(Communicator& c, std::vector<std::vector<int64_t>>& loads) {
  std::vector<int64_t> flat;
  for (auto& l : loads) flat.insert(flat.end(), l.begin(), l.end());
  c.all_reduce_sum(std::span<int64_t>(flat));
  size_t k = 0;
  for (auto& l : loads)
    for (auto& v : l) v = flat[k++];
}

std::pair<int64_t, int64_t> rank_share(int64_t total, int rank, int size, const char* what) {
  if (total % size != 0) input_error(what, " ", total, ": must be a multiple of the number of data-parallel ranks ", size);
  const int64_t n = total / size;
  return {int64_t(rank) * n, int64_t(rank + 1) * n};
}

}  // namespace dsv3
