// DeepSeek-V3's chat format (what its tokenizer_config.json chat_template renders) and the
// streaming decoder.
#include "core/error.h"
#include "io/tokenizer.h"
#include "io/tokenizer_pretok.h"

namespace dsv3 {

namespace {
constexpr const char* kBos = "<｜begin▁of▁sentence｜>";
constexpr const char* kEos = "<｜end▁of▁sentence｜>";
constexpr const char* kUser = "<｜User｜>";
constexpr const char* kAssistant = "<｜Assistant｜>";
constexpr const char* kOutputsBegin = "<｜tool▁outputs▁begin｜>";
constexpr const char* kOutputsEnd = "<｜tool▁outputs▁end｜>";
constexpr const char* kOutputBegin = "<｜tool▁output▁begin｜>";
constexpr const char* kOutputEnd = "<｜tool▁output▁end｜>";
}  // namespace

std::string Tokenizer::render_chat(std::span<const ChatMessage> messages,
                                   bool add_generation_prompt) const {
  for (const char* t : {kBos, kEos, kUser, kAssistant})
    if (token_to_id(t) < 0)
      input_error("chat template: this tokenizer has no ", t,
                  " token (only DeepSeek-V3's chat format is built in)");
  std::string out = kBos;
  bool first_system = true;
  for (const ChatMessage& m : messages) {
    if (m.role != "system") continue;
    if (!first_system) out += "\n\n";
    out += m.content;
    first_system = false;
  }
  bool in_tool = false, first_output = true;
  size_t k = 0;
  for (const ChatMessage& m : messages) {
    if (m.role == "system") {
    } else if (m.role == "user") {
      in_tool = false;
      out += kUser + m.content;
    } else if (m.role == "assistant") {
      if (in_tool) {
        out += kOutputsEnd + m.content + kEos;
        in_tool = false;
      } else {
        out += kAssistant + m.content + kEos;
      }
    } else if (m.role == "tool") {
      in_tool = true;
      out += first_output ? std::string(kOutputsBegin) : std::string("\n");
      out += kOutputBegin + m.content + kOutputEnd;
      first_output = false;
    } else {
      input_error("chat message ", k, ": unknown role \"", m.role,
                  "\" (expected system, user, assistant or tool)");
    }
    ++k;
  }
  if (in_tool) out += kOutputsEnd;
  if (add_generation_prompt && !in_tool) out += kAssistant;
  return out;
}

std::vector<int32_t> Tokenizer::encode_chat(std::span<const ChatMessage> messages,
                                            bool add_generation_prompt) const {
  // BOS is part of the rendered text, so it is not added a second time.
  return encode(render_chat(messages, add_generation_prompt), false);
}

namespace {
// Whether `t` (shorter than its lead byte asks for) is the valid beginning of a UTF-8 character.
bool incomplete_utf8(std::string_view t) {
  auto c = [&](size_t k) { return static_cast<unsigned char>(t[k]); };
  size_t need = c(0) >= 0xC2 && c(0) <= 0xDF ? 2 : c(0) >= 0xE0 && c(0) <= 0xEF ? 3
              : c(0) >= 0xF0 && c(0) <= 0xF4 ? 4 : 0;
  if (need == 0 || t.size() >= need) return false;
  if (t.size() >= 2) {
    unsigned char lo = 0x80, hi = 0xBF;
    if (c(0) == 0xE0) lo = 0xA0;
    if (c(0) == 0xED) hi = 0x9F;
    if (c(0) == 0xF0) lo = 0x90;
    if (c(0) == 0xF4) hi = 0x8F;
    if (c(1) < lo || c(1) > hi) return false;
  }
  for (size_t k = 2; k < t.size(); ++k)
    if ((c(k) & 0xC0) != 0x80) return false;
  return true;
}
}  // namespace

size_t utf8_complete_prefix(std::string_view s) {
  // Only the last 3 bytes can hold the start of a character that is still incomplete.
  size_t n = s.size();
  for (size_t k = 1; k <= 3 && k <= n; ++k) {
    unsigned char c = static_cast<unsigned char>(s[n - k]);
    if ((c & 0xC0) == 0x80) continue;
    return incomplete_utf8(s.substr(n - k)) ? n - k : n;
  }
  return n;
}

std::string TokenStreamDecoder::push(int32_t id) {
  pending_ += tok_->decode_token(id);
  size_t k = utf8_complete_prefix(pending_);
  std::string ready = pending_.substr(0, k);
  pending_.erase(0, k);
  return ready;
}

std::string TokenStreamDecoder::flush() {
  std::string r;
  r.swap(pending_);
  return r;
}

}  // namespace dsv3
