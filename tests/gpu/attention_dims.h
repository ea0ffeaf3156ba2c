// Attention dimensions for the GPU cache-attention tests (the MLA fields of model/model.h's ModelDims).
#pragma once
#include <cmath>
#include <cstdint>

#include "model/model.h"

namespace dsv3::test {

inline ModelDims dims(int64_t nh, int64_t nope, int64_t rope, int64_t vd, int64_t kv_lora) {
  ModelDims d;
  d.nh = nh;
  d.nope = nope;
  d.rope = rope;
  d.qk = nope + rope;
  d.vd = vd;
  d.kv_lora = kv_lora;
  d.softmax_scale = float(1.0 / std::sqrt(double(d.qk)));
  return d;
}

}  // namespace dsv3::test
