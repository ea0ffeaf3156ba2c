#include "dist/train_parallel.h"

#include <numeric>
#include <unordered_map>

#include "dist/data_parallel.h"
#include "model/moe_hook.h"

namespace dsv3 {

namespace {

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ull;
  return h;
}

// Runs the decoder layers' MoE through ExpertParallelMoe; the extra per-layer state lives here from a
// forward to its backward, keyed by the layer's parameters: the model's MoeActs are rebuilt every
// forward, so their addresses could change between steps and leave a whole step's activations
// behind under each old one.
class EpLayerHook final : public MoeLayerHook {
 public:
  EpLayerHook(Communicator& ep, const ModelDims& d, EpOptions o) : moe(ep, d, o) {}
  void forward(Backend& be, const ModelDims&, const MoeParams& p, const Tensor& x, MoeActs& a) override {
    EpMoeActs& e = acts[&p];
    moe.forward(be, p, x, e);
    a = e.local;
  }
  void backward(Backend& be, const ModelDims&, const MoeParams& p, const MoeParams& g, const MoeActs& a,
                const Tensor& dout, const Tensor& router_dlogits, const Tensor& dx, bool accumulate_dx) override {
    (void)a;  // the layer's own state is in acts
    auto it = acts.find(&p);
    if (it == acts.end()) internal_error("expert-parallel backward of a layer without its forward");
    moe.backward(be, p, g, it->second, dout, router_dlogits, dx, accumulate_dx);
    acts.erase(it);  // its activations are not needed past the backward
  }
  ExpertParallelMoe moe;
  std::unordered_map<const MoeParams*, EpMoeActs> acts;
};

class DistTrainParallel final : public TrainParallel {
 public:
  DistTrainParallel(Communicator& world, const TrainParallelOptions& o, const ModelConfig& cfg) : c_(world), o_(o) {
    // Before any split: ranks started with different options would otherwise pair mismatched collectives.
    check_same("parallel options (--ep, --ep-*, --zero1)",
               cat(o.ep, " ", o.ep_options.node_limit, " ", o.ep_options.two_hop, " ", o.ep_options.fp8_dispatch, " ",
                   o.zero1, " ", o.bucket_bytes));
    const int P = world.size();
    if (o.ep < 1 || P % o.ep != 0)
      input_error("--ep ", o.ep, ": the expert-parallel group size must divide the number of ranks ", P);
    if (o.ep > 1) {
      if (cfg.n_routed_experts <= 0) input_error("--ep ", o.ep, ": the model has no routed experts");
      if (cfg.n_routed_experts % o.ep != 0)
        input_error("--ep ", o.ep, ": n_routed_experts ", cfg.n_routed_experts, " is not a multiple of it");
      ep_comm_ = world.split(world.rank() / o.ep, world.rank());
      hook_ = std::make_unique<EpLayerHook>(*ep_comm_, model_dims(cfg), o.ep_options);
    } else if (o.ep_options.node_limit > 0 || o.ep_options.two_hop || o.ep_options.fp8_dispatch) {
      input_error("--ep-node-limit, --ep-two-hop and --ep-fp8-dispatch need --ep > 1");
    }
  }

  int rank() const override { return c_.rank(); }
  int size() const override { return c_.size(); }

  void check_same(const std::string& what, const std::string& value) override {
    const uint64_t mine[2] = {fnv1a(value), uint64_t(value.size())};
    std::vector<uint64_t> all(2 * size_t(size()));
    c_.all_gather(mine, all.data(), sizeof mine);
    std::vector<int> differ;
    for (int r = 1; r < size(); ++r)
      if (all[2 * size_t(r)] != all[0] || all[2 * size_t(r) + 1] != all[1]) differ.push_back(r);
    if (differ.empty()) return;
    std::string list;
    for (int r : differ) list += cat(list.empty() ? "" : ", ", r);
    input_error("the ranks disagree on the ", what, ": rank(s) ", list, " differ from rank 0 (every rank of ",
                size(), " must be started with the same command line, configuration and files)");
  }

  std::string broadcast(const std::string& s, int root) override {
    int64_t n = int64_t(s.size());
    c_.broadcast(&n, sizeof n, root);
    std::string out = c_.rank() == root ? s : std::string(size_t(n), '\0');
    if (n > 0) c_.broadcast(out.data(), n, root);
    return out;
  }

  void reduce(const std::vector<ParamSlot>& slots, std::vector<std::vector<int64_t>>& loads,
              double& loss_sum) override {
    std::vector<const void*> ptrs;
    for (const ParamSlot& s : slots) ptrs.push_back(s.grad.raw());
    if (!grads_ || ptrs != grad_ptrs_) {  // first call, or a new Trainer over the same TrainParallel
      std::vector<Tensor> g;
      for (const ParamSlot& s : slots) g.push_back(s.grad);
      grads_ = std::make_unique<GradientAllReduce>(c_, std::move(g), o_.bucket_bytes);
      grad_ptrs_ = std::move(ptrs);
    }
    grads_->run(1.0f);
    all_reduce_loads(c_, loads);
    std::vector<double> all(static_cast<size_t>(size()));
    c_.all_gather(&loss_sum, all.data(), sizeof(double));
    loss_sum = all[0];
    for (size_t r = 1; r < all.size(); ++r) loss_sum += all[r];
  }

  MoeLayerHook* moe_hook() override { return hook_.get(); }

  bool shards_optimizer() const override { return o_.zero1; }
  void init_optimizer(const std::vector<ParamSlot>& slots, const OptimizerConfig& cfg, Backend* be,
                      const AdamW* loaded) override {
    zero_ = std::make_unique<ZeroAdamW>(c_, slots, cfg, be, loaded);
  }
  StepReport optimizer_step(double lr, double loss, double grad_scale) override {
    return zero_->step(lr, loss, grad_scale);
  }
  std::unique_ptr<AdamW> gather_optimizer(int root) override { return zero_->gather(root); }
  int64_t skipped_total() const override { return zero_ ? zero_->skipped_total() : 0; }

  TrainParallelInfo info() const {
    return {zero_.get(), hook_ ? &hook_->moe.stats() : nullptr, ep_comm_.get()};
  }

 private:
  Communicator& c_;
  TrainParallelOptions o_;
  std::unique_ptr<Communicator> ep_comm_;
  std::unique_ptr<EpLayerHook> hook_;
  std::unique_ptr<GradientAllReduce> grads_;
  std::vector<const void*> grad_ptrs_;
  std::unique_ptr<ZeroAdamW> zero_;
};

}  // namespace

std::unique_ptr<TrainParallel> make_train_parallel(Communicator& world, const TrainParallelOptions& o,
                                                   const ModelConfig& model) {
  return std::make_unique<DistTrainParallel>(world, o, model);
}

TrainParallelInfo train_parallel_info(const TrainParallel& p) {
  const auto* d = dynamic_cast<const DistTrainParallel*>(&p);
  return d ? d->info() : TrainParallelInfo{};
}

}  // namespace dsv3
