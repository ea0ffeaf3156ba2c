#include "backend/cuda/pdl.h"

#include "backend/cuda/pdl.cuh"

#include <cstdlib>
#include <string>

namespace dsv3 {
namespace cuda {
namespace {
bool& pdl_flag() {
  static bool on = [] {
    const char* e = std::getenv("DSV3_CUDA_PDL");
    return !(e && std::string(e) == "0");
  }();
  return on;
}
}  // namespace

bool pdl_enabled() { return pdl_flag(); }
}  // namespace cuda

void cuda_set_pdl(bool on) { cuda::pdl_flag() = on; }

}  // namespace dsv3
