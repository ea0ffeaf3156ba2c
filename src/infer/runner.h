// ModelRunner: the model's forward for inference steps. A step is any set of rows (tokens at
// positions of one or more sequences); attention reads and extends a cache (infer/mla_absorbed.h)
// instead of recomputing the prefix, so one call serves chunked prefill, batched decode of many
// sequences of different lengths, and verification of speculative drafts.
//
// Built from the model's modules (model/model.h: parameters, RMSNorm/linear/MLP/MoE forwards, RoPE
// tables); only the attention differs from the plain forward. MTP module k runs as cache layer
// num_hidden_layers + k − 1, its hub layer index.
//
// On CUDA, steps of at most device_gemv_rows() rows run their F32, BF16 or FP8 linears through one GEMV
// kernel each (infer/cuda_decode_ops.h) instead of cuBLAS. Plain decode steps among them (forward
// with graph_ok: plain decode and draft verification) and MTP drafts (mtp_forward with graph_ok)
// are replayed from CUDA graphs (runner_graph.cpp): the step's ~16 launches per layer recorded
// once per launch shape and replayed with one call.
// Steps of at most small_rows() rows on the CPU backend (decode, draft verification, MTP drafts)
// take a lean path (runner_small.cpp): the same math on reused host buffers, F32 weights through
// row_linear (the weight streamed once for all rows, results independent of the row count), and
// the norms, RoPE, SwiGLU and the MoE combine inline — a decode step is ~150 small ops, and the
// per-op cost of the general path (validation, allocation, GEMM packing) is most of its time at
// batch 1. Other weight dtypes go through the backend's linear. Larger steps (prefill) use the
// backend ops throughout.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "infer/cuda_decode_ops.h"
#include "infer/mla_absorbed.h"
#include "model/model.h"

namespace dsv3 {

class ModelRunner {
 public:
  explicit ModelRunner(const Weights& w, Backend& be = cpu_backend());
  ~ModelRunner();
  ModelRunner(const ModelRunner&) = delete;
  ModelRunner& operator=(const ModelRunner&) = delete;

  // Row count up to which a step takes the lean path (0: never; tests compare the two paths).
  int64_t small_rows() const { return small_rows_; }
  void set_small_rows(int64_t n) { small_rows_ = n; }
  // CUDA: RoPE without the backend's range check and the grouped MoE for small steps (default on);
  // off gives the backend ops throughout (benchmarks measure what the synchronisations cost).
  void set_sync_free(bool on) { sync_free_ = on; }
  // CUDA: steps of up to this many rows (0..kDeviceGemvMaxRows, default the most) take the GEMV
  // kernels and, as decode steps, CUDA graphs; larger ones the backend's linears (cuBLASLt), eagerly.
  int64_t device_gemv_rows() const { return device_gemv_rows_; }
  void set_device_gemv_rows(int64_t n);
  static constexpr int64_t kDeviceGemvMaxRows = kCudaGemvMaxRows;
  // CUDA graphs for forward(…, graph_ok = true) (default off here; the engine turns them on unless
  // DSV3_CUDA_GRAPHS=0). A step's key — rows, the attention's launch shape, the addresses of the
  // inputs it reads, the settings that pick kernels — selects a graph; a key seen for the second
  // time is captured (the first runs eagerly: kernels loaded, shared-memory limits set); `keep`
  // graphs are kept, the least recently used dropped for a new one. A failed capture or launch
  // turns graphs off for good (graph_stats().error says why) and the step runs eagerly.
  void set_cuda_graphs(bool on, size_t keep = 4);
  struct GraphStats {
    int64_t replays = 0, captures = 0, eager = 0, failures = 0;
    int64_t verify_replays = 0;  // of the replays, main-model steps with several rows of one sequence
    int64_t mtp_replays = 0;     // of the replays, those of MTP modules
    bool disabled = false;       // graphs off for good (a failed capture of the main model, a failed replay)
    bool mtp_disabled = false;   // MTP graphs off for good (a failed capture of an MTP module)
    std::string error;
    size_t cached = 0, nodes = 0;  // graphs kept; nodes (kernels) of the latest capture
    size_t memory_bytes = 0;       // device memory the kept graphs hold
  };
  GraphStats graph_stats() const;
  // Tests: runs inside every capture (work on the legacy stream here makes the capture fail).
  std::function<void()> capture_hook;

  const ModelConfig& config() const { return cfg_; }
  const ModelDims& dims() const { return d_; }
  const ModelParams& params() const { return params_; }
  Backend& backend() { return be_; }
  int64_t num_layers() const { return cfg_.num_hidden_layers; }
  int64_t num_mtp() const { return int64_t(params_.mtp.size()); }
  const std::vector<AbsorbedKvB>& absorbed() const { return absorbed_; }

  struct Output {
    Tensor hidden;  // [N, H]: h⁰ after model.norm (main), or h^k before shared_head.norm (MTP)
    Tensor logits;  // [logit_rows, V] F32
  };
  // The main model on `tokens` (one per row). Logits only for the listed rows. graph_ok: a decode
  // step (every row its sequence's next token or a draft to verify, logits for every row) the
  // caller lets replay from a CUDA graph; its outputs then live in the graph's memory and hold their
  // values until the next step of the same launch shape.
  Output forward(AttentionCache& cache, const StepRows& rows, std::span<const int32_t> tokens,
                 std::span<const int32_t> logit_rows, bool graph_ok = false);
  // MTP module k (1-based): row r takes token tokens[r] (= t_{i+k}) and h_prev row r (= h^{k−1}_i);
  // h_prev on the host (the caller gathers its rows there). graph_ok: the caller lets it replay from a CUDA
  // graph. On CUDA's GEMV path (steps of at most device_gemv_rows() rows) the head computes every
  // row's logits and the listed ones are selected afterwards, graph or not (the head's kernel
  // depends on its row count, so drafts do not depend on whether graphs are on).
  Output mtp_forward(int k, AttentionCache& cache, const StepRows& rows, std::span<const int32_t> tokens,
                     const Tensor& h_prev, std::span<const int32_t> logit_rows, bool graph_ok = false);

 private:
  // One block on x. h1: its input_layernorm(x) when the previous block computed it (else undefined).
  // next_norm: the weight of the norm that follows (the next block's input_layernorm or the final
  // norm); the block may then set *next_h to it applied to its output (the grouped MoE's combine does).
  Tensor decoder_layer(int64_t layer, const LayerParams& p, const Tensor& x, const StepRows& rows,
                       const Tensor& positions, AttentionCache& cache, const Tensor& h1 = Tensor(),
                       const Tensor* next_norm = nullptr, Tensor* next_h = nullptr);
  Tensor head(const Tensor& normed, std::span<const int32_t> logit_rows);
  const RopeTables& rope_for(int64_t n);
  // The embedding rows of ids [N] (on CUDA without the range check: callers check ids on the host).
  Tensor embed(const Tensor& ids);
  // Everything after the uploads: embedding, layers, norm, head.
  Output forward_body(AttentionCache& cache, const StepRows& rows, const Tensor& ids, const Tensor& positions,
                      std::span<const int32_t> logit_rows);
  // MTP module k on device inputs (h_prev on the backend's device).
  Output mtp_body(int k, AttentionCache& cache, const StepRows& rows, const Tensor& ids, const Tensor& positions,
                  const Tensor& h_prev, std::span<const int32_t> logit_rows);
  // The step / the MTP module through a CUDA graph (runner_graph.cpp); nullopt: run it the usual way.
  std::optional<Output> forward_graph(AttentionCache& cache, const StepRows& rows, std::span<const int32_t> tokens,
                                      std::span<const int32_t> logit_rows);
  std::optional<Output> mtp_forward_graph(int k, AttentionCache& cache, const StepRows& rows,
                                          std::span<const int32_t> tokens, const Tensor& h_prev,
                                          std::span<const int32_t> every_row);
  // The listed rows of x [N, ·]: a view when they are consecutive, else gathered.
  Tensor select_rows(const Tensor& x, std::span<const int32_t> rows);
  // Puts the step's ids and positions (and grows the RoPE tables) where a replay reads them; appends
  // what else a replay depends on to key. nullopt: this step cannot replay.
  std::optional<std::pair<Tensor, Tensor>> graph_inputs(AttentionCache& cache, const StepRows& rows,
                                                        std::span<const int32_t> tokens, std::vector<int64_t>& key);
  // Replays the graph of key, captures it (a key seen before), or runs body eagerly.
  enum class GraphKind { Decode, Verify, Mtp };
  Output graph_step(std::vector<int64_t> key, const std::function<Output()>& body, GraphKind kind);
  struct GraphCache;
  struct DropGraphs {  // defined where GraphCache is (runner_graph.cpp)
    void operator()(GraphCache* g) const;
  };
  std::unique_ptr<GraphCache, DropGraphs> graphs_;  // null while graphs are off
  GraphStats gstats_;  // the counters; graph_stats() adds what the kept graphs hold
  // The step's token ids and positions in one upload ({ids, positions}, each [N] I32), the RoPE
  // tables grown to cover the positions.
  std::pair<Tensor, Tensor> ids_and_positions(std::span<const int32_t> tokens, const StepRows& rows);

  // The lean path (runner_small.cpp); x [N, H] in ws_.x, h⁰ / h^k left there.
  bool use_small(int64_t N) const { return N <= small_rows_ && be_.device() == Device::CPU; }
  Output forward_small(AttentionCache& cache, const StepRows& rows, std::span<const int32_t> tokens,
                       std::span<const int32_t> logit_rows);
  Output mtp_forward_small(int k, AttentionCache& cache, const StepRows& rows, std::span<const int32_t> tokens,
                           const Tensor& h_prev, std::span<const int32_t> logit_rows);
  void layer_small(int64_t layer, const LayerParams& p, int64_t N, const StepRows& rows, AttentionCache& cache);
  void mlp_small(const MlpParams& p, const float* x, int64_t N, float* out, bool accumulate);
  void moe_small(const MoeParams& p, const float* x, int64_t N, float* out);
  void lin(const LinearParam& p, const float* x, int64_t N, float* y);
  void rope_small(const StepRows& rows, float* x, int64_t heads, int64_t stride, int64_t offset);
  Output head_small(const float* normed, int64_t N, std::span<const int32_t> logit_rows);
  const float* f32_of(const Tensor& t);

  ModelConfig cfg_;
  Backend& be_;
  ModelDims d_;
  ModelParams params_;
  std::vector<AbsorbedKvB> absorbed_;  // main layers then MTP blocks
  // CUDA: routed experts' pointer tables per cache layer (empty where the grouped path does not
  // apply), used for steps of at most kDeviceMoeRows rows.
  std::vector<CudaMoeTables> moe_tables_;
  static constexpr int64_t kDeviceMoeRows = 512;
  bool sync_free_ = true;
  void rope(const Tensor& positions, const Tensor& x, int64_t offset);
  // linear_forward, or on CUDA for steps of at most device_gemv_rows_ rows cuda_small_linear.
  void linear(const LinearParam& p, const Tensor& x, const Tensor& y, bool accumulate = false);
  // The GEMV path; the RMSNorms fused into the first GEMVs only up to small_rows() rows (every CTA
  // computes the norms of its rows again).
  bool small_gemv(int64_t N) const {
    return be_.device() == Device::CUDA && sync_free_ && small_rows_ > 0 && N <= device_gemv_rows_;
  }
  int64_t device_gemv_rows_ = kDeviceGemvMaxRows;
  RopeCache rope_;
  int64_t small_rows_ = 8;
  // Lean-path buffers, grown on demand and reused across steps.
  struct Work {
    std::vector<float> x, h, cat, qa, q, kv, ckv, kpe, attn, o;  // layer
    std::vector<float> f1, f2, f3;                                 // MLP
    std::vector<float> logits, scores, weights, xs, ys, picks;     // MoE
    std::vector<int32_t> ids, rows;
  } ws_;
  std::unordered_map<const void*, std::vector<float>> f32_copies_;  // non-F32 norm weights and biases
};

}  // namespace dsv3
