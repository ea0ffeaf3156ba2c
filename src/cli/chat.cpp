// dsv3 chat: interactive conversation with the DeepSeek-V3 chat template. One user turn per line
// of stdin ("/reset" starts over, "/exit" or end of input quits); the reply streams to stdout,
// timing lines go to stderr after each turn.
#include <chrono>
#include <iostream>

#include "cli/command.h"
#include "cli/decode_options.h"
#include "core/threads.h"
#include "infer/session.h"

namespace dsv3::cli {
namespace {

struct ChatOptions {
  std::string model_dir, tokenizer, system;
  int64_t n_predict = 512;
  DecodeOptions d;
  bool quiet = false;
};

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

int run_chat(const ChatOptions& o) {
  set_num_threads(o.d.threads);
  const SamplingParams sp = o.d.sampling();
  if (o.n_predict < 1) input_error("-n: ", o.n_predict, " tokens per reply; expected >= 1");
  EngineOptions eo = o.d.engine();
  Weights w = Weights::load(o.model_dir);
  o.d.apply_weights(w);
  const Tokenizer tok =
      *load_model_tokenizer(o.model_dir, o.tokenizer, w.config().vocab_size, true, "chat needs the chat template");
  eo.n_valid = int64_t(tok.last_real_id()) + 1;
  eo.token_text = [&tok](int32_t id) { return tok.decode_token(id); };
  Engine eng(w, eo, backend_named(o.d.device));
  note(eng.pool().describe());

  std::vector<ChatMessage> msgs;
  if (!o.system.empty()) msgs.push_back({"system", o.system});
  std::string line;
  uint64_t turn = 0;
  while (true) {
    if (!o.quiet) std::cerr << "> " << std::flush;
    if (!std::getline(std::cin, line) || line == "/exit") break;
    if (line == "/reset") {
      msgs.resize(o.system.empty() ? 0 : 1);
      continue;
    }
    if (line.empty()) continue;
    msgs.push_back({"user", line});
    Request r;
    r.prompt = tok.encode_chat(msgs, true);
    r.sampling = sp;
    r.sampling.seed = sp.seed + turn++;
    r.max_tokens = o.n_predict;
    if (tok.eos_id() >= 0) r.stop_ids.push_back(tok.eos_id());
    const EngineStats before = eng.stats();
    try {
      eng.add(r);
    } catch (const InputError& e) {
      // A turn the context or the cache cannot take ends that turn, not the conversation.
      note(cat(e.what(), " (the message was dropped; /reset starts over)"));
      msgs.pop_back();
      continue;
    }
    GenerationTimes t;
    t.prompt_tokens = int64_t(r.prompt.size());
    std::string reply;
    int64_t n = 0;
    const double t0 = now();
    double t_first = -1;
    while (eng.has_work())
      for (const SeqEvent& e : eng.step()) {
        if (!e.tokens.empty() && t_first < 0) t_first = now();
        n += int64_t(e.tokens.size());
        reply += e.text;
        std::cout << e.text << std::flush;
      }
    std::cout << "\n" << std::flush;
    const double t1 = now();
    if (t_first < 0) t_first = t1;
    t.prompt_s = t_first - t0;
    t.gen_s = t1 - t_first;
    t.gen_tokens = std::max<int64_t>(0, n - 1);
    if (!o.quiet) std::cerr << timing_lines(t, stats_since(eng.stats(), before), o.d.mtp);
    msgs.push_back({"assistant", reply});
  }
  return 0;
}

RunFn setup_chat(CLI::App& app) {
  auto o = std::make_shared<ChatOptions>();
  app.add_option("-m,--model", o->model_dir, "model directory (config.json + safetensors + tokenizer.json)")->required();
  app.add_option("--system", o->system, "system prompt");
  app.add_option("-n,--n-predict", o->n_predict, "tokens per reply at most")->capture_default_str();
  add_sampling_options(app, o->d, "sampling seed (turn i uses seed + i)");
  app.add_option("--tokenizer", o->tokenizer, "tokenizer.json (default: the model directory's)");
  add_engine_options(app, o->d, false);
  app.add_flag("-q,--quiet", o->quiet, "no prompt marker or timing lines on stderr");
  return [o] { return run_chat(*o); };
}

}  // namespace
}  // namespace dsv3::cli

DSV3_COMMAND(chat, "Interactive chat with the DeepSeek-V3 chat template", dsv3::cli::setup_chat);
