// libFuzzer target: arbitrary bytes as model.safetensors.index.json. InputError is the expected
// answer to bad bytes; anything else is a bug. An index that parses must survive a round trip.
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "io/checkpoint_index.h"

using namespace dsv3;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  CheckpointIndex idx;
  try {
    idx = parse_checkpoint_index(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
  } catch (const InputError&) {
    return 0;
  }
  for (const std::string& s : idx.shard_files())
    if (!shard_name_problem(s).empty()) std::abort();
  CheckpointIndex again = parse_checkpoint_index(checkpoint_index_json(idx), "copy");
  if (again.weight_map != idx.weight_map || again.total_size != idx.total_size) std::abort();
  return 0;
}
