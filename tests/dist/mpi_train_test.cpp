// `mpirun -np N` training through Trainer with a TrainParallel (CTest label mpi): data parallel,
// resume, ZeRO-1 and expert parallel against the one-process run on the same global batch.
// Rank 0 runs the one-process reference (grad_accum = N micro-batches, which is what the N ranks
// train on) and compares; every rank checks that all ranks hold the same bits.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iostream>

#include <nlohmann/json.hpp>

#include "core/threads.h"
#include "dist/train_parallel.h"
#include "dist_test_util.h"
#include "io/tokenizer.h"
#include "io/tokenizer_train.h"
#include "train/data_prepare.h"
#include "train/trainer.h"
#include "../train/train_test_util.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;
using train_test::read_metrics;

#define REQUIRE_MPI() ASSERT_TRUE(launched_by_mpi() && mpi_available()) << "run under mpirun -np N (ctest -L mpi)"

Communicator& world() {
  static std::unique_ptr<Communicator> c = make_world_communicator();
  return *c;
}

// The trainer tests' model: 8 experts in 4 groups (top-2 groups), top-2, one MTP module.
const char* kConfig = R"({
  "model_type": "deepseek_v3", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 48,
  "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
  "q_lora_rank": 16, "kv_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
  "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
  "routed_scaling_factor": 2.5, "norm_topk_prob": true, "first_k_dense_replace": 1,
  "num_nextn_predict_layers": 1, "max_position_embeddings": 64, "rope_theta": 10000.0,
  "tie_word_embeddings": false
})";

// A small prepared dataset made by rank 0 in a directory every rank can read.
struct Fixture {
  std::string root, data, tokenizer;
  Fixture() {
    Communicator& c = world();
    std::string dir = c.rank() == 0 ? (fs::temp_directory_path() / cat("dsv3_mpi_train_", ::getpid())).string() : "";
    int64_t n = int64_t(dir.size());
    c.broadcast(&n, sizeof n, 0);
    dir.resize(size_t(n));
    c.broadcast(dir.data(), n, 0);
    root = dir;
    data = root + "/data";
    tokenizer = root + "/tokenizer.json";
    if (c.rank() == 0) {
      fs::remove_all(root);
      fs::create_directories(root);
      const std::string text = root + "/text.txt";
      {
        std::ofstream f(text);
        const char* lines[] = {"the cat sat on the mat and the dog sat on the log.",
                               "a bird in the hand is worth two in the bush.",
                               "the quick brown fox jumps over the lazy dog again and again."};
        for (int doc = 0; doc < 40; ++doc) {
          for (int i = 0; i < 6; ++i) f << lines[(doc + i) % 3] << " ";
          f << "\n\n";
        }
      }
      train_bpe_files({text}, 300, tokenizer);
      Tokenizer tok = Tokenizer::load(tokenizer);
      PrepareOptions p;
      p.tokenizer_path = tokenizer;
      p.output_dir = data;
      p.inputs = {text};
      p.val_fraction = 0.1;
      prepare_token_dataset(tok, p);
    }
    c.barrier();
  }
  ~Fixture() {
    if (world().rank() == 0) fs::remove_all(root);
  }
};

const Fixture& fixture() {
  static Fixture f;
  return f;
}

ModelConfig config() { return parse_model_config(kConfig, "mpi_train_test"); }

constexpr int64_t kSteps = 4;

// grad_accum micro-batches of 2 sequences per rank and step. AdamW eps 1e-3 as in the DP layer
// test: a near-zero gradient whose sign is FP32 noise must not become a full-size update.
TrainOptions options(const std::string& out, int64_t grad_accum) {
  TrainOptions o;
  o.steps = kSteps;
  o.batch = 2;
  o.seq_len = 16;
  o.grad_accum = grad_accum;
  o.lr = 5e-3;
  o.min_lr = 5e-4;
  o.warmup_frac = 0.25;
  o.decay_start_frac = 0.5;
  o.balance_alpha = ScalarSchedule(1e-2);
  o.bias_gamma = ScalarSchedule(1e-2);
  o.init_std = 0.05;
  o.opt.eps = 1e-3;
  o.data_dir = fixture().data;
  o.tokenizer_path = fixture().tokenizer;
  o.out_dir = fixture().root + "/" + out;
  o.eval_every = 2;
  o.eval_batches = 1;
  o.sample_tokens = 2;
  o.checkpoint_every = 0;
  o.plot = false;
  o.quiet = true;
  return o;
}

using Params = std::vector<std::vector<float>>;

Params snapshot(const Trainer& t) {
  Params out;
  const auto sizes = t.parameter_sizes();
  const auto ptrs = t.parameters();
  for (size_t i = 0; i < ptrs.size(); ++i) out.emplace_back(ptrs[i].second, ptrs[i].second + sizes[i].second);
  return out;
}

std::string file_bytes(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// A run of kSteps on every rank; with `resume_at` it stops there (checkpoint) and a new Trainer
// continues, as a restarted job would. Returns the final parameters.
// ep_bytes: the expert-parallel dispatch bytes this rank sent.
Params run_parallel(const std::string& out, const TrainParallelOptions& po, int64_t resume_at,
                    int64_t* ep_bytes = nullptr, Communicator* comm = nullptr) {
  Communicator& c = comm ? *comm : world();
  const TrainOptions o = options(out, 1);
  if (c.rank() == 0) fs::remove_all(o.out_dir);
  c.barrier();
  std::unique_ptr<TrainParallel> par = make_train_parallel(c, po, config());
  if (resume_at > 0) {
    Trainer t(config(), o, par.get());
    t.run(resume_at);
  }
  Trainer t(config(), o, par.get());
  EXPECT_EQ(t.step(), resume_at);
  t.run();
  if (ep_bytes) {
    const EpStats* st = train_parallel_info(*par).ep;
    *ep_bytes = st ? st->dispatch_bytes : -1;
  }
  return snapshot(t);
}

// The one-process run on the same global batch (rank 0 only).
Params run_single(const std::string& out, int ranks) {
  const TrainOptions o = options(out, ranks);
  fs::remove_all(o.out_dir);
  Trainer t(config(), o);
  t.run();
  return snapshot(t);
}

void expect_same_on_every_rank(const Params& p) {
  Communicator& c = world();
  for (size_t i = 0; i < p.size(); ++i) {
    const int64_t n = int64_t(p[i].size());
    std::vector<float> all(size_t(n) * size_t(c.size()));
    c.all_gather(p[i].data(), all.data(), n * 4);
    for (int r = 1; r < c.size(); ++r)
      ASSERT_EQ(0, std::memcmp(all.data(), all.data() + size_t(r) * size_t(n), size_t(n) * 4)) << "tensor " << i;
  }
}

void expect_bitwise(const Params& a, const Params& b, const char* what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_EQ(0, std::memcmp(a[i].data(), b[i].data(), a[i].size() * 4)) << what << ": tensor " << i;
}

// The DP tolerances of docs/distributed.md: parameters abs 1e-5 at lr 5e-3, losses rel 1e-5;
// router biases and MaxVio exactly (the global loads are the same integers).
void expect_close_to_single(const Params& dp, const std::string& dp_out, const Params& single,
                            const std::string& single_out) {
  ASSERT_EQ(dp.size(), single.size());
  double overall = 0;
  for (size_t i = 0; i < dp.size(); ++i) {
    double worst = 0;
    for (size_t k = 0; k < dp[i].size(); ++k) worst = std::max(worst, std::fabs(double(dp[i][k]) - double(single[i][k])));
    EXPECT_LT(worst, 1e-5) << "tensor " << i;
    overall = std::max(overall, worst);
  }
  std::cout << "[ measured ] " << dp_out << " vs one process after " << kSteps << " steps: max |parameter difference| "
            << overall << "\n";
  const auto md = read_metrics(fixture().root + "/" + dp_out + "/metrics.jsonl");
  const auto ms = read_metrics(fixture().root + "/" + single_out + "/metrics.jsonl");
  ASSERT_EQ(md.size(), size_t(kSteps));
  ASSERT_EQ(ms.size(), size_t(kSteps));
  for (size_t s = 0; s < md.size(); ++s) {
    const double a = md[s]["loss"].get<double>(), b = ms[s]["loss"].get<double>();
    EXPECT_NEAR(a, b, 1e-5 * std::fabs(b)) << "step " << s + 1;
    EXPECT_EQ(md[s]["max_vio"], ms[s]["max_vio"]) << "step " << s + 1;
    if (ms[s].contains("val_loss")) {
      const double v = ms[s]["val_loss"].get<double>();
      EXPECT_NEAR(md[s]["val_loss"].get<double>(), v, 1e-5 * v) << "step " << s + 1;
    }
  }
}

TEST(MpiTrain, DataParallelEqualsOneProcessAndResumes) {
  REQUIRE_MPI();
  set_num_threads(1);
  Communicator& c = world();
  const Params straight = run_parallel("dp", {}, 0);
  const Params resumed = run_parallel("dp_resumed", {}, 2);
  expect_same_on_every_rank(straight);
  expect_bitwise(resumed, straight, "DP resumed at step 2 vs straight");
  if (c.rank() == 0) {
    EXPECT_EQ(read_metrics(fixture().root + "/dp/metrics.jsonl"),
              read_metrics(fixture().root + "/dp_resumed/metrics.jsonl"));
    EXPECT_TRUE(fs::exists(fixture().root + "/dp/latest/config.json"));
    expect_close_to_single(straight, "dp", run_single("single", c.size()), "single");
  }
  c.barrier();
}

TEST(MpiTrain, Zero1EqualsUnshardedBitwise) {
  REQUIRE_MPI();
  set_num_threads(1);
  Communicator& c = world();
  TrainParallelOptions z;
  z.zero1 = true;
  const Params plain = run_parallel("dp_plain", {}, 0);
  const Params zero = run_parallel("dp_zero1", z, 2);  // resumed from a ZeRO-1 checkpoint
  expect_bitwise(zero, plain, "ZeRO-1 vs unsharded");
  expect_same_on_every_rank(zero);
  if (c.rank() == 0) {
    EXPECT_EQ(read_metrics(fixture().root + "/dp_plain/metrics.jsonl"),
              read_metrics(fixture().root + "/dp_zero1/metrics.jsonl"));
    // The gathered optimizer state is written exactly as the unsharded optimizer writes it.
    const std::string a = file_bytes(fixture().root + "/dp_plain/latest/optimizer.safetensors");
    EXPECT_FALSE(a.empty());
    EXPECT_TRUE(a == file_bytes(fixture().root + "/dp_zero1/latest/optimizer.safetensors"));
  }
  // Each rank holds 1/N of the moments (one block of ⌈n/N⌉ elements at most).
  std::unique_ptr<TrainParallel> par = make_train_parallel(c, z, config());
  Trainer t(config(), options("dp_zero1", 1), par.get());
  const ZeroAdamW* zo = train_parallel_info(*par).zero;
  ASSERT_NE(zo, nullptr);
  const int64_t full = zo->full_moment_bytes(), P = c.size();
  EXPECT_LE(zo->moment_bytes(), (full / 8 + P - 1) / P * 8);
  std::vector<int64_t> sum{zo->moment_bytes()};
  c.all_reduce_sum(std::span<int64_t>(sum));
  EXPECT_EQ(sum[0], full);
}

TEST(MpiTrain, ExpertParallelEqualsOneProcess) {
  REQUIRE_MPI();
  set_num_threads(1);
  Communicator& c = world();
  TrainParallelOptions ep;
  ep.ep = 2;  // np 2: EP over both ranks; np 4: two data-parallel groups of 2 EP ranks
  int64_t sent = 0;
  const Params p = run_parallel("ep", ep, 2, &sent);
  EXPECT_GT(sent, 0) << "the MoE layers did not run expert-parallel";
  expect_same_on_every_rank(p);
  if (c.rank() == 0) expect_close_to_single(p, "ep", run_single("single_ep", c.size()), "single_ep");
  c.barrier();
}

// The EP options inside the trainer, on a world of 2-rank nodes (--ranks-per-node 2): two-hop
// dispatch only regroups the partial sums (same tolerance against the one process); node-limited
// routing (1 node per token) and FP8 dispatch change the numbers, so there every rank must simply
// agree and the losses stay finite.
TEST(MpiTrain, ExpertParallelOptions) {
  REQUIRE_MPI();
  set_num_threads(1);
  static std::unique_ptr<Communicator> nodes = make_world_communicator(2);
  Communicator& c = *nodes;
  ASSERT_EQ(c.ranks_per_node(), 2);
  TrainParallelOptions hop;
  hop.ep = c.size();
  hop.ep_options.two_hop = true;
  int64_t sent = 0;
  const Params p = run_parallel("ep_two_hop", hop, 0, &sent, &c);
  EXPECT_GT(sent, 0);
  expect_same_on_every_rank(p);
  if (c.rank() == 0) expect_close_to_single(p, "ep_two_hop", run_single("single_two_hop", c.size()), "single_two_hop");
  c.barrier();

  TrainParallelOptions lim;
  lim.ep = c.size();
  lim.ep_options.node_limit = 1;
  lim.ep_options.fp8_dispatch = true;
  expect_same_on_every_rank(run_parallel("ep_limited_fp8", lim, 2, nullptr, &c));
  if (c.rank() == 0) {
    for (const nlohmann::json& m : read_metrics(fixture().root + "/ep_limited_fp8/metrics.jsonl"))
      EXPECT_TRUE(m["loss"].is_number() && std::isfinite(m["loss"].get<double>())) << m.dump();
  }
  c.barrier();
}

TEST(MpiTrain, MismatchedOptionsAreAnInputErrorOnEveryRank) {
  REQUIRE_MPI();
  Communicator& c = world();
  std::unique_ptr<TrainParallel> par = make_train_parallel(c, {}, config());
  TrainOptions o = options("mismatch", 1);
  if (c.rank() == c.size() - 1) o.seed += 1;
  try {
    Trainer t(config(), o, par.get());
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("disagree on the training options"), std::string::npos) << e.what();
  }
  TrainParallelOptions ep;
  ep.ep = 3;
  EXPECT_THROW(make_train_parallel(c, ep, config()), InputError);  // 3 divides neither 2 nor 4 ranks
}

}  // namespace
}  // namespace dsv3
