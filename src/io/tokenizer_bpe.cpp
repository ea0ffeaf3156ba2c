#include "io/tokenizer_bpe.h"

#include <array>
#include <queue>

#include "core/error.h"

namespace dsv3 {

using nlohmann::json;

namespace {

struct ByteTables {
  std::array<std::string, 256> chr;
  std::unordered_map<char32_t, uint8_t> inv;
  ByteTables() {
    // Printable Latin-1 bytes stand for themselves; the other 68 go to U+0100 upwards in order.
    int next = 0;
    for (int b = 0; b < 256; ++b) {
      bool keep = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      char32_t cp = keep ? char32_t(b) : char32_t(0x100 + next++);
      std::string s;
      if (cp < 0x80) {
        s += char(cp);
      } else {
        s += char(0xC0 | (cp >> 6));
        s += char(0x80 | (cp & 0x3F));
      }
      chr[b] = s;
      inv[cp] = uint8_t(b);
    }
  }
};

const ByteTables& tables() {
  static const ByteTables t;
  return t;
}

constexpr size_t kMaxCachedPiece = 256;
constexpr size_t kMaxCacheEntries = 1 << 20;

}  // namespace

const std::string& byte_level_char(uint8_t b) { return tables().chr[b]; }

bool byte_level_to_bytes(std::string_view t, std::string& out) {
  out.clear();
  const auto& inv = tables().inv;
  for (size_t i = 0; i < t.size();) {
    unsigned char c = static_cast<unsigned char>(t[i]);
    char32_t cp;
    if (c < 0x80) {
      cp = c;
      i += 1;
    } else if ((c & 0xE0) == 0xC0 && i + 1 < t.size()) {
      cp = (char32_t(c & 0x1F) << 6) | (static_cast<unsigned char>(t[i + 1]) & 0x3F);
      i += 2;
    } else {
      return false;  // byte characters are all below U+0800
    }
    auto it = inv.find(cp);
    if (it == inv.end()) return false;
    out += char(it->second);
  }
  return true;
}

std::string bytes_to_byte_level(std::string_view bytes) {
  std::string s;
  s.reserve(bytes.size() * 2);
  for (unsigned char c : bytes) s += tables().chr[c];
  return s;
}

void BpeModel::load(const json& m, const std::string& where) {
  if (!m.is_object()) input_error(where, ": expected an object");
  std::string type = m.value("type", std::string("BPE"));
  if (type != "BPE") input_error(where, ".type: unsupported model \"", type, "\" (expected BPE)");
  if (m.contains("byte_fallback") && m["byte_fallback"].is_boolean() && m["byte_fallback"].get<bool>())
    input_error(where, ".byte_fallback: true is not supported (byte-level BPE needs no fallback)");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (m.contains(k) && m[k].is_string() && !m[k].get<std::string>().empty())
      input_error(where, ".", k, ": a non-empty value is not supported in byte-level BPE");
  if (m.contains("dropout") && m["dropout"].is_number() && m["dropout"].get<double>() > 0)
    input_error(where, ".dropout: BPE dropout is not supported");
  ignore_merges_ = m.contains("ignore_merges") && m["ignore_merges"].is_boolean() &&
                   m["ignore_merges"].get<bool>();
  if (!m.contains("vocab") || !m["vocab"].is_object())
    input_error(where, ".vocab: expected an object {token: id}");
  const json& vocab = m["vocab"];
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    if (!it.value().is_number_integer())
      input_error(where, ".vocab[\"", it.key(), "\"]: expected an integer id");
    int64_t id = it.value().get<int64_t>();
    const int64_t limit = id_limit(int64_t(vocab.size()));
    if (id < 0 || id >= limit)
      input_error(where, ".vocab[\"", it.key(), "\"]: id ", id, " out of range (expected 0 <= id < ", limit,
                  " for ", vocab.size(), " entries)");
    max_id_ = std::max<int32_t>(max_id_, int32_t(id));
  }
  id_to_token_.assign(max_id_ + 1, {});
  id_to_bytes_.assign(max_id_ + 1, {});
  id_is_bytes_.assign(max_id_ + 1, 0);
  token_to_id_.reserve(vocab.size());
  bytes_to_id_.reserve(vocab.size());
  std::string raw;
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    int32_t id = it.value().get<int32_t>();
    // An empty token would look like a free id to the check below and to id_to_token().
    if (it.key().empty()) input_error(where, ".vocab: an empty token (id ", id, ")");
    // Two tokens on one id: encoding would emit the id for either and decoding give only the last.
    if (!id_to_token_[id].empty())
      input_error(where, ".vocab: \"", it.key(), "\" and \"", id_to_token_[id], "\" have the same id ", id);
    token_to_id_[it.key()] = id;
    id_to_token_[id] = it.key();
    if (byte_level_to_bytes(it.key(), raw)) {
      id_to_bytes_[id] = raw;
      id_is_bytes_[id] = 1;
      bytes_to_id_.emplace(raw, id);
    }
  }
  for (int b = 0; b < 256; ++b) {
    auto it = token_to_id_.find(byte_level_char(uint8_t(b)));
    if (it == token_to_id_.end())
      input_error(where, ".vocab: byte 0x", std::hex, b, std::dec, " (\"", byte_level_char(uint8_t(b)),
                  "\") has no token; a byte-level vocab needs all 256");
    byte_id_[b] = it->second;
  }
  if (!m.contains("merges") || !m["merges"].is_array()) input_error(where, ".merges: expected an array");
  const json& merges = m["merges"];
  merges_.reserve(merges.size() * 2);
  int32_t rank = 0;
  for (size_t k = 0; k < merges.size(); ++k) {
    const json& e = merges[k];
    std::string a, b;
    if (e.is_string()) {
      const std::string& s = e.get_ref<const std::string&>();
      if (s.rfind("#version", 0) == 0) continue;
      size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos || sp == 0 ||
          sp + 1 == s.size())
        input_error(where, ".merges[", k, "]: bad merge line \"", s,
                    "\" (expected two tokens separated by one space)");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    } else {
      input_error(where, ".merges[", k, "]: expected \"a b\" or [\"a\", \"b\"]");
    }
    auto ia = token_to_id_.find(a), ib = token_to_id_.find(b), ic = token_to_id_.find(a + b);
    if (ia == token_to_id_.end() || ib == token_to_id_.end())
      input_error(where, ".merges[", k, "]: unknown token \"",
                  ia == token_to_id_.end() ? a : b, "\" (not in vocab)");
    if (ic == token_to_id_.end())
      input_error(where, ".merges[", k, "]: the merged token \"", a + b, "\" is not in vocab");
    uint64_t key = (uint64_t(uint32_t(ia->second)) << 32) | uint32_t(ib->second);
    merges_.emplace(key, Merge{rank, ic->second});  // first (lowest) rank wins for duplicates
    ++rank;
  }
}

int32_t BpeModel::bytes_id(std::string_view bytes) const {
  auto it = bytes_to_id_.find(std::string(bytes));
  return it == bytes_to_id_.end() ? -1 : it->second;
}

const std::string* BpeModel::id_bytes(int32_t id) const {
  if (id < 0 || id > max_id_ || !id_is_bytes_[id]) return nullptr;
  return &id_to_bytes_[id];
}

const std::string* BpeModel::id_token(int32_t id) const {
  if (id < 0 || id > max_id_ || id_to_token_[id].empty()) return nullptr;
  return &id_to_token_[id];
}

int32_t BpeModel::token_id(std::string_view token) const {
  auto it = token_to_id_.find(std::string(token));
  return it == token_to_id_.end() ? -1 : it->second;
}

void BpeModel::encode_piece(std::string_view piece, std::vector<int32_t>& out) const {
  if (piece.empty()) return;
  if (piece.size() == 1) {
    out.push_back(byte_id_[static_cast<unsigned char>(piece[0])]);
    return;
  }
  if (ignore_merges_) {
    auto it = bytes_to_id_.find(std::string(piece));
    if (it != bytes_to_id_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  if (piece.size() > kMaxCachedPiece) {
    merge_word(piece, out);
    return;
  }
  std::string key(piece);
  {
    std::lock_guard<std::mutex> lk(cache_mu_);
    auto it = cache_.find(key);
    if (it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  size_t start = out.size();
  merge_word(piece, out);
  std::lock_guard<std::mutex> lk(cache_mu_);
  if (cache_.size() >= kMaxCacheEntries) cache_.clear();
  cache_.emplace(std::move(key), std::vector<int32_t>(out.begin() + long(start), out.end()));
}

void BpeModel::merge_word(std::string_view piece, std::vector<int32_t>& out) const {
  const int n = int(piece.size());
  std::vector<int32_t> id(n), prev(n), next(n);
  for (int i = 0; i < n; ++i) {
    id[i] = byte_id_[static_cast<unsigned char>(piece[i])];
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  struct Cand {
    int32_t rank, pos, left, right;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int pos) {
    int nx = next[pos];
    if (nx < 0) return;
    auto it = merges_.find((uint64_t(uint32_t(id[pos])) << 32) | uint32_t(id[nx]));
    if (it != merges_.end()) heap.push({it->second.rank, pos, id[pos], id[nx]});
  };
  for (int i = 0; i + 1 < n; ++i) push(i);
  while (!heap.empty()) {
    Cand c = heap.top();
    heap.pop();
    // Stale entries: the left symbol was absorbed (id -1) or either side changed since the push.
    if (id[c.pos] != c.left) continue;
    int nx = next[c.pos];
    if (nx < 0 || id[nx] != c.right) continue;
    auto it = merges_.find((uint64_t(uint32_t(c.left)) << 32) | uint32_t(c.right));
    id[c.pos] = it->second.result;
    id[nx] = -1;
    next[c.pos] = next[nx];
    if (next[nx] >= 0) prev[next[nx]] = c.pos;
    if (prev[c.pos] >= 0) push(prev[c.pos]);
    push(c.pos);
  }
  for (int i = 0; i >= 0; i = next[i]) out.push_back(id[i]);
}

}  // namespace dsv3
