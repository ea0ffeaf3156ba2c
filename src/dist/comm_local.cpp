// The transport-independent reductions, the size-1 communicator, and the simulated multi-rank world
// (threads of one process sharing memory; every collective is "publish my buffer, wait for all,
// copy what I need, wait for all").
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>

#include "dist/communicator.h"

namespace dsv3 {

void Communicator::set_layout(int rank, int size, int ranks_per_node) {
  if (size < 1 || rank < 0 || rank >= size) internal_error("communicator: rank ", rank, " of ", size);
  if (ranks_per_node <= 0 || size % ranks_per_node != 0)
    input_error("--ranks-per-node ", ranks_per_node, ": must be positive and divide the world size ", size);
  rank_ = rank;
  size_ = size;
  rpn_ = ranks_per_node;
}

namespace {
template <class T>
void reduce_scatter_impl(Communicator& c, std::span<const T> in, std::span<T> out) {
  const int P = c.size();
  const size_t m = out.size();
  if (in.size() != m * size_t(P)) internal_error("reduce_scatter_sum: ", in.size(), " inputs for ", P, "×", m);
  std::vector<int64_t> bytes(size_t(P), int64_t(m * sizeof(T)));
  std::vector<T> recv(m * size_t(P));
  c.all_to_all_v(in.data(), bytes, recv.data(), bytes);
  for (size_t i = 0; i < m; ++i) out[i] = recv[i];
  for (int j = 1; j < P; ++j)
    for (size_t i = 0; i < m; ++i) out[i] += recv[size_t(j) * m + i];
}

template <class T>
void all_reduce_impl(Communicator& c, std::span<T> data) {
  const int P = c.size();
  if (P == 1 || data.empty()) return;
  // Reduce-scatter over P padded chunks, then all-gather: each element is summed once, by its
  // owner, in rank order.
  const size_t m = (data.size() + size_t(P) - 1) / size_t(P);
  std::vector<T> padded(m * size_t(P), T(0));
  std::copy(data.begin(), data.end(), padded.begin());
  std::vector<T> mine(m), all(m * size_t(P));
  reduce_scatter_impl<T>(c, padded, mine);
  c.all_gather(mine.data(), all.data(), int64_t(m * sizeof(T)));
  std::copy(all.begin(), all.begin() + std::ptrdiff_t(data.size()), data.begin());
}
}  // namespace

void Communicator::all_reduce_sum(std::span<float> data) { all_reduce_impl<float>(*this, data); }
void Communicator::all_reduce_sum(std::span<int64_t> data) { all_reduce_impl<int64_t>(*this, data); }
void Communicator::reduce_scatter_sum(std::span<const float> in, std::span<float> out) {
  reduce_scatter_impl<float>(*this, in, out);
}

std::vector<int64_t> Communicator::exchange_counts(std::span<const int64_t> send_counts) {
  if (send_counts.size() != size_t(size())) internal_error("exchange_counts: ", send_counts.size(), " counts for ", size(), " ranks");
  const size_t np = static_cast<size_t>(size());
  std::vector<int64_t> bytes(np, int64_t(sizeof(int64_t))), recv(np);
  all_to_all_v(send_counts.data(), bytes, recv.data(), bytes);
  return recv;
}

CountingCommunicator::CountingCommunicator(Communicator& inner) : inner_(inner) {
  set_layout(inner.rank(), inner.size(), inner.ranks_per_node());
}
void CountingCommunicator::all_to_all_v(const void* send, std::span<const int64_t> sb, void* recv,
                                        std::span<const int64_t> rb) {
  ++counts_.all_to_all_v;
  inner_.all_to_all_v(send, sb, recv, rb);
}
void CountingCommunicator::all_gather(const void* in, void* out, int64_t bytes) {
  ++counts_.all_gather;
  inner_.all_gather(in, out, bytes);
}
void CountingCommunicator::broadcast(void* data, int64_t bytes, int root) {
  ++counts_.broadcast;
  inner_.broadcast(data, bytes, root);
}
void CountingCommunicator::barrier() {
  ++counts_.barrier;
  inner_.barrier();
}

namespace {

class LocalComm final : public Communicator {
 public:
  LocalComm() { set_layout(0, 1, 1); }
  std::string name() const override { return "local"; }
  void all_to_all_v(const void* send, std::span<const int64_t> sb, void* recv, std::span<const int64_t> rb) override {
    if (sb.size() != 1 || rb.size() != 1 || sb[0] != rb[0]) internal_error("all_to_all_v (local): counts differ");
    if (sb[0] > 0 && send != recv) std::memmove(recv, send, size_t(sb[0]));
  }
  void all_gather(const void* in, void* out, int64_t bytes) override {
    if (bytes > 0 && in != out) std::memmove(out, in, size_t(bytes));
  }
  void broadcast(void*, int64_t, int root) override {
    if (root != 0) internal_error("broadcast (local): root ", root);
  }
  void barrier() override {}
  std::unique_ptr<Communicator> split(int, int) override { return std::make_unique<LocalComm>(); }
};

// Shared state of a simulated world.
struct World {
  explicit World(int n, int rpn, double timeout) : n(n), rpn(rpn), timeout(timeout), slots(static_cast<size_t>(n)) {}
  struct Slot {
    const void* ptr = nullptr;
    const int64_t* counts = nullptr;
    int64_t bytes = 0;
  };
  const int n, rpn;
  const double timeout;
  std::vector<Slot> slots;
  std::mutex mu;
  std::condition_variable cv;
  int arrived = 0;
  int64_t generation = 0;
  std::map<std::pair<int64_t, int>, std::shared_ptr<World>> children;

  void wait_all(int rank, const char* op) {
    std::unique_lock<std::mutex> lk(mu);
    const int64_t gen = generation;
    if (++arrived == n) {
      arrived = 0;
      ++generation;
      cv.notify_all();
      return;
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout);
    if (!cv.wait_until(lk, deadline, [&] { return generation != gen; }))
      throw CommError(cat(op, " (threads): rank ", rank, " waited ", timeout, " s for its peers"));
  }
};

class ThreadComm final : public Communicator {
 public:
  ThreadComm(std::shared_ptr<World> w, int rank) : w_(std::move(w)) { set_layout(rank, w_->n, w_->rpn); }
  std::string name() const override { return "threads"; }

  void all_to_all_v(const void* send, std::span<const int64_t> sb, void* recv, std::span<const int64_t> rb) override {
    const int P = size(), r = rank();
    if (sb.size() != size_t(P) || rb.size() != size_t(P)) internal_error("all_to_all_v: counts for ", sb.size(), " ranks");
    publish(send, sb.data(), 0);
    w_->wait_all(r, "all_to_all_v");
    auto* out = static_cast<char*>(recv);
    int64_t roff = 0;
    for (int j = 0; j < P; ++j) {
      const World::Slot& s = w_->slots[size_t(j)];
      int64_t off = 0;
      for (int q = 0; q < r; ++q) off += s.counts[q];
      if (s.counts[r] != rb[size_t(j)])
        throw CommError(cat("all_to_all_v: rank ", r, " expected ", rb[size_t(j)], " bytes from rank ", j, ", it sends ",
                            s.counts[r]));
      if (rb[size_t(j)] > 0) std::memcpy(out + roff, static_cast<const char*>(s.ptr) + off, size_t(rb[size_t(j)]));
      roff += rb[size_t(j)];
    }
    w_->wait_all(r, "all_to_all_v");
  }
  void all_gather(const void* in, void* out, int64_t bytes) override {
    publish(in, nullptr, bytes);
    w_->wait_all(rank(), "all_gather");
    for (int j = 0; j < size(); ++j) {
      const World::Slot& s = w_->slots[size_t(j)];
      if (s.bytes != bytes) throw CommError(cat("all_gather: rank ", j, " sends ", s.bytes, " bytes, rank ", rank(), " expects ", bytes));
      if (bytes > 0) std::memcpy(static_cast<char*>(out) + int64_t(j) * bytes, s.ptr, size_t(bytes));
    }
    w_->wait_all(rank(), "all_gather");
  }
  void broadcast(void* data, int64_t bytes, int root) override {
    publish(data, nullptr, bytes);
    w_->wait_all(rank(), "broadcast");
    const World::Slot& s = w_->slots[size_t(root)];
    if (s.bytes != bytes) throw CommError(cat("broadcast: root sends ", s.bytes, " bytes, rank ", rank(), " expects ", bytes));
    if (rank() != root && bytes > 0) std::memcpy(data, s.ptr, size_t(bytes));
    w_->wait_all(rank(), "broadcast");
  }
  void barrier() override { w_->wait_all(rank(), "barrier"); }

  std::unique_ptr<Communicator> split(int color, int key) override {
    const int P = size();
    const int mine[2] = {color, key};
    std::vector<int> all(size_t(2 * P));
    all_gather(mine, all.data(), sizeof mine);
    std::vector<std::pair<int, int>> members;  // (key, old rank)
    for (int j = 0; j < P; ++j)
      if (all[size_t(2 * j)] == color) members.push_back({all[size_t(2 * j + 1)], j});
    std::sort(members.begin(), members.end());
    int new_rank = 0;
    for (size_t i = 0; i < members.size(); ++i)
      if (members[i].second == rank()) new_rank = int(i);
    const int n = int(members.size());
    const bool whole_nodes = n % ranks_per_node() == 0 && members.front().second % ranks_per_node() == 0 &&
                             members.back().second - members.front().second == n - 1;
    std::shared_ptr<World> child;
    {
      std::lock_guard<std::mutex> lk(w_->mu);
      auto& c = w_->children[{split_seq_, color}];
      if (!c) c = std::make_shared<World>(n, whole_nodes ? ranks_per_node() : 1, w_->timeout);
      child = c;
    }
    ++split_seq_;
    barrier();
    return std::make_unique<ThreadComm>(child, new_rank);
  }

 private:
  void publish(const void* p, const int64_t* counts, int64_t bytes) {
    World::Slot& s = w_->slots[size_t(rank())];
    s.ptr = p;
    s.counts = counts;
    s.bytes = bytes;
  }
  std::shared_ptr<World> w_;
  int64_t split_seq_ = 0;
};

}  // namespace

std::unique_ptr<Communicator> make_local_communicator() { return std::make_unique<LocalComm>(); }

std::vector<std::unique_ptr<Communicator>> make_thread_world(int n, int ranks_per_node, double timeout_s) {
  if (n < 1) internal_error("make_thread_world: ", n, " ranks");
  auto w = std::make_shared<World>(n, ranks_per_node <= 0 ? n : ranks_per_node, timeout_s);
  std::vector<std::unique_ptr<Communicator>> out;
  for (int r = 0; r < n; ++r) out.push_back(std::make_unique<ThreadComm>(w, r));
  return out;
}

std::unique_ptr<Communicator> make_world_communicator(int ranks_per_node) {
  if (launched_by_mpi()) {
    if (!mpi_available())
      input_error("this process was started by mpirun, but dsv3 was built without MPI (DSV3_HAVE_MPI)");
    return make_mpi_communicator(ranks_per_node);
  }
  if (ranks_per_node > 1) input_error("--ranks-per-node ", ranks_per_node, ": a single process is one rank");
  return make_local_communicator();
}

bool launched_by_mpi() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr || std::getenv("PMI_SIZE") != nullptr ||
         std::getenv("PMIX_RANK") != nullptr;
}

}  // namespace dsv3
