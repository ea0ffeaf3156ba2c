#include "infer/cuda_latent_attention.h"

#include <algorithm>
#include <cmath>

#include "backend/cuda/common.cuh"
#include "backend/cuda/mla_decode.h"
#include "infer/cuda_decode_ops.h"

namespace dsv3 {
using namespace cuda;

namespace {

constexpr int kTile = 32;      // cached rows per shared-memory tile (one per lane for the scores)
constexpr int kMaxCols = 16;   // latent columns per lane: kv_lora_rank ≤ 512
constexpr int kHeadsPerCta = 4;

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

// Absorbed attention for any latent width (one warp per head, kHeadsPerCta heads per CTA, one CTA
// per row): tiles of 32 cached rows widened to F32 in shared memory (row stride odd: the lane-per-row
// dot products hit distinct banks), online softmax, each lane owning latent columns lane + 32·i.
// With splits > 1 (few rows: more CTAs), CTA z covers a contiguous range of the row's tiles and
// writes its unnormalised partial (max, sum, Σ p·c) to part; merge_kernel combines them.
__global__ void latent_attention_kernel(const float* qcat, const __nv_bfloat16* pool, const int32_t* meta, int n,
                                        int maxb, int nh, int W, int R, int64_t layers, int64_t bs, int64_t layer,
                                        float scale, float* lat, int splits, float* part, const float* qrot,
                                        int qk, int nope) {
  extern __shared__ float sm[];
  const int ldw = W | 1;
  float* tile = sm;
  float* qs = sm + kTile * ldw;
  const int r = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int h = blockIdx.y * kHeadsPerCta + warp;
  const bool active = h < nh;
  const int len = meta[r];
  const int32_t* table = meta + 3 * n + int64_t(r) * maxb;
  float* q = qs + warp * W;
  // q_lat from qcat; the rotated q_pe straight from the runner's q (no copy into qcat).
  if (active)
    for (int i = lane; i < W; i += 32)
      q[i] = (i < R ? qcat[(int64_t(r) * nh + h) * W + i] : qrot[(int64_t(r) * nh + h) * qk + nope + (i - R)]) * scale;
  float acc[kMaxCols];
#pragma unroll
  for (int i = 0; i < kMaxCols; ++i) acc[i] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  __shared__ const __nv_bfloat16* rowp[kTile];
  const int bsi = int(bs);
  const int per = ((len + kTile - 1) / kTile + splits - 1) / splits * kTile;  // positions per split
  const int t_begin = blockIdx.z * per, t_end = min(len, t_begin + per);
  for (int t0 = t_begin; t0 < t_end; t0 += kTile) {
    const int cnt = min(kTile, t_end - t0);
    __syncthreads();
    // The tile's row addresses first (one table lookup per row, in parallel), then independent
    // loads: 16 bytes (8 values) at a time when rows allow it.
    if (threadIdx.x < cnt) {
      const int pos = t0 + threadIdx.x;
      rowp[threadIdx.x] = pool + ((int64_t(table[pos / bsi]) * layers + layer) * bs + pos % bsi) * W;
    }
    __syncthreads();
    if (W % 8 == 0) {
      // Batches of 8 independent 16-byte loads per thread, then the stores (a load-then-store loop
      // waits for every load in turn).
      const int V = W / 8, total = cnt * V;
      for (int base = threadIdx.x; base < total; base += 8 * blockDim.x) {
        uint4 raw[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int idx = base + u * blockDim.x;
          if (idx < total) raw[u] = reinterpret_cast<const uint4*>(rowp[idx / V])[idx % V];
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int idx = base + u * blockDim.x;
          if (idx >= total) break;
          float* dst = tile + (idx / V) * ldw + 8 * (idx % V);
          const uint32_t w4[4] = {raw[u].x, raw[u].y, raw[u].z, raw[u].w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            dst[2 * e] = __uint_as_float(w4[e] << 16);
            dst[2 * e + 1] = __uint_as_float(w4[e] & 0xffff0000u);
          }
        }
      }
    } else {
      for (int idx = threadIdx.x; idx < cnt * W; idx += blockDim.x) {
        const int j = idx / W, i = idx - j * W;
        tile[j * ldw + i] = __bfloat162float(rowp[j][i]);
      }
    }
    __syncthreads();
    if (!active) continue;
    float s = -INFINITY;
    if (lane < cnt) {
      const float* row = tile + lane * ldw;
      float d = 0.0f;
      for (int i = 0; i < W; ++i) d = fmaf(q[i], row[i], d);
      s = d;
    }
    const float mnew = fmaxf(m, warp_max(s));
    const float corr = m == -INFINITY ? 0.0f : __expf(m - mnew);
    const float p = lane < cnt ? __expf(s - mnew) : 0.0f;
    l = l * corr + warp_sum(p);
#pragma unroll
    for (int i = 0; i < kMaxCols; ++i) acc[i] *= corr;
    for (int j = 0; j < cnt; ++j) {
      const float pj = __shfl_sync(0xffffffffu, p, j);
      const float* row = tile + j * ldw;
#pragma unroll
      for (int i = 0; i < kMaxCols; ++i) {
        const int col = lane + 32 * i;
        if (col < R) acc[i] = fmaf(pj, row[col], acc[i]);
      }
    }
    m = mnew;
  }
  if (!active) return;
  if (splits > 1) {
    float* pr = part + ((int64_t(r) * nh + h) * splits + blockIdx.z) * (R + 2);
    if (lane == 0) {
      pr[0] = m;
      pr[1] = l;
    }
#pragma unroll
    for (int i = 0; i < kMaxCols; ++i) {
      const int col = lane + 32 * i;
      if (col < R) pr[2 + col] = acc[i];
    }
    return;
  }
  const float inv = 1.0f / l;
#pragma unroll
  for (int i = 0; i < kMaxCols; ++i) {
    const int col = lane + 32 * i;
    if (col < R) lat[(int64_t(r) * nh + h) * R + col] = acc[i] * inv;
  }
}

// lat[r, h] = Σ_s e^{m_s − M}·acc_s / Σ_s e^{m_s − M}·l_s over the splits (empty splits: m = −inf).
__global__ void merge_kernel(const float* part, int splits, int R, float* lat) {
  const int64_t rh = blockIdx.x;
  const float* p = part + rh * splits * (R + 2);
  float M = -INFINITY;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, p[s * (R + 2)]);
  float L = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float ms = p[s * (R + 2)];
    if (ms != -INFINITY) L += __expf(ms - M) * p[s * (R + 2) + 1];
  }
  for (int c = threadIdx.x; c < R; c += blockDim.x) {
    float v = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float ms = p[s * (R + 2)];
      if (ms != -INFINITY) v += __expf(ms - M) * p[s * (R + 2) + 2 + c];
    }
    lat[rh * R + c] = v / L;
  }
}

// Per row: argmax over [0, n_valid), lowest index on ties.
__global__ void argmax_kernel(const float* logits, int64_t V, int64_t n_valid, int32_t* ids) {
  const float* row = logits + blockIdx.x * V;
  float best = -INFINITY;
  int64_t bi = -1;
  // Batches of 8 independent loads per thread; each thread still sees its ids in increasing order.
  for (int64_t base = threadIdx.x; base < n_valid; base += 8 * int64_t(blockDim.x)) {
    float v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int64_t i = base + u * int64_t(blockDim.x);
      v[u] = i < n_valid ? row[i] : -INFINITY;
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int64_t i = base + u * int64_t(blockDim.x);
      if (i < n_valid && (bi < 0 || v[u] > best)) {
        best = v[u];
        bi = i;
      }
    }
  }
  __shared__ float sv[1024];
  __shared__ int64_t si[1024];
  sv[threadIdx.x] = best;
  si[threadIdx.x] = bi;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const float v = sv[threadIdx.x + s];
      const int64_t i = si[threadIdx.x + s];
      const int64_t mine = si[threadIdx.x];
      if (i >= 0 && (mine < 0 || v > sv[threadIdx.x] || (v == sv[threadIdx.x] && i < mine))) {
        sv[threadIdx.x] = v;
        si[threadIdx.x] = i;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) ids[blockIdx.x] = int32_t(si[0]);
}

size_t attention_smem(int W) { return size_t(kTile * (W | 1) + kHeadsPerCta * W) * sizeof(float); }

}  // namespace

CudaLatentAttention::CudaLatentAttention(const LatentKvPool& pool, const std::vector<AbsorbedKvB>& absorbed,
                                         const ModelDims& d)
    : pool_(pool), absorbed_(absorbed), d_(d) {
  DSV3_CHECK(!pool.host_storage() && pool.dtype() == DType::BF16,
             "CudaLatentAttention needs a BF16 pool built with host_storage = false");
  DSV3_CHECK(d.kv_lora == pool.kv_lora_rank() && d.rope == pool.rope_dim(), "cache shape");
  if (d.kv_lora > 32 * kMaxCols)
    input_error("the CUDA latent cache supports kv_lora_rank up to ", 32 * kMaxCols, ", the model has ", d.kv_lora);
  for (const AbsorbedKvB& a : absorbed) {
    DSV3_CHECK(a.w_uk.device() == Device::CUDA && a.w_uv.device() == Device::CUDA,
               "absorbed kv_b_proj must live on the device");
    const Tensor h = cuda_backend().to_host(a.w_uk);  // [nh, nope, R] → [nh, R, nope]
    Tensor t = Tensor::empty(DType::F32, {d.nh * d.kv_lora, d.nope});
    for (int64_t hh = 0; hh < d.nh; ++hh)
      for (int64_t k = 0; k < d.nope; ++k)
        for (int64_t i = 0; i < d.kv_lora; ++i)
          t.data<float>()[(hh * d.kv_lora + i) * d.nope + k] = h.data<float>()[(hh * d.nope + k) * d.kv_lora + i];
    w_uk_t_.push_back(cuda_backend().to_device(t));
  }
  const int64_t rows = pool.num_blocks() * pool.layers() * pool.block_size();
  storage_ = cuda_backend().alloc(DType::BF16, {rows, pool.row_width()});
  DSV3_CUDA_CHECK(cudaMemset(storage_.raw(), 0, storage_.nbytes()));
  const size_t smem = attention_smem(int(pool.row_width()));
  if (smem > 48 * 1024)
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(latent_attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(smem)));
}

bool CudaLatentAttention::uses_mla_decode() const {
  return use_mla_decode_ && d_.kv_lora == 512 && d_.rope == 64 && pool_.block_size() == 64;
}

void CudaLatentAttention::upload(const StepRows& rows) {
  const int64_t N = rows.size(), bs = pool_.block_size();
  int64_t maxb = 1, max_len = 1;
  for (int64_t r = 0; r < N; ++r) {
    maxb = std::max(maxb, rows.pos[size_t(r)] / bs + 1);
    max_len = std::max(max_len, rows.pos[size_t(r)] + 1);
  }
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
  if (N == rows_ && maxb == max_blocks_ && meta == meta_host_) return;
  meta_host_ = std::move(meta);
  rows_ = N;
  max_blocks_ = maxb;
  max_len_ = max_len;
  auto keep = std::shared_ptr<void>(meta_host_.data(), [](void*) {});
  meta_dev_ = cuda_backend().to_device(
      Tensor::borrow(meta_host_.data(), DType::I32, {int64_t(meta_host_.size())}, keep));
  ++uploads_;
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
  write_rows_kernel<<<unsigned(N), 128>>>(c_kv_n.data<float>(), k_pe.data<float>(), meta, int(N), R, P, layers, bs,
                                          layer, ptr<__nv_bfloat16>(storage_));
  check_launch("latent cache write");

  CudaBackend& be = cuda_backend();
  const AbsorbedKvB& w = absorbed_[size_t(layer)];
  Tensor qcat = be.alloc(DType::F32, {N, nh, W});
  const float one = 1.0f, zero = 0.0f;
  const bool small = N <= 8;
  if (small) {  // qcat[r, h, :R] = W_UK[h]ᵀ·q_nope[r, h]: rows (h, i) of W_UKᵀ, one launch
    GemvArgs g;
    g.x = q.data<float>();
    g.n = int(N);
    g.K = int(d_.nope);
    g.ldx = nh * d_.qk;
    g.head_x = d_.qk;
    g.head_rows = int(R);
    g.W = w_uk_t_[size_t(layer)].data<float>();
    g.n_out = int(nh * R);
    g.y = ptr<float>(qcat);
    g.ldy = nh * W;
    g.head_y = W;
    cuda_rows_gemv(g);
  } else {
    // qcat[r, h, :R] = q_nope[r, h]·W_UK[h]  (column-major: [R × N] = W_UKᵀ[R × nope] · q_nopeᵀ[nope × N])
    DSV3_CUBLAS_CHECK(cublasSgemmStridedBatched(cublas(), CUBLAS_OP_N, CUBLAS_OP_N, int(R), int(N), int(d_.nope),
                                                &one, w.w_uk.data<float>(), int(R), d_.nope * R, q.data<float>(),
                                                int(nh * d_.qk), d_.qk, &zero, ptr<float>(qcat), int(nh * W), W,
                                                int(nh)));
  }
  if (uses_mla_decode()) {  // cuda_mla_decode reads whole query rows
    copy_qpe_kernel<<<blocks_for(N * nh * P), 256>>>(q.data<float>(), d_.qk, d_.nope, P, W, R, N * nh,
                                                     ptr<float>(qcat));
    check_launch("absorbed query");
  }

  Tensor lat = be.alloc(DType::F32, {N, nh, R});
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
  } else {
    // Few rows: split the positions over more CTAs (about one wave of the GPU's SMs).
    const int64_t groups = (nh + kHeadsPerCta - 1) / kHeadsPerCta, tiles = (max_len_ + kTile - 1) / kTile;
    const int64_t splits =
        std::clamp<int64_t>(sm_count() / std::max<int64_t>(1, N * groups), 1, std::min<int64_t>(tiles, 16));
    Tensor part = splits > 1 ? be.alloc(DType::F32, {N * nh * splits * (R + 2)}) : Tensor();
    const dim3 grid{unsigned(N), unsigned(groups), unsigned(splits)};
    latent_attention_kernel<<<grid, 32 * kHeadsPerCta, attention_smem(int(W))>>>(
        qcat.data<float>(), ptr<__nv_bfloat16>(storage_), meta, int(N), int(max_blocks_), int(nh), int(W), int(R),
        layers, bs, layer, d_.softmax_scale, ptr<float>(lat), int(splits), splits > 1 ? ptr<float>(part) : nullptr,
        q.data<float>(), int(d_.qk), int(d_.nope));
    check_launch("latent attention");
    if (splits > 1) {
      merge_kernel<<<unsigned(N * nh), 128>>>(part.data<float>(), int(splits), int(R), ptr<float>(lat));
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
    g.W = w.w_uv.data<float>();
    g.n_out = int(nh * d_.vd);
    g.y = ptr<float>(out);
    g.ldy = nh * d_.vd;
    g.head_y = d_.vd;
    cuda_rows_gemv(g);
    return;
  }
  // out[r, h] = W_UV[h]·lat[r, h]  (column-major: [vd × N] = W_UV[vd × R] · latᵀ[R × N])
  DSV3_CUBLAS_CHECK(cublasSgemmStridedBatched(cublas(), CUBLAS_OP_T, CUBLAS_OP_N, int(d_.vd), int(N), int(R), &one,
                                              w.w_uv.data<float>(), int(R), d_.vd * R, lat.data<float>(), int(nh * R),
                                              R, &zero, ptr<float>(out), int(nh * d_.vd), d_.vd, int(nh)));
}

std::vector<int32_t> cuda_greedy_tokens(const Tensor& logits, int64_t n_valid) {
  DSV3_CHECK(logits.device() == Device::CUDA && logits.dtype() == DType::F32 && logits.ndim() == 2 &&
                 n_valid >= 1 && n_valid <= logits.dim(1),
             "cuda_greedy_tokens: logits ", logits.shape().str(), " n_valid ", n_valid);
  const int64_t N = logits.dim(0);
  std::vector<int32_t> ids(static_cast<size_t>(N));
  if (N == 0) return ids;
  Tensor dev = cuda_backend().alloc(DType::I32, {N});
  argmax_kernel<<<unsigned(N), 1024>>>(logits.data<float>(), logits.dim(1), n_valid, ptr<int32_t>(dev));
  check_launch("greedy argmax");
  DSV3_CUDA_CHECK(cudaMemcpy(ids.data(), dev.raw(), size_t(N) * sizeof(int32_t), cudaMemcpyDeviceToHost));
  return ids;
}

}  // namespace dsv3
