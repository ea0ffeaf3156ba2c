// Absorbed-MLA decode (flash-decoding over the paged latent cache). One CTA takes one sequence and
// a contiguous range of its 64-token cache blocks for up to 16 heads at once, so each latent row is
// read from HBM once for all heads (the point of MLA's shared latent: K and V are the same row).
// Per block: the 64 rows (BF16) go to shared memory; 256 threads compute the 16×64 scores, each
// head's online-softmax state is updated by one warp, and every thread accumulates 2 output columns
// × 16 heads in registers. Partial results of the splits are merged by a second kernel.
#include "backend/cuda/common.cuh"
#include "backend/cuda/mla_decode.h"

namespace dsv3 {
using namespace cuda;

namespace {

constexpr int kTile = 64;      // tokens per cache block
constexpr int kHeads = 16;     // heads per CTA
constexpr int kThreads = 256;
constexpr int kMaxW = 576;
constexpr int kRowPad = 2;     // BF16 elements: an odd word stride avoids bank conflicts

struct Shape_ {
  int64_t b, h, w, r, layers, layer, max_blocks, splits, blocks_per_split;
};

__global__ void __launch_bounds__(kThreads) mla_split_kernel(const float* q, const __nv_bfloat16* pool,
                                                             const int32_t* table, const int32_t* lengths, Shape_ s,
                                                             int64_t h0, int nh, float scale, float* part_o,
                                                             float* part_m, float* part_l) {
  extern __shared__ unsigned char smem_raw[];
  const int ws = int(s.w) + kRowPad;  // row stride in BF16
  __nv_bfloat16* kv = reinterpret_cast<__nv_bfloat16*>(smem_raw);               // [kTile][ws]
  float* qs = reinterpret_cast<float*>(kv + kTile * ws);                         // [kHeads][w]
  float* ps = qs + kHeads * s.w;                                                 // [kHeads][kTile]
  float* ms = ps + kHeads * kTile;                                               // [kHeads]
  float* ls = ms + kHeads;                                                       // [kHeads]
  float* al = ls + kHeads;                                                       // [kHeads]
  int64_t split = blockIdx.x, b = blockIdx.y;
  int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int64_t len = lengths[b], nblk = (len + kTile - 1) / kTile;
  int64_t blk0 = split * s.blocks_per_split, blk1 = blk0 + s.blocks_per_split < nblk ? blk0 + s.blocks_per_split : nblk;
  for (int64_t i = tid; i < int64_t(nh) * s.w; i += kThreads) qs[i] = q[(b * s.h + h0) * s.w + i];
  if (tid < kHeads) {
    ms[tid] = -INFINITY;
    ls[tid] = 0.0f;
  }
  float acc[kHeads][2];
#pragma unroll
  for (int h = 0; h < kHeads; ++h) acc[h][0] = acc[h][1] = 0.0f;
  __syncthreads();
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    int64_t pb = table[b * s.max_blocks + blk];
    const __nv_bfloat16* rows = pool + ((pb * s.layers + s.layer) * kTile) * s.w;
    int valid = int(len - blk * kTile < kTile ? len - blk * kTile : kTile);
    // Rows → shared memory: 16-byte loads (W·2 bytes per row is a multiple of 16), 4-byte stores.
    int chunks = int(s.w / 8);
    for (int i = tid; i < kTile * chunks; i += kThreads) {
      int t = i / chunks, c = i % chunks;
      uint4 v = t < valid ? reinterpret_cast<const uint4*>(rows + int64_t(t) * s.w)[c] : make_uint4(0, 0, 0, 0);
      uint32_t* dst = reinterpret_cast<uint32_t*>(kv + t * ws + c * 8);
      dst[0] = v.x;
      dst[1] = v.y;
      dst[2] = v.z;
      dst[3] = v.w;
    }
    __syncthreads();
    // Scores: thread → token t = tid % 64, heads tid/64, +4, +8, +12.
    {
      int t = tid & (kTile - 1);
      const __nv_bfloat162* kr = reinterpret_cast<const __nv_bfloat162*>(kv + t * ws);
      for (int h = tid / kTile; h < nh; h += kThreads / kTile) {
        const float2* qh = reinterpret_cast<const float2*>(qs + h * s.w);
        float d0 = 0.0f, d1 = 0.0f;
        for (int j = 0; j < s.w / 2; ++j) {
          float2 kf = __bfloat1622float2(kr[j]);
          float2 qf = qh[j];
          d0 = fmaf(qf.x, kf.x, d0);
          d1 = fmaf(qf.y, kf.y, d1);
        }
        ps[h * kTile + t] = t < valid ? scale * (d0 + d1) : -INFINITY;
      }
    }
    __syncthreads();
    // Online softmax, one warp per head.
    for (int h = warp; h < nh; h += kThreads / 32) {
      float a = ps[h * kTile + lane], c = ps[h * kTile + lane + 32];
      float mx = warp_max(fmaxf(a, c));
      float mn = fmaxf(ms[h], mx);
      float pa = expf(a - mn), pc = expf(c - mn);
      ps[h * kTile + lane] = pa;
      ps[h * kTile + lane + 32] = pc;
      float sum = warp_sum(pa + pc);
      if (lane == 0) {
        float alpha = expf(ms[h] - mn);
        al[h] = alpha;
        ls[h] = ls[h] * alpha + sum;
        ms[h] = mn;
      }
    }
    __syncthreads();
    // O[h][d] = O·alpha + Σ_t p[h][t]·row_t[d] for d = tid and tid + 256.
#pragma unroll
    for (int h = 0; h < kHeads; ++h)
      if (h < nh) {
        acc[h][0] *= al[h];
        acc[h][1] *= al[h];
      }
    for (int t = 0; t < valid; ++t) {
      float v0 = __bfloat162float(kv[t * ws + tid]), v1 = __bfloat162float(kv[t * ws + tid + kThreads]);
#pragma unroll
      for (int h = 0; h < kHeads; ++h)
        if (h < nh) {
          float p = ps[h * kTile + t];
          acc[h][0] = fmaf(p, v0, acc[h][0]);
          acc[h][1] = fmaf(p, v1, acc[h][1]);
        }
    }
    __syncthreads();
  }
  // Partials: unnormalised O, running max and sum per (b, split, head).
  int64_t base = (b * s.splits + split) * s.h + h0;
#pragma unroll
  for (int h = 0; h < kHeads; ++h)
    if (h < nh) {
      part_o[(base + h) * s.r + tid] = acc[h][0];
      part_o[(base + h) * s.r + tid + kThreads] = acc[h][1];
    }
  if (tid < nh) {
    part_m[base + tid] = ms[tid];
    part_l[base + tid] = ls[tid];
  }
}

__global__ void mla_merge_kernel(const float* part_o, const float* part_m, const float* part_l, Shape_ s, float* out,
                                 float* lse) {
  int64_t b = blockIdx.y, h = blockIdx.x;
  float mx = -INFINITY;
  for (int64_t sp = 0; sp < s.splits; ++sp) mx = fmaxf(mx, part_m[(b * s.splits + sp) * s.h + h]);
  float l = 0.0f;
  for (int64_t sp = 0; sp < s.splits; ++sp) {
    float m = part_m[(b * s.splits + sp) * s.h + h];
    if (m != -INFINITY) l += expf(m - mx) * part_l[(b * s.splits + sp) * s.h + h];
  }
  for (int64_t d = threadIdx.x; d < s.r; d += blockDim.x) {
    float o = 0.0f;
    for (int64_t sp = 0; sp < s.splits; ++sp) {
      int64_t i = (b * s.splits + sp) * s.h + h;
      float m = part_m[i];
      if (m != -INFINITY) o += expf(m - mx) * part_o[i * s.r + d];
    }
    out[(b * s.h + h) * s.r + d] = o / l;
  }
  if (lse && threadIdx.x == 0) lse[b * s.h + h] = mx + logf(l);
}

}  // namespace

void cuda_mla_decode(const MlaDecodeArgs& a) {
  DSV3_CHECK(a.q.dtype() == DType::F32 && a.q.ndim() == 3 && a.pool.dtype() == DType::BF16 &&
                 a.block_table.dtype() == DType::I32 && a.block_table.ndim() == 2 &&
                 a.lengths.dtype() == DType::I32 && a.out.dtype() == DType::F32,
             "cuda_mla_decode: q F32 [B, H, W], pool BF16, block_table I32 [B, n], lengths I32 [B], out F32");
  int64_t B = a.q.dim(0), H = a.q.dim(1), W = a.q.dim(2), R = a.kv_lora_rank;
  DSV3_CHECK(a.block_size == kTile, "cuda_mla_decode: block_size must be ", kTile, ", got ", a.block_size);
  DSV3_CHECK(W <= kMaxW && W % 8 == 0 && R == 2 * kThreads && R <= W,
             "cuda_mla_decode: needs W ≤ 576 (multiple of 8) and kv_lora_rank = 512, got W=", W, " R=", R);
  DSV3_CHECK(a.out.shape() == Shape({B, H, R}) && a.lengths.numel() == B && a.block_table.dim(0) == B,
             "cuda_mla_decode: shapes of out/lengths/block_table do not match q ", a.q.shape().str());
  if (B == 0 || H == 0) return;
  int64_t max_blocks = a.block_table.dim(1);
  int64_t nblk = std::max<int64_t>(1, (std::max<int64_t>(a.max_len, 1) + kTile - 1) / kTile);
  DSV3_CHECK(nblk <= max_blocks, "cuda_mla_decode: max_len ", a.max_len, " exceeds the block table");
  // Enough CTAs to cover the GPU about four times over, at least one block each.
  int sms = 132;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  int64_t head_groups = (H + kHeads - 1) / kHeads;
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(nblk, (4 * sms + B * head_groups - 1) / (B * head_groups)));
  int64_t per = (nblk + splits - 1) / splits;
  splits = (nblk + per - 1) / per;
  Shape_ s{B, H, W, R, a.layers, a.layer, max_blocks, splits, per};
  Scratch po(size_t(B * splits * H * R) * 4), pm(size_t(B * splits * H) * 4), pl(size_t(B * splits * H) * 4);
  size_t smem = size_t(kTile) * size_t(W + kRowPad) * 2 + size_t(kHeads * W + kHeads * kTile + 3 * kHeads) * 4;
  DSV3_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(mla_split_kernel),
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  for (int64_t h0 = 0; h0 < H; h0 += kHeads) {
    int nh = int(std::min<int64_t>(kHeads, H - h0));
    mla_split_kernel<<<dim3(unsigned(splits), unsigned(B)), kThreads, smem>>>(
        a.q.data<float>(), static_cast<const __nv_bfloat16*>(a.pool.raw()), a.block_table.data<int32_t>(),
        a.lengths.data<int32_t>(), s, h0, nh, a.scale, po.as<float>(), pm.as<float>(), pl.as<float>());
  }
  mla_merge_kernel<<<dim3(unsigned(H), unsigned(B)), 128>>>(po.as<float>(), pm.as<float>(), pl.as<float>(), s,
                                                            ptr<float>(a.out),
                                                            present(a.lse) ? ptr<float>(a.lse) : nullptr);
  check_launch("mla_decode");
}

}  // namespace dsv3
