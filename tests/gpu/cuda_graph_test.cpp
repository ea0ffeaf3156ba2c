// CUDA graphs: CudaGraph on its own (replays read their inputs where the capture saw them, a launch
// on the legacy stream or a step marked unsafe fails the capture without running anything, graph
// memory is never handed to other tensors) and the engine's decode steps replayed from graphs
// against the same engine with eager launches: the same kernels in the same order, so every logit
// of every step is bit-identical — over contexts that cross the attention's split changes and its
// partial-merge mode, sequences joining and leaving, one row and several, F32 and BF16 weights.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <set>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/graph.h"
#include "infer/cuda_decode_ops.h"
#include "infer/engine.h"
#include "model/presets.h"

namespace dsv3::test {
namespace {

Tensor host_f32(std::initializer_list<float> v) {
  Tensor t = Tensor::empty(DType::F32, {int64_t(v.size())});
  std::copy(v.begin(), v.end(), t.data<float>());
  return t;
}

std::vector<float> values(const Tensor& dev) {
  const Tensor h = cuda_backend().to_host(dev);
  return std::vector<float>(h.data<float>(), h.data<float>() + h.numel());
}

TEST(CudaGraph, ReplayReadsInputsInPlaceAndKeepsOutputs) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  const Tensor a = be.to_device(host_f32({1, 2, 3, 4})), b = be.to_device(host_f32({10, 20, 30, 40}));
  Tensor out;
  CudaGraph g;
  ASSERT_TRUE(g.capture([&] {
    Tensor t = be.alloc(DType::F32, {4});  // freed inside the capture
    AddArgs s{a, b, t};
    be.add(s);
    out = be.alloc(DType::F32, {4});
    s.a = t;
    s.b = a;
    s.out = out;
    be.add(s);  // out = 2a + b
  })) << g.error();
  EXPECT_GE(g.nodes(), 2u);
  EXPECT_GT(g.memory_bytes(), 0u);
  ASSERT_TRUE(g.launch()) << g.error();
  EXPECT_EQ(values(out), (std::vector<float>{12, 24, 36, 48}));
  const float next[4] = {-1, 0.5f, 7, 100};
  cuda_copy_to_device(const_cast<Tensor&>(a).raw(), next, sizeof next);
  ASSERT_TRUE(g.launch()) << g.error();
  EXPECT_EQ(values(out), (std::vector<float>{8, 21, 44, 240}));
}

TEST(CudaGraph, LegacyStreamWorkFailsTheCaptureAndNothingRuns) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  const Tensor a = be.to_device(host_f32({1, 2})), out = be.to_device(host_f32({5, 5}));
  CudaGraph g;
  EXPECT_FALSE(g.capture([&] {
    AddArgs s{a, a, out};
    be.add(s);
    cuda_graph_test_legacy_work();  // a launch site that ignores cuda::stream()
  }));
  EXPECT_FALSE(g.ready());
  EXPECT_FALSE(g.error().empty());
  EXPECT_FALSE(g.launch());
  EXPECT_EQ(values(out), (std::vector<float>{5, 5}));  // the captured add never ran
  // The backend works eagerly afterwards, and so does a new capture.
  AddArgs s{a, a, out};
  be.add(s);
  EXPECT_EQ(values(out), (std::vector<float>{2, 4}));
  ASSERT_TRUE(g.capture([&] { be.add(s); })) << g.error();
  ASSERT_TRUE(g.launch());
  EXPECT_EQ(values(out), (std::vector<float>{2, 4}));
}

TEST(CudaGraph, UnsafeMarkAndExceptionsFailTheCapture) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  const Tensor a = be.to_device(host_f32({1}));
  AddArgs s{a, a, a};
  CudaGraph g;
  EXPECT_FALSE(g.capture([&] {
    be.add(s);
    cuda_graph_mark_unsafe("test");
  }));
  EXPECT_NE(g.error().find("test"), std::string::npos) << g.error();
  EXPECT_FALSE(g.capture([&] {
    be.add(s);
    input_error("thrown inside");
  }));
  EXPECT_NE(g.error().find("thrown inside"), std::string::npos) << g.error();
  EXPECT_FALSE(cuda_graph_capturing());
  cuda_graph_mark_unsafe("outside a capture: no effect");
  EXPECT_EQ(values(a), (std::vector<float>{1}));
}

// An error left pending by earlier work that nobody checked is raised by the next capture, not
// taken for that capture's failure (which would turn graphs off and drop it); raising consumes it.
TEST(CudaGraph, PendingErrorOfEarlierWorkIsRaisedNotDropped) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  const Tensor a = be.to_device(host_f32({3}));
  AddArgs s{a, a, a};
  CudaGraph g;
  ASSERT_TRUE(g.capture([&] { be.add(s); })) << g.error();  // an instance the raising capture replaces
  cuda_graph_test_unchecked_bad_launch();
  bool ran = false;
  try {
    g.capture([&] { ran = true; });
    ADD_FAILURE() << "the pending error was not raised";
  } catch (const InternalError& e) {
    EXPECT_NE(std::string(e.what()).find("earlier, unchecked work"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(ran);
  EXPECT_FALSE(g.ready());
  ASSERT_TRUE(g.capture([&] { be.add(s); })) << g.error();
  ASSERT_TRUE(g.launch());
  EXPECT_EQ(values(a), (std::vector<float>{6}));  // captures run nothing: only the one launch doubled it
}

TEST(CudaGraph, MemoryIsNeverHandedToOtherTensors) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  const int64_t n = 1000;
  Tensor x = be.alloc(DType::F32, {n});
  FillArgs f;
  f.x = x;
  f.value = 3.0f;
  be.fill(f);
  std::set<const void*> graph_blocks;
  Tensor out;
  CudaGraph g;
  ASSERT_TRUE(g.capture([&] {
    for (int i = 0; i < 5; ++i) {  // four temporaries freed during the capture, then the output kept
      Tensor t = be.alloc(DType::F32, {n});
      graph_blocks.insert(t.raw());
      AddArgs s{x, x, t};
      be.add(s);
      if (i == 4) out = t;
    }
  })) << g.error();
  // Tensors of the same sizes allocated (and freed, and allocated again) afterwards never land in
  // the graph's blocks; writing them does not disturb a replay.
  std::vector<Tensor> others;
  for (int i = 0; i < 16; ++i) {
    others.push_back(be.alloc(DType::F32, {n}));
    EXPECT_EQ(graph_blocks.count(others.back().raw()), 0u) << "tensor " << i;
    if (i % 4 == 3) others.erase(others.begin());
  }
  for (Tensor& t : others) {
    FillArgs z;
    z.x = t;
    z.value = -9.0f;
    be.fill(z);
  }
  ASSERT_TRUE(g.launch());
  const std::vector<float> got = values(out);
  EXPECT_TRUE(std::all_of(got.begin(), got.end(), [](float v) { return v == 6.0f; }));
}

// ---- the engine ----------------------------------------------------------------------------------

// Every logits row the engine computes (by sequence and position) and the outputs.
struct Trace {
  std::map<std::pair<int64_t, int64_t>, std::vector<float>> logits;
  std::vector<std::vector<int32_t>> tokens;
  ModelRunner::GraphStats graphs;
  int64_t device_greedy_steps = 0;
  SpecStats spec;
  std::map<int64_t, std::vector<int32_t>> drafts;  // per sequence, every draft proposed, in order
};

// Requests that join (max_running) and leave (max_tokens) at different times, prompts from 3 to
// `long_prompt` tokens.
std::vector<Request> mixed_requests(int64_t long_prompt, uint64_t salt) {
  std::vector<Request> reqs;
  const int64_t lens[] = {3, 40, long_prompt, 17, 9};
  const int64_t news[] = {70, 25, 45, 30, 60};
  for (int i = 0; i < 5; ++i) {
    Request r;
    for (int64_t j = 0; j < lens[i]; ++j)
      r.prompt.push_back(int32_t(((uint64_t(lens[i]) * salt + uint64_t(j)) * 2654435761u >> 9) % 4096));
    r.sampling.temperature = 0.0f;
    r.max_tokens = news[i];
    reqs.push_back(r);
  }
  return reqs;
}

Trace run_engine(const Weights& w, const std::vector<Request>& reqs, bool graphs, bool with_logits,
                 int64_t max_running, std::function<void()> hook = nullptr, size_t keep = 4, int drafts = 0,
                 int64_t block_size = 16, const EngineOptions& base = {}) {
  EngineOptions opt = base;
  opt.cache.block_size = block_size;
  opt.max_running = max_running;
  opt.cuda_graphs = graphs;
  opt.draft_tokens = drafts;
  Engine e(w, opt, cuda_backend());
  if (graphs) e.runner().set_cuda_graphs(true, keep);
  e.runner().capture_hook = std::move(hook);
  Trace t;
  if (with_logits)
    e.on_logits = [&](int64_t id, int64_t pos, std::span<const float> l) {
      t.logits[{id, pos}] = std::vector<float>(l.begin(), l.end());
    };
  e.on_drafts = [&](int64_t id, std::span<const int32_t> d) {
    t.drafts[id].insert(t.drafts[id].end(), d.begin(), d.end());
  };
  for (const Request& r : reqs) e.add(r);
  t.tokens = e.run_all();
  t.graphs = e.runner().graph_stats();
  t.device_greedy_steps = e.device_greedy_steps();
  t.spec = e.stats().spec;
  return t;
}

void expect_identical(const Trace& eager, const Trace& graph) {
  EXPECT_EQ(graph.tokens, eager.tokens);
  ASSERT_EQ(graph.logits.size(), eager.logits.size());
  int64_t rows_differ = 0;
  for (const auto& [k, v] : eager.logits) {
    const auto it = graph.logits.find(k);
    ASSERT_NE(it, graph.logits.end());
    if (it->second.size() != v.size() || std::memcmp(it->second.data(), v.data(), v.size() * sizeof(float)) != 0)
      ++rows_differ;
  }
  EXPECT_EQ(rows_differ, 0) << "logits rows not bit-identical, of " << eager.logits.size();
}

// The engine on reqs eagerly and with graphs, all else equal: graphs stay on (and replay, when
// `replays`) and give the same tokens and logits. Returns the graph run.
Trace expect_graphs_match_eager(const Weights& w, const std::vector<Request>& reqs, int64_t max_running,
                                size_t keep = 4, int drafts = 0, bool replays = true, int64_t block_size = 16) {
  const Trace eager = run_engine(w, reqs, false, true, max_running, nullptr, keep, drafts, block_size);
  const Trace graph = run_engine(w, reqs, true, true, max_running, nullptr, keep, drafts, block_size);
  EXPECT_EQ(eager.graphs.replays, 0);
  EXPECT_FALSE(graph.graphs.disabled) << graph.graphs.error;
  if (replays) {
    EXPECT_GT(graph.graphs.replays, 0);
  }
  expect_identical(eager, graph);
  return graph;
}

ModelConfig long_tiny() {
  ModelConfig c = preset_config("tiny");
  c.max_position_embeddings = 2048;  // room for contexts past 16 tiles of 32 (the partials merge)
  return c;
}

TEST(CudaGraphEngine, LogitsBitIdenticalToEagerF32) {
  ASSERT_GT(cuda_device_count(), 0);
  const Weights w = Weights::random(long_tiny(), 7, 0.05f);
  const std::vector<Request> reqs = mixed_requests(530, 31);
  // One graph kept: every new key drops the last graph, whose outputs the engine has read.
  for (auto [running, keep] : {std::pair<int64_t, size_t>{1, 4}, {3, 4}, {3, 1}}) {
    SCOPED_TRACE(cat("max_running ", running, ", graphs kept ", keep));
    const Trace graph = expect_graphs_match_eager(w, reqs, running, keep);
    EXPECT_EQ(graph.graphs.failures, 0);
    EXPECT_GT(graph.graphs.captures, 3);
    EXPECT_GT(graph.graphs.replays, graph.graphs.eager) << "most decode steps should replay";
  }
}

TEST(CudaGraphEngine, LogitsBitIdenticalToEagerBf16TensorCores) {
  ASSERT_GT(cuda_device_count(), 0);
  Weights w = Weights::random(long_tiny(), 8, 0.05f);
  round_matrices_to_bf16(w);
  const std::vector<Request> reqs = mixed_requests(300, 57);
  const int saved = cuda_decode_mma_rows();
  for (int mma : {saved, 1}) {
    SCOPED_TRACE(cat("tensor cores from ", mma, " rows"));
    cuda_set_decode_mma_rows(mma);
    expect_graphs_match_eager(w, reqs, 4);
    cuda_set_decode_mma_rows(saved);
  }
}

// FP8 weights (the matrices V3's release stores so): decode steps take the FP8 tensor-core GEMV and
// experts, and replay bit-identically to eager launches.
TEST(CudaGraphEngine, LogitsBitIdenticalToEagerFp8) {
  ASSERT_GT(cuda_device_count(), 0);
  Weights w = Weights::random(long_tiny(), 13, 0.05f);
  quantize_matrices_to_fp8(w);
  const Trace graph = expect_graphs_match_eager(w, mixed_requests(300, 59), 4);
  EXPECT_EQ(graph.graphs.failures, 0);
  EXPECT_GT(graph.graphs.replays, graph.graphs.eager) << "most decode steps should replay";
}

// V3's latent shape (kv_lora_rank 512 + rope 64, 64-token blocks) decodes through cuda_mla_decode,
// whose split partials are graph memory: its steps replay too, bit-identical to eager ones, with
// one split and with several (a 300-token prompt: 5 blocks).
TEST(CudaGraphEngine, MlaDecodeShapeReplaysBitIdenticalToEager) {
  ASSERT_GT(cuda_device_count(), 0);
  ModelConfig c = long_tiny();
  c.kv_lora_rank = 512;
  c.qk_rope_head_dim = 64;
  Weights w = Weights::random(c, 12, 0.05f);
  round_matrices_to_bf16(w);
  const std::vector<Request> reqs = mixed_requests(300, 63);
  const Trace graph = expect_graphs_match_eager(w, reqs, 3, 4, 0, true, 64);
  EXPECT_EQ(graph.graphs.failures, 0);
  EXPECT_GT(graph.graphs.replays, graph.graphs.eager) << "most decode steps should replay";
}

// The engine's usual greedy path (argmax on the device, ids read back) over graph outputs.
TEST(CudaGraphEngine, DeviceGreedyTokensEqualEager) {
  ASSERT_GT(cuda_device_count(), 0);
  const Weights w = Weights::random(long_tiny(), 9, 0.05f);
  const std::vector<Request> reqs = mixed_requests(100, 77);
  const Trace eager = run_engine(w, reqs, false, false, 5);
  const Trace graph = run_engine(w, reqs, true, false, 5);
  EXPECT_GT(graph.device_greedy_steps, 0);
  EXPECT_GT(graph.graphs.replays, 0);
  EXPECT_EQ(graph.tokens, eager.tokens);
}

// Steps of more than 32 rows (eager) before replayed ones: the same tokens and logits as eagerly.
// Then an engine with MTP speculation over 12 sequences: verification steps of 24 rows and the MTP
// module's drafts replay too.
TEST(CudaGraphEngine, WideStepsAndMtpEqualEager) {
  ASSERT_GT(cuda_device_count(), 0);
  const Weights w = Weights::random(long_tiny(), 11, 0.05f);
  // 40 sequences leaving in groups of 8 every 6 tokens: decode steps of 40, 32, 24, 16 and 8 rows.
  std::vector<Request> reqs;
  for (int i = 0; i < 40; ++i) {
    Request r;
    for (int j = 0; j < 2 + i % 7; ++j) r.prompt.push_back(int32_t((uint64_t(i * 131 + j) * 2654435761u >> 9) % 4096));
    r.sampling.temperature = 0.0f;
    r.max_tokens = 4 + 6 * (i / 8);
    reqs.push_back(r);
  }
  expect_graphs_match_eager(w, reqs, 64);
  const std::vector<Request> few(reqs.begin(), reqs.begin() + 12);
  const Trace spec = expect_graphs_match_eager(w, few, 64, 8, 1);
  EXPECT_GT(spec.graphs.mtp_replays, 0);
}

// Speculation at batch 1 and 3 with drafts forced to the plain greedy output (all kept: the MTP
// module then runs two rows per sequence) or wrong at every second position (some kept), one and
// three drafts (module 1 reused beyond the first): verification steps and drafts replay from graphs,
// with the eager run's tokens and logits; without the logits callback, the verification's argmax
// on the device gives the same tokens. (Not compared with the plain run: its 1-row steps take the
// GEMVs' F32 path, the verification's rows tensor cores.) Then the MTP module's own drafts, by the
// device argmax and by the host.
TEST(CudaGraphEngine, SpeculationReplaysVerificationAndDrafts) {
  ASSERT_GT(cuda_device_count(), 0);
  const Weights w = Weights::random(long_tiny(), 13, 0.05f);
  std::vector<Request> reqs = mixed_requests(90, 101);
  reqs.resize(3);
  const Trace plain = run_engine(w, reqs, false, false, 3);
  struct Case {
    int64_t running;
    int drafts;
    bool corrupt;
  };
  // Each value of each setting with both values of the other two (half the eight combinations).
  for (const Case c : {Case{1, 1, false}, Case{1, 3, true}, Case{3, 1, true}, Case{3, 3, false}}) {
    SCOPED_TRACE(cat("max_running ", c.running, ", drafts ", c.drafts, c.corrupt ? ", corrupted" : ", perfect"));
    EngineOptions o;
    o.override_drafts = [&](int64_t id, std::span<const int32_t> toks, size_t n) {
      const std::vector<int32_t>& want = plain.tokens[size_t(id)];
      const size_t done = toks.size() - reqs[size_t(id)].prompt.size();
      std::vector<int32_t> d;
      for (size_t i = 0; i < n; ++i) {
        int32_t t = done + i < want.size() ? want[done + i] : 0;
        if (c.corrupt && i % 2 == 1) t = (t + 1) % 4096;
        d.push_back(t);
      }
      return d;
    };
    const Trace eager = run_engine(w, reqs, false, true, c.running, nullptr, 8, c.drafts, 16, o);
    const Trace graph = run_engine(w, reqs, true, true, c.running, nullptr, 8, c.drafts, 16, o);
    ASSERT_EQ(graph.spec.accepted.size(), size_t(c.drafts));
    EXPECT_GT(graph.spec.accepted[0], 0) << "no draft kept";
    EXPECT_FALSE(graph.graphs.disabled) << graph.graphs.error;
    EXPECT_EQ(graph.graphs.failures, 0);
    EXPECT_GT(graph.graphs.mtp_replays, 0);
    EXPECT_GT(graph.graphs.verify_replays, 0);
    expect_identical(eager, graph);
    const Trace ids = run_engine(w, reqs, true, false, c.running, nullptr, 8, c.drafts, 16, o);
    EXPECT_EQ(ids.tokens, eager.tokens);
    EXPECT_EQ(ids.spec.accepted, graph.spec.accepted);
    EXPECT_GT(ids.graphs.verify_replays, 0);
  }
  // The MTP module's own drafts: chosen by the device argmax (no logits callback) they are the
  // host's greedy choices (with one), graphs on or off.
  for (int drafts : {1, 3}) {
    SCOPED_TRACE(cat("MTP drafts ", drafts));
    const Trace host = run_engine(w, reqs, true, true, 3, nullptr, 8, drafts);
    const Trace dev = run_engine(w, reqs, true, false, 3, nullptr, 8, drafts);
    const Trace dev_eager = run_engine(w, reqs, false, false, 3, nullptr, 8, drafts);
    ASSERT_FALSE(host.drafts.empty());
    EXPECT_EQ(dev.drafts, host.drafts);
    EXPECT_EQ(dev_eager.drafts, host.drafts);
    EXPECT_EQ(dev.tokens, host.tokens);
    EXPECT_GT(dev.graphs.mtp_replays, 0);
  }
}

// A launch site outside the capture stream fails the capture: the runner turns graphs off for good
// and runs every step eagerly, with the same results.
TEST(CudaGraphEngine, FailedCaptureFallsBackToEager) {
  ASSERT_GT(cuda_device_count(), 0);
  const Weights w = Weights::random(long_tiny(), 10, 0.05f);
  const std::vector<Request> reqs = mixed_requests(60, 91);
  const Trace eager = run_engine(w, reqs, false, true, 2);
  const Trace failed = run_engine(w, reqs, true, true, 2, [] { cuda_graph_test_legacy_work(); });
  EXPECT_TRUE(failed.graphs.disabled);
  EXPECT_EQ(failed.graphs.failures, 1);
  EXPECT_EQ(failed.graphs.replays, 0);
  EXPECT_FALSE(failed.graphs.error.empty());
  expect_identical(eager, failed);
}

}  // namespace
}  // namespace dsv3::test
