#include "io/tokenizer_corpus.h"

#include <fstream>
#include <sstream>

#include "core/error.h"

namespace dsv3 {

namespace {

struct SplitMix {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  size_t below(size_t n) { return size_t(next() % n); }
  size_t range(size_t lo, size_t hi) { return lo + below(hi - lo + 1); }
};

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) input_error("tokenizer corpus piece ", path, ": cannot open");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);)
    if (!l.empty()) out.push_back(l);
  return out;
}

void put_utf8(std::string& s, char32_t c) {
  if (c < 0x80) {
    s += char(c);
  } else if (c < 0x800) {
    s += char(0xC0 | (c >> 6));
    s += char(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    s += char(0xE0 | (c >> 12));
    s += char(0x80 | ((c >> 6) & 0x3F));
    s += char(0x80 | (c & 0x3F));
  } else {
    s += char(0xF0 | (c >> 18));
    s += char(0x80 | ((c >> 12) & 0x3F));
    s += char(0x80 | ((c >> 6) & 0x3F));
    s += char(0x80 | (c & 0x3F));
  }
}

// Generated fragments of the kinds that stress a byte-level BPE pre-tokenizer.
std::string fragment(SplitMix& r, const std::vector<std::string>& specials) {
  std::string s;
  switch (r.below(14)) {
    case 0:  // long digit runs, grouped numbers, decimals
      for (size_t i = 0, n = r.range(1, 48); i < n; ++i) s += char('0' + r.below(10));
      if (r.below(2)) s += cat(",", r.range(100, 999), ".", r.range(0, 99));
      break;
    case 1:  // runs of spaces
      s.assign(r.range(1, 33), ' ');
      break;
    case 2:  // tabs, \r\n and mixed whitespace
      for (size_t i = 0, n = r.range(1, 8); i < n; ++i) {
        static const char* ws[] = {"\t",   "\r\n", "\n",     " \t ", "\r\n\r\n", "  \n",     "\t\t",
                                   "\u3000", "\u00a0", "\r",    "\v",   "\f",       "\x01\x7f", "\u200b\u200d"};
        s += ws[r.below(14)];
      }
      break;
    case 3:  // emoji, with ZWJ sequences, skin tones, flags and variation selectors
      for (size_t i = 0, n = r.range(1, 6); i < n; ++i) {
        static const char32_t base[] = {0x1F600, 0x1F680, 0x1F44D, 0x2764, 0x1F468, 0x1F469, 0x1F30D, 0x1F914, 0x2728};
        put_utf8(s, base[r.below(9)]);
        switch (r.below(5)) {
          case 0: put_utf8(s, 0x1F3FB + char32_t(r.below(5))); break;
          case 1: put_utf8(s, 0x200D); put_utf8(s, 0x1F467); break;
          case 2: put_utf8(s, 0xFE0F); break;
          case 3: put_utf8(s, 0x1F1E6 + char32_t(r.below(26))); put_utf8(s, 0x1F1E6 + char32_t(r.below(26))); break;
          default: break;
        }
      }
      break;
    case 4:  // random CJK ideographs, kana, hangul
      for (size_t i = 0, n = r.range(1, 30); i < n; ++i) {
        static const char32_t lo[] = {0x4E00, 0x3041, 0x30A1, 0xAC00, 0x3400};
        static const char32_t span[] = {0x51A5, 0x55, 0x5A, 0x2BA4, 0x100};
        size_t k = r.below(5);
        put_utf8(s, lo[k] + char32_t(r.below(span[k])));
      }
      break;
    case 5:  // combining marks, decomposed and composed (NFC changes the former)
      for (size_t i = 0, n = r.range(1, 6); i < n; ++i) {
        static const char* w[] = {"e\u0301", "a\u0308", "A\u030A", "n\u0303", "\u00e9", "o\u0302\u0323",
                                  "\u1100\u1161\u11A8", "c\u0327", "\u212B", "\u00c5", "u\u0308\u0301"};
        s += w[r.below(11)];
        if (r.below(2)) s += "ta";
      }
      break;
    case 6:  // special tokens, sometimes glued to words or spaces
      if (specials.empty()) break;
      if (r.below(3) == 0) s += ' ';
      s += specials[r.below(specials.size())];
      if (r.below(3) == 0) s += r.below(2) ? " " : "x";
      break;
    case 7:  // punctuation clusters and contractions
      for (size_t i = 0, n = r.range(1, 6); i < n; ++i) {
        static const char* p[] = {"...", "?!", "'s", "'LL", "'Re", "--", "=>", "::", "();", "{}", "«»", "—", "“”", "!!!\n", "#", "@@", "\\\\"};
        s += p[r.below(17)];
        if (r.below(2)) s += "word";
      }
      break;
    case 8:  // byte-level look-alikes and odd letters
      s += r.below(2) ? "ĠÑĤÐ²ÑĬÑĢ" : "Ċ ĉ Ġ ÃĤ âĢĻ";
      break;
    case 9:  // mixed-case identifiers
      for (size_t i = 0, n = r.range(1, 5); i < n; ++i) {
        static const char* id[] = {"getValue", "HTTPServer", "snake_case_name", "x86_64", "kv_lora_rank", "__init__", "IOError", "v2.0.1"};
        s += id[r.below(8)];
        s += r.below(2) ? "." : " ";
      }
      break;
    default:
      break;
  }
  return s;
}

}  // namespace

std::vector<std::string> make_tokenizer_corpus(const TokenizerCorpusOptions& opt) {
  const std::string data = opt.source_dir + "/tests/data/tokenizer/";
  std::vector<std::vector<std::string>> sources;
  for (const char* f : {"english.txt", "cjk.txt", "other_scripts.txt"})
    sources.push_back(lines_of(read_text(data + f)));
  std::vector<std::string> code;
  for (const char* f : {"src/io/tokenizer_bpe.cpp", "src/io/tokenizer_pretok.cpp", "tools/tokenizer_oracle.js",
                        "CMakeLists.txt", "scripts/setup.sh"})
    for (auto& l : lines_of(read_text(opt.source_dir + "/" + f))) code.push_back(l);
  sources.push_back(code);

  SplitMix r{opt.seed};
  std::vector<std::string> out;
  size_t total = 0;
  while (total < opt.min_bytes) {
    std::string s;
    size_t target = r.range(64, 4096);
    // A third of the samples are plain runs of one source (prose or code as it is written).
    size_t mode = r.below(3);
    while (s.size() < target) {
      if (mode == 0) {
        const auto& src = sources[r.below(sources.size())];
        size_t start = r.below(src.size());
        for (size_t i = start; i < src.size() && s.size() < target; ++i) s += src[i] + (r.below(4) ? "\n" : "\r\n");
      } else if (r.below(2)) {
        const auto& src = sources[r.below(sources.size())];
        s += src[r.below(src.size())];
        s += r.below(3) ? " " : "\n";
      } else {
        s += fragment(r, opt.specials);
      }
    }
    total += s.size();
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace dsv3
