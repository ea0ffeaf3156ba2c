// The NCCL communicator. Each rank drives one GPU (local rank modulo the visible devices); the
// unique id comes from rank 0 over a bootstrap: MPI when started by mpirun, else a rendezvous file
// (the DSV3_* variables that scripts/launch_gpus.sh sets). all_to_all_v is a group of
// ncclSend/ncclRecv pairs (NCCL has no native alltoallv). Buffers may be device memory (the
// gradients) or host memory (counts, metadata, the expert-parallel rows, which the trainer packs on
// the host): host buffers travel through a device staging buffer, so one communicator serves both.
// Every call synchronizes its stream, so the interface stays blocking like the MPI one.
#include "dist/communicator.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#if DSV3_HAVE_NCCL
#include <cuda_runtime.h>
#include <nccl.h>

namespace dsv3 {
namespace {

void check_nccl(ncclResult_t rc, const char* call, int rank) {
  if (rc != ncclSuccess) throw CommError(cat(call, " failed on rank ", rank, ": ", ncclGetErrorString(rc)));
}
void check_cuda(cudaError_t rc, const char* call, int rank) {
  if (rc != cudaSuccess) throw CommError(cat(call, " failed on rank ", rank, ": ", cudaGetErrorString(rc)));
}

bool on_device(const void* p) {
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();  // plain host memory on old drivers reports an error; it is not one
    return false;
  }
  return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

// Rank 0 writes the id to `path` (atomically: a temporary, then rename); the others wait for it.
ncclUniqueId rendezvous(const std::string& path, int rank, double timeout_s) {
  ncclUniqueId id;
  if (rank == 0) {
    check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId", rank);
    const std::string tmp = path + ".tmp";
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f.write(id.internal, sizeof id.internal);
    f.close();
    std::error_code ec;
    if (f) std::filesystem::rename(tmp, path, ec);
    if (!f || ec) throw CommError(cat("rendezvous: rank 0 cannot write ", path, ec ? ": " + ec.message() : ""));
    return id;
  }
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    std::ifstream f(path, std::ios::binary);
    if (f && f.read(id.internal, sizeof id.internal)) return id;
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > timeout_s)
      throw CommError(cat("rendezvous: rank ", rank, " waited ", timeout_s, " s for rank 0's NCCL id in ", path,
                          " (is rank 0 running with the same DSV3_RENDEZVOUS?)"));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

class NcclComm final : public Communicator {
 public:
  // A new world: from the bootstrap (MPI) when given, else from the rendezvous file.
  NcclComm(std::unique_ptr<Communicator> boot, int rank, int size, int rpn, const std::string& rendezvous_path)
      : boot_(std::move(boot)) {
    set_layout(rank, size, rpn);
    int devices = 0;
    check_cuda(cudaGetDeviceCount(&devices), "cudaGetDeviceCount", rank);
    if (devices < 1) throw CommError(cat("rank ", rank, ": no CUDA device"));
    if (rpn > devices)
      input_error("rank ", rank, ": ", rpn, " ranks per node but ", devices,
                  " visible GPU(s) (one rank per GPU; see CUDA_VISIBLE_DEVICES)");
    device_ = local_rank();
    check_cuda(cudaSetDevice(device_), "cudaSetDevice", rank);
    ncclUniqueId id;
    if (boot_) {
      if (rank == 0) check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId", rank);
      boot_->broadcast(&id, sizeof id, 0);
    } else if (size > 1) {
      id = rendezvous(rendezvous_path, rank, 120.0);
    } else {
      check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId", rank);
    }
    check_cuda(cudaStreamCreate(&stream_), "cudaStreamCreate", rank);
    check_nccl(ncclCommInitRank(&comm_, size, id, rank), "ncclCommInitRank", rank);
    // Every rank has joined, so every rank has read the id: a later run cannot pick up a stale one.
    if (!boot_ && size > 1 && rank == 0) std::filesystem::remove(rendezvous_path);
  }
  // A group split off a parent (split()).
  NcclComm(ncclComm_t c, std::unique_ptr<Communicator> boot, int rpn, int device) : boot_(std::move(boot)), comm_(c) {
    int r = 0, n = 0;
    check_nccl(ncclCommUserRank(c, &r), "ncclCommUserRank", -1);
    check_nccl(ncclCommCount(c, &n), "ncclCommCount", r);
    set_layout(r, n, rpn);
    device_ = device;
    check_cuda(cudaStreamCreate(&stream_), "cudaStreamCreate", r);
  }
  ~NcclComm() override {
    free_staging();
    ncclCommDestroy(comm_);
    cudaStreamDestroy(stream_);
  }
  std::string name() const override { return "nccl"; }
  bool device_buffers() const override { return true; }

  void all_to_all_v(const void* send, std::span<const int64_t> sb, void* recv, std::span<const int64_t> rb) override {
    const int P = size();
    if (sb.size() != size_t(P) || rb.size() != size_t(P)) internal_error("all_to_all_v: counts for ", sb.size(), " ranks");
    int64_t st = 0, rt = 0;
    for (int j = 0; j < P; ++j) st += sb[size_t(j)], rt += rb[size_t(j)];
    Staged s(*this, send, st, recv, rt);
    check_nccl(ncclGroupStart(), "ncclGroupStart", rank());
    int64_t so = 0, ro = 0;
    for (int j = 0; j < P; ++j) {
      if (sb[size_t(j)] > 0)
        check_nccl(ncclSend(s.in + so, size_t(sb[size_t(j)]), ncclInt8, j, comm_, stream_), "ncclSend", rank());
      if (rb[size_t(j)] > 0)
        check_nccl(ncclRecv(s.out + ro, size_t(rb[size_t(j)]), ncclInt8, j, comm_, stream_), "ncclRecv", rank());
      so += sb[size_t(j)];
      ro += rb[size_t(j)];
    }
    check_nccl(ncclGroupEnd(), "ncclGroupEnd", rank());
    s.finish();
  }
  void all_gather(const void* in, void* out, int64_t bytes) override {
    Staged s(*this, in, bytes, out, bytes * size());
    check_nccl(ncclAllGather(s.in, s.out, size_t(bytes), ncclInt8, comm_, stream_), "ncclAllGather", rank());
    s.finish();
  }
  void broadcast(void* data, int64_t bytes, int root) override {
    Staged s(*this, data, bytes, data, bytes, true);
    check_nccl(ncclBroadcast(s.in, s.out, size_t(bytes), ncclInt8, root, comm_, stream_), "ncclBroadcast", rank());
    s.finish();
  }
  void barrier() override {
    if (boot_) return boot_->barrier();
    std::vector<char> all(static_cast<size_t>(size()));
    char mine = 1;
    all_gather(&mine, all.data(), 1);
  }
  std::unique_ptr<Communicator> split(int color, int key) override {
    // The bootstrap splits alongside, so the group's barrier stays on the bootstrap's transport.
    std::unique_ptr<Communicator> boot = boot_ ? boot_->split(color, key) : nullptr;
    ncclComm_t c = nullptr;
    check_nccl(ncclCommSplit(comm_, color, key, &c, nullptr), "ncclCommSplit", rank());
    auto out = std::make_unique<NcclComm>(c, std::move(boot), 1, device_);
    // Keep the node layout when the group is whole nodes of consecutive ranks (as the MPI split).
    const int mine = rank();
    std::vector<int> parent(static_cast<size_t>(out->size()));
    out->all_gather(&mine, parent.data(), sizeof mine);
    const int rpn = ranks_per_node();
    bool whole = out->size() % rpn == 0 && parent[0] % rpn == 0;
    for (size_t k = 1; k < parent.size(); ++k) whole = whole && parent[k] == parent[0] + int(k);
    out->set_layout(out->rank(), out->size(), whole ? rpn : 1);
    return out;
  }

 private:
  // Host buffers go through device staging (grown on demand, kept); device buffers are used as given.
  struct Staged {
    Staged(NcclComm& c, const void* send, int64_t sbytes, void* recv, int64_t rbytes, bool in_place = false)
        : c_(c), host_in_(sbytes > 0 && !on_device(send)), host_out_(rbytes > 0 && !on_device(recv)), recv_(recv),
          rbytes_(rbytes) {
      const int64_t need = (host_in_ ? sbytes : 0) + (host_out_ ? rbytes : 0);
      char* base = c.staging(need);
      in = host_in_ ? base : static_cast<char*>(const_cast<void*>(send));
      out = host_out_ ? base + (host_in_ ? sbytes : 0) : static_cast<char*>(recv);
      if (host_in_)
        check_cuda(cudaMemcpyAsync(in, send, size_t(sbytes), cudaMemcpyHostToDevice, c.stream_), "cudaMemcpyAsync",
                   c.rank());
      // In-place broadcast of a host buffer: the staged input is also the output.
      if (in_place && host_in_ && host_out_) out = in;
    }
    void finish() {
      if (host_out_)
        check_cuda(cudaMemcpyAsync(recv_, out, size_t(rbytes_), cudaMemcpyDeviceToHost, c_.stream_), "cudaMemcpyAsync",
                   c_.rank());
      check_cuda(cudaStreamSynchronize(c_.stream_), "cudaStreamSynchronize", c_.rank());
    }
    NcclComm& c_;
    bool host_in_, host_out_;
    void* recv_;
    int64_t rbytes_;
    char* in = nullptr;
    char* out = nullptr;
  };
  char* staging(int64_t bytes) {
    if (bytes > staging_bytes_) {
      free_staging();
      check_cuda(cudaMalloc(&staging_, size_t(bytes)), "cudaMalloc (NCCL staging)", rank());
      staging_bytes_ = bytes;
    }
    return static_cast<char*>(staging_);
  }
  void free_staging() {
    if (staging_) cudaFree(staging_);
    staging_ = nullptr;
    staging_bytes_ = 0;
  }

  std::unique_ptr<Communicator> boot_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  int device_ = 0;
  void* staging_ = nullptr;
  int64_t staging_bytes_ = 0;
};

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (*end || x < 0 || x > 1 << 20) input_error("environment variable ", name, "='", v, "': expected a rank count/index");
  return int(x);
}

}  // namespace

bool nccl_available() { return true; }

std::unique_ptr<Communicator> make_nccl_world(int ranks_per_node) {
  if (launched_by_mpi()) {
    auto boot = make_mpi_communicator(ranks_per_node);
    const int r = boot->rank(), n = boot->size(), rpn = boot->ranks_per_node();
    return std::make_unique<NcclComm>(std::move(boot), r, n, rpn, "");
  }
  const int n = env_int("DSV3_WORLD_SIZE", 1), r = env_int("DSV3_RANK", -1);
  if (n > 1 && r < 0)
    input_error("DSV3_WORLD_SIZE ", n, " without DSV3_RANK: start the ranks with scripts/launch_gpus.sh or mpirun");
  if (n < 1 || r >= n) input_error("DSV3_RANK ", r, " / DSV3_WORLD_SIZE ", n, ": the rank must be below the world size");
  const int rpn = ranks_per_node > 0 ? ranks_per_node : env_int("DSV3_LOCAL_WORLD_SIZE", n);
  if (rpn < 1 || n % rpn != 0)
    input_error("ranks per node ", rpn, " (--ranks-per-node or DSV3_LOCAL_WORLD_SIZE) must divide the world size ", n);
  const char* path = std::getenv("DSV3_RENDEZVOUS");
  if (n > 1 && (!path || !*path))
    input_error("DSV3_WORLD_SIZE ", n, " without DSV3_RENDEZVOUS: start the ranks with scripts/launch_gpus.sh or mpirun");
  // Every world of this process gets its own file (path.0, path.1, …): the ranks make their worlds in
  // the same order, and a later world must not read an earlier world's id.
  static int generation = 0;
  return std::make_unique<NcclComm>(nullptr, std::max(r, 0), n, rpn, cat(path ? path : "", ".", generation++));
}

}  // namespace dsv3

#else

namespace dsv3 {
bool nccl_available() { return false; }
std::unique_ptr<Communicator> make_nccl_world(int) {
  input_error("training on several GPUs needs NCCL: dsv3 was built without it (CUDA and libnccl)");
}
}  // namespace dsv3

#endif

namespace dsv3 {
bool launched_by_gpu_launcher() { return std::getenv("DSV3_WORLD_SIZE") != nullptr; }
}  // namespace dsv3
