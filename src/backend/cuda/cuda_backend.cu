// The CUDA backend's device plumbing: a caching allocator registered with core, host↔device copies,
// the shared cuBLAS handle, range checks and the stable bucket sort used by MoE and scatter ops.
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "backend/cuda/common.cuh"
#include "backend/cuda/graph.h"
#include "backend/cuda/stream.h"

namespace dsv3 {
namespace cuda {
namespace {

// Freed blocks are kept by size and reused for requests of up to the same size (at most 2× larger
// blocks serve a request), so a training step's allocate/free pattern stops calling cudaMalloc.
class CachingAllocator {
 public:
  void* alloc(size_t bytes) {
    if (bytes == 0) bytes = 1;
    bytes = (bytes + 511) & ~size_t(511);
    std::lock_guard<std::mutex> lk(mu_);
    auto it = free_.lower_bound(bytes);
    if (it != free_.end() && it->first <= 2 * bytes) {
      void* p = it->second;
      taken(it->first);
      free_.erase(it);
      return p;
    }
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {  // release the cache and retry once
      (void)cudaGetLastError();
      // Not while the thread's stream is captured into a graph: synchronising or freeing would end
      // the capture, which fails instead (its step then runs eagerly and allocates again).
      cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
      if (cudaStreamIsCapturing(stream(), &cap) != cudaSuccess || cap != cudaStreamCaptureStatusNone)
        internal_error("cudaMalloc of ", bytes, " bytes during a graph capture: ", cudaGetErrorString(e));
      if (!deferred_.empty()) {  // held back for running lanes: once they are done, free too
        (void)cudaDeviceSynchronize();
        for (void* d : deferred_) free_.emplace(size_[d], d);
        deferred_.clear();
      }
      for (auto it = free_.begin(); it != free_.end();) {
        if (cudaFree(it->second) != cudaSuccess) {  // keep what could not be freed
          (void)cudaGetLastError();
          ++it;
          continue;
        }
        reserved_ -= it->first;
        size_.erase(it->second);
        it = free_.erase(it);
      }
      e = cudaMalloc(&p, bytes);
      if (e != cudaSuccess) internal_error("cudaMalloc of ", bytes, " bytes: ", cudaGetErrorString(e));
    }
    size_[p] = bytes;
    reserved_ += bytes;
    taken(bytes);
    return p;
  }
  void free(void* p) {
    if (!p) return;
    std::lock_guard<std::mutex> lk(mu_);
    auto it = size_.find(p);
    if (it == size_.end()) return;
    in_use_ -= it->second;
    if (deferring_)
      deferred_.push_back(p);
    else
      free_.emplace(it->second, p);
  }
  // While deferring, freed blocks are held back (a lane may still be using them) until release.
  void defer() {
    std::lock_guard<std::mutex> lk(mu_);
    deferring_ = true;
  }
  void release() {
    std::lock_guard<std::mutex> lk(mu_);
    deferring_ = false;
    for (void* p : deferred_) free_.emplace(size_[p], p);
    deferred_.clear();
  }
  CudaMemoryStats stats() {
    std::lock_guard<std::mutex> lk(mu_);
    return {in_use_, peak_, reserved_};
  }
  void reset_peak() {
    std::lock_guard<std::mutex> lk(mu_);
    peak_ = in_use_;
  }

 private:
  // Counted in whole blocks (a reused block may be up to twice the request).
  void taken(size_t block) {
    in_use_ += block;
    peak_ = std::max(peak_, in_use_);
  }
  size_t in_use_ = 0, peak_ = 0, reserved_ = 0;
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  std::unordered_map<void*, size_t> size_;
  bool deferring_ = false;
  std::vector<void*> deferred_;
};

CachingAllocator& allocator() {
  static CachingAllocator* a = new CachingAllocator;  // never destroyed: tensors may outlive main
  return *a;
}

// The first element outside [lo, hi) as (index << 32 | value bits): atomicMin keeps the lowest index.
__global__ void range_kernel(const int32_t* p, int64_t n, int64_t lo, int64_t hi, unsigned long long* first) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    if (p[i] < lo || p[i] >= hi) atomicMin(first, (static_cast<unsigned long long>(i) << 32) | uint32_t(p[i]));
}

// Queued range checks: one 64-bit slot each in a device array (all ones = passed), read back together.
class RangeChecks {
 public:
  void add(const int32_t* p, int64_t n, int64_t lo, int64_t hi, std::function<void(int64_t, int32_t)> fail) {
    DSV3_CHECK(n < (int64_t(1) << 32), "check_range: ", n, " indices are more than a check slot holds");
    std::unique_lock<std::mutex> lk(mu_);
    if (fail_.size() == kSlots) {  // a full queue is read now, so an error may surface here
      lk.unlock();
      raise();
      lk.lock();
    }
    if (!slots_) {
      DSV3_CUDA_CHECK(cudaMalloc(&slots_, kSlots * sizeof(unsigned long long)));
      DSV3_CUDA_CHECK(cudaMemset(slots_, 0xff, kSlots * sizeof(unsigned long long)));
    }
    range_kernel<<<std::min(blocks_for(n), 1024u), 256>>>(p, n, lo, hi, slots_ + fail_.size());
    check_launch("range check");
    fail_.push_back(std::move(fail));
  }
  void raise() {
    std::vector<std::function<void(int64_t, int32_t)>> fail;
    std::vector<unsigned long long> got;
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (fail_.empty()) return;
      fail.swap(fail_);  // cleared first: neither an error raised here nor a failed copy leaves checks queued
      got.resize(fail.size());
      DSV3_CUDA_CHECK(cudaMemcpy(got.data(), slots_, got.size() * sizeof got[0], cudaMemcpyDeviceToHost));
      DSV3_CUDA_CHECK(cudaMemset(slots_, 0xff, got.size() * sizeof got[0]));
    }
    for (size_t j = 0; j < got.size(); ++j)
      if (got[j] != ~0ull) fail[j](int64_t(got[j] >> 32), int32_t(uint32_t(got[j] & 0xffffffffu)));
  }

 private:
  static constexpr size_t kSlots = 4096;
  std::mutex mu_;  // ops may come from several host threads, as the allocator's
  unsigned long long* slots_ = nullptr;
  std::vector<std::function<void(int64_t, int32_t)>> fail_;
};

RangeChecks& range_checks() {
  static RangeChecks* r = new RangeChecks;  // never destroyed, as the allocator
  return *r;
}

__global__ void iota_kernel(int32_t* p, int64_t n) {
  int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) p[i] = int32_t(i);
}
__global__ void count_kernel(const int32_t* keys, int64_t n, int64_t nkeys, int32_t* counts) {
  int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n && keys[i] >= 0 && keys[i] < nkeys) atomicAdd(&counts[keys[i]], 1);
}

}  // namespace

// Scratch goes back to the cache when its op ends, while a graph captured around the op would keep
// using it: a capture that takes scratch fails (its step runs eagerly).
namespace {
std::atomic<bool> g_scratch_poison{false};
}

Scratch::Scratch(size_t bytes) : p_(allocator().alloc(bytes)) {
  if (cuda_graph_capturing()) cuda_graph_mark_unsafe("device scratch from the caching allocator");
  if (g_scratch_poison.load()) DSV3_CUDA_CHECK(cudaMemsetAsync(p_, 0xFF, bytes, stream()));
}
Scratch::~Scratch() { allocator().free(p_); }

cublasHandle_t cublas() {
  static cublasHandle_t h = [] {
    cublasHandle_t x;
    DSV3_CUBLAS_CHECK(cublasCreate(&x));
    DSV3_CUBLAS_CHECK(cublasSetMathMode(x, CUBLAS_PEDANTIC_MATH));  // FP32 exactly: no TF32
    return x;
  }();
  return h;
}

void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
           const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: swap the operands.
  DSV3_CUBLAS_CHECK(cublasSgemm(cublas(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                                int(n), int(m), int(k), &alpha, b, int(ldb), a, int(lda), &beta, c, int(ldc)));
}

void check_range(const int32_t* p, int64_t n, int64_t lo, int64_t hi, std::function<void(int64_t, int32_t)> fail) {
  if (n > 0) range_checks().add(p, n, lo, hi, std::move(fail));
}

void raise_range_errors() { range_checks().raise(); }

void stable_bucket(const int32_t* keys, int64_t n, int64_t nkeys, int32_t* order, int32_t* offsets) {
  DSV3_CUDA_CHECK(cudaMemset(offsets, 0, size_t(nkeys + 1) * sizeof(int32_t)));
  if (n == 0) return;
  Scratch idx(size_t(n) * 4), keys_out(size_t(n) * 4), counts(size_t(nkeys + 1) * 4);
  iota_kernel<<<blocks_for(n), 256>>>(idx.as<int32_t>(), n);
  int end_bit = 1;
  while ((int64_t(1) << end_bit) < nkeys) ++end_bit;
  // LSD radix sort is stable, so equal keys keep ascending index order.
  size_t tmp = 0;
  DSV3_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, tmp, keys, keys_out.as<int32_t>(), idx.as<int32_t>(),
                                                  order, int(n), 0, end_bit));
  Scratch t(tmp);
  DSV3_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(t.as<void>(), tmp, keys, keys_out.as<int32_t>(),
                                                  idx.as<int32_t>(), order, int(n), 0, end_bit));
  DSV3_CUDA_CHECK(cudaMemset(counts.as<void>(), 0, size_t(nkeys + 1) * 4));
  count_kernel<<<blocks_for(n), 256>>>(keys, n, nkeys, counts.as<int32_t>());
  size_t tmp2 = 0;
  DSV3_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, tmp2, counts.as<int32_t>(), offsets, int(nkeys + 1)));
  Scratch t2(tmp2);
  DSV3_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(t2.as<void>(), tmp2, counts.as<int32_t>(), offsets, int(nkeys + 1)));
  check_launch("stable_bucket");
}

}  // namespace cuda

void cuda_set_scratch_poison(bool on) { cuda::g_scratch_poison.store(on); }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

CudaBackend::CudaBackend() {
  if (cuda_device_count() == 0) input_error("CUDA backend: no usable CUDA device (driver or GPU missing)");
  set_allocator(Device::CUDA, Allocator{[](size_t n) { return cuda::allocator().alloc(n); },
                                        [](void* p) { cuda::allocator().free(p); }});
}

CudaBackend& cuda_backend() {
  static CudaBackend b;
  return b;
}

Tensor CudaBackend::alloc(DType t, const Shape& s) { return Tensor::empty(t, s, Device::CUDA); }

Tensor CudaBackend::to_device(const Tensor& host) {
  DSV3_CHECK(host.device() == Device::CPU, "to_device: tensor is already on ", device_name(host.device()));
  Tensor d = alloc(host.dtype(), host.shape());
  if (host.nbytes()) DSV3_CUDA_CHECK(cudaMemcpy(d.raw(), host.raw(), host.nbytes(), cudaMemcpyHostToDevice));
  return d;
}

Tensor CudaBackend::to_host(const Tensor& t) {
  cuda::raise_range_errors();
  Tensor h = Tensor::empty(t.dtype(), t.shape());
  if (t.nbytes() == 0) return h;
  cudaMemcpyKind kind = t.device() == Device::CUDA ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost;
  DSV3_CUDA_CHECK(cudaMemcpy(h.raw(), t.raw(), t.nbytes(), kind));
  return h;
}

void CudaBackend::synchronize() {
  DSV3_CUDA_CHECK(cudaDeviceSynchronize());
  cuda::raise_range_errors();
}

namespace {

// The lane streams (made once, kMaxLanes of them; `count` are used). A scope forks them from the
// current stream on first use and joins them back at its end. One scope at a time, on one thread.
constexpr int kMaxLanes = 8;  // the FP8 preparation keeps a NaN slot per stream (quantize.cu)

struct Lanes {
  std::vector<cudaStream_t> streams;
  std::vector<cudaEvent_t> done;
  std::vector<bool> forked;
  cudaEvent_t fork = nullptr;
  int count = 0;        // lanes in use, 0 or 2..kMaxLanes
  bool open = false;    // inside a scope
  bool active = false;  // this scope forks lanes
  std::thread::id owner;
  cudaStream_t before = nullptr;

  Lanes() {
    int n = 4;
    if (const char* e = std::getenv("DSV3_CUDA_LANES")) {
      char* end = nullptr;
      const long v = std::strtol(e, &end, 10);
      if (end == e || *end || v < 0 || v > kMaxLanes)
        input_error("DSV3_CUDA_LANES='", e, "': expected a lane count from 0 to ", kMaxLanes, " (0 or 1: off)");
      n = int(v);
    }
    resize(n);
  }
  void resize(int n) {
    DSV3_CHECK(!open, "cuda_set_lanes inside a lane scope");
    DSV3_CHECK(n >= 0 && n <= kMaxLanes, "cuda_set_lanes(", n, "): at most ", kMaxLanes, " lanes");
    if (n >= 2 && streams.empty()) {
      std::vector<cudaStream_t> s(kMaxLanes, nullptr);
      std::vector<cudaEvent_t> d(kMaxLanes, nullptr);
      for (int i = 0; i < kMaxLanes; ++i) {
        DSV3_CUDA_CHECK(cudaStreamCreate(&s[size_t(i)]));  // blocking: ordered with the legacy stream
        DSV3_CUDA_CHECK(cudaEventCreateWithFlags(&d[size_t(i)], cudaEventDisableTiming));
      }
      DSV3_CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
      streams = std::move(s);
      done = std::move(d);
    }
    count = n < 2 ? 0 : n;
  }
};

Lanes& lanes() {
  static Lanes* l = new Lanes;  // never destroyed: streams outlive static destructors' GPU work
  return *l;
}

}  // namespace

CudaMemoryStats cuda_memory_stats() { return cuda::allocator().stats(); }
void cuda_reset_peak_memory() { cuda::allocator().reset_peak(); }

void cuda_set_lanes(int n) { lanes().resize(n); }

int cuda_lanes() { return lanes().count; }

void CudaBackend::begin_lanes() {
  Lanes& l = lanes();
  DSV3_CHECK(!l.open, "begin_lanes: a lane scope is already open (scopes do not nest)");
  const cudaStream_t before = cuda::stream();
  // A stream being captured into a graph keeps its work: a graph has its own concurrency.
  cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  DSV3_CUDA_CHECK(cudaStreamIsCapturing(before, &cap));
  const bool active = l.count >= 2 && cap == cudaStreamCaptureStatusNone;
  if (active) DSV3_CUDA_CHECK(cudaEventRecord(l.fork, before));
  l.open = true;
  l.active = active;
  l.owner = std::this_thread::get_id();
  l.before = before;
  if (!active) return;
  l.forked.assign(size_t(l.count), false);
  cuda::allocator().defer();
}

void CudaBackend::lane(int64_t i) {
  Lanes& l = lanes();
  DSV3_CHECK(l.open && l.owner == std::this_thread::get_id() && i >= 0, "lane(", i, ") outside its scope");
  if (!l.active) return;
  const size_t k = size_t(i % l.count);
  if (!l.forked[k]) {
    DSV3_CUDA_CHECK(cudaStreamWaitEvent(l.streams[k], l.fork, 0));
    l.forked[k] = true;
  }
  cuda::current_stream_slot() = l.streams[k];
}

void CudaBackend::end_lanes() {
  Lanes& l = lanes();
  if (!l.open) return;
  DSV3_CHECK(l.owner == std::this_thread::get_id(), "end_lanes on another thread than begin_lanes");
  // State first, so an error below leaves no scope half open.
  l.open = false;
  if (!l.active) return;
  l.active = false;
  cuda::current_stream_slot() = l.before;
  cudaError_t first = cudaSuccess;
  for (size_t k = 0; k < l.forked.size(); ++k)
    if (l.forked[k]) {
      cudaError_t e = cudaEventRecord(l.done[k], l.streams[k]);
      if (e == cudaSuccess) e = cudaStreamWaitEvent(l.before, l.done[k], 0);
      if (first == cudaSuccess) first = e;
    }
  if (first == cudaSuccess) {
    cuda::allocator().release();
    return;
  }
  // Without the join, blocks freed in the scope may still be in use: synchronise before reusing them.
  (void)cudaDeviceSynchronize();
  (void)cudaGetLastError();
  cuda::allocator().release();
  internal_error("CUDA: joining the lane streams: ", cudaGetErrorString(first));
}

}  // namespace dsv3
