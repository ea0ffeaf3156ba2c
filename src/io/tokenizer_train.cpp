#include "io/tokenizer_train.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_map>

#include "core/error.h"
#include "io/atomic_file.h"
#include "io/tokenizer_bpe.h"
#include "io/tokenizer_pretok.h"

namespace dsv3 {

using nlohmann::json;
using ojson = nlohmann::ordered_json;

namespace {

constexpr const char* kBos = "<｜begin▁of▁sentence｜>";
constexpr const char* kEos = "<｜end▁of▁sentence｜>";
constexpr const char* kPad = "<｜▁pad▁｜>";
constexpr const char* kUser = "<｜User｜>";
constexpr const char* kAssistant = "<｜Assistant｜>";
constexpr int32_t kFirstByteId = 3;
constexpr int32_t kChatTokens = 2;

// Our own Jinja rendering of the DeepSeek-V3 chat format for system/user/assistant turns.
constexpr const char* kChatTemplate =
    "{%- set ns = namespace(sys='', first=true) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'system' -%}"
    "{%- if not ns.first -%}{%- set ns.sys = ns.sys + '\\n\\n' -%}{%- endif -%}"
    "{%- set ns.sys = ns.sys + m['content'] -%}{%- set ns.first = false -%}"
    "{%- endif -%}{%- endfor -%}"
    "{{- bos_token + ns.sys -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- '<｜User｜>' + m['content'] -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜>' -}}{%- endif -%}";

uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

struct Word {
  std::vector<int32_t> syms;
  int64_t count;
};

ojson added_token(int32_t id, const char* content, bool special) {
  return ojson{{"id", id},         {"content", content}, {"single_word", false}, {"lstrip", false},
               {"rstrip", false},  {"normalized", !special}, {"special", special}};
}

ojson token_object(const char* content) {
  return ojson{{"__type", "AddedToken"}, {"content", content}, {"lstrip", false},
               {"normalized", true},     {"rstrip", false},    {"single_word", false}};
}

}  // namespace

std::string deepseek_v3_pre_tokenizer_json() {
  ojson split = {{"type", "Split"}, {"pattern", {{"Regex", ""}}}, {"behavior", "Isolated"}, {"invert", false}};
  ojson seq = {{"type", "Sequence"}, {"pretokenizers", ojson::array()}};
  for (const char* re :
       {R"(\p{N}{1,3})", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
        " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"}) {
    split["pattern"]["Regex"] = re;
    seq["pretokenizers"].push_back(split);
  }
  seq["pretokenizers"].push_back(
      {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}});
  return seq.dump();
}

int32_t bpe_min_vocab_size() { return kFirstByteId + 256 + kChatTokens; }

BpeTrainResult train_bpe(std::span<const std::string_view> texts, int32_t vocab_size) {
  if (vocab_size < bpe_min_vocab_size())
    input_error("--vocab-size ", vocab_size, ": too small (need at least ", bpe_min_vocab_size(),
                ": 3 special tokens, 256 bytes and 2 chat tokens)");
  json pre_json = json::parse(deepseek_v3_pre_tokenizer_json());
  auto pre = PreTokenizer::from_json(pre_json, "DeepSeek-V3 pre_tokenizer");

  std::unordered_map<std::string, int64_t> counts;
  std::vector<std::string> pieces;
  // The special and chat tokens are cut out first, as the encoder does, so their text is never
  // learned as ordinary words.
  const std::string_view specials[] = {kBos, kEos, kPad, kUser, kAssistant};
  auto count_section = [&](std::string_view t) {
    if (t.empty()) return;
    pieces.clear();
    pieces.emplace_back(t);
    pre->apply(pieces);
    for (auto& p : pieces) ++counts[p];
  };
  for (std::string_view t : texts) {
    size_t start = 0;
    for (size_t i = t.find("<｜"); i != std::string_view::npos; i = t.find("<｜", i + 1)) {
      for (std::string_view sp : specials)
        if (t.substr(i, sp.size()) == sp) {
          count_section(t.substr(start, i - start));
          start = i + sp.size();
          break;
        }
      if (start > i) i = start - 1;
    }
    count_section(t.substr(start));
  }
  // Sorted words make everything below independent of hash-table order.
  std::vector<std::pair<std::string, int64_t>> sorted(counts.begin(), counts.end());
  std::sort(sorted.begin(), sorted.end());
  counts.clear();
  std::vector<Word> words;
  words.reserve(sorted.size());
  for (auto& [w, c] : sorted) {
    Word word{{}, c};
    for (unsigned char ch : w) word.syms.push_back(ch);
    words.push_back(std::move(word));
  }
  BpeTrainResult res;
  res.words = words.size();
  sorted.clear();

  std::vector<std::string> bytes(256);  // trainer symbol → raw bytes
  for (int b = 0; b < 256; ++b) bytes[b] = std::string(1, char(b));
  std::unordered_map<uint64_t, int64_t> pair_count;
  std::unordered_map<uint64_t, std::vector<uint32_t>> where;
  for (uint32_t w = 0; w < words.size(); ++w) {
    auto& s = words[w].syms;
    for (size_t i = 0; i + 1 < s.size(); ++i) {
      uint64_t k = pair_key(s[i], s[i + 1]);
      pair_count[k] += words[w].count;
      auto& v = where[k];
      if (v.empty() || v.back() != w) v.push_back(w);
    }
  }
  struct Entry {
    int64_t count;
    uint64_t pair;
  };
  auto worse = [&](const Entry& x, const Entry& y) {  // true when x ranks below y
    if (x.count != y.count) return x.count < y.count;
    const std::string &xa = bytes[x.pair >> 32], &ya = bytes[y.pair >> 32];
    if (xa != ya) return xa > ya;
    return bytes[uint32_t(x.pair)] > bytes[uint32_t(y.pair)];
  };
  std::priority_queue<Entry, std::vector<Entry>, decltype(worse)> heap(worse);
  for (auto& [k, c] : pair_count) heap.push({c, k});

  std::vector<std::pair<int32_t, int32_t>> merges;  // trainer symbols
  std::unordered_map<std::string, int32_t> seen_bytes;  // raw bytes → trainer symbol
  for (int b = 0; b < 256; ++b) seen_bytes[bytes[b]] = b;
  int32_t target_tokens = vocab_size - kFirstByteId - kChatTokens;  // bytes + merged tokens
  int32_t n_tokens = 256;
  std::vector<uint64_t> touched;
  while (n_tokens < target_tokens && !heap.empty()) {
    Entry top = heap.top();
    heap.pop();
    auto pc = pair_count.find(top.pair);
    int64_t cur = pc == pair_count.end() ? 0 : pc->second;
    if (cur != top.count) {
      if (cur > 0) heap.push({cur, top.pair});
      continue;
    }
    if (cur <= 0) continue;
    int32_t a = int32_t(top.pair >> 32), b = int32_t(uint32_t(top.pair));
    int32_t c = int32_t(bytes.size());
    bytes.push_back(bytes[a] + bytes[b]);
    merges.emplace_back(a, b);
    if (seen_bytes.emplace(bytes[c], c).second) ++n_tokens;
    std::vector<uint32_t> ws = std::move(where[top.pair]);
    where.erase(top.pair);
    touched.clear();
    for (uint32_t w : ws) {
      auto& s = words[w].syms;
      int64_t n = words[w].count;
      bool has = false;
      for (size_t i = 0; i + 1 < s.size() && !has; ++i) has = s[i] == a && s[i + 1] == b;
      if (!has) continue;
      for (size_t i = 0; i + 1 < s.size(); ++i) pair_count[pair_key(s[i], s[i + 1])] -= n;
      size_t o = 0;
      for (size_t i = 0; i < s.size();) {
        if (i + 1 < s.size() && s[i] == a && s[i + 1] == b) {
          s[o++] = c;
          i += 2;
        } else {
          s[o++] = s[i++];
        }
      }
      s.resize(o);
      for (size_t i = 0; i + 1 < s.size(); ++i) {
        uint64_t k = pair_key(s[i], s[i + 1]);
        pair_count[k] += n;
        if (s[i] == c || s[i + 1] == c) {
          auto& v = where[k];
          if (v.empty() || v.back() != w) v.push_back(w);
          touched.push_back(k);
        }
      }
    }
    pair_count.erase(top.pair);
    std::sort(touched.begin(), touched.end());
    touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
    for (uint64_t k : touched) heap.push({pair_count[k], k});
  }
  res.merges = merges.size();

  // Assign final ids: specials, bytes in byte order, then tokens in the order they were learned.
  ojson vocab = ojson::object();
  vocab[kBos] = 0;
  vocab[kEos] = 1;
  vocab[kPad] = 2;
  std::unordered_map<std::string, int32_t> final_id;
  int32_t next = kFirstByteId;
  for (size_t t = 0; t < bytes.size(); ++t) {
    if (final_id.count(bytes[t])) continue;
    final_id[bytes[t]] = next;
    vocab[bytes_to_byte_level(bytes[t])] = next++;
  }
  ojson merge_list = ojson::array();
  for (auto [a, b] : merges) merge_list.push_back({bytes_to_byte_level(bytes[a]), bytes_to_byte_level(bytes[b])});

  ojson tok;
  tok["version"] = "1.0";
  tok["truncation"] = nullptr;
  tok["padding"] = nullptr;
  tok["added_tokens"] = {added_token(0, kBos, true), added_token(1, kEos, true), added_token(2, kPad, true),
                         added_token(next, kUser, false), added_token(next + 1, kAssistant, false)};
  tok["normalizer"] = {{"type", "Sequence"}, {"normalizers", ojson::array()}};
  tok["pre_tokenizer"] = ojson::parse(deepseek_v3_pre_tokenizer_json());
  tok["post_processor"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}};
  tok["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
  tok["model"] = {{"type", "BPE"},        {"dropout", nullptr},     {"unk_token", nullptr},
                  {"continuing_subword_prefix", nullptr},         {"end_of_word_suffix", nullptr},
                  {"fuse_unk", false},    {"byte_fallback", false}, {"ignore_merges", false},
                  {"vocab", std::move(vocab)}, {"merges", std::move(merge_list)}};
  res.tokenizer_json = tok.dump(1);

  ojson cfg;
  cfg["add_bos_token"] = true;
  cfg["add_eos_token"] = false;
  cfg["bos_token"] = token_object(kBos);
  cfg["eos_token"] = token_object(kEos);
  cfg["pad_token"] = token_object(kEos);
  cfg["unk_token"] = nullptr;
  cfg["clean_up_tokenization_spaces"] = false;
  cfg["legacy"] = true;
  cfg["model_max_length"] = 131072;
  cfg["tokenizer_class"] = "LlamaTokenizerFast";
  cfg["chat_template"] = kChatTemplate;
  res.config_json = cfg.dump(2);
  return res;
}

BpeTrainResult train_bpe_files(const std::vector<std::string>& files, int32_t vocab_size,
                               const std::string& output) {
  if (files.empty()) input_error("tokenizer train: no input FILES given");
  namespace fs = std::filesystem;
  if (fs::path(output).filename() == "tokenizer_config.json")
    input_error("--output ", output, ": would be overwritten by tokenizer_config.json (choose another name)");
  std::vector<std::string> texts;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    if (!in) input_error("training file ", f, ": cannot open (expected a readable text file)");
    std::ostringstream ss;
    ss << in.rdbuf();
    texts.push_back(ss.str());
  }
  std::vector<std::string_view> views(texts.begin(), texts.end());
  BpeTrainResult r = train_bpe(views, vocab_size);
  fs::path cfg = fs::path(output).parent_path() / "tokenizer_config.json";
  AtomicFile a(output), b(cfg.string());
  a.write(r.tokenizer_json);
  b.write(r.config_json);
  a.commit();
  b.commit();
  return r;
}

}  // namespace dsv3
