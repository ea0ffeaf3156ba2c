// Private parts of Tokenizer, shared by its source files.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "io/tokenizer.h"
#include "io/tokenizer_bpe.h"
#include "io/tokenizer_pretok.h"

namespace dsv3 {

// Leftmost-longest matcher over the added tokens' contents (a byte trie).
class AddedTokenMatcher {
 public:
  void build(const std::vector<AddedTokenInfo>& tokens);
  // Length and index of the longest token starting at s[i], or {0, -1}.
  std::pair<size_t, int> match_at(std::string_view s, size_t i) const;
  bool empty() const { return nodes_.size() <= 1; }

 private:
  struct Node {
    std::vector<std::pair<uint8_t, int32_t>> next;
    int32_t token = -1;
  };
  std::vector<Node> nodes_;
  bool first_[256] = {};
};

struct Tokenizer::Impl {
  std::unique_ptr<Normalizer> normalizer;
  std::unique_ptr<PreTokenizer> pre_tokenizer;
  BpeModel model;
  std::vector<AddedTokenInfo> added;
  std::vector<int32_t> added_index_of_id;  // id → index in `added`, or -1
  AddedTokenMatcher matcher;
  int32_t bos = -1, eos = -1, last_id = -1;
  bool add_bos = false;
  size_t n_ids = 0;

  const AddedTokenInfo* added_token(int32_t id) const {
    if (id < 0 || size_t(id) >= added_index_of_id.size() || added_index_of_id[id] < 0) return nullptr;
    return &added[added_index_of_id[id]];
  }
  void encode_section(std::string_view text, std::vector<int32_t>& out,
                      std::vector<std::string>& pieces) const;
};

}  // namespace dsv3
