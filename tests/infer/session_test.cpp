// Model + tokenizer pairing for generate/chat: a missing tokenizer and a tokenizer whose ids the
// model's vocabulary cannot hold are InputErrors naming both; timing lines.
#include <gtest/gtest.h>

#include <filesystem>
#include <unistd.h>

#include <fstream>

#include "infer/session.h"
#include "infer_test_util.h"
#include "io/tokenizer_train.h"

namespace dsv3 {
namespace {

std::string temp_dir(const std::string& name) {
  const auto p = std::filesystem::temp_directory_path() / ("dsv3_infer_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::create_directories(p);
  return p.string();
}

TEST(Session, MissingTokenizerNamesModelAndPath) {
  const std::string dir = testing::fixture_dir("v3_hub_yarn_mtp1");
  EXPECT_FALSE(load_model_tokenizer(dir, "", 160, false, "x").has_value());
  try {
    load_model_tokenizer(dir, "", 160, true, "needed for text");
    FAIL() << "no error";
  } catch (const InputError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find(dir), std::string::npos) << m;
    EXPECT_NE(m.find("tokenizer.json"), std::string::npos) << m;
  }
}

TEST(Session, VocabularyMismatchNamesBoth) {
  const std::string dir = temp_dir("tok");
  const std::vector<std::string_view> texts = {"hello world, hello tokens; the quick brown fox", "jumps over the lazy dog"};
  const BpeTrainResult t = train_bpe(texts, bpe_min_vocab_size() + 20);
  std::ofstream(dir + "/tokenizer.json") << t.tokenizer_json;
  const Tokenizer tok = Tokenizer::load(dir + "/tokenizer.json");
  // The model's vocabulary (160, as the fixture) is smaller than the tokenizer's ids.
  try {
    load_model_tokenizer("/models/fixture", dir + "/tokenizer.json", 160, true, "x");
    FAIL() << "no error";
  } catch (const InputError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find(dir + "/tokenizer.json"), std::string::npos) << m;
    EXPECT_NE(m.find("/models/fixture"), std::string::npos) << m;
    EXPECT_NE(m.find("160"), std::string::npos) << m;
    EXPECT_NE(m.find(std::to_string(tok.last_real_id())), std::string::npos) << m;
  }
  EXPECT_TRUE(load_model_tokenizer("/models/x", dir + "/tokenizer.json", tok.last_real_id() + 1, true, "x").has_value());
  std::filesystem::remove_all(dir);
}

TEST(Session, TimingLinesInLlamaCppForm) {
  GenerationTimes t;
  t.prompt_s = 0.5;
  t.prompt_tokens = 10;
  t.gen_s = 2.0;
  t.gen_tokens = 40;
  EngineStats s;
  s.spec.record(2, 1, 2);
  s.spec.record(2, 2, 3);
  const std::string out = timing_lines(t, s, 2);
  EXPECT_NE(out.find("prompt eval time =     500.00 ms /    10 tokens (   50.00 ms per token,    20.00 tokens per second)"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("eval time =    2000.00 ms /    40 tokens"), std::string::npos) << out;
  EXPECT_NE(out.find("accepted draft 1 = 100.00 %"), std::string::npos) << out;
  EXPECT_NE(out.find("accepted draft 2 =  50.00 %"), std::string::npos) << out;
}

}  // namespace
}  // namespace dsv3
