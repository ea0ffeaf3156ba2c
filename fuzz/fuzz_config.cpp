// libFuzzer target: arbitrary bytes as config.json. An InputError is the expected answer to bad
// bytes; any other exception, a crash or a sanitizer report is a bug. A config that parses must
// survive a serialize → parse round trip unchanged, and (when small enough to enumerate quickly)
// its tensor table, parameter counts, KV bytes and FLOPs must be consistent.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "model/config.h"
#include "model/model_stats.h"
#include "model/tensor_table.h"

using namespace dsv3;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  ModelConfig c;
  try {
    c = parse_model_config(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
  } catch (const InputError&) {
    return 0;
  }
  const std::string text = serialize_model_config(c);
  if (serialize_model_config(parse_model_config(text, "copy")) != text) std::abort();
  if (!std::isfinite(c.softmax_scale()) || !(c.softmax_scale() > 0)) std::abort();
  if (!std::isfinite(c.rope_attention_factor())) std::abort();
  if (c.num_layers_total() * (c.n_routed_experts * 3 + 16) > 1000) return 0;
  const TensorTable t = build_tensor_table(c);
  const ParamCounts p = count_params(c);
  int64_t sum = 0;
  for (const TensorSpec& s : t.tensors) {
    if (s.numel() <= 0) std::abort();
    sum += s.numel();
  }
  if (sum != p.stored_total() || int64_t(t.size()) != p.tensors) std::abort();
  if (p.main_active() > p.main_total() || p.mtp_active > p.mtp_total) std::abort();
  if (kv_bytes_per_token(c).latent_bf16 <= 0) std::abort();
  const FlopsPerToken f = flops_per_token(c, 1 + int64_t(size));
  if (!std::isfinite(f.train) || f.train <= 0) std::abort();
  return 0;
}
