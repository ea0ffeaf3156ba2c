// A small model directory for the `dsv3 chat` tests: the tiny preset's shapes with random weights
// and a byte-level BPE tokenizer (its special and chat tokens, and the chat template) trained on a
// few sentences, so its ids fit the model's vocabulary.
#pragma once
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>

#include "io/tokenizer_train.h"
#include "model/presets.h"
#include "model/weights.h"

namespace dsv3::cli_test {

// The model in a fresh directory under the system's temporary one (`tag` and the process id name
// it), removed with this object.
struct ChatModelDir {
  std::string path;
  explicit ChatModelDir(const std::string& tag)
      : path((std::filesystem::temp_directory_path() / (tag + "_" + std::to_string(::getpid()))).string()) {
    std::filesystem::create_directories(path);
    Weights::random(preset_config("tiny"), 21, 0.05f).save(path);
    const std::vector<std::string_view> texts = {"hello there, how are you today?", "the quick brown fox jumps",
                                                 "over the lazy dog and again", "tell me about the weather"};
    std::ofstream(path + "/tokenizer.json") << train_bpe(texts, bpe_min_vocab_size() + 40).tokenizer_json;
  }
  ~ChatModelDir() { std::filesystem::remove_all(path); }
  ChatModelDir(const ChatModelDir&) = delete;
  ChatModelDir& operator=(const ChatModelDir&) = delete;
};

}  // namespace dsv3::cli_test
