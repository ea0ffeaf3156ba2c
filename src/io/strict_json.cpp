#include "io/strict_json.h"

#include <set>
#include <vector>

#include "core/error.h"

namespace dsv3 {

size_t utf8_error_offset(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t n = s.size(), i = 0;
  while (i < n) {
    unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len;
    unsigned cp, min;
    if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F, min = 0x80;
    else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F, min = 0x800;
    else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07, min = 0x10000;
    else return i;
    if (n - i < size_t(len)) return i;
    for (int k = 1; k < len; ++k) {
      if ((p[i + size_t(k)] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (p[i + size_t(k)] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += size_t(len);
  }
  return std::string_view::npos;
}

std::string quote_name(std::string_view name) {
  constexpr size_t kMax = 120;
  std::string s = "'";
  for (size_t i = 0; i < name.size() && i < kMax; ++i) {
    unsigned char c = static_cast<unsigned char>(name[i]);
    if (c < 0x20 || c == 0x7F) {
      static const char* hex = "0123456789abcdef";
      s += "\\x";
      s += hex[c >> 4];
      s += hex[c & 15];
    } else {
      s += char(c);
    }
  }
  if (name.size() > kMax) s += cat("...' (", name.size(), " bytes)");
  else s += "'";
  return s;
}

const char* json_type_name(const nlohmann::json& j) {
  if (j.is_number_unsigned()) return "non-negative integer";
  if (j.is_number_integer()) return "negative integer";
  if (j.is_number_float()) return "floating-point number";
  return j.type_name();
}

nlohmann::json parse_json_strict(std::string_view text, const std::string& where, int max_depth) {
  size_t bad = utf8_error_offset(text);
  if (bad != std::string_view::npos)
    input_error(where, ": not UTF-8: ill-formed byte sequence at byte ", bad, " of the JSON text");
  // nlohmann stops at a NUL as if the text ended there; JSON allows none anywhere.
  size_t nul = text.find('\0');
  if (nul != std::string_view::npos)
    input_error(where, ": not valid JSON: NUL byte at byte ", nul, " of the JSON text");
  using json = nlohmann::json;
  // Keys seen in each open object; arrays push an empty marker so the stack mirrors nesting.
  std::vector<std::set<std::string>> keys;
  auto cb = [&](int depth, json::parse_event_t ev, json& parsed) -> bool {
    switch (ev) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (depth >= max_depth)
          input_error(where, ": nested too deep: JSON nesting deeper than ", max_depth, " levels");
        keys.emplace_back();
        break;
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case json::parse_event_t::key:
        if (!keys.empty() && !keys.back().insert(parsed.get<std::string>()).second)
          input_error(where, ": duplicate key: ", quote_name(parsed.get<std::string>()),
                      " appears twice in one JSON object");
        break;
      default:
        break;
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), cb);
  } catch (const json::exception& e) {
    std::string msg = e.what();  // may quote the offending token, which can be huge
    if (msg.size() > 300) msg = msg.substr(0, 300) + "...";
    input_error(where, ": not valid JSON: ", msg);
  }
}

}  // namespace dsv3
