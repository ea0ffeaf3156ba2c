#include "io/tokenizer_regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "core/error.h"

namespace dsv3 {

namespace {

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(code, buf, sizeof buf);
  return reinterpret_cast<const char*>(buf);
}

// One JIT stack and match-data block per thread, reused across calls: the match loop runs once
// per Split per section, so allocating them each time would dominate short inputs.
struct ThreadScratch {
  pcre2_jit_stack* stack = nullptr;
  pcre2_match_context* mctx = nullptr;
  pcre2_match_data* md = nullptr;
  ThreadScratch() {
    stack = pcre2_jit_stack_create(64 * 1024, 64 * 1024 * 1024, nullptr);
    mctx = pcre2_match_context_create(nullptr);
    if (!stack || !mctx) internal_error("PCRE2: cannot allocate a JIT stack");
    pcre2_jit_stack_assign(mctx, nullptr, stack);
    // The default limit (10^7) is reached by a linear backtrack over a ~10 MB whitespace run
    // (\s*[\r\n]+ in the DeepSeek-V3 pattern), which is legitimate input.
    pcre2_set_match_limit(mctx, UINT32_MAX);
    md = pcre2_match_data_create(1, nullptr);
    if (!md) internal_error("PCRE2: cannot allocate match data");
  }
  ~ThreadScratch() {
    pcre2_match_data_free(md);
    pcre2_match_context_free(mctx);
    pcre2_jit_stack_free(stack);
  }
};

ThreadScratch& scratch() {
  thread_local ThreadScratch s;
  return s;
}

}  // namespace

Pcre2Regex::Pcre2Regex(const std::string& pattern, const std::string& where) {
  int err = 0;
  PCRE2_SIZE off = 0;
  uint32_t opts = PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF;
  auto* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), opts,
                             &err, &off, nullptr);
  if (!code)
    input_error(where, ": regex does not compile at offset ", off, ": ", pcre2_message(err),
                " (pattern ", pattern, ")");
  code_ = code;
  jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
}

Pcre2Regex::~Pcre2Regex() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

void Pcre2Regex::find_all(std::string_view s, std::vector<std::pair<size_t, size_t>>& out) const {
  out.clear();
  auto* code = static_cast<pcre2_code*>(code_);
  ThreadScratch& sc = scratch();
  auto subject = reinterpret_cast<PCRE2_SPTR>(s.data());
  size_t pos = 0;
  while (pos <= s.size()) {
    int rc = jit_ ? pcre2_jit_match(code, subject, s.size(), pos, 0, sc.md, sc.mctx)
                  : pcre2_match(code, subject, s.size(), pos, 0, sc.md, sc.mctx);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) internal_error("PCRE2 match failed: ", pcre2_message(rc));
    PCRE2_SIZE* ov = pcre2_get_ovector_pointer(sc.md);
    size_t b = ov[0], e = ov[1];
    if (e > b) {
      out.emplace_back(b, e);
      pos = e;
    } else {
      // Empty match: step over one character (or one invalid byte).
      if (b >= s.size()) break;
      pos = b + 1;
      while (pos < s.size() && (static_cast<unsigned char>(s[pos]) & 0xC0) == 0x80) ++pos;
    }
  }
}

}  // namespace dsv3
