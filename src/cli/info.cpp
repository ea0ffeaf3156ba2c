// dsv3 info: a model configuration's summary — parameters (total and activated per token, main model
// and MTP apart, embedding and head listed apart), KV-cache bytes per token, training FLOPs per token.
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>

#include "cli/command.h"
#include "core/error.h"
#include "model/config.h"
#include "model/model_stats.h"
#include "model/presets.h"
#include "model/weights.h"
#include "train/precision_memory.h"

namespace dsv3::cli {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

struct InfoOptions {
  std::string model_dir;
  std::string preset = "v3";
  bool json_out = false;
  int64_t seq_len = 4096;
  bool train = false;
};

// A report is built once and printed either as text sections or as one JSON object.
struct Report {
  struct Section {
    std::string title;
    std::vector<std::pair<std::string, std::string>> rows;
  };
  std::vector<Section> sections;
  json j = json::object();

  Section& section(const std::string& title) {
    sections.push_back({title, {}});
    return sections.back();
  }
};

std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

// 671026419200 → "671,026,419,200 (671.03 B)"
std::string count_str(int64_t n) {
  std::string digits = std::to_string(n), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  if (n >= 1'000'000'000) return out + fmt(" (%.2f B)", double(n) / 1e9);
  if (n >= 1'000'000) return out + fmt(" (%.2f M)", double(n) / 1e6);
  return out;
}

void add_config_section(const ModelConfig& c, Report& r) {
  auto& s = r.section("configuration");
  int64_t dense = 0, moe = 0;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) (c.is_moe_layer(i) ? moe : dense)++;
  s.rows.push_back({"model_type", c.model_type});
  s.rows.push_back({"layers", cat(c.num_hidden_layers, " (", dense, " dense, ", moe, " MoE) + ",
                                  c.num_nextn_predict_layers, " MTP")});
  s.rows.push_back({"hidden / vocab", cat(c.hidden_size, " / ", c.vocab_size)});
  s.rows.push_back({"attention (MLA)",
                    cat(c.num_attention_heads, " heads, q_lora ",
                        c.q_lora_rank ? std::to_string(*c.q_lora_rank) : std::string("none (q_proj)"),
                        ", kv_lora ", c.kv_lora_rank, ", qk ", c.qk_nope_head_dim, "+", c.qk_rope_head_dim,
                        ", v ", c.v_head_dim)});
  s.rows.push_back({"MoE", cat(c.n_routed_experts, " routed (", c.num_experts_per_tok, " per token, ", c.n_group,
                               " groups, top ", c.topk_group, ") + ", c.n_shared_experts, " shared; ",
                               c.scoring_func, "/", c.topk_method, ", scale ", c.routed_scaling_factor)});
  s.rows.push_back({"FFN sizes", cat("dense ", c.intermediate_size, ", expert ", c.moe_intermediate_size)});
  s.rows.push_back({"RoPE", c.rope_scaling
                                ? cat("theta ", c.rope_theta, ", YaRN factor ", c.rope_scaling->factor,
                                      " from ", c.rope_scaling->original_max_position_embeddings)
                                : cat("theta ", c.rope_theta, ", no scaling")});
  s.rows.push_back({"softmax scale", fmt("%.9g", c.softmax_scale())});
  s.rows.push_back({"max positions", std::to_string(c.max_position_embeddings)});
  r.j["model_type"] = c.model_type;
  r.j["layers_dense"] = dense;
  r.j["layers_moe"] = moe;
  r.j["layers_mtp"] = c.num_nextn_predict_layers;
  r.j["softmax_scale"] = c.softmax_scale();
  r.j["config"] = json::parse(serialize_model_config(c));
}

void add_stats_sections(const ModelConfig& c, int64_t seq_len, Report& r) {
  const ParamCounts p = count_params(c);
  auto& s = r.section("parameters");
  s.rows.push_back({"main model, total", count_str(p.main_total())});
  s.rows.push_back({"main model, activated/token", count_str(p.main_active())});
  s.rows.push_back({"  embedding", count_str(p.embed)});
  s.rows.push_back({"  output head", p.head ? count_str(p.head) : std::string("tied to the embedding")});
  s.rows.push_back({"  layers + final norm, total", count_str(p.body_total)});
  s.rows.push_back({"  layers + final norm, activated", count_str(p.body_active)});
  s.rows.push_back({"MTP modules, total", count_str(p.mtp_total)});
  s.rows.push_back({"MTP modules, activated/token", count_str(p.mtp_active)});
  s.rows.push_back({"MTP embed/head copies", count_str(p.mtp_shared)});
  s.rows.push_back({"stored in a hub checkpoint", count_str(p.stored_total())});
  s.rows.push_back({"FP8 in a hub FP8 layout", count_str(p.fp8_params)});
  s.rows.push_back({"  + their block scales", count_str(p.fp8_scales)});
  s.rows.push_back({"tensors", std::to_string(p.tensors)});
  r.j["params_total"] = p.main_total();
  r.j["params_active"] = p.main_active();
  r.j["params_embedding"] = p.embed;
  r.j["params_head"] = p.head;
  r.j["params_body_total"] = p.body_total;
  r.j["params_body_active"] = p.body_active;
  r.j["params_mtp_total"] = p.mtp_total;
  r.j["params_mtp_active"] = p.mtp_active;
  r.j["params_mtp_shared_copies"] = p.mtp_shared;
  r.j["params_stored_total"] = p.stored_total();
  r.j["params_fp8"] = p.fp8_params;
  r.j["params_fp8_scales"] = p.fp8_scales;
  r.j["tensors"] = p.tensors;

  const KvBytesPerToken k = kv_bytes_per_token(c);
  auto& kv = r.section("KV cache per token");
  kv.rows.push_back({"latent (c_kv + k_pe), BF16", cat(k.latent_bf16, " B")});
  kv.rows.push_back({"latent, FP8 (no scales)", cat(k.latent_fp8, " B")});
  kv.rows.push_back({"per-head K and V, BF16", cat(k.naive_bf16, " B")});
  kv.rows.push_back({"MTP layers' latent, BF16", cat(k.mtp_latent_bf16, " B")});
  r.j["kv_bytes_per_token_latent_bf16"] = k.latent_bf16;
  r.j["kv_bytes_per_token_latent_fp8"] = k.latent_fp8;
  r.j["kv_bytes_per_token_naive_bf16"] = k.naive_bf16;
  r.j["kv_bytes_per_token_mtp_latent_bf16"] = k.mtp_latent_bf16;

  const FlopsPerToken f = flops_per_token(c, seq_len);
  auto& fl = r.section(cat("FLOPs per token at sequence length ", seq_len));
  fl.rows.push_back({"training, main model", fmt("%.4g GFLOP", f.train / 1e9)});
  fl.rows.push_back({"  of which attention", fmt("%.4g GFLOP", f.attention_train / 1e9)});
  fl.rows.push_back({"training, with MTP", fmt("%.4g GFLOP", f.train_with_mtp / 1e9)});
  fl.rows.push_back({"forward, main model", fmt("%.4g GFLOP", f.forward / 1e9)});
  fl.rows.push_back({"formula", "6·N_mm + 6·L·heads·(qk+v)·(T+1)/2, N_mm = activated matmul weights"});
  r.j["seq_len"] = seq_len;
  r.j["train_flops_per_token"] = f.train;
  r.j["train_flops_per_token_with_mtp"] = f.train_with_mtp;
  r.j["attention_train_flops_per_token"] = f.attention_train;
  r.j["forward_flops_per_token"] = f.forward;
  r.j["matmul_params_active"] = f.matmul_params_active;
}

// What is known about the checkpoint files in DIR beyond its config. Loading-time figures (resident
// size of a loaded checkpoint) belong here as more rows and keys under "checkpoint".
void add_checkpoint_sections(const std::string& dir, const ModelConfig&, Report& r) {
  int64_t files = 0, bytes = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (!e.is_regular_file(ec) || e.path().extension() != ".safetensors") continue;
    ++files;
    bytes += int64_t(e.file_size(ec));
  }
  auto& s = r.section("checkpoint");
  s.rows.push_back({"directory", dir});
  s.rows.push_back({"safetensors files", cat(files, files ? cat(", ", fmt("%.3f GB", double(bytes) / 1e9)) : "")});
  r.j["checkpoint"] = {{"directory", dir}, {"safetensors_files", files}, {"safetensors_bytes", bytes}};
  if (files == 0) return;
  // Bind every tensor (memory-mapped, checked against the table): what a loaded model keeps resident.
  const Weights w = Weights::load(dir);
  std::map<std::string, int64_t> by_dtype;
  for (const Param& p : w.params()) by_dtype[dtype_name(p.w.dtype())]++;
  std::string dtypes;
  for (const auto& [t, n] : by_dtype) dtypes += cat(dtypes.empty() ? "" : ", ", n, " ", t);
  s.rows.push_back({"resident when loaded", fmt("%.3f GB", double(w.resident_bytes()) / 1e9) + " (weights stay in their stored dtype)"});
  s.rows.push_back({"stored dtypes", dtypes});
  r.j["checkpoint"]["resident_bytes"] = w.resident_bytes();
  r.j["checkpoint"]["tensors_by_dtype"] = by_dtype;
}

void print_text(const std::string& source, const Report& r) {
  std::cout << "dsv3 info: " << source << "\n";
  for (const auto& s : r.sections) {
    std::cout << "\n" << s.title << "\n";
    size_t w = 0;
    for (const auto& [k, v] : s.rows) w = std::max(w, k.size());
    for (const auto& [k, v] : s.rows) std::cout << "  " << k << std::string(w - k.size() + 2, ' ') << v << "\n";
  }
}

int run_info(const InfoOptions& o) {
  if (o.seq_len < 1) input_error("--seq-len must be ≥ 1, got ", o.seq_len);
  ModelConfig c;
  std::string source;
  if (!o.model_dir.empty()) {
    const std::string path = (fs::path(o.model_dir) / "config.json").string();
    if (!fs::is_directory(o.model_dir)) input_error("-m ", o.model_dir, ": not a directory (expected a model directory with config.json)");
    c = load_model_config(path);
    source = path;
  } else {
    c = preset_config(o.preset);
    source = "preset " + o.preset;
  }
  Report r;
  r.j["source"] = source;
  add_config_section(c, r);
  add_stats_sections(c, o.seq_len, r);
  if (!o.model_dir.empty()) add_checkpoint_sections(o.model_dir, c, r);
  if (o.train) {
    auto& t = r.section("training activations per token (cached linear and SwiGLU inputs, docs/fp8.md)");
    json& jt = r.j["train_activation_bytes_per_token"];
    for (const PrecisionActivationBytes& b : activation_bytes_per_token(c)) {
      t.rows.push_back({"--precision " + b.precision,
                        cat(fmt("%.0f B", b.total()), " (linear inputs ", fmt("%.0f B", b.linear_inputs),
                            ", SwiGLU inputs ", fmt("%.0f B", b.swiglu_inputs), ")")});
      jt[b.precision] = {{"total", b.total()}, {"linear_inputs", b.linear_inputs}, {"swiglu_inputs", b.swiglu_inputs}};
    }
  }
  if (o.json_out)
    std::cout << r.j.dump(2) << "\n";
  else
    print_text(source, r);
  return 0;
}

}  // namespace
}  // namespace dsv3::cli

DSV3_COMMAND(info, "Summarise a model: parameters, KV cache and FLOPs per token", [](CLI::App& app) {
  auto o = std::make_shared<dsv3::cli::InfoOptions>();
  std::string names;
  for (const auto& n : dsv3::preset_names()) names += (names.empty() ? "" : ", ") + n;
  auto* m = app.add_option("-m,--model", o->model_dir, "Model directory containing config.json");
  auto* p = app.add_option("--preset", o->preset, "Built-in configuration when no -m is given: " + names);
  m->excludes(p);
  app.add_flag("--json", o->json_out, "Print one JSON object instead of text");
  app.add_option("--seq-len", o->seq_len, "Sequence length for the FLOPs per token");
  app.add_flag("--train", o->train, "Also report training activation memory per token for each --precision");
  return [o] { return dsv3::cli::run_info(*o); };
});
