// Shared by the benchmark programs: wall-clock timing and the JSON record every result carries
// (commit, date, machine), written to bench/results/<name>.json.
#pragma once
#include <chrono>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace dsv3::bench {

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// {"commit", "date", "machine": {"cpu", "cores", "gpu"}} for the current checkout and machine.
nlohmann::json provenance();

// Write `result` (merged with provenance()) to <repo>/bench/results/<name>.json, atomically.
// Returns the path written.
std::string write_result(const std::string& name, nlohmann::json result);

// For programs that take "--flag value" pairs, before parsing them: 0 after printing `usage` to
// stdout for --help or -h, 2 (usage on stderr) when the last flag has no value, -1 to go on.
int check_pair_args(int argc, char** argv, const char* usage);

// "a,b,c" → {"a", "b", "c"} (a flag's comma-separated list; empty items kept).
std::vector<std::string> split_list(const std::string& v);

}  // namespace dsv3::bench
