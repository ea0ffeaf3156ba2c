// Byte-level BPE training with DeepSeek-V3's pre-tokenizer. The result is an HF tokenizer.json
// (pair-form merges) and a tokenizer_config.json laid out like DeepSeek-V3's: BOS
// "<｜begin▁of▁sentence｜>" id 0, EOS "<｜end▁of▁sentence｜>" id 1, pad id 2, the 256 byte tokens at
// ids 3..258, then the merges, then the chat tokens <｜User｜> and <｜Assistant｜>.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace dsv3 {

struct BpeTrainResult {
  std::string tokenizer_json, config_json;
  size_t merges = 0;
  size_t words = 0;  // distinct pre-tokens seen
};

// The smallest vocab_size train_bpe accepts: the specials, 256 bytes and the chat tokens.
int32_t bpe_min_vocab_size();

// Learn merges until the vocab holds `vocab_size` ids (fewer if the text runs out of pairs).
// Deterministic: ties between equally frequent pairs go to the smaller (left, right) byte strings.
BpeTrainResult train_bpe(std::span<const std::string_view> texts, int32_t vocab_size);

// Reads FILES, trains, writes <output> and tokenizer_config.json beside it (atomically).
BpeTrainResult train_bpe_files(const std::vector<std::string>& files, int32_t vocab_size,
                               const std::string& output);

// DeepSeek-V3's pre_tokenizer object as it appears in its tokenizer.json.
std::string deepseek_v3_pre_tokenizer_json();

}  // namespace dsv3
