#include "io/token_dataset.h"

#include <bit>
#include <cstring>

#include "core/error.h"
#include "io/atomic_file.h"
#include "io/checksum.h"
#include "io/mmap_file.h"

namespace dsv3 {

static_assert(std::endian::native == std::endian::little, "token shards are read in place");

namespace {

template <class T>
void put(uint8_t* h, size_t off, T v) {
  std::memcpy(h + off, &v, sizeof v);
}
template <class T>
T get(const uint8_t* h, size_t off) {
  T v;
  std::memcpy(&v, h + off, sizeof v);
  return v;
}

size_t elem_size(TokenDType t) { return t == TokenDType::U16 ? 2 : 4; }

}  // namespace

const char* token_dtype_name(TokenDType t) {
  switch (t) {
    case TokenDType::U16: return "U16";
    case TokenDType::I32: return "I32";
  }
  return "?";
}

TokenDType token_dtype_for(uint64_t vocab_size) {
  return vocab_size <= 65536 ? TokenDType::U16 : TokenDType::I32;
}

TokenShardInfo write_token_shard(const std::string& path, const std::vector<int32_t>& tokens,
                                 uint64_t vocab_size) {
  if (vocab_size == 0 || vocab_size > uint64_t(INT32_MAX) + 1)
    input_error(path, ": vocabulary size ", vocab_size, " must be in [1, 2^31]");
  TokenShardInfo info;
  info.dtype = token_dtype_for(vocab_size);
  info.vocab_size = vocab_size;
  info.count = tokens.size();
  std::vector<uint8_t> body(tokens.size() * elem_size(info.dtype));
  for (size_t i = 0; i < tokens.size(); ++i) {
    int32_t t = tokens[i];
    if (t < 0 || uint64_t(t) >= vocab_size)
      input_error(path, ": token ", i, " has id ", t, ", outside the vocabulary [0, ", vocab_size, ")");
    if (info.dtype == TokenDType::U16)
      put<uint16_t>(body.data(), 2 * i, uint16_t(t));
    else
      put<int32_t>(body.data(), 4 * i, t);
  }
  info.data_crc = crc32(body.data(), body.size());

  uint8_t h[kTokenShardHeaderBytes] = {};
  std::memcpy(h, kTokenShardMagic, 8);
  put<uint32_t>(h, 8, info.version);
  put<uint32_t>(h, 12, uint32_t(info.dtype));
  put<uint64_t>(h, 16, info.vocab_size);
  put<uint64_t>(h, 24, info.count);
  put<uint32_t>(h, 32, info.data_crc);
  put<uint32_t>(h, 60, crc32(h, 60));

  AtomicFile f(path);
  f.write(h, sizeof h);
  f.write(body.data(), body.size());
  f.commit();
  return info;
}

TokenShard TokenShard::open(const std::string& path) {
  TokenShard s;
  s.path_ = path;
  s.file_ = MappedFile::open(path);
  const uint8_t* p = s.file_->data();
  const size_t n = s.file_->size();
  const std::string where = cat("token shard ", path);
  if (n < kTokenShardHeaderBytes)
    input_error(where, ": ", n, " bytes is shorter than the ", kTokenShardHeaderBytes, "-byte header");
  if (std::memcmp(p, kTokenShardMagic, 8) != 0)
    input_error(where, ": bad magic (expected \"DSV3TOK\\0\"); not a dsv3 token shard");
  TokenShardInfo& info = s.info_;
  info.version = get<uint32_t>(p, 8);
  if (info.version != kTokenShardVersion)
    input_error(where, ": format version ", info.version, " is not supported (expected ",
                kTokenShardVersion, ")");
  uint32_t hcrc = get<uint32_t>(p, 60), want_hcrc = crc32(p, 60);
  if (hcrc != want_hcrc)
    input_error(where, ": header checksum ", crc_hex(hcrc), " does not match its contents (",
                crc_hex(want_hcrc), "); the header is corrupt");
  uint32_t code = get<uint32_t>(p, 12);
  if (code != uint32_t(TokenDType::U16) && code != uint32_t(TokenDType::I32))
    input_error(where, ": dtype code ", code, " is not 1 (U16) or 2 (I32)");
  info.dtype = TokenDType(code);
  info.vocab_size = get<uint64_t>(p, 16);
  if (info.vocab_size == 0 || info.vocab_size > uint64_t(INT32_MAX) + 1)
    input_error(where, ": vocab_size ", info.vocab_size, " must be in [1, 2^31]");
  if (info.dtype == TokenDType::U16 && info.vocab_size > 65536)
    input_error(where, ": vocab_size ", info.vocab_size, " does not fit dtype U16 (≤ 65536)");
  for (size_t i = 36; i < 60; ++i)
    if (p[i] != 0) input_error(where, ": reserved header byte ", i, " is ", int(p[i]), ", expected 0");
  info.count = get<uint64_t>(p, 24);
  unsigned long long body = 0, total = 0;
  if (mul_overflows(info.count, elem_size(info.dtype), &body) ||
      add_overflows(body, kTokenShardHeaderBytes, &total) || total != n)
    input_error(where, ": header says ", info.count, " ", token_dtype_name(info.dtype),
                " tokens, which needs ", kTokenShardHeaderBytes, " + count·", elem_size(info.dtype),
                " bytes, but the file has ", n, " bytes");
  info.data_crc = get<uint32_t>(p, 32);
  s.data_ = p + kTokenShardHeaderBytes;
  uint32_t dcrc = crc32(s.data_, body);
  if (dcrc != info.data_crc)
    input_error(where, ": token data checksum ", crc_hex(dcrc), " does not match the header's ",
                crc_hex(info.data_crc), "; the data is corrupt");
  for (uint64_t i = 0; i < info.count; ++i) {
    int64_t t = info.dtype == TokenDType::U16 ? int64_t(get<uint16_t>(s.data_, 2 * i))
                                              : int64_t(get<int32_t>(s.data_, 4 * i));
    if (t < 0 || uint64_t(t) >= info.vocab_size)
      input_error(where, ": token ", i, " has id ", t, ", outside the vocabulary [0, ",
                  info.vocab_size, ")");
  }
  return s;
}

int32_t TokenShard::operator[](uint64_t i) const {
  DSV3_CHECK(i < info_.count, "token index ", i, " past the end of ", path_);
  return info_.dtype == TokenDType::U16 ? int32_t(get<uint16_t>(data_, 2 * i))
                                        : get<int32_t>(data_, 4 * i);
}

void TokenShard::read(uint64_t begin, uint64_t n, int32_t* out) const {
  DSV3_CHECK(begin <= info_.count && n <= info_.count - begin, "window [", begin, ", +", n,
             ") past the end of ", path_);
  if (info_.dtype == TokenDType::I32) {
    std::memcpy(out, data_ + 4 * begin, 4 * n);
    return;
  }
  for (uint64_t i = 0; i < n; ++i) out[i] = get<uint16_t>(data_, 2 * (begin + i));
}

}  // namespace dsv3
