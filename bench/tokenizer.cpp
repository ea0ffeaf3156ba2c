// Tokenizer encode speed on one thread over the ≥ 1 MB mixed corpus (tests/data/tokenizer + the
// generated fragments), against the npm oracle (@lenml/tokenizers, transformers.js) in the same
// run. The oracle's time is measured inside node around its encode loop only (no start-up, no
// loading). Both start with an empty pre-token cache; "warm" repeats ours with the cache filled.
// Also times BPE training (4096 ids) on the corpus. Prints a table and writes
// bench/results/tokenizer.json.
//   dsv3_bench_tokenizer [--quick]
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/bench_util.h"
#include "core/error.h"
#include "io/tokenizer.h"
#include "io/tokenizer_corpus.h"
#include "io/tokenizer_train.h"

using namespace dsv3;

namespace {

struct Row {
  std::string name;
  size_t bytes = 0, ids = 0;
  double ours_cold_s = 0, ours_warm_s = 0, oracle_s = -1;
  bool identical = false;
};

// Encode seconds reported by tools/tokenizer_oracle.js, and its ids (to check we timed equal work).
double run_oracle(const std::string& which, const std::vector<std::string>& texts,
                  std::vector<std::vector<int32_t>>& ids) {
  auto dir = std::filesystem::temp_directory_path();
  std::string in = (dir / "dsv3_bench_tok_in.json").string(), out = (dir / "dsv3_bench_tok_out.json").string();
  std::ofstream(in, std::ios::binary) << nlohmann::json(texts).dump();
  std::string cmd = "node " DSV3_SOURCE_DIR "/tools/tokenizer_oracle.js --json --tokenizer " + which +
                    " --input " + in + " --output " + out;
  int rc = std::system(cmd.c_str());
  std::filesystem::remove(in);
  if (rc != 0) return -1;
  nlohmann::json j = nlohmann::json::parse(std::ifstream(out, std::ios::binary));
  std::filesystem::remove(out);
  ids = j["ids"].get<std::vector<std::vector<int32_t>>>();
  return j["encode_seconds"].get<double>();
}

Row measure(const std::string& name, size_t min_bytes) {
  Row r;
  r.name = name;
  std::string path = DSV3_SOURCE_DIR "/tools/npm/node_modules/@lenml/tokenizer-" + name + "/models/tokenizer.json";
  if (!std::filesystem::exists(path))
    input_error(path, ": missing; run scripts/setup.sh --deps to install the npm fixtures");
  Tokenizer tok = Tokenizer::load(path);
  TokenizerCorpusOptions opt;
  opt.source_dir = DSV3_SOURCE_DIR;
  opt.min_bytes = min_bytes;
  for (auto& t : tok.added_tokens()) opt.specials.push_back(t.content);
  std::vector<std::string> corpus = make_tokenizer_corpus(opt);
  for (auto& s : corpus) r.bytes += s.size();

  std::vector<std::vector<int32_t>> ours(corpus.size());
  double t0 = bench::now_s();
  for (size_t i = 0; i < corpus.size(); ++i) ours[i] = tok.encode(corpus[i], false);
  r.ours_cold_s = bench::now_s() - t0;
  for (auto& v : ours) r.ids += v.size();
  t0 = bench::now_s();
  for (size_t i = 0; i < corpus.size(); ++i) ours[i] = tok.encode(corpus[i], false);
  r.ours_warm_s = bench::now_s() - t0;

  std::vector<std::vector<int32_t>> theirs;
  r.oracle_s = run_oracle(name, corpus, theirs);
  r.identical = theirs == ours;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  size_t bytes = quick ? (256u << 10) : (1u << 20);
  try {
    std::vector<Row> rows;
    for (const char* name : {"deepseek_v3", "qwen3", "llama3"}) rows.push_back(measure(name, bytes));

    std::printf("Tokenizer encode, one thread (MB = 2^20 bytes)\n");
    std::printf("%-12s %9s %8s %12s %12s %12s %8s %9s\n", "tokenizer", "bytes", "ids", "ours MB/s",
                "warm MB/s", "npm MB/s", "speedup", "same ids");
    nlohmann::json out = nlohmann::json::array();
    for (auto& r : rows) {
      double mb = double(r.bytes) / double(1 << 20);
      double ours = mb / r.ours_cold_s, warm = mb / r.ours_warm_s;
      double npm = r.oracle_s > 0 ? mb / r.oracle_s : 0;
      std::printf("%-12s %9zu %8zu %12.2f %12.2f %12.2f %7.1fx %9s\n", r.name.c_str(), r.bytes, r.ids, ours,
                  warm, npm, npm > 0 ? ours / npm : 0.0, r.identical ? "yes" : "NO");
      out.push_back({{"tokenizer", r.name}, {"bytes", r.bytes}, {"ids", r.ids},
                     {"ours_mb_per_s", ours}, {"ours_warm_cache_mb_per_s", warm},
                     {"npm_oracle_mb_per_s", npm}, {"speedup_vs_npm", npm > 0 ? ours / npm : 0.0},
                     {"ids_identical", r.identical}});
    }

    // BPE training on the same kind of text.
    TokenizerCorpusOptions opt;
    opt.source_dir = DSV3_SOURCE_DIR;
    opt.min_bytes = bytes * 4;
    opt.seed = 7;
    std::vector<std::string> texts = make_tokenizer_corpus(opt);
    std::vector<std::string_view> views(texts.begin(), texts.end());
    size_t train_bytes = 0;
    for (auto& t : texts) train_bytes += t.size();
    double t0 = bench::now_s();
    BpeTrainResult tr = train_bpe(views, 4096);
    double train_s = bench::now_s() - t0;
    std::printf("BPE training: %zu bytes, vocab 4096 (%zu merges) in %.2f s\n", train_bytes, tr.merges, train_s);

    nlohmann::json res = {{"encode", out},
                          {"threads", 1},
                          {"oracle", "@lenml/tokenizers 3.7.2 (transformers.js), node, encode loop only"},
                          {"train", {{"bytes", train_bytes}, {"vocab_size", 4096}, {"merges", tr.merges},
                                     {"seconds", train_s}}}};
    std::printf("wrote %s\n", bench::write_result("tokenizer", res).c_str());
  } catch (const InputError& e) {
    std::fprintf(stderr, "dsv3_bench_tokenizer: %s\n", e.what());
    return 2;
  }
  return 0;
}
