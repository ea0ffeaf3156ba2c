// Expert parallelism inside the full model: a per-thread hook that runs every decoder layer's
// DeepSeekMoE (main layers and MTP blocks) in place of moe_forward/moe_backward. src/dist implements
// it with ExpertParallelMoe (the model cannot depend on src/dist). Per thread, so that simulated
// ranks on threads of one process each have their own; unset, the single-process layer runs.
#pragma once
#include "model/model.h"

namespace dsv3 {

class MoeLayerHook {
 public:
  virtual ~MoeLayerHook() = default;
  // As moe_forward: fills a (at least x, logits, scores, ids, weights, counts, out).
  virtual void forward(Backend& be, const ModelDims& d, const MoeParams& p, const Tensor& x, MoeActs& a) = 0;
  // As moe_backward, for the acts the same hook filled.
  virtual void backward(Backend& be, const ModelDims& d, const MoeParams& p, const MoeParams& g, const MoeActs& a,
                        const Tensor& dout, const Tensor& router_dlogits, const Tensor& dx, bool accumulate_dx) = 0;
};

// moe_forward's first two stages, for a hook's layer to share: a.x = x, the gate GEMM and the router
// (a.logits, scores, ids, weights); then the picks grouped by expert (a.pick, token, counts).
void moe_gate_and_route(Backend& be, const ModelDims& d, const MoeParams& p, const Tensor& x, MoeActs& a);
void moe_group_picks(Backend& be, const ModelDims& d, MoeActs& a);

// Installs h for this thread (nullptr: none); returns the previous hook.
MoeLayerHook* set_moe_layer_hook(MoeLayerHook* h);

}  // namespace dsv3
