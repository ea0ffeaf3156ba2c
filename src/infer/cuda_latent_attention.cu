#include "infer/cuda_latent_attention.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>

#include "backend/cuda/common.cuh"
#include "backend/cuda/graph.h"
#include "backend/cuda/lt_gemm.h"
#include "backend/cuda/mla_decode.h"
#include "backend/cuda/pdl.cuh"
#include "infer/cuda_decode_ops.h"
#include "infer/cuda_latent_attn_kernel.cuh"
#include "infer/cuda_latent_prefill.h"

namespace dsv3 {
using namespace cuda;
using namespace cuda::latent;

namespace {

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Row r of the step → its pool slot in `layer`: c_kv_n ‖ k_pe rounded to BF16.
__global__ void write_rows_kernel(const float* c, const float* kpe, const int32_t* meta, int n, int64_t R,
                                  int64_t P, int64_t layers, int64_t bs, int64_t layer, __nv_bfloat16* pool) {
  const int r = blockIdx.x;
  const int64_t W = R + P, blk = meta[n + r], slot = meta[2 * n + r];
  __nv_bfloat16* dst = pool + ((blk * layers + layer) * bs + slot) * W;
  for (int64_t i = threadIdx.x; i < W; i += blockDim.x)
    dst[i] = __float2bfloat16_rn(i < R ? c[r * R + i] : kpe[r * P + (i - R)]);
}

// qcat[r, h, R:] = q_pe[r, h] (the latent part comes from the batched GEMM).
__global__ void copy_qpe_kernel(const float* q, int64_t qk, int64_t nope, int64_t P, int64_t W, int64_t R,
                                int64_t rows_heads, float* qcat) {
  const int64_t total = rows_heads * P;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t rh = i / P, j = i % P;
    qcat[rh * W + R + j] = q[rh * qk + nope + j];
  }
}

size_t attention_smem(int W, int R, bool cluster, bool mma) {
  return size_t(attn_smem_floats(W, R, cluster, mma)) * sizeof(float);
}

// The kernel instance for a latent width R and row width W.
using AttnKernel = void (*)(AttnArgs);
AttnKernel attn_kernel(int64_t R, int64_t W, bool mma) {
  if (mma) return latent_attn_kernel<1, 5, true>;
  if (R <= 256 && W <= 320) return latent_attn_kernel<1, 5, false>;
  return latent_attn_kernel<2, 9, false>;
}
// Shapes the tensor-core path takes (its tiles: 16-column k-steps, 8-column output tiles; q as float4).
bool mma_shape(const ModelDims& d) {
  const int64_t W = d.kv_lora + d.rope;
  return d.kv_lora <= 256 && d.kv_lora % 8 == 0 && W <= 320 && W % 16 == 0 && d.qk % 4 == 0 && d.nope % 4 == 0;
}
bool& mma_setting() {
  static bool on = [] {
    const char* e = std::getenv("DSV3_LATENT_ATTN_MMA");
    return !(e && std::string(e) == "0");
  }();
  return on;
}
std::atomic<int64_t> g_mma_launches{0};
int64_t g_absorbed_gemv_rows = kCudaGemvMaxRows;

// Whether every value of an F32 host tensor is a BF16 value (a slice of a BF16 kv_b_proj is).
bool bf16_exact(const Tensor& t) {
  const float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i)
    if (float(__float2bfloat16_rn(p[i])) != p[i]) return false;
  return true;
}

// Whether the decode GEMV takes kv_b's FP8 blocks for W_UK / W_UV (split_kv_b kept them): x rows and
// heads `x_stride` floats apart load as 16-byte vectors.
bool fp8_gemv(const LinearParam& p, int64_t x_stride) { return cuda_decode_fp8_ok(p) && x_stride % 4 == 0; }

// y[r, h] = W[h]·x[r, h] for `heads` heads (x[r, h] the k values at (r·heads + h)·stride; y at row
// stride ldy, head stride hy; W BF16 [heads, n, k]) on tensor cores: x split into two BF16 terms,
// then two strided-batched matmuls over the heads, the second adding its product into y (y = W·hi +
// W·lo, the kF32 class of linear's split path). Replaces an F32 SGEMM on steps beyond the GEMV's
// rows (a prefill): bench-0.7b's W_UK and W_UV took 3.4 of its 25 ms of kernels.
void head_linear_split(const float* x, int64_t rows, int64_t heads, int64_t k, int64_t stride, const void* w,
                       int64_t n, float* y, int64_t ldy, int64_t hy) {
  Scratch terms(size_t(2 * rows * heads * k) * sizeof(__nv_bfloat16));
  __nv_bfloat16* hi = terms.as<__nv_bfloat16>();
  __nv_bfloat16* lo = hi + rows * heads * k;
  f32_split_bf16(x, rows * heads, k, stride, hi, lo);
  for (int t = 0; t < 2; ++t) {
    LtMatmul g = lt_row_major(false, true, rows, n, k, t ? lo : hi, heads * k, w, k, y, ldy, t == 1);
    g.batch = heads;
    g.stride_a = n * k;  // cuBLASLt's A is W
    g.stride_b = k;
    g.stride_c = hy;
    lt_matmul(g);
  }
}

}  // namespace

void cuda_set_absorbed_gemv_rows(int64_t rows) { g_absorbed_gemv_rows = std::clamp<int64_t>(rows, 0, kCudaGemvMaxRows); }
int64_t cuda_absorbed_gemv_rows() { return g_absorbed_gemv_rows; }
void cuda_set_latent_attention_mma(bool on) { mma_setting() = on; }
bool cuda_latent_attention_mma() { return mma_setting(); }
int64_t cuda_latent_attention_mma_launches() { return g_mma_launches; }

CudaLatentAttention::CudaLatentAttention(const LatentKvPool& pool, const std::vector<AbsorbedKvB>& absorbed,
                                         const ModelDims& d)
    : pool_(pool), absorbed_(absorbed), d_(d) {
  static std::atomic<int64_t> serials{0};
  serial_ = ++serials;
  DSV3_CHECK(!pool.host_storage() && pool.dtype() == DType::BF16,
             "CudaLatentAttention needs a BF16 pool built with host_storage = false");
  DSV3_CHECK(d.kv_lora == pool.kv_lora_rank() && d.rope == pool.rope_dim(), "cache shape");
  if (d.kv_lora > kMaxColumns)
    input_error("the CUDA latent cache supports kv_lora_rank up to ", kMaxColumns, ", the model has ", d.kv_lora);
  const size_t smem = attention_smem(int(pool.row_width()), int(d.kv_lora), true, false);
  if (smem > 227 * 1024)
    input_error("the CUDA latent cache supports rows up to ~1300 values (kv_lora_rank + qk_rope_head_dim), the "
                "model has ", pool.row_width());
  for (const AbsorbedKvB& a : absorbed) {
    DSV3_CHECK(a.w_uk.device() == Device::CUDA && a.w_uv.device() == Device::CUDA,
               "absorbed kv_b_proj must live on the device");
    const bool f8 = fp8_gemv(a.uk_t_fp8, d.qk) && fp8_gemv(a.uv_fp8, d.kv_lora);
    fp8_.push_back(f8);
    if (f8) {  // the GEMV reads kv_b's FP8 blocks; beyond its rows cuBLAS reads w_uk, w_uv
      w_uk_t_.emplace_back();
      w_uv_bf16_.emplace_back();
      continue;
    }
    const Tensor h = cuda_backend().to_host(a.w_uk);  // [nh, nope, R] → [nh, R, nope]
    Tensor t = Tensor::empty(DType::F32, {d.nh * d.kv_lora, d.nope});
    for (int64_t hh = 0; hh < d.nh; ++hh)
      for (int64_t k = 0; k < d.nope; ++k)
        for (int64_t i = 0; i < d.kv_lora; ++i)
          t.data<float>()[(hh * d.kv_lora + i) * d.nope + k] = h.data<float>()[(hh * d.nope + k) * d.kv_lora + i];
    // BF16 rows for the GEMV take whole 16-byte vectors and heads of a multiple of 8 rows, and their
    // x vectors too: W_UK reads q_nope at a head stride of qk floats, W_UV the latent output.
    const bool uk_vec = d.nope % 8 == 0 && d.kv_lora % 8 == 0 && (d.nope + d.rope) % 4 == 0;
    const bool uv_vec = d.kv_lora % 8 == 0 && d.vd % 8 == 0;
    w_uk_t_.push_back(cuda_backend().to_device(uk_vec && bf16_exact(t) ? t.to(DType::BF16) : t));
    const Tensor uv = cuda_backend().to_host(a.w_uv);
    w_uv_bf16_.push_back(uv_vec && bf16_exact(uv) ? cuda_backend().to_device(uv.to(DType::BF16)) : Tensor());
  }
  const int64_t rows = pool.num_blocks() * pool.layers() * pool.block_size();
  storage_ = cuda_backend().alloc(DType::BF16, {rows, pool.row_width()});
  DSV3_CUDA_CHECK(cudaMemset(storage_.raw(), 0, storage_.nbytes()));
  for (bool mma : {false, true}) {
    if (mma && !mma_shape(d)) continue;
    const size_t need = attention_smem(int(pool.row_width()), int(d.kv_lora), true, mma);
    if (need > 48 * 1024)
      DSV3_CUDA_CHECK(cudaFuncSetAttribute(attn_kernel(d.kv_lora, pool.row_width(), mma),
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, int(need)));
  }
}

bool CudaLatentAttention::uses_mla_decode() const {
  return use_mla_decode_ && d_.kv_lora == 512 && d_.rope == 64 && pool_.block_size() == 64;
}

void CudaLatentAttention::upload(const StepRows& rows) {
  const int64_t N = rows.size(), bs = pool_.block_size();
  int64_t max_len = 1;
  for (int64_t r = 0; r < N; ++r) max_len = std::max(max_len, rows.pos[size_t(r)] + 1);
  max_len_ = max_len;
  const int64_t maxb = (planned_len(N) + bs - 1) / bs;
  std::vector<int32_t> meta(size_t(3 * N + N * maxb), 0);
  for (int64_t r = 0; r < N; ++r) {
    const BlockTable& t = *tables[size_t(rows.seq[size_t(r)])];
    const int64_t pos = rows.pos[size_t(r)], nb = pos / bs + 1;
    DSV3_CHECK(pos >= 0 && nb <= int64_t(t.blocks.size()), "row ", r, " position ", pos, " has no cache block");
    meta[size_t(r)] = int32_t(pos + 1);
    meta[size_t(N + r)] = t.blocks[size_t(pos / bs)];
    meta[size_t(2 * N + r)] = int32_t(pos % bs);
    std::copy(t.blocks.begin(), t.blocks.begin() + nb, meta.begin() + 3 * N + r * maxb);
  }
  std::vector<char> seen(tables.size(), 0);
  last_rows_ = true;
  for (int64_t r = 0; r < N && last_rows_; ++r) {
    char& c = seen[size_t(rows.seq[size_t(r)])];
    last_rows_ = !c;
    c = 1;
  }
  // The prefill kernel's row groups follow the tables (its step only: decode steps keep their size).
  const std::vector<int32_t> starts = prefill_groups(rows);
  prefill_ngroups_ = starts.empty() ? 0 : int64_t(starts.size()) - 1;
  meta.insert(meta.end(), starts.begin(), starts.end());
  if (N == rows_ && maxb == max_blocks_ && meta == meta_host_) return;
  meta_host_ = std::move(meta);
  rows_ = N;
  max_blocks_ = maxb;
  const int64_t n = int64_t(meta_host_.size());
  if (!present(meta_dev_) || meta_dev_.numel() < n)
    meta_dev_ = cuda_backend().alloc(DType::I32, {std::max<int64_t>({n, 2 * meta_dev_.numel(), 1024})});
  // In place: this copy is ordered after every kernel that read the previous step's metadata.
  DSV3_CUDA_CHECK(cudaMemcpy(meta_dev_.raw(), meta_host_.data(), size_t(n) * sizeof(int32_t), cudaMemcpyHostToDevice));
  ++uploads_;
}

// The table width and the generic kernel's tiles cover the longest row, rounded up to 8 tiles when
// a CTA per tile of every row still fits the SMs once. Both are part of a CUDA graph's key: at their
// exact values every 32 new tokens changed it (an eager step and a capture each time; batch 1,
// bench-0.7b, 128 new tokens: 1,436 -> 1,545 tok/s with the rounding). Beyond one wave of CTAs the
// empty splits cost more than the captures (batch 32: 19,246 -> 18,902 tok/s), so there the tiles
// stay exact. Table entries past a row's blocks are 0, a real block whose rows the kernels mask.
int64_t CudaLatentAttention::planned_len(int64_t N) const {
  const int64_t tiles = (max_len_ + kT - 1) / kT, wide = round_up(tiles, 8);
  const int64_t groups = (d_.nh + kHg - 1) / kHg;
  return (N * groups * wide <= sm_count() ? wide : tiles) * kT;
}

CudaLatentAttention::Split CudaLatentAttention::split_plan(int64_t N) const {
  // Splits of each row's positions: about two CTAs per SM; up to 8 merge inside a cluster, more
  // (long contexts over few rows) through partials and merge_kernel.
  Split s;
  s.groups = (d_.nh + kHg - 1) / kHg;
  s.tiles = planned_len(N) / kT;
  const int64_t want = (2 * int64_t(sm_count()) + N * s.groups - 1) / (N * s.groups);
  s.splits = std::max<int64_t>(1, std::min(want, s.tiles));
  s.mode = s.splits == 1 ? kDirect : kCluster;
  if (s.splits > kMaxClusterSplits) {
    if (s.tiles <= 2 * kMaxClusterSplits) {
      s.splits = kMaxClusterSplits;
    } else {
      s.splits = std::min<int64_t>(s.splits, kMaxSplits);
      s.mode = kPartials;
    }
  }
  return s;
}

// The prefill kernel's groups when it takes this step: a step beyond the GEMV's rows (never a
// graph's: prepare_step refuses those), on the tensor-core shapes, whose rows form groups of 1.5 or
// more on average (prefill chunks; decode steps are one row per sequence), and at least two groups
// per SM: with fewer, the row kernel's CTAs spread a short prompt better (bench-0.7b, one prompt of
// 512 tokens: 5.47 ms in groups of 2 against 5.30 per row; 1,024 tokens, 512 groups: 9.19 against
// 9.84; `dsv3_bench_gpu_prefill`, H200, 2026-12-02).
std::vector<int32_t> CudaLatentAttention::prefill_groups(const StepRows& rows) const {
  const int64_t N = rows.size();
  const int q = cuda_latent_prefill_rows();
  if (q == 0 || N <= g_absorbed_gemv_rows || !mma_setting() || !mma_shape(d_) || uses_mla_decode()) return {};
  std::vector<int32_t> starts = latent_prefill_groups(rows, q);
  const int64_t groups = int64_t(starts.size()) - 1;
  if (3 * groups > 2 * N || groups < 2 * int64_t(sm_count())) return {};
  return starts;
}

bool CudaLatentAttention::prepare_step(const StepRows& rows, std::vector<int64_t>& key) {
  const int64_t N = rows.size();
  if (N == 0 || N > g_absorbed_gemv_rows) return false;
  upload(rows);
  auto addr = [](const Tensor& x) { return int64_t(reinterpret_cast<uintptr_t>(x.raw())); };
  key.insert(key.end(), {serial_, addr(storage_), N, max_blocks_, int64_t(last_rows_), addr(meta_dev_),
                         meta_dev_.numel(), int64_t(pdl_enabled()), int64_t(uses_mla_decode())});
  if (uses_mla_decode()) {  // cuda_mla_decode sizes its splits by the blocks the longest row covers
    key.push_back((max_len_ + pool_.block_size() - 1) / pool_.block_size());
  } else {
    const Split s = split_plan(N);
    key.insert(key.end(), {s.tiles, s.splits, int64_t(s.mode), int64_t(mma_setting())});
  }
  return true;
}

void CudaLatentAttention::attend(int64_t layer, const MlaParams&, const StepRows& rows, const Tensor& q,
                                 const Tensor& c_kv_n, const Tensor& k_pe, const Tensor& out) {
  const int64_t N = rows.size(), nh = d_.nh, R = d_.kv_lora, P = d_.rope, W = R + P;
  DSV3_CHECK(q.device() == Device::CUDA && q.numel() == N * nh * d_.qk && out.numel() == N * nh * d_.vd &&
                 c_kv_n.numel() == N * R && k_pe.numel() == N * P,
             "CudaLatentAttention::attend shapes");
  DSV3_CHECK(layer >= 0 && layer < pool_.layers() && size_t(layer) < absorbed_.size(), "layer ", layer);
  if (N == 0) return;
  upload(rows);
  const int32_t* meta = meta_dev_.data<int32_t>();
  const int64_t layers = pool_.layers(), bs = pool_.block_size();
  CudaBackend& be = cuda_backend();
  const AbsorbedKvB& w = absorbed_[size_t(layer)];
  Tensor qcat = be.alloc(DType::F32, {N, nh, W});
  const float one = 1.0f, zero = 0.0f;
  const bool small = N <= g_absorbed_gemv_rows;
  if (small) {  // qcat[r, h, :R] = W_UK[h]ᵀ·q_nope[r, h]: rows (h, i) of W_UKᵀ, one launch
    GemvArgs g;
    g.x = q.data<float>();
    g.n = int(N);
    g.K = int(d_.nope);
    g.ldx = nh * d_.qk;
    g.head_x = d_.qk;
    g.head_rows = int(R);
    if (fp8_[size_t(layer)])
      set_gemv_weight(g, w.uk_t_fp8.w, w.uk_t_fp8.scale_inv);
    else
      set_gemv_weight(g, w_uk_t_[size_t(layer)], Tensor());
    g.n_out = int(nh * R);
    g.y = ptr<float>(qcat);
    g.ldy = nh * W;
    g.head_y = W;
    cuda_rows_gemv(g);
  } else if (!fp8_[size_t(layer)] && w_uk_t_[size_t(layer)].dtype() == DType::BF16) {
    cuda_graph_mark_unsafe("W_UK through cuBLASLt");
    head_linear_split(q.data<float>(), N, nh, d_.nope, d_.qk, w_uk_t_[size_t(layer)].raw(), R, ptr<float>(qcat),
                      nh * W, W);
  } else {
    cuda_graph_mark_unsafe("W_UK through cuBLAS");
    // qcat[r, h, :R] = q_nope[r, h]·W_UK[h]  (column-major: [R × N] = W_UKᵀ[R × nope] · q_nopeᵀ[nope × N])
    DSV3_CUBLAS_CHECK(cublasSgemmStridedBatched(cublas(), CUBLAS_OP_N, CUBLAS_OP_N, int(R), int(N), int(d_.nope),
                                                &one, w.w_uk.data<float>(), int(R), d_.nope * R, q.data<float>(),
                                                int(nh * d_.qk), d_.qk, &zero, ptr<float>(qcat), int(nh * W), W,
                                                int(nh)));
  }
  // W_UK reads only q_nope: a cuda_kv_latent forked beside it (rotating q_pe, writing c_kv_n and
  // k_pe) joins here, before the launches that read those.
  cuda_join_beside();
  // Decode steps (one row per sequence) on the generic kernel: the kernel writes the new rows itself.
  const bool fold = last_rows_ && !uses_mla_decode();
  if (!fold) {
    write_rows_kernel<<<unsigned(N), 128, 0, stream()>>>(c_kv_n.data<float>(), k_pe.data<float>(), meta, int(N), R, P,
                                                         layers, bs, layer, ptr<__nv_bfloat16>(storage_));
    check_launch("latent cache write");
  }
  if (uses_mla_decode()) {  // cuda_mla_decode reads whole query rows
    copy_qpe_kernel<<<blocks_for(N * nh * P), 256, 0, stream()>>>(q.data<float>(), d_.qk, d_.nope, P, W, R, N * nh,
                                                                  ptr<float>(qcat));
    check_launch("absorbed query");
  }

  Tensor lat = be.alloc(DType::F32, {N, nh, R});
  LatentAttnCommon common;
  common.qcat = qcat.data<float>();
  common.qrot = q.data<float>();
  common.pool = ptr<__nv_bfloat16>(storage_);
  common.meta = meta;
  common.n = int(N);
  common.maxb = int(max_blocks_);
  common.nh = int(nh);
  common.W = int(W);
  common.R = int(R);
  common.qk = int(d_.qk);
  common.nope = int(d_.nope);
  common.layers = layers;
  common.bs = bs;
  common.layer = layer;
  common.scale = float(double(d_.softmax_scale) * 1.4426950408889634);
  common.lat = ptr<float>(lat);
  if (uses_mla_decode()) {
    MlaDecodeArgs a;
    a.q = qcat;
    a.pool = storage_;
    a.block_table = meta_dev_.rows(3 * N, 3 * N + N * max_blocks_).reshape({N, max_blocks_});
    a.lengths = meta_dev_.rows(0, N);
    a.layers = layers;
    a.layer = layer;
    a.block_size = bs;
    a.kv_lora_rank = R;
    a.max_len = max_len_;
    a.scale = d_.softmax_scale;
    a.out = lat;
    cuda_mla_decode(a);
  } else if (prefill_ngroups_ > 0) {
    LatentPrefillArgs x;
    static_cast<LatentAttnCommon&>(x) = common;
    x.groups = meta + 3 * N + N * max_blocks_;
    x.ngroups = int(prefill_ngroups_);
    launch_latent_prefill(x, cuda_latent_prefill_rows());
  } else {
    DSV3_CHECK(N <= 65535, "latent attention: ", N, " rows in one step");
    const Split plan = split_plan(N);
    const int64_t groups = plan.groups, tiles = plan.tiles, splits = plan.splits;
    const int mode = plan.mode;
    Tensor part = mode == kPartials ? be.alloc(DType::F32, {N * nh * splits * (R + 2)}) : Tensor();
    AttnArgs x;
    static_cast<LatentAttnCommon&>(x) = common;
    x.splits = int(splits);
    x.max_tiles = int(tiles);
    x.qvec = W % 4 == 0 && R % 4 == 0 && d_.qk % 4 == 0 && d_.nope % 4 == 0;
    x.mode = mode;
    x.c_new = c_kv_n.data<float>();
    x.kpe_new = k_pe.data<float>();
    x.fold = fold;
    x.part = mode == kPartials ? ptr<float>(part) : nullptr;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(unsigned(splits), unsigned(N), unsigned(groups));
    cfg.blockDim = dim3(kThreads);
    cfg.stream = stream();
    const bool mma = mma_setting() && mma_shape(d_);
    cfg.dynamicSmemBytes = attention_smem(int(W), int(R), mode == kCluster, mma);
    cudaLaunchAttribute attr[2];
    int na = 0;
    if (mode == kCluster) {
      attr[na].id = cudaLaunchAttributeClusterDimension;
      attr[na].val.clusterDim.x = unsigned(splits);
      attr[na].val.clusterDim.y = 1;
      attr[na].val.clusterDim.z = 1;
      ++na;
    }
    if (pdl_enabled()) {
      attr[na].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[na].val.programmaticStreamSerializationAllowed = 1;
      ++na;
    }
    cfg.attrs = attr;
    cfg.numAttrs = unsigned(na);
    DSV3_CUDA_CHECK(cudaLaunchKernelEx(&cfg, attn_kernel(R, W, mma), x));
    if (mma) ++g_mma_launches;
    check_launch("latent attention");
    if (mode == kPartials) {
      merge_kernel<<<unsigned(N * nh), 128, 0, stream()>>>(part.data<float>(), int(splits), int(R), ptr<float>(lat));
      check_launch("latent attention merge");
    }
  }
  if (small) {  // out[r, h] = W_UV[h]·lat[r, h]: rows (h, j) of W_UV, one launch
    GemvArgs g;
    g.x = lat.data<float>();
    g.n = int(N);
    g.K = int(R);
    g.ldx = nh * R;
    g.head_x = R;
    g.head_rows = int(d_.vd);
    const Tensor& uv = w_uv_bf16_[size_t(layer)];
    if (fp8_[size_t(layer)])
      set_gemv_weight(g, w.uv_fp8.w, w.uv_fp8.scale_inv);
    else
      set_gemv_weight(g, present(uv) ? uv : w.w_uv, Tensor());
    g.n_out = int(nh * d_.vd);
    g.y = ptr<float>(out);
    g.ldy = nh * d_.vd;
    g.head_y = d_.vd;
    cuda_rows_gemv(g);
    return;
  }
  if (present(w_uv_bf16_[size_t(layer)])) {
    cuda_graph_mark_unsafe("W_UV through cuBLASLt");
    head_linear_split(lat.data<float>(), N, nh, R, R, w_uv_bf16_[size_t(layer)].raw(), d_.vd, ptr<float>(out),
                      nh * d_.vd, d_.vd);
    return;
  }
  cuda_graph_mark_unsafe("W_UV through cuBLAS");
  // out[r, h] = W_UV[h]·lat[r, h]  (column-major: [vd × N] = W_UV[vd × R] · latᵀ[R × N])
  DSV3_CUBLAS_CHECK(cublasSgemmStridedBatched(cublas(), CUBLAS_OP_T, CUBLAS_OP_N, int(d_.vd), int(N), int(R), &one,
                                              w.w_uv.data<float>(), int(R), d_.vd * R, lat.data<float>(), int(nh * R),
                                              R, &zero, ptr<float>(out), int(nh * d_.vd), d_.vd, int(nh)));
}

}  // namespace dsv3
