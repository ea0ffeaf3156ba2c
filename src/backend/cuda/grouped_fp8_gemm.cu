// The FP8 experts' matmuls in one launch per pass: for every item e (an expert's Fprop, Dgrad or
// Wgrad), c_e[M_e, N] (+)= Σ_kb (A_e[:, kb]·B_e[:, kb]ᵀ) · sa_e · sb_e over the 128-code k-blocks
// kb, the operands and scales as the preparation launches write them for cuBLASLt (linear_lowp.h).
// cuBLASLt took one matmul per expert: on bench-0.7b's FP8 step ~3,200 launches of 8–13 µs (a
// 2,048 × 512 output fills half the SMs), ~180–270 TFLOP/s.
//
// CTA (item, tile) computes a 128 × 128 (or 64 × 128) tile of c_e on Hopper's warpgroup MMA with
// one warpgroup, one k-block per stage in a ring of three (four), loaded by cp.async (zero past
// the item's rows and past N) into 128-byte swizzled rows (a k-block of E4M3 is one such row).
// Each k-block's products go into fresh FP32 accumulators that are then scaled and added to the
// tile's (the recipe's promotion: the tensor cores' in-block sums are not FP32-exact, so a block's
// partial sum is promoted before the next one starts): acc += part·(sa·sb), the CPU emulation's
// order, with the multiply and add fused. Only rows < M_e and columns < N are written, so the rows
// cuBLASLt pads to 4 need no scratch. The tile leaves through shared memory, by a bulk copy (or bulk
// FP32 add, the same bits, subnormal old values included, tested) per row: loading an accumulating
// tile's old values into registers held each CTA for a global round trip, and the backward's
// launches (short K, large outputs) took 5–8% longer.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "backend/cuda/bulk.cuh"
#include "backend/cuda/common.cuh"
#include "backend/cuda/linear_lowp.h"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/stream.h"
#include "backend/cuda/wgmma.cuh"

namespace dsv3::cuda {
namespace {

constexpr int kCols = 128, kThreads = 128, kMaxItems = 64, kB = kCols * 128;

// H 64-row halves per tile (one warpgroup; its MMAs one half at a time into one set of partial
// accumulators): 64 × 128 tiles in a ring of four stages, or 128 × 128 in a ring of three, which
// read 24 and 32 KB per k-block for 2 and 4 MFLOP. Two CTAs per SM either way.
template <int H> struct Shape {
  static constexpr int rows = 64 * H, stages = H == 1 ? 4 : 3;
  static constexpr int a = rows * 128;             // bytes: rows × one k-block of codes
  static constexpr int stage = a + kB + 1024;       // A, B, A's row scales, B's column scales (at +512)
  static constexpr size_t smem = size_t(stages) * stage + 1024;  // + the 1,024-byte alignment
  static_assert(a % 1024 == 0 && stage % 1024 == 0, "operands start on the swizzle's 1,024 bytes");
};

struct Table {
  Fp8GroupItem item[kMaxItems];
  int tile_end[kMaxItems];  // item i's tiles end before CTA tile_end[i]
  int64_t N;
  bool bulk_out;  // fp8_gemm_kernel's tile leaves shared memory by bulk copies (put / put_add)
};

using Acc = float[16][4];

// a += p·(sa·sb) for the thread's rows (scales sa0, sa1) of a k-block's partial products p: sb the
// weight block's scale (b_block), else the columns' from cs (128 of them, the thread's at 8j + 2·t4).
// The recipe's promotion, in the CPU emulation's order, the multiply and add fused.
__device__ __forceinline__ void promote_rows(Acc& a, const Acc& p, float sa0, float sa1, bool b_block, float sb,
                                             const float* cs, int t4) {
  if (b_block) {
    const float f0 = sa0 * sb, f1 = sa1 * sb;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      a[j][0] = fmaf(p[j][0], f0, a[j][0]);
      a[j][1] = fmaf(p[j][1], f0, a[j][1]);
      a[j][2] = fmaf(p[j][2], f1, a[j][2]);
      a[j][3] = fmaf(p[j][3], f1, a[j][3]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const float2 c2 = *reinterpret_cast<const float2*>(cs + 8 * j + 2 * t4);
      a[j][0] = fmaf(p[j][0], sa0 * c2.x, a[j][0]);
      a[j][1] = fmaf(p[j][1], sa0 * c2.y, a[j][1]);
      a[j][2] = fmaf(p[j][2], sa1 * c2.x, a[j][2]);
      a[j][3] = fmaf(p[j][3], sa1 * c2.y, a[j][3]);
    }
  }
}

// Tile `tile` of a launch (CTA index, or a persistent CTA's count): its item and first row and
// column, in tiles of `rows` × kCols.
struct TileAt {
  int item;
  int64_t m0, n0;
};
__device__ __forceinline__ TileAt tile_at(const Table& t, int tile, int tiles_n, int rows) {
  int i = 0;
  while (tile >= t.tile_end[i]) ++i;
  const int local = tile - (i > 0 ? t.tile_end[i - 1] : 0);
  return {i, int64_t(local / tiles_n) * rows, int64_t(local % tiles_n) * kCols};
}

// One thread's share (tid of the 128 that load) of a tile's k-blocks: a stage holds k-block kb of
// rows m0.. of A and n0.. of B, 8 chunks of 16 codes per row, in Shape<H>'s layout. The thread
// takes chunk c of rows rb + 16·j (2,048 bytes apart when swizzled): 4·H of A's, 8 of B's (rows
// past M or N zero); threads 0-(16·H − 1) A's row scales, 32-63 B's 128 column scales
// (per-column grids only). Scale chunks past the grids are not loaded: their rows and columns are
// not written.
template <int H> struct TileLoad {
  static constexpr int kA = Shape<H>::a;
  const uint8_t *a_row, *b_row;
  int64_t stride, s_ld = 0;
  const float* s_src = nullptr;
  unsigned a_in = 0, b_in = 0;
  int off, s_dst = -1;

  __device__ TileLoad(const Fp8GroupItem& it, int64_t N, int64_t m0, int64_t n0, int tid) {
    const int c = tid & 7, rb = tid >> 3;
    off = wgmma::sw(rb, c);
    stride = 16 * it.K;
    a_row = static_cast<const uint8_t*>(it.a) + (m0 + rb) * it.K + c * 16;
    b_row = static_cast<const uint8_t*>(it.b) + (n0 + rb) * it.K + c * 16;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      a_in |= unsigned(j < 4 * H && m0 + rb + 16 * j < it.M) << j;
      b_in |= unsigned(n0 + rb + 16 * j < N) << j;
    }
    if (tid < 16 * H && m0 + 4 * tid < it.sa_ld) {
      s_src = it.sa + m0 + 4 * tid;
      s_ld = it.sa_ld;
      s_dst = kA + kB + tid * 16;
    } else if (tid >= 32 && tid < 64 && !it.b_block && n0 + 4 * (tid - 32) < N) {
      s_src = it.sb + n0 + 4 * (tid - 32);
      s_ld = it.sb_ld;
      s_dst = kA + kB + 512 + (tid - 32) * 16;
    }
  }
  // k-block kb into the stage at st by cp.async (not committed).
  __device__ __forceinline__ void operator()(unsigned char* st, int kb) const {
    const uint8_t* a_s = a_row + kb * 128;
    const uint8_t* b_s = b_row + kb * 128;
#pragma unroll
    for (int j = 0; j < 4 * H; ++j, a_s += stride) {
      const bool in = (a_in >> j) & 1u;
      cp_async16(st + off + j * 2048, in ? a_s : a_row, in);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j, b_s += stride) {
      const bool in = (b_in >> j) & 1u;
      cp_async16(st + kA + off + j * 2048, in ? b_s : b_row, in);
    }
    if (s_dst >= 0) cp_async16(st + s_dst, s_src + kb * s_ld);
  }
};

template <int H>
__global__ void __launch_bounds__(kThreads, 2) fp8_gemm_kernel(const __grid_constant__ Table t) {
  using S = Shape<H>;
  constexpr int kRows = S::rows, kStages = S::stages, kA = S::a, kStageBytes = S::stage;
  const int64_t N = t.N;
  const TileAt at = tile_at(t, int(blockIdx.x), int((N + kCols - 1) / kCols), kRows);
  const Fp8GroupItem& it = t.item[at.item];
  const int64_t M = it.M, m0 = at.m0, n0 = at.n0;
  const bool b_block = it.b_block;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* sm = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int steps = int(it.K / 128);
  const TileLoad<H> loader(it, N, m0, n0, tid);
  auto load = [&](int s, int slot) { loader(sm + slot * kStageBytes, s); };
  // k-block s's products of rows 64·h.. into p (wgmma, not waited for).
  auto issue = [&](int s, int h, Acc& p) {
    const uint32_t base = smem_addr(sm + (s % kStages) * kStageBytes);
    wgmma::fence_regs(p);
    wgmma::fence();
#pragma unroll
    for (int k = 0; k < 4; ++k)
      wgmma::mma_m64n128k32_e4m3(p, wgmma::desc_k(base + h * 8192 + 32 * k), wgmma::desc_k(base + kA + 32 * k), k);
    wgmma::commit();
  };
  const int row = 16 * w + g;  // the thread's rows of each half: row, row + 8
  const float* sb_block = it.sb + (n0 / kCols) * it.sb_ld;
  Acc acc[H], part;
#pragma unroll
  for (int j = 0; j < 16; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      part[j][e] = 0.0f;
#pragma unroll
      for (int h = 0; h < H; ++h) acc[h][j][e] = 0.0f;
    }
  // a += p·(sa·sb) with k-block s's scales for rows 64·h.. (sb: the block's, when b_block), once
  // p's products are in.
  auto promote = [&](int s, int h, Acc& a, Acc& p, float sb) {
    wgmma::fence_regs(p);
    const float* scales = reinterpret_cast<const float*>(sm + (s % kStages) * kStageBytes + kA + kB);
    promote_rows(a, p, scales[64 * h + row], scales[64 * h + row + 8], b_block, sb, scales + 128, t4);
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load(s, s);
    cp_async_commit();
  }
  for (int s = 0; s < steps; ++s) {
    const float sb = b_block ? __ldg(sb_block + s) : 0.0f;  // in flight while the products are
    cp_async_wait<kStages - 2>();
    wgmma::fence_async_smem();
    __syncthreads();  // stage s landed for every thread; k-block s − 1 promoted by all, its slot free
#pragma unroll
    for (int h = 0; h < H; ++h) {  // the halves in turn, through the one set of partial accumulators
      issue(s, h, part);
      if (h == 0) {  // the next stage's loads while the first half's products are computed
        if (s + kStages - 1 < steps) load(s + kStages - 1, (s + kStages - 1) % kStages);
        cp_async_commit();
      }
      wgmma::wait<0>();
      promote(s, h, acc[h], part, sb);
    }
  }

  // The tile goes out through shared memory (the ring is free once every warp's last products are
  // in): acc[h][j][e] is row 64·h + `row` + 8·(e >> 1), column 8·j + 2·t4 + (e & 1); then bulk
  // copies, or (DSV3_GROUPED_FP8_BULK=0) warp w writes rows w, w + 4, … as whole 512-byte rows, 64
  // rows at a time, with accumulate every old value loaded before any store.
  constexpr int kLd = kCols + 8;
  static_assert(kRows * kLd * 4 <= kStages * kStageBytes, "the tile fits in the ring");
  float* tile = reinterpret_cast<float*>(sm);
  __syncthreads();
#pragma unroll
  for (int h = 0; h < H; ++h)
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int j = 0; j < 16; ++j)
        *reinterpret_cast<float2*>(tile + (64 * h + row + 8 * half) * kLd + 8 * j + 2 * t4) =
            make_float2(acc[h][j][2 * half], acc[h][j][2 * half + 1]);
  if (t.bulk_out) {
    // A thread per row: one bulk copy (or bulk add) of the row's columns < N, 512 bytes at most; the
    // CTA waits only until they have read the tile, not for the global round trip of a load.
    bulk::refill_fence();  // the tile's ordinary stores, before the copies read it
    __syncthreads();
    const int64_t r = m0 + tid;
    if (tid < kRows && r < M) {
      const uint32_t bytes = uint32_t(4 * min(int64_t(kCols), N - n0));  // N − n0: a multiple of 16
      float* dst = it.c + r * N + n0;
      if (it.accumulate) bulk::put_add(dst, tile + tid * kLd, bytes);
      else bulk::put(dst, tile + tid * kLd, bytes);
      bulk::put_commit();
      bulk::put_wait_read();
    }
    return;
  }
  __syncthreads();
  const int64_t col = n0 + 4 * lane;  // N is a multiple of 16: col < N means col + 3 < N
  if (col >= N) return;
  float* out = it.c + col;
#pragma unroll
  for (int h = 0; h < H; ++h) {
    float4 v[16];
#pragma unroll
    for (int q = 0; q < 16; ++q) v[q] = *reinterpret_cast<const float4*>(tile + (64 * h + w + 4 * q) * kLd + 4 * lane);
    const int64_t r0 = m0 + 64 * h + w;
    if (it.accumulate) {
      float4 o[16];
#pragma unroll
      for (int q = 0; q < 16; ++q)
        if (r0 + 4 * q < M) o[q] = *reinterpret_cast<const float4*>(out + (r0 + 4 * q) * N);
#pragma unroll
      for (int q = 0; q < 16; ++q)
        v[q] = make_float4(o[q].x + v[q].x, o[q].y + v[q].y, o[q].z + v[q].z, o[q].w + v[q].w);
    }
#pragma unroll
    for (int q = 0; q < 16; ++q)
      if (r0 + 4 * q < M) *reinterpret_cast<float4*>(out + (r0 + 4 * q) * N) = v[q];
  }
}

// The warp-specialised persistent form (DSV3_GROUPED_FP8_WS=1 or set_grouped_fp8_ws): one CTA per
// SM walks tiles blockIdx.x, + gridDim.x, …; warpgroup 0 only loads, by cp.async into a ring of six
// 33 KB stages, running ahead across tile boundaries; warpgroups 1 and 2 each take 64 rows of the
// 128 × 128 tile and go out from registers, so the next tile's loads overlap a tile's epilogue and
// no CTA barrier sits in the k-loop. Stage handover on mbarriers: a loader thread arrives on
// full[s] once its copies of that stage have landed (it waits for them kWsLag stages later, then
// fences them for wgmma's async proxy); each consumer warp arrives on empty[s] once its products
// of the stage are in and its scales read. The arithmetic is fp8_gemm_kernel's, in its order.
// Stages in the 128-row kernel's layout (Shape<2>), six of them.
constexpr int kWsStages = 6, kWsLag = 4, kWsThreads = 384, kWsA = Shape<2>::a, kWsStage = Shape<2>::stage;
constexpr size_t kWsSmem = size_t(kWsStages) * kWsStage + 1024 + 2 * kWsStages * sizeof(uint64_t);
static_assert(kWsLag < kWsStages, "a loader waits for stages it issued before");

__global__ void __launch_bounds__(kWsThreads, 1) fp8_gemm_ws_kernel(const __grid_constant__ Table t, int tiles) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* sm = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(sm + kWsStages * kWsStage);
  uint64_t* empty = full + kWsStages;
  const int tid = threadIdx.x, wg = tid >> 7;
  const int64_t N = t.N;
  const int tiles_n = int((N + kCols - 1) / kCols);
  if (tid == 0) {
    bulk::init(full, kWsStages, 128);  // every loader thread
    bulk::init(empty, kWsStages, 8);   // every consumer warp
  }
  __syncthreads();

  if (wg == 0) {  // loader: fp8_gemm_kernel<2>'s loads, by the same 128 threads' shares
    int it = 0;  // k-blocks issued by this CTA
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const TileAt at = tile_at(t, tile, tiles_n, 128);
      const Fp8GroupItem& x = t.item[at.item];
      const TileLoad<2> load(x, N, at.m0, at.n0, tid);
      for (int kb = 0; kb < int(x.K / 128); ++kb, ++it) {
        const int slot = it % kWsStages;
        bulk::wait(empty + slot, ((it / kWsStages) & 1) ^ 1);  // the first pass finds every slot free
        load(sm + slot * kWsStage, kb);
        cp_async_commit();
        if (it >= kWsLag) {
          cp_async_wait<kWsLag>();
          wgmma::fence_async_smem();
          bulk::arrive(full + (it - kWsLag) % kWsStages);
        }
      }
    }
    cp_async_wait<0>();
    wgmma::fence_async_smem();
    for (int q = it > kWsLag ? it - kWsLag : 0; q < it; ++q) bulk::arrive(full + q % kWsStages);
    return;
  }

  const int half = wg - 1, w = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int row = 64 * half + 16 * w + g;  // the thread's rows of the tile: row, row + 8
  Acc acc;
  // k-block `itk`'s (the CTA's count) products of this warpgroup's rows into p, not waited for.
  auto issue = [&](Acc& p, int itk) {
    const int slot = itk % kWsStages;
    bulk::wait(full + slot, (itk / kWsStages) & 1);
    const uint32_t base = smem_addr(sm + slot * kWsStage);
    wgmma::fence_regs(p);
    wgmma::fence();
#pragma unroll
    for (int k = 0; k < 4; ++k)
      wgmma::mma_m64n128k32_e4m3(p, wgmma::desc_k(base + half * 8192 + 32 * k), wgmma::desc_k(base + kWsA + 32 * k),
                                 k);
    wgmma::commit();
  };
  // acc += p·(sa·sb) once p's products are in; then the stage is handed back.
  auto promote = [&](Acc& p, int itk, bool b_block, float sb) {
    wgmma::fence_regs(p);
    const int slot = itk % kWsStages;
    const float* scales = reinterpret_cast<const float*>(sm + slot * kWsStage + kWsA + kB);
    promote_rows(acc, p, scales[row], scales[row + 8], b_block, sb, scales + 128, t4);
    __syncwarp();
    if (lane == 0) bulk::arrive(empty + slot);
  };
  int it = 0;  // k-blocks consumed
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TileAt at = tile_at(t, tile, tiles_n, 128);
    const Fp8GroupItem& x = t.item[at.item];
    const int steps = int(x.K / 128);
    const bool b_block = x.b_block;
    const float* sb_block = x.sb + (at.n0 / kCols) * x.sb_ld;
    Acc part;  // the tile's: not live across tiles
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;
    for (int kb = 0; kb < steps; ++kb) {
      const float sb = b_block ? __ldg(sb_block + kb) : 0.0f;  // in flight while the products are
      issue(part, it + kb);
      wgmma::wait<0>();
      promote(part, it + kb, b_block, sb);
    }
    it += steps;
    // acc[j][e] is row `row` + 8·(e >> 1), column 8·j + 2·t4 + (e & 1): 32-byte pieces of 8 rows per
    // store instruction, whole sectors. With accumulate every old value of the row is loaded before
    // any store (a load after a store it may alias waits for it: one round trip per piece, which
    // made the backward's launches 1.8–2.6× slower).
    const int64_t M = x.M;
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const int64_t r = at.m0 + row + 8 * h2;
      if (r >= M) continue;
      float* out = x.c + r * N + at.n0 + 2 * t4;
      const int n_in = int(min(int64_t(16), (N - at.n0 - 2 * t4 + 7) / 8));  // pieces with col < N
      if (x.accumulate) {
        float2 o[16];
#pragma unroll
        for (int j = 0; j < 16; ++j)
          o[j] = j < n_in ? *reinterpret_cast<const float2*>(out + 8 * j) : make_float2(0.0f, 0.0f);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          acc[j][2 * h2] += o[j].x;
          acc[j][2 * h2 + 1] += o[j].y;
        }
      }
#pragma unroll
      for (int j = 0; j < 16; ++j)
        if (j < n_in) *reinterpret_cast<float2*>(out + 8 * j) = make_float2(acc[j][2 * h2], acc[j][2 * h2 + 1]);
    }
  }
}

std::atomic<int64_t> g_launches{0};
std::atomic<bool> g_on{on_unless_env_zero("DSV3_GROUPED_FP8")};
// Tile rows: 128 unless DSV3_GROUPED_FP8_ROWS=64 at start-up (or set_grouped_fp8_rows).
std::atomic<int> g_rows{[] {
  const char* v = std::getenv("DSV3_GROUPED_FP8_ROWS");
  return v && std::string(v) == "64" ? 64 : 128;
}()};
// fp8_gemm_kernel's tiles out by bulk copies unless DSV3_GROUPED_FP8_BULK=0 at start-up.
std::atomic<bool> g_bulk{on_unless_env_zero("DSV3_GROUPED_FP8_BULK")};
// The warp-specialised persistent kernel instead (128-row tiles): DSV3_GROUPED_FP8_WS=1 at start-up.
std::atomic<bool> g_ws{off_unless_env_one("DSV3_GROUPED_FP8_WS")};

bool fits(const Fp8GroupItem& it, int64_t N) {
  return it.K > 0 && it.K % 128 == 0 && aligned16(it.a) && aligned16(it.b) && aligned16(it.sa) && it.sa_ld % 4 == 0 &&
         it.sa_ld >= it.M && (it.b_block || (aligned16(it.sb) && it.sb_ld % 4 == 0 && it.sb_ld >= N)) &&
         aligned16(it.c);
}

}  // namespace

bool grouped_fp8_gemm(std::span<const Fp8GroupItem> items, int64_t N) {
  if (!g_on.load() || N <= 0 || N % 16 != 0) return false;
  for (const Fp8GroupItem& it : items)
    if (it.M > 0 && !fits(it, N)) return false;
  const bool ws = g_ws.load();
  const int h = !ws && g_rows.load() == 64 ? 1 : 2;
  static const bool smem_set = (allow_smem(fp8_gemm_kernel<1>, Shape<1>::smem),
                                allow_smem(fp8_gemm_kernel<2>, Shape<2>::smem),
                                allow_smem(fp8_gemm_ws_kernel, kWsSmem), true);
  (void)smem_set;
  const int64_t rows = 64 * h, tiles_n = (N + kCols - 1) / kCols;
  Table t{};
  t.N = N;
  t.bulk_out = g_bulk.load();
  int n = 0;
  int64_t tiles = 0;
  auto launch = [&] {
    if (n == 0) return;
    if (ws)
      fp8_gemm_ws_kernel<<<unsigned(std::min<int64_t>(tiles, sm_count())), kWsThreads, kWsSmem, stream()>>>(
          t, int(tiles));
    else if (h == 1)
      fp8_gemm_kernel<1><<<unsigned(tiles), kThreads, Shape<1>::smem, stream()>>>(t);
    else
      fp8_gemm_kernel<2><<<unsigned(tiles), kThreads, Shape<2>::smem, stream()>>>(t);
    check_launch("grouped FP8 GEMM");
    ++g_launches;
    n = 0;
    tiles = 0;
  };
  for (const Fp8GroupItem& it : items) {
    if (it.M <= 0) continue;
    if (n == kMaxItems) launch();
    t.item[n] = it;
    tiles += (it.M + rows - 1) / rows * tiles_n;
    DSV3_CHECK(tiles <= INT32_MAX, "grouped FP8 GEMM: ", tiles, " tiles exceed the launch grid");
    t.tile_end[n] = int(tiles);
    ++n;
  }
  launch();
  return true;
}

int64_t grouped_fp8_launches() { return g_launches.load(); }
void set_grouped_fp8(bool on) { g_on.store(on); }
void set_grouped_fp8_rows(int rows) { g_rows.store(rows == 64 ? 64 : 128); }
int grouped_fp8_rows() { return g_rows.load(); }
void set_grouped_fp8_ws(bool on) { g_ws.store(on); }
void set_grouped_fp8_bulk(bool on) { g_bulk.store(on); }
bool grouped_fp8_bulk() { return g_bulk.load(); }
bool grouped_fp8_ws() { return g_ws.load(); }
bool grouped_fp8() { return g_on.load(); }

}  // namespace dsv3::cuda
