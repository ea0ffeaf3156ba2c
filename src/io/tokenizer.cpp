#include "io/tokenizer.h"

#include <unicode/uchar.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "io/strict_json.h"
#include "io/tokenizer_impl.h"

namespace dsv3 {

using nlohmann::json;

void AddedTokenMatcher::build(const std::vector<AddedTokenInfo>& tokens) {
  nodes_.assign(1, {});
  std::fill(std::begin(first_), std::end(first_), false);
  for (size_t t = 0; t < tokens.size(); ++t) {
    const std::string& c = tokens[t].content;
    if (c.empty()) continue;
    first_[static_cast<unsigned char>(c[0])] = true;
    int32_t node = 0;
    for (unsigned char ch : c) {
      int32_t nx = -1;
      for (auto& [k, v] : nodes_[node].next)
        if (k == ch) nx = v;
      if (nx < 0) {
        nx = int32_t(nodes_.size());
        nodes_[node].next.emplace_back(ch, nx);
        nodes_.emplace_back();
      }
      node = nx;
    }
    if (nodes_[node].token < 0) nodes_[node].token = int32_t(t);
  }
}

std::pair<size_t, int> AddedTokenMatcher::match_at(std::string_view s, size_t i) const {
  if (!first_[static_cast<unsigned char>(s[i])]) return {0, -1};
  std::pair<size_t, int> best{0, -1};
  int32_t node = 0;
  for (size_t j = i; j < s.size(); ++j) {
    int32_t nx = -1;
    for (auto& [k, v] : nodes_[node].next)
      if (k == static_cast<unsigned char>(s[j])) nx = v;
    if (nx < 0) break;
    node = nx;
    if (nodes_[node].token >= 0) best = {j + 1 - i, nodes_[node].token};
  }
  return best;
}

namespace {

std::string read_file(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) input_error(what, " ", path, ": cannot open (expected a readable file)");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Strict (strict_json.h): the pre-tokenizer and normalizer are read recursively, so an unbounded
// nesting would overflow the stack; duplicate keys are refused as in configs and checkpoints. Real
// tokenizer.json files nest about six deep.
json parse_json(std::string_view text, const std::string& where) { return parse_json_strict(text, where, 64); }

// tokenizer_config.json names tokens either as a string or as {"__type": "AddedToken", "content": …}.
std::string config_token(const json& cfg, const char* key) {
  if (!cfg.contains(key)) return {};
  const json& v = cfg[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string())
    return v["content"].get<std::string>();
  return {};
}

bool is_word_char(char32_t c) { return c == '_' || u_isalnum(UChar32(c)); }

// The character that ends just before s[i] (or 0 when there is none or it is not valid UTF-8).
char32_t char_before(std::string_view s, size_t i) {
  for (size_t k = 1; k <= 4 && k <= i; ++k) {
    size_t n = utf8_char_len(s, i - k);
    if (n == k) return utf8_decode(s, i - k, n);
  }
  return 0;
}

char32_t char_at(std::string_view s, size_t i) {
  if (i >= s.size()) return 0;
  size_t n = utf8_char_len(s, i);
  return n ? utf8_decode(s, i, n) : 0;
}

size_t trim_end(std::string_view s, size_t b, size_t e) {
  while (e > b) {
    size_t k = 1;
    for (; k <= 4 && k <= e - b; ++k)
      if (utf8_char_len(s, e - k) == k) break;
    if (k > 4 || k > e - b || !is_unicode_space(utf8_decode(s, e - k, k))) break;
    e -= k;
  }
  return e;
}

size_t trim_begin(std::string_view s, size_t b, size_t e) {
  while (b < e) {
    size_t n = utf8_char_len(s, b);
    if (!n || b + n > e || !is_unicode_space(utf8_decode(s, b, n))) break;
    b += n;
  }
  return b;
}

}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(const std::string& path) {
  namespace fs = std::filesystem;
  std::string file = path;
  std::error_code ec;
  if (fs::is_directory(path, ec)) file = (fs::path(path) / "tokenizer.json").string();
  if (!fs::exists(file, ec))
    input_error("tokenizer ", path, ": no such file (expected a tokenizer.json or the directory holding it)");
  std::string text = read_file(file, "tokenizer");
  fs::path cfg = fs::path(file).parent_path() / "tokenizer_config.json";
  std::string cfg_text;
  if (fs::exists(cfg, ec)) cfg_text = read_file(cfg.string(), "tokenizer config");
  return from_json(text, cfg_text, file);
}

// A function-try-block: a field of the wrong JSON type anywhere below (nlohmann's type_error from
// value()/get()) is the file's fault, so it becomes an InputError naming the file.
Tokenizer Tokenizer::from_json(std::string_view text, std::string_view config_text,
                               const std::string& where) try {
  auto impl = std::make_unique<Impl>();
  json j = parse_json(text, where);
  if (!j.is_object()) input_error(where, ": expected a JSON object at the top level");
  if (!j.contains("model")) input_error(where, ": missing \"model\"");
  impl->model.load(j["model"], where + ": model");
  impl->normalizer = Normalizer::from_json(j.value("normalizer", json()), where + ": normalizer");
  impl->pre_tokenizer = PreTokenizer::from_json(j.value("pre_tokenizer", json()), where + ": pre_tokenizer");
  if (!impl->pre_tokenizer || !impl->pre_tokenizer->has_byte_level())
    input_error(where, ": pre_tokenizer: no ByteLevel step (only byte-level BPE is supported)");
  json dec = j.value("decoder", json());
  if (!dec.is_null()) {
    std::string t = dec.is_object() ? dec.value("type", std::string()) : std::string();
    if (t != "ByteLevel")
      input_error(where, ": decoder: unknown or unsupported type \"", t, "\" (expected ByteLevel)");
  }
  int32_t last = impl->model.max_id();
  if (j.contains("added_tokens")) {
    if (!j["added_tokens"].is_array()) input_error(where, ": added_tokens: expected an array");
    size_t k = 0;
    const size_t n_added = j["added_tokens"].size();
    const int64_t limit = id_limit(int64_t(impl->model.max_id()) + 1 + int64_t(n_added));
    for (const json& a : j["added_tokens"]) {
      std::string w = cat(where, ": added_tokens[", k++, "]");
      if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() ||
          !a.contains("content") || !a["content"].is_string())
        input_error(w, ": expected {\"id\": integer, \"content\": string, ...}");
      AddedTokenInfo t;
      int64_t id = a["id"].get<int64_t>();
      if (id < 0 || id >= limit)
        input_error(w, ": id ", id, " out of range (expected 0 <= id < ", limit, ", from the vocabulary's ",
                    impl->model.max_id() + 1, " ids and ", n_added, " added tokens)");
      t.id = int32_t(id);
      t.content = a["content"].get<std::string>();
      if (t.content.empty()) input_error(w, ": empty content");
      auto flag = [&](const char* key) { return a.contains(key) && a[key].is_boolean() && a[key].get<bool>(); };
      t.special = flag("special");
      t.lstrip = flag("lstrip");
      t.rstrip = flag("rstrip");
      t.single_word = flag("single_word");
      t.normalized = flag("normalized");
      last = std::max(last, t.id);
      impl->added.push_back(std::move(t));
    }
  }
  impl->last_id = last;
  impl->added_index_of_id.assign(size_t(last) + 1, -1);
  for (size_t k = 0; k < impl->added.size(); ++k) impl->added_index_of_id[impl->added[k].id] = int32_t(k);
  impl->matcher.build(impl->added);
  size_t n = 0;
  for (int32_t id = 0; id <= last; ++id) n += impl->added_token(id) || impl->model.id_token(id);
  impl->n_ids = n;

  auto find_id = [&](const std::string& content) -> int32_t {
    for (auto& t : impl->added)
      if (t.content == content) return t.id;
    return impl->model.token_id(content);
  };
  // A TemplateProcessing post-processor whose single-sequence template starts with a special token
  // (Llama 3's "<|begin_of_text|> $A") is how HF adds BOS without tokenizer_config.json.
  json post = j.value("post_processor", json());
  std::vector<json> posts;
  if (post.is_object() && post.value("type", std::string()) == "Sequence" && post.contains("processors") &&
      post["processors"].is_array())
    posts.assign(post["processors"].begin(), post["processors"].end());
  else
    posts.push_back(post);
  for (const json& p : posts) {
    if (!p.is_object() || p.value("type", std::string()) != "TemplateProcessing") continue;
    if (!p.contains("single") || !p["single"].is_array() || p["single"].empty()) continue;
    const json& first = p["single"][0];
    if (first.is_object() && first.contains("SpecialToken") && first["SpecialToken"].is_object() &&
        first["SpecialToken"].contains("id") && first["SpecialToken"]["id"].is_string()) {
      std::string content = first["SpecialToken"]["id"].get<std::string>();
      impl->bos = find_id(content);
      if (impl->bos < 0)
        input_error(where, ": post_processor: TemplateProcessing names \"", content, "\", which is no token");
      impl->add_bos = true;
    }
  }
  if (!config_text.empty()) {
    json cfg = parse_json(config_text, "tokenizer_config.json beside " + where);
    if (!cfg.is_object()) input_error("tokenizer_config.json beside ", where, ": expected an object");
    std::string bos = config_token(cfg, "bos_token"), eos = config_token(cfg, "eos_token");
    auto named = [&](const std::string& content, const char* key) {
      const int32_t id = find_id(content);
      if (id < 0)
        input_error("tokenizer_config.json beside ", where, ": ", key, " \"", content, "\" is no token of ", where);
      return id;
    };
    if (!bos.empty()) impl->bos = named(bos, "bos_token");
    if (!eos.empty()) impl->eos = named(eos, "eos_token");
    if (cfg.contains("add_bos_token") && cfg["add_bos_token"].is_boolean())
      impl->add_bos = cfg["add_bos_token"].get<bool>();
  }
  return Tokenizer(std::move(impl));
} catch (const json::exception& e) {
  input_error(where, ": a field has the wrong JSON type (", e.what(), ")");
}

void Tokenizer::Impl::encode_section(std::string_view text, std::vector<int32_t>& out,
                                     std::vector<std::string>& pieces) const {
  if (text.empty()) return;
  pieces.clear();
  pieces.emplace_back(text);
  if (normalizer) {
    normalizer->normalize(pieces[0]);
    if (pieces[0].empty()) return;
  }
  pre_tokenizer->apply(pieces);
  for (const std::string& p : pieces) model.encode_piece(p, out);
}

std::vector<int32_t> Tokenizer::encode(std::string_view s, bool add_bos) const {
  const Impl& m = *impl_;
  std::vector<int32_t> out;
  out.reserve(s.size() / 3 + 4);
  if (add_bos && m.bos >= 0) out.push_back(m.bos);
  std::vector<std::string> pieces;
  // Text between added tokens, as [b, e); `pending_rstrip` trims the start of the next section.
  size_t start = 0;
  bool pending_rstrip = false;
  auto flush_text = [&](size_t b, size_t e, bool lstrip_next) {
    if (pending_rstrip) b = trim_begin(s, b, e);
    if (lstrip_next) e = trim_end(s, b, e);
    if (e > b) m.encode_section(s.substr(b, e - b), out, pieces);
  };
  if (!m.matcher.empty()) {
    for (size_t i = 0; i < s.size();) {
      auto [len, idx] = m.matcher.match_at(s, i);
      if (len > 0) {
        const AddedTokenInfo& t = m.added[idx];
        bool ok = !t.single_word ||
                  (!is_word_char(char_before(s, i)) && !is_word_char(char_at(s, i + len)));
        if (ok) {
          flush_text(start, i, t.lstrip);
          out.push_back(t.id);
          pending_rstrip = t.rstrip;
          i += len;
          start = i;
          continue;
        }
      }
      ++i;
    }
  }
  flush_text(start, s.size(), false);
  return out;
}

void Tokenizer::pre_tokenize(std::string_view text, std::vector<std::string>& out) const {
  out.clear();
  if (text.empty()) return;
  out.emplace_back(text);
  if (impl_->normalizer) impl_->normalizer->normalize(out[0]);
  impl_->pre_tokenizer->apply(out);
}

std::string Tokenizer::decode_token(int32_t id) const {
  const Impl& m = *impl_;
  if (const AddedTokenInfo* t = m.added_token(id)) return t->content;
  if (const std::string* b = m.model.id_bytes(id)) return *b;
  // A vocab entry outside the byte alphabet decodes to its own text, as HF's ByteLevel decoder does.
  if (const std::string* t = m.model.id_token(id)) return *t;
  input_error("token id ", id, ": no such token (valid ids are 0..", m.last_id, " with a token)");
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string out;
  for (int32_t id : ids) {
    if (skip_special && is_special(id)) continue;
    out += decode_token(id);
  }
  return out;
}

int32_t Tokenizer::bos_id() const { return impl_->bos; }
int32_t Tokenizer::eos_id() const { return impl_->eos; }
bool Tokenizer::add_bos_default() const { return impl_->add_bos; }
int32_t Tokenizer::last_real_id() const { return impl_->last_id; }
size_t Tokenizer::vocab_size() const { return impl_->n_ids; }
const std::vector<AddedTokenInfo>& Tokenizer::added_tokens() const { return impl_->added; }

int32_t Tokenizer::token_to_id(std::string_view token) const {
  for (auto& t : impl_->added)
    if (t.content == token) return t.id;
  return impl_->model.token_id(token);
}

bool Tokenizer::is_special(int32_t id) const {
  const AddedTokenInfo* t = impl_->added_token(id);
  return t && t->special;
}

}  // namespace dsv3
