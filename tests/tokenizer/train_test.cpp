// BPE training: deterministic, DeepSeek-V3 layout, read back to identical ids by our loader and by
// the npm encoder (the generic PreTrainedTokenizer loading our tokenizer.json); and the CLI contract.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "io/tokenizer.h"
#include "io/tokenizer_corpus.h"
#include "io/tokenizer_train.h"
#include "oracle_util.h"

namespace dsv3 {
namespace {

std::vector<std::string> corpus(uint64_t seed, size_t bytes) {
  TokenizerCorpusOptions opt;
  opt.source_dir = DSV3_SOURCE_DIR;
  opt.min_bytes = bytes;
  opt.seed = seed;
  opt.specials = {"<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"};
  return make_tokenizer_corpus(opt);
}

BpeTrainResult train(const std::vector<std::string>& texts, int32_t vocab) {
  std::vector<std::string_view> v(texts.begin(), texts.end());
  return train_bpe(v, vocab);
}

TEST(TokenizerTrain, DeterministicWithDeepSeekLayout) {
  auto texts = corpus(11, 300 << 10);
  BpeTrainResult a = train(texts, 1000), b = train(texts, 1000);
  EXPECT_EQ(a.tokenizer_json, b.tokenizer_json);
  EXPECT_EQ(a.config_json, b.config_json);
  EXPECT_EQ(a.merges, 1000u - 3 - 256 - 2);
  Tokenizer tok = Tokenizer::from_json(a.tokenizer_json, a.config_json, "trained");
  EXPECT_EQ(tok.bos_id(), 0);
  EXPECT_EQ(tok.eos_id(), 1);
  EXPECT_EQ(tok.last_real_id(), 999);
  EXPECT_EQ(tok.vocab_size(), 1000u);
  EXPECT_TRUE(tok.add_bos_default());
  EXPECT_EQ(tok.token_to_id("<｜User｜>"), 998);
  EXPECT_EQ(tok.token_to_id("<｜Assistant｜>"), 999);
  EXPECT_EQ(tok.token_to_id("Ġ"), 3 + ' ');  // byte tokens in byte order from id 3
  std::vector<ChatMessage> m = {{"user", "Hi"}, {"assistant", "Hello"}};
  std::vector<int32_t> ids = tok.encode_chat(m, true);
  EXPECT_EQ(ids.front(), 0);
  EXPECT_EQ(ids.back(), 999);
  // Training reduces the token count well below one per byte on text like its own.
  size_t bytes = 0, n = 0;
  for (auto& t : texts) {
    bytes += t.size();
    n += tok.encode(t, false).size();
    ASSERT_EQ(tok.decode(tok.encode(t, false)), t);
  }
  EXPECT_LT(double(n), 0.6 * double(bytes));
  // The corpus holds the chat tokens often; their text is cut out before counting, so no learned
  // token contains their delimiter "｜" (U+FF5C, found nowhere else in the corpus).
  for (int32_t id = 3; id < 998; ++id)
    EXPECT_EQ(tok.decode_token(id).find("｜"), std::string::npos) << "id " << id;
  EXPECT_THROW(train(texts, 100), InputError);
}

TEST(TokenizerTrain, NpmEncoderReadsItBackIdentically) {
  auto texts = corpus(12, 400 << 10);
  std::string dir = test::temp_path("trained");
  std::filesystem::create_directories(dir);
  std::vector<std::string> files;
  for (size_t i = 0; i < 3; ++i) {
    files.push_back(dir + "/part" + std::to_string(i) + ".txt");
    std::ofstream f(files.back(), std::ios::binary);
    for (size_t k = i; k < texts.size(); k += 3) f << texts[k];
  }
  train_bpe_files(files, 2048, dir + "/tokenizer.json");
  ASSERT_TRUE(std::filesystem::exists(dir + "/tokenizer_config.json"));
  Tokenizer tok = Tokenizer::load(dir);
  auto eval = corpus(13, 256 << 10);  // unseen text, with the chat tokens in it
  test::OracleResult o = test::run_oracle(dir + "/tokenizer.json", eval);
  std::filesystem::remove_all(dir);
  ASSERT_TRUE(o.ok);
  size_t mismatches = 0;
  for (size_t i = 0; i < eval.size(); ++i) {
    std::vector<int32_t> ids = tok.encode(eval[i], false);
    mismatches += ids != o.ids[i];
    EXPECT_EQ(tok.decode(ids), eval[i]);
  }
  EXPECT_EQ(mismatches, 0u) << "of " << eval.size() << " samples";
}

// ---- the CLI contract (scripts call it) ----

std::string dsv3_binary() {
  std::string p = DSV3_BINARY_DIR "/dsv3";
  if (!std::filesystem::exists(p)) ADD_FAILURE() << p << " is missing: build the dsv3 target first";
  return p;
}

int sh(const std::string& cmd) {
  int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

std::string slurp(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

TEST(TokenizerCli, TrainEncodeDecodeRoundTrip) {
  std::string bin = dsv3_binary();
  if (::testing::Test::HasFailure()) return;
  std::string dir = test::temp_path("cli");
  std::filesystem::create_directories(dir);
  {
    std::ofstream f(dir + "/train.txt", std::ios::binary);
    for (auto& t : corpus(21, 100 << 10)) f << t;
  }
  std::string text = "Hello, world!\r\n\t  12345 毕老师 🚀 <｜User｜>x\xff";
  {
    std::ofstream f(dir + "/in.txt", std::ios::binary);
    f << text;
  }
  ASSERT_EQ(sh(bin + " tokenizer train --vocab-size 600 --output " + dir + "/tokenizer.json " + dir +
               "/train.txt 2>/dev/null"), 0);
  ASSERT_EQ(sh(bin + " tokenizer encode --tokenizer " + dir + " < " + dir + "/in.txt > " + dir + "/ids.txt"), 0);
  std::string ids = slurp(dir + "/ids.txt");
  EXPECT_EQ(ids.rfind("0 ", 0), 0u) << "BOS first (add_bos_token): " << ids;
  ASSERT_EQ(sh(bin + " tokenizer encode --no-bos --tokenizer " + dir + "/tokenizer.json < " + dir +
               "/in.txt > " + dir + "/ids2.txt"), 0);
  Tokenizer tok = Tokenizer::load(dir);
  std::string want;
  for (int32_t id : tok.encode(text, false)) want += (want.empty() ? "" : " ") + std::to_string(id);
  EXPECT_EQ(slurp(dir + "/ids2.txt"), want + "\n");
  ASSERT_EQ(sh(bin + " tokenizer decode --tokenizer " + dir + " < " + dir + "/ids2.txt > " + dir + "/out.txt"), 0);
  EXPECT_EQ(slurp(dir + "/out.txt"), text);
  // Bad input: an id past the last one, a word that is not an id, a malformed tokenizer.json.
  EXPECT_EQ(sh("echo '1 2 600' | " + bin + " tokenizer decode --tokenizer " + dir + " 2>" + dir + "/err.txt"), 2);
  EXPECT_NE(slurp(dir + "/err.txt").find("id 2 \"600\""), std::string::npos) << slurp(dir + "/err.txt");
  EXPECT_EQ(sh("echo 'x' | " + bin + " tokenizer decode --tokenizer " + dir + " 2>/dev/null"), 2);
  {
    std::ofstream f(dir + "/bad.json");
    f << R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a"]}})";
  }
  EXPECT_EQ(sh("echo hi | " + bin + " tokenizer encode --tokenizer " + dir + "/bad.json 2>" + dir + "/err.txt"), 2);
  EXPECT_NE(slurp(dir + "/err.txt").find("bad.json"), std::string::npos) << slurp(dir + "/err.txt");
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace dsv3
