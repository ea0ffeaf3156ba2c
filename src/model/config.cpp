#include "model/config.h"

#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "io/atomic_file.h"
#include "io/strict_json.h"

namespace dsv3 {

using json = nlohmann::json;

double yarn_mscale(double scale, double mscale) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

double ModelConfig::softmax_scale() const {
  double s = 1.0 / std::sqrt(double(qk_head_dim()));
  // transformers 5.17 yarn_apply_mscale (DeepseekV3Attention and DeepseekV2Attention alike): only
  // when YaRN is on and mscale_all_dim is present and non-zero.
  if (rope_scaling && rope_scaling->mscale_all_dim.value_or(0.0) != 0.0) {
    double m = yarn_mscale(rope_scaling->factor, *rope_scaling->mscale_all_dim);
    s *= m * m;
  }
  return s;
}

double ModelConfig::rope_attention_factor() const {
  if (!rope_scaling) return 1.0;
  const RopeScaling& r = *rope_scaling;
  if (r.attention_factor) return *r.attention_factor;
  // HF _compute_yarn_parameters: the ratio when both are present and non-zero, else get_mscale(factor).
  if (r.mscale.value_or(0.0) != 0.0 && r.mscale_all_dim.value_or(0.0) != 0.0)
    return yarn_mscale(r.factor, *r.mscale) / yarn_mscale(r.factor, *r.mscale_all_dim);
  return yarn_mscale(r.factor, 1.0);
}

namespace {

// Largest value accepted for any size field; keeps every product of sizes far from int64 overflow
// before the checked totals in validate_model_config run.
constexpr int64_t kMaxDim = int64_t(1) << 24;

std::string describe(const json& v) {
  std::string s = v.dump(-1, ' ', true, json::error_handler_t::replace);
  if (s.size() > 40) s = s.substr(0, 37) + "...";
  return cat(v.type_name(), " ", s);
}

// Reads fields of one JSON object; every failure names the source and the field (with its parent
// object for nested fields, e.g. 'rope_scaling.factor').
class Fields {
 public:
  Fields(const json& obj, const std::string& source, std::string prefix = "")
      : obj_(obj), source_(source), prefix_(std::move(prefix)) {}

  template <class... A>
  [[noreturn]] void fail(std::string_view key, A&&... a) const {
    input_error(source_, ": field '", prefix_, key, "': ", std::forward<A>(a)...);
  }

  const json* find(std::string_view key) const {
    auto it = obj_.find(key);
    return it == obj_.end() ? nullptr : &*it;
  }
  bool has(std::string_view key) const { return find(key) != nullptr; }
  // Present and not null.
  bool set(std::string_view key) const {
    const json* v = find(key);
    return v && !v->is_null();
  }

  int64_t to_int(std::string_view key, const json& v) const {
    if (v.is_number_unsigned()) {
      uint64_t u = v.get<uint64_t>();
      if (u > uint64_t(std::numeric_limits<int64_t>::max())) fail(key, "integer out of range: ", u);
      return int64_t(u);
    }
    if (v.is_number_integer()) return v.get<int64_t>();
    fail(key, "expected an integer, got ", describe(v));
  }
  double to_double(std::string_view key, const json& v) const {
    if (!v.is_number()) fail(key, "expected a number, got ", describe(v));
    double d = v.get<double>();
    if (!std::isfinite(d)) fail(key, "expected a finite number, got ", describe(v));
    return d;
  }

  int64_t req_int(std::string_view key) const {
    const json* v = find(key);
    if (!v) fail(key, "missing (an integer is required)");
    return to_int(key, *v);
  }
  int64_t opt_int(std::string_view key, int64_t dflt) const {
    const json* v = find(key);
    return v && !v->is_null() ? to_int(key, *v) : dflt;
  }
  std::optional<int64_t> nullable_int(std::string_view key, std::optional<int64_t> dflt) const {
    const json* v = find(key);
    if (!v) return dflt;
    if (v->is_null()) return std::nullopt;
    return to_int(key, *v);
  }
  double opt_double(std::string_view key, double dflt) const {
    const json* v = find(key);
    return v && !v->is_null() ? to_double(key, *v) : dflt;
  }
  std::optional<double> nullable_double(std::string_view key) const {
    const json* v = find(key);
    if (!v || v->is_null()) return std::nullopt;
    return to_double(key, *v);
  }
  bool opt_bool(std::string_view key, bool dflt) const {
    const json* v = find(key);
    if (!v || v->is_null()) return dflt;
    if (!v->is_boolean()) fail(key, "expected true or false, got ", describe(*v));
    return v->get<bool>();
  }
  std::string opt_string(std::string_view key, const std::string& dflt) const {
    const json* v = find(key);
    if (!v || v->is_null()) return dflt;
    if (!v->is_string()) fail(key, "expected a string, got ", describe(*v));
    return v->get<std::string>();
  }

 private:
  const json& obj_;
  const std::string& source_;
  std::string prefix_;
};

// The hub's "rope_scaling" object or transformers 5's "rope_parameters" (whose rope_theta is read
// by the caller). `type_key` is whichever of "rope_type"/"type" is present.
RopeScaling parse_yarn(const json& obj, const std::string& source, const std::string& where,
                       const std::string& type) {
  Fields f(obj, source, where + ".");
  RopeScaling r;
  r.type = type;
  if (!f.set("factor")) f.fail("factor", "missing (YaRN needs a scaling factor)");
  r.factor = f.opt_double("factor", 1.0);
  if (!f.set("original_max_position_embeddings"))
    f.fail("original_max_position_embeddings", "missing (YaRN needs the pre-extension context length)");
  r.original_max_position_embeddings = f.req_int("original_max_position_embeddings");
  // HF: `beta_fast or 32`, `beta_slow or 1`.
  r.beta_fast = f.opt_double("beta_fast", 32.0);
  r.beta_slow = f.opt_double("beta_slow", 1.0);
  if (r.beta_fast == 0.0) r.beta_fast = 32.0;
  if (r.beta_slow == 0.0) r.beta_slow = 1.0;
  r.mscale = f.nullable_double("mscale");
  r.mscale_all_dim = f.nullable_double("mscale_all_dim");
  r.attention_factor = f.nullable_double("attention_factor");
  r.truncate = f.opt_bool("truncate", true);
  return r;
}

std::string rope_type_of(const json& obj, const std::string& source, const std::string& where) {
  Fields f(obj, source, where + ".");
  std::string a = f.opt_string("rope_type", ""), b = f.opt_string("type", "");
  if (!a.empty() && !b.empty() && a != b)
    f.fail("rope_type", "'", a, "' disagrees with 'type' '", b, "'");
  std::string t = a.empty() ? b : a;
  if (t.empty()) f.fail("rope_type", "missing (expected \"yarn\" or \"default\")");
  if (t != "yarn" && t != "default")
    f.fail(a.empty() ? "type" : "rope_type", "unsupported RoPE type '", t,
           "' (DeepSeek models use \"yarn\" or \"default\")");
  return t;
}

void parse_rope(const Fields& f, const json& root, const std::string& source, ModelConfig& c) {
  const bool has_params = f.set("rope_parameters");
  const bool has_scaling = f.set("rope_scaling");
  if (has_params && has_scaling)
    f.fail("rope_parameters", "both 'rope_parameters' (transformers 5) and 'rope_scaling' (hub) are "
           "set; keep one spelling");
  if (has_params) {
    const json& p = root.at("rope_parameters");
    if (!p.is_object()) f.fail("rope_parameters", "expected an object, got ", describe(p));
    Fields pf(p, source, "rope_parameters.");
    c.rope_theta = pf.opt_double("rope_theta", f.opt_double("rope_theta", 10000.0));
    if (f.set("rope_theta") && pf.set("rope_theta") && f.opt_double("rope_theta", 0) != c.rope_theta)
      f.fail("rope_theta", "disagrees with rope_parameters.rope_theta");
    std::string t = rope_type_of(p, source, "rope_parameters");
    if (t == "yarn") c.rope_scaling = parse_yarn(p, source, "rope_parameters", t);
    return;
  }
  c.rope_theta = f.opt_double("rope_theta", 10000.0);
  if (has_scaling) {
    const json& s = root.at("rope_scaling");
    if (!s.is_object()) f.fail("rope_scaling", "expected an object or null, got ", describe(s));
    std::string t = rope_type_of(s, source, "rope_scaling");
    if (t == "yarn") c.rope_scaling = parse_yarn(s, source, "rope_scaling", t);
  }
}

void parse_quantization(const Fields& f, const json& root, const std::string& source, ModelConfig& c) {
  if (!f.set("quantization_config")) return;
  const json& q = root.at("quantization_config");
  if (!q.is_object()) f.fail("quantization_config", "expected an object, got ", describe(q));
  Fields qf(q, source, "quantization_config.");
  QuantizationConfig r;
  r.quant_method = qf.opt_string("quant_method", "");
  if (r.quant_method != "fp8")
    qf.fail("quant_method", "unsupported '", r.quant_method, "' (only \"fp8\" block quantization)");
  r.fmt = qf.opt_string("fmt", "e4m3");
  if (r.fmt != "e4m3") qf.fail("fmt", "unsupported '", r.fmt, "' (only \"e4m3\")");
  r.activation_scheme = qf.opt_string("activation_scheme", "dynamic");
  if (r.activation_scheme != "dynamic")
    qf.fail("activation_scheme", "unsupported '", r.activation_scheme, "' (only \"dynamic\")");
  if (!qf.set("weight_block_size")) qf.fail("weight_block_size", "missing (expected [128, 128])");
  const json& w = q.at("weight_block_size");
  if (!w.is_array() || w.size() != 2)
    qf.fail("weight_block_size", "expected a list of two integers, got ", describe(w));
  for (int i = 0; i < 2; ++i) {
    int64_t b = qf.to_int("weight_block_size", w[size_t(i)]);
    if (b < 1 || b > kMaxDim) qf.fail("weight_block_size", "block sizes must be in [1, ", kMaxDim, "], got ", b);
    r.weight_block_size[size_t(i)] = b;
  }
  c.quantization_config = r;
}

}  // namespace

// Defaults for fields a config may omit. Shape-determining fields (sizes, ranks, head dims, expert
// counts, first_k_dense_replace, q_lora_rank) are required, because transformers' silent defaults
// for them (e.g. hidden_size 7168) would build a different model than the file describes.
//
//                             deepseek_v3 (DeepseekV3Config)   deepseek_v2 (DeepseekV2Config)
//   num_key_value_heads       = num_attention_heads            = num_attention_heads
//   max_position_embeddings   4096                             2048
//   n_group / topk_group      8 / 4                            1 / 1 (HF: None; only used by
//                                                              group_limited_greedy, which needs both)
//   routed_scaling_factor     2.5                              1.0
//   norm_topk_prob            true                             false
//   scoring_func              sigmoid (HF hard-wires it)       softmax (HF hard-wires it)
//   topk_method               noaux_tc (HF hard-wires it)      greedy
//   moe_layer_freq            1                                1
//   num_nextn_predict_layers  0 (HF has no MTP)                0
//   rms_norm_eps 1e-6, rope_theta 10000, rope_interleave true, attention_bias false,
//   tie_word_embeddings false, hidden_act silu, initializer_range 0.02, aux_loss_alpha 0.001,
//   seq_aux true; bos/eos: V3 0/1, V2 1/2 (HF class defaults).
ModelConfig parse_model_config(std::string_view text, const std::string& source) {
  // Strict: UTF-8 checked, duplicate keys rejected (which one would HF keep?), nesting bounded.
  json root = parse_json_strict(text, source, 32);
  if (!root.is_object()) input_error(source, ": expected a JSON object at the top level, got ", root.type_name());
  Fields f(root, source);
  ModelConfig c;

  c.model_type = f.opt_string("model_type", "");
  if (c.model_type.empty()) f.fail("model_type", "missing (expected \"deepseek_v3\" or \"deepseek_v2\")");
  if (c.model_type != "deepseek_v3" && c.model_type != "deepseek_v2")
    f.fail("model_type", "unsupported '", c.model_type, "' (expected \"deepseek_v3\" or \"deepseek_v2\")");
  const bool v3 = c.is_v3();

  if (f.set("architectures")) {
    const json& a = root.at("architectures");
    if (!a.is_array()) f.fail("architectures", "expected a list of strings, got ", describe(a));
    for (const json& s : a) {
      if (!s.is_string()) f.fail("architectures", "expected a list of strings, got an element ", describe(s));
      c.architectures.push_back(s.get<std::string>());
    }
  }

  c.vocab_size = f.req_int("vocab_size");
  c.hidden_size = f.req_int("hidden_size");
  c.intermediate_size = f.req_int("intermediate_size");
  c.moe_intermediate_size = f.req_int("moe_intermediate_size");
  c.num_hidden_layers = f.req_int("num_hidden_layers");
  c.num_attention_heads = f.req_int("num_attention_heads");
  c.num_key_value_heads = f.opt_int("num_key_value_heads", c.num_attention_heads);
  c.max_position_embeddings = f.opt_int("max_position_embeddings", v3 ? 4096 : 2048);

  if (!f.has("q_lora_rank")) f.fail("q_lora_rank", "missing (an integer, or null for a plain q_proj)");
  c.q_lora_rank = f.nullable_int("q_lora_rank", std::nullopt);
  c.kv_lora_rank = f.req_int("kv_lora_rank");
  c.qk_nope_head_dim = f.req_int("qk_nope_head_dim");
  c.qk_rope_head_dim = f.req_int("qk_rope_head_dim");
  c.v_head_dim = f.req_int("v_head_dim");

  c.n_routed_experts = f.req_int("n_routed_experts");
  if (!f.has("n_shared_experts")) f.fail("n_shared_experts", "missing (an integer; 0 or null for none)");
  c.n_shared_experts = f.opt_int("n_shared_experts", 0);
  if (!f.set("num_experts_per_tok")) f.fail("num_experts_per_tok", "missing (an integer is required)");
  c.num_experts_per_tok = f.req_int("num_experts_per_tok");
  c.topk_method = f.opt_string("topk_method", v3 ? "noaux_tc" : "greedy");
  c.scoring_func = f.opt_string("scoring_func", v3 ? "sigmoid" : "softmax");
  if (c.topk_method == "group_limited_greedy") {
    if (!f.set("n_group")) f.fail("n_group", "missing (group_limited_greedy needs n_group)");
    if (!f.set("topk_group")) f.fail("topk_group", "missing (group_limited_greedy needs topk_group)");
  }
  c.n_group = f.opt_int("n_group", v3 ? 8 : 1);
  c.topk_group = f.opt_int("topk_group", v3 ? 4 : 1);
  c.routed_scaling_factor = f.opt_double("routed_scaling_factor", v3 ? 2.5 : 1.0);
  c.norm_topk_prob = f.opt_bool("norm_topk_prob", v3);
  if (!f.set("first_k_dense_replace")) f.fail("first_k_dense_replace", "missing (an integer is required)");
  c.first_k_dense_replace = f.req_int("first_k_dense_replace");
  c.moe_layer_freq = f.opt_int("moe_layer_freq", 1);
  c.aux_loss_alpha = f.opt_double("aux_loss_alpha", 0.001);
  c.seq_aux = f.opt_bool("seq_aux", true);
  c.num_nextn_predict_layers = f.opt_int("num_nextn_predict_layers", 0);

  c.tie_word_embeddings = f.opt_bool("tie_word_embeddings", false);
  c.rms_norm_eps = f.opt_double("rms_norm_eps", 1e-6);
  c.initializer_range = f.opt_double("initializer_range", 0.02);
  c.hidden_act = f.opt_string("hidden_act", "silu");
  c.rope_interleave = f.opt_bool("rope_interleave", true);
  c.attention_bias = f.opt_bool("attention_bias", false);
  // transformers 5's DeepseekV2Config has mlp_bias (biases on every MLP projection); no DeepSeek
  // checkpoint uses it and the tensor table has no such tensors.
  if (f.opt_bool("mlp_bias", false)) f.fail("mlp_bias", "true is not supported (DeepSeek MLPs have no biases)");
  parse_rope(f, root, source, c);

  c.bos_token_id = f.nullable_int("bos_token_id", v3 ? 0 : 1);
  if (const json* e = f.find("eos_token_id")) {
    if (e->is_array()) {
      for (const json& x : *e) c.eos_token_id.push_back(f.to_int("eos_token_id", x));
    } else if (!e->is_null()) {
      c.eos_token_id.push_back(f.to_int("eos_token_id", *e));
    }
  } else {
    c.eos_token_id.push_back(v3 ? 1 : 2);
  }
  if (f.set("torch_dtype") && f.set("dtype") && f.opt_string("torch_dtype", "") != f.opt_string("dtype", ""))
    f.fail("dtype", "disagrees with 'torch_dtype'");
  c.torch_dtype = f.opt_string("torch_dtype", f.opt_string("dtype", "bfloat16"));
  parse_quantization(f, root, source, c);

  // Derived values transformers 5 writes back; they must agree with the fields they derive from.
  // In 128 bits: the fields are range-checked only later (validate_model_config), and their int64
  // sum could overflow first.
  if (f.set("qk_head_dim") &&
      __int128(f.req_int("qk_head_dim")) != __int128(c.qk_nope_head_dim) + __int128(c.qk_rope_head_dim))
    f.fail("qk_head_dim", f.req_int("qk_head_dim"), " != qk_nope_head_dim + qk_rope_head_dim (",
           c.qk_nope_head_dim, " + ", c.qk_rope_head_dim, ")");
  if (f.set("head_dim") && f.req_int("head_dim") != c.qk_rope_head_dim)
    f.fail("head_dim", f.req_int("head_dim"), " != qk_rope_head_dim = ", c.qk_rope_head_dim,
           " (transformers sets head_dim to the RoPE dimension)");

  validate_model_config(c, source);
  return c;
}

void validate_model_config(const ModelConfig& c, const std::string& source) {
  auto fail = [&](std::string_view key, auto&&... a) {
    input_error(source, ": field '", key, "': ", a...);
  };
  auto in_range = [&](std::string_view key, int64_t v, int64_t lo, int64_t hi) {
    if (v < lo || v > hi) fail(key, "must be in [", lo, ", ", hi, "], got ", v);
  };
  if (c.model_type != "deepseek_v3" && c.model_type != "deepseek_v2")
    fail("model_type", "unsupported '", c.model_type, "' (expected \"deepseek_v3\" or \"deepseek_v2\")");
  in_range("vocab_size", c.vocab_size, 1, kMaxDim);
  in_range("hidden_size", c.hidden_size, 1, kMaxDim);
  in_range("intermediate_size", c.intermediate_size, 1, kMaxDim);
  in_range("moe_intermediate_size", c.moe_intermediate_size, 1, kMaxDim);
  in_range("num_hidden_layers", c.num_hidden_layers, 1, 4096);
  in_range("num_attention_heads", c.num_attention_heads, 1, 65536);
  if (c.num_key_value_heads != c.num_attention_heads)
    fail("num_key_value_heads", c.num_key_value_heads, " != num_attention_heads ", c.num_attention_heads,
         " (MLA expands every head from the shared latent; there is no grouped-query form)");
  in_range("max_position_embeddings", c.max_position_embeddings, 1, int64_t(1) << 32);
  if (c.q_lora_rank) in_range("q_lora_rank", *c.q_lora_rank, 1, kMaxDim);
  in_range("kv_lora_rank", c.kv_lora_rank, 1, kMaxDim);
  in_range("qk_nope_head_dim", c.qk_nope_head_dim, 1, kMaxDim);
  in_range("qk_rope_head_dim", c.qk_rope_head_dim, 2, kMaxDim);
  if (c.qk_rope_head_dim % 2 != 0)
    fail("qk_rope_head_dim", "must be even (RoPE rotates pairs), got ", c.qk_rope_head_dim);
  in_range("v_head_dim", c.v_head_dim, 1, kMaxDim);

  in_range("n_routed_experts", c.n_routed_experts, 1, 65536);
  in_range("n_shared_experts", c.n_shared_experts, 0, 65536);
  in_range("num_experts_per_tok", c.num_experts_per_tok, 1, c.n_routed_experts);
  in_range("n_group", c.n_group, 1, c.n_routed_experts);
  if (c.n_routed_experts % c.n_group != 0)
    fail("n_group", "n_routed_experts ", c.n_routed_experts, " is not divisible by n_group ", c.n_group);
  if (c.topk_group < 1 || c.topk_group > c.n_group)
    fail("topk_group", "must be in [1, n_group = ", c.n_group, "], got ", c.topk_group);
  if (c.topk_method != "greedy" && c.num_experts_per_tok > c.topk_group * c.experts_per_group())
    fail("num_experts_per_tok", c.num_experts_per_tok, " is more than the ", c.topk_group * c.experts_per_group(),
         " experts in topk_group = ", c.topk_group, " groups of ", c.experts_per_group());
  if (c.is_v3()) {
    if (c.scoring_func != "sigmoid")
      fail("scoring_func", "deepseek_v3 routes with \"sigmoid\", got '", c.scoring_func, "'");
    if (c.topk_method != "noaux_tc")
      fail("topk_method", "deepseek_v3 selects experts with \"noaux_tc\", got '", c.topk_method, "'");
    // The group score is the sum of the two best biased scores in each group.
    if (c.experts_per_group() < 2)
      fail("n_group", "noaux_tc needs at least 2 experts per group, got ", c.experts_per_group(),
           " (n_routed_experts ", c.n_routed_experts, " / n_group ", c.n_group, ")");
  } else {
    if (c.scoring_func != "softmax")
      fail("scoring_func", "deepseek_v2 routes with \"softmax\", got '", c.scoring_func, "'");
    if (c.topk_method != "greedy" && c.topk_method != "group_limited_greedy")
      fail("topk_method", "deepseek_v2 uses \"greedy\" or \"group_limited_greedy\", got '", c.topk_method, "'");
  }
  if (!(c.routed_scaling_factor > 0.0) || !std::isfinite(c.routed_scaling_factor))
    fail("routed_scaling_factor", "must be a positive number, got ", c.routed_scaling_factor);
  in_range("first_k_dense_replace", c.first_k_dense_replace, 0, c.num_hidden_layers);
  in_range("moe_layer_freq", c.moe_layer_freq, 1, 4096);
  in_range("num_nextn_predict_layers", c.num_nextn_predict_layers, 0, 64);
  if (!(c.aux_loss_alpha >= 0.0) || !std::isfinite(c.aux_loss_alpha))
    fail("aux_loss_alpha", "must be a number ≥ 0, got ", c.aux_loss_alpha);
  if (!(c.rms_norm_eps > 0.0) || !std::isfinite(c.rms_norm_eps))
    fail("rms_norm_eps", "must be a positive number, got ", c.rms_norm_eps);
  if (!(c.initializer_range >= 0.0) || !std::isfinite(c.initializer_range))
    fail("initializer_range", "must be a number ≥ 0, got ", c.initializer_range);
  if (c.hidden_act != "silu") fail("hidden_act", "only \"silu\" (SwiGLU) is supported, got '", c.hidden_act, "'");
  if (!(c.rope_theta > 0.0) || !std::isfinite(c.rope_theta))
    fail("rope_theta", "must be a positive number, got ", c.rope_theta);
  if (c.rope_scaling) {
    const RopeScaling& r = *c.rope_scaling;
    const char* p = "rope_scaling.";
    if (r.type != "yarn") fail(cat(p, "type"), "only \"yarn\" scaling is supported, got '", r.type, "'");
    if (!(r.factor > 0.0) || !std::isfinite(r.factor))
      fail(cat(p, "factor"), "must be a positive number, got ", r.factor);
    in_range(cat(p, "original_max_position_embeddings"), r.original_max_position_embeddings, 1, int64_t(1) << 32);
    if (!(r.beta_fast > 0.0) || !(r.beta_slow > 0.0) || !std::isfinite(r.beta_fast) || !std::isfinite(r.beta_slow))
      fail(cat(p, "beta_fast"), "beta_fast and beta_slow must be positive, got ", r.beta_fast, " and ", r.beta_slow);
    for (auto [name, v] : {std::pair{"mscale", r.mscale}, std::pair{"mscale_all_dim", r.mscale_all_dim},
                           std::pair{"attention_factor", r.attention_factor}})
      if (v && (!std::isfinite(*v) || *v < 0.0)) fail(cat(p, name), "must be a number ≥ 0, got ", *v);
    // A zero denominator in the mscale ratio (both mscales set, ln(factor)·0.1·m = -1) is impossible
    // for m ≥ 0, so rope_attention_factor() is always finite here.
  }
  if (c.bos_token_id) in_range("bos_token_id", *c.bos_token_id, 0, c.vocab_size - 1);
  for (int64_t e : c.eos_token_id) in_range("eos_token_id", e, 0, c.vocab_size - 1);
  if (c.torch_dtype != "bfloat16" && c.torch_dtype != "float32" && c.torch_dtype != "float16")
    fail("torch_dtype", "expected \"bfloat16\", \"float16\" or \"float32\", got '", c.torch_dtype, "'");
  if (c.quantization_config) {
    const QuantizationConfig& q = *c.quantization_config;
    if (q.quant_method != "fp8") fail("quantization_config.quant_method", "only \"fp8\", got '", q.quant_method, "'");
    if (q.fmt != "e4m3") fail("quantization_config.fmt", "only \"e4m3\", got '", q.fmt, "'");
    for (int64_t b : q.weight_block_size) in_range("quantization_config.weight_block_size", b, 1, kMaxDim);
  }

  // Totals with checked arithmetic: the parameter count must fit in 63 bits and the tensor list must
  // stay enumerable (a hostile config must not make `dsv3 info` allocate without bound).
  using u128 = unsigned __int128;
  const u128 L = u128(c.num_layers_total());
  const u128 experts_per_layer = u128(c.n_routed_experts) * 3 + 16;
  if (L * experts_per_layer > u128(20'000'000))
    input_error(source, ": fields 'num_hidden_layers'/'num_nextn_predict_layers'/'n_routed_experts': the model "
                "would have more than 20,000,000 tensors (", c.num_layers_total(), " layers × ",
                c.n_routed_experts, " experts)");
  const u128 H = u128(c.hidden_size);
  const u128 q = c.q_lora_rank ? u128(*c.q_lora_rank) * (H + u128(c.num_attention_heads) * u128(c.qk_head_dim()))
                               : H * u128(c.num_attention_heads) * u128(c.qk_head_dim());
  const u128 attn = q + H * u128(c.kv_lora_rank + c.qk_rope_head_dim) +
                    u128(c.kv_lora_rank) * u128(c.num_attention_heads) * u128(c.qk_nope_head_dim + c.v_head_dim) +
                    u128(c.num_attention_heads) * u128(c.v_head_dim) * H;
  const u128 mlp = 3 * H * (u128(c.intermediate_size) +
                            u128(c.moe_intermediate_size) * u128(c.n_routed_experts + c.n_shared_experts)) +
                   H * u128(c.n_routed_experts);
  const u128 total = L * (attn + mlp + 4 * H) + 4 * u128(c.vocab_size) * H;
  if (total > u128(std::numeric_limits<int64_t>::max()))
    input_error(source, ": the sizes give more than 2^63 parameters; check hidden_size, vocab_size and the "
                "expert counts");
}

ModelConfig load_model_config(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) input_error(path, ": cannot open the model configuration (expected a config.json file)");
  std::ostringstream s;
  s << in.rdbuf();
  if (in.bad()) input_error(path, ": read error");
  return parse_model_config(s.str(), path);
}

std::string serialize_model_config(const ModelConfig& c) {
  json j = json::object();
  j["architectures"] = json::array({c.is_v3() ? "DeepseekV3ForCausalLM" : "DeepseekV2ForCausalLM"});
  j["model_type"] = c.model_type;
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["moe_intermediate_size"] = c.moe_intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["q_lora_rank"] = c.q_lora_rank ? json(*c.q_lora_rank) : json(nullptr);
  j["kv_lora_rank"] = c.kv_lora_rank;
  j["qk_nope_head_dim"] = c.qk_nope_head_dim;
  j["qk_rope_head_dim"] = c.qk_rope_head_dim;
  j["v_head_dim"] = c.v_head_dim;
  j["n_routed_experts"] = c.n_routed_experts;
  j["n_shared_experts"] = c.n_shared_experts;
  j["num_experts_per_tok"] = c.num_experts_per_tok;
  j["n_group"] = c.n_group;
  j["topk_group"] = c.topk_group;
  j["routed_scaling_factor"] = c.routed_scaling_factor;
  j["norm_topk_prob"] = c.norm_topk_prob;
  j["scoring_func"] = c.scoring_func;
  j["topk_method"] = c.topk_method;
  j["first_k_dense_replace"] = c.first_k_dense_replace;
  j["moe_layer_freq"] = c.moe_layer_freq;
  j["aux_loss_alpha"] = c.aux_loss_alpha;
  j["seq_aux"] = c.seq_aux;
  j["num_nextn_predict_layers"] = c.num_nextn_predict_layers;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["initializer_range"] = c.initializer_range;
  j["hidden_act"] = c.hidden_act;
  j["rope_theta"] = c.rope_theta;
  if (c.rope_scaling) {
    const RopeScaling& r = *c.rope_scaling;
    json s = {{"type", r.type},
              {"factor", r.factor},
              {"original_max_position_embeddings", r.original_max_position_embeddings},
              {"beta_fast", r.beta_fast},
              {"beta_slow", r.beta_slow}};
    if (r.mscale) s["mscale"] = *r.mscale;
    if (r.mscale_all_dim) s["mscale_all_dim"] = *r.mscale_all_dim;
    if (r.attention_factor) s["attention_factor"] = *r.attention_factor;
    if (!r.truncate) s["truncate"] = false;
    j["rope_scaling"] = s;
  } else {
    j["rope_scaling"] = nullptr;
  }
  j["rope_interleave"] = c.rope_interleave;
  j["attention_bias"] = c.attention_bias;
  j["attention_dropout"] = 0.0;
  j["bos_token_id"] = c.bos_token_id ? json(*c.bos_token_id) : json(nullptr);
  if (c.eos_token_id.size() == 1)
    j["eos_token_id"] = c.eos_token_id[0];
  else if (c.eos_token_id.empty())
    j["eos_token_id"] = nullptr;
  else
    j["eos_token_id"] = c.eos_token_id;
  j["torch_dtype"] = c.torch_dtype;
  j["use_cache"] = true;
  if (c.quantization_config) {
    const QuantizationConfig& q = *c.quantization_config;
    j["quantization_config"] = {{"quant_method", q.quant_method},
                                {"fmt", q.fmt},
                                {"activation_scheme", q.activation_scheme},
                                {"weight_block_size", q.weight_block_size}};
  }
  return j.dump(2) + "\n";
}

void save_model_config(const ModelConfig& c, const std::string& path) {
  write_file_atomic(path, serialize_model_config(c));
}

}  // namespace dsv3
