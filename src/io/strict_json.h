// Strict JSON for files we do not trust: UTF-8 checked, duplicate keys rejected (nlohmann keeps
// the last one silently), nesting depth bounded. Errors are InputErrors that start with `where`.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace dsv3 {

// Offset of the first byte that is not part of well-formed UTF-8 (no overlongs, surrogates or
// code points past U+10FFFF), or npos when all of `s` is well formed.
size_t utf8_error_offset(std::string_view s);

// Parse `text` as one JSON value (surrounding whitespace allowed). Rules in messages:
// "not UTF-8", "not valid JSON", "duplicate key", "nested too deep".
nlohmann::json parse_json_strict(std::string_view text, const std::string& where, int max_depth);

// A name from a file, fit for an error message: quoted, control bytes escaped, long names cut.
std::string quote_name(std::string_view name);

// "object", "array", "string", "number", ... for messages.
const char* json_type_name(const nlohmann::json& j);

}  // namespace dsv3
