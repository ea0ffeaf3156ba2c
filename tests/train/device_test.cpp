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

// On a machine with a CUDA device and a CUDA build the name gives that backend; anywhere else (every
// CI machine) the error says which of the two is missing.
TEST(Device, CudaGivesTheGpuOrSaysWhyNot) {
  Backend* b = nullptr;
  const std::string e = error_of([&] { b = &backend_named("cuda"); });
  if (b) {
    EXPECT_EQ(b->device(), Device::CUDA);
    EXPECT_TRUE(e.empty());
    return;
  }
  EXPECT_TRUE(e.find("no usable CUDA device") != std::string::npos ||
              e.find("this build has no CUDA backend") != std::string::npos)
      << e;
}

}  // namespace
}  // namespace dsv3
