#include "core/error.h"

namespace dsv3 {

bool mul_overflows(unsigned long long a, unsigned long long b, unsigned long long* out) {
  return __builtin_mul_overflow(a, b, out);
}
bool add_overflows(unsigned long long a, unsigned long long b, unsigned long long* out) {
  return __builtin_add_overflow(a, b, out);
}

}  // namespace dsv3
