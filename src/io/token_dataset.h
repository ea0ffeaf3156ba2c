// Token shards: a flat array of token ids with a header that says what they are.
//
// Layout (little-endian, header 64 bytes, then the tokens, nothing after them):
//   0  char[8]  magic "DSV3TOK\0"
//   8  u32      version (1)
//  12  u32      dtype code: 1 = U16, 2 = I32
//  16  u64      vocab_size: every token id is in [0, vocab_size)
//  24  u64      count: number of tokens
//  32  u32      CRC-32 (zlib) of the token bytes
//  36  u8[24]   reserved, zero
//  60  u32      CRC-32 of header bytes 0..59
//  64  count × (2 or 4) bytes of token ids
// The file size must be exactly 64 + count·size. U16 needs vocab_size ≤ 65536. Documents are
// concatenated with a separator token (the writer's caller chooses it, normally EOS).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dsv3 {

class MappedFile;

enum class TokenDType : uint32_t { U16 = 1, I32 = 2 };
const char* token_dtype_name(TokenDType t);
// The narrowest dtype that holds every id below vocab_size.
TokenDType token_dtype_for(uint64_t vocab_size);

constexpr char kTokenShardMagic[8] = {'D', 'S', 'V', '3', 'T', 'O', 'K', '\0'};
constexpr uint32_t kTokenShardVersion = 1;
constexpr size_t kTokenShardHeaderBytes = 64;

struct TokenShardInfo {
  uint32_t version = kTokenShardVersion;
  TokenDType dtype = TokenDType::U16;
  uint64_t vocab_size = 0;
  uint64_t count = 0;
  uint32_t data_crc = 0;
};

// Write `tokens` as a shard at `path`, atomically (the old file, if any, stays until the new one
// is complete). InputError if an id is outside [0, vocab_size).
TokenShardInfo write_token_shard(const std::string& path, const std::vector<int32_t>& tokens,
                                 uint64_t vocab_size);

// A shard mapped read-only. open() validates every header field, the exact size, both checksums
// and every id's range, and throws InputError naming the file and the field.
class TokenShard {
 public:
  static TokenShard open(const std::string& path);
  const TokenShardInfo& info() const { return info_; }
  uint64_t size() const { return info_.count; }
  const std::string& path() const { return path_; }
  int32_t operator[](uint64_t i) const;
  // Copy tokens [begin, begin+n) into out as int32.
  void read(uint64_t begin, uint64_t n, int32_t* out) const;

 private:
  std::shared_ptr<MappedFile> file_;
  const uint8_t* data_ = nullptr;
  TokenShardInfo info_;
  std::string path_;
};

}  // namespace dsv3
