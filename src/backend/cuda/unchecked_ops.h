// CUDA rope and embedding without the index range checks of CudaBackend::rope / embedding, each of
// which reads a flag back from the device (a host synchronisation). For callers that made the
// positions or ids on the host and checked them there: the decode engine's sync-free step. The same
// argument validation and kernels as the ops.
#pragma once
#include "backend/ops.h"

namespace dsv3 {

void cuda_rope_unchecked(const RopeArgs& a);
void cuda_embedding_unchecked(const EmbeddingArgs& a);

}  // namespace dsv3
