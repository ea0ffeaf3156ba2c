// `dsv3 data prepare`: text files → a token dataset directory (see train/data_loader.h for the
// layout of dataset.json and io/token_dataset.h for the shards).
//
// Documents are the blank-line-separated blocks of each input file. Each document is encoded on
// its own (BOS first when the tokenizer's config asks for it) and followed by EOS, so documents
// never run into each other without a separator. The validation split is either the --val files,
// or every document i for which floor((i+1)·f) > floor(i·f) (an exact fraction f, spread evenly).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace dsv3 {

class Tokenizer;

struct PrepareOptions {
  std::string tokenizer_path;            // recorded in dataset.json
  std::string output_dir;                // created if missing (its parent must exist)
  std::vector<std::string> inputs;       // training text (and validation when val_inputs is empty)
  std::vector<std::string> val_inputs;   // explicit validation text
  double val_fraction = 0.05;            // used only without val_inputs
  uint64_t shard_tokens = uint64_t(1) << 26;  // tokens per shard at most
};

// Writes the shards, then dataset.json last (atomically). Returns the dataset.json contents,
// which include per-split token counts and the unigram entropy of each split's tokens.
nlohmann::json prepare_token_dataset(const Tokenizer& tok, const PrepareOptions& o);

// Split text into documents at blank lines (lines holding only whitespace).
std::vector<std::string> split_documents(const std::string& text);

}  // namespace dsv3
