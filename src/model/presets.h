// Built-in model configurations, selected with --preset NAME.
//   v3          the hub DeepSeek-V3 config.json (671B main model + one MTP layer)
//   v2-lite     the hub DeepSeek-V2-Lite config.json (15.7B, softmax routing, no q compression)
//   bench-0.7b  a mid-size V3-shaped model for CPU/GPU speed measurements
//   tiny        the CPU default: every V3 feature present at toy size
#pragma once
#include <string>
#include <vector>

#include "model/config.h"

namespace dsv3 {

// The preset's config (validated). An unknown name is an InputError listing the known ones.
ModelConfig preset_config(const std::string& name);
std::vector<std::string> preset_names();

}  // namespace dsv3
