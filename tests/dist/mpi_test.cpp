// Tests that run under `mpirun -np N` (CTest label mpi, cmake/mpi_tests.cmake). Started without
// mpirun they are skipped; the thread-world tests cover the same logic in-process.
#include <csignal>
#include <cstdlib>
#include <thread>

#include "dist/data_parallel.h"
#include "dist/expert_parallel.h"
#include "dist_test_util.h"
#include "model/loss.h"
#include "train/optimizer.h"

namespace dsv3 {
namespace {
using test::max_rel_diff;
using test::random_rows;

#define REQUIRE_MPI()                                                              \
  ASSERT_TRUE(launched_by_mpi() && mpi_available()) << "run under mpirun -np N (ctest -L mpi)"

constexpr float kBiasGamma = 1e-2f;  // aux-loss-free bias step γ of the DP test

Communicator& world() {
  static std::unique_ptr<Communicator> c = make_world_communicator();
  return *c;
}

TEST(Mpi, AllReduceIsRankOrderSumEverywhere) {
  REQUIRE_MPI();
  Communicator& c = world();
  const size_t n = 29;
  auto data = [](int r, size_t i) { return rng_normal(5, uint64_t(r), i) * float(1 + i % 7); };
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = data(c.rank(), i);
  c.all_reduce_sum(std::span<float>(v));
  for (size_t i = 0; i < n; ++i) {
    float s = data(0, i);
    for (int r = 1; r < c.size(); ++r) s += data(r, i);
    ASSERT_EQ(v[i], s) << i;
  }
  std::vector<int64_t> counts(size_t(c.size()));
  for (int j = 0; j < c.size(); ++j) counts[size_t(j)] = (c.rank() * 3 + j) % 4;  // zeros included
  std::vector<int64_t> got = c.exchange_counts(counts);
  for (int j = 0; j < c.size(); ++j) EXPECT_EQ(got[size_t(j)], (j * 3 + c.rank()) % 4);
}

// The MoE layer with one expert per rank: outputs, input gradients and expert gradients bitwise
// equal to the single-process layer on all ranks' tokens; gate gradients after the DP all-reduce
// within tolerance.
TEST(Mpi, ExpertParallelMoeEqualsSingleProcess) {
  REQUIRE_MPI();
  Communicator& c = world();
  Backend& be = cpu_backend();
  const int P = c.size();
  const ModelConfig cfg = test::tiny_moe_config(P, std::min(2, P));
  Weights w = Weights::random(cfg, 5, 0.3f);
  ModelParams mp = bind_params(w);
  const MoeParams& p = mp.layers[1].moe;
  const ModelDims d = model_dims(cfg);
  const int64_t N = 5, H = d.H, T = N * P;
  const Tensor x = random_rows(T, H, 9), dout = random_rows(T, H, 10);

  MoeActs ra;
  moe_forward(be, d, p, x, ra);
  Grads gref(cfg);
  Tensor dx_ref = be.alloc(DType::F32, {T, H});
  moe_backward(be, d, p, gref.p.layers[1].moe, ra, dout, Tensor(), dx_ref, false);

  Grads g(cfg);
  ExpertParallelMoe ep(c, d);
  EpMoeActs a;
  const int r = c.rank();
  ep.forward(be, p, x.rows(r * N, (r + 1) * N), a);
  Tensor dx = be.alloc(DType::F32, {N, H});
  ep.backward(be, p, g.p.layers[1].moe, a, dout.rows(r * N, (r + 1) * N), Tensor(), dx, false);
  test::expect_ep_equal(a.local.out, ra.out.rows(r * N, (r + 1) * N), "out");
  test::expect_ep_equal(dx, dx_ref.rows(r * N, (r + 1) * N), "dx");
  const MlpParams& mine = g.p.layers[1].moe.experts[size_t(r)];
  const MlpParams& ref = gref.p.layers[1].moe.experts[size_t(r)];
  test::expect_ep_equal(mine.gate_proj.w, ref.gate_proj.w, "gate_proj");
  test::expect_ep_equal(mine.down_proj.w, ref.down_proj.w, "down_proj");
  Tensor gate = g.p.layers[1].moe.gate.w;
  GradientAllReduce red(c, {gate}, 64);
  red.run(1.0f);
  EXPECT_LT(max_rel_diff(gate.data<float>(), gref.p.layers[1].moe.gate.w.data<float>(), gate.numel()), 2e-6);
  // Loads: the global count per expert equals the single-process count.
  const std::vector<int64_t> loads = global_expert_loads(c, be.to_host(a.local.counts));
  const Tensor rc = be.to_host(ra.counts);
  for (int e = 0; e < P; ++e) EXPECT_EQ(loads[size_t(e)], rc.data<int32_t>()[e]);
}

// A tiny model with its gradients and AdamW, trained by explicit steps (the trainer's loop, minus I/O).
struct TinyRun {
  Weights w;
  Grads g;
  std::unique_ptr<Model> m;
  std::unique_ptr<AdamW> opt;
  double loss = 0;
  std::unique_ptr<Grads> scratch;  // set: sum per-micro-batch gradients explicitly, in order
  std::vector<std::vector<float>> grads_seen;  // what the optimizer got, per slot
  TinyRun(const ModelConfig& cfg, const OptimizerConfig& oc) : w(Weights::random(cfg, 7, 0.2f)), g(cfg) {
    m = std::make_unique<Model>(w, cpu_backend());
    std::vector<ParamSlot> slots;
    for (Param& p : w.params())
      if (p.spec.trainable) slots.push_back({p.spec.name, p.w, g.get(p.spec.name), p.spec.weight_decay});
    opt = std::make_unique<AdamW>(slots, oc);
  }
  // One optimizer step over micro-batches (sequence ranges [b0, b1) of the global batch) whose
  // gradients accumulate; `comm` then sums gradients (× dp_scale) and loads over the ranks.
  void step(std::span<const int32_t> lab, const std::vector<std::pair<int64_t, int64_t>>& micros, int64_t T,
            Communicator* comm, float dp_scale, double grad_scale) {
    const int64_t Lb = T + 1;
    opt->zero_grads();
    std::vector<std::vector<int64_t>> loads;
    double loss_sum = 0;
    for (auto [b0, b1] : micros) {
      const int64_t B = b1 - b0;
      std::vector<int32_t> ids, l(lab.begin() + b0 * Lb, lab.begin() + b1 * Lb);
      for (int64_t b = 0; b < B; ++b) ids.insert(ids.end(), l.begin() + b * Lb, l.begin() + b * Lb + T);
      ForwardOptions fo;
      fo.keep_activations = true;
      ForwardOutput out = m->forward(ids, B, T, fo);
      LossOptions lo;
      lo.balance_alpha = 1e-2;
      LossResult r = compute_loss(cpu_backend(), *m, out, l, B, T, Lb, lo);
      if (scratch) {  // this micro-batch's gradient alone, then added in micro-batch order
        scratch->zero();
        m->backward(r.grad, *scratch);
        for (const ParamSlot& sl : opt->params()) {
          const Tensor add = scratch->get(sl.name);
          float* dst = const_cast<float*>(sl.grad.data<float>());
          for (int64_t k = 0; k < add.numel(); ++k) dst[k] += add.data<float>()[k];
        }
      } else {
        m->backward(r.grad, g);
      }
      loss_sum += r.total;
      size_t li = 0;
      for (const LayerActs& la : m->acts().layers)
        if (present(la.moe.counts)) {
          const Tensor cnt = cpu_backend().to_host(la.moe.counts);
          if (loads.size() <= li) loads.emplace_back(size_t(cnt.numel()), 0);
          for (int64_t e = 0; e < cnt.numel(); ++e) loads[li][size_t(e)] += cnt.data<int32_t>()[e];
          ++li;
        }
    }
    loss = loss_sum / double(micros.size());
    if (comm) {
      std::vector<Tensor> grads;
      for (const ParamSlot& s : opt->params()) grads.push_back(s.grad);
      GradientAllReduce(*comm, grads, 1024).run(dp_scale);
      all_reduce_loads(*comm, loads);
      std::vector<float> lv{float(loss)};
      comm->all_reduce_sum(std::span<float>(lv));
      loss = double(lv[0]) / comm->size();
    }
    grads_seen.clear();
    for (const ParamSlot& s : opt->params()) grads_seen.emplace_back(s.grad.data<float>(), s.grad.data<float>() + s.grad.numel());
    opt->step(1e-2, loss, grad_scale);
    size_t i = 0;
    for (Param& p : w.params())
      if (!p.spec.trainable) {  // router bias: b += γ·sign(mean − load)
        const std::vector<int64_t>& ld = loads[i++];
        double mean = 0;
        for (int64_t v : ld) mean += double(v) / double(ld.size());
        for (size_t e = 0; e < ld.size(); ++e) p.w.data<float>()[e] += kBiasGamma * float((mean > double(ld[e])) - (mean < double(ld[e])));
      }
  }
};

// Data parallel training: two AdamW steps on a tiny model, each rank on its share of the global
// batch, gradients all-reduced (mean), router biases moved by the global loads; against the same
// steps in this process on the whole batch.
TEST(Mpi, DataParallelTrainingStepsEqualSingleProcess) {
  REQUIRE_MPI();
  Communicator& c = world();
  const int P = c.size();
  const ModelConfig cfg = test::tiny_moe_config(4, 2);
  const int64_t Bg = 4, T = 6, Lb = T + 1;
  ASSERT_EQ(Bg % P, 0) << "global batch " << Bg << " does not split over " << P << " ranks";
  std::vector<int32_t> labels(size_t(Bg * Lb));
  for (size_t i = 0; i < labels.size(); ++i) labels[i] = int32_t((i * 29 + 3) % size_t(cfg.vocab_size));
  OptimizerConfig oc;
  oc.eps = 1e-3;  // keeps near-zero gradients from turning FP32 noise into full-size updates

  TinyRun single(cfg, oc), dp(cfg, oc);
  const int64_t share = Bg / P;
  for (int s = 0; s < 2; ++s) {
    single.step(labels, {{0, Bg}}, T, nullptr, 1.0f, 1.0);
    dp.step(labels, {{c.rank() * share, (c.rank() + 1) * share}}, T, &c, 1.0f / float(P), 1.0);
    EXPECT_NEAR(dp.loss, single.loss, 1e-5 * std::fabs(single.loss)) << "step " << s;
    for (size_t i = 0; i < single.grads_seen.size(); ++i)
      EXPECT_LT(max_rel_diff(dp.grads_seen[i].data(), single.grads_seen[i].data(), int64_t(single.grads_seen[i].size())), 1e-5)
          << single.opt->params()[i].name << " step " << s;
  }
  for (size_t i = 0; i < single.w.params().size(); ++i) {
    const Param& a = dp.w.params()[i];
    const Param& b = single.w.params()[i];
    SCOPED_TRACE(a.spec.name);
    double worst = 0;
    for (int64_t k = 0; k < a.w.numel(); ++k)
      worst = std::max(worst, std::fabs(double(a.w.data<float>()[k]) - double(b.w.data<float>()[k])));
    EXPECT_LT(worst, 1e-5);  // lr 1e-2: a parameter moves ~1e-2 per step
    // Every rank holds the same bits.
    std::vector<float> all(a.w.numel() * size_t(P));
    c.all_gather(a.w.data<float>(), all.data(), int64_t(a.w.numel()) * 4);
    for (int r = 1; r < P; ++r)
      ASSERT_EQ(std::memcmp(all.data(), all.data() + size_t(r) * size_t(a.w.numel()), size_t(a.w.numel()) * 4), 0);
  }
}

// With the single process summing the gradients of the same P micro-batches in rank order
// (((g_0 + g_1) + …), each g_i computed alone, as grad_accum = P would if the ops' accumulation
// grouped that way) the reduction order is the same on both sides, and the DP run is bitwise
// equal: gradients, losses, router biases (global loads) and parameters after two AdamW steps.
// (Model::backward's own accumulation folds micro-batch rows into the running sum inside
// rmsnorm_backward and the GEMMs, so it is not bitwise against this; see the tolerance test above.)
TEST(Mpi, DataParallelEqualsGradientAccumulationBitwise) {
  REQUIRE_MPI();
  Communicator& c = world();
  const int P = c.size();
  const ModelConfig cfg = test::tiny_moe_config(4, 2);
  const int64_t share = 2, T = 5, Lb = T + 1, Bg = share * P;
  std::vector<int32_t> labels(size_t(Bg * Lb));
  for (size_t i = 0; i < labels.size(); ++i) labels[i] = int32_t((i * 31 + 11) % size_t(cfg.vocab_size));
  TinyRun single(cfg, OptimizerConfig{}), dp(cfg, OptimizerConfig{});
  single.scratch = std::make_unique<Grads>(cfg);
  std::vector<std::pair<int64_t, int64_t>> micros;
  for (int r = 0; r < P; ++r) micros.push_back({r * share, (r + 1) * share});
  for (int s = 0; s < 2; ++s) {
    single.step(labels, micros, T, nullptr, 1.0f, 1.0 / P);
    dp.step(labels, {micros[size_t(c.rank())]}, T, &c, 1.0f, 1.0 / P);
    for (size_t i = 0; i < single.grads_seen.size(); ++i)
      ASSERT_EQ(dp.grads_seen[i], single.grads_seen[i]) << single.opt->params()[i].name << " step " << s;
  }
  for (size_t i = 0; i < single.w.params().size(); ++i) {
    const Tensor& a = dp.w.params()[i].w;
    const Tensor& b = single.w.params()[i].w;
    for (int64_t k = 0; k < a.numel(); ++k)
      ASSERT_EQ(a.data<float>()[k], b.data<float>()[k]) << dp.w.params()[i].spec.name << "[" << k << "]";
  }
}

// Run only by tests/dist/mpi_kill_test.sh: rank 1 dies by SIGKILL in the middle of a stream of
// collectives; the script checks that the whole job ends, with an error, well within 60 s.
TEST(MpiKill, RankDiesMidStep) {
  REQUIRE_MPI();
  ASSERT_TRUE(std::getenv("DSV3_MPI_KILL_TEST")) << "run only by tests/dist/mpi_kill_test.sh";
  Communicator& c = world();
  std::vector<float> v(1024, 1.0f);
  for (int step = 0; step < 1000000; ++step) {
    if (step == 20 && c.rank() == 1) std::raise(SIGKILL);
    c.all_reduce_sum(std::span<float>(v));
    std::fill(v.begin(), v.end(), 1.0f);
  }
  ADD_FAILURE() << "rank " << c.rank() << " finished although rank 1 died";
}

}  // namespace
}  // namespace dsv3
