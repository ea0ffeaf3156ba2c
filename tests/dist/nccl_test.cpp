// The NCCL communicator on every rank of its world: a world of one when run alone, N ranks under
// scripts/launch_gpus.sh -n N (or mpirun). Device and host buffers both travel; sums come out in
// rank order, bitwise the same on every rank; split groups work; the data-parallel gradient
// all-reduce on device tensors equals the host formula bitwise. Registered under the label gpu
// (cmake/mpi_tests.cmake), which CI does not run.
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "dist/communicator.h"
#include "dist/data_parallel.h"

#if DSV3_HAVE_NCCL
#include <cuda_runtime.h>
#endif

namespace dsv3 {
namespace {

#if DSV3_HAVE_NCCL
// Byte i of the block rank s sends rank d.
char pattern(int s, int d, int64_t i) { return char(s * 31 + d * 7 + i * 13 + 1); }
int64_t block_bytes(int s, int d) { return 100 + 37 * s + 11 * d; }
float value(int r, int64_t i) { return float(r + 1) * 0.37f + float(i % 97) * 1e-3f + 1.0f / float(i + 3); }

struct DeviceBuf {
  explicit DeviceBuf(size_t n) : bytes(n) { EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(n, 1)), cudaSuccess); }
  ~DeviceBuf() { cudaFree(p); }
  void put(const std::vector<char>& h) { ASSERT_EQ(cudaMemcpy(p, h.data(), h.size(), cudaMemcpyHostToDevice), cudaSuccess); }
  std::vector<char> get() const {
    std::vector<char> h(bytes);
    EXPECT_EQ(cudaMemcpy(h.data(), p, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }
  void* p = nullptr;
  size_t bytes;
};

std::unique_ptr<Communicator> world() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) return nullptr;
  return make_nccl_world();
}

TEST(Nccl, AllToAllHostAndDeviceBuffers) {
  auto c = world();
  ASSERT_TRUE(c) << "needs a GPU (ctest -L gpu)";
  const int P = c->size(), r = c->rank();
  std::vector<int64_t> sb(static_cast<size_t>(P)), rb(static_cast<size_t>(P));
  std::vector<char> send, want;
  for (int j = 0; j < P; ++j) {
    sb[size_t(j)] = block_bytes(r, j);
    rb[size_t(j)] = block_bytes(j, r);
    for (int64_t i = 0; i < sb[size_t(j)]; ++i) send.push_back(pattern(r, j, i));
    for (int64_t i = 0; i < rb[size_t(j)]; ++i) want.push_back(pattern(j, r, i));
  }
  std::vector<char> got(want.size());
  c->all_to_all_v(send.data(), sb, got.data(), rb);
  EXPECT_EQ(got, want) << "host buffers, rank " << r;
  DeviceBuf ds(send.size()), dr(want.size());
  ds.put(send);
  c->all_to_all_v(ds.p, sb, dr.p, rb);
  EXPECT_EQ(dr.get(), want) << "device buffers, rank " << r;
  // Mixed: device send, host receive.
  std::fill(got.begin(), got.end(), 0);
  c->all_to_all_v(ds.p, sb, got.data(), rb);
  EXPECT_EQ(got, want) << "device to host, rank " << r;
}

TEST(Nccl, GatherBroadcastBarrierAndRankOrderSums) {
  auto c = world();
  ASSERT_TRUE(c) << "needs a GPU (ctest -L gpu)";
  const int P = c->size(), r = c->rank();
  int64_t mine = 1000 + r;
  std::vector<int64_t> all(static_cast<size_t>(P));
  c->all_gather(&mine, all.data(), sizeof mine);
  for (int j = 0; j < P; ++j) EXPECT_EQ(all[size_t(j)], 1000 + j);
  std::vector<char> b(333, r == P - 1 ? 'x' : 'o');
  c->broadcast(b.data(), int64_t(b.size()), P - 1);
  EXPECT_EQ(b, std::vector<char>(333, 'x'));
  c->barrier();
  std::vector<float> x(5000);
  for (size_t i = 0; i < x.size(); ++i) x[i] = value(r, int64_t(i));
  c->all_reduce_sum(std::span<float>(x));
  for (size_t i = 0; i < x.size(); ++i) {
    float s = value(0, int64_t(i));
    for (int j = 1; j < P; ++j) s += value(j, int64_t(i));
    ASSERT_EQ(x[i], s) << "element " << i;  // the rank-order sum, bit for bit
  }
}

TEST(Nccl, SplitGroups) {
  auto c = world();
  ASSERT_TRUE(c) << "needs a GPU (ctest -L gpu)";
  const int P = c->size(), r = c->rank();
  // EXPECT, not ASSERT, before a collective: a rank that left early would leave its peers waiting.
  auto g = c->split(r % 2, r);
  EXPECT_EQ(g->size(), (P - r % 2 + 1) / 2);
  EXPECT_EQ(g->rank(), r / 2);
  std::vector<int> members(static_cast<size_t>(g->size()));
  g->all_gather(&r, members.data(), sizeof r);
  for (int k = 0; k < g->size(); ++k) EXPECT_EQ(members[size_t(k)], 2 * k + r % 2);
  g->barrier();
  // The whole world as one group (what --ep N over N ranks makes): same ranks, same node layout.
  auto all = c->split(0, r);
  EXPECT_EQ(all->size(), P);
  EXPECT_EQ(all->rank(), r);
  EXPECT_EQ(all->ranks_per_node(), c->ranks_per_node());
  std::vector<int> everyone(static_cast<size_t>(P));
  all->all_gather(&r, everyone.data(), sizeof r);
  for (int k = 0; k < P; ++k) EXPECT_EQ(everyone[size_t(k)], k);
}

TEST(Nccl, DeviceGradientAllReduceEqualsHostFormula) {
  auto c = world();
  ASSERT_TRUE(c) << "needs a GPU (ctest -L gpu)";
  const int P = c->size(), r = c->rank();
  Backend& be = backend_named("cuda");
  // Three tensors, a bucket that splits the middle one, so pieces and buckets both get exercised.
  const std::vector<Shape> shapes{{7, 5}, {1000}, {3, 4, 5}};
  std::vector<Tensor> dev, want;
  int64_t off = 0;
  for (const Shape& s : shapes) {
    Tensor h = Tensor::empty(DType::F32, s), w = Tensor::empty(DType::F32, s);
    for (int64_t i = 0; i < h.numel(); ++i) {
      h.data<float>()[i] = value(r, off + i);
      float sum = value(0, off + i);
      for (int j = 1; j < P; ++j) sum += value(j, off + i);
      w.data<float>()[i] = sum * 0.25f;
    }
    off += h.numel();
    dev.push_back(be.to_device(h));
    want.push_back(w);
  }
  CountingCommunicator counted(*c);
  GradientAllReduce ar(counted, dev, 4 * 300);
  EXPECT_GT(ar.buckets(), 2);
  ar.run(0.25f);
  // One rank exchanges nothing (only the scale runs); several: an all-to-all and an all-gather per bucket.
  EXPECT_EQ(counted.counts().all_to_all_v, P == 1 ? 0 : ar.buckets());
  EXPECT_EQ(counted.counts().all_gather, P == 1 ? 0 : ar.buckets());
  EXPECT_EQ(counted.counts().total(), P == 1 ? 0 : 2 * ar.buckets());
  for (size_t t = 0; t < dev.size(); ++t) {
    const Tensor got = be.to_host(dev[t]);
    for (int64_t i = 0; i < got.numel(); ++i)
      ASSERT_EQ(got.data<float>()[i], want[t].data<float>()[i]) << "tensor " << t << " element " << i;
  }
}
#else
TEST(Nccl, UnavailableWithoutNccl) {
  EXPECT_FALSE(nccl_available());
  EXPECT_THROW(make_nccl_world(), InputError);
}
#endif

}  // namespace
}  // namespace dsv3
