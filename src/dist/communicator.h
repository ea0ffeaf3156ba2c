// The communicator: the only way ranks talk to each other (DESIGN §5). Three implementations:
//   local  — one process, size 1 (make_local_communicator); also a simulated world of N ranks on
//            N threads of one process (make_thread_world), which the unit tests use;
//   MPI    — Debian's OpenMPI (comm_mpi.cpp, DSV3_HAVE_MPI), host memory;
//   NCCL   — one GPU per rank (comm_nccl.cpp, DSV3_HAVE_NCCL), bootstrapped over MPI or by
//            scripts/launch_gpus.sh's rendezvous file.
//
// Buffers are byte ranges in host memory; NCCL also takes device memory (device_buffers()).
// Transport-level primitives are all_to_all_v, all_gather, broadcast and barrier; the float
// reductions are built on them here so that their summation order is fixed and the same on every
// transport: element i of a sum is ((x_0 + x_1) + x_2) + … in rank order, on every rank, whatever
// MPI's or NCCL's own algorithm would choose. So an all-reduce result is bitwise identical across
// ranks and across runs, and a 1-rank all-reduce is the identity.
//
// Nodes: ranks r·rpn … r·rpn+rpn−1 form node r (rpn = ranks per node). `--ranks-per-node` lets one
// machine stand in for several nodes; by default MPI's shared-memory split decides.
//
// Failures: a collective that cannot complete (a peer died, a transport error, a timeout) throws
// CommError naming the operation and the rank; nothing waits forever (see docs/distributed.md).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/error.h"

namespace dsv3 {

struct CommError : InternalError {
  using InternalError::InternalError;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual std::string name() const = 0;  // "local", "threads", "mpi", "nccl"
  // True when buffers may be device memory (NCCL); host buffers are accepted by every implementation.
  virtual bool device_buffers() const { return false; }

  int rank() const { return rank_; }
  int size() const { return size_; }
  int ranks_per_node() const { return rpn_; }
  int local_rank() const { return rank_ % rpn_; }
  int node() const { return rank_ / rpn_; }
  int nodes() const { return size_ / rpn_; }
  int node_of(int r) const { return r / rpn_; }
  int local_rank_of(int r) const { return r % rpn_; }

  // send holds size() consecutive blocks (block j of send_bytes[j] bytes goes to rank j); recv gets
  // the blocks of every rank in rank order (block j of recv_bytes[j] bytes came from rank j).
  // recv_bytes must match what the peers send (exchange counts first: exchange_counts).
  virtual void all_to_all_v(const void* send, std::span<const int64_t> send_bytes, void* recv,
                            std::span<const int64_t> recv_bytes) = 0;
  // Every rank contributes `bytes`; out receives size()·bytes, rank order.
  virtual void all_gather(const void* in, void* out, int64_t bytes) = 0;
  virtual void broadcast(void* data, int64_t bytes, int root) = 0;
  virtual void barrier() = 0;
  // Ranks with the same color form a new communicator, ordered by (key, old rank). The new one
  // keeps the node layout only if it is a whole number of nodes wide; otherwise every member is
  // its own node.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // Built on the primitives above (deterministic order, see the header comment).
  // Sum of every rank's data, in rank order, on every rank. Host F32 memory (local/MPI).
  void all_reduce_sum(std::span<float> data);
  // in: size()·n floats; out: n floats = Σ_r in_r[rank()·n … rank()·n + n) in rank order.
  void reduce_scatter_sum(std::span<const float> in, std::span<float> out);
  // Exact integer sum (loads, token counts).
  void all_reduce_sum(std::span<int64_t> data);
  // send_counts[j] = what this rank sends rank j → what each rank j sends this rank.
  std::vector<int64_t> exchange_counts(std::span<const int64_t> send_counts);

 protected:
  void set_layout(int rank, int size, int ranks_per_node);

 private:
  int rank_ = 0, size_ = 1, rpn_ = 1;
};

// A size-1 communicator (the single-process run).
std::unique_ptr<Communicator> make_local_communicator();
// N ranks on N threads of this process (rank i is element i; each must be driven by its own
// thread). ranks_per_node must divide n. A collective that waits longer than timeout_s for its
// peers throws CommError (a test that forgets a rank fails instead of hanging).
std::vector<std::unique_ptr<Communicator>> make_thread_world(int n, int ranks_per_node = 0, double timeout_s = 60.0);

// MPI (DSV3_HAVE_MPI). Initialises MPI on first use (MPI_THREAD_FUNNELED) and finalises at exit;
// errors return instead of aborting (MPI_ERRORS_RETURN) and become CommError. ranks_per_node 0 =
// MPI's shared-memory split; otherwise it must divide the world size (InputError).
bool mpi_available();
// True when this process was started by mpirun/mpiexec (OMPI_COMM_WORLD_SIZE or PMI_SIZE set).
bool launched_by_mpi();
std::unique_ptr<Communicator> make_mpi_communicator(int ranks_per_node = 0);

// NCCL (DSV3_HAVE_NCCL): rank r drives GPU (local rank mod visible devices), set current here.
// The id comes from rank 0 by an MPI broadcast when launched by mpirun, else through the file
// DSV3_RENDEZVOUS with DSV3_RANK / DSV3_WORLD_SIZE / DSV3_LOCAL_WORLD_SIZE (scripts/launch_gpus.sh);
// neither: a world of one. Collectives run on the communicator's own stream and synchronize.
bool nccl_available();
std::unique_ptr<Communicator> make_nccl_world(int ranks_per_node = 0);
// True when started by scripts/launch_gpus.sh (DSV3_WORLD_SIZE set).
bool launched_by_gpu_launcher();

// After an error on this rank of an MPI job of several ranks: prints `message` to stderr, then
// MPI_Abort, which ends every rank at once (a peer waiting in a collective would otherwise wait for
// this rank). Returns (printing nothing) when this is not such a job.
void abort_mpi_job(const std::string& message, int exit_code);

// Forwards every call to `inner` (same rank, size and node layout) and counts the transport-level
// calls, so that tests and benchmarks can see how many synchronising collectives a step makes.
class CountingCommunicator final : public Communicator {
 public:
  struct Counts {
    int64_t all_to_all_v = 0, all_gather = 0, broadcast = 0, barrier = 0;
    int64_t total() const { return all_to_all_v + all_gather + broadcast + barrier; }
  };
  explicit CountingCommunicator(Communicator& inner);
  std::string name() const override { return inner_.name(); }
  bool device_buffers() const override { return inner_.device_buffers(); }
  void all_to_all_v(const void* send, std::span<const int64_t> send_bytes, void* recv,
                    std::span<const int64_t> recv_bytes) override;
  void all_gather(const void* in, void* out, int64_t bytes) override;
  void broadcast(void* data, int64_t bytes, int root) override;
  void barrier() override;
  // The new communicator is the inner one's split, not counted.
  std::unique_ptr<Communicator> split(int color, int key) override { return inner_.split(color, key); }
  const Counts& counts() const { return counts_; }
  void reset_counts() { counts_ = {}; }

 private:
  Communicator& inner_;
  Counts counts_;
};

// The communicator a command should use: MPI when launched by mpirun, else local.
std::unique_ptr<Communicator> make_world_communicator(int ranks_per_node = 0);

}  // namespace dsv3
