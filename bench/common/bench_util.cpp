#include "common/bench_util.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <memory>
#include <thread>

namespace dsv3::bench {

namespace {
std::string run(const std::string& cmd) {
  std::array<char, 512> buf{};
  std::string out;
  std::unique_ptr<FILE, int (*)(FILE*)> p(popen(cmd.c_str(), "r"), pclose);
  if (!p) return "";
  while (fgets(buf.data(), int(buf.size()), p.get())) out += buf.data();
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}
}  // namespace

nlohmann::json provenance() {
  nlohmann::json j;
  // bench/gpu.sh names the commit its binaries were built from (the GPU machine may run them in a
  // copy of the tree whose git state is not theirs); otherwise the checkout's.
  if (const char* c = std::getenv("DSV3_COMMIT"); c && *c) {
    j["commit"] = c;
    j["commit_source"] = "DSV3_COMMIT";
  } else {
    j["commit"] = run("git -C " DSV3_SOURCE_DIR " rev-parse --short HEAD 2>/dev/null");
    j["dirty"] = !run("git -C " DSV3_SOURCE_DIR " status --porcelain --untracked-files=no 2>/dev/null").empty();
  }
  std::time_t t = std::time(nullptr);
  char date[32];
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  j["date"] = date;
  j["machine"] = {{"cpu", run("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'")},
                  {"cores", std::thread::hardware_concurrency()},
                  {"gpu", run("nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1")}};
  return j;
}

std::string write_result(const std::string& name, nlohmann::json result) {
  nlohmann::json out = provenance();
  out.update(result);
  std::string dir = std::string(DSV3_SOURCE_DIR) + "/bench/results";
  std::string path = dir + "/" + name + ".json", tmp = path + ".tmp";
  {
    std::ofstream f(tmp);
    f << out.dump(2) << "\n";
    if (!f) return "";
  }
  std::rename(tmp.c_str(), path.c_str());
  return path;
}

int check_pair_args(int argc, char** argv, const char* usage) {
  for (int i = 1; i < argc; ++i)
    if (!std::strcmp(argv[i], "--help") || !std::strcmp(argv[i], "-h")) {
      std::fputs(usage, stdout);
      return 0;
    }
  if (argc % 2 == 0) {  // a flag without its value (argv[0] plus pairs is odd)
    std::fprintf(stderr, "%s: %s needs a value\n%s", argv[0], argv[argc - 1], usage);
    return 2;
  }
  return -1;
}

std::vector<std::string> split_list(const std::string& v) {
  std::vector<std::string> out;
  for (size_t a = 0; a <= v.size();) {
    const size_t b = std::min(v.find(',', a), v.size());
    out.push_back(v.substr(a, b - a));
    a = b + 1;
  }
  return out;
}

}  // namespace dsv3::bench
