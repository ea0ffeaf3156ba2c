// The MPI communicator (Debian's OpenMPI). Errors return (MPI_ERRORS_RETURN) and become CommError
// naming the call; a peer that dies makes mpirun abort the job, which ends every rank (tested in
// tests/dist/mpi_kill_test.sh).
#include "dist/communicator.h"

#if DSV3_HAVE_MPI
#include <mpi.h>

#include <climits>
#include <cstdio>
#include <cstdlib>

namespace dsv3 {
namespace {

void check(int rc, const char* call, int rank) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  throw CommError(cat(call, " failed on rank ", rank, ": ", std::string(msg, size_t(len))));
}

struct MpiRuntime {
  MpiRuntime() {
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
      int provided = 0;
      MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
      owned = true;
    }
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  }
  ~MpiRuntime() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owned && !finalized) MPI_Finalize();
  }
  bool owned = false;
};

MpiRuntime& runtime() {
  static MpiRuntime rt;
  return rt;
}

int to_int(int64_t v, const char* what) {
  if (v < 0 || v > INT_MAX) throw CommError(cat("MPI ", what, ": ", v, " bytes does not fit an int count"));
  return int(v);
}

class MpiComm final : public Communicator {
 public:
  MpiComm(MPI_Comm c, int ranks_per_node) : comm_(c) {
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    int r = 0, n = 0;
    MPI_Comm_rank(comm_, &r);
    MPI_Comm_size(comm_, &n);
    if (ranks_per_node <= 0) {
      MPI_Comm shm;
      check(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, r, MPI_INFO_NULL, &shm), "MPI_Comm_split_type", r);
      int local = 0;
      MPI_Comm_size(shm, &local);
      MPI_Comm_free(&shm);
      int lo = 0, hi = 0;
      check(MPI_Allreduce(&local, &lo, 1, MPI_INT, MPI_MIN, comm_), "MPI_Allreduce", r);
      check(MPI_Allreduce(&local, &hi, 1, MPI_INT, MPI_MAX, comm_), "MPI_Allreduce", r);
      ranks_per_node = lo == hi ? lo : 1;  // uneven nodes: treat every rank as its own node
    }
    set_layout(r, n, ranks_per_node);
  }
  ~MpiComm() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }
  std::string name() const override { return "mpi"; }

  void all_to_all_v(const void* send, std::span<const int64_t> sb, void* recv, std::span<const int64_t> rb) override {
    const int P = size();
    if (sb.size() != size_t(P) || rb.size() != size_t(P)) internal_error("all_to_all_v: counts for ", sb.size(), " ranks");
    const size_t np = static_cast<size_t>(P);
    std::vector<int> sc(np), sd(np), rc(np), rd(np);
    int64_t so = 0, ro = 0;
    for (int j = 0; j < P; ++j) {
      sc[size_t(j)] = to_int(sb[size_t(j)], "all_to_all_v");
      rc[size_t(j)] = to_int(rb[size_t(j)], "all_to_all_v");
      sd[size_t(j)] = to_int(so, "all_to_all_v offset");
      rd[size_t(j)] = to_int(ro, "all_to_all_v offset");
      so += sb[size_t(j)];
      ro += rb[size_t(j)];
    }
    check(MPI_Alltoallv(send, sc.data(), sd.data(), MPI_BYTE, recv, rc.data(), rd.data(), MPI_BYTE, comm_),
          "MPI_Alltoallv", rank());
  }
  void all_gather(const void* in, void* out, int64_t bytes) override {
    check(MPI_Allgather(in, to_int(bytes, "all_gather"), MPI_BYTE, out, int(bytes), MPI_BYTE, comm_), "MPI_Allgather",
          rank());
  }
  void broadcast(void* data, int64_t bytes, int root) override {
    check(MPI_Bcast(data, to_int(bytes, "broadcast"), MPI_BYTE, root, comm_), "MPI_Bcast", rank());
  }
  void barrier() override { check(MPI_Barrier(comm_), "MPI_Barrier", rank()); }
  std::unique_ptr<Communicator> split(int color, int key) override {
    MPI_Comm c;
    check(MPI_Comm_split(comm_, color, key, &c), "MPI_Comm_split", rank());
    int n = 0, first = 0;
    MPI_Comm_size(c, &n);
    // Keep the node layout when the group is whole nodes of consecutive ranks.
    int me = rank();
    check(MPI_Allreduce(&me, &first, 1, MPI_INT, MPI_MIN, c), "MPI_Allreduce", rank());
    const int rpn = ranks_per_node();
    const bool whole = n % rpn == 0 && first % rpn == 0;
    return std::make_unique<MpiComm>(c, whole ? rpn : 1);
  }

 private:
  MPI_Comm comm_;
};

}  // namespace

bool mpi_available() { return true; }

void abort_mpi_job(const std::string& message, int exit_code) {
  int inited = 0, finalized = 0, size = 1, rank = 0;
  MPI_Initialized(&inited);
  MPI_Finalized(&finalized);
  if (!inited || finalized) return;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (size < 2) return;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::fprintf(stderr, "rank %d: %s\n", rank, message.c_str());
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, exit_code);
}

std::unique_ptr<Communicator> make_mpi_communicator(int ranks_per_node) {
  runtime();
  MPI_Comm c;
  check(MPI_Comm_dup(MPI_COMM_WORLD, &c), "MPI_Comm_dup", -1);
  return std::make_unique<MpiComm>(c, ranks_per_node);
}

}  // namespace dsv3

#else

namespace dsv3 {
bool mpi_available() { return false; }
void abort_mpi_job(const std::string&, int) {}
std::unique_ptr<Communicator> make_mpi_communicator(int) {
  input_error("MPI communicator: dsv3 was built without MPI (install OpenMPI and reconfigure)");
}
}  // namespace dsv3

#endif
