// Absorbed-MLA decode (flash-decoding over the paged latent cache) on BF16 tensor cores.
// One CTA (4 warps) takes one sequence, a group of 16 heads and a contiguous range of its cache
// blocks, so every latent row is read from HBM once for all 16 heads (MLA's K and V are the same
// row). The 16 heads are exactly the M = 16 of an mma.sync m16n8k16, so:
//   scores S[16 heads, 32 tokens] = Q[16, W] · rowsᵀ     (each warp: 8 tokens, W/16 MMAs)
//   O[16 heads, R] += P[16, 32 tokens] · rows[:, 0:R]     (each warp: R/4 output columns)
// Rows arrive by cp.async in 32-token stages, double-buffered, with invalid rows zero-filled. The
// softmax is online per head; its row maxima are shared through shared memory so every thread
// rescales by the same factor, and each thread keeps partial row sums reduced once at the end.
// Splits of the block range are merged by a second kernel. Operands are BF16 (q and the softmax
// weights are rounded to BF16), accumulation FP32; the tolerance is the BF16-operand one.
#include "backend/cuda/common.cuh"
#include "backend/cuda/mla_decode.h"

namespace dsv3 {
using namespace cuda;

namespace {

constexpr int kBlock = 64;       // tokens per cache block (the paged cache's block size)
constexpr int kStage = 32;       // tokens per pipeline stage
constexpr int kHeads = 16;       // heads per CTA = MMA M
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kPad = 8;          // BF16 elements of row padding: 16 bytes, so ldmatrix rows avoid bank conflicts

struct Shape_ {
  int64_t b, h, w, r, layers, layer, max_blocks, splits, blocks_per_split;
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return uint32_t(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  int n = valid ? 16 : 0;  // 0 bytes read: the 16-byte destination is zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
// c += a·b, m16n8k16, BF16 operands, FP32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// R = kWarps · 8 · kNT output columns; W = kW = 576 (kv_lora_rank 512 + rope 64).
constexpr int kW = 576;
template <int kNT>
__global__ void __launch_bounds__(kThreads, 2)
    mla_split_kernel(const float* q, const __nv_bfloat16* pool, const int32_t* table, const int32_t* lengths,
                     Shape_ s, float scale, float* part_o, float* part_m, float* part_l) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int W = kW, ws = W + kPad;
  __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [16][ws]
  __nv_bfloat16* kv = qs + kHeads * ws;                             // [2][kStage][ws]
  __nv_bfloat16* ps = kv + 2 * kStage * ws;                         // [16][kStage + kPad]
  float* red = reinterpret_cast<float*>(ps + kHeads * (kStage + kPad));  // [kWarps][16]
  const int64_t hg = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int64_t h0 = hg * kHeads;
  const int nh = int(s.h - h0 < kHeads ? s.h - h0 : kHeads);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const int64_t len = lengths[b], nblk = (len + kBlock - 1) / kBlock;
  const int64_t blk0 = split * s.blocks_per_split;
  const int64_t blk1 = blk0 + s.blocks_per_split < nblk ? blk0 + s.blocks_per_split : nblk;
  const int64_t tok0 = blk0 * kBlock, tok1 = blk1 * kBlock < len ? blk1 * kBlock : len;
  const int64_t nstages = tok1 > tok0 ? (tok1 - tok0 + kStage - 1) / kStage : 0;

  // q → BF16 in shared memory (heads past nh are zero rows).
  for (int i = tid; i < kHeads * W; i += kThreads) {
    int h = i / W, j = i % W;
    qs[h * ws + j] = __float2bfloat16(h < nh ? q[((b * s.h + h0 + h) * s.w) + j] : 0.0f);
  }
  // A stage's 32 tokens lie in one 64-token cache block, whose rows are contiguous in the pool:
  // one table lookup per stage, then a straight copy of 32·W BF16 into padded shared rows.
  constexpr int kChunks = kW / 8;  // 16-byte pieces per row
  auto load_stage = [&](int64_t st, int buf) {
    const int64_t t_first = tok0 + st * kStage;
    const int64_t pb = table[b * s.max_blocks + t_first / kBlock];
    const __nv_bfloat16* src = pool + (((pb * s.layers + s.layer) * kBlock) + t_first % kBlock) * kW;
    const int valid_rows = int(tok1 - t_first < kStage ? tok1 - t_first : kStage);
    __nv_bfloat16* dst = kv + buf * kStage * ws;
#pragma unroll 4
    for (int i = tid; i < kStage * kChunks; i += kThreads) {
      const int r = i / kChunks, c = i - r * kChunks;
      cp_async16(dst + r * ws + c * 8, src + r * kW + c * 8, r < valid_rows);
    }
    cp_async_commit();
  };
  if (nstages > 0) load_stage(0, 0);

  float acc[kNT][4];
#pragma unroll
  for (int n = 0; n < kNT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  float m_lo = -INFINITY, m_hi = -INFINITY;  // running maxima of heads g and g + 8 (same in every thread)
  float l_lo = 0.0f, l_hi = 0.0f;            // this thread's partial sums

  for (int64_t st = 0; st < nstages; ++st) {
    const int buf = int(st & 1);
    if (st + 1 < nstages) {
      load_stage(st + 1, buf ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const __nv_bfloat16* rows = kv + buf * kStage * ws;
    // Scores: warp → tokens 8·warp .. 8·warp + 7.
    float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    {
      // Two accumulators on alternate k-steps: a chain of W/16 dependent MMAs would be latency-bound.
      float sc2[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const __nv_bfloat16* arow = qs + (lane & 15) * ws + (lane >> 4) * 8;
      const __nv_bfloat16* brow = rows + (warp * 8 + (lane & 7)) * ws + ((lane >> 3) & 1) * 8;
      int k0 = 0;
      for (; k0 + 32 <= W; k0 += 32) {
        // A matrices in mma order: (heads 0-7, k lo), (8-15, k lo), (0-7, k hi), (8-15, k hi).
        uint32_t a[4], bb[2], a2[4], bb2[2];
        ldmatrix_x4(a, arow + k0);
        ldmatrix_x2(bb, brow + k0);
        ldmatrix_x4(a2, arow + k0 + 16);
        ldmatrix_x2(bb2, brow + k0 + 16);
        mma_bf16(sc, a, bb[0], bb[1]);
        mma_bf16(sc2, a2, bb2[0], bb2[1]);
      }
      if (k0 < W) {
        uint32_t a[4], bb[2];
        ldmatrix_x4(a, arow + k0);
        ldmatrix_x2(bb, brow + k0);
        mma_bf16(sc, a, bb[0], bb[1]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) sc[i] += sc2[i];
    }
    // sc[0], sc[1]: head g, tokens 2·t4, 2·t4 + 1 of this warp's 8; sc[2], sc[3]: head g + 8.
    const int64_t tbase = tok0 + st * kStage + warp * 8 + 2 * t4;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      bool valid = tbase + (i & 1) < tok1;
      sc[i] = valid ? sc[i] * scale : -INFINITY;
    }
    float mx_lo = fmaxf(sc[0], sc[1]), mx_hi = fmaxf(sc[2], sc[3]);
    mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
    mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
    mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
    mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
    if (t4 == 0) {
      red[warp * kHeads + g] = mx_lo;
      red[warp * kHeads + g + 8] = mx_hi;
    }
    __syncthreads();
    float bm_lo = red[g], bm_hi = red[g + 8];
#pragma unroll
    for (int w2 = 1; w2 < kWarps; ++w2) {
      bm_lo = fmaxf(bm_lo, red[w2 * kHeads + g]);
      bm_hi = fmaxf(bm_hi, red[w2 * kHeads + g + 8]);
    }
    const float mn_lo = fmaxf(m_lo, bm_lo), mn_hi = fmaxf(m_hi, bm_hi);
    // A stage whose tokens are all masked keeps −inf maxima: exp(−inf − −inf) would be NaN.
    const float al_lo = mn_lo == -INFINITY ? 1.0f : __expf(m_lo - mn_lo);
    const float al_hi = mn_hi == -INFINITY ? 1.0f : __expf(m_hi - mn_hi);
    float p[4];
    p[0] = mn_lo == -INFINITY ? 0.0f : __expf(sc[0] - mn_lo);
    p[1] = mn_lo == -INFINITY ? 0.0f : __expf(sc[1] - mn_lo);
    p[2] = mn_hi == -INFINITY ? 0.0f : __expf(sc[2] - mn_hi);
    p[3] = mn_hi == -INFINITY ? 0.0f : __expf(sc[3] - mn_hi);
    l_lo = l_lo * al_lo + p[0] + p[1];
    l_hi = l_hi * al_hi + p[2] + p[3];
    m_lo = mn_lo;
    m_hi = mn_hi;
    const int pw = kStage + kPad;
    *reinterpret_cast<uint32_t*>(ps + g * pw + warp * 8 + 2 * t4) = pack_bf16(p[0], p[1]);
    *reinterpret_cast<uint32_t*>(ps + (g + 8) * pw + warp * 8 + 2 * t4) = pack_bf16(p[2], p[3]);
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
      acc[n][0] *= al_lo;
      acc[n][1] *= al_lo;
      acc[n][2] *= al_hi;
      acc[n][3] *= al_hi;
    }
    __syncthreads();
    // O += P · rows[:, cols of this warp]: k = tokens (2 steps of 16), n = 8 columns per tile.
#pragma unroll
    for (int k0 = 0; k0 < kStage; k0 += 16) {
      uint32_t a[4];
      ldmatrix_x4(a, ps + (lane & 15) * pw + k0 + (lane >> 4) * 8);
      const int col0 = warp * kNT * 8;
#pragma unroll
      for (int n = 0; n < kNT; n += 2) {
        // Matrices: (tokens k0..+7, cols c..c+7), (k0+8.., c..), (k0.., c+8..), (k0+8.., c+8..).
        const int mat = lane >> 3;
        const __nv_bfloat16* src =
            rows + (k0 + (mat & 1) * 8 + (lane & 7)) * ws + col0 + n * 8 + (mat >> 1) * 8;
        uint32_t bb[4];
        ldmatrix_x4_trans(bb, src);
        mma_bf16(acc[n], a, bb[0], bb[1]);
        mma_bf16(acc[n + 1], a, bb[2], bb[3]);
      }
    }
    __syncthreads();  // the next stage's load overwrites this buffer
  }

  // Row sums: reduce the quad, then the warps.
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
  if (t4 == 0) {
    red[warp * kHeads + g] = l_lo;
    red[warp * kHeads + g + 8] = l_hi;
  }
  __syncthreads();
  const int64_t base = (b * s.splits + split) * s.h + h0;
  if (tid < nh) {
    float l = 0.0f;
    for (int w2 = 0; w2 < kWarps; ++w2) l += red[w2 * kHeads + tid];
    part_l[base + tid] = l;
    // Every thread holds the same maxima; thread tid's are those of heads g and g + 8 of its lane.
  }
  if (t4 == 0 && warp == 0) {
    if (g < nh) part_m[base + g] = m_lo;
    if (g + 8 < nh) part_m[base + g + 8] = m_hi;
  }
#pragma unroll
  for (int n = 0; n < kNT; ++n) {
    const int col = warp * kNT * 8 + n * 8 + 2 * t4;
    if (g < nh) *reinterpret_cast<float2*>(part_o + (base + g) * s.r + col) = make_float2(acc[n][0], acc[n][1]);
    if (g + 8 < nh)
      *reinterpret_cast<float2*>(part_o + (base + g + 8) * s.r + col) = make_float2(acc[n][2], acc[n][3]);
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
  DSV3_CHECK(a.block_size == kBlock, "cuda_mla_decode: block_size must be ", kBlock, ", got ", a.block_size);
  DSV3_CHECK(W == kW && R == 512,
             "cuda_mla_decode: needs rows of 576 (kv_lora_rank 512 + rope 64, DeepSeek-V2/V3), got W=", W, " R=", R);
  DSV3_CHECK(a.out.shape() == Shape({B, H, R}) && a.lengths.numel() == B && a.block_table.dim(0) == B,
             "cuda_mla_decode: shapes of out/lengths/block_table do not match q ", a.q.shape().str());
  if (B == 0 || H == 0) return;
  int64_t max_blocks = a.block_table.dim(1);
  int64_t nblk = std::max<int64_t>(1, (std::max<int64_t>(a.max_len, 1) + kBlock - 1) / kBlock);
  DSV3_CHECK(nblk <= max_blocks, "cuda_mla_decode: max_len ", a.max_len, " exceeds the block table");
  // About two CTAs per SM (two fit), at least one cache block each; splits cost a merge pass over
  // B·splits·H·R partial sums, so no more than needed.
  int sms = 132;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  int64_t head_groups = (H + kHeads - 1) / kHeads;
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(nblk, (2 * sms + B * head_groups / 2) / (B * head_groups)));
  int64_t per = (nblk + splits - 1) / splits;
  splits = (nblk + per - 1) / per;
  Shape_ s{B, H, W, R, a.layers, a.layer, max_blocks, splits, per};
  Scratch po(size_t(B * splits * H * R) * 4), pm(size_t(B * splits * H) * 4), pl(size_t(B * splits * H) * 4);
  const size_t ws = size_t(W + kPad);
  size_t smem = (size_t(kHeads) * ws + 2 * size_t(kStage) * ws + size_t(kHeads) * (kStage + kPad)) * 2 +
                size_t(kWarps * kHeads) * 4;
  constexpr int kNT = 512 / (kWarps * 8);
  auto kernel = mla_split_kernel<kNT>;
  DSV3_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  // Head groups fastest: the CTAs reading the same rows are scheduled together and share them in L2.
  kernel<<<dim3(unsigned(head_groups), unsigned(splits), unsigned(B)), kThreads, smem>>>(
      a.q.data<float>(), static_cast<const __nv_bfloat16*>(a.pool.raw()), a.block_table.data<int32_t>(),
      a.lengths.data<int32_t>(), s, a.scale, po.as<float>(), pm.as<float>(), pl.as<float>());
  mla_merge_kernel<<<dim3(unsigned(H), unsigned(B)), 128>>>(po.as<float>(), pm.as<float>(), pl.as<float>(), s,
                                                            ptr<float>(a.out),
                                                            present(a.lse) ? ptr<float>(a.lse) : nullptr);
  check_launch("mla_decode");
}

}  // namespace dsv3
