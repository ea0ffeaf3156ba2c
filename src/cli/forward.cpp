// dsv3 forward: one forward pass over given token ids; writes the logits for external checks.
//
// Contract (scripts call exactly this):
//   dsv3 forward -m DIR --tokens "ID ID ..." --output FILE.safetensors
// writes F32 `logits` [T, vocab] and, for a model with MTP layers, `mtp_logits_k` [T−k, vocab]
// for k = 1..num_nextn_predict_layers with k < T (row i predicts token i+k+1).
#include <iostream>

#include "backend/ops.h"
#include "cli/command.h"
#include "core/threads.h"
#include "dist/routing_trace.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "model/weights.h"

namespace dsv3::cli {
namespace {

struct ForwardCliOptions {
  std::string model_dir;
  std::string tokens;
  std::string output;
  int threads = 0;
  bool no_mtp = false;
  std::string dump_routing;
};

int run_forward(const ForwardCliOptions& o) {
  set_num_threads(o.threads);
  Weights w = Weights::load(o.model_dir);
  const std::vector<int32_t> ids = parse_token_ids(o.tokens, w.config().vocab_size);
  Model m(w, cpu_backend());
  ForwardOptions fo;
  fo.mtp = !o.no_mtp;
  fo.keep_activations = !o.dump_routing.empty();
  ForwardOutput out = m.forward(ids, 1, int64_t(ids.size()), fo);
  if (!o.dump_routing.empty()) {
    RoutingTrace trace;
    collect_routing(m, trace);
    save_routing_trace_json(o.dump_routing, trace);
    note(cat("forward: routing of ", trace.ids.size(), " MoE layer(s) written to ", o.dump_routing));
  }
  std::vector<NamedTensor> tensors{{"logits", out.logits}};
  for (size_t k = 0; k < out.mtp_logits.size(); ++k)
    tensors.push_back({cat("mtp_logits_", k + 1), out.mtp_logits[k]});
  write_safetensors(o.output, tensors, {{"format", "pt"}, {"model", o.model_dir}});
  note(cat("forward: ", ids.size(), " tokens, ", tensors.size(), " tensor(s) written to ", o.output));
  return 0;
}

}  // namespace
}  // namespace dsv3::cli

DSV3_COMMAND(forward, "Run one forward pass over token ids and write the logits (safetensors)", [](CLI::App& app) {
  auto o = std::make_shared<dsv3::cli::ForwardCliOptions>();
  app.add_option("-m,--model", o->model_dir, "HF checkpoint directory (config.json + safetensors)")->required();
  app.add_option("--tokens", o->tokens, "token ids, whitespace separated: \"ID ID ...\"")->required();
  app.add_option("--output", o->output, "output .safetensors: F32 logits [T, vocab], mtp_logits_k [T-k, vocab]")
      ->required();
  app.add_option("--threads", o->threads, "CPU threads (0: all cores)");
  app.add_flag("--no-mtp", o->no_mtp, "skip the MTP modules (write only logits)");
  app.add_option("--dump-routing", o->dump_routing,
                 "also write the MoE routing (per layer, per token expert ids; JSON dsv3-routing-v1 for "
                 "dsv3 net sim --trace) to FILE (default: none)");
  return [o] { return dsv3::cli::run_forward(*o); };
});
