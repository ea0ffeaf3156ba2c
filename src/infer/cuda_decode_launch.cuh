// Host-side choices shared by the decode kernels' launchers (cuda_decode_ops.cu: the GEMV;
// cuda_decode_moe.cu: the experts): the tensor-core threshold, the k-split of the k-loop kernels,
// and which weights the vector and FP8 kernels read. CUDA sources only.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <initializer_list>
#include <string>

#include "backend/cuda/common.cuh"
#include "infer/cuda_decode_mma.cuh"
#include "model/model.h"

namespace dsv3::cuda {

constexpr int kDefaultMmaRows = 2;  // the tensor-core path from this many rows of x (measured: docs/cuda.md)

// 16-byte vectors per lane per pass: enough for the whole row up to 8 (K 1024 F32 / 2048 BF16).
inline int vectors_per_lane(int nv) { return nv <= 32 ? 1 : nv <= 64 ? 2 : nv <= 128 ? 4 : 8; }

// The tensor-core path's threshold (cuda_set_decode_mma_rows): steps of at least this many rows of x.
inline int& mma_rows_setting() {
  static int rows = [] {
    const char* e = std::getenv("DSV3_DECODE_MMA");
    return e && std::string(e) == "0" ? 0 : kDefaultMmaRows;
  }();
  return rows;
}
inline bool mma_wanted(int64_t n) { return mma_rows_setting() > 0 && n >= mma_rows_setting(); }

// An integer setting from the environment: one of `allowed`, else `def` (read once per caller).
inline int env_choice(const char* name, int def, std::initializer_list<int> allowed) {
  const char* e = std::getenv(name);
  const int v = e ? std::atoi(e) : def;
  return std::find(allowed.begin(), allowed.end(), v) != allowed.end() ? v : def;
}

// Warps per row block of gemv_mma_kernel / expert_mma_kernel (the shapes the row-range kernels do
// not take): the largest power of two ≤ kMmaWarps that leaves every warp at least 1 (GEMV) or 2
// (experts) k-blocks (bs-32 steps on the H200 before the row-range kernels: 1 / 2 1.87 ms, 2 / 4
// 1.86, 1 / 1 1.89, 4 / 1 2.22).
inline int mma_blocks_per_warp(bool experts) { return experts ? 2 : 1; }
inline int mma_ksplit(int K, bool experts) {
  const int nkb = (K + kMmaKb - 1) / kMmaKb, blocks = mma_blocks_per_warp(experts);
  int ks = 1;
  while (2 * ks <= kMmaWarps && 2 * ks * blocks <= nkb) ks *= 2;
  return ks;
}

// F32 or BF16 rows of whole 16-byte vectors, 16-byte aligned: what the vector kernels read.
inline bool vector_rows(const Tensor& w) {
  const DType t = w.dtype();
  return (t == DType::F32 || t == DType::BF16) && aligned16(w.raw()) && w.dim(1) % (t == DType::BF16 ? 8 : 4) == 0;
}
// An FP8 weight the tensor-core kernels take: 16-byte aligned rows of a multiple of 16 columns, and
// its F32 block scales [⌈N/128⌉, ⌈K/128⌉] on the device. DSV3_DECODE_FP8=0 at start-up leaves FP8
// weights to the backend's linear and MoE (for comparison).
inline bool fp8_rows(const LinearParam& p) {
  static const bool on = [] {
    const char* e = std::getenv("DSV3_DECODE_FP8");
    return !(e && std::string(e) == "0");
  }();
  const Tensor& w = p.w;
  const Tensor& s = p.scale_inv;
  return on && w.dtype() == DType::F8_E4M3 && w.ndim() == 2 && aligned16(w.raw()) && w.dim(1) % 16 == 0 && present(s) &&
         s.device() == Device::CUDA && s.dtype() == DType::F32 && s.ndim() == 2 && s.dim(0) == (w.dim(0) + 127) / 128 &&
         s.dim(1) == (w.dim(1) + 127) / 128;
}

}  // namespace dsv3::cuda
