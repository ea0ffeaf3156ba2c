#include "infer/kv_cache.h"

#include <algorithm>
#include <cstring>
#include <sstream>

#include "core/error.h"

namespace dsv3 {

LatentKvPool::LatentKvPool(int64_t layers, int64_t kv_lora_rank, int64_t rope_dim, const KvCacheOptions& opt)
    : layers_(layers), kv_lora_(kv_lora_rank), rope_(rope_dim), block_size_(opt.block_size), dtype_(opt.dtype),
      host_storage_(opt.host_storage) {
  if (layers < 1 || kv_lora_rank < 1 || rope_dim < 0)
    internal_error("LatentKvPool: bad shape layers=", layers, " kv_lora_rank=", kv_lora_rank, " rope=", rope_dim);
  if (opt.block_size < 1 || opt.block_size > 65536)
    input_error("KV cache block size ", opt.block_size, " is out of range (expected 1..65536 tokens)");
  if (dtype_ != DType::F32 && dtype_ != DType::BF16)
    input_error("KV cache dtype ", dtype_name(dtype_), " is not supported (expected f32 or bf16)");
  num_blocks_ = int64_t(opt.budget_bytes / block_bytes());
  if (num_blocks_ < 1)
    input_error("KV cache budget of ", opt.budget_bytes, " bytes is smaller than one block of ", block_bytes(),
                " bytes (", block_size_, " tokens × ", bytes_per_token(), " bytes/token); raise the budget");
  const size_t n = size_t(num_blocks_) * size_t(layers_) * size_t(block_size_) * size_t(row_width());
  if (host_storage_ && dtype_ == DType::F32) f32_.assign(n, 0.0f);
  if (host_storage_ && dtype_ == DType::BF16) bf16_.assign(n, 0);
  free_.reserve(size_t(num_blocks_));
  for (int64_t b = num_blocks_ - 1; b >= 0; --b) free_.push_back(int32_t(b));
}

uint64_t LatentKvPool::bytes_per_token() const {
  return uint64_t(row_width()) * uint64_t(layers_) * uint64_t(dtype_size(dtype_));
}

std::string LatentKvPool::describe() const {
  std::ostringstream s;
  s << "KV cache: latent (" << kv_lora_ << " + " << rope_ << ") × " << layers_ << " layers × "
    << dtype_size(dtype_) << " bytes (" << dtype_name(dtype_) << ") = " << bytes_per_token() << " bytes/token; "
    << num_blocks_ << " blocks of " << block_size_ << " tokens (" << capacity_tokens() << " tokens, "
    << double(block_bytes()) * double(num_blocks_) / double(1 << 20) << " MiB)";
  return s.str();
}

bool LatentKvPool::reserve(BlockTable& t, int64_t tokens) {
  const int64_t need = blocks_for(tokens) - int64_t(t.blocks.size());
  if (need <= 0) return true;
  if (need > free_blocks()) return false;
  for (int64_t i = 0; i < need; ++i) {
    t.blocks.push_back(free_.back());
    free_.pop_back();
  }
  return true;
}

void LatentKvPool::truncate(BlockTable& t, int64_t len) {
  const int64_t keep = blocks_for(len);
  while (int64_t(t.blocks.size()) > keep) {
    free_.push_back(t.blocks.back());
    t.blocks.pop_back();
  }
  t.length = std::min(t.length, len);
}

void LatentKvPool::write(const BlockTable& t, int64_t layer, int64_t pos, const float* c_kv_n, const float* k_pe) {
  const int64_t bi = pos / block_size_;
  DSV3_CHECK(host_storage_ && pos >= 0 && bi < int64_t(t.blocks.size()) && layer >= 0 && layer < layers_, "pos ", pos,
             " layer ", layer);
  const size_t off = row_offset(t.blocks[size_t(bi)], layer, pos % block_size_);
  if (dtype_ == DType::F32) {
    std::memcpy(&f32_[off], c_kv_n, size_t(kv_lora_) * sizeof(float));
    std::memcpy(&f32_[off + size_t(kv_lora_)], k_pe, size_t(rope_) * sizeof(float));
  } else {
    for (int64_t i = 0; i < kv_lora_; ++i) bf16_[off + size_t(i)] = float_to_bf16(c_kv_n[i]);
    for (int64_t i = 0; i < rope_; ++i) bf16_[off + size_t(kv_lora_ + i)] = float_to_bf16(k_pe[i]);
  }
}

void LatentKvPool::read_rows(const BlockTable& t, int64_t layer, int64_t p0, int64_t n, float* out) const {
  const int64_t bi = p0 / block_size_, s0 = p0 % block_size_;
  DSV3_CHECK(host_storage_ && n >= 0 && s0 + n <= block_size_ && bi < int64_t(t.blocks.size()), "p0 ", p0, " n ", n);
  const size_t off = row_offset(t.blocks[size_t(bi)], layer, s0), W = size_t(row_width());
  if (dtype_ == DType::F32) {
    std::memcpy(out, &f32_[off], size_t(n) * W * sizeof(float));
  } else {
    for (size_t i = 0; i < size_t(n) * W; ++i) out[i] = bf16_to_float(bf16_[off + i]);
  }
}

const float* LatentKvPool::block_rows_f32(int32_t block, int64_t layer) const {
  DSV3_CHECK(host_storage_ && dtype_ == DType::F32 && block >= 0 && block < num_blocks_);
  return &f32_[row_offset(block, layer, 0)];
}

}  // namespace dsv3
