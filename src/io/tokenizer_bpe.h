// Byte-level BPE: the GPT-2 byte↔character mapping of vocab strings, and the merge model on raw
// bytes (each pre-token starts as one symbol per byte; pairs merge by rank, lowest first and
// leftmost on ties, with a heap and a linked list: O(n log n) per pre-token).
#pragma once
#include <cstdint>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace dsv3 {

// The printable character (as UTF-8) that byte b stands for in a byte-level vocab.
const std::string& byte_level_char(uint8_t b);
// Vocab string → raw bytes; false when some character is not one of the 256 byte characters.
bool byte_level_to_bytes(std::string_view token, std::string& out);
// Raw bytes → vocab string.
std::string bytes_to_byte_level(std::string_view bytes);

// Tables are indexed by token id, so a sparse id would allocate far beyond what the file holds (the
// fuzzer found a 2.7 GB one): ids stay below this bound for `entries` tokens (real ones are dense).
inline int64_t id_limit(int64_t entries) { return 4 * entries + 1024; }

class BpeModel {
 public:
  // `model` is tokenizer.json's "model" object. Throws InputError naming `where` for a bad
  // merge line, a token of a merge that is not in the vocab, or an unsupported option.
  void load(const nlohmann::json& model, const std::string& where);

  // Append the ids of one pre-token (raw bytes).
  void encode_piece(std::string_view piece, std::vector<int32_t>& out) const;

  int32_t max_id() const { return max_id_; }
  // Id of a raw byte string that is a whole vocab token, or -1.
  int32_t bytes_id(std::string_view bytes) const;
  // Raw bytes of id (empty if the id is not a byte-level token).
  const std::string* id_bytes(int32_t id) const;
  const std::string* id_token(int32_t id) const;  // vocab form
  int32_t token_id(std::string_view token) const;  // vocab form, -1 if unknown

 private:
  void merge_word(std::string_view piece, std::vector<int32_t>& out) const;

  struct Merge {
    int32_t rank, result;
  };
  std::unordered_map<std::string, int32_t> token_to_id_;  // vocab form
  std::unordered_map<std::string, int32_t> bytes_to_id_;  // raw bytes form
  std::vector<std::string> id_to_token_, id_to_bytes_;
  std::vector<uint8_t> id_is_bytes_;
  int32_t byte_id_[256];
  std::unordered_map<uint64_t, Merge> merges_;
  bool ignore_merges_ = false;
  int32_t max_id_ = -1;

  // Pre-tokens repeat a lot in text; the cache holds the ids of short ones.
  mutable std::mutex cache_mu_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

}  // namespace dsv3
