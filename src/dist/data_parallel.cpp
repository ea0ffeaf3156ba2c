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
  buf_.resize(size_t(std::min(cap, std::max<int64_t>(total_, 1))));
}

void GradientAllReduce::run(float scale) {
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
