// Cost of the calls one speculative round is made of, against a plain decode step: the main forward
// over 1..4 rows (verification of 0..3 drafts, logits for every row) and the MTP module over 1 and 2
// rows (drafting; logits for the last), after a 40-token prefill, through the runner's lean and
// general step paths (infer/runner.h). Per call: wall time and the calling thread's CPU time (the
// figure to read on a loaded machine at 1 thread), each the median of 5 batches.
//
//   dsv3_bench_decode_steps (--model DIR | --preset NAME) [--threads N] [--calls N]
// Writes bench/results/decode_steps_<model name>.json.
#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>

#include "common/bench_util.h"
#include "core/threads.h"
#include "infer/runner.h"
#include "model/presets.h"

using namespace dsv3;
using bench::now_s;

namespace {

double cpu_s() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

double median5(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string model, preset;
  int64_t calls = 0;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--model") && i + 1 < argc) model = argv[++i];
    else if (!std::strcmp(argv[i], "--preset") && i + 1 < argc) preset = argv[++i];
    else if (!std::strcmp(argv[i], "--threads") && i + 1 < argc) set_num_threads(std::atoi(argv[++i]));
    else if (!std::strcmp(argv[i], "--calls") && i + 1 < argc) calls = std::atoll(argv[++i]);
    else {
      std::fprintf(stderr, "usage: %s (--model DIR | --preset NAME) [--threads N] [--calls N]\n", argv[0]);
      return 2;
    }
  }
  if (model.empty() == preset.empty()) {
    std::fprintf(stderr, "give one of --model DIR or --preset NAME\n");
    return 2;
  }
  const Weights w = model.empty() ? Weights::random(preset_config(preset), 1) : Weights::load(model);
  const ModelConfig& c = w.config();
  const std::string name = model.empty() ? preset : model;
  if (calls <= 0) calls = c.hidden_size <= 256 ? 300 : 5;  // per batch of the median
  const int64_t P = 40;

  nlohmann::json out;
  out["model"] = name;
  out["threads"] = num_threads();
  out["calls_per_batch"] = calls;
  out["prefill"] = P;
  out["calls"] = nlohmann::json::array();
  double load0[3] = {0, 0, 0};
  getloadavg(load0, 3);
  out["load_average_1min"] = load0[0];
  std::printf("%s, %d threads, %lld calls x 5 batches per figure (median), load average %.1f\n", name.c_str(),
              num_threads(), (long long)calls, load0[0]);
  std::printf("| step path | call | rows | wall us | cpu us | cpu / main 1 row |\n|---|---|---|---|---|---|\n");
  for (const bool lean : {true, false}) {
    ModelRunner runner(w);
    runner.set_small_rows(lean ? 8 : 0);
    const ModelDims& d = runner.dims();
    LatentKvPool pool(runner.num_layers() + runner.num_mtp(), d.kv_lora, d.rope,
                      KvCacheOptions{64, uint64_t(64) << 20, DType::F32});
    BlockTable table;
    pool.reserve(table, P + 8);
    LatentAttention cache(pool, runner.absorbed(), d);
    cache.tables = {&table};
    {
      StepRows rows;
      std::vector<int32_t> toks;
      for (int64_t i = 0; i < P; ++i) {
        rows.seq.push_back(0);
        rows.pos.push_back(i);
        toks.push_back(int32_t((i * 131 + 7) % c.vocab_size));
      }
      runner.forward(cache, rows, toks, std::vector<int32_t>{int32_t(P - 1)});
    }
    double base = 0;
    struct Call {
      bool mtp;
      int64_t n;
    };
    std::vector<Call> list = {{false, 1}, {false, 2}, {false, 3}, {false, 4}};
    if (runner.num_mtp() > 0) list.insert(list.end(), {{true, 1}, {true, 2}});
    for (const Call& k : list) {
      StepRows rows;
      std::vector<int32_t> toks, lr;
      for (int64_t i = 0; i < k.n; ++i) {
        rows.seq.push_back(0);
        rows.pos.push_back(P + i);
        toks.push_back(int32_t((i * 977 + 100) % c.vocab_size));
        if (!k.mtp || i == k.n - 1) lr.push_back(int32_t(i));
      }
      const Tensor h = Tensor::zeros(DType::F32, {k.n, c.hidden_size});
      auto call = [&] {
        if (k.mtp)
          runner.mtp_forward(1, cache, rows, toks, h, lr);
        else
          runner.forward(cache, rows, toks, lr);
      };
      call();  // warm-up
      std::vector<double> wall, cpu;
      for (int b = 0; b < 5; ++b) {
        const double w0 = now_s(), c0 = cpu_s();
        for (int64_t i = 0; i < calls; ++i) call();
        cpu.push_back((cpu_s() - c0) / double(calls));
        wall.push_back((now_s() - w0) / double(calls));
      }
      const double wm = median5(wall), cm = median5(cpu);
      if (!k.mtp && k.n == 1) base = cm;
      const char* path = lean ? "lean" : "general";
      std::printf("| %s | %s | %lld | %.1f | %.1f | %.2f |\n", path, k.mtp ? "MTP module" : "main forward",
                  (long long)k.n, 1e6 * wm, 1e6 * cm, cm / base);
      std::fflush(stdout);
      out["calls"].push_back({{"step_path", path}, {"call", k.mtp ? "mtp" : "main"}, {"rows", k.n},
                             {"wall_us", 1e6 * wm}, {"cpu_us", 1e6 * cm}, {"cpu_vs_main_1_row", cm / base}});
    }
  }
  std::string tag = name;
  for (char& ch : tag)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  const std::string path = bench::write_result("decode_steps_" + tag, out);
  std::printf("\nwrote %s\n", path.c_str());
  return 0;
}
