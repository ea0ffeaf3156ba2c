// The NCCL communicator: device buffers, the unique id made by rank 0 and broadcast over the
// bootstrap communicator (MPI), or made locally for a world of one. all_to_all_v is a group of
// ncclSend/ncclRecv pairs (NCCL has no native alltoallv); every call synchronizes the stream so the
// interface stays blocking like the MPI one.
#include "dist/communicator.h"

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

class NcclComm final : public Communicator {
 public:
  NcclComm(Communicator* boot, int device) {
    const int r = boot ? boot->rank() : 0, n = boot ? boot->size() : 1;
    set_layout(r, n, boot ? boot->ranks_per_node() : 1);
    check_cuda(cudaSetDevice(device), "cudaSetDevice", r);
    ncclUniqueId id;
    if (r == 0) check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId", r);
    if (boot) boot->broadcast(&id, sizeof id, 0);
    check_cuda(cudaStreamCreate(&stream_), "cudaStreamCreate", r);
    check_nccl(ncclCommInitRank(&comm_, n, id, r), "ncclCommInitRank", r);
    boot_ = boot;
  }
  ~NcclComm() override {
    ncclCommDestroy(comm_);
    cudaStreamDestroy(stream_);
  }
  std::string name() const override { return "nccl"; }

  void all_to_all_v(const void* send, std::span<const int64_t> sb, void* recv, std::span<const int64_t> rb) override {
    const int P = size();
    if (sb.size() != size_t(P) || rb.size() != size_t(P)) internal_error("all_to_all_v: counts for ", sb.size(), " ranks");
    check_nccl(ncclGroupStart(), "ncclGroupStart", rank());
    int64_t so = 0, ro = 0;
    for (int j = 0; j < P; ++j) {
      if (sb[size_t(j)] > 0)
        check_nccl(ncclSend(static_cast<const char*>(send) + so, size_t(sb[size_t(j)]), ncclInt8, j, comm_, stream_),
                   "ncclSend", rank());
      if (rb[size_t(j)] > 0)
        check_nccl(ncclRecv(static_cast<char*>(recv) + ro, size_t(rb[size_t(j)]), ncclInt8, j, comm_, stream_),
                   "ncclRecv", rank());
      so += sb[size_t(j)];
      ro += rb[size_t(j)];
    }
    check_nccl(ncclGroupEnd(), "ncclGroupEnd", rank());
    sync();
  }
  void all_gather(const void* in, void* out, int64_t bytes) override {
    check_nccl(ncclAllGather(in, out, size_t(bytes), ncclInt8, comm_, stream_), "ncclAllGather", rank());
    sync();
  }
  void broadcast(void* data, int64_t bytes, int root) override {
    check_nccl(ncclBroadcast(data, data, size_t(bytes), ncclInt8, root, comm_, stream_), "ncclBroadcast", rank());
    sync();
  }
  void barrier() override {
    if (boot_) boot_->barrier();
  }
  std::unique_ptr<Communicator> split(int, int) override {
    throw CommError("split: not supported by the NCCL communicator (split the MPI bootstrap instead)");
  }

 private:
  void sync() { check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize", rank()); }
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  Communicator* boot_ = nullptr;
};

}  // namespace

bool nccl_available() { return true; }
std::unique_ptr<Communicator> make_nccl_communicator(Communicator* bootstrap, int device) {
  return std::make_unique<NcclComm>(bootstrap, device);
}

}  // namespace dsv3

#else

namespace dsv3 {
bool nccl_available() { return false; }
std::unique_ptr<Communicator> make_nccl_communicator(Communicator*, int) {
  input_error("NCCL communicator: dsv3 was built without NCCL (needs CUDA and libnccl)");
}
}  // namespace dsv3

#endif
