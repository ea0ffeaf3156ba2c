// The mixed test corpus for the tokenizer (tests and benchmark): built deterministically from the
// small committed pieces in tests/data/tokenizer/ and some of the repository's own sources, mixed
// with generated runs of digits, spaces, tabs, \r\n, emoji, CJK, combining marks and the
// tokenizer's special tokens. Every sample is valid UTF-8.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dsv3 {

struct TokenizerCorpusOptions {
  std::string source_dir;               // repository root
  size_t min_bytes = 1 << 20;           // stop once the samples hold this many bytes
  uint64_t seed = 1;
  std::vector<std::string> specials;    // added-token contents to sprinkle in
};

std::vector<std::string> make_tokenizer_corpus(const TokenizerCorpusOptions& opt);

}  // namespace dsv3
