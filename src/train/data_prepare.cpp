#include "train/data_prepare.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "io/checksum.h"
#include "io/token_dataset.h"
#include "io/tokenizer.h"
#include "train/checkpoint.h"
#include "train/corpus.h"
#include "train/data_loader.h"

namespace dsv3 {

namespace fs = std::filesystem;

namespace {

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) input_error(path, ": cannot open the input text");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

struct Split {
  std::vector<int32_t> tokens;
  int64_t documents = 0;
  uint64_t bytes = 0;
};

void append_document(const Tokenizer& tok, const std::string& doc, Split& s) {
  std::vector<int32_t> ids = tok.encode(doc);
  s.tokens.insert(s.tokens.end(), ids.begin(), ids.end());
  if (tok.eos_id() >= 0) s.tokens.push_back(tok.eos_id());
  ++s.documents;
  s.bytes += doc.size();
}

nlohmann::json write_split(const std::string& dir, const std::string& name, const Split& s,
                           uint64_t vocab, uint64_t shard_tokens) {
  nlohmann::json shards = nlohmann::json::array();
  std::vector<uint64_t> counts(vocab, 0);
  for (int32_t t : s.tokens) ++counts[size_t(t)];
  for (uint64_t begin = 0, k = 0; begin < s.tokens.size() || k == 0; begin += shard_tokens, ++k) {
    uint64_t end = std::min<uint64_t>(s.tokens.size(), begin + shard_tokens);
    char file[64];
    std::snprintf(file, sizeof file, "%s-%05llu.tok", name.c_str(), static_cast<unsigned long long>(k));
    std::vector<int32_t> part(s.tokens.begin() + int64_t(begin), s.tokens.begin() + int64_t(end));
    TokenShardInfo info = write_token_shard(dir + "/" + file, part, vocab);
    shards.push_back({{"file", file}, {"tokens", info.count}, {"crc32", crc_hex(info.data_crc)}});
    if (end >= s.tokens.size()) break;
  }
  double h = unigram_entropy_bits(counts);
  return {{"tokens", s.tokens.size()},
          {"documents", s.documents},
          {"text_bytes", s.bytes},
          {"unigram_entropy_bits", h},
          {"unigram_entropy_nats", h * std::log(2.0)},
          {"shards", shards}};
}

}  // namespace

std::vector<std::string> split_documents(const std::string& text) {
  std::vector<std::string> docs;
  std::string cur;
  std::istringstream in(text);
  std::string line;
  auto flush = [&] {
    if (!cur.empty()) docs.push_back(std::move(cur));
    cur.clear();
  };
  while (std::getline(in, line)) {
    bool blank = line.find_first_not_of(" \t\r") == std::string::npos;
    if (blank) {
      flush();
    } else {
      cur += line;
      cur += '\n';
    }
  }
  flush();
  return docs;
}

nlohmann::json prepare_token_dataset(const Tokenizer& tok, const PrepareOptions& o) {
  if (o.inputs.empty()) input_error("data prepare: no input text files given");
  if (o.val_inputs.empty() && !(o.val_fraction > 0.0 && o.val_fraction < 1.0))
    input_error("--val-fraction ", o.val_fraction, " must be in (0, 1) when no --val files are given");
  if (o.shard_tokens == 0) input_error("--shard-tokens must be ≥ 1");
  std::error_code ec;
  if (!fs::is_directory(o.output_dir, ec) && !fs::create_directory(o.output_dir, ec))
    input_error(o.output_dir, ": cannot create the output directory: ", ec.message());
  const uint64_t vocab = uint64_t(tok.last_real_id()) + 1;

  Split train, val;
  nlohmann::json sources = nlohmann::json::array();
  int64_t doc_index = 0;
  for (const auto& path : o.inputs) {
    std::string text = read_text(path);
    sources.push_back({{"file", path}, {"bytes", text.size()}, {"split", o.val_inputs.empty() ? "both" : "train"}});
    for (const auto& doc : split_documents(text)) {
      bool to_val = o.val_inputs.empty() &&
                    std::floor(double(doc_index + 1) * o.val_fraction) > std::floor(double(doc_index) * o.val_fraction);
      append_document(tok, doc, to_val ? val : train);
      ++doc_index;
    }
  }
  for (const auto& path : o.val_inputs) {
    std::string text = read_text(path);
    sources.push_back({{"file", path}, {"bytes", text.size()}, {"split", "val"}});
    for (const auto& doc : split_documents(text)) append_document(tok, doc, val);
  }
  if (train.tokens.empty()) input_error("data prepare: the training split is empty (no text in the inputs)");
  if (val.tokens.empty())
    input_error("data prepare: the validation split is empty; give --val FILE or more documents ",
                "(blank-line separated) for --val-fraction ", o.val_fraction);

  nlohmann::json meta = {{"format", "dsv3-token-dataset"},
                         {"version", 1},
                         {"tokenizer", o.tokenizer_path},
                         {"vocab_size", vocab},
                         {"dtype", token_dtype_name(token_dtype_for(vocab))},
                         {"bos_token_id", tok.bos_id() >= 0 ? nlohmann::json(tok.bos_id()) : nlohmann::json()},
                         {"eos_token_id", tok.eos_id() >= 0 ? nlohmann::json(tok.eos_id()) : nlohmann::json()},
                         {"sources", sources}};
  meta["splits"]["train"] = write_split(o.output_dir, "train", train, vocab, o.shard_tokens);
  meta["splits"]["val"] = write_split(o.output_dir, "val", val, vocab, o.shard_tokens);
  write_json_file(o.output_dir + "/" + kDatasetFileName, meta);
  return meta;
}

}  // namespace dsv3
