// The inference engine: many sequences, one batched forward per step (continuous batching).
//
// Each step() the scheduler admits waiting sequences (FIFO) up to max_running, then gives every
// running sequence rows in one forward: the next chunk of its prompt (chunked prefill, at most
// prefill_chunk tokens, within max_step_tokens for the whole step) or, once prefilled, its last
// sampled token — plus, when speculating, the MTP drafts to verify (infer/spec_decode.h).
// Sequences join and leave between steps. Cache blocks are reserved before the forward; when the
// pool is exhausted the most recently admitted sequence is preempted: its blocks are freed, it
// goes back to the front of the queue, and on readmission its tokens (prompt and output so far)
// are prefilled again (recompute), so its output continues unchanged. Preemptions are reported in
// the step's events and counted in stats().
#pragma once
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "infer/kv_cache.h"
#include "infer/runner.h"
#include "infer/sampler.h"
#include "infer/spec_decode.h"

namespace dsv3 {

struct Request {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int64_t max_tokens = 16;
  std::vector<int32_t> stop_ids;         // e.g. EOS; a stop id ends the output and is not part of it
  std::vector<std::string> stop_strings;  // need EngineOptions::token_text
};

struct EngineOptions {
  KvCacheOptions cache;
  int64_t prefill_chunk = 512;     // prompt tokens one sequence feeds per step
  int64_t max_step_tokens = 2048;  // rows per step over all sequences
  int64_t max_running = 64;        // sequences decoding at once
  int draft_tokens = 0;            // MTP drafts per step (0: no speculation)
  int64_t max_context = 0;         // 0: max_position_embeddings
  int64_t n_valid = 0;             // ids ≥ n_valid are never sampled; 0: vocab_size
  bool all_logits = false;         // compute logits for every row (tests)
  bool sync_free = true;            // CUDA: the runner's synchronisation-free RoPE and MoE (ModelRunner::set_sync_free)
  int64_t small_rows = 8;          // steps of at most this many rows take the runner's lean path (0: never)
  bool cuda_graphs = true;         // CUDA: decode steps and MTP drafts replayed from graphs (DSV3_CUDA_GRAPHS=0: off)
  int64_t device_gemv_rows = ModelRunner::kDeviceGemvMaxRows;  // CUDA: ModelRunner::set_device_gemv_rows
  std::function<std::string(int32_t)> token_text;  // bytes of a token, for text output and stop strings
  // Tests: replace the MTP drafts of greedy sequences by (id, tokens so far, count) → drafts, so
  // verification paths (all kept, some kept) can be forced. The MTP modules still run.
  std::function<std::vector<int32_t>(int64_t, std::span<const int32_t>, size_t)> override_drafts;
};

struct SeqEvent {
  int64_t id = -1;
  std::vector<int32_t> tokens;  // new output tokens this step
  std::string text;             // new output text (complete UTF-8, stop strings held back)
  bool finished = false;
  std::string finish_reason;    // "stop" | "length"
  bool preempted = false;       // its cache was freed this step; it will be recomputed
};

struct EngineStats {
  int64_t steps = 0, prompt_tokens = 0, generated_tokens = 0, forward_rows = 0;
  int64_t preemptions = 0, recomputed_tokens = 0;
  SpecStats spec;
};

// On the CUDA backend (cuda_backend()) the engine copies the weights to the device, keeps the cache
// rows there (BF16, infer/cuda_latent_attention.h; the pool on the host only does the block
// accounting) and runs every forward on the device. Greedy steps without a repetition penalty or
// logits callback take the argmax on the device and read back one id per logits row (a sequence's
// next token, the main model's choice at each draft it verifies, an MTP module's draft); other
// steps read the logits back and sample on the host as on the CPU.
class Engine {
 public:
  Engine(const Weights& w, const EngineOptions& opt, Backend& be = cpu_backend());
  ~Engine();

  // Queue a request; returns its id. InputError for a prompt longer than the context, ids outside
  // the vocabulary, invalid sampling values, or a sequence that could never fit the cache pool.
  int64_t add(Request r);
  // One scheduler step; events for every sequence that produced tokens, finished or was preempted.
  std::vector<SeqEvent> step();
  bool has_work() const { return !running_.empty() || !waiting_.empty(); }
  // Run until every queued request is finished; returns all tokens per id (in add order).
  std::vector<std::vector<int32_t>> run_all();

  const EngineStats& stats() const { return stats_; }
  const LatentKvPool& pool() const { return *pool_; }
  const ModelRunner& runner() const { return runner_; }
  ModelRunner& runner() { return runner_; }
  bool on_device() const { return on_device_; }
  // Steps whose tokens came from the device argmax (one read-back of the ids each).
  int64_t device_greedy_steps() const { return device_greedy_steps_; }
  int64_t max_context() const { return max_context_; }
  int draft_tokens() const { return draft_; }
  // Called for every main-model logits row whose inputs are final: (id, position, logits[V]). While
  // it is set, every token and draft is chosen on the host from read-back logits.
  std::function<void(int64_t, int64_t, std::span<const float>)> on_logits;
  // Called with a sequence's drafts before their verification: (id, drafts).
  std::function<void(int64_t, std::span<const int32_t>)> on_drafts;

  struct Seq;

 private:
  void preempt(Seq& s, std::vector<SeqEvent>& ev);
  void draft(std::vector<Seq*>& spec, std::vector<std::vector<int32_t>>& drafts,
             std::vector<std::vector<std::vector<float>>>& qs);
  void emit(Seq& s, std::span<const int32_t> toks, SeqEvent& e);
  SeqEvent& event_for(std::vector<SeqEvent>& ev, int64_t id);
  // The attention cache of this device over the given sequences' block tables.
  AttentionCache& cache_with(std::vector<BlockTable*> tables);
  // A tensor of the runner's output on the host (a no-op on the CPU).
  Tensor host(const Tensor& t);

  EngineOptions opt_;
  Weights weights_;  // the model on the backend's device (a shallow copy when it is there already)
  ModelRunner runner_;
  std::unique_ptr<LatentKvPool> pool_;
  int64_t max_context_ = 0, n_valid_ = 0, next_id_ = 0, admit_order_ = 0;
  int draft_ = 0;
  bool on_device_ = false;
  int64_t device_greedy_steps_ = 0;
  std::unique_ptr<AttentionCache> cache_;      // the host's LatentAttention or the device's
  std::vector<BlockTable*>* tables_ = nullptr;  // its block tables, set per forward
  std::deque<std::unique_ptr<Seq>> waiting_;
  std::vector<std::unique_ptr<Seq>> running_;
  EngineStats stats_;
};

}  // namespace dsv3
