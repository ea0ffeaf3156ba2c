// dsv3 tokenizer encode|decode|train — a contract that scripts rely on:
//   encode: UTF-8 (any bytes) on stdin → ids separated by spaces and a newline on stdout;
//   decode: ids (whitespace separated) on stdin → the text, byte for byte, on stdout;
//   train:  FILES → tokenizer.json + tokenizer_config.json (byte-level BPE, DeepSeek-V3 layout).
#include <iostream>
#include <iterator>
#include <sstream>

#include "cli/command.h"
#include "core/error.h"
#include "io/tokenizer.h"
#include "io/tokenizer_train.h"

namespace dsv3::cli {
namespace {

struct TokOptions {
  std::string tokenizer;
  bool bos = false, no_bos = false;
  int32_t vocab_size = 4096;
  std::string output = "tokenizer.json";
  std::vector<std::string> files;
};

std::string read_stdin() {
  std::ios::sync_with_stdio(false);
  return std::string(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
}

int run_encode(const TokOptions& o) {
  Tokenizer tok = Tokenizer::load(o.tokenizer);
  bool bos = o.bos ? true : o.no_bos ? false : tok.add_bos_default();
  std::vector<int32_t> ids = tok.encode(read_stdin(), bos);
  std::string out;
  out.reserve(ids.size() * 7);
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) out += ' ';
    out += std::to_string(ids[i]);
  }
  out += '\n';
  std::cout << out << std::flush;
  return 0;
}

int run_decode(const TokOptions& o) {
  Tokenizer tok = Tokenizer::load(o.tokenizer);
  std::istringstream in(read_stdin());
  std::vector<int32_t> ids;
  std::string w;
  for (size_t k = 0; in >> w; ++k) {
    size_t used = 0;
    long long v = -1;
    try {
      v = std::stoll(w, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != w.size() || v < 0 || v > tok.last_real_id())
      input_error("stdin: id ", k, " \"", w, "\": expected an integer token id in 0..", tok.last_real_id());
    ids.push_back(int32_t(v));
  }
  std::cout << tok.decode(ids) << std::flush;
  return 0;
}

int run_train(const TokOptions& o) {
  BpeTrainResult r = train_bpe_files(o.files, o.vocab_size, o.output);
  note(cat("tokenizer train: ", r.words, " distinct pre-tokens, ", r.merges, " merges; wrote ",
           o.output, " and tokenizer_config.json beside it"));
  return 0;
}

RunFn setup_tokenizer(CLI::App& app) {
  auto o = std::make_shared<TokOptions>();
  app.require_subcommand(1, 1);
  auto* enc = app.add_subcommand("encode", "Read UTF-8 text on stdin, print token ids");
  auto* dec = app.add_subcommand("decode", "Read token ids on stdin, print the text");
  auto* tr = app.add_subcommand("train", "Learn a byte-level BPE (DeepSeek-V3 pre-tokenizer)");
  for (auto* s : {enc, dec})
    s->add_option("--tokenizer", o->tokenizer, "tokenizer.json or the directory holding it")->required();
  auto* fb = enc->add_flag("--bos", o->bos, "Prepend BOS (default: tokenizer_config.json's add_bos_token)");
  enc->add_flag("--no-bos", o->no_bos, "Do not prepend BOS")->excludes(fb);
  tr->add_option("--vocab-size", o->vocab_size, "Number of token ids, specials included");
  tr->add_option("--output", o->output, "Where to write tokenizer.json (tokenizer_config.json goes beside it)");
  tr->add_option("FILES", o->files, "Training text files")->required();
  return [o, enc, dec, tr]() -> int {
    if (enc->parsed()) return run_encode(*o);
    if (dec->parsed()) return run_decode(*o);
    if (tr->parsed()) return run_train(*o);
    return 2;
  };
}

}  // namespace
}  // namespace dsv3::cli

DSV3_COMMAND(tokenizer, "Encode, decode, or train a byte-level BPE tokenizer (HF tokenizer.json)",
             dsv3::cli::setup_tokenizer);
