// Shared helpers of the inference tests: golden fixtures and error measures.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "model/weights.h"

namespace dsv3::testing {

inline std::string fixture_dir(const std::string& name) {
  return std::string(DSV3_SOURCE_DIR) + "/tests/data/fixtures/" + name;
}

inline const std::vector<std::string>& all_fixtures() {
  static const std::vector<std::string> f = {"v3_hub_yarn_mtp1", "v3_qnull_groups_mtp2", "v3_tf5_yarn_mtp1_sharded",
                                             "v3_fp8_h160",      "v2_lite_greedy",       "v2_group_limited"};
  return f;
}
inline const std::vector<std::string>& mtp_fixtures() {
  static const std::vector<std::string> f = {"v3_hub_yarn_mtp1", "v3_qnull_groups_mtp2", "v3_tf5_yarn_mtp1_sharded"};
  return f;
}

struct Expected {
  SafetensorsFile file;
  std::vector<int32_t> ids;
  Tensor row_major(const std::string& name) const { return file.tensor(name).to(DType::F32); }
};
inline Expected load_expected(const std::string& name) {
  Expected e{SafetensorsFile::open(fixture_dir(name) + "/expected.safetensors"), {}};
  const Tensor ids = e.file.tensor("input_ids");
  for (int64_t i = 0; i < ids.numel(); ++i) e.ids.push_back(int32_t(load_as_float(ids.raw(), ids.dtype(), size_t(i))));
  return e;
}

// max|a − b| / max|b| over n values.
inline double rel_err(const float* a, const float* b, int64_t n) {
  double num = 0.0, den = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    num = std::max(num, double(std::fabs(a[i] - b[i])));
    den = std::max(den, double(std::fabs(b[i])));
  }
  return den > 0 ? num / den : num;
}

}  // namespace dsv3::testing
