// Decode steps on CUDA (plain ones and draft verification) and MTP drafts replayed from graphs
// (ModelRunner::set_cuda_graphs). A batch-1 step is ~200 launches whose host cost exceeds the GPU's
// time for them; a graph launch replaces them.
//
// What a replay reads must sit at the addresses the capture saw: the token ids and positions go to
// step_in (fixed, written before each step), an MTP module's h_prev to h_in, the attention's tables
// to its metadata buffer (AttentionCache::prepare_step), weights, RoPE tables and the latent pool
// stay where they are. Everything the host decides per step that changes a launch — the model or
// module, the row count, the attention's splits and tiles, those addresses, the kernel-selecting
// settings — is the key; steps that share a key differ only in the contents of those buffers, so
// the graph's kernels, arguments and order are the eager step's, and so are the results.
#include <algorithm>
#include <cstdlib>
#include <list>
#include <string>

#include "infer/runner.h"

#ifdef DSV3_HAVE_CUDA
#include "backend/cuda/graph.h"
#include "infer/cuda_latent_attention.h"
#endif

namespace dsv3 {

#ifdef DSV3_HAVE_CUDA
struct ModelRunner::GraphCache {
  struct Entry {
    std::vector<int64_t> key;
    std::unique_ptr<CudaGraph> graph;
    Output out;  // tensors in the graph's memory
  };
  std::list<Entry> entries;                // most recently used first
  std::list<std::vector<int64_t>> seen;    // keys run eagerly once, most recent first
  Tensor step_in;                          // I32 [2·kDeviceGemvMaxRows]: ids, then positions
  Tensor h_in;                             // F32 [kDeviceGemvMaxRows, H]: an MTP module's h_prev
  size_t keep = 4;
  static constexpr size_t kSeen = 16;
};
#else
struct ModelRunner::GraphCache {};
#endif

ModelRunner::~ModelRunner() = default;
void ModelRunner::DropGraphs::operator()(GraphCache* g) const { delete g; }

void ModelRunner::set_cuda_graphs(bool on, size_t keep) {
  const char* e = std::getenv("DSV3_CUDA_GRAPHS");
  on = on && be_.device() == Device::CUDA && !(e && std::string(e) == "0");
#ifndef DSV3_HAVE_CUDA
  on = false;
  (void)keep;
#endif
  if (!on) {
    graphs_.reset();
  } else if (!gstats_.disabled) {
    if (!graphs_) graphs_.reset(new GraphCache);
#ifdef DSV3_HAVE_CUDA
    graphs_->keep = std::max<size_t>(keep, 1);
    while (graphs_->entries.size() > graphs_->keep) graphs_->entries.pop_back();
#endif
  }
}

#ifndef DSV3_HAVE_CUDA
std::optional<ModelRunner::Output> ModelRunner::forward_graph(AttentionCache&, const StepRows&,
                                                              std::span<const int32_t>, std::span<const int32_t>) {
  return std::nullopt;
}
std::optional<ModelRunner::Output> ModelRunner::mtp_forward_graph(int, AttentionCache&, const StepRows&,
                                                                  std::span<const int32_t>, const Tensor&,
                                                                  std::span<const int32_t>) {
  return std::nullopt;
}
#else
std::optional<std::pair<Tensor, Tensor>> ModelRunner::graph_inputs(AttentionCache& cache, const StepRows& rows,
                                                                   std::span<const int32_t> tokens,
                                                                   std::vector<int64_t>& key) {
  const int64_t N = rows.size(), cap = kDeviceGemvMaxRows;
  if (N > cap || !cache.prepare_step(rows, key)) return std::nullopt;
  GraphCache& gc = *graphs_;
  int64_t mx = 0;
  for (int64_t p : rows.pos) mx = std::max(mx, p + 1);
  const RopeTables& t = rope_for(mx);
  if (!present(gc.step_in)) gc.step_in = be_.alloc(DType::I32, {2 * cap});
  std::vector<int32_t> in(size_t(cap + N), 0);
  std::copy(tokens.begin(), tokens.end(), in.begin());
  for (int64_t r = 0; r < N; ++r) in[size_t(cap + r)] = int32_t(rows.pos[size_t(r)]);
  cuda_copy_to_device(gc.step_in.raw(), in.data(), in.size() * sizeof(int32_t));
  auto addr = [](const Tensor& x) { return int64_t(reinterpret_cast<uintptr_t>(x.raw())); };
  key.insert(key.end(), {N, addr(t.cos), addr(t.sin), t.cos.numel(), addr(gc.step_in), int64_t(sync_free_),
                         small_rows_, int64_t(cuda_decode_mma_rows()), cuda_absorbed_gemv_rows(),
                         int64_t(cuda_decode_gemv_wide()), int64_t(cuda_decode_beside())});
  return std::pair{gc.step_in.rows(0, N), gc.step_in.rows(cap, cap + N)};
}

std::optional<ModelRunner::Output> ModelRunner::forward_graph(AttentionCache& cache, const StepRows& rows,
                                                              std::span<const int32_t> tokens,
                                                              std::span<const int32_t> logit_rows) {
  // Every row's logits in order (a decode step): no gather with an index upload.
  bool all = int64_t(logit_rows.size()) == rows.size();
  for (size_t i = 0; all && i < logit_rows.size(); ++i) all = logit_rows[i] == int32_t(i);
  std::vector<int64_t> key = {0};  // the main model
  const auto in = all ? graph_inputs(cache, rows, tokens, key) : std::nullopt;
  if (!in) return std::nullopt;
  const auto [ids, positions] = *in;
  bool verify = false;  // rows of a sequence are adjacent
  for (size_t r = 1; r < rows.seq.size(); ++r) verify = verify || rows.seq[r] == rows.seq[r - 1];
  return graph_step(std::move(key), [&] { return forward_body(cache, rows, ids, positions, logit_rows); },
                    verify ? GraphKind::Verify : GraphKind::Decode);
}

std::optional<ModelRunner::Output> ModelRunner::mtp_forward_graph(int k, AttentionCache& cache, const StepRows& rows,
                                                                  std::span<const int32_t> tokens,
                                                                  const Tensor& h_prev,
                                                                  std::span<const int32_t> every_row) {
  const int64_t N = rows.size(), H = d_.H;
  std::vector<int64_t> key = {k};  // MTP module k
  const auto in = graph_inputs(cache, rows, tokens, key);
  if (!in) return std::nullopt;
  const auto [ids, positions] = *in;
  GraphCache& gc = *graphs_;
  if (!present(gc.h_in)) gc.h_in = be_.alloc(DType::F32, {kDeviceGemvMaxRows, H});
  cuda_copy_to_device(gc.h_in.raw(), h_prev.data<float>(), size_t(N * H) * sizeof(float));
  const Tensor h = gc.h_in.rows(0, N);
  key.push_back(int64_t(reinterpret_cast<uintptr_t>(gc.h_in.raw())));
  return graph_step(
      std::move(key), [&] { return mtp_body(k, cache, rows, ids, positions, h, every_row); }, GraphKind::Mtp);
}

ModelRunner::Output ModelRunner::graph_step(std::vector<int64_t> key, const std::function<Output()>& body,
                                            GraphKind kind) {
  GraphCache& gc = *graphs_;
  auto turn_off = [&](const std::string& why) {
    gstats_.disabled = true;
    gstats_.error = why;
    graphs_.reset();  // after this step's eager run below, nothing refers to the graphs
  };
  auto eager = [&] {
    ++gstats_.eager;
    return body();
  };
  auto replay = [&](GraphCache::Entry& x) {
    if (!x.graph->launch()) {
      turn_off(x.graph->error());  // copies the reason before the graph goes
      return eager();
    }
    ++gstats_.replays;
    if (kind == GraphKind::Mtp) ++gstats_.mtp_replays;
    if (kind == GraphKind::Verify) ++gstats_.verify_replays;
    return x.out;
  };
  auto hit = std::find_if(gc.entries.begin(), gc.entries.end(),
                          [&](const GraphCache::Entry& x) { return x.key == key; });
  if (hit != gc.entries.end()) {
    gc.entries.splice(gc.entries.begin(), gc.entries, hit);
    return replay(gc.entries.front());
  }
  auto seen = std::find(gc.seen.begin(), gc.seen.end(), key);
  if (seen == gc.seen.end()) {
    gc.seen.push_front(key);
    if (gc.seen.size() > GraphCache::kSeen) gc.seen.pop_back();
    return eager();
  }
  gc.seen.erase(seen);
  // A new graph; the least recently used one goes (its memory once its outputs are dropped).
  while (gc.entries.size() >= gc.keep) gc.entries.pop_back();
  gc.entries.emplace_front();
  gc.entries.front().graph = std::make_unique<CudaGraph>();
  GraphCache::Entry& e = gc.entries.front();
  Output out;
  auto record = [&] {
    if (capture_hook) capture_hook();
    out = body();
  };
  bool captured = false;
  try {
    captured = e.graph->capture(record);
  } catch (...) {  // an error of earlier work (CudaGraph::capture): no entry is left for it
    gc.entries.pop_front();
    throw;
  }
  if (!captured) {
    ++gstats_.failures;
    if (kind != GraphKind::Mtp) {
      turn_off(e.graph->error());
      return eager();
    }
    // An MTP module that cannot be captured (an op of its own off the graph-safe path) leaves the
    // main model's graphs on.
    gstats_.mtp_disabled = true;
    gstats_.error = e.graph->error();
    gc.entries.pop_front();
    return eager();
  }
  ++gstats_.captures;
  gstats_.nodes = e.graph->nodes();
  e.key = std::move(key);
  e.out = out;
  return replay(e);
}
#endif

ModelRunner::GraphStats ModelRunner::graph_stats() const {
  GraphStats s = gstats_;
#ifdef DSV3_HAVE_CUDA
  if (graphs_) {
    s.cached = graphs_->entries.size();
    for (const GraphCache::Entry& x : graphs_->entries) s.memory_bytes += x.graph->memory_bytes();
  }
#endif
  return s;
}

}  // namespace dsv3
