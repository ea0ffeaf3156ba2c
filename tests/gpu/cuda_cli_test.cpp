// `dsv3 generate --device cuda` and `dsv3 chat --device cuda`, the CLI end to end on the GPU
// (checkpoint load, the CUDA engine with its graphs, device greedy, MTP drafts, FP8 weights), print what the CPU
// engine prints with the same BF16 latent cache. The executable is the build's, or $DSV3_CLI.
#include <gtest/gtest.h>

#include <fstream>
#include <string>

#include "../cli/chat_model.h"
#include "../cli/cli_util.h"
#include "backend/cuda/cuda_backend.h"

namespace dsv3::test {
namespace {

using cli_test::dsv3;
using cli_test::fixture_dir;
using cli_test::Result;

// stdout only; on failure, the run again with stderr for the message.
Result run(const std::string& args) {
  Result r = dsv3(args);
  if (r.status != 0) r.out = dsv3(args, true).out;
  return r;
}

// `dsv3 <args> --device cpu --threads 1` and `dsv3 <args> --device cuda` both succeed and print the
// same, non-empty stdout, which is returned.
std::string expect_cuda_prints_the_cpu(const std::string& args) {
  const Result cpu = run(args + "--device cpu --threads 1");
  EXPECT_EQ(cpu.status, 0) << cpu.out;
  EXPECT_FALSE(cpu.out.empty());
  const Result gpu = run(args + "--device cuda");
  EXPECT_EQ(gpu.status, 0) << gpu.out;
  EXPECT_EQ(gpu.out, cpu.out);
  return cpu.out;
}

TEST(CudaCli, GenerateOnCudaPrintsTheCpuGreedyIds) {
  ASSERT_GT(cuda_device_count(), 0);
  for (const char* fixture : {"v3_hub_yarn_mtp1", "v2_lite_greedy"}) {
    SCOPED_TRACE(fixture);
    const std::string base = "generate -m " + fixture_dir(fixture) +
                             " --prompt-ids \"0 5 7 11 3\" -n 12 --temp 0 --ignore-eos --print-ids --cache-type bf16 ";
    const std::string cpu = expect_cuda_prints_the_cpu(base);
    if (std::string(fixture) == "v3_hub_yarn_mtp1") {  // speculative decoding with its MTP module
      const Result mtp = run(base + "--device cuda --mtp 1");
      ASSERT_EQ(mtp.status, 0) << mtp.out;
      EXPECT_EQ(mtp.out, cpu);
      // The matrices quantized to FP8 blocks at load (V3's release format): a different model, the
      // GPU's FP8 decode kernels against the CPU's dequantized weights.
      expect_cuda_prints_the_cpu(base + "--weights fp8 ");
    }
  }
}

// `dsv3 chat --device cuda`: two greedy turns (the second with the first in its context) print what
// the CPU engine prints with the same BF16 cache, on a small random model with a trained tokenizer.
TEST(CudaCli, ChatOnCudaRepliesAsTheCpu) {
  ASSERT_GT(cuda_device_count(), 0);
  const cli_test::ChatModelDir model("dsv3_cuda_chat");
  const std::string& dir = model.path;
  std::ofstream(dir + "/turns.txt") << "hello there\nand again\n";
  expect_cuda_prints_the_cpu("chat -m " + dir + " -q --temp 0 -n 8 --cache-type bf16 < " + dir + "/turns.txt ");
}

}  // namespace
}  // namespace dsv3::test
