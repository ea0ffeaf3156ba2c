#include "dist/data_parallel.h"

#include <algorithm>

namespace dsv3 {

GradientAllReduce::GradientAllReduce(Communicator& c, std::vector<Tensor> grads, int64_t bucket_bytes)
    : c_(c), grads_(std::move(grads)) {
  const bool on_gpu = !grads_.empty() && grads_[0].device() != Device::CPU;
  for (const Tensor& g : grads_)
    if ((g.device() != Device::CPU) != on_gpu) internal_error("GradientAllReduce: gradients on two devices");
  // Each GPU bucket costs two synchronizing NCCL calls: fewer, larger ones there.
  if (bucket_bytes <= 0) bucket_bytes = on_gpu ? int64_t(64) << 20 : int64_t(8) << 20;
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
  if (on_gpu) dev_ = &backend_named("cuda");
  if (c_.size() == 1) return;  // nothing to exchange: run() only scales, in place
  const int64_t len = std::min(cap, std::max<int64_t>(total_, 1));
  if (!on_gpu) {
    buf_.resize(size_t(len));
    return;
  }
  if (!c_.device_buffers())
    internal_error("GradientAllReduce: GPU gradients need a communicator that takes device buffers (NCCL), got ",
                   c_.name());
  const int64_t chunk = (len + c_.size() - 1) / c_.size();
  pack_ = dev_->alloc(DType::F32, {int64_t(c_.size()) * chunk});
  parts_ = dev_->alloc(DType::F32, {int64_t(c_.size()) * chunk});
  dev_->fill(FillArgs{pack_, 0.0f});  // a bucket's padding tail travels too: defined, never used
}

namespace {
Tensor flat(const Tensor& t, int64_t begin, int64_t end) { return t.reshape({t.numel()}).rows(begin, end); }
}  // namespace

// As the host's all_reduce_sum, on device buffers: pack the bucket, cut it into P equal chunks
// (the last padded), all-to-all so that rank r holds every rank's chunk r, add them in rank order,
// all-gather the sums, unpack.
void GradientAllReduce::run_device(float scale) {
  const int P = c_.size();
  for (const auto& bucket : buckets_) {
    int64_t n = 0;
    for (const Piece& p : bucket) {
      dev_->copy(CopyArgs{flat(grads_[p.tensor], p.begin, p.end), flat(pack_, n, n + p.end - p.begin)});
      n += p.end - p.begin;
    }
    const int64_t chunk = (n + P - 1) / P;
    const std::vector<int64_t> bytes(static_cast<size_t>(P), chunk * int64_t(sizeof(float)));
    c_.all_to_all_v(pack_.raw(), bytes, parts_.raw(), bytes);
    const Tensor sum = flat(parts_, 0, chunk);
    for (int r = 1; r < P; ++r) dev_->add(AddArgs{sum, flat(parts_, r * chunk, (r + 1) * chunk), sum});
    c_.all_gather(sum.raw(), pack_.raw(), chunk * int64_t(sizeof(float)));
    n = 0;
    for (const Piece& p : bucket) {
      const Tensor src = flat(pack_, n, n + p.end - p.begin), dst = flat(grads_[p.tensor], p.begin, p.end);
      if (scale == 1.0f)
        dev_->copy(CopyArgs{src, dst});
      else
        dev_->scale(ScaleArgs{src, dst, scale});
      n += p.end - p.begin;
    }
  }
}

void GradientAllReduce::run(float scale) {
  // One rank: the sum is the gradient itself. No packing, no collective (on the GPU each bucket
  // would cost two synchronizing NCCL calls); s·g in place is what the reduction's last step
  // writes, bit for bit.
  if (c_.size() == 1) {
    if (scale == 1.0f) return;
    for (const Tensor& g : grads_) {
      if (dev_) {
        dev_->scale(ScaleArgs{g, g, scale});
      } else {
        float* p = const_cast<float*>(g.data<float>());
        for (int64_t i = 0; i < g.numel(); ++i) p[i] = p[i] * scale;
      }
    }
    return;
  }
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
