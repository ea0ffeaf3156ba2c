// The stream the backend's kernels go to: the legacy default stream unless a StreamScope on this
// thread says otherwise. Two users: the MoE's expert GEMMs run on several streams at once
// (CudaBackend::lane), and the decode step is captured into a CUDA graph, which the legacy stream
// cannot be. A launch site that does not pass stream() stays on the legacy stream; lane streams are
// blocking streams, so such a launch is ordered after and before everything on them (correct, only
// not concurrent), and inside a capture it is refused by CUDA, which ends the capture with an error.
#pragma once
#include <cuda_runtime.h>

namespace dsv3::cuda {

inline cudaStream_t& current_stream_slot() {
  static thread_local cudaStream_t s = nullptr;  // nullptr: the legacy default stream
  return s;
}

inline cudaStream_t stream() { return current_stream_slot(); }

class StreamScope {
 public:
  explicit StreamScope(cudaStream_t s) : prev_(current_stream_slot()) { current_stream_slot() = s; }
  ~StreamScope() { current_stream_slot() = prev_; }
  StreamScope(const StreamScope&) = delete;
  StreamScope& operator=(const StreamScope&) = delete;

 private:
  cudaStream_t prev_;
};

}  // namespace dsv3::cuda
