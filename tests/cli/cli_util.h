// Helpers for the CLI tests: run the `dsv3` executable and read what it writes.
#pragma once
#include <sys/wait.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace dsv3::cli_test {

struct Result {
  int status = -1;  // exit code; -1 when killed by a signal
  std::string out;
};

// Runs `dsv3 args` through the shell (stderr folded into the output when `merge_stderr`,
// otherwise discarded). The executable is the build's, or $DSV3_CLI (binaries run away from their
// build directory, as on the GPU machine).
inline Result dsv3(const std::string& args, bool merge_stderr = false) {
  const char* cli = std::getenv("DSV3_CLI");
  std::string cmd = (cli && *cli ? std::string(cli) : std::string(DSV3_BINARY_DIR) + "/dsv3") + " " + args +
                    (merge_stderr ? " 2>&1" : " 2>/dev/null");
  Result r;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

inline std::string fixture_dir(const std::string& name) {
  return std::string(DSV3_SOURCE_DIR) + "/tests/data/fixtures/" + name;
}

// A tensor from a safetensors file, converted to double (F32, F64, I64, I32 only).
struct StTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<double> values;
};

// A deliberately separate, minimal reader of the safetensors layout (8-byte little-endian header
// length, JSON header, data), so the CLI's writer is checked against the format itself rather
// than against the project's own reader. Throws std::runtime_error on anything unexpected.
inline std::map<std::string, StTensor> read_safetensors_plain(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string bytes = ss.str();
  if (bytes.size() < 8) throw std::runtime_error(path + ": shorter than 8 bytes");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(bytes[size_t(i)]);
  if (n > bytes.size() - 8) throw std::runtime_error(path + ": header length past the end");
  const auto header = nlohmann::json::parse(bytes.substr(8, n));
  const size_t data = 8 + n;
  std::map<std::string, StTensor> out;
  for (auto& [name, info] : header.items()) {
    if (name == "__metadata__") continue;
    StTensor t;
    t.dtype = info.at("dtype").get<std::string>();
    t.shape = info.at("shape").get<std::vector<int64_t>>();
    const uint64_t b = info.at("data_offsets")[0], e = info.at("data_offsets")[1];
    if (b > e || e > bytes.size() - data) throw std::runtime_error(path + ": " + name + ": bad data_offsets");
    const char* p = bytes.data() + data + b;
    auto take = [&](auto zero) {
      using T = decltype(zero);
      if ((e - b) % sizeof(T)) throw std::runtime_error(path + ": " + name + ": size not a multiple of the dtype");
      for (size_t i = 0; i < (e - b) / sizeof(T); ++i) {
        T v;
        std::memcpy(&v, p + i * sizeof(T), sizeof(T));
        t.values.push_back(double(v));
      }
    };
    if (t.dtype == "F32") take(float{});
    else if (t.dtype == "F64") take(double{});
    else if (t.dtype == "I64") take(int64_t{});
    else if (t.dtype == "I32") take(int32_t{});
    else continue;  // not needed by the tests
    out.emplace(name, std::move(t));
  }
  return out;
}

}  // namespace dsv3::cli_test
