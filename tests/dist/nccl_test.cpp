// The NCCL communicator as a world of one (the single-GPU machine): the primitives move device
// bytes correctly. Registered under the label gpu (cmake/mpi_tests.cmake), which CI does not run.
#include <gtest/gtest.h>

#include <vector>

#include "dist/communicator.h"

#if DSV3_HAVE_NCCL
#include <cuda_runtime.h>
#endif

namespace dsv3 {
namespace {

TEST(Nccl, OneRankCommunicatorMovesDeviceBytes) {
#if DSV3_HAVE_NCCL
  int devices = 0;
  ASSERT_TRUE(cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0) << "needs a GPU (ctest -L gpu)";
  auto c = make_nccl_communicator(nullptr, 0);
  ASSERT_EQ(c->size(), 1);
  std::vector<char> host(1000);
  for (size_t i = 0; i < host.size(); ++i) host[i] = char(i * 7 + 1);
  char *a = nullptr, *b = nullptr;
  ASSERT_EQ(cudaMalloc(&a, host.size()), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&b, host.size()), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(a, host.data(), host.size(), cudaMemcpyHostToDevice), cudaSuccess);
  const std::vector<int64_t> n{int64_t(host.size())};
  c->all_to_all_v(a, n, b, n);
  std::vector<char> back(host.size());
  ASSERT_EQ(cudaMemcpy(back.data(), b, back.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(back, host);
  ASSERT_EQ(cudaMemset(b, 0, host.size()), cudaSuccess);
  c->all_gather(a, b, int64_t(host.size()));
  ASSERT_EQ(cudaMemcpy(back.data(), b, back.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(back, host);
  c->broadcast(a, int64_t(host.size()), 0);
  c->barrier();
  cudaFree(a);
  cudaFree(b);
#else
  EXPECT_FALSE(nccl_available());
  EXPECT_THROW(make_nccl_communicator(nullptr, 0), InputError);
#endif
}

}  // namespace
}  // namespace dsv3
