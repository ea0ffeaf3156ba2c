// tokenizer.json normalizers and pre-tokenizers, working on raw UTF-8 bytes. ByteLevel's byte to
// printable-character mapping is not applied here: the BPE model works on bytes directly, and the
// mapping is only needed to read and write vocab strings (tokenizer_bpe.h).
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "io/tokenizer_regex.h"

namespace dsv3 {

// Length of the valid UTF-8 character at s[i] (1..4), or 0 when the bytes there are not one.
size_t utf8_char_len(std::string_view s, size_t i);
// Decode the valid character of length n at s[i].
char32_t utf8_decode(std::string_view s, size_t i, size_t n);
// Unicode White_Space (what trim() and lstrip/rstrip of added tokens remove).
bool is_unicode_space(char32_t c);

class Normalizer {
 public:
  // null → none. Throws InputError naming `where` for an unknown or malformed type.
  static std::unique_ptr<Normalizer> from_json(const nlohmann::json& j, const std::string& where);
  virtual ~Normalizer() = default;
  virtual void normalize(std::string& s) const = 0;
};

// Pieces of one section: each piece is a byte string. Pre-tokenizers refine the list in place.
class PreTokenizer {
 public:
  static std::unique_ptr<PreTokenizer> from_json(const nlohmann::json& j, const std::string& where);
  virtual ~PreTokenizer() = default;
  virtual void apply(std::vector<std::string>& pieces) const = 0;
  // True when the pipeline holds a ByteLevel step (required: we only do byte-level BPE).
  virtual bool has_byte_level() const { return false; }
};

}  // namespace dsv3
