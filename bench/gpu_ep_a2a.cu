// Expert-parallel dispatch/combine bandwidth over NVLink (issue #11), measured the way DeepEP's
// intranode test counts it, beside a plain NCCL all-to-all of the same size.
//
// Run as `mpirun -np N dsv3_bench_gpu_ep_a2a`: MPI only shares the ncclUniqueId; rank r drives GPU
// (local rank) and moves data with grouped ncclSend/ncclRecv on its own stream, timed by CUDA events.
// Per rank: T tokens of BF16 hidden states, E experts split in contiguous blocks over the N ranks,
// top-k picks drawn at random from seeded counters (src/dist/expert_parallel.h's design on the GPU):
//   dispatch  flag + layout kernels (per destination: which tokens have a pick there, their position
//             by a block scan) → pack kernel (quantize each 1×128 tile to E4M3 with s = amax/448 as
//             backend/fp8.h, write [payload | F32 scales | token id | K expert ids | K weights] once
//             per destination rank; ids/weights of picks owned by another rank are -1/0) → counts
//             exchanged (N ints) → grouped send/recv of the rows.
//   expert    (not timed) each arrived row → BF16 (dequantized payload × sum of its local weights).
//   combine   those rows go back to their sources, which add them per token in rank order (FP32
//             sum, BF16 out).
// Check (before timing, from the same seeds on the host): every received row's bytes equal what the
// sender must have packed (payload and scales from the CPU reference quantize_fp8, metadata); the
// combined output equals the host sum of the same products in the same order, bitwise. Any mismatch
// → exit 1 (the timings are still written); --inject-error shows that the check fails.
// Bytes, as DeepEP's tests/test_intranode.py counts them: dispatch = received rows × (H + 4·H/128)
// (FP8 payload plus scales, the rank's own rows included, metadata not counted); combine = the same
// rows × H × 2 (BF16). "NVLink" columns count only rows that cross to or from another rank.
// Writes bench/results/gpu_ep_a2a.json (relative to the working directory; rank 0).
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cerrno>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <string>
#include <vector>

#if DSV3_HAVE_MPI && DSV3_HAVE_NCCL
#include <mpi.h>
#include <nccl.h>
#include <unistd.h>

#include <cub/block/block_scan.cuh>
#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "core/error.h"
#include "core/rng.h"
#include "core/tensor.h"
#include "backend/fp8.h"

using namespace dsv3;

namespace {

// Any CUDA or NCCL failure ends the whole job (a rank that returned alone would leave its peers waiting).
void die_if(bool bad, const char* call, int line, const char* why) {
  if (!bad) return;
  std::fprintf(stderr, "%s failed at line %d: %s\n", call, line, why);
  MPI_Abort(MPI_COMM_WORLD, 1);
}
void fail_on(cudaError_t e, const char* call, int line) { die_if(e != cudaSuccess, call, line, cudaGetErrorString(e)); }
void fail_on(ncclResult_t e, const char* call, int line) { die_if(e != ncclSuccess, call, line, ncclGetErrorString(e)); }
#define CU(x) fail_on((x), #x, __LINE__)
#define NC(x) fail_on((x), #x, __LINE__)

constexpr int kTile = 128;

struct Opts {
  int64_t tokens = 4096, hidden = 7168, experts = 256, top_k = 8, iters = 50, warmup = 10, seed = 1;
  int64_t groups = 8, topk_groups = 4;
  std::string routing = "uniform", out = "bench/results/gpu_ep_a2a.json";
  bool inject_error = false;
};

const char* kHelp =
    "dsv3_bench_gpu_ep_a2a: expert-parallel dispatch/combine bandwidth (run under mpirun -np N)\n"
    "  --tokens N        tokens per rank (default 4096)\n"
    "  --hidden H        hidden size, a multiple of 128 (default 7168)\n"
    "  --experts E       routed experts, a multiple of the rank count (default 256)\n"
    "  --top-k K         picks per token (default 8)\n"
    "  --routing R       uniform (K distinct experts at random) or group (V3's shape: --topk-groups of\n"
    "                    --groups groups at random, then K experts among them) (default uniform)\n"
    "  --groups G        expert groups for --routing group (default 8)\n"
    "  --topk-groups M   groups kept per token for --routing group (default 4)\n"
    "  --iters I         timed iterations of each phase, at least 20 (default 50)\n"
    "  --warmup W        untimed iterations first (default 10)\n"
    "  --seed S          seed of the hidden states and the routing (default 1)\n"
    "  --out PATH        JSON written by rank 0 (default bench/results/gpu_ep_a2a.json)\n"
    "  --inject-error    flip one received bit before the check, which must then fail (exit 1); no timing\n"
    "  --help            this text\n";

int64_t parse_int(const std::string& flag, const std::string& v, int64_t lo, int64_t hi = int64_t(1) << 30) {
  char* end = nullptr;
  errno = 0;
  long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end || errno || x < lo || x > hi)
    input_error(flag, ": expected an integer in [", lo, ", ", hi, "], got '", v, "'");
  return x;
}

// Returns false for --help.
bool parse(int argc, char** argv, Opts& o, int nranks) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i], v;
    if (a == "--help" || a == "-h") return false;
    if (a == "--inject-error") {
      o.inject_error = true;
      continue;
    }
    size_t eq = a.find('=');
    if (eq != std::string::npos) {
      v = a.substr(eq + 1);
      a = a.substr(0, eq);
    } else if (a.rfind("--", 0) == 0 && i + 1 < argc) {
      v = argv[++i];
    } else {
      input_error("argument '", a, "': expected --flag VALUE (see --help)");
    }
    if (a == "--tokens") o.tokens = parse_int(a, v, 1);
    else if (a == "--hidden") o.hidden = parse_int(a, v, kTile);
    else if (a == "--experts") o.experts = parse_int(a, v, 1);
    else if (a == "--top-k") o.top_k = parse_int(a, v, 1, 1024);
    else if (a == "--groups") o.groups = parse_int(a, v, 1);
    else if (a == "--topk-groups") o.topk_groups = parse_int(a, v, 1);
    else if (a == "--iters") o.iters = parse_int(a, v, 20);
    else if (a == "--warmup") o.warmup = parse_int(a, v, 0);
    else if (a == "--seed") o.seed = parse_int(a, v, 0);
    else if (a == "--routing") o.routing = v;
    else if (a == "--out") o.out = v;
    else input_error("unknown flag '", a, "' (see --help)");
  }
  if (o.hidden % kTile) input_error("--hidden ", o.hidden, ": expected a multiple of ", kTile);
  if (o.experts % nranks) input_error("--experts ", o.experts, ": expected a multiple of the rank count ", nranks);
  if (o.top_k > o.experts) input_error("--top-k ", o.top_k, ": expected at most --experts ", o.experts);
  if (o.routing != "uniform" && o.routing != "group")
    input_error("--routing '", o.routing, "': expected uniform or group");
  if (o.routing == "group") {
    if (o.experts % o.groups) input_error("--groups ", o.groups, ": expected a divisor of --experts ", o.experts);
    if (o.topk_groups > o.groups) input_error("--topk-groups ", o.topk_groups, ": expected at most --groups");
    if (o.top_k > o.topk_groups * (o.experts / o.groups))
      input_error("--top-k ", o.top_k, ": more than the experts of --topk-groups groups");
  }
  if (o.tokens * o.hidden > (int64_t(1) << 31)) input_error("--tokens × --hidden: expected at most 2^31 elements");
  return true;
}

// Byte layout of one dispatched row; the stride keeps every row 16-byte aligned.
struct RowLayout {
  int H, K, tiles;
  size_t scale_off, token_off, ids_off, w_off, stride;
};
RowLayout row_layout(int H, int K) {
  RowLayout L{H, K, H / kTile, 0, 0, 0, 0, 0};
  L.scale_off = size_t(H);
  L.token_off = L.scale_off + size_t(L.tiles) * 4;
  L.ids_off = L.token_off + 4;
  L.w_off = L.ids_off + size_t(K) * 4;
  L.stride = (L.w_off + size_t(K) * 4 + 15) / 16 * 16;
  return L;
}

// ---------------------------------------------------------------------------------------------
// Kernels

// flags[d·T + t] = 1 when token t has a pick on rank d (one thread per token).
__global__ void flag_kernel(const int32_t* ids, int T, int K, int N, int epr, uint8_t* flags) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= T) return;
  for (int d = 0; d < N; ++d) {
    bool has = false;
    for (int k = 0; k < K; ++k) has |= ids[t * K + k] / epr == d;
    flags[size_t(d) * T + t] = has;
  }
}

// Block d: pos[d·T + t] = the token's row among those this rank sends to d (ascending tokens), or -1.
__global__ void layout_kernel(const uint8_t* flags, int T, int32_t* pos, int32_t* counts) {
  using Scan = cub::BlockScan<int, 1024>;
  __shared__ typename Scan::TempStorage tmp;
  const int d = blockIdx.x, per = (T + 1023) / 1024, t0 = threadIdx.x * per, t1 = min(T, t0 + per);
  const uint8_t* f = flags + size_t(d) * T;
  int n = 0;
  for (int t = t0; t < t1; ++t) n += f[t];
  int off = 0, total = 0;
  Scan(tmp).ExclusiveSum(n, off, total);
  for (int t = t0; t < t1; ++t) pos[size_t(d) * T + t] = f[t] ? off++ : -1;
  if (threadIdx.x == 0) counts[d] = total;
}

__device__ float tile_scale(float amax) {  // backend/fp8.h: amax/448, zero tile → 1, underflow → min
  if (amax == 0.0f) return 1.0f;
  float s = amax / 448.0f;
  return s == 0.0f ? FLT_TRUE_MIN : s;
}

// One CTA per token: each warp quantizes two 1×128 tiles at a time and stores the codes and scale
// into every destination row of the token; the first threads write the metadata.
__global__ void pack_kernel(const uint16_t* x, const int32_t* ids, const float* w, const int32_t* pos,
                            const int32_t* counts, int T, int N, int epr, RowLayout L, uint8_t* send) {
  extern __shared__ unsigned long long smem[];
  uint8_t** rows = reinterpret_cast<uint8_t**>(smem);
  int* dst = reinterpret_cast<int*>(smem + N);
  __shared__ int nd;
  const int t = blockIdx.x;
  if (threadIdx.x == 0) {
    int off = 0, n = 0;
    for (int d = 0; d < N; ++d) {
      int p = pos[size_t(d) * T + t];
      if (p >= 0) {
        rows[n] = send + size_t(off + p) * L.stride;
        dst[n++] = d;
      }
      off += counts[d];
    }
    nd = n;
  }
  __syncthreads();
  // Half a warp per tile, 8 elements (16 bytes) per lane; both halves take part in every shuffle.
  const int lane = threadIdx.x & 15, half = (threadIdx.x >> 4) & 1, nw = blockDim.x / 32;
  for (int pair = threadIdx.x / 32; 2 * pair < L.tiles; pair += nw) {
    const int tile = 2 * pair + half;
    const bool live = tile < L.tiles;
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (live) raw = *reinterpret_cast<const uint4*>(x + size_t(t) * L.H + size_t(tile) * kTile + lane * 8);
    const uint32_t u[4] = {raw.x, raw.y, raw.z, raw.w};
    float f[8], amax = 0.0f;
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(u[i] << 16);
      f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
      amax = fmaxf(amax, fmaxf(fabsf(f[2 * i]), fabsf(f[2 * i + 1])));
    }
    for (int m = 8; m; m >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
    const float s = tile_scale(amax);
    uint32_t q[2] = {0, 0};
    for (int i = 0; i < 8; ++i)
      q[i / 4] |= uint32_t(__nv_cvt_float_to_fp8(f[i] / s, __NV_SATFINITE, __NV_E4M3)) << (8 * (i % 4));
    if (!live) continue;
    for (int j = 0; j < nd; ++j) {
      *reinterpret_cast<uint2*>(rows[j] + size_t(tile) * kTile + lane * 8) = make_uint2(q[0], q[1]);
      if (lane == 0) *reinterpret_cast<float*>(rows[j] + L.scale_off + size_t(tile) * 4) = s;
    }
  }
  for (int j = threadIdx.x; j < nd; j += blockDim.x) {
    uint8_t* r = rows[j];
    *reinterpret_cast<int32_t*>(r + L.token_off) = t;
    for (int k = 0; k < L.K; ++k) {
      const int e = ids[t * L.K + k];
      const bool own = e / epr == dst[j];
      reinterpret_cast<int32_t*>(r + L.ids_off)[k] = own ? e : -1;
      reinterpret_cast<float*>(r + L.w_off)[k] = own ? w[t * L.K + k] : 0.0f;
    }
  }
}

__device__ float e4m3_value(uint32_t b) {
  __nv_fp8_e4m3 v;
  v.__x = __nv_fp8_storage_t(b & 0xffu);
  return float(v);
}
__device__ uint32_t bf16_bits(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }

// The stand-in for the experts: partial[r] = dequant(row r) × Σ (its weights of local picks, k order).
__global__ void expert_kernel(const uint8_t* recv, RowLayout L, uint16_t* part) {
  const uint8_t* row = recv + size_t(blockIdx.x) * L.stride;
  __shared__ float ws;
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int k = 0; k < L.K; ++k)
      if (reinterpret_cast<const int32_t*>(row + L.ids_off)[k] >= 0) s += reinterpret_cast<const float*>(row + L.w_off)[k];
    ws = s;
  }
  __syncthreads();
  const float* sc = reinterpret_cast<const float*>(row + L.scale_off);
  for (int i = threadIdx.x * 4; i < L.H; i += blockDim.x * 4) {
    const uint32_t q = *reinterpret_cast<const uint32_t*>(row + i);
    const float s = sc[i / kTile];
    uint32_t b[4];
    for (int j = 0; j < 4; ++j) {
      const float v = e4m3_value(q >> (8 * j)) * s;
      b[j] = bf16_bits(v * ws);
    }
    *reinterpret_cast<uint2*>(part + size_t(blockIdx.x) * L.H + i) = make_uint2(b[0] | b[1] << 16, b[2] | b[3] << 16);
  }
}

// One CTA per token: out[t] = BF16(Σ over destination ranks in rank order of the returned rows), FP32 sum.
__global__ void reduce_kernel(const uint16_t* back, const int32_t* pos, const int32_t* counts, int T, int N, int H,
                              uint16_t* out) {
  extern __shared__ unsigned long long smem[];
  size_t* rows = reinterpret_cast<size_t*>(smem);
  __shared__ int nd;
  const int t = blockIdx.x;
  if (threadIdx.x == 0) {
    int off = 0, n = 0;
    for (int d = 0; d < N; ++d) {
      int p = pos[size_t(d) * T + t];
      if (p >= 0) rows[n++] = size_t(off + p) * H;
      off += counts[d];
    }
    nd = n;
  }
  __syncthreads();
  for (int i = threadIdx.x * 8; i < H; i += blockDim.x * 8) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int j = 0; j < nd; ++j) {
      const uint4 v = *reinterpret_cast<const uint4*>(back + rows[j] + i);
      const uint32_t u[4] = {v.x, v.y, v.z, v.w};
      for (int m = 0; m < 4; ++m) {
        acc[2 * m] += __uint_as_float(u[m] << 16);
        acc[2 * m + 1] += __uint_as_float(u[m] & 0xffff0000u);
      }
    }
    uint4 o;
    uint32_t* ou = &o.x;
    for (int m = 0; m < 4; ++m) ou[m] = bf16_bits(acc[2 * m]) | bf16_bits(acc[2 * m + 1]) << 16;
    *reinterpret_cast<uint4*>(out + size_t(t) * H + i) = o;
  }
}

// ---------------------------------------------------------------------------------------------
// Inputs (host, from counters, so every rank can rebuild any rank's data) and the host reference

// BF16 hidden states of rank `src`: uniform(-1, 1) times a power of two that varies by tile, so
// scales differ, and an occasional all-zero tile (the scale-1 case).
std::vector<uint16_t> make_x(const Opts& o, int src) {
  const int64_t T = o.tokens, H = o.hidden;
  std::vector<uint16_t> x(size_t(T * H));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t tile = h / kTile;
      float v = 0.0f;
      if ((t * 131 + tile) % 509 != 0) {
        const float u = float(rng_u64(uint64_t(o.seed), 2000 + uint64_t(src), uint64_t(t * H + h)) >> 40) *
                        (1.0f / 16777216.0f);
        v = std::ldexp(2.0f * u - 1.0f, int((t * 3 + tile) % 11) - 5);
      }
      x[size_t(t * H + h)] = float_to_bf16(v);
    }
  return x;
}

// Top-k ids (distinct, draw order) and weights (normalised to sum 1) of rank `src`.
void make_routing(const Opts& o, int src, std::vector<int32_t>& ids, std::vector<float>& w) {
  const int64_t T = o.tokens, K = o.top_k, E = o.experts;
  Rng g{uint64_t(o.seed) * 1000003 + 7, uint64_t(src) << 40};
  ids.assign(size_t(T * K), 0);
  w.assign(size_t(T * K), 0.0f);
  std::vector<int32_t> cand, grp(size_t(o.groups));
  for (int64_t t = 0; t < T; ++t) {
    cand.clear();
    if (o.routing == "group") {
      const int64_t per = E / o.groups;
      for (int64_t i = 0; i < o.groups; ++i) grp[size_t(i)] = int32_t(i);
      for (int64_t i = 0; i < o.topk_groups; ++i) {
        std::swap(grp[size_t(i)], grp[size_t(i + int64_t(g.below(uint64_t(o.groups - i))))]);
        for (int64_t e = 0; e < per; ++e) cand.push_back(int32_t(grp[size_t(i)] * per + e));
      }
    } else {
      for (int64_t e = 0; e < E; ++e) cand.push_back(int32_t(e));
    }
    float sum = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t n = int64_t(cand.size());
      std::swap(cand[size_t(k)], cand[size_t(k + int64_t(g.below(uint64_t(n - k))))]);
      ids[size_t(t * K + k)] = cand[size_t(k)];
      w[size_t(t * K + k)] = g.uniform() + 1.0f / 16777216.0f;
      sum += w[size_t(t * K + k)];
    }
    for (int64_t k = 0; k < K; ++k) w[size_t(t * K + k)] /= sum;
  }
}

// x quantized by the project's CPU reference (backend/fp8.h, 1×128 tiles, amax/448): what the pack
// kernel must have produced. q [T, H] E4M3 bytes, scale [T, H/128].
void reference_fp8(const std::vector<uint16_t>& x, int64_t T, int64_t H, std::vector<uint8_t>& q,
                   std::vector<float>& scale) {
  QuantizeFp8Args a;
  a.x = Tensor::empty(DType::F32, Shape{T, H});
  float* xf = a.x.data<float>();
  for (size_t i = 0; i < x.size(); ++i) xf[i] = bf16_to_float(x[i]);
  a.q = Tensor::empty(DType::F8_E4M3, Shape{T, H});
  a.scale = Tensor::empty(DType::F32, Shape{T, H / kTile});
  quantize_fp8(a);
  const uint8_t* qp = static_cast<const uint8_t*>(a.q.raw());  // E4M3 codes as bytes
  const float* sp = a.scale.data<float>();
  q.assign(qp, qp + T * H);
  scale.assign(sp, sp + T * (H / kTile));
}

// ---------------------------------------------------------------------------------------------

struct Ctx {
  Opts o;
  int rank = 0, N = 1, epr = 0;
  RowLayout L{};
  ncclComm_t comm{};
  cudaStream_t st{};
  uint16_t *x = nullptr, *part = nullptr, *back = nullptr, *out = nullptr;
  int32_t *ids = nullptr, *pos = nullptr, *cnt = nullptr;  // cnt: [send counts N | recv counts N]
  float* w = nullptr;
  uint8_t *send = nullptr, *recv = nullptr, *flags = nullptr;
  int32_t* hcnt = nullptr;  // pinned copy of cnt
  std::vector<int64_t> soff, roff;
  int64_t rows_sent = 0, rows_recv = 0, rows_recv_remote = 0, rows_sent_remote = 0;
};

// Grouped point-to-point: peer j gets sc[j] units from send + so[j], we get rc[j] from recv + ro[j].
void exchange(Ctx& c, const void* send, const int64_t* sc, const int64_t* so, void* recv, const int64_t* rc,
              const int64_t* ro, size_t unit) {
  NC(ncclGroupStart());
  for (int j = 0; j < c.N; ++j) {
    if (sc[j] > 0) NC(ncclSend(static_cast<const uint8_t*>(send) + size_t(so[j]) * unit, size_t(sc[j]) * unit, ncclUint8, j, c.comm, c.st));
    if (rc[j] > 0) NC(ncclRecv(static_cast<uint8_t*>(recv) + size_t(ro[j]) * unit, size_t(rc[j]) * unit, ncclUint8, j, c.comm, c.st));
  }
  NC(ncclGroupEnd());
}

// One dispatch; ms[0..3] = pack (layout + quantize), count exchange, host turnaround (the stream
// waits for the host to read the counts and post the row exchange), row exchange.
void dispatch(Ctx& c, cudaEvent_t* ev, float* ms) {
  const int T = int(c.o.tokens), K = int(c.o.top_k), N = c.N;
  CU(cudaEventRecord(ev[0], c.st));
  flag_kernel<<<(T + 255) / 256, 256, 0, c.st>>>(c.ids, T, K, N, c.epr, c.flags);
  layout_kernel<<<N, 1024, 0, c.st>>>(c.flags, T, c.pos, c.cnt);
  pack_kernel<<<T, 256, size_t(N) * 12, c.st>>>(c.x, c.ids, c.w, c.pos, c.cnt, T, N, c.epr, c.L, c.send);
  CU(cudaGetLastError());
  CU(cudaEventRecord(ev[1], c.st));
  NC(ncclGroupStart());
  for (int j = 0; j < N; ++j) {
    NC(ncclSend(c.cnt + j, 1, ncclInt32, j, c.comm, c.st));
    NC(ncclRecv(c.cnt + N + j, 1, ncclInt32, j, c.comm, c.st));
  }
  NC(ncclGroupEnd());
  CU(cudaMemcpyAsync(c.hcnt, c.cnt, size_t(2 * N) * 4, cudaMemcpyDeviceToHost, c.st));
  CU(cudaEventRecord(ev[2], c.st));
  CU(cudaStreamSynchronize(c.st));
  std::vector<int64_t> sc(static_cast<size_t>(N)), rc(static_cast<size_t>(N));
  c.soff.assign(size_t(N) + 1, 0);
  c.roff.assign(size_t(N) + 1, 0);
  for (int j = 0; j < N; ++j) {
    sc[size_t(j)] = c.hcnt[j];
    rc[size_t(j)] = c.hcnt[N + j];
    c.soff[size_t(j) + 1] = c.soff[size_t(j)] + sc[size_t(j)];
    c.roff[size_t(j) + 1] = c.roff[size_t(j)] + rc[size_t(j)];
  }
  CU(cudaEventRecord(ev[3], c.st));
  exchange(c, c.send, sc.data(), c.soff.data(), c.recv, rc.data(), c.roff.data(), c.L.stride);
  CU(cudaEventRecord(ev[4], c.st));
  CU(cudaStreamSynchronize(c.st));
  for (int i = 0; i < 4; ++i) CU(cudaEventElapsedTime(&ms[i], ev[i], ev[i + 1]));
  c.rows_sent = c.soff[size_t(N)];
  c.rows_recv = c.roff[size_t(N)];
  c.rows_recv_remote = c.rows_recv - rc[size_t(c.rank)];
  c.rows_sent_remote = c.rows_sent - sc[size_t(c.rank)];
}

// One combine (the expert kernel has already filled c.part); ms[0..1] = exchange, reduce.
void combine(Ctx& c, cudaEvent_t* ev, float* ms) {
  const int N = c.N;
  std::vector<int64_t> sc(static_cast<size_t>(N)), rc(static_cast<size_t>(N));
  for (int j = 0; j < N; ++j) {
    sc[size_t(j)] = c.roff[size_t(j) + 1] - c.roff[size_t(j)];  // back to the sources
    rc[size_t(j)] = c.soff[size_t(j) + 1] - c.soff[size_t(j)];
  }
  CU(cudaEventRecord(ev[0], c.st));
  exchange(c, c.part, sc.data(), c.roff.data(), c.back, rc.data(), c.soff.data(), size_t(c.o.hidden) * 2);
  CU(cudaEventRecord(ev[1], c.st));
  reduce_kernel<<<int(c.o.tokens), 256, size_t(N) * 8, c.st>>>(c.back, c.pos, c.cnt, int(c.o.tokens), N, int(c.o.hidden), c.out);
  CU(cudaGetLastError());
  CU(cudaEventRecord(ev[2], c.st));
  CU(cudaStreamSynchronize(c.st));
  for (int i = 0; i < 2; ++i) CU(cudaEventElapsedTime(&ms[i], ev[i], ev[i + 1]));
}

// Host check of the first dispatch + combine. Returns the JSON record; "passed" false on any mismatch.
nlohmann::json check(Ctx& c) {
  const Opts& o = c.o;
  const int64_t T = o.tokens, H = o.hidden, K = o.top_k;
  const RowLayout& L = c.L;
  std::vector<uint8_t> recv(size_t(c.rows_recv) * L.stride);
  std::vector<uint16_t> out(size_t(T * H));
  CU(cudaMemcpy(recv.data(), c.recv, recv.size(), cudaMemcpyDeviceToHost));
  CU(cudaMemcpy(out.data(), c.out, out.size() * 2, cudaMemcpyDeviceToHost));
  auto owner = [&](int32_t e) { return int(e / c.epr); };
  int64_t bad_rows = 0, bad_counts = 0, rows_checked = 0;
  std::string first_bad;
  std::vector<uint8_t> want(L.stride);
  std::vector<uint8_t> mine_q;
  std::vector<float> mine_scale;
  std::vector<int32_t> mine_ids;
  std::vector<float> mine_w;
  for (int s = 0; s < c.N; ++s) {
    std::vector<uint8_t> q;
    std::vector<float> scale;
    reference_fp8(make_x(o, s), T, H, q, scale);
    std::vector<int32_t> ids;
    std::vector<float> w;
    make_routing(o, s, ids, w);
    int64_t n = 0;
    for (int64_t t = 0; t < T; ++t) {
      bool to_me = false;
      for (int64_t k = 0; k < K; ++k) to_me |= owner(ids[size_t(t * K + k)]) == c.rank;
      if (!to_me) continue;
      if (n < c.roff[size_t(s) + 1] - c.roff[size_t(s)]) {
        std::memset(want.data(), 0, want.size());
        std::memcpy(want.data(), &q[size_t(t * H)], size_t(H));
        std::memcpy(&want[L.scale_off], &scale[size_t(t * L.tiles)], size_t(L.tiles) * 4);
        int32_t tok = int32_t(t);
        std::memcpy(&want[L.token_off], &tok, 4);
        for (int64_t k = 0; k < K; ++k) {
          int32_t e = ids[size_t(t * K + k)];
          bool own = owner(e) == c.rank;
          int32_t id = own ? e : -1;
          float wk = own ? w[size_t(t * K + k)] : 0.0f;
          std::memcpy(&want[L.ids_off + size_t(k) * 4], &id, 4);
          std::memcpy(&want[L.w_off + size_t(k) * 4], &wk, 4);
        }
        const uint8_t* got = &recv[size_t(c.roff[size_t(s)] + n) * L.stride];
        if (std::memcmp(got, want.data(), L.w_off + size_t(K) * 4) != 0) {
          if (!bad_rows) first_bad = cat("row from rank ", s, " token ", t);
          ++bad_rows;
        }
        ++rows_checked;
      }
      ++n;
    }
    if (n != c.roff[size_t(s) + 1] - c.roff[size_t(s)]) ++bad_counts;
    if (s == c.rank) {
      mine_q = std::move(q);
      mine_scale = std::move(scale);
      mine_ids = std::move(ids);
      mine_w = std::move(w);
    }
  }
  // Combined output: per destination in rank order, BF16(deq(q)·Σ local weights), summed in FP32.
  int64_t bad_out = 0;
  double max_diff = 0;
  std::vector<float> acc(static_cast<size_t>(H)), deq(static_cast<size_t>(H));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h)
      deq[size_t(h)] = e4m3_to_float(mine_q[size_t(t * H + h)]) * mine_scale[size_t(t * L.tiles + h / kTile)];
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int d = 0; d < c.N; ++d) {
      bool any = false;
      float ws = 0.0f;
      for (int64_t k = 0; k < K; ++k)
        if (owner(mine_ids[size_t(t * K + k)]) == d) {
          any = true;
          ws += mine_w[size_t(t * K + k)];
        }
      if (!any) continue;
      for (int64_t h = 0; h < H; ++h) acc[size_t(h)] += bf16_to_float(float_to_bf16(deq[size_t(h)] * ws));
    }
    for (int64_t h = 0; h < H; ++h) {
      uint16_t ref = float_to_bf16(acc[size_t(h)]), got = out[size_t(t * H + h)];
      if (ref != got) {
        ++bad_out;
        max_diff = std::max(max_diff, double(std::fabs(bf16_to_float(ref) - bf16_to_float(got))));
      }
    }
  }
  const bool ok = !bad_rows && !bad_counts && !bad_out;
  nlohmann::json j = {{"passed", ok},
                      {"rows_checked", rows_checked},
                      {"row_mismatches", bad_rows},
                      {"count_mismatches", bad_counts},
                      {"output_elements", T * H},
                      {"output_mismatches", bad_out},
                      {"output_max_abs_diff", max_diff},
                      {"tolerance", "bitwise: rows (payload, scales, token, ids, weights) and BF16 output"}};
  if (!ok)
    std::fprintf(stderr, "rank %d: CHECK FAILED: %lld bad rows (first: %s), %lld bad counts, %lld bad outputs (max diff %g)\n",
                 c.rank, (long long)bad_rows, first_bad.c_str(), (long long)bad_counts, (long long)bad_out, max_diff);
  return j;
}

struct Stat {
  double med = 0, min = 0;
};
Stat stat_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v.front()};
}

// Balanced all-to-all of `per_peer` bytes to every rank (self included): the roofline beside the EP numbers.
Stat plain_a2a(Ctx& c, uint8_t* send, uint8_t* recv, int64_t per_peer, cudaEvent_t* ev) {
  std::vector<int64_t> n(size_t(c.N), per_peer), off(size_t(c.N));
  for (int j = 0; j < c.N; ++j) off[size_t(j)] = j * per_peer;
  std::vector<double> t;
  for (int64_t it = 0; it < c.o.warmup + c.o.iters; ++it) {
    MPI_Barrier(MPI_COMM_WORLD);
    CU(cudaEventRecord(ev[0], c.st));
    exchange(c, send, n.data(), off.data(), recv, n.data(), off.data(), 1);
    CU(cudaEventRecord(ev[1], c.st));
    CU(cudaStreamSynchronize(c.st));
    float ms = 0;
    CU(cudaEventElapsedTime(&ms, ev[0], ev[1]));
    if (it >= c.o.warmup) t.push_back(ms * 1e-3);
  }
  return stat_of(t);
}

std::string utc_now() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

int run(Ctx& c) {
  const Opts& o = c.o;
  const int N = c.N;
  const int64_t T = o.tokens, H = o.hidden, K = o.top_k;
  c.epr = int(o.experts / N);
  c.L = row_layout(int(H), int(K));
  const size_t cap_rows = size_t(N) * size_t(T);  // at most every token to every rank
  CU(cudaStreamCreateWithFlags(&c.st, cudaStreamNonBlocking));
  CU(cudaMalloc(&c.x, size_t(T * H) * 2));
  CU(cudaMalloc(&c.ids, size_t(T * K) * 4));
  CU(cudaMalloc(&c.w, size_t(T * K) * 4));
  CU(cudaMalloc(&c.pos, cap_rows * 4));
  CU(cudaMalloc(&c.flags, cap_rows));
  CU(cudaMalloc(&c.cnt, size_t(2 * N) * 4));
  CU(cudaMallocHost(&c.hcnt, size_t(2 * N) * 4));
  CU(cudaMalloc(&c.send, cap_rows * c.L.stride));
  CU(cudaMalloc(&c.recv, cap_rows * c.L.stride));
  CU(cudaMalloc(&c.part, cap_rows * size_t(H) * 2));
  CU(cudaMalloc(&c.back, cap_rows * size_t(H) * 2));
  CU(cudaMalloc(&c.out, size_t(T * H) * 2));
  {
    std::vector<uint16_t> x = make_x(o, c.rank);
    std::vector<int32_t> ids;
    std::vector<float> w;
    make_routing(o, c.rank, ids, w);
    CU(cudaMemcpy(c.x, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(c.ids, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(c.w, w.data(), w.size() * 4, cudaMemcpyHostToDevice));
  }
  cudaEvent_t ev[5];
  for (auto& e : ev) CU(cudaEventCreate(&e));
  float ms[4];
  // First pass: checked.
  dispatch(c, ev, ms);
  if (o.inject_error && c.rows_recv > 0) {
    uint8_t b = 0;
    CU(cudaMemcpy(&b, c.recv + 3, 1, cudaMemcpyDeviceToHost));
    b ^= 0x10;
    CU(cudaMemcpy(c.recv + 3, &b, 1, cudaMemcpyHostToDevice));
  }
  if (c.rows_recv > 0) expert_kernel<<<int(c.rows_recv), 256, 0, c.st>>>(c.recv, c.L, c.part);
  CU(cudaGetLastError());
  CU(cudaStreamSynchronize(c.st));
  combine(c, ev, ms);
  nlohmann::json chk = check(c);
  int ok = chk["passed"].get<bool>() ? 1 : 0, all_ok = 0;
  MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (o.inject_error) {
    if (c.rank == 0) std::printf("check with an injected bit flip: %s\n", all_ok ? "passed (WRONG)" : "failed, as it must");
    return all_ok ? 0 : 1;
  }

  std::vector<double> d_tot, d_pack, d_cnt, d_host, d_rows, d_cached, c_tot, c_comm, c_red;
  for (int64_t it = 0; it < o.warmup + o.iters; ++it) {
    MPI_Barrier(MPI_COMM_WORLD);
    dispatch(c, ev, ms);
    if (it < o.warmup) continue;
    d_pack.push_back(ms[0] * 1e-3);
    d_cnt.push_back(ms[1] * 1e-3);
    d_host.push_back(ms[2] * 1e-3);
    d_rows.push_back(ms[3] * 1e-3);
    d_cached.push_back((double(ms[0]) + ms[3]) * 1e-3);
    d_tot.push_back((double(ms[0]) + ms[1] + ms[2] + ms[3]) * 1e-3);
  }
  for (int64_t it = 0; it < o.warmup + o.iters; ++it) {
    MPI_Barrier(MPI_COMM_WORLD);
    combine(c, ev, ms);
    if (it < o.warmup) continue;
    c_comm.push_back(ms[0] * 1e-3);
    c_red.push_back(ms[1] * 1e-3);
    c_tot.push_back((double(ms[0]) + ms[1]) * 1e-3);
  }
  // Roofline: every rank moves the same bytes as the largest EP receiver, split evenly over the ranks.
  long long rmax = c.rows_recv;
  MPI_Allreduce(MPI_IN_PLACE, &rmax, 1, MPI_LONG_LONG, MPI_MAX, MPI_COMM_WORLD);
  const int64_t disp_row_bytes = H + 4 * (H / kTile), comb_row_bytes = 2 * H;
  const int64_t pp_disp = (rmax * disp_row_bytes / N + 15) / 16 * 16, pp_comb = (rmax * comb_row_bytes / N + 15) / 16 * 16;
  Stat rf_d = plain_a2a(c, c.send, c.recv, pp_disp, ev);
  Stat rf_c = plain_a2a(c, reinterpret_cast<uint8_t*>(c.part), reinterpret_cast<uint8_t*>(c.back), pp_comb, ev);
  auto rf = [&](int64_t pp, const Stat& s) {
    return nlohmann::json{{"bytes_per_peer", pp}, {"median_us", s.med * 1e6}, {"min_us", s.min * 1e6},
                          {"gbps_received_median", double(pp * N) / s.med / 1e9},
                          {"gbps_received_best", double(pp * N) / s.min / 1e9},
                          {"gbps_nvlink_median", double(pp * (N - 1)) / s.med / 1e9}};
  };

  const Stat dt = stat_of(d_tot), ct = stat_of(c_tot), dr = stat_of(d_rows), cx = stat_of(c_comm), dc = stat_of(d_cached);
  const double db = double(c.rows_recv * disp_row_bytes), db_nvl = double(c.rows_recv_remote * disp_row_bytes);
  const double cb = double(c.rows_recv * comb_row_bytes), cb_nvl = double(c.rows_recv_remote * comb_row_bytes);
  const nlohmann::json mine = {
      {"rank", c.rank}, {"rows_sent", c.rows_sent}, {"rows_received", c.rows_recv},
      {"rows_received_from_other_ranks", c.rows_recv_remote}, {"rows_sent_to_other_ranks", c.rows_sent_remote},
      {"dispatch",
       {{"median_us", dt.med * 1e6}, {"min_us", dt.min * 1e6}, {"pack_median_us", stat_of(d_pack).med * 1e6},
        {"count_exchange_median_us", stat_of(d_cnt).med * 1e6}, {"host_turnaround_median_us", stat_of(d_host).med * 1e6},
        {"row_exchange_median_us", dr.med * 1e6},
        {"gbps_deepep_median", db / dt.med / 1e9}, {"gbps_deepep_best", db / dt.min / 1e9},
        {"gbps_nvlink_median", db_nvl / dt.med / 1e9}, {"gbps_nvlink_best", db_nvl / dt.min / 1e9},
        {"gbps_deepep_cached_layout_median", db / dc.med / 1e9}, {"gbps_nvlink_cached_layout_median", db_nvl / dc.med / 1e9},
        {"gbps_deepep_row_exchange_only", db / dr.med / 1e9}, {"gbps_nvlink_row_exchange_only", db_nvl / dr.med / 1e9}}},
      {"combine",
       {{"median_us", ct.med * 1e6}, {"min_us", ct.min * 1e6}, {"exchange_median_us", cx.med * 1e6},
        {"reduce_median_us", stat_of(c_red).med * 1e6}, {"gbps_deepep_median", cb / ct.med / 1e9},
        {"gbps_deepep_best", cb / ct.min / 1e9}, {"gbps_nvlink_median", cb_nvl / ct.med / 1e9},
        {"gbps_nvlink_best", cb_nvl / ct.min / 1e9}, {"gbps_deepep_exchange_only", cb / cx.med / 1e9},
        {"gbps_nvlink_exchange_only", cb_nvl / cx.med / 1e9}}},
      {"roofline",
       {{"dispatch_sized", rf(pp_disp, rf_d)}, {"combine_sized", rf(pp_comb, rf_c)}}},
      {"check", chk}};
  // Every rank's record to rank 0 (as JSON text).
  const std::string text = mine.dump();
  int len = int(text.size());
  std::vector<int> lens(static_cast<size_t>(N)), displs(static_cast<size_t>(N));
  MPI_Gather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
  for (int r = 1; r < N; ++r) displs[size_t(r)] = displs[size_t(r) - 1] + lens[size_t(r) - 1];
  std::string all(c.rank == 0 ? size_t(displs[size_t(N) - 1] + lens[size_t(N) - 1]) : 0, ' ');
  MPI_Gatherv(text.data(), len, MPI_CHAR, all.data(), lens.data(), displs.data(), MPI_CHAR, 0, MPI_COMM_WORLD);
  if (c.rank == 0) {
    cudaDeviceProp prop{};
    int ndev = 0;
    CU(cudaGetDeviceProperties(&prop, 0));
    CU(cudaGetDeviceCount(&ndev));
    char host[256] = {0};
    gethostname(host, sizeof host - 1);
    std::printf("\nEP dispatch/combine, %d rank(s), %lld tokens/rank, hidden %lld, %lld experts, top-%lld (%s), %d iters\n",
                N, (long long)T, (long long)H, (long long)o.experts, (long long)K, o.routing.c_str(), int(o.iters));
    std::printf("GB/s as DeepEP counts (received rows incl. own; FP8+scales / BF16); NVL: rows to/from other ranks only\n");
    std::printf("%4s %6s %6s | %8s %8s %6s %6s %6s %6s %6s %6s %6s | %8s %8s %6s %6s %6s %6s | %6s %6s\n", "rank",
                "recv", "remote", "disp_us", "min_us", "pack", "counts", "host", "rows", "GB/s", "NVL", "cached", "comb_us",
                "min_us", "a2a", "reduce", "GB/s", "NVL", "rf_d", "rf_c");
    nlohmann::json ranks = nlohmann::json::array();
    for (int r = 0; r < N; ++r) {
      nlohmann::json v = nlohmann::json::parse(all.substr(size_t(displs[size_t(r)]), size_t(lens[size_t(r)])));
      const auto &d = v["dispatch"], &m = v["combine"], &f = v["roofline"];
      std::printf("%4d %6lld %6lld | %8.1f %8.1f %6.1f %6.1f %6.1f %6.1f %6.1f %6.1f %6.1f | %8.1f %8.1f %6.1f %6.1f %6.1f %6.1f | %6.1f %6.1f\n",
                  r, v["rows_received"].get<long long>(), v["rows_received_from_other_ranks"].get<long long>(),
                  d["median_us"].get<double>(), d["min_us"].get<double>(), d["pack_median_us"].get<double>(),
                  d["count_exchange_median_us"].get<double>(), d["host_turnaround_median_us"].get<double>(),
                  d["row_exchange_median_us"].get<double>(), d["gbps_deepep_median"].get<double>(),
                  d["gbps_nvlink_median"].get<double>(), d["gbps_deepep_cached_layout_median"].get<double>(),
                  m["median_us"].get<double>(), m["min_us"].get<double>(), m["exchange_median_us"].get<double>(),
                  m["reduce_median_us"].get<double>(), m["gbps_deepep_median"].get<double>(),
                  m["gbps_nvlink_median"].get<double>(), f["dispatch_sized"]["gbps_received_median"].get<double>(),
                  f["combine_sized"]["gbps_received_median"].get<double>());
      ranks.push_back(v);
    }
    std::printf("cached: DeepEP-convention GB/s of pack + rows only (no count exchange, no host turnaround)\n");
    std::printf("rf_d / rf_c: plain NCCL all-to-all of the dispatch / combine volume (%lld / %lld B per peer), GB/s received\n",
                (long long)pp_disp, (long long)pp_comb);
    std::printf("check: %s\n", all_ok ? "passed (all ranks)" : "FAILED");
    const char* commit = std::getenv("DSV3_COMMIT");
    int nccl_ver = 0;
    ncclGetVersion(&nccl_ver);
    nlohmann::json res = {
        {"bench", "gpu_ep_a2a"},
        {"commit", commit && *commit ? commit : "unknown"},
        {"date", utc_now()},
        {"machine", {{"gpu", prop.name}, {"gpus_visible", ndev}, {"ranks", N}, {"host", host}, {"nccl_version", nccl_ver}}},
        {"parameters",
         {{"tokens_per_rank", T}, {"hidden", H}, {"experts", o.experts}, {"experts_per_rank", c.epr}, {"top_k", K},
          {"routing", o.routing == "group" ? cat("group-limited: ", o.topk_groups, " of ", o.groups,
                                                 " groups at random, then top-k uniformly among their experts")
                                           : std::string("uniform: top-k distinct experts at random per token")},
          {"seed", o.seed}, {"iters", o.iters}, {"warmup", o.warmup},
          {"quantization", "E4M3 (saturating RNE), one F32 scale amax/448 per 1x128 tile (not power of two)"},
          {"row_bytes_on_wire", c.L.stride},
          {"row_layout", "payload H | F32 scales H/128 | token id | K expert ids (-1 if not on the receiver) | K weights, 16-B padded"}}},
        {"byte_convention",
         "DeepEP tests/test_intranode.py: dispatch GB/s = received rows x (H + 4*H/128) / time (own rows included, "
         "metadata not counted); combine GB/s = the same rows x 2H / time. nvlink = only rows from/to other ranks. "
         "dispatch time = layout+pack kernels + count exchange + host turnaround (read counts, post the rows) + row "
         "exchange; combine = row "
         "exchange + rank-order reduction. cached_layout = pack + row exchange, without count exchange and host turnaround (DeepEP "
         "times its tuned dispatch with a cached handle: the layout and counts of an earlier call). Median over "
         "iterations; best = min."},
        {"roofline_what", "ncclSend/ncclRecv group, equal bytes to every rank (self included), sized as the largest "
                          "EP receive (dispatch: FP8+scales, combine: BF16); GB/s = bytes received (nvlink: from other ranks) / time"},
        {"checks_passed_all_ranks", bool(all_ok)},
        {"ranks", ranks},
        {"reference",
         {{"source", "deepseek-ai/DeepEP docs/legacy.md (V1 normal kernels), via /work/shared/research/paper_facts.md 7.7"},
          {"gpu", "H800 (~160 GB/s NVLink)"}, {"ep", 8}, {"dispatch_gbps_nvlink", 153}, {"combine_gbps_nvlink", 158},
          {"settings", "4096 tokens per batch, 7168 hidden, top-4 groups, top-8 experts, FP8 dispatching, BF16 combining"},
          {"note", "DeepEP's figures are best-of-tuning over chunk sizes, cached layout (no count exchange), 24 SMs"}}}};
    const std::string tmp = o.out + ".tmp";
    std::ofstream(tmp) << res.dump(2) << "\n";
    if (std::rename(tmp.c_str(), o.out.c_str()) != 0) std::fprintf(stderr, "could not write %s\n", o.out.c_str());
    else std::printf("wrote %s\n", o.out.c_str());
  }
  for (auto& e : ev) cudaEventDestroy(e);
  return all_ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  Ctx c;
  MPI_Comm_rank(MPI_COMM_WORLD, &c.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &c.N);
  int rc = 0;
  try {
    if (!parse(argc, argv, c.o, c.N)) {
      if (c.rank == 0) std::fputs(kHelp, stdout);
      MPI_Finalize();
      return 0;
    }
  } catch (const InputError& e) {
    if (c.rank == 0) std::fprintf(stderr, "error: %s\n", e.what());
    MPI_Finalize();
    return 2;
  }
  MPI_Comm node;
  int local = 0, ndev = 0;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, c.rank, MPI_INFO_NULL, &node);
  MPI_Comm_rank(node, &local);
  CU(cudaGetDeviceCount(&ndev));
  if (local >= ndev) {
    std::fprintf(stderr, "rank %d: local rank %d but only %d GPU(s) visible\n", c.rank, local, ndev);
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  CU(cudaSetDevice(local));
  ncclUniqueId id;
  if (c.rank == 0) NC(ncclGetUniqueId(&id));
  MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD);
  NC(ncclCommInitRank(&c.comm, c.N, id, c.rank));
  try {
    rc = run(c);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", c.rank, e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  ncclCommDestroy(c.comm);
  MPI_Comm_free(&node);
  MPI_Finalize();
  return rc;
}

#else

int main() {
  std::fprintf(stderr, "dsv3_bench_gpu_ep_a2a needs MPI and NCCL (this build has neither or one)\n");
  return 1;
}

#endif
