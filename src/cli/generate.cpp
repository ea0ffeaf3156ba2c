// dsv3 generate: text (or token ids) in, streamed text out, llama.cpp-style timing at the end.
//
// Contract for scripts: `--prompt-ids "ID ID ..."` takes token ids instead of text, and
// `--print-ids` prints only the generated ids, space separated, on one line of stdout (the text is
// not printed then); with `--temp 0` that is greedy decoding. Diagnostics and timing go to stderr.
#include <chrono>
#include <fstream>
#include <iostream>
#include <sstream>

#include "cli/command.h"
#include "cli/decode_options.h"
#include "core/threads.h"
#include "infer/session.h"
#include "model/model.h"

namespace dsv3::cli {
namespace {

struct GenerateOptions {
  std::string model_dir, prompt, prompt_file, prompt_ids, tokenizer;
  int64_t n_predict = 128;
  DecodeOptions d;
  std::vector<std::string> stop;
  bool print_ids = false, ignore_eos = false;
};

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

int run_generate(const GenerateOptions& o) {
  set_num_threads(o.d.threads);
  const int given = int(!o.prompt.empty()) + int(!o.prompt_file.empty()) + int(!o.prompt_ids.empty());
  if (given != 1) input_error("give exactly one of -p TEXT, -f FILE or --prompt-ids \"ID ID ...\" (got ", given, ")");
  const SamplingParams sp = o.d.sampling();
  if (o.n_predict < 1) input_error("-n: ", o.n_predict, " tokens to generate; expected >= 1");
  EngineOptions eo = o.d.engine();

  Weights w = Weights::load(o.model_dir);
  o.d.apply_weights(w);
  const ModelConfig& c = w.config();
  const bool need_tok = o.prompt_ids.empty() || !o.print_ids || !o.stop.empty();
  std::optional<Tokenizer> tok = load_model_tokenizer(
      o.model_dir, o.tokenizer, c.vocab_size, need_tok, "needed for text prompts, text output and --stop");

  std::vector<int32_t> prompt;
  if (!o.prompt_ids.empty()) {
    prompt = parse_prompt_ids(o.prompt_ids, c.vocab_size);
  } else {
    std::string text = o.prompt;
    if (!o.prompt_file.empty()) {
      std::ifstream f(o.prompt_file, std::ios::binary);
      if (!f) input_error("-f ", o.prompt_file, ": cannot open the prompt file");
      std::stringstream ss;
      ss << f.rdbuf();
      text = ss.str();
    }
    prompt = tok->encode(text);
  }

  if (tok) {
    eo.n_valid = int64_t(tok->last_real_id()) + 1;
    const Tokenizer* t = &*tok;
    eo.token_text = [t](int32_t id) { return t->decode_token(id); };
  }
  Engine eng(w, eo, backend_named(o.d.device));
  note(eng.pool().describe());

  Request r;
  r.prompt = prompt;
  r.sampling = sp;
  r.max_tokens = o.n_predict;
  r.stop_strings = o.stop;
  if (!o.ignore_eos) {
    if (tok && tok->eos_id() >= 0) r.stop_ids.push_back(tok->eos_id());
    for (int64_t e : c.eos_token_id)
      if (std::find(r.stop_ids.begin(), r.stop_ids.end(), int32_t(e)) == r.stop_ids.end()) r.stop_ids.push_back(int32_t(e));
  }
  eng.add(r);

  GenerationTimes t;
  t.prompt_tokens = int64_t(prompt.size());
  std::vector<int32_t> out;
  const double t0 = now();
  double t_first = -1;
  std::string reason;
  while (eng.has_work()) {
    for (const SeqEvent& e : eng.step()) {
      if (!e.tokens.empty() && t_first < 0) t_first = now();
      out.insert(out.end(), e.tokens.begin(), e.tokens.end());
      if (!o.print_ids && !e.text.empty()) std::cout << e.text << std::flush;
      if (e.finished) reason = e.finish_reason;
    }
  }
  const double t1 = now();
  if (t_first < 0) t_first = t1;
  if (o.print_ids) {
    std::string s;
    for (size_t i = 0; i < out.size(); ++i) s += (i ? " " : "") + std::to_string(out[i]);
    std::cout << s << "\n" << std::flush;
  } else {
    std::cout << "\n" << std::flush;
  }
  t.prompt_s = t_first - t0;
  t.gen_s = t1 - t_first;
  t.gen_tokens = std::max<int64_t>(0, int64_t(out.size()) - 1);
  std::cerr << "\n" << timing_lines(t, eng.stats(), o.d.mtp) << "      stop reason = " << reason << "\n";
  return 0;
}

RunFn setup_generate(CLI::App& app) {
  auto o = std::make_shared<GenerateOptions>();
  app.add_option("-m,--model", o->model_dir, "model directory (config.json + safetensors [+ tokenizer.json])")->required();
  app.add_option("-p,--prompt", o->prompt, "prompt text");
  app.add_option("-f,--file", o->prompt_file, "file holding the prompt text");
  app.add_option("--prompt-ids", o->prompt_ids, "prompt as token ids \"ID ID ...\" instead of text");
  app.add_flag("--print-ids", o->print_ids, "print only the generated token ids, on one line of stdout");
  app.add_option("-n,--n-predict", o->n_predict, "tokens to generate at most")->capture_default_str();
  add_sampling_options(app, o->d, "sampling seed (same seed, same text)");
  app.add_option("--stop", o->stop, "stop string (repeatable); the output ends before it");
  app.add_flag("--ignore-eos", o->ignore_eos, "do not stop at the end-of-sequence token");
  app.add_option("--tokenizer", o->tokenizer, "tokenizer.json (default: the model directory's)");
  add_engine_options(app, o->d, true);
  return [o] { return run_generate(*o); };
}

}  // namespace
}  // namespace dsv3::cli

DSV3_COMMAND(generate, "Generate text from a prompt (streamed), with optional MTP speculative decoding",
             dsv3::cli::setup_generate);
