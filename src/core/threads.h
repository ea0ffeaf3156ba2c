// Thread count for CPU compute (OpenMP). Results are deterministic for a given count.
#pragma once

namespace dsv3 {
int num_threads();
void set_num_threads(int n);  // n <= 0: all cores
}  // namespace dsv3
