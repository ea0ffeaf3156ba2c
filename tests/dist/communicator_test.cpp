#include <chrono>

#include "dist/data_parallel.h"
#include "dist_test_util.h"

namespace dsv3 {
namespace {
using test::run_ranks;

std::vector<float> rank_data(int r, size_t n) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = rng_normal(77, uint64_t(r), i) * float(1 + i % 5);
  return v;
}

TEST(Communicator, LocalIsIdentity) {
  auto c = make_local_communicator();
  EXPECT_EQ(c->size(), 1);
  std::vector<float> v = rank_data(0, 9), w = v;
  c->all_reduce_sum(std::span<float>(v));
  EXPECT_EQ(v, w);
  EXPECT_EQ(c->exchange_counts(std::vector<int64_t>{5}), std::vector<int64_t>{5});
}

TEST(Communicator, AllReduceIsRankOrderSumOnEveryRank) {
  for (int P : {2, 3, 4}) {
    auto world = make_thread_world(P);
    const size_t n = 37;  // not a multiple of P: padded chunks
    std::vector<std::vector<float>> got(static_cast<size_t>(P));
    run_ranks(world, [&](int r, Communicator& c) {
      std::vector<float> v = rank_data(r, n);
      c.all_reduce_sum(std::span<float>(v));
      got[size_t(r)] = v;
    });
    std::vector<float> ref = rank_data(0, n);
    for (int r = 1; r < P; ++r) {
      std::vector<float> x = rank_data(r, n);
      for (size_t i = 0; i < n; ++i) ref[i] += x[i];
    }
    for (int r = 0; r < P; ++r) EXPECT_EQ(got[size_t(r)], ref) << "P=" << P << " rank " << r;
  }
}

TEST(Communicator, AllToAllVWithEmptyBlocks) {
  const int P = 3;
  auto world = make_thread_world(P);
  // Rank r sends (r + 1)·j bytes to rank j, except nothing to itself from rank 1.
  auto count = [](int from, int to) -> int64_t { return from == 1 && to == 1 ? 0 : (from + 1) * to; };
  run_ranks(world, [&](int r, Communicator& c) {
    std::vector<int64_t> sc(P);
    std::vector<char> send;
    for (int j = 0; j < P; ++j) {
      sc[size_t(j)] = count(r, j);
      for (int64_t b = 0; b < sc[size_t(j)]; ++b) send.push_back(char(r * 16 + j));
    }
    std::vector<int64_t> rc = c.exchange_counts(sc);
    for (int j = 0; j < P; ++j) ASSERT_EQ(rc[size_t(j)], count(j, r));
    std::vector<char> recv(size_t(rc[0] + rc[1] + rc[2]));
    c.all_to_all_v(send.data(), sc, recv.data(), rc);
    size_t k = 0;
    for (int j = 0; j < P; ++j)
      for (int64_t b = 0; b < rc[size_t(j)]; ++b) ASSERT_EQ(recv[k++], char(j * 16 + r));
  });
}

TEST(Communicator, NodeLayoutAndSplit) {
  auto world = make_thread_world(4, 2);
  run_ranks(world, [&](int r, Communicator& c) {
    EXPECT_EQ(c.node(), r / 2);
    EXPECT_EQ(c.local_rank(), r % 2);
    EXPECT_EQ(c.nodes(), 2);
    auto same_local = c.split(c.local_rank(), r);  // across nodes
    EXPECT_EQ(same_local->size(), 2);
    EXPECT_EQ(same_local->rank(), r / 2);
    auto node = c.split(c.node(), r);
    EXPECT_EQ(node->size(), 2);
    std::vector<float> v{float(r)};
    node->all_reduce_sum(std::span<float>(v));
    EXPECT_EQ(v[0], float(r / 2 * 4 + 1));  // 0+1 or 2+3
  });
}

TEST(Communicator, MissingPeerTimesOut) {
  auto world = make_thread_world(2, 0, 0.3);
  std::string msg;
  const auto t0 = std::chrono::steady_clock::now();
  try {
    world[0]->barrier();  // rank 1 never arrives
  } catch (const CommError& e) {
    msg = e.what();
  }
  EXPECT_NE(msg.find("barrier"), std::string::npos) << msg;
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 30.0);
}

TEST(DataParallel, BucketedReduceEqualsOneAllReduceBitwise) {
  const int P = 3;
  auto world = make_thread_world(P);
  const std::vector<int64_t> sizes{5, 1, 17, 8};
  auto grads_of = [&](int r) {
    std::vector<Tensor> g;
    for (size_t i = 0; i < sizes.size(); ++i) {
      Tensor t = Tensor::empty(DType::F32, {sizes[i]});
      std::vector<float> v = rank_data(r * 10 + int(i), size_t(sizes[i]));
      std::copy(v.begin(), v.end(), t.data<float>());
      g.push_back(t);
    }
    return g;
  };
  std::vector<std::vector<Tensor>> got(P);
  run_ranks(world, [&](int r, Communicator& c) {
    got[size_t(r)] = grads_of(r);
    GradientAllReduce red(c, got[size_t(r)], 7 * 4);  // buckets of 7 floats split tensors
    EXPECT_EQ(red.buckets(), 5);
    red.run(1.0f / float(P));
  });
  std::vector<std::vector<Tensor>> in(P);
  for (int r = 0; r < P; ++r) in[size_t(r)] = grads_of(r);
  for (size_t i = 0; i < sizes.size(); ++i)
    for (int64_t k = 0; k < sizes[i]; ++k) {
      float s = in[0][i].data<float>()[k];
      for (int r = 1; r < P; ++r) s += in[size_t(r)][i].data<float>()[k];
      s *= 1.0f / float(P);
      for (int r = 0; r < P; ++r) ASSERT_EQ(got[size_t(r)][i].data<float>()[k], s);
    }
}

// One rank: the sum is the gradient itself, so no collective runs, only the scale (bitwise s·g).
// (The host path's all-reduce already returned early; nccl_test.cpp checks the GPU path.)
TEST(DataParallel, OneRankMakesNoCollectiveCalls) {
  auto local = make_local_communicator();
  CountingCommunicator c(*local);
  std::vector<Tensor> g;
  for (int64_t n : {5, 40}) {
    Tensor t = Tensor::empty(DType::F32, {n});
    const std::vector<float> v = rank_data(int(n), size_t(n));
    std::copy(v.begin(), v.end(), t.data<float>());
    g.push_back(t);
  }
  std::vector<Tensor> before;
  for (const Tensor& t : g) before.push_back(t.clone());
  GradientAllReduce red(c, g, 7 * 4);
  EXPECT_EQ(red.buckets(), 7);
  red.run(0.25f);
  red.run(1.0f);
  EXPECT_EQ(c.counts().total(), 0);
  for (size_t i = 0; i < g.size(); ++i)
    for (int64_t k = 0; k < g[i].numel(); ++k) ASSERT_EQ(g[i].data<float>()[k], 0.25f * before[i].data<float>()[k]);
}

TEST(DataParallel, LoadsAndShares) {
  auto world = make_thread_world(2);
  run_ranks(world, [&](int r, Communicator& c) {
    std::vector<std::vector<int64_t>> loads{{r + 1, 0, 3}, {5, int64_t(r) * 7}};
    all_reduce_loads(c, loads);
    EXPECT_EQ(loads, (std::vector<std::vector<int64_t>>{{3, 0, 6}, {10, 7}}));
  });
  EXPECT_EQ(rank_share(8, 1, 2, "batch"), std::make_pair(int64_t(4), int64_t(8)));
  EXPECT_THROW(rank_share(7, 0, 2, "batch"), InputError);
}

}  // namespace
}  // namespace dsv3
