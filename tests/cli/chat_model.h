// A small model directory for the `dsv3 chat` tests: the tiny preset's shapes with random weights
// and a byte-level BPE tokenizer (its special and chat tokens, and the chat template) trained on a
// few sentences, so its ids fit the model's vocabulary.
#pragma once
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "io/tokenizer_train.h"
#include "model/presets.h"
#include "model/weights.h"

namespace dsv3::cli_test {

inline std::string make_chat_model(const std::string& dir) {
  std::filesystem::create_directories(dir);
  Weights::random(preset_config("tiny"), 21, 0.05f).save(dir);
  const std::vector<std::string_view> texts = {"hello there, how are you today?", "the quick brown fox jumps",
                                               "over the lazy dog and again", "tell me about the weather"};
  std::ofstream(dir + "/tokenizer.json") << train_bpe(texts, bpe_min_vocab_size() + 40).tokenizer_json;
  return dir;
}

}  // namespace dsv3::cli_test
