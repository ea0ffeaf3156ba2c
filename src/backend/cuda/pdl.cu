#include "backend/cuda/pdl.h"

#include <utility>

#include "backend/cuda/pdl.cuh"

namespace dsv3 {
namespace cuda {
namespace {
bool& pdl_flag() {
  static bool on = on_unless_env_zero("DSV3_CUDA_PDL");
  return on;
}
}  // namespace

bool pdl_enabled() { return pdl_flag(); }
}  // namespace cuda

bool cuda_set_pdl(bool on) { return std::exchange(cuda::pdl_flag(), on); }

}  // namespace dsv3
