// `--device`: names are checked, and asking for CUDA where there is none (every CI machine) is an
// InputError that says what is missing, before any work starts.
#include <gtest/gtest.h>

#include "backend/ops.h"
#include "core/error.h"
#include "train/trainer.h"

namespace dsv3 {
namespace {

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

TEST(Device, NamesAreChecked) {
  EXPECT_EQ(&backend_named("cpu"), &cpu_backend());
  EXPECT_NE(error_of([] { backend_named("tpu"); }).find("--device 'tpu': expected cpu or cuda"), std::string::npos);
  TrainOptions o;
  o.data_dir = "unused";
  o.device = "gpu";
  EXPECT_NE(error_of([&] { o.validate(); }).find("--device 'gpu'"), std::string::npos);
}

TEST(Device, CudaWithoutAGpuSaysWhy) {
  const std::string e = error_of([] { backend_named("cuda"); });
  if (e.empty()) GTEST_SKIP() << "this machine has a CUDA device (tests/gpu covers training on it)";
  EXPECT_TRUE(e.find("no usable CUDA device") != std::string::npos ||
              e.find("this build has no CUDA backend") != std::string::npos)
      << e;
}

}  // namespace
}  // namespace dsv3
