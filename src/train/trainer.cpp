#include "train/trainer.h"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <optional>

#include "backend/fp8.h"
#include "backend/ops.h"
#include "core/error.h"
#include "io/tokenizer.h"
#include "model/loss.h"
#include "model/model.h"
#include "model/moe_hook.h"
#include "model/weights.h"
#include "train/checkpoint.h"
#include "train/data_loader.h"
#include "train/metrics.h"
#include "train/trainer_io.h"
#ifdef DSV3_HAVE_CUDA
#include "backend/cuda/attention_bf16.h"
#endif

namespace dsv3 {

namespace fs = std::filesystem;

void TrainOptions::validate() const {
  auto pos = [](int64_t v, const char* name) {
    if (v < 1) input_error("--", name, " is ", v, "; expected a positive integer");
  };
  pos(steps, "steps");
  pos(batch, "batch");
  pos(seq_len, "seq-len");
  pos(grad_accum, "grad-accum");
  if (!(lr > 0) || !(min_lr >= 0) || min_lr > lr)
    input_error("--lr ", lr, " / --min-lr ", min_lr, ": expected 0 ≤ min-lr ≤ lr and lr > 0");
  if (!(warmup_frac >= 0 && warmup_frac <= decay_start_frac && decay_start_frac <= 1))
    input_error("--warmup-frac ", warmup_frac, " / --decay-start-frac ", decay_start_frac,
                ": expected 0 ≤ warmup-frac ≤ decay-start-frac ≤ 1");
  if (eval_every < 0 || eval_batches < 0 || sample_tokens < 0 || checkpoint_every < 0)
    input_error("--eval-every, --eval-batches, --sample-tokens and --checkpoint-every must be ≥ 0");
  if (keep_checkpoints < 1) input_error("--keep-checkpoints is ", keep_checkpoints, "; expected ≥ 1");
  if (!(init_std > 0)) input_error("--init-std is ", init_std, "; expected > 0");
  if (precision != "fp32" && precision != "bf16" && precision != "fp8" && precision != "fp8-dgrad-128x128")
    input_error("--precision '", precision, "': expected fp32, bf16, fp8 or fp8-dgrad-128x128");
  if (device != "cpu" && device != "cuda") input_error("--device '", device, "': expected cpu or cuda");
  if (data_dir.empty()) input_error("no dataset: --data DIR (a directory written by `dsv3 data prepare`)");
  opt.validate();
}

nlohmann::json TrainOptions::to_json() const {
  return {{"steps", steps},
          {"batch", batch},
          {"seq_len", seq_len},
          {"grad_accum", grad_accum},
          {"lr", lr},
          {"min_lr", min_lr},
          {"warmup_frac", warmup_frac},
          {"decay_start_frac", decay_start_frac},
          {"mtp_lambda", mtp_lambda.str()},
          {"balance_alpha", balance_alpha.str()},
          {"bias_gamma", bias_gamma.str()},
          {"weight_decay", opt.weight_decay},
          {"clip_norm", opt.clip_norm},
          {"beta1", opt.beta1},
          {"beta2", opt.beta2},
          {"eps", opt.eps},
          {"max_consecutive_skips", opt.max_consecutive_skips},
          {"moments", opt.moment_dtype == DType::BF16 ? "bf16" : "f32"},  // --moments: ZeRO-1 ranks must agree
          {"seed", seed},
          {"init_std", init_std},
          {"precision", precision},
          {"device", device},
          {"data", data_dir},
          {"tokenizer", tokenizer_path},
          {"out", out_dir},
          {"eval_every", eval_every},
          {"eval_batches", eval_batches},
          {"checkpoint_every", checkpoint_every},
          {"keep_checkpoints", keep_checkpoints}};
}

namespace {

// The MoE layers of a model and where their router state lives.
struct MoeLayer {
  int64_t layer;     // hub layer index (MTP blocks at num_hidden_layers + k − 1)
  std::string bias;  // e_score_correction_bias name ("" when the router has none)
};

std::vector<MoeLayer> moe_layers(const ModelConfig& c) {
  std::vector<MoeLayer> out;
  for (int64_t i = 0; i < c.num_layers_total(); ++i)
    if (c.n_routed_experts > 0 && c.is_moe_layer(i))
      out.push_back({i, c.has_router_bias() ? cat("model.layers.", i, ".mlp.gate.e_score_correction_bias") : ""});
  return out;
}

const LayerActs* layer_acts(const ModelActs& a, int64_t i) {
  const int64_t L = int64_t(a.layers.size());
  if (i < L) return &a.layers[size_t(i)];
  const size_t k = size_t(i - L);
  return k < a.mtp.size() && a.mtp[k].S > 0 ? &a.mtp[k].block : nullptr;
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

struct Trainer::Impl {
  ModelConfig cfg;
  TrainOptions o;
  Backend* be = &cpu_backend();  // --device: master weights, gradients and moments live there
  Weights master;
  std::optional<Weights> compute;  // BF16 copies for --precision bf16 / fp8
  std::unique_ptr<Model> model;
  std::unique_ptr<Grads> grads;
  std::unique_ptr<AdamW> opt;  // null under ZeRO-1 (par holds the sharded state)
  std::vector<ParamSlot> slots;  // every trainable parameter, the optimizer's order
  TrainParallel* par = nullptr;
  LrSchedule lr;
  TokenDataset train_ds, val_ds;
  std::unique_ptr<BatchSampler> train_s, val_s;
  std::unique_ptr<CheckpointManager> ckpt;
  std::unique_ptr<MetricsLog> log;
  std::optional<Tokenizer> tok;
  std::vector<MoeLayer> moe;
  int64_t step = 0;
  double first_val = -1;

  int rank() const { return par ? par->rank() : 0; }
  int ranks() const { return par ? par->size() : 1; }

  bool on_host() const { return be->device() == Device::CPU; }

  // Master weights to the training device (a no-op on the CPU).
  void place(Weights& w) {
    if (on_host()) return;
    for (Param& p : w.params()) p.w = be->to_device(p.w);
  }

  // full = false under ZeRO-1 for a fresh run: the sharded state is made by par instead.
  void build_optimizer(Weights& w, bool full = true) {
    place(w);
    grads = std::make_unique<Grads>(cfg, on_host() ? nullptr : be);
    slots.clear();
    for (Param& p : w.params())
      if (p.spec.trainable) slots.push_back({p.spec.name, p.w, grads->get(p.spec.name), p.spec.weight_decay});
    opt = full ? std::make_unique<AdamW>(slots, o.opt, be) : nullptr;
  }

  void bind_model() {
    // The eligible linear layers' GEMMs (backend/fp8.h, docs/fp8.md); the rest use the BF16 copies.
    LinearPrecision& lp = linear_precision();
    lp = LinearPrecision{};
    if (o.precision == "bf16") lp.mode = LinearPrecisionMode::Bf16;
    if (o.precision.starts_with("fp8")) lp.mode = LinearPrecisionMode::Fp8;
    lp.dgrad_block = o.precision == "fp8-dgrad-128x128";
#ifdef DSV3_HAVE_CUDA
    // On the GPU, bf16/fp8 also run the attention core on BF16 tensor cores (FP32 softmax and sums).
    if (!on_host()) cuda_set_attention_bf16(o.precision != "fp32");
#endif
    if (o.precision != "fp32") {
      std::map<std::string, Tensor> t;
      for (const Param& p : master.params()) {
        if (p.spec.kind == TensorKind::router_bias) {
          t[p.spec.name] = p.w;
        } else if (on_host()) {
          t[p.spec.name] = p.w.to(DType::BF16);
        } else {
          Tensor b = be->alloc(DType::BF16, p.w.shape());
          be->copy(CopyArgs{p.w, b});
          t[p.spec.name] = b;
        }
      }
      compute = Weights::from_tensors(cfg, std::move(t), "bf16 copies");
      model = std::make_unique<Model>(*compute, *be);
      // The optimizer rewrites the copies as it updates (one pass over the weights, not two); every
      // trainable tensor has one (the router bias, shared with the master, is not trainable).
      if (opt) opt->set_copies([&](const std::string& name) { return compute->get(name).w; });
    } else {
      model = std::make_unique<Model>(master, *be);
    }
  }

  // After an update: refresh the BF16 copies the GEMMs read.
  void refresh_compute() {
    if (!compute) return;
    std::vector<CopyArgs> copies;
    for (Param& p : compute->params())
      if (p.spec.kind != TensorKind::router_bias)  // shares the master tensor
        copies.push_back(CopyArgs{master.get(p.spec.name).w, p.w});
    be->copy_many(copies);
  }
};

Trainer::Trainer(const ModelConfig& config, TrainOptions o, TrainParallel* par) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  o.validate();
  m.par = par;
  if (par) {
    par->check_same("model configuration", serialize_model_config(config));
    par->check_same("training options", o.to_json().dump());
    if (par->rank() != 0) o.quiet = true;
  }
  m.cfg = config;
  m.o = o;
  m.be = &backend_named(o.device);
  if (!m.on_host() && par && par->shards_optimizer())
    input_error("--zero1 shards the optimizer in host memory: it needs --device cpu (on GPUs every rank keeps "
                "the whole AdamW state)");
  m.moe = moe_layers(config);
  m.train_ds = TokenDataset::open(o.data_dir, "train");
  if (int64_t(m.train_ds.vocab_size()) > config.vocab_size)
    input_error(o.data_dir, ": the dataset's vocabulary (", m.train_ds.vocab_size(),
                ") is larger than the model's vocab_size ", config.vocab_size);
  m.train_s = std::make_unique<BatchSampler>(m.train_ds, o.batch, o.seq_len, o.seed, true);
  if (o.eval_every > 0) {
    m.val_ds = TokenDataset::open(o.data_dir, "val");
    m.val_s = std::make_unique<BatchSampler>(m.val_ds, o.batch, o.seq_len, o.seed, false);
  }
  if (!o.tokenizer_path.empty()) m.tok = Tokenizer::load(o.tokenizer_path);
  m.lr = LrSchedule::for_run(o.steps, o.lr, o.min_lr, o.warmup_frac, o.decay_start_frac);

  fs::create_directories(o.out_dir);
  m.ckpt = std::make_unique<CheckpointManager>(o.out_dir, o.keep_checkpoints);
  // Rank 0 finds (and repairs) the checkpoint; every rank reads the one it names.
  std::string resume_dir;
  if (o.resume && m.rank() == 0)
    if (std::optional<FoundCheckpoint> f = m.ckpt->resume().newest) resume_dir = f->dir;
  if (par) resume_dir = par->broadcast(resume_dir, 0);
  const bool zero1 = par && par->shards_optimizer();
  if (!resume_dir.empty()) {
    LoadedTraining lt = load_training_checkpoint(resume_dir, [&](Weights& w) -> AdamW& {
      // Compared in the file's spelling; torch_dtype records the dtype the weights were saved in.
      ModelConfig saved = w.config(), want = parse_model_config(serialize_model_config(config));
      saved.torch_dtype = want.torch_dtype;
      if (serialize_model_config(saved) != serialize_model_config(want))
        input_error(resume_dir, ": its config.json differs from the requested model configuration; use another "
                                "--out or the same configuration");
      m.build_optimizer(w);
      return *m.opt;
    });
    m.master = std::move(lt.weights);
    m.step = lt.state.step;
    m.train_s->restore(lt.state.data, resume_dir);
    m.first_val = lt.state.extra.value("first_val_loss", -1.0);
    if (zero1) {
      par->init_optimizer(m.slots, o.opt, m.be, m.opt.get());
      m.opt.reset();
    }
    if (!o.quiet) std::cout << "resumed from " << resume_dir << " at step " << m.step << "\n";
  } else {
    m.master = Weights::random(config, o.seed, float(o.init_std));
    m.build_optimizer(m.master, !zero1);
    if (zero1) par->init_optimizer(m.slots, o.opt, m.be, nullptr);
  }
  m.bind_model();
  if (m.rank() == 0)
    m.log = std::make_unique<MetricsLog>(o.out_dir + "/metrics.jsonl", resume_dir.empty() ? -1 : m.step);
}

Trainer::~Trainer() = default;

int64_t Trainer::step() const { return impl_->step; }

std::vector<std::pair<std::string, const float*>> Trainer::parameters() const {
  std::vector<std::pair<std::string, const float*>> out;
  for (const Param& p : impl_->master.params()) out.emplace_back(p.spec.name, p.w.data<float>());
  return out;
}

std::vector<std::pair<std::string, int64_t>> Trainer::parameter_sizes() const {
  std::vector<std::pair<std::string, int64_t>> out;
  for (const Param& p : impl_->master.params()) out.emplace_back(p.spec.name, p.w.numel());
  return out;
}

double Trainer::validation_loss() {
  Impl& m = *impl_;
  if (!m.val_s) return -1;
  m.val_s->rewind();
  const int64_t n = std::min<int64_t>(m.o.eval_batches, int64_t(m.val_s->windows_per_epoch()) / m.o.batch);
  if (n < 1) return -1;
  double sum = 0;
  const int64_t B = m.o.batch, T = m.o.seq_len;
  for (int64_t i = 0; i < n; ++i) {
    Tensor w = m.val_s->next();  // [B, T+1]
    std::span<const int32_t> lab(w.data<int32_t>(), size_t(B * (T + 1)));
    std::vector<int32_t> ids;
    for (int64_t b = 0; b < B; ++b) ids.insert(ids.end(), lab.begin() + b * (T + 1), lab.begin() + b * (T + 1) + T);
    ForwardOptions fo;
    fo.mtp = false;
    ForwardOutput out = m.model->forward(ids, B, T, fo);
    LossOptions lo;
    lo.need_grad = false;
    sum += compute_loss(*m.be, *m.model, out, lab, B, T, T + 1, lo).main;
  }
  return sum / double(n);
}

std::string Trainer::greedy_sample(int64_t n) {
  Impl& m = *impl_;
  if (!m.tok) return "";
  std::vector<int32_t> ids = m.tok->encode(m.o.sample_prompt);
  if (ids.empty()) ids.push_back(0);
  const size_t prompt = ids.size();
  const int64_t V = std::min<int64_t>(m.cfg.vocab_size, int64_t(m.tok->vocab_size()));
  ForwardOptions fo;
  fo.mtp = false;
  for (int64_t i = 0; i < n && int64_t(ids.size()) < m.cfg.max_position_embeddings; ++i) {
    ForwardOutput out = m.model->forward(ids, 1, int64_t(ids.size()), fo);
    const Tensor logits = m.on_host() ? out.logits : m.be->to_host(out.logits);
    const float* last = logits.data<float>() + (int64_t(ids.size()) - 1) * m.cfg.vocab_size;
    int32_t best = 0;
    for (int32_t v = 1; v < V; ++v)
      if (last[v] > last[best]) best = v;
    if (best == m.tok->eos_id()) break;
    ids.push_back(best);
  }
  return m.o.sample_prompt + m.tok->decode(std::span<const int32_t>(ids).subspan(prompt), true);
}

TrainSummary Trainer::run(int64_t stop_at) {
  Impl& m = *impl_;
  const TrainOptions& o = m.o;
  if (stop_at < 0 || stop_at > o.steps) stop_at = o.steps;
  const int64_t B = o.batch, T = o.seq_len, E = m.cfg.n_routed_experts;
  // Data parallel: every rank draws all micro-batches of the step and trains on its own block.
  const int64_t micros = o.grad_accum * m.ranks();
  // Expert parallelism: the MoE layers run through the hook on this thread for the whole run.
  struct HookScope {
    explicit HookScope(MoeLayerHook* h) : set(h != nullptr) {
      if (set) prev = set_moe_layer_hook(h);
    }
    ~HookScope() {
      if (set) set_moe_layer_hook(prev);
    }
    HookScope(const HookScope&) = delete;
    HookScope& operator=(const HookScope&) = delete;
    bool set;
    MoeLayerHook* prev = nullptr;
  } hook_scope(m.par ? m.par->moe_hook() : nullptr);
  TrainSummary sum;
  ThroughputMeter meter;
  const double t_run = now_s();
  std::vector<std::vector<int64_t>> loads(m.moe.size(), std::vector<int64_t>(size_t(E)));

  auto save = [&]() {
    TrainerState st;
    st.step = m.step;
    st.data = m.train_s->state();
    st.extra = {{"options", o.to_json()}, {"first_val_loss", m.first_val}};
    std::unique_ptr<AdamW> gathered;  // ZeRO-1: the complete state, on rank 0; on a GPU: host copies
    if (!m.opt) gathered = m.par->gather_optimizer(0);
    if (m.rank() != 0) return;
    Weights host_master;
    if (!m.on_host()) {
      host_master = m.master;
      std::vector<ParamSlot> hs;
      for (Param& p : host_master.params()) {
        p.w = m.be->to_host(p.w);
        if (p.spec.trainable) hs.push_back({p.spec.name, p.w, Tensor::zeros(DType::F32, p.w.shape()), p.spec.weight_decay});
      }
      gathered = std::make_unique<AdamW>(hs, o.opt, nullptr);
      std::map<std::string, Tensor> moments;
      for (const AdamW::NamedState& ns : m.opt->state_tensors()) moments[ns.name] = m.be->to_host(ns.tensor);
      gathered->load_state([&](const std::string& n) { return moments.at(n); }, m.opt->state_json(),
                           "the device optimizer state");
    }
    const std::string dir = save_training_checkpoint(*m.ckpt, m.on_host() ? m.master : host_master, o.tokenizer_path,
                                                     st, m.opt && m.on_host() ? *m.opt : *gathered,
                                                     m.cfg.bos_token_id.value_or(0),
                                                     m.cfg.eos_token_id.empty() ? 1 : m.cfg.eos_token_id[0]);
    if (!o.quiet) std::cout << "checkpoint " << dir << "\n";
  };

  while (m.step < stop_at) {
    const double t0 = now_s();
    if (m.opt)
      m.opt->zero_grads();
    else
      m.grads->zero();
    for (auto& l : loads) std::fill(l.begin(), l.end(), 0);
    LossOptions lo;
    lo.mtp_lambda = o.mtp_lambda.at(m.step);
    lo.balance_alpha = o.balance_alpha.at(m.step);
    double loss_sum = 0;
    for (int64_t micro = 0; micro < micros; ++micro) {
      Tensor w = m.train_s->next();  // [B, T+1]
      if (micro / o.grad_accum != m.rank()) continue;
      std::span<const int32_t> lab(w.data<int32_t>(), size_t(B * (T + 1)));
      std::vector<int32_t> ids;
      ids.reserve(size_t(B * T));
      for (int64_t b = 0; b < B; ++b)
        ids.insert(ids.end(), lab.begin() + b * (T + 1), lab.begin() + b * (T + 1) + T);
      ForwardOptions fo;
      fo.keep_activations = true;
      ForwardOutput out = m.model->forward(ids, B, T, fo);
      LossResult r = compute_loss(*m.be, *m.model, out, lab, B, T, T + 1, lo);
      loss_sum += r.total;
      m.model->backward(r.grad, *m.grads);
      if (grad_hook_) grad_hook_(m.step, *m.grads);
      for (size_t i = 0; i < m.moe.size(); ++i) {
        const LayerActs* la = layer_acts(m.model->acts(), m.moe[i].layer);
        if (!la) continue;
        Tensor c = m.be->to_host(la->moe.counts);
        for (int64_t e = 0; e < E; ++e) loads[i][size_t(e)] += c.data<int32_t>()[e];
      }
    }
    double reduce_s = 0;  // the step's exchange between ranks (it blocks), for metrics.jsonl
    if (m.par) {
      const double t = now_s();
      m.par->reduce(m.slots, loads, loss_sum);
      reduce_s = now_s() - t;
    }
    const double loss = loss_sum / double(micros);
    const double lr = m.lr.at(m.step);
    const StepReport rep = m.opt ? m.opt->step(lr, loss, 1.0 / double(micros))
                                 : m.par->optimizer_step(lr, loss, 1.0 / double(micros));

    // Aux-loss-free balancing and MaxVio from this step's loads (all micro-batches).
    const double gamma = o.bias_gamma.at(m.step);
    nlohmann::json vio = nlohmann::json::array();
    sum.max_vio.clear();
    for (size_t i = 0; i < m.moe.size(); ++i) {
      double total = 0, mx = 0;
      for (int64_t e = 0; e < E; ++e) total += double(loads[i][size_t(e)]), mx = std::max(mx, double(loads[i][size_t(e)]));
      const double mean = total / double(E);
      const double v = mean > 0 ? mx / mean - 1.0 : 0.0;
      sum.max_vio.push_back(v);
      vio.push_back(v);
      if (!rep.applied || gamma == 0.0 || m.moe[i].bias.empty()) continue;
      Tensor bias = m.master.find(m.moe[i].bias)->w;
      Tensor hb = m.on_host() ? bias : m.be->to_host(bias);
      float* b = hb.data<float>();
      for (int64_t e = 0; e < E; ++e) {
        const double load = double(loads[i][size_t(e)]);
        b[e] += float(gamma * double((mean > load) - (mean < load)));
      }
      if (!m.on_host()) m.be->copy(CopyArgs{m.be->to_device(hb), bias});
    }
    sum.loads = loads;
    if (rep.applied && !m.opt) m.refresh_compute();  // ZeRO-1: the sharded optimizer leaves the copies
    ++m.step;
    const double dt = now_s() - t0;
    const int64_t tokens = B * T * micros;
    StepLine line;
    line.step = m.step;
    line.total = o.steps;
    line.loss = loss;
    line.grad_norm = rep.grad_norm;
    line.lr = lr;
    line.ms = dt * 1e3;
    line.tok_per_s = meter.add(tokens, dt);
    line.skipped = !rep.applied;
    if (!o.quiet) std::cout << format_step_line(line) << "\n" << std::flush;
    nlohmann::json rec = {{"step", m.step},       {"loss", loss}, {"grad_norm", rep.grad_norm}, {"lr", lr},
                          {"ms", line.ms},        {"tok_per_s", line.tok_per_s},
                          {"max_vio", vio},       {"skipped", !rep.applied}};
    if (m.par) rec["reduce_ms"] = reduce_s * 1e3;
    if (!std::isfinite(loss)) rec["loss"] = nullptr;
    if (!std::isfinite(rep.grad_norm)) rec["grad_norm"] = nullptr;
    sum.last_loss = loss;

    const bool last = m.step == stop_at;
    if (o.eval_every > 0 && (m.step % o.eval_every == 0 || m.step == o.steps)) {
      const double vl = validation_loss();
      if (vl >= 0) {
        rec["val_loss"] = vl;
        if (m.first_val < 0) m.first_val = vl;
        sum.last_val_loss = vl;
        double mv = 0;
        for (double v : sum.max_vio) mv = std::max(mv, v);
        if (!o.quiet) std::cout << "step " << m.step << ": val loss " << vl << " | MaxVio (worst MoE layer) " << mv << "\n";
      }
      if (o.sample_tokens > 0 && m.tok) {
        const std::string s = greedy_sample(o.sample_tokens);
        rec["sample"] = s;
        if (!o.quiet) std::cout << "sample: " << s << "\n";
      }
    }
    if (m.log) m.log->append(rec);
    if ((o.checkpoint_every > 0 && m.step % o.checkpoint_every == 0) || last) save();
    if (o.plot && !o.quiet && (last || (o.eval_every > 0 && m.step % o.eval_every == 0))) {
      try {
        plot_loss_curve(m.log->path(), o.out_dir + "/loss.png", "dsv3 train");
      } catch (const InputError& e) {
        if (last) std::cerr << "dsv3: no loss plot: " << e.what() << "\n";
      }
    }
  }
  sum.steps_done = m.step;
  sum.skipped = m.opt ? m.opt->skipped_total() : m.par->skipped_total();
  sum.first_val_loss = m.first_val;
  sum.seconds = now_s() - t_run;
  return sum;
}

}  // namespace dsv3
