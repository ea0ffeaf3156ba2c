// The inference engine on the CUDA backend (runner, weights and the BF16 latent cache on the
// device, greedy argmax on the device) against the CPU engine with a BF16 cache — the same cache
// rounding, so what remains is FP32 summation order. A step whose CPU logits have their two best
// values closer than the parity tolerance could legitimately go either way: that sequence's
// comparison stops there (at least 4 compared tokens are required per sequence).
// Also: the device cache's attention (cuda_mla_decode at V3 shapes, the generic kernel otherwise)
// against the host LatentAttention over a BF16 pool, under kBf16.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <tuple>

#include "attention_dims.h"
#include "small_linear_check.h"
#include "../backend/harness.h"
#include "../backend/reference.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/pdl.h"
#include "infer/cuda_decode_ops.h"
#include "infer/cuda_latent_attention.h"
#include "infer/engine.h"
#include "io/safetensors.h"
#include "model/module_ops.h"
#include "model/presets.h"
#include "model/weights.h"

namespace dsv3::test {
namespace {

namespace fs = std::filesystem;

std::vector<fs::path> fixture_dirs() {
  std::vector<fs::path> out;
  for (const auto& e : fs::directory_iterator(fs::path(DSV3_SOURCE_DIR) / "tests" / "data" / "fixtures"))
    if (fs::exists(e.path() / "expected.safetensors")) out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<int32_t> fixture_ids(const fs::path& dir) {
  SafetensorsFile exp = SafetensorsFile::open((dir / "expected.safetensors").string());
  Tensor ids64 = exp.tensor("input_ids");
  std::vector<int32_t> ids;
  for (int64_t i = 0; i < ids64.numel(); ++i) ids.push_back(int32_t(ids64.data<int64_t>()[i]));
  return ids;
}

Request greedy_request(std::vector<int32_t> prompt, int64_t n) {
  Request r;
  r.prompt = std::move(prompt);
  r.sampling.temperature = 0.0f;
  r.max_tokens = n;
  return r;
}

// The CPU engine's greedy output per request, and for each (request, position) whether its logits
// row was a near tie.
struct CpuRef {
  std::vector<std::vector<int32_t>> tokens;
  std::map<std::pair<int64_t, int64_t>, bool> tie;
};

CpuRef cpu_reference(const Weights& w, EngineOptions opt, const std::vector<Request>& reqs) {
  opt.cache.dtype = DType::BF16;
  Engine e(w, opt);
  CpuRef ref;
  e.on_logits = [&](int64_t id, int64_t pos, std::span<const float> l) {
    double best = -INFINITY, second = -INFINITY, scale = 0;
    for (float x : l) {
      scale = std::max(scale, double(std::fabs(x)));
      if (x > best) {
        second = best;
        best = x;
      } else if (x > second) {
        second = x;
      }
    }
    ref.tie[{id, pos}] = best - second < tol::kModelParity * scale;
  };
  for (const Request& r : reqs) e.add(r);
  ref.tokens = e.run_all();
  return ref;
}

// Greedy requests of the given prompt lengths, 12 new tokens each, ids spread over the tiny
// preset's vocabulary by a multiplicative hash (`salt` varies them between tests).
std::vector<Request> hashed_requests(const std::vector<int64_t>& lengths, uint64_t salt) {
  std::vector<Request> reqs;
  for (int64_t len : lengths) {
    std::vector<int32_t> p;
    for (int64_t i = 0; i < len; ++i)
      p.push_back(int32_t(((uint64_t(len) * salt + uint64_t(i)) * 2654435761u >> 9) % 4096));
    reqs.push_back(greedy_request(p, 12));
  }
  return reqs;
}

// GPU tokens equal the CPU's up to each sequence's first near tie; returns the fewest compared
// (and in *total the sum over the sequences).
int64_t expect_matches(const CpuRef& ref, const std::vector<std::vector<int32_t>>& got,
                       const std::vector<Request>& reqs, int64_t* total = nullptr) {
  EXPECT_EQ(got.size(), ref.tokens.size());
  int64_t fewest = INT64_MAX;
  for (size_t s = 0; s < reqs.size() && s < got.size(); ++s) {
    const int64_t n0 = int64_t(reqs[s].prompt.size());
    int64_t compared = 0;
    for (size_t i = 0; i < ref.tokens[s].size(); ++i) {
      const auto it = ref.tie.find({int64_t(s), n0 - 1 + int64_t(i)});
      if (it != ref.tie.end() && it->second) break;
      if (i >= got[s].size()) {
        ADD_FAILURE() << "sequence " << s << ": GPU output ends after " << got[s].size() << " tokens";
        break;
      }
      EXPECT_EQ(got[s][i], ref.tokens[s][i]) << "sequence " << s << " token " << i;
      if (got[s][i] != ref.tokens[s][i]) break;
      ++compared;
    }
    fewest = std::min(fewest, compared);
    if (total) *total += compared;
  }
  return fewest;
}

// Sets the tensor-core threshold of the decode kernels for one scope (0: off, 1: every step).
struct MmaRows {
  int saved = cuda_decode_mma_rows();
  explicit MmaRows(int rows) { cuda_set_decode_mma_rows(rows); }
  ~MmaRows() { cuda_set_decode_mma_rows(saved); }
};

TEST(CudaEngine, GreedyEqualsCpuEngineOnFixtures) {
  ASSERT_GT(cuda_device_count(), 0);
  int fixtures = 0;
  for (const fs::path& dir : fixture_dirs()) {
    SCOPED_TRACE(dir.filename().string());
    ++fixtures;
    const Weights w = Weights::load(dir.string());
    std::vector<int32_t> ids = fixture_ids(dir);
    ids.resize(std::min<size_t>(ids.size(), 8));
    const std::vector<Request> reqs = {greedy_request(ids, 12)};
    EngineOptions opt;
    const CpuRef ref = cpu_reference(w, opt, reqs);
    Engine gpu(w, opt, cuda_backend());
    ASSERT_TRUE(gpu.on_device());
    for (const Request& r : reqs) gpu.add(r);
    EXPECT_GE(expect_matches(ref, gpu.run_all(), reqs), 4) << "too many near ties to compare";
    EXPECT_GT(gpu.device_greedy_steps(), 0);
    // MTP speculation on the device (drafts and their verification by the device argmax): same output.
    if (gpu.runner().num_mtp() > 0) {
      EngineOptions mo = opt;
      mo.draft_tokens = 2;
      Engine spec(w, mo, cuda_backend());
      for (const Request& r : reqs) spec.add(r);
      EXPECT_GE(expect_matches(ref, spec.run_all(), reqs), 4);
      EXPECT_GT(spec.stats().spec.rounds, 0);
    }
  }
  EXPECT_GE(fixtures, 6);
}

// Sequences of different lengths decoding in one batch, joining in one step, and prompts fed in
// chunks of 3: each sequence's output equals the CPU engine's.
TEST(CudaEngine, BatchedAndChunkedEqualCpu) {
  ASSERT_GT(cuda_device_count(), 0);
  for (const fs::path& dir : fixture_dirs()) {
    if (dir.filename() != "v3_hub_yarn_mtp1" && dir.filename() != "v3_fp8_h160") continue;
    SCOPED_TRACE(dir.filename().string());
    const Weights w = Weights::load(dir.string());
    const std::vector<int32_t> ids = fixture_ids(dir);
    std::vector<Request> reqs;
    for (int64_t len : {2, 5, 9, 14}) {
      std::vector<int32_t> p;
      for (int64_t i = 0; i < len; ++i) p.push_back(ids[size_t(i) % ids.size()]);
      reqs.push_back(greedy_request(p, 10));
    }
    for (int64_t chunk : {512, 3}) {
      SCOPED_TRACE(cat("prefill chunk ", chunk));
      EngineOptions opt;
      opt.prefill_chunk = chunk;
      opt.cache.block_size = 4;  // several blocks per sequence, handed out interleaved
      const CpuRef ref = cpu_reference(w, opt, reqs);
      Engine gpu(w, opt, cuda_backend());
      for (const Request& r : reqs) gpu.add(r);
      EXPECT_GE(expect_matches(ref, gpu.run_all(), reqs), 4);
    }
  }
}

// F32 weights take the runner's synchronisation-free path on the device (grouped experts, RoPE
// without the read-back); the fixtures' BF16/FP8 experts take the backend's MoE. The tiny preset
// with random F32 weights: batched prefill (up to 64 rows: several chunks of picks per expert)
// and decode equal the CPU engine, and the backend-ops path on the device. Also without q
// compression (a plain q_proj: kv_a comes from the launch just before the latent kernel, which then
// reads it after its programmatic-launch wait).
TEST(CudaEngine, SyncFreePathEqualsCpuOnRandomTiny) {
  ASSERT_GT(cuda_device_count(), 0);
  ModelConfig no_q_lora = preset_config("tiny");
  no_q_lora.q_lora_rank = std::nullopt;
  for (const ModelConfig& cfg : {preset_config("tiny"), no_q_lora}) {
    SCOPED_TRACE(cfg.q_lora_rank ? "q_lora" : "plain q_proj");
    const Weights w = Weights::random(cfg, 3, 0.05f);
    const std::vector<Request> reqs = hashed_requests({2, 5, 9, 20}, 131);
    EngineOptions opt;
    opt.cache.block_size = 8;
    const CpuRef ref = cpu_reference(w, opt, reqs);
    int64_t fewest[2] = {0, 0};
    for (bool sync_free : {true, false}) {
      SCOPED_TRACE(sync_free ? "sync-free" : "backend ops");
      EngineOptions o = opt;
      o.sync_free = sync_free;
      Engine gpu(w, o, cuda_backend());
      for (const Request& r : reqs) gpu.add(r);
      fewest[sync_free] = expect_matches(ref, gpu.run_all(), reqs);
    }
    EXPECT_GE(fewest[1], 4) << "too many near ties to compare";
    EXPECT_GE(fewest[0], 4) << "too many near ties to compare";
  }
}

// The grouped MoE (the backend's router, grouping, experts, combine, residual) against the
// CPU's moe_forward on one MoE layer of the tiny preset, with a router bias that changes the picks;
// also with V3's routing shape (256 experts, top-8 in 8 groups top-4: the grouping kernel's warps
// then take several experts each and its scan several chunks of 32), at bench-0.7b's expert shape
// (hidden 1024, 32 experts 512 wide: the row-range expert kernels' CTAs take many steps each, their
// parts crossing from one work item to the next) and beside it hidden 1008 with experts 528 wide
// (the down kernel's last step of each item partial, its last k-block too), and at hidden 1152 with experts 2112 wide (the
// tensor-core k-loop kernels). F32, BF16 and FP8 experts (E4M3 with block scales, as V3's release;
// the CPU dequantizes them). Steps of 1, 5, 16, 32 and 40 rows: the engine's batch sizes of 16 and
// 32 (work items of a full kChunk, the shared expert's four) as well as the odd ones.
TEST(CudaEngine, GroupedMoeEqualsCpuMoeForward) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  ModelConfig v3_routing = preset_config("tiny");
  v3_routing.n_routed_experts = 256;
  v3_routing.num_experts_per_tok = 8;
  v3_routing.n_group = 8;
  v3_routing.topk_group = 4;
  v3_routing.num_hidden_layers = 3;
  v3_routing.num_nextn_predict_layers = 0;
  ModelConfig bench_like = preset_config("bench-0.7b");
  bench_like.num_hidden_layers = 3;
  bench_like.num_nextn_predict_layers = 0;
  bench_like.vocab_size = 512;
  ModelConfig partial_steps = bench_like;
  partial_steps.hidden_size = 1008;
  partial_steps.moe_intermediate_size = 528;
  // Hidden 1152 and experts 2112 wide: beyond the row-range expert kernels' k-blocks, the k-loop ones.
  ModelConfig wide = v3_routing;
  wide.hidden_size = 1152;
  wide.moe_intermediate_size = 2112;
  wide.n_routed_experts = 4;
  wide.num_experts_per_tok = 2;
  wide.n_group = 1;
  wide.topk_group = 1;
  for (const ModelConfig& cfg : {preset_config("tiny"), v3_routing, bench_like, partial_steps, wide}) {
    for (DType wt : {DType::F32, DType::BF16, DType::F8_E4M3}) {
      if (cfg.hidden_size >= partial_steps.hidden_size && wt == DType::F32) continue;  // no tensor cores for F32
      SCOPED_TRACE(cat(cfg.n_routed_experts, " experts, hidden ", cfg.hidden_size, ", ", cfg.moe_intermediate_size,
                       " wide, ", dtype_name(wt)));
      Weights host = Weights::random(cfg, 5, 0.05f);
      for (Param& p : host.params())
        if (p.spec.name.find("e_score_correction_bias") != std::string::npos)
          for (int64_t i = 0; i < p.w.numel(); ++i) p.w.data<float>()[i] = 0.02f * rng_normal(6, 0, uint64_t(i));
      if (wt == DType::BF16) round_matrices_to_bf16(host);
      if (wt == DType::F8_E4M3) quantize_matrices_to_fp8(host);  // experts FP8 (the router's gate BF16)
      Weights dev = host;
      for (Param& p : dev.params()) {
        p.w = be.to_device(p.w);
        if (present(p.scale_inv)) p.scale_inv = be.to_device(p.scale_inv);
      }
      const ModelParams ph = bind_params(host), pd = bind_params(dev);
      const ModelDims d = model_dims(host.config());
      const size_t layer = 2;
      ASSERT_TRUE(ph.layers[layer].is_moe && cuda_moe_supported(pd.layers[layer].moe));
      const CudaMoeTables t = cuda_moe_tables(pd.layers[layer].moe);
      EXPECT_TRUE(t.shared);
      EXPECT_EQ(t.wt, wt);
      for (int64_t N : {1, 5, 16, 32, 40})
        // The F32-FMA kernels, and (BF16) the tensor-core ones at every N; FP8 takes the latter always.
        for (int mma : {0, 1}) {
          if (mma && wt != DType::BF16) continue;
          SCOPED_TRACE(cat(N, " rows", mma ? ", tensor cores" : ""));
          const MmaRows setting(mma);
          const Tensor x = randn({N, d.H}, 7, uint64_t(N)), res = randn({N, d.H}, 8, uint64_t(N));
          MoeActs a;
          moe_forward(cpu_backend(), d, ph.layers[layer].moe, x, a);
          Vec want = to_vec(res);
          const Vec moe = to_vec(a.out);
          for (size_t i = 0; i < want.size(); ++i) want[i] += moe[i];
          const Tensor rd = be.to_device(res);
          Guards g(be);  // the output inside guard bytes, NaN-filled: a stray or missed write shows
          const Tensor out = g.out(DType::F32, {N, d.H});
          const Tensor got =
              cuda_moe_forward(be, d, pd.layers[layer].moe, t, be.to_device(x), &rd, N <= 8, nullptr, nullptr, out);
          EXPECT_EQ(got.raw(), out.raw());
          const Err e = compare(be.to_host(got), want);
          EXPECT_LE(e.norm_err, tol::kF32) << "worst " << e.worst;
          EXPECT_EQ(e.non_finite, 0);
          EXPECT_EQ(g.damaged(), "");
        }
    }
  }
}

// The combine kernel's next-block RMSNorm (next_norm) equals the backend's rmsnorm of the same
// output bit for bit, and the output itself is unchanged: a row held 4, 8 and 32 values per thread
// (hidden 128, 1536, 3072), and shared experts of another shape (not fused, so the norm comes from
// the backend after their add).
TEST(CudaEngine, CombineNextNormEqualsBackendRmsNormBitForBit) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  for (int64_t hidden : {128, 1536, 3072})
    for (int64_t shared : {1, 2}) {
      SCOPED_TRACE(cat("hidden ", hidden, ", shared experts ", shared));
      ModelConfig cfg = preset_config("tiny");
      cfg.hidden_size = hidden;
      cfg.n_shared_experts = shared;
      cfg.num_nextn_predict_layers = 0;
      Weights w = Weights::random(cfg, 9, 0.05f);
      round_matrices_to_bf16(w);
      for (Param& p : w.params()) p.w = be.to_device(p.w);
      const ModelParams pd = bind_params(w);
      const ModelDims d = model_dims(w.config());
      const MoeParams& moe = pd.layers[2].moe;
      ASSERT_TRUE(cuda_moe_supported(moe));
      const CudaMoeTables t = cuda_moe_tables(moe);
      EXPECT_EQ(t.shared, shared == 1);
      const int64_t N = 32;
      const Tensor x = be.to_device(randn({N, hidden}, 10, 0)), res = be.to_device(randn({N, hidden}, 10, 1));
      const Tensor norm_w = be.to_device(randn({hidden}, 10, 2));
      Guards g(be);  // both outputs inside guard bytes
      CudaNextNorm nn;
      nn.weight = norm_w;
      nn.eps = d.eps;
      nn.out = g.out(DType::F32, {N, hidden});
      const Tensor fused =
          be.to_host(cuda_moe_forward(be, d, moe, t, x, &res, false, &nn, nullptr, g.out(DType::F32, {N, hidden})));
      EXPECT_EQ(g.damaged(), "");
      const Tensor plain_d = cuda_moe_forward(be, d, moe, t, x, &res, false);
      Tensor rstd;
      const Tensor normed = be.to_host(modops::rmsnorm(be, plain_d, norm_w, d.eps, rstd));
      const Tensor plain = be.to_host(plain_d), got = be.to_host(nn.out);
      ASSERT_EQ(fused.numel(), plain.numel());
      EXPECT_EQ(std::memcmp(fused.raw(), plain.raw(), fused.nbytes()), 0) << "the MoE's output changed";
      EXPECT_EQ(std::memcmp(got.raw(), normed.raw(), got.nbytes()), 0) << "the norm differs from the backend's";
    }
}

// The post-attention norm with the router's GEMV in one launch: h equals the backend's rmsnorm bit
// for bit, the logits h·gateᵀ a double reference under kF32 (hidden 128 / 1000 / 2048: 4 and 8
// values per thread, a partial column stride; F32 and BF16 gates; 1 and 32 rows). A gate above the
// limit is refused.
TEST(CudaEngine, NormRouterEqualsBackendNormAndReference) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  const float eps = 1e-6f;
  for (int64_t H : {128, 1000, 2048})
    for (int64_t E : {8, 64})
      for (DType gt : {DType::F32, DType::BF16})
        for (int64_t N : {1, 32}) {
          SCOPED_TRACE(cat("hidden ", H, ", ", E, " experts, ", dtype_name(gt), " gate, ", N, " rows"));
          const uint64_t salt = uint64_t(H * 1000 + E * 10 + N);
          LinearParam gate;
          gate.w = be.to_device(randn({E, H}, 15, salt).to(gt));
          const Tensor xd = be.to_device(randn({N, H}, 16, salt)), nw = be.to_device(randn({H}, 17, salt));
          ASSERT_TRUE(cuda_norm_router_ok(gate, xd));
          Guards g(be);  // NaN-filled outputs inside guard bytes
          Tensor h = g.out(DType::F32, {N, H}), logits = g.out(DType::F32, {N, E});
          cuda_norm_router(xd, nw, eps, gate, h, logits);
          EXPECT_EQ(g.damaged(), "");
          Tensor rstd;
          const Tensor want_h = be.to_host(modops::rmsnorm(be, xd, nw, eps, rstd)), got_h = be.to_host(h);
          EXPECT_EQ(std::memcmp(got_h.raw(), want_h.raw(), got_h.nbytes()), 0) << "the norm differs from the backend's";
          const Vec want = ref::linear(to_vec(want_h), to_vec(be.to_host(gate.w)), N, E, H);
          const Err err = compare(be.to_host(logits), want);
          EXPECT_LE(err.norm_err, tol::kF32) << "worst " << err.worst;
          EXPECT_EQ(err.non_finite, 0);
        }
  LinearParam big;
  big.w = be.to_device(randn({256, 1024}, 18, 0).to(DType::BF16));
  EXPECT_FALSE(cuda_norm_router_ok(big, be.to_device(randn({2, 1024}, 18, 1))));
}

// The row-range GEMV with several row blocks per CTA (nw / ks > 1): 8,448 outputs at K 128 take
// 8-warp CTAs of four row blocks; the test shapes above all reduce to one row block per CTA.
TEST(CudaEngine, RowRangeGemvWithSeveralRowBlocksPerCtaEqualsReference) {
  ASSERT_GT(cuda_device_count(), 0);
  const MmaRows setting(1);
  LinearParam p;
  p.w = cuda_backend().to_device(randn({8448, 128}, 12, 0).to(DType::BF16));
  expect_small_linear_matches(p, randn({32, 128}, 12, 1), randn({32, 8448}, 12, 2), false);
}

// A GEMV of at least four row steps per SM (an lm_head's) takes up to 32 rows of x in one part
// (cuda_decode_gemv_wide) where others take parts of 16: the same bits with the setting on and off,
// and within kF32 of the reference, BF16 and FP8 weights, 24 and 32 rows. 16,424 rows at K
// 1,024 are one row per warp and step, so 1,027 steps: past the threshold for GPUs of up to 256 SMs,
// the last row block partial.
TEST(CudaEngine, WideGemvInOnePartEqualsTwoPartsAndReference) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  const MmaRows setting(1);
  const bool saved = cuda_decode_gemv_wide();
  const int64_t M = 16424, K = 1024;
  const Tensor w = randn({M, K}, 19, 0);
  auto [q, s] = quantize_fp8_blocks(w);
  LinearParam bf, f8;
  bf.w = be.to_device(w.to(DType::BF16));
  f8.w = be.to_device(q);
  f8.scale_inv = be.to_device(s);
  const Tensor bf_host = be.to_host(bf.w), f8_host = dequantize_fp8_blocks(q, s);
  for (int64_t n : {24, 32})
    for (const auto& [p, host] : {std::pair{&bf, &bf_host}, std::pair{&f8, &f8_host}}) {
      SCOPED_TRACE(cat(n, " rows, ", p == &f8 ? "FP8" : "BF16"));
      const Tensor x = randn({n, K}, 19, uint64_t(n)), y0 = randn({n, M}, 20, uint64_t(n));
      const Tensor xd = be.to_device(x);
      Tensor got[2];
      for (bool wide : {false, true}) {
        cuda_set_decode_gemv_wide(wide);
        got[wide] = be.to_device(y0);
        cuda_small_linear(*p, xd, got[wide], false);
        got[wide] = be.to_host(got[wide]);
      }
      expect_small_linear_matches(*p, *host, x, y0, false);  // with the setting on
      EXPECT_EQ(std::memcmp(got[0].raw(), got[1].raw(), got[0].nbytes()), 0) << "one part and two differ";
    }
  cuda_set_decode_gemv_wide(saved);
}

// K beyond the row-range GEMV's 16 k-blocks at 9–100 rows: two rounds of k-blocks per warp up to
// 32 (K 1,552: the second round's last k-block partial and half the warps without one; 2,048:
// bench-0.7b's o_proj), beyond that slices of 2,048 columns, the later ones adding into y (2,240:
// a two-round slice and a one-round one), also on top of y's contents; beyond 32 rows x in two
// parts along the grid's y. Two rounds in the per-head form too (K 1,040: x's head slice reloaded
// per round).
TEST(CudaEngine, RowRangeGemvInRoundsAndKSlicesEqualsReference) {
  ASSERT_GT(cuda_device_count(), 0);
  const MmaRows setting(1);
  for (int64_t K : {1552, 2048, 2240}) {
    LinearParam p;
    p.w = cuda_backend().to_device(randn({96, K}, 13, uint64_t(K)).to(DType::BF16));
    for (int64_t n : {9, 32, 40, 64, 100})
      for (bool acc : {false, true}) {
        SCOPED_TRACE(cat("K ", K, ", ", n, " rows", acc ? ", accumulating" : ""));
        expect_small_linear_matches(p, randn({n, K}, 13, uint64_t(n)), randn({n, 96}, 14, uint64_t(n)), acc);
      }
  }
  const int64_t nh = 3, K = 1040, head_rows = 32, head_x = K + 8, head_y = 40;
  const Tensor w = randn({nh * head_rows, K}, 15, 0).to(DType::BF16);
  for (int64_t n : {12, 40}) {
    SCOPED_TRACE(cat("heads, K ", K, ", ", n, " rows"));
    expect_heads_gemv_matches(cuda_backend().to_device(w), Tensor(), w.to(DType::F32), nh, head_rows, head_x, head_y,
                              randn({n, nh * head_x}, 16, uint64_t(n)), randn({n, nh * head_y}, 17, uint64_t(n)));
  }
}

// Decode steps of 40 and 100 rows (as many sequences) on the GEMV kernels (x in parts of 32 rows)
// and CUDA graphs (the default device_gemv_rows, 128), BF16 and FP8 weights: every sequence's output
// equals the CPU engine's, as with the limit at 32, where those steps take the backend's linears
// and run eagerly.
TEST(CudaEngine, DecodeStepsOfMoreThan32RowsEqualCpu) {
  ASSERT_GT(cuda_device_count(), 0);
  for (int64_t seqs : {40, 100}) {
    std::vector<int64_t> lengths;
    for (int64_t i = 0; i < seqs; ++i) lengths.push_back(1 + (i * 7) % 13);
    const std::vector<Request> reqs = hashed_requests(lengths, 523 + uint64_t(seqs));
    for (DType wt : {DType::BF16, DType::F8_E4M3}) {
      Weights w = Weights::random(preset_config("tiny"), 21, 0.05f);
      wt == DType::BF16 ? round_matrices_to_bf16(w) : quantize_matrices_to_fp8(w);
      EngineOptions opt;
      opt.cache.block_size = 8;
      opt.max_running = seqs;
      const CpuRef ref = cpu_reference(w, opt, reqs);
      for (int64_t rows : {ModelRunner::kDeviceGemvMaxRows, int64_t(32)}) {
        SCOPED_TRACE(cat(seqs, " sequences, ", dtype_name(wt), " weights, GEMV kernels up to ", rows, " rows"));
        EngineOptions o = opt;
        o.device_gemv_rows = rows;
        Engine gpu(w, o, cuda_backend());
        for (const Request& r : reqs) gpu.add(r);
        int64_t total = 0;
        expect_matches(ref, gpu.run_all(), reqs, &total);
        EXPECT_GE(total, seqs * 12 / 2) << "too many near ties to compare";
        const ModelRunner::GraphStats g = gpu.runner().graph_stats();
        EXPECT_TRUE(g.error.empty()) << g.error;
        if (rows > 32)
          EXPECT_GE(g.replays, 8);  // 11 decode steps of every sequence: one eager, one captured, the rest replayed
        else
          EXPECT_EQ(g.replays + g.captures, 0);
      }
    }
  }
}

// The GPU engine's greedy tokens on w equal the CPU engine's with the same weights, for each
// tensor-core threshold given (batch 1 to 20 rows per step: chunked prefill and batched decode).
void weights_equal_cpu(const Weights& w, uint64_t salt, std::initializer_list<int> mma_rows) {
  const std::vector<Request> reqs = hashed_requests({3, 7, 16}, salt);
  EngineOptions opt;
  opt.cache.block_size = 8;
  const CpuRef ref = cpu_reference(w, opt, reqs);
  for (int mma : mma_rows) {
    SCOPED_TRACE(cat("tensor cores from ", mma, " rows"));
    const MmaRows setting(mma);
    Engine gpu(w, opt, cuda_backend());
    for (const Request& r : reqs) gpu.add(r);
    EXPECT_GE(expect_matches(ref, gpu.run_all(), reqs), 4) << "too many near ties to compare";
  }
}

// A BF16 checkpoint's matrices: the device's GEMV and grouped experts read BF16 and compute in F32,
// as the CPU engine does with the same weights; by default, on tensor cores for every step, without.
TEST(CudaEngine, Bf16WeightsEqualCpu) {
  ASSERT_GT(cuda_device_count(), 0);
  Weights w = Weights::random(preset_config("tiny"), 4, 0.05f);
  round_matrices_to_bf16(w);
  weights_equal_cpu(w, 977, {cuda_decode_mma_rows(), 1, 0});
}

// An FP8 checkpoint's matrices (E4M3, 128×128 block scales): the device's GEMV and grouped experts
// widen them on tensor cores at every row count (whatever the threshold), the CPU dequantizes them.
TEST(CudaEngine, Fp8WeightsEqualCpu) {
  ASSERT_GT(cuda_device_count(), 0);
  Weights w = Weights::random(preset_config("tiny"), 14, 0.05f);
  quantize_matrices_to_fp8(w);
  weights_equal_cpu(w, 991, {cuda_decode_mma_rows(), 0});
}

// Every main-model logits row the GPU engine produces for reqs, by (sequence, position).
std::map<std::pair<int64_t, int64_t>, std::vector<float>> gpu_logits_by_row(const Weights& w, const EngineOptions& opt,
                                                                            const std::vector<Request>& reqs) {
  Engine gpu(w, opt, cuda_backend());
  std::map<std::pair<int64_t, int64_t>, std::vector<float>> rows;
  gpu.on_logits = [&](int64_t id, int64_t pos, std::span<const float> l) { rows[{id, pos}].assign(l.begin(), l.end()); };
  for (const Request& r : reqs) gpu.add(r);
  gpu.run_all();
  return rows;
}

// Programmatic dependent launch changes no bit: the decode kernels read what was written two or
// more launches back before their wait (pdl.cuh), so a wrong "older" assumption is a race that
// shows up as logits that differ from a run with PDL off. Every logits row of the sync-free engine,
// F32, BF16 and FP8 weights with q compression and F32 without, PDL on twice and off once.
TEST(CudaEngine, ProgrammaticLaunchChangesNoBits) {
  ASSERT_GT(cuda_device_count(), 0);
  struct PdlScope {  // the setting the process started with (DSV3_CUDA_PDL) comes back
    bool was = cuda_set_pdl(true);
    ~PdlScope() { cuda_set_pdl(was); }
  } restore;
  ModelConfig no_q_lora = preset_config("tiny");
  no_q_lora.q_lora_rank = std::nullopt;
  const std::vector<Request> reqs = hashed_requests({1, 3, 17}, 613);
  for (const ModelConfig& cfg : {preset_config("tiny"), no_q_lora})
    for (int wt : {0, 1, 2}) {
      if (!cfg.q_lora_rank && wt != 0) continue;
      SCOPED_TRACE(cat(cfg.q_lora_rank ? "q_lora" : "plain q_proj", wt == 0 ? ", F32" : wt == 1 ? ", BF16" : ", FP8",
                       " weights"));
      Weights w = Weights::random(cfg, 29, 0.05f);
      if (wt == 1) round_matrices_to_bf16(w);
      if (wt == 2) quantize_matrices_to_fp8(w);
      auto logits_of = [&](bool pdl) {
        cuda_set_pdl(pdl);
        EngineOptions opt;
        opt.cache.block_size = 8;
        return gpu_logits_by_row(w, opt, reqs);
      };
      const auto on = logits_of(true), again = logits_of(true), off = logits_of(false);
      ASSERT_FALSE(on.empty());
      for (const auto* other : {&again, &off}) {
        ASSERT_EQ(other->size(), on.size());
        for (const auto& [key, row] : on) {
          const auto it = other->find(key);
          ASSERT_TRUE(it != other->end()) << "sequence " << key.first << " position " << key.second;
          ASSERT_EQ(it->second.size(), row.size());
          EXPECT_EQ(std::memcmp(it->second.data(), row.data(), row.size() * sizeof(float)), 0)
              << (other == &off ? "PDL off" : "second PDL run") << " differs at sequence " << key.first
              << " position " << key.second;
        }
      }
    }
}

// cuda_kv_latent forked beside the W_UK GEMV (two graph branches) runs the same kernels on the same
// inputs: one request's one-row decode steps, captured or eager, with and without an MTP draft (its
// verification steps have two rows and keep the chain), give the bits of the chain.
TEST(CudaEngine, KvLatentBesideChangesNoBits) {
  ASSERT_GT(cuda_device_count(), 0);
  struct BesideScope {  // the setting the process started with (DSV3_DECODE_BESIDE) comes back
    bool was = cuda_decode_beside();
    ~BesideScope() { cuda_set_decode_beside(was); }
  } restore;
  const std::vector<Request> reqs = hashed_requests({9}, 619);
  for (int wt : {0, 1}) {
    SCOPED_TRACE(wt == 0 ? "F32 weights" : "BF16 weights");
    Weights w = Weights::random(preset_config("tiny"), 31, 0.05f);
    if (wt == 1) round_matrices_to_bf16(w);
    auto logits_of = [&](bool beside, bool graphs, int drafts) {
      cuda_set_decode_beside(beside);
      const int64_t forks = cuda_decode_beside_forks();
      EngineOptions opt;
      opt.cache.block_size = 8;
      opt.cuda_graphs = graphs;
      opt.draft_tokens = drafts;
      const auto rows = gpu_logits_by_row(w, opt, reqs);
      const bool forked = cuda_decode_beside_forks() > forks;
      if (!beside) {
        EXPECT_FALSE(forked);
      } else if (drafts == 0) {
        EXPECT_TRUE(forked) << "graphs " << graphs;
      }
      return rows;
    };
    for (int drafts : {0, 1}) {
      SCOPED_TRACE(cat(drafts, " MTP drafts"));
      const auto off = logits_of(false, true, drafts);
      ASSERT_FALSE(off.empty());
      for (bool graphs : {true, false}) {
        const auto on = logits_of(true, graphs, drafts);
        ASSERT_EQ(on.size(), off.size());
        for (const auto& [key, row] : off) {
          const auto it = on.find(key);
          ASSERT_TRUE(it != on.end()) << "sequence " << key.first << " position " << key.second;
          ASSERT_EQ(it->second.size(), row.size());
          EXPECT_EQ(std::memcmp(it->second.data(), row.data(), row.size() * sizeof(float)), 0)
              << "beside (graphs " << graphs << ") differs at sequence " << key.first << " position " << key.second;
        }
      }
    }
  }
}

// ---- the device cache's attention against the host's -----------------------------------------

struct AttnShape {
  ModelDims d;
  int64_t layers, block_size;
};

// Bf16: W_UK and W_UV hold BF16 values (as a BF16 checkpoint's kv_b_proj), which the device keeps in
// BF16 for its GEMV and, beyond the GEMV's rows, its split tensor-core matmuls. Fp8: they come from
// an FP8 kv_b_proj (split_kv_b), whose blocks the device's GEMV reads (cuBLAS the F32 split beyond).
enum class AbsorbedForm { F32, Bf16, Fp8 };
void attention_against_host(const ModelDims& d, int64_t layers, int64_t bs, bool mla_decode,
                            AbsorbedForm form = AbsorbedForm::F32) {
  CudaBackend& be = cuda_backend();
  KvCacheOptions o;
  o.block_size = bs;
  o.dtype = DType::BF16;
  o.budget_bytes = uint64_t(d.kv_lora + d.rope) * uint64_t(layers) * 2 * uint64_t(bs) * 16;
  LatentKvPool hp(layers, d.kv_lora, d.rope, o);
  o.host_storage = false;
  LatentKvPool dp(layers, d.kv_lora, d.rope, o);
  std::vector<AbsorbedKvB> wh, wd;
  for (int64_t l = 0; l < layers; ++l) {
    AbsorbedKvB a;
    a.w_uk = randn({d.nh, d.nope, d.kv_lora}, 11, uint64_t(2 * l), float(1.0 / std::sqrt(double(d.nope))));
    a.w_uv = randn({d.nh, d.vd, d.kv_lora}, 11, uint64_t(2 * l + 1), 0.05f);
    if (form == AbsorbedForm::Bf16) {
      a.w_uk = a.w_uk.to(DType::BF16).to(DType::F32);
      a.w_uv = a.w_uv.to(DType::BF16).to(DType::F32);
    }
    if (form == AbsorbedForm::Fp8) {  // kv_b_proj's rows per head: W_UK's, then W_UV's
      Tensor kv_b = Tensor::empty(DType::F32, {d.nh * (d.nope + d.vd), d.kv_lora});
      const size_t uk = size_t(d.nope * d.kv_lora), uv = size_t(d.vd * d.kv_lora);
      for (int64_t h = 0; h < d.nh; ++h) {
        float* dst = kv_b.data<float>() + size_t(h) * (uk + uv);
        std::copy_n(a.w_uk.data<float>() + size_t(h) * uk, uk, dst);
        std::copy_n(a.w_uv.data<float>() + size_t(h) * uv, uv, dst + uk);
      }
      LinearParam p;
      std::tie(p.w, p.scale_inv) = quantize_fp8_blocks(kv_b);
      a = split_kv_b(p, d, true);
      ASSERT_TRUE(present(a.uk_t_fp8.w));
    }
    wh.push_back(a);
    AbsorbedKvB dv = a;
    for (Tensor* t : {&dv.w_uk, &dv.w_uv, &dv.uk_t_fp8.w, &dv.uk_t_fp8.scale_inv, &dv.uv_fp8.w, &dv.uv_fp8.scale_inv})
      if (present(*t)) *t = be.to_device(*t);
    wd.push_back(dv);
  }
  LatentAttention host(hp, wh, d);
  CudaLatentAttention dev(dp, wd, d);
  dev.set_use_mla_decode(mla_decode);
  ASSERT_EQ(dev.uses_mla_decode(), mla_decode);
  const std::vector<int64_t> lens = {5, 2 * bs + 6, 3 * bs + 2};
  std::vector<BlockTable> th(3), td(3);
  // Interleaved reservations: sequences own scattered blocks.
  for (int64_t upto = 1; upto <= 8; ++upto)
    for (size_t s = 0; s < 3; ++s) {
      const int64_t want = std::min(lens[s] + 4, upto * bs);
      ASSERT_TRUE(hp.reserve(th[s], want));
      ASSERT_TRUE(dp.reserve(td[s], want));
    }
  for (size_t s = 0; s < 3; ++s) {
    host.tables.push_back(&th[s]);
    dev.tables.push_back(&td[s]);
  }
  MlaParams unused;
  auto step = [&](const StepRows& rows, uint64_t seed) {
    const int64_t N = rows.size();
    for (int64_t layer = 0; layer < layers; ++layer) {
      SCOPED_TRACE(cat("layer ", layer, ", ", N, " rows"));
      const Tensor q = randn({N, d.nh, d.qk}, seed, uint64_t(3 * layer));
      const Tensor c = randn({N, d.kv_lora}, seed, uint64_t(3 * layer + 1));
      const Tensor k = randn({N, d.rope}, seed, uint64_t(3 * layer + 2));
      Tensor out_h = Tensor::empty(DType::F32, {N, d.nh * d.vd});
      host.attend(layer, unused, rows, q, c, k, out_h);
      Tensor out_d = be.alloc(DType::F32, {N, d.nh * d.vd});
      dev.attend(layer, unused, rows, be.to_device(q), be.to_device(c), be.to_device(k), out_d);
      const Err e = compare(be.to_host(out_d), to_vec(out_h));
      EXPECT_EQ(e.non_finite, 0);
      EXPECT_LE(e.norm_err, tol::kBf16) << "worst element " << e.worst;
    }
  };
  // Prefill of every sequence in one step, then a mixed step: a decode row, three consecutive rows
  // (a chunk or a verification), a decode row at a block boundary.
  StepRows pre;
  for (size_t s = 0; s < 3; ++s)
    for (int64_t p = 0; p < lens[s]; ++p) {
      pre.seq.push_back(int32_t(s));
      pre.pos.push_back(p);
    }
  step(pre, 1);
  StepRows mixed;
  mixed.seq = {0, 1, 1, 1, 2};
  mixed.pos = {lens[0], lens[1], lens[1] + 1, lens[1] + 2, lens[2]};
  step(mixed, 2);
  EXPECT_EQ(dev.uploads(), 2);  // once per step, every layer reuses it
}

TEST(CudaEngine, DeviceCacheAttentionEqualsHostV3ShapeMlaDecode) {
  ASSERT_GT(cuda_device_count(), 0);
  attention_against_host(dims(16, 128, 64, 128, 512), 2, 64, true);
}

TEST(CudaEngine, DeviceCacheAttentionEqualsHostV3ShapeGeneric) {
  ASSERT_GT(cuda_device_count(), 0);
  attention_against_host(dims(16, 128, 64, 128, 512), 2, 64, false);
}

// The prefill step (333 rows) beyond the GEMV's 128 takes the split BF16 matmuls for W_UK and W_UV.
TEST(CudaEngine, DeviceCacheAttentionEqualsHostBf16AbsorbedWeights) {
  ASSERT_GT(cuda_device_count(), 0);
  // V3's heads on the generic kernel, then bench-0.7b's latent.
  attention_against_host(dims(16, 128, 64, 128, 512), 2, 64, false, AbsorbedForm::Bf16);
  attention_against_host(dims(16, 128, 64, 128, 256), 2, 64, false, AbsorbedForm::Bf16);
}

// W_UK / W_UV from an FP8 kv_b_proj at V3's head sizes: the decode GEMV reads its FP8 blocks.
TEST(CudaEngine, DeviceCacheAttentionEqualsHostFp8AbsorbedWeights) {
  ASSERT_GT(cuda_device_count(), 0);
  // V3's shape through cuda_mla_decode, then bench-0.7b's latent.
  attention_against_host(dims(16, 128, 64, 128, 512), 2, 64, true, AbsorbedForm::Fp8);
  attention_against_host(dims(16, 128, 64, 128, 256), 2, 64, false, AbsorbedForm::Fp8);
}

TEST(CudaEngine, DeviceCacheAttentionEqualsHostSmallShapes) {
  ASSERT_GT(cuda_device_count(), 0);
  attention_against_host(dims(4, 12, 8, 12, 24), 3, 4, false);   // fixture-sized, 4-token blocks
  attention_against_host(dims(16, 128, 64, 128, 256), 1, 64, false);  // bench-0.7b's latent
  attention_against_host(dims(5, 16, 16, 32, 70), 2, 16, false);  // 5 heads; rows of 86 (no 16-byte loads)
}

// The small-row GEMV (decode's linears) against a double reference: F32 and BF16 weights, vector and
// scalar paths, one and two weight rows per warp, 1 to 100 rows of x (chunks of 8), plain and
// accumulating; BF16 weights also on the tensor-core path (x in two BF16 terms, same kF32 bound:
// cuda_decode_mma.cuh), K with a partial 64-column block (136), outputs not a multiple of 16.
TEST(CudaEngine, SmallLinearEqualsReference) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  for (DType wt : {DType::F32, DType::BF16})
    for (int64_t K : {44, 45, 136, 1024, 2816})
      for (int64_t n : {1, 3, 8, 19, 32, 64, 100})
        for (int64_t M : {37, 38})
          for (bool acc : {false, true})
            for (int mma : {0, 1}) {
              if (wt == DType::BF16 && K % 8 != 0) continue;  // BF16 rows must be whole 16-byte vectors
              if (mma && wt != DType::BF16) continue;  // the tensor-core path reads BF16 only
              SCOPED_TRACE(cat(dtype_name(wt), " K ", K, " rows ", n, " outputs ", M, acc ? " accumulate" : "",
                               mma ? " tensor cores" : ""));
              const MmaRows setting(mma);
              LinearParam p;
              p.w = be.to_device(randn({M, K}, 7, uint64_t(K)).to(wt));
              const Tensor w = be.to_host(p.w), x = randn({n, K}, 8, uint64_t(n)), y0 = randn({n, M}, 9, 0);
              Vec want(size_t(n * M));
              for (int64_t r = 0; r < n; ++r)
                for (int64_t j = 0; j < M; ++j) {
                  double s = acc ? double(y0.data<float>()[r * M + j]) : 0.0;
                  for (int64_t k = 0; k < K; ++k)
                    s += double(x.data<float>()[r * K + k]) * double(load_as_float(w.raw(), wt, j * K + k));
                  want[size_t(r * M + j)] = s;
                }
              Guards g(be);
              const Tensor xd = be.to_device(x), yd = g.init(y0);
              ASSERT_TRUE(cuda_small_linear_ok(p, xd));
              cuda_small_linear(p, xd, yd, acc);
              EXPECT_LE(compare(be.to_host(yd), want).norm_err, tol::kF32);
              EXPECT_EQ(g.damaged(), "");
            }
}

// With the RMSNorm inside and a second weight in the same launch (q_a and kv_a over input_layernorm):
// F32 and BF16 weights, one row of x (the one-row kernel) and several (chunks of 8), K on the
// scalar path (66), in one staging pass (the norm's sums from shared memory: 64, 1024) and in
// several (2816: the sums from global memory first); odd and even outputs (one and two weight rows
// per warp); the norm weight in F32, in BF16, and in BF16 2 bytes off the 16-byte grid.
TEST(CudaEngine, SmallLinearNormAndPairEqualsReference) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  for (DType wt : {DType::F32, DType::BF16})
    for (int64_t K : {64, 66, 1024, 2816})
      for (int64_t n : {1, 3, 9})
        for (int64_t M : {29, 30})
          for (int gv : {0, 1, 2}) {
            if (wt == DType::BF16 && K % 8 != 0) continue;  // BF16 rows must be whole 16-byte vectors
            SCOPED_TRACE(cat(dtype_name(wt), " K ", K, " rows ", n, " outputs ", M, " norm weight ",
                             gv == 0 ? "F32" : gv == 1 ? "BF16" : "BF16 unaligned"));
            const int64_t M2 = M - 16;
            const float eps = 1e-6f;
            LinearParam p, p2;
            p.w = be.to_device(randn({M, K}, 21, 0).to(wt));
            p2.w = be.to_device(randn({M2, K}, 21, 1).to(wt));
            const Tensor x = randn({n, K}, 21, 3, 3.0f);
            // gh: the norm weight's values on the host; gd: on the device (with gv 2 one element into
            // a longer buffer, so 2 bytes off the 16-byte grid).
            const Tensor gh = gv == 0 ? randn({K}, 21, 2) : randn({K}, 21, 2).to(DType::BF16);
            Tensor gd = be.to_device(gh);
            if (gv == 2) {
              Tensor pad = Tensor::zeros(DType::BF16, {K + 1});
              std::memcpy(static_cast<char*>(pad.raw()) + 2, gh.raw(), gh.nbytes());
              Tensor buf = be.to_device(pad);
              gd = Tensor::borrow(static_cast<char*>(buf.raw()) + 2, DType::BF16, {K},
                                  std::shared_ptr<void>(buf.raw(), [buf](void*) {}), Device::CUDA);
            }
            const Tensor w = be.to_host(p.w), w2 = be.to_host(p2.w);
            Vec want(size_t(n * M)), want2(size_t(n * M2));
            for (int64_t r = 0; r < n; ++r) {
              double ss = 0;
              for (int64_t k = 0; k < K; ++k) ss += double(x.data<float>()[r * K + k]) * x.data<float>()[r * K + k];
              const double rs = 1.0 / std::sqrt(ss / double(K) + eps);
              auto dot = [&](const Tensor& wm, int64_t j) {
                double s = 0;
                for (int64_t k = 0; k < K; ++k)
                  s += double(load_as_float(wm.raw(), wt, j * K + k)) * double(load_as_float(gh.raw(), gh.dtype(), k)) *
                       double(x.data<float>()[r * K + k]) * rs;
                return s;
              };
              for (int64_t j = 0; j < M; ++j) want[size_t(r * M + j)] = dot(w, j);
              for (int64_t j = 0; j < M2; ++j) want2[size_t(r * M2 + j)] = dot(w2, j);
            }
            const Tensor xd = be.to_device(x);
            Guards guards(be);  // NaN-filled outputs inside guard bytes: a missed or stray write shows up
            Tensor y = guards.out(DType::F32, {n, M}), y2 = guards.out(DType::F32, {n, M2});
            ASSERT_TRUE(cuda_small_linear_ok(p, xd) && cuda_small_linear_fuses_norm(p));
            cuda_small_linear(p, xd, y, false, &gd, eps, &p2, &y2);
            const Err e = compare(be.to_host(y), want), e2 = compare(be.to_host(y2), want2);
            EXPECT_LE(e.norm_err, tol::kF32);
            EXPECT_LE(e2.norm_err, tol::kF32);
            EXPECT_EQ(e.non_finite + e2.non_finite, 0);
            EXPECT_EQ(guards.damaged(), "");
          }
}

// x split into two BF16 terms (split_bf16x2) keeps an infinite x infinite, as F32 arithmetic does:
// a row of x with one +Inf times positive weights gives +Inf in every output of that row (the lo
// term Inf − Inf would make it NaN), the other rows stay finite. The decode GEMV on tensor cores,
// the backend's linear (prefill) and grouped_linear, each into an output first filled with NaN.
TEST(CudaEngine, SplitTermsKeepAnInfiniteInputInfinite) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  const int64_t K = 256, M = 48, bad = 1;
  Tensor wh = randn({M, K}, 31, 0);
  for (int64_t i = 0; i < wh.numel(); ++i) wh.data<float>()[i] = std::fabs(wh.data<float>()[i]) + 0.01f;
  LinearParam p;
  p.w = be.to_device(wh.to(DType::BF16));
  auto check = [&](const Tensor& y, int64_t rows, const char* what) {
    SCOPED_TRACE(what);
    const Tensor h = be.to_host(y);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < M; ++j) {
        const float v = h.data<float>()[r * M + j];
        if (r == bad)
          ASSERT_TRUE(std::isinf(v) && v > 0) << "row " << r << " col " << j << ": " << v;
        else
          ASSERT_TRUE(std::isfinite(v)) << "row " << r << " col " << j << ": " << v;
      }
  };
  for (int64_t n : {4, 300}) {
    Tensor x = randn({n, K}, 31, 1);
    x.data<float>()[bad * K + 5] = INFINITY;
    const Tensor xd = be.to_device(x);
    Tensor y = be.alloc(DType::F32, {n, M});
    if (n <= 64) {
      const MmaRows setting(1);
      ASSERT_TRUE(cuda_small_linear_ok(p, xd));
      be.fill({y, NAN});
      cuda_small_linear(p, xd, y, false);
      check(y, n, "decode GEMV");
    }
    be.fill({y, NAN});
    be.linear({xd, p.w, Tensor(), y, false});
    check(y, n, "linear");
    const std::vector<Tensor> ws = {p.w, p.w};
    const std::vector<int64_t> off = {0, 2, n};
    be.fill({y, NAN});
    be.grouped_linear({xd, ws, {}, off, y, false});
    check(y, n, "grouped_linear");
  }
}

// The per-head GEMV (the absorbed W_UK / W_UV products) with BF16 weights on both paths: output row
// (h, i) reads x's head-h slice and writes y[q, h·head_y + i]; the columns between heads' outputs
// stay untouched. Also a second weight in the same launch without the norm (q_a with kv_a).
TEST(CudaEngine, RowsGemvHeadsAndPairEqualReference) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  const int64_t nh = 3, K = 128, head_rows = 32, head_x = 144, head_y = 40;
  const Tensor w = randn({nh * head_rows, K}, 31, 0).to(DType::BF16), wd = be.to_device(w);
  for (int64_t n : {1, 8, 32, 64})
    for (int mma : {0, 1}) {
      SCOPED_TRACE(cat(n, " rows", mma ? ", tensor cores" : ""));
      const MmaRows setting(mma);
      expect_heads_gemv_matches(wd, Tensor(), w.to(DType::F32), nh, head_rows, head_x, head_y,
                                randn({n, nh * head_x}, 32, uint64_t(n)), randn({n, nh * head_y}, 33, uint64_t(n)));

      const int64_t M = 48, M2 = 20;
      Guards guards(be);  // outputs inside guard bytes: a write past them shows up
      LinearParam p, p2;
      p.w = be.to_device(randn({M, K}, 34, 0).to(DType::BF16));
      p2.w = be.to_device(randn({M2, K}, 34, 1).to(DType::BF16));
      const Tensor xp = randn({n, K}, 35, uint64_t(n)), wh = be.to_host(p.w), wh2 = be.to_host(p2.w);
      Vec want1(size_t(n * M)), want2(size_t(n * M2));
      for (int64_t q = 0; q < n; ++q) {
        auto dot = [&](const Tensor& wt, int64_t j) {
          double s = 0;
          for (int64_t k = 0; k < K; ++k)
            s += double(load_as_float(wt.raw(), DType::BF16, j * K + k)) * double(xp.data<float>()[q * K + k]);
          return s;
        };
        for (int64_t j = 0; j < M; ++j) want1[size_t(q * M + j)] = dot(wh, j);
        for (int64_t j = 0; j < M2; ++j) want2[size_t(q * M2 + j)] = dot(wh2, j);
      }
      Tensor y1 = guards.out(DType::F32, {n, M}), y2 = guards.out(DType::F32, {n, M2});
      cuda_small_linear(p, be.to_device(xp), y1, false, nullptr, 0.0f, &p2, &y2);
      const Err e1 = compare(be.to_host(y1), want1), e2 = compare(be.to_host(y2), want2);
      EXPECT_LE(e1.norm_err, tol::kF32);
      EXPECT_LE(e2.norm_err, tol::kF32);
      EXPECT_EQ(e1.non_finite + e2.non_finite, 0);
      EXPECT_EQ(guards.damaged(), "");
    }
}

TEST(CudaEngine, GreedyTokensMatchHostArgmax) {
  ASSERT_GT(cuda_device_count(), 0);
  // Ties (lowest id wins) and a row whose maximum lies past n_valid. NaN as the host scan sees it:
  // never taken past id 0 (row 3: in the first value of the thread that also reads the maximum,
  // id 1029 = 5 + 1024), kept at id 0 (row 4), and a row of NaN (row 5) giving id 0.
  Tensor l = randn({6, 5000}, 5, 0);
  float* p = l.data<float>();
  p[17] = p[4000] = 50.0f;
  p[5000 + 4990] = 60.0f;
  p[5000 + 12] = 40.0f;
  p[10000 + 4999] = 70.0f;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  p[15000 + 5] = nan;
  p[15000 + 1029] = 80.0f;
  p[20000] = nan;
  p[20000 + 3] = 90.0f;
  std::fill(p + 25000, p + 30000, nan);
  const std::vector<int32_t> got = cuda_greedy_tokens(cuda_backend().to_device(l), 4990);
  for (int64_t r = 0; r < 6; ++r) {
    std::span<const float> row(p + r * 5000, 5000);
    EXPECT_EQ(got[size_t(r)], greedy_token(row, 4990, {}, 1.0f)) << "row " << r;
  }
  EXPECT_EQ(got[0], 17);
  EXPECT_EQ(got[3], 1029);
  EXPECT_EQ(got[4], 0);
  EXPECT_EQ(got[5], 0);
}

}  // namespace
}  // namespace dsv3::test
