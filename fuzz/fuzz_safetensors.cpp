// libFuzzer target: arbitrary bytes as a safetensors file. An InputError is the expected answer
// to bad bytes; any other exception, a crash or a sanitizer report is a bug. Files that parse are
// read tensor by tensor and written back, and the copy must parse to the same tensors.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "io/safetensors.h"

using namespace dsv3;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  SafetensorsFile f;
  try {
    f = SafetensorsFile::from_bytes(std::string(reinterpret_cast<const char*>(data), size), "fuzz");
  } catch (const InputError&) {
    return 0;
  }
  std::vector<NamedTensor> all;
  for (const TensorInfo& t : f.tensors()) {
    try {
      all.push_back({t.name, f.tensor(t.name)});
    } catch (const InputError&) {
      return 0;  // unsupported dtype or rank: a valid file we cannot hold
    }
    if (all.back().tensor.nbytes() != t.nbytes()) std::abort();
  }
  SafetensorsFile g = SafetensorsFile::from_bytes(serialize_safetensors(all, f.metadata()), "copy");
  if (g.size() != f.size() || g.metadata() != f.metadata()) std::abort();
  for (const TensorInfo& t : f.tensors()) {
    const TensorInfo& u = g.info(t.name);
    if (u.dtype_name != t.dtype_name || u.shape != t.shape || u.nbytes() != t.nbytes() ||
        (t.nbytes() && std::memcmp(f.bytes(t), g.bytes(u), t.nbytes()) != 0))
      std::abort();
  }
  return 0;
}
