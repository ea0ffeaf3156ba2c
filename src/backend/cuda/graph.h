// CUDA graphs of host-launched work (the decode step's ~200 small kernels, whose launch calls are
// most of a batch-1 step's host time). Plain C++ header, no CUDA types.
//
// CudaGraph::capture runs a function once under stream capture: cuda::stream() is a private
// blocking stream while it runs, so every launch site that takes stream() is recorded instead of
// run, and one that does not (the legacy stream) is refused by CUDA — a blocking stream's capture
// makes the legacy stream unusable — which fails the capture instead of running the work early.
// Capture mode is thread-local: synchronising calls of this thread (cudaMalloc, cudaMemcpy) fail
// it too. The allocator core uses for CUDA tensors is swapped for the capture (process-wide: one
// capture at a time in the process; other threads' tensors meanwhile come from the allocator
// registered before, which is registered again afterwards). CUDA tensors the capturing thread
// allocates meanwhile come from memory
// owned by the graph: a block freed during the capture is reused by later allocations of the same capture (as
// the caching allocator would), and none goes back to the backend's allocator while the graph
// lives — every replay writes the same addresses. Tensors allocated during the capture and kept
// (the step's outputs) therefore hold the values of the latest replay.
//
// Work that is not safe to capture although it would be recorded without an error (device scratch
// taken from the backend's caching allocator and handed back at once: cuda::Scratch marks itself,
// and the runner marks the ops it knows to use cuBLAS) calls cuda_graph_mark_unsafe(), which fails
// the capture in progress.
#pragma once
#include <cstddef>
#include <functional>
#include <memory>
#include <string>

namespace dsv3 {

class CudaGraph {
 public:
  CudaGraph();
  ~CudaGraph();
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;

  // Records fn's device work and instantiates it. false (reason in error()) when the capture or the
  // instantiation failed or fn threw: then none of fn's device work ran (its host side effects did)
  // and the graph holds no instance. A new capture replaces an earlier instance (always a new
  // instance: cudaGraphExecUpdate is not used, since a kernel's cluster shape is a launch attribute
  // the key may change). Throws InternalError, capturing nothing (the earlier instance is gone too),
  // when a CUDA error of earlier work that nobody checked is pending: that is not a failure of the
  // capture, and is not dropped.
  bool capture(const std::function<void()>& fn);
  // Replays the latest capture on cuda::stream(); false (reason in error()) if the launch failed.
  bool launch();
  bool ready() const;
  const std::string& error() const;
  // Nodes (all kernels, for the decode step) of the latest capture; device bytes its memory holds.
  size_t nodes() const;
  size_t memory_bytes() const;

 private:
  bool capture_once(const std::function<void()>& fn);
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Fails the capture in progress on this thread (no-op outside a capture).
void cuda_graph_mark_unsafe(const char* what);
// Whether this thread is inside CudaGraph::capture.
bool cuda_graph_capturing();

// cudaMemcpy of host bytes to device memory (in stream order on the legacy stream): the inputs a
// replay reads, written in place before it.
void cuda_copy_to_device(void* dst, const void* src, size_t bytes);

// Tests: queue an empty kernel on the legacy default stream, as a launch site that ignores
// cuda::stream() would (inside a capture it fails the capture).
void cuda_graph_test_legacy_work();
// Tests: a launch that CUDA refuses (too many threads), left unchecked: its error stays pending.
void cuda_graph_test_unchecked_bad_launch();

}  // namespace dsv3
