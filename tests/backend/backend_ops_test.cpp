// The runner of the generic backend harness: every registered op case on every backend.
// Checks per output: normalised error against the double reference within the case's tolerance,
// no NaN/Inf, guard bytes intact; on every backend but the CPU, also against the CPU's output;
// and on the CPU, bitwise-equal results when run twice with the same thread count.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "backend/cpu/cpu_backend.h"
#include "core/threads.h"
#include "harness.h"

namespace dsv3::test {

std::vector<OpCase>& op_cases() {
  static std::vector<OpCase> cases;
  return cases;
}

std::vector<Backend*>& registered_backends() {
  static std::vector<Backend*> b;
  return b;
}

std::vector<Backend*> test_backends() {
  std::vector<Backend*> v{&cpu_backend()};
  for (Backend* b : registered_backends()) v.push_back(b);
  return v;
}

namespace {

constexpr uint64_t kSeed = 20250101;

std::string describe(const Output& o, const Err& e) {
  Vec g = to_vec(o.got);
  std::string at = e.worst >= 0 ? cat(" worst at flat index ", e.worst, ": got ", g[size_t(e.worst)], ", want ",
                                      o.want[size_t(e.worst)])
                                : std::string();
  return cat(o.name, " ", o.got.shape().str(), ": max|Δ|/max|ref| = ", e.norm_err, " (tolerance ", o.tol, "), ",
             e.non_finite, " non-finite", at);
}

class BackendOps : public ::testing::TestWithParam<size_t> {};

TEST_P(BackendOps, MatchesReference) {
  const OpCase& c = op_cases()[GetParam()];
  std::vector<Output> cpu_out;
  for (Backend* b : test_backends()) {
    SCOPED_TRACE(cat("case ", c.name, " on backend ", b->name()));
    Guards guards(*b);
    std::vector<Output> outs = c.run(*b, guards, kSeed);
    ASSERT_FALSE(outs.empty());
    for (const Output& o : outs) {
      ASSERT_EQ(o.got.numel(), int64_t(o.want.size())) << o.name;
      Err e = compare(o.got, o.want);
      EXPECT_EQ(e.non_finite, 0) << describe(o, e);
      EXPECT_LE(e.norm_err, o.tol) << describe(o, e);
      if (std::getenv("DSV3_TEST_VERBOSE")) std::printf("%s/%s: %s\n", b->name().c_str(), c.name.c_str(), describe(o, e).c_str());
    }
    EXPECT_EQ(guards.damaged(), "") << "writes outside an output";
    if (b->device() == Device::CPU) {
      cpu_out = outs;
      continue;
    }
    for (size_t i = 0; i < outs.size() && i < cpu_out.size(); ++i) {
      Err e = compare(outs[i].got, to_vec(cpu_out[i].got));
      EXPECT_LE(e.norm_err, outs[i].tol) << "against the CPU backend: " << describe(outs[i], e);
    }
  }
}

// Same inputs, same thread count → the same bits, for 1 and 2 threads.
TEST_P(BackendOps, CpuIsDeterministic) {
  const OpCase& c = op_cases()[GetParam()];
  int saved = num_threads();
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    Guards g1(cpu_backend()), g2(cpu_backend());
    std::vector<Output> a = c.run(cpu_backend(), g1, kSeed), b = c.run(cpu_backend(), g2, kSeed);
    for (size_t i = 0; i < a.size(); ++i)
      EXPECT_EQ(std::memcmp(a[i].got.raw(), b[i].got.raw(), a[i].got.nbytes()), 0)
          << c.name << "." << a[i].name << " differs between two runs with " << threads << " threads";
  }
  set_num_threads(saved);
}

std::vector<size_t> case_indices() {
  std::vector<size_t> v(op_cases().size());
  for (size_t i = 0; i < v.size(); ++i) v[i] = i;
  return v;
}

INSTANTIATE_TEST_SUITE_P(AllOps, BackendOps, ::testing::ValuesIn(case_indices()),
                         [](const ::testing::TestParamInfo<size_t>& i) { return op_cases()[i.param].name; });

}  // namespace
}  // namespace dsv3::test
