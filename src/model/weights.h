// A model's parameters, bound by hub name from the tensor table (model/tensor_table.h).
//
// Each parameter keeps the dtype it was stored in (F32, BF16, F16, or F8_E4M3 with its F32
// `<name>_scale_inv` block scales) and, when loaded from a checkpoint, stays memory-mapped: the ops
// convert inside, so the resident size of a loaded model is about the size of its files.
//
// Three ways to get one:
//   load(dir)           an HF checkpoint directory: config.json + model.safetensors or a sharded
//                       model.safetensors.index.json. Every mismatch between the files and the table
//                       (missing, unexpected, mis-shaped, wrong dtype, FP8 without its scales) is
//                       reported in ONE InputError that lists each tensor by name.
//   random(config, ..)  seeded initialisation for training: matrices N(0, std²), norms 1, router bias
//                       0, all F32. Each tensor draws from its own counter-based stream (keyed by its
//                       name), so the values do not depend on thread count or table order.
//   from_tensors(..)    tensors built in memory (tests, conversion).
// save(dir) writes the hub layout (config.json + safetensors, sharded when large), including the
// copies of the shared embedding and head that the hub stores under each MTP layer.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"
#include "model/tensor_table.h"

namespace dsv3 {

// One parameter as stored. For F8_E4M3, scale_inv is F32 [ceil(rows/128), ceil(cols/128)] and
// element (r, c) is fp8(w[r,c]) × scale_inv[r/128, c/128]; otherwise scale_inv is absent.
struct Param {
  TensorSpec spec;
  Tensor w;
  Tensor scale_inv;
  bool fp8() const { return w.dtype() == DType::F8_E4M3; }
};

struct LoadOptions {
  // Progress lines on stderr; printed only when the checkpoint holds at least this many bytes.
  bool progress = true;
  uint64_t progress_min_bytes = uint64_t(1) << 30;
};

struct SaveOptions {
  DType dtype = DType::F32;  // F32, BF16 or F16 for every tensor (the router bias always F32)
  // Store the projections the hub release stores in FP8 (TensorSpec::fp8) as F8_E4M3 with 128×128
  // block scales (amax/448 per block), as DeepSeek-V3's release does.
  bool fp8 = false;
  uint64_t max_shard_bytes = uint64_t(5) << 30;
};

class Weights {
 public:
  static Weights load(const std::string& dir, const LoadOptions& opt = {});
  static Weights random(const ModelConfig& config, uint64_t seed, float std = 0.006f);
  // Bind in-memory tensors by hub name (same checks and error as load; `where` names the source).
  static Weights from_tensors(const ModelConfig& config, std::map<std::string, Tensor> tensors,
                              const std::string& where = "tensors");

  void save(const std::string& dir, const SaveOptions& opt = {}) const;

  const ModelConfig& config() const { return config_; }
  const std::vector<Param>& params() const { return params_; }
  std::vector<Param>& params() { return params_; }
  // The parameter of a hub name; nullptr when the table has no such tensor (or it is a shared copy
  // that resolves to the main tensor: see get()).
  const Param* find(const std::string& name) const;
  Param* find(const std::string& name);
  // Like find, but an InternalError when absent. Shared copies (MTP embed_tokens / shared_head.head)
  // resolve to the main tensor they copy.
  const Param& get(const std::string& name) const;

  // Bytes the parameters occupy (weights and scales), mapped or owned: the resident size.
  uint64_t resident_bytes() const;
  const std::string& source() const { return source_; }

 private:
  void index();

  ModelConfig config_;
  std::vector<Param> params_;  // table order; shared copies are not held (they resolve to main tensors)
  std::map<std::string, size_t, std::less<>> by_name_;
  std::string source_;
};

// The F32 matrices (2-D parameters) rounded to BF16 in place, as a BF16 checkpoint stores them;
// norms and the router bias (1-D) stay F32, FP8/BF16 tensors as stored.
void round_matrices_to_bf16(Weights& w);
// The matrices as the hub's FP8 release holds them: those it stores in F8_E4M3 (TensorSpec::fp8)
// quantized in place with quantize_fp8_blocks, the other F32 matrices (embeddings, lm_head, the
// router's gate) rounded to BF16; norms and the router bias stay F32.
void quantize_matrices_to_fp8(Weights& w);

// DeepSeek-V3's block quantization of a 2-D weight: per 128×128 block, scale = amax/448 (1 for an
// all-zero block), q = e4m3(w / scale). Returns {q F8_E4M3 [R, C], scale_inv F32 [ceil(R/128), ceil(C/128)]}.
std::pair<Tensor, Tensor> quantize_fp8_blocks(const Tensor& w);
// The F32 values an F8_E4M3 weight and its block scales stand for.
Tensor dequantize_fp8_blocks(const Tensor& q, const Tensor& scale_inv);

}  // namespace dsv3
