// Backends by device name, for the command line (`--device`).
#include "backend/ops.h"
#include "core/error.h"
#ifdef DSV3_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#endif

namespace dsv3 {

Backend& backend_named(const std::string& device) {
  if (device == "cpu") return cpu_backend();
  if (device == "cuda") {
#ifdef DSV3_HAVE_CUDA
    if (cuda_device_count() == 0) input_error("--device cuda: no usable CUDA device (driver or GPU missing)");
    return cuda_backend();
#else
    input_error("--device cuda: this build has no CUDA backend (configure with -DDSV3_CUDA=ON on a machine with nvcc)");
#endif
  }
  input_error("--device '", device, "': expected cpu or cuda");
}

}  // namespace dsv3
