#include "train/optimizer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "backend/ops.h"

namespace dsv3 {

namespace {

// Sum of squares in double over fixed blocks, added in block order: the same bits for any
// thread count.
double sum_squares_plain(const Tensor& g) {
  const float* x = g.data<float>();
  const int64_t n = g.numel();
  constexpr int64_t kBlock = 1 << 16;
  const int64_t nb = (n + kBlock - 1) / kBlock;
  std::vector<double> part(size_t(std::max<int64_t>(nb, 1)), 0.0);
  // Threads only for tensors big enough to repay a parallel region (a loaded 2-core machine makes
  // each region cost milliseconds, and a model has hundreds of small tensors).
#pragma omp parallel for schedule(static) if (nb > 1)
  for (int64_t b = 0; b < nb; ++b) {
    double s = 0.0;
    const int64_t e = std::min(n, (b + 1) * kBlock);
    for (int64_t i = b * kBlock; i < e; ++i) s += double(x[i]) * double(x[i]);
    part[size_t(b)] = s;
  }
  double total = 0.0;
  for (double s : part) total += s;
  return total;
}

float load_moment(const Tensor& t, int64_t i) {
  return t.dtype() == DType::F32 ? t.data<float>()[i] : bf16_to_float(t.data<bf16>()[i].bits);
}
void store_moment(Tensor& t, int64_t i, float v) {
  if (t.dtype() == DType::F32)
    t.data<float>()[i] = v;
  else
    t.data<bf16>()[i].bits = float_to_bf16(v);
}

}  // namespace

void OptimizerConfig::validate() const {
  auto in01 = [](double x) { return x >= 0.0 && x < 1.0; };
  if (!in01(beta1)) input_error("optimizer: beta1 ", beta1, " must be in [0, 1)");
  if (!in01(beta2)) input_error("optimizer: beta2 ", beta2, " must be in [0, 1)");
  if (!(eps > 0.0)) input_error("optimizer: eps ", eps, " must be > 0");
  if (!(weight_decay >= 0.0)) input_error("optimizer: weight_decay ", weight_decay, " must be ≥ 0");
  if (std::isnan(clip_norm)) input_error("optimizer: clip_norm is NaN");
  if (moment_dtype != DType::F32 && moment_dtype != DType::BF16)
    input_error("optimizer: moment dtype ", dtype_name(moment_dtype), " must be F32 or BF16");
  if (max_consecutive_skips < 1)
    input_error("optimizer: max_consecutive_skips ", max_consecutive_skips, " must be ≥ 1");
}

AdamW::AdamW(std::vector<ParamSlot> params, OptimizerConfig cfg, Backend* backend)
    : params_(std::move(params)), copies_(params_.size()), cfg_(cfg), backend_(backend) {
  cfg_.validate();
  for (size_t i = 0; i < params_.size(); ++i) {
    const ParamSlot& p = params_[i];
    DSV3_CHECK(p.param.dtype() == DType::F32 && p.grad.dtype() == DType::F32,
               "parameter ", p.name, ": master weights and gradients must be F32");
    DSV3_CHECK(p.param.shape() == p.grad.shape(), "parameter ", p.name, ": grad shape ",
               p.grad.shape().str(), " differs from ", p.param.shape().str());
    for (size_t j = 0; j < i; ++j)
      DSV3_CHECK(params_[j].name != p.name, "parameter ", p.name, " listed twice");
    if (backend_) {
      for (auto* moments : {&m_, &v_}) {
        moments->push_back(backend_->alloc(cfg_.moment_dtype, p.param.shape()));
        backend_->fill(FillArgs{moments->back(), 0.0f});
      }
    } else {
      m_.push_back(Tensor::zeros(cfg_.moment_dtype, p.param.shape()));
      v_.push_back(Tensor::zeros(cfg_.moment_dtype, p.param.shape()));
    }
  }
}

void AdamW::set_copies(const std::function<Tensor(const std::string&)>& copy_of) {
  copies_.assign(params_.size(), Tensor());
  for (size_t i = 0; i < params_.size(); ++i) {
    const ParamSlot& p = params_[i];
    Tensor c = copy_of(p.name);
    // dtype and aliasing are the adamw op's to check (validate); the shape is this slot's.
    DSV3_CHECK(!c.defined() || (c.shape() == p.param.shape() && c.device() == p.param.device()), "parameter ",
               p.name, ": its copy must have shape ", p.param.shape().str(), " on the same device");
    copies_[i] = c;
  }
}

double AdamW::grad_norm(double grad_scale) const {
  double total = 0.0;
  if (backend_) {
    Tensor acc = backend_->alloc(DType::F32, Shape{1});
    std::vector<Tensor> grads;
    for (const ParamSlot& p : params_) grads.push_back(p.grad);
    backend_->sum_squares_many(grads, acc, false);
    total = double(backend_->to_host(acc).data<float>()[0]);
  } else {
    for (const ParamSlot& p : params_) total += sum_squares_plain(p.grad);
  }
  return std::abs(grad_scale) * std::sqrt(total);
}

void AdamW::zero_grads() {
  if (backend_) {
    std::vector<FillArgs> f;
    for (ParamSlot& p : params_) f.push_back(FillArgs{p.grad, 0.0f});
    backend_->fill_many(f);
    return;
  }
  for (ParamSlot& p : params_) p.grad.fill(0.0f);
}

void AdamW::update_plain(ParamSlot& p, Tensor& m, Tensor& v, double lr, double wd,
                         double gscale, int64_t t) const {
  // torch.optim.AdamW's single-tensor path, in FP32 with the scalar factors formed in double.
  const float decay = float(1.0 - lr * wd);
  const float b1 = float(cfg_.beta1), b2 = float(cfg_.beta2);
  const float one_b1 = float(1.0 - cfg_.beta1), one_b2 = float(1.0 - cfg_.beta2);
  const float step_size = float(lr / (1.0 - std::pow(cfg_.beta1, double(t))));
  const float bc2_sqrt = float(std::sqrt(1.0 - std::pow(cfg_.beta2, double(t))));
  const float eps = float(cfg_.eps), gs = float(gscale);
  float* w = p.param.data<float>();
  const float* g = p.grad.data<float>();
  const int64_t n = p.param.numel();
#pragma omp parallel for schedule(static) if (n >= (int64_t(1) << 16))
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * gs;
    const float mi = b1 * load_moment(m, i) + one_b1 * gi;
    const float vi = b2 * load_moment(v, i) + one_b2 * gi * gi;
    store_moment(m, i, mi);
    store_moment(v, i, vi);
    // The update uses the moments before their storage rounding (BF16 moments), as the backends'
    // kernels do: only what is kept for the next step is rounded.
    const float denom = std::sqrt(vi) / bc2_sqrt + eps;
    w[i] = w[i] * decay - step_size * (mi / denom);
  }
}

StepReport AdamW::step(double lr, double loss, double grad_scale) {
  StepReport r;
  r.grad_norm = grad_norm(grad_scale);
  if (!std::isfinite(loss) || !std::isfinite(r.grad_norm)) {
    ++skipped_total_;
    ++consecutive_;
    r.skipped_total = skipped_total_;
    r.consecutive_skips = consecutive_;
    if (consecutive_ >= cfg_.max_consecutive_skips)
      throw TrainingStopped(cat(
          "stopping: ", consecutive_, " optimizer steps in a row had a non-finite ",
          std::isfinite(loss) ? "gradient norm" : "loss", " (loss ", loss, ", gradient norm ",
          r.grad_norm, "; ", skipped_total_, " skipped in total). Lower the learning rate, "
          "check the data, or resume from an earlier checkpoint."));
    return r;
  }
  consecutive_ = 0;
  if (cfg_.clip_norm > 0.0 && r.grad_norm > cfg_.clip_norm)
    r.clip_scale = cfg_.clip_norm / (r.grad_norm + 1e-6);
  const double gscale = grad_scale * r.clip_scale;
  const int64_t t = updates_ + 1;
  // On the CPU most tensors are too small for the backend to split (cpu::kParallelMin), so whole
  // tensors go to threads instead (the backend's own region then runs in one thread). The update is
  // elementwise: which thread does a tensor never changes a bit.
  const bool cpu_tensors = backend_ && backend_->device() == Device::CPU;
  auto args = [&](size_t i) {
    ParamSlot& p = params_[i];
    AdamWArgs a;
    a.param = p.param;
    a.grad = p.grad;
    a.m = m_[i];
    a.v = v_[i];
    a.lr = float(lr);
    a.beta1 = float(cfg_.beta1);
    a.beta2 = float(cfg_.beta2);
    a.eps = float(cfg_.eps);
    a.weight_decay = float(p.decay ? cfg_.weight_decay : 0.0);
    a.grad_scale = float(gscale);
    a.step = t;
    a.param_copy = copies_[i];
    return a;
  };
  if (backend_ && !cpu_tensors) {  // one call for all tensors (one launch on a GPU)
    std::vector<AdamWArgs> all;
    for (size_t i = 0; i < params_.size(); ++i) all.push_back(args(i));
    backend_->adamw_many(all);
  } else {
#pragma omp parallel for schedule(dynamic, 1) if (cpu_tensors && params_.size() > 1)
    for (size_t i = 0; i < params_.size(); ++i) {
      if (backend_) {
        backend_->adamw(args(i));
      } else {
        update_plain(params_[i], m_[i], v_[i], lr, params_[i].decay ? cfg_.weight_decay : 0.0, gscale, t);
        if (present(copies_[i])) cpu_backend().copy(CopyArgs{params_[i].param, copies_[i]});
      }
    }
  }
  updates_ = t;
  r.applied = true;
  r.skipped_total = skipped_total_;
  return r;
}

std::vector<AdamW::NamedState> AdamW::state_tensors() const {
  std::vector<NamedState> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    out.push_back({params_[i].name + ".exp_avg", m_[i]});
    out.push_back({params_[i].name + ".exp_avg_sq", v_[i]});
  }
  return out;
}

nlohmann::json AdamW::state_json() const {
  return {{"updates", updates_},
          {"skipped_total", skipped_total_},
          {"consecutive_skips", consecutive_},
          {"beta1", cfg_.beta1},
          {"beta2", cfg_.beta2},
          {"eps", cfg_.eps},
          {"weight_decay", cfg_.weight_decay},
          {"clip_norm", cfg_.clip_norm},
          {"moment_dtype", dtype_name(cfg_.moment_dtype)},
          {"num_params", params_.size()}};
}

void AdamW::load_state(const std::function<Tensor(const std::string&)>& lookup,
                       const nlohmann::json& state, const std::string& where) {
  try {
    updates_ = state.at("updates").get<int64_t>();
    skipped_total_ = state.at("skipped_total").get<int64_t>();
    consecutive_ = state.at("consecutive_skips").get<int>();
  } catch (const nlohmann::json::exception& e) {
    input_error(where, ": optimizer state: ", e.what());
  }
  if (updates_ < 0 || skipped_total_ < 0 || consecutive_ < 0)
    input_error(where, ": optimizer state has negative counters");
  std::vector<NamedState> mine = state_tensors();
  for (NamedState& s : mine) {
    Tensor saved = lookup(s.name);
    if (!saved.defined() || (saved.numel() == 0 && s.tensor.numel() != 0))
      input_error(where, ": optimizer state tensor '", s.name, "' is missing");
    if (!(saved.shape() == s.tensor.shape()))
      input_error(where, ": optimizer state tensor '", s.name, "' has shape ", saved.shape().str(),
                  ", expected ", s.tensor.shape().str());
    if (saved.dtype() != DType::F32 && saved.dtype() != DType::BF16)
      input_error(where, ": optimizer state tensor '", s.name, "' has dtype ",
                  dtype_name(saved.dtype()), ", expected F32 or BF16");
    Tensor host = saved.dtype() == s.tensor.dtype() ? saved : saved.to(s.tensor.dtype());
    if (backend_) {
      Tensor dev = backend_->to_device(host);
      backend_->copy(CopyArgs{dev, s.tensor});
    } else {
      std::memcpy(s.tensor.raw(), host.raw(), host.nbytes());
    }
  }
}

GradAccumulator::GradAccumulator(int micro_steps) : n_(micro_steps) {
  if (micro_steps < 1) input_error("gradient accumulation steps ", micro_steps, " must be ≥ 1");
}

bool GradAccumulator::add(double loss, int64_t tokens) {
  DSV3_CHECK(count_ < n_, "more micro-batches than accumulation steps without reset()");
  loss_sum_ += loss;
  tokens_ += tokens;
  return ++count_ == n_;
}

double GradAccumulator::mean_loss() const { return count_ ? loss_sum_ / double(count_) : 0.0; }

void GradAccumulator::reset() {
  count_ = 0;
  loss_sum_ = 0.0;
  tokens_ = 0;
}

}  // namespace dsv3
