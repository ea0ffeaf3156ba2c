// Hugging Face tokenizer.json, byte-level BPE (DeepSeek-V3, Qwen, Llama 3 and our own trained ones).
//
// Encoding pipeline, in the order HF and transformers.js apply it:
//   1. added tokens (special or not) are cut out of the raw text first, longest match leftmost;
//      lstrip/rstrip eat the whitespace next to them, single_word needs word boundaries;
//   2. every other section is normalized (none, NFC, Sequence, ...), then pre-tokenized
//      (Sequence of Split regexes through PCRE2 and ByteLevel);
//   3. each pre-token is merged by BPE rank (lowest first, leftmost on ties) in O(n log n),
//      with a cache for pre-tokens seen before.
// Decoding maps ids back to bytes; bytes that are not valid UTF-8 are returned as they are, so
// decode(encode(x)) == x for any byte string.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace dsv3 {

struct ChatMessage {
  std::string role;  // "system", "user", "assistant"
  std::string content;
};

struct AddedTokenInfo {
  int32_t id = -1;
  std::string content;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = false;
};

class Tokenizer {
 public:
  // `path` is a tokenizer.json or the directory holding it; tokenizer_config.json beside it is
  // read when present (BOS/EOS, add_bos_token). Malformed files throw InputError naming the part.
  static Tokenizer load(const std::string& path);
  // From the text of a tokenizer.json (and optionally of tokenizer_config.json); `where` names
  // the source in error messages.
  static Tokenizer from_json(std::string_view tokenizer_json, std::string_view config_json = {},
                             const std::string& where = "tokenizer.json");

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Token ids of `text` (any bytes); BOS first when add_bos and the tokenizer has one.
  std::vector<int32_t> encode(std::string_view text, bool add_bos) const;
  // Uses tokenizer_config.json's add_bos_token (false when absent).
  std::vector<int32_t> encode(std::string_view text) const { return encode(text, add_bos_default()); }
  // Bytes of the ids, concatenated (added tokens as their content). Throws InputError for an id
  // outside [0, last_real_id()] or one that names no token.
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;
  // The bytes of one token; may be part of a UTF-8 character (see TokenStreamDecoder).
  std::string decode_token(int32_t id) const;

  int32_t bos_id() const;  // -1 when the tokenizer has none
  int32_t eos_id() const;
  bool add_bos_default() const;
  // The highest id any token has (128814 for DeepSeek-V3): rows past it in a model's embedding
  // or head are padding that must never be sampled.
  int32_t last_real_id() const;
  size_t vocab_size() const;  // number of distinct ids with a token
  int32_t token_to_id(std::string_view token) const;  // -1 when unknown (vocab form, e.g. "Ġthe")
  bool is_special(int32_t id) const;
  const std::vector<AddedTokenInfo>& added_tokens() const;

  // DeepSeek-V3's chat format: BOS, system prompts joined by "\n\n", then
  // <｜User｜>u<｜Assistant｜>a<｜end▁of▁sentence｜>…, and <｜Assistant｜> when add_generation_prompt.
  // Throws InputError for an unknown role or when the tokenizer lacks the chat tokens.
  std::string render_chat(std::span<const ChatMessage> messages, bool add_generation_prompt) const;
  std::vector<int32_t> encode_chat(std::span<const ChatMessage> messages,
                                   bool add_generation_prompt) const;

  // Internal: the pre-tokenizer alone (byte strings), used by the trainer.
  void pre_tokenize(std::string_view text, std::vector<std::string>& out) const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// For streaming output: feed ids one at a time, get back only complete UTF-8 characters (bytes
// that cannot start or continue a valid character are passed through, so nothing is lost).
class TokenStreamDecoder {
 public:
  explicit TokenStreamDecoder(const Tokenizer& tok) : tok_(&tok) {}
  std::string push(int32_t id);
  std::string flush();  // whatever is still pending (an incomplete character at the end)

 private:
  const Tokenizer* tok_;
  std::string pending_;
};

// Longest prefix of `s` that does not end inside an incomplete (but so far valid) UTF-8 sequence.
size_t utf8_complete_prefix(std::string_view s);

}  // namespace dsv3
