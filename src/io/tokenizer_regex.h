// PCRE2 (8-bit, UTF + UCP, JIT-compiled) for the Split pre-tokenizer patterns of tokenizer.json.
// HF uses Oniguruma and transformers.js uses JavaScript RegExp; the patterns in real tokenizers
// (\p{L}, \p{N}, (?!\S), (?i:...)) mean the same in PCRE2 with UCP.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace dsv3 {

class Pcre2Regex {
 public:
  // Throws InputError naming `where` when the pattern does not compile.
  Pcre2Regex(const std::string& pattern, const std::string& where);
  ~Pcre2Regex();
  Pcre2Regex(const Pcre2Regex&) = delete;
  Pcre2Regex& operator=(const Pcre2Regex&) = delete;

  // Every non-overlapping match in `s` as [begin, end) byte offsets, left to right. An empty match
  // advances by one character. Input that is not valid UTF-8 is matched with the invalid bytes
  // acting as boundaries (PCRE2_MATCH_INVALID_UTF).
  void find_all(std::string_view s, std::vector<std::pair<size_t, size_t>>& out) const;

 private:
  void* code_ = nullptr;  // pcre2_code_8
  bool jit_ = false;
};

}  // namespace dsv3
