#include "backend/cuda/graph.h"

#include <atomic>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "backend/cuda/common.cuh"
#include "backend/cuda/stream.h"

namespace dsv3 {
using namespace cuda;

namespace {

// The device memory of one capture. Blocks come from the allocator registered before the capture
// (the backend's caching allocator) and go back to it only when the last owner — the graph, or a
// tensor allocated during the capture — lets go; replays are stream-ordered before any later reuse.
class GraphMemory {
 public:
  // Blocks come from (and finally go back to) `from`, the allocator registered before the capture.
  explicit GraphMemory(Allocator from) : from_(std::move(from)) {}
  ~GraphMemory() {
    for (const auto& kv : size_) from_.free(kv.first);
  }
  GraphMemory(const GraphMemory&) = delete;
  GraphMemory& operator=(const GraphMemory&) = delete;
  void* alloc(size_t bytes) {
    bytes = (std::max<size_t>(bytes, 1) + 511) & ~size_t(511);
    std::lock_guard<std::mutex> lk(mu_);
    if (!sealed_) {
      auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first <= 2 * bytes) {
        void* p = it->second;
        free_.erase(it);
        return p;
      }
    }
    // The caching allocator may call cudaMalloc, which a thread-local capture refuses: relax this
    // thread's mode for the call (the memory is not part of the graph's work).
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    DSV3_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    void* p = nullptr;
    try {
      p = from_.alloc(bytes);
    } catch (...) {
      cudaThreadExchangeStreamCaptureMode(&mode);
      throw;
    }
    DSV3_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    size_[p] = bytes;
    bytes_ += bytes;
    return p;
  }
  // During the capture a freed block serves later allocations of the same capture; afterwards
  // blocks stay with the graph.
  bool free(void* p) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = size_.find(p);
    if (it == size_.end()) return false;
    if (!sealed_) free_.emplace(it->second, p);
    return true;
  }
  void seal() {
    std::lock_guard<std::mutex> lk(mu_);
    sealed_ = true;
    free_.clear();
  }
  size_t bytes() const { return bytes_; }

 private:
  std::mutex mu_;
  Allocator from_;
  std::unordered_map<void*, size_t> size_;
  std::multimap<size_t, void*> free_;
  size_t bytes_ = 0;
  bool sealed_ = false;
};

struct CaptureState {
  std::string unsafe;  // why the capture must fail, if anything said so
};
thread_local CaptureState* g_capture = nullptr;

__global__ void noop_kernel() {}

}  // namespace

struct CudaGraph::Impl {
  cudaStream_t stream = nullptr;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  std::shared_ptr<GraphMemory> memory;
  std::string error;
  size_t nodes = 0;

  void drop() {
    if (exec) cudaGraphExecDestroy(exec);  // an in-flight replay completes first (CUDA frees it then)
    if (graph) cudaGraphDestroy(graph);
    exec = nullptr;
    graph = nullptr;
    memory.reset();
    nodes = 0;
  }
  ~Impl() {
    drop();
    if (stream) cudaStreamDestroy(stream);
  }
};

CudaGraph::CudaGraph() : impl_(std::make_unique<Impl>()) {}
CudaGraph::~CudaGraph() = default;

bool CudaGraph::ready() const { return impl_->exec != nullptr; }
const std::string& CudaGraph::error() const { return impl_->error; }
size_t CudaGraph::nodes() const { return impl_->nodes; }
size_t CudaGraph::memory_bytes() const { return impl_->memory ? impl_->memory->bytes() : 0; }

bool CudaGraph::capture(const std::function<void()>& fn) {
  Impl& m = *impl_;
  m.error.clear();
  // An error of earlier work that nobody checked is not this capture's failure: a false here would
  // turn graphs off and drop it, while the work it belongs to never ran. Raised, and so consumed.
  if (const cudaError_t stale = cudaPeekAtLastError(); stale != cudaSuccess) {
    (void)cudaGetLastError();
    m.drop();  // as any new capture, it replaces the earlier instance
    internal_error("CudaGraph::capture: a CUDA error of earlier, unchecked work was pending: ",
                   cudaGetErrorString(stale));
  }
  if (g_capture) {
    m.drop();
    m.error = "nested capture";
    return false;
  }
  // The allocator swap is process-wide: one capture at a time in the process.
  static std::atomic<bool> busy{false};
  if (busy.exchange(true)) {
    m.drop();
    m.error = "another thread is capturing";
    return false;
  }
  bool ok = false;
  try {
    ok = capture_once(fn);
  } catch (const std::exception& x) {  // the capture's own CUDA calls (stream creation, ...)
    g_capture = nullptr;
    m.drop();
    m.error = x.what();
  }
  busy = false;
  return ok;
}

bool CudaGraph::capture_once(const std::function<void()>& fn) {
  Impl& m = *impl_;
  if (!m.stream) DSV3_CUDA_CHECK(cudaStreamCreate(&m.stream));  // blocking: the legacy stream waits on it

  // The capturing thread's CUDA tensors come from the graph's memory; other threads' from the
  // allocator registered before, which is registered again afterwards. The deleter is bound at
  // allocation, so each tensor frees into the right place.
  const Allocator before = get_allocator(Device::CUDA);
  DSV3_CHECK(before.alloc && before.free, "CudaGraph::capture: no CUDA allocator is registered");
  auto mem = std::make_shared<GraphMemory>(before);
  const std::thread::id me = std::this_thread::get_id();
  set_allocator(Device::CUDA,
                Allocator{[mem, before, me](size_t n) {
                            return std::this_thread::get_id() == me && g_capture ? mem->alloc(n) : before.alloc(n);
                          },
                          [mem, before](void* p) {
                            if (!mem->free(p)) before.free(p);
                          }});
  auto restore = [before] { set_allocator(Device::CUDA, before); };

  CaptureState st;
  std::string fail;
  cudaGraph_t g = nullptr;
  cudaError_t e = cudaStreamBeginCapture(m.stream, cudaStreamCaptureModeThreadLocal);
  if (e != cudaSuccess) {
    fail = cat("cudaStreamBeginCapture: ", cudaGetErrorString(e));
  } else {
    g_capture = &st;
    try {
      StreamScope scope(m.stream);
      fn();
    } catch (const std::exception& x) {
      fail = x.what();
    } catch (...) {
      fail = "unknown exception";
    }
    g_capture = nullptr;
    const cudaError_t last = cudaGetLastError();  // a launch site without a check
    e = cudaStreamEndCapture(m.stream, &g);
    if (!st.unsafe.empty()) fail = st.unsafe;  // the cause of whatever failed after it
    if (fail.empty() && last != cudaSuccess) fail = cat("launch during capture: ", cudaGetErrorString(last));
    if (fail.empty() && e != cudaSuccess) fail = cat("cudaStreamEndCapture: ", cudaGetErrorString(e));
  }
  restore();
  mem->seal();
  (void)cudaGetLastError();
  if (fail.empty()) {
    size_t n = 0;
    e = cudaGraphGetNodes(g, nullptr, &n);
    if (e != cudaSuccess) fail = cat("cudaGraphGetNodes: ", cudaGetErrorString(e));
    else if (n == 0) fail = "nothing was captured";
    else m.nodes = n;
  }
  if (!fail.empty()) {
    if (g) cudaGraphDestroy(g);
    m.drop();
    m.error = fail;
    (void)cudaGetLastError();
    return false;
  }
  const size_t nodes = m.nodes;
  m.drop();  // the previous instance and its memory (kept by its outputs while they live)
  m.nodes = nodes;
  cudaGraphExec_t x = nullptr;
  e = cudaGraphInstantiate(&x, g, 0);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    cudaGraphDestroy(g);
    m.drop();
    m.error = cat("cudaGraphInstantiate: ", cudaGetErrorString(e));
    return false;
  }
  m.graph = g;
  m.exec = x;
  m.memory = mem;
  return true;
}

bool CudaGraph::launch() {
  Impl& m = *impl_;
  if (!m.exec) {
    m.error = "no captured graph";
    return false;
  }
  const cudaError_t e = cudaGraphLaunch(m.exec, stream());
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    m.error = cat("cudaGraphLaunch: ", cudaGetErrorString(e));
    return false;
  }
  return true;
}

void cuda_graph_mark_unsafe(const char* what) {
  if (g_capture && g_capture->unsafe.empty()) g_capture->unsafe = cat("not capturable: ", what);
}

bool cuda_graph_capturing() { return g_capture != nullptr; }

void cuda_copy_to_device(void* dst, const void* src, size_t bytes) {
  if (bytes) DSV3_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}

void cuda_graph_test_legacy_work() { noop_kernel<<<1, 1>>>(); }

void cuda_graph_test_unchecked_bad_launch() { noop_kernel<<<1, 2048>>>(); }  // over 1,024 threads: refused

}  // namespace dsv3
