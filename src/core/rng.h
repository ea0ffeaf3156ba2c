// Counter-based random numbers: value i of stream s under seed k is a pure function of (k, s, i),
// so results do not depend on thread count or the order in which elements are drawn.
#pragma once
#include <cmath>
#include <cstdint>

namespace dsv3 {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

inline uint64_t rng_u64(uint64_t seed, uint64_t stream, uint64_t i) {
  return splitmix64(splitmix64(seed ^ splitmix64(stream)) + i);
}

// Uniform in [0, 1) with 24 random bits.
inline float rng_uniform(uint64_t seed, uint64_t stream, uint64_t i) {
  return float(rng_u64(seed, stream, i) >> 40) * (1.0f / 16777216.0f);
}

// Standard normal by Box–Muller over two independent draws.
inline float rng_normal(uint64_t seed, uint64_t stream, uint64_t i) {
  uint64_t r = rng_u64(seed, stream, i);
  double u1 = (double((r >> 11) & ((1ull << 26) - 1)) + 0.5) / double(1ull << 26);
  double u2 = double(r >> 37) / double(1ull << 27);
  return float(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

// A sequential generator for sampling and shuffling, with a state that can be saved.
struct Rng {
  uint64_t seed = 0, counter = 0;
  uint64_t next_u64() { return rng_u64(seed, 0x5eed, counter++); }
  float uniform() { return float(next_u64() >> 40) * (1.0f / 16777216.0f); }
  uint64_t below(uint64_t n) { return n ? next_u64() % n : 0; }
};

}  // namespace dsv3
