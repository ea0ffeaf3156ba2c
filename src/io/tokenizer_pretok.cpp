#include "io/tokenizer_pretok.h"

#include <unicode/normalizer2.h>
#include <unicode/bytestream.h>
#include <unicode/stringpiece.h>

#include <cctype>

#include "core/error.h"

namespace dsv3 {

using nlohmann::json;

size_t utf8_char_len(std::string_view s, size_t i) {
  auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  unsigned char c = b(i);
  size_t n = s.size() - i;
  if (c < 0x80) return 1;
  auto cont = [&](size_t k) { return k < n && (b(i + k) & 0xC0) == 0x80; };
  if (c >= 0xC2 && c <= 0xDF) return cont(1) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    if (!cont(1) || !cont(2)) return 0;
    unsigned char c1 = b(i + 1);
    if (c == 0xE0 && c1 < 0xA0) return 0;   // overlong
    if (c == 0xED && c1 >= 0xA0) return 0;  // surrogate
    return 3;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (!cont(1) || !cont(2) || !cont(3)) return 0;
    unsigned char c1 = b(i + 1);
    if (c == 0xF0 && c1 < 0x90) return 0;
    if (c == 0xF4 && c1 >= 0x90) return 0;
    return 4;
  }
  return 0;
}

char32_t utf8_decode(std::string_view s, size_t i, size_t n) {
  auto b = [&](size_t k) { return char32_t(static_cast<unsigned char>(s[i + k])); };
  switch (n) {
    case 1: return b(0);
    case 2: return ((b(0) & 0x1F) << 6) | (b(1) & 0x3F);
    case 3: return ((b(0) & 0x0F) << 12) | ((b(1) & 0x3F) << 6) | (b(2) & 0x3F);
    default: return ((b(0) & 0x07) << 18) | ((b(1) & 0x3F) << 12) | ((b(2) & 0x3F) << 6) | (b(3) & 0x3F);
  }
}

bool is_unicode_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

namespace {

std::string type_of(const json& j, const std::string& where) {
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string())
    input_error(where, ": expected an object with a string \"type\"");
  return j["type"].get<std::string>();
}

bool get_bool(const json& j, const char* key, bool dflt, const std::string& where) {
  if (!j.contains(key) || j[key].is_null()) return dflt;
  if (!j[key].is_boolean()) input_error(where, ".", key, ": expected true or false");
  return j[key].get<bool>();
}

// ---- normalizers ----

class SequenceNormalizer : public Normalizer {
 public:
  std::vector<std::unique_ptr<Normalizer>> parts;
  void normalize(std::string& s) const override {
    for (auto& p : parts) p->normalize(s);
  }
};

class IcuNormalizer : public Normalizer {
 public:
  IcuNormalizer(const std::string& form, const std::string& where) {
    UErrorCode err = U_ZERO_ERROR;
    if (form == "NFC") n_ = icu::Normalizer2::getNFCInstance(err);
    else if (form == "NFD") n_ = icu::Normalizer2::getNFDInstance(err);
    else if (form == "NFKC") n_ = icu::Normalizer2::getNFKCInstance(err);
    else n_ = icu::Normalizer2::getNFKDInstance(err);
    if (U_FAILURE(err) || !n_) input_error(where, ": ICU has no ", form, " normalizer");
  }
  // Valid UTF-8 runs are normalized; bytes that are not UTF-8 stay as they are, so the byte-level
  // model still sees (and round-trips) them.
  void normalize(std::string& s) const override {
    bool ascii = true;
    for (unsigned char c : s) ascii &= c < 0x80;
    if (ascii) return;
    std::string out;
    out.reserve(s.size());
    size_t i = 0;
    while (i < s.size()) {
      size_t j = i;
      while (j < s.size()) {
        size_t n = utf8_char_len(s, j);
        if (!n) break;
        j += n;
      }
      if (j > i) append_normalized(std::string_view(s).substr(i, j - i), out);
      i = j;
      while (i < s.size() && !utf8_char_len(s, i)) out += s[i++];
    }
    s.swap(out);
  }

 private:
  void append_normalized(std::string_view run, std::string& out) const {
    UErrorCode err = U_ZERO_ERROR;
    icu::StringByteSink<std::string> sink(&out);
    n_->normalizeUTF8(0, icu::StringPiece(run.data(), int32_t(run.size())), sink, nullptr, err);
    if (U_FAILURE(err)) internal_error("ICU normalization failed: ", u_errorName(err));
  }
  const icu::Normalizer2* n_ = nullptr;
};

// ---- pre-tokenizers ----

enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

class SequencePreTokenizer : public PreTokenizer {
 public:
  std::vector<std::unique_ptr<PreTokenizer>> parts;
  void apply(std::vector<std::string>& pieces) const override {
    for (auto& p : parts) p->apply(pieces);
  }
  bool has_byte_level() const override {
    for (auto& p : parts)
      if (p->has_byte_level()) return true;
    return false;
  }
};

struct Segment {
  size_t b, e;
  bool delim;
};

// Cut every piece at the regex matches and regroup the parts as HF's SplitDelimiterBehavior says.
void split_pieces(const Pcre2Regex& re, SplitBehavior beh, bool invert,
                  std::vector<std::string>& pieces) {
  std::vector<std::string> out;
  out.reserve(pieces.size() * 2);
  std::vector<std::pair<size_t, size_t>> m;
  std::vector<Segment> segs, acc;
  for (const std::string& p : pieces) {
    re.find_all(p, m);
    segs.clear();
    size_t prev = 0;
    for (auto [b, e] : m) {
      if (b > prev) segs.push_back({prev, b, invert});
      segs.push_back({b, e, !invert});
      prev = e;
    }
    if (prev < p.size()) segs.push_back({prev, p.size(), invert});
    acc.clear();
    switch (beh) {
      case SplitBehavior::Removed:
        for (auto& s : segs)
          if (!s.delim) acc.push_back(s);
        break;
      case SplitBehavior::Isolated:
        acc = segs;
        break;
      case SplitBehavior::Contiguous:
        for (size_t k = 0; k < segs.size(); ++k) {
          if (k > 0 && segs[k].delim && segs[k - 1].delim) acc.back().e = segs[k].e;
          else acc.push_back(segs[k]);
        }
        break;
      case SplitBehavior::MergedWithPrevious: {
        bool prev_delim = false;
        for (auto& s : segs) {
          if (s.delim && !prev_delim && !acc.empty()) acc.back().e = s.e;
          else acc.push_back(s);
          prev_delim = s.delim;
        }
        break;
      }
      case SplitBehavior::MergedWithNext: {
        bool prev_delim = false;
        for (size_t k = segs.size(); k-- > 0;) {
          auto& s = segs[k];
          if (s.delim && !prev_delim && !acc.empty()) acc.back().b = s.b;
          else acc.push_back(s);
          prev_delim = s.delim;
        }
        std::reverse(acc.begin(), acc.end());
        break;
      }
    }
    for (auto& s : acc)
      if (s.e > s.b) out.emplace_back(p, s.b, s.e - s.b);
  }
  pieces.swap(out);
}

class SplitPreTokenizer : public PreTokenizer {
 public:
  SplitPreTokenizer(const std::string& pattern, SplitBehavior beh, bool invert, const std::string& where)
      : re_(pattern, where), beh_(beh), invert_(invert) {}
  void apply(std::vector<std::string>& pieces) const override {
    split_pieces(re_, beh_, invert_, pieces);
  }

 private:
  Pcre2Regex re_;
  SplitBehavior beh_;
  bool invert_;
};

// GPT-2's pre-tokenizer pattern, which ByteLevel applies when use_regex is true.
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class ByteLevelPreTokenizer : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, bool use_regex, const std::string& where)
      : add_prefix_space_(add_prefix_space) {
    if (use_regex) re_ = std::make_unique<Pcre2Regex>(kGpt2Pattern, where);
  }
  void apply(std::vector<std::string>& pieces) const override {
    if (add_prefix_space_)
      for (auto& p : pieces)
        if (p.empty() || p[0] != ' ') p.insert(p.begin(), ' ');
    if (re_) split_pieces(*re_, SplitBehavior::Isolated, false, pieces);
  }
  bool has_byte_level() const override { return true; }

 private:
  bool add_prefix_space_;
  std::unique_ptr<Pcre2Regex> re_;
};

}  // namespace

std::unique_ptr<Normalizer> Normalizer::from_json(const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  std::string t = type_of(j, where);
  if (t == "Sequence") {
    if (!j.contains("normalizers") || !j["normalizers"].is_array())
      input_error(where, ": Sequence needs an array \"normalizers\"");
    auto seq = std::make_unique<SequenceNormalizer>();
    size_t k = 0;
    for (const auto& c : j["normalizers"]) {
      auto n = from_json(c, cat(where, ".normalizers[", k++, "]"));
      if (n) seq->parts.push_back(std::move(n));
    }
    return seq;
  }
  if (t == "NFC" || t == "NFD" || t == "NFKC" || t == "NFKD")
    return std::make_unique<IcuNormalizer>(t, where);
  input_error(where, ": unknown normalizer type \"", t,
              "\" (supported: Sequence, NFC, NFD, NFKC, NFKD, or null)");
}

std::unique_ptr<PreTokenizer> PreTokenizer::from_json(const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  std::string t = type_of(j, where);
  if (t == "Sequence") {
    if (!j.contains("pretokenizers") || !j["pretokenizers"].is_array())
      input_error(where, ": Sequence needs an array \"pretokenizers\"");
    auto seq = std::make_unique<SequencePreTokenizer>();
    size_t k = 0;
    for (const auto& c : j["pretokenizers"]) {
      auto p = from_json(c, cat(where, ".pretokenizers[", k++, "]"));
      if (p) seq->parts.push_back(std::move(p));
    }
    return seq;
  }
  if (t == "Split") {
    if (!j.contains("pattern") || !j["pattern"].is_object())
      input_error(where, ": Split needs an object \"pattern\" with \"Regex\" or \"String\"");
    const json& pat = j["pattern"];
    std::string regex;
    if (pat.contains("Regex") && pat["Regex"].is_string()) {
      regex = pat["Regex"].get<std::string>();
    } else if (pat.contains("String") && pat["String"].is_string()) {
      // A literal: escape every ASCII punctuation character (PCRE2 accepts \ before any of them).
      for (char c : pat["String"].get<std::string>()) {
        if (std::ispunct(static_cast<unsigned char>(c))) regex += '\\';
        regex += c;
      }
    } else {
      input_error(where, ".pattern: expected {\"Regex\": string} or {\"String\": string}");
    }
    std::string b = j.value("behavior", std::string("Isolated"));
    SplitBehavior beh;
    if (b == "Removed") beh = SplitBehavior::Removed;
    else if (b == "Isolated") beh = SplitBehavior::Isolated;
    else if (b == "MergedWithPrevious") beh = SplitBehavior::MergedWithPrevious;
    else if (b == "MergedWithNext") beh = SplitBehavior::MergedWithNext;
    else if (b == "Contiguous") beh = SplitBehavior::Contiguous;
    else
      input_error(where, ".behavior: unknown \"", b,
                  "\" (expected Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous)");
    return std::make_unique<SplitPreTokenizer>(regex, beh, get_bool(j, "invert", false, where),
                                               where + ".pattern");
  }
  if (t == "ByteLevel")
    return std::make_unique<ByteLevelPreTokenizer>(get_bool(j, "add_prefix_space", true, where),
                                                   get_bool(j, "use_regex", true, where), where);
  input_error(where, ": unknown pre_tokenizer type \"", t,
              "\" (supported: Sequence, Split, ByteLevel)");
}

}  // namespace dsv3
