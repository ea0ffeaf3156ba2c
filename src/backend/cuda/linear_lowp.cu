// The reduced-precision linear layer on CUDA tensors (backend/cuda/linear_lowp.h): BF16 operands on
// cuBLAS tensor cores, or the FP8 recipe through cuBLASLt's block-scaled matmul, without host
// read-backs (non-finite operands travel as NaN scales). The matmuls, the FP8 preparation launches
// and the row-padding copy run on cuda::stream() (a lane of the MoE's experts); the rest on the
// legacy stream.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "backend/cuda/common.cuh"
#include "backend/cuda/linear_lowp.h"
#include "backend/cuda/lt_gemm.h"
#include "backend/cuda/stream.h"

namespace dsv3 {
using namespace cuda;

namespace {

// Row-major c[m,n] = op(a)·op(b) (+ c) with BF16 a, b, FP32 accumulation and FP32 c.
void gemm_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const __nv_bfloat16* a, int64_t lda,
               const __nv_bfloat16* b, int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  lt_matmul(lt_row_major(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, accumulate));
}

// Any float dtype (FP8 with its 128×128 scale_inv grid) → F32 or BF16 (RNE), as the CPU's as_f32 and
// round_bf16: the FP8 product e4m3·scale is one FP32 multiplication there too.
template <class Out>
__global__ void convert_kernel(const void* src, DType t, const float* sc, int64_t kb, int64_t n, int64_t k, Out* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float v = load_f(src, t, i);
    if (sc) v *= sc[(i / k / kFp8Block) * kb + (i % k) / kFp8Block];
    if constexpr (sizeof(Out) == 2) out[i] = __float2bfloat16_rn(v);
    else out[i] = v;
  }
}

template <class Out>
Tensor converted(const Tensor& x, const Tensor& scale_inv, DType to) {
  Tensor out = cuda_backend().alloc(to, x.shape());
  const int64_t n = x.numel(), k = last_dim(x);
  if (n == 0) return out;
  const bool fp8 = x.dtype() == DType::F8_E4M3;
  convert_kernel<Out><<<std::min(blocks_for(n), 1u << 16), 256>>>(
      x.raw(), x.dtype(), fp8 ? scale_inv.data<float>() : nullptr, fp8 ? scale_inv.dim(1) : 0, n, k, ptr<Out>(out));
  check_launch("lowp operand conversion");
  return out;
}
Tensor to_bf16(const Tensor& x, const Tensor& scale_inv = Tensor()) {
  if (x.dtype() == DType::BF16 && !present(scale_inv)) return x;
  if (x.dtype() != DType::F32) return converted<__nv_bfloat16>(x, scale_inv, DType::BF16);
  Tensor out = cuda_backend().alloc(DType::BF16, x.shape());
  f32_to_bf16(x.data<float>(), x.numel(), ptr<__nv_bfloat16>(out));
  return out;
}
// x in BF16: the caller's cached copy (Bf16 mode keeps one per layer input in the Fp8Tiles slot,
// backend/fp8.h) or a fresh conversion.
Tensor bf16_input(const Tensor& x, const Fp8Tiles* cache) {
  if (!cache || !cache->defined()) return to_bf16(x);
  DSV3_CHECK(cache->q.dtype() == DType::BF16 && cache->q.numel() == x.numel(),
             "linear_lowp: the cached BF16 input does not match x");
  return cache->q;
}
Tensor to_f32(const Tensor& x, const Tensor& scale_inv = Tensor()) {
  if (x.dtype() == DType::F32) return x;
  return converted<float>(x, scale_inv, DType::F32);
}

const __nv_bfloat16* bf(const Tensor& t) { return static_cast<const __nv_bfloat16*>(t.raw()); }

Tensor mat(const Tensor& t) {
  const int64_t k = last_dim(t);
  return t.reshape({k ? t.numel() / k : 0, k});
}
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// FP8.

struct Q {
  Tensor q, s;  // [R, K] E4M3; F32 grid per row [R, ⌈K/128⌉] or per block [⌈R/128⌉, ⌈K/128⌉]
};

Q quant(const Tensor& x, Fp8Tiling tiling, bool t, bool pow2) {
  const int64_t R = x.dim(0), C = x.dim(1);
  const int64_t th = tiling == Fp8Tiling::Row1x128 ? 1 : kFp8Block, tw = tiling == Fp8Tiling::Col128x1 ? 1 : kFp8Block;
  const int64_t g0 = ceil_div(R, th), g1 = ceil_div(C, tw);
  CudaBackend& be = cuda_backend();
  Q out;
  out.q = be.alloc(DType::F8_E4M3, t ? Shape{C, R} : Shape{R, C});
  out.s = be.alloc(DType::F32, t ? Shape{g1, g0} : Shape{g0, g1});
  QuantizeFp8Args a;
  a.x = x;
  a.tiling = tiling;
  a.pow2_scale = pow2;
  a.transpose_out = t;
  a.q = out.q;
  a.scale = out.s;
  a.on_nonfinite = NonFinitePolicy::Report;
  cuda_quantize_fp8_async(a, nullptr, true);
  return out;
}

// x̂ᵀ in 1×128 tiles of [K, M] from the FP8 copy of x [M, K] (Wgrad's b operand).
Q requant_cols_t(const Fp8Tiles& t, bool pow2) {
  const int64_t M = t.q.dim(0), K = t.q.dim(1);
  CudaBackend& be = cuda_backend();
  Q out{be.alloc(DType::F8_E4M3, {K, M}), be.alloc(DType::F32, {K, ceil_div(M, kFp8Block)})};
  cuda_requantize_cols_t(t, pow2, out.q, out.s);
  return out;
}

__global__ void dequant_kernel(const uint8_t* q, const float* s, int64_t R, int64_t C, bool per_row, int64_t kb,
                               float* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < R * C; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / C, c = i % C;
    const float v = load_f(q, DType::F8_E4M3, i);
    out[i] = v * s[(per_row ? r : r / kFp8Block) * kb + c / kFp8Block];
  }
}

// The same for C % 4 == 0, four codes per thread (one 4-byte load, one 16-byte store), a row per
// CTA iteration: no per-element 64-bit division.
__global__ void dequant4_kernel(const uint8_t* q, const float* s, int64_t R, int64_t C, bool per_row, int64_t kb,
                                float* out) {
  const int64_t c4n = C / 4;
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const float* sr = s + (per_row ? r : r / kFp8Block) * kb;
    for (int64_t c4 = threadIdx.x; c4 < c4n; c4 += blockDim.x) {
      const uint32_t b = reinterpret_cast<const uint32_t*>(q + r * C)[c4];
      const float sc = sr[(4 * c4) / kFp8Block];
      float v[4];
      for (int j = 0; j < 4; ++j) {
        __half_raw h = __nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t((b >> (8 * j)) & 0xffu), __NV_E4M3);
        v[j] = __half2float(__half(h)) * sc;
      }
      reinterpret_cast<float4*>(out + r * C)[c4] = make_float4(v[0], v[1], v[2], v[3]);
    }
  }
}

// e4m3(q)·s as F32 [R, K] (per-row or per-block grid; the CPU's dequantize_fp8_fast bit for bit).
Tensor dequant(const Q& a) {
  const int64_t R = a.q.dim(0), C = a.q.dim(1);
  Tensor out = cuda_backend().alloc(DType::F32, {R, C});
  if (R * C == 0) return out;
  if (C % 4 == 0 && (reinterpret_cast<uintptr_t>(a.q.raw()) & 3u) == 0) {
    dequant4_kernel<<<unsigned(std::min<int64_t>(R, 1 << 16)), C >= 512 ? 128 : 64>>>(
        ptr<uint8_t>(a.q), a.s.data<float>(), R, C, a.s.dim(0) == R, a.s.dim(1), ptr<float>(out));
  } else {
    dequant_kernel<<<std::min(blocks_for(R * C), 1u << 16), 256>>>(ptr<uint8_t>(a.q), a.s.data<float>(), R, C,
                                                                    a.s.dim(0) == R, a.s.dim(1), ptr<float>(out));
  }
  check_launch("fp8 dequantize");
  return out;
}

// *flag = whether either scale grid holds a NaN (a tile with a non-finite value); one CTA: the grids
// have one float per 128 elements.
__global__ void nan_flag_kernel(const float* a, int64_t na, const float* b, int64_t nb, unsigned* flag) {
  int f = 0;
  for (int64_t i = threadIdx.x; i < na; i += blockDim.x) f |= isnan(a[i]);
  for (int64_t i = threadIdx.x; i < nb; i += blockDim.x) f |= isnan(b[i]);
  f = __syncthreads_or(f);
  if (threadIdx.x == 0) *flag = f ? 1u : 0u;
}
__global__ void nan_fill_kernel(const unsigned* flag, float* c, int64_t n) {
  if (*flag == 0) return;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    c[i] = __int_as_float(0x7fc00000);
}

// dst[Rp, Cp] = src[R, C] with zero padding (E4M3 bytes).
__global__ void pad_bytes_kernel(const uint8_t* src, int64_t R, int64_t C, uint8_t* dst, int64_t Rp, int64_t Cp) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < Rp * Cp; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / Cp, c = i % Cp;
    dst[i] = r < R && c < C ? src[r * C + c] : uint8_t(0);
  }
}
// Per-row grid [R, kb] → [Rp, kb], the padding rows scaled by 1 (their codes are zero).
__global__ void pad_grid_kernel(const float* src, int64_t R, int64_t kb, float* dst, int64_t Rp) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < Rp * kb; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = i / kb < R ? src[i] : 1.0f;
}
// c[M, N] (+)= p[:M, :N] (p has Np columns); all NaN when *flag.
__global__ void add_block_kernel(const float* p, int64_t Np, float* c, int64_t M, int64_t N, bool accumulate,
                                 const unsigned* flag) {
  const bool nan = *flag != 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < M * N; i += int64_t(gridDim.x) * blockDim.x) {
    const float v = p[(i / N) * Np + i % N];
    c[i] = nan ? __int_as_float(0x7fc00000) : accumulate ? c[i] + v : v;
  }
}

bool aligned(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 255u) == 0; }

// a zero-padded to [Rp, Kp] (cuBLASLt's shape rules); a itself when it already fits (usually the
// weight, when only the tokens' M is off).
Q padded(const Q& a, int64_t Rp, int64_t Kp) {
  const int64_t R = a.q.dim(0), K = a.q.dim(1);
  if (R == Rp && K == Kp && aligned(a.q.raw())) return a;
  CudaBackend& be = cuda_backend();
  Q out;
  out.q = be.alloc(DType::F8_E4M3, {Rp, Kp});
  pad_bytes_kernel<<<std::min(blocks_for(Rp * Kp), 1u << 16), 256>>>(ptr<uint8_t>(a.q), R, K, ptr<uint8_t>(out.q),
                                                                      Rp, Kp);
  check_launch("fp8 operand padding");
  if (a.s.dim(0) == R && R != Rp) {  // per-row grid: one scale row per padded row
    out.s = be.alloc(DType::F32, {Rp, a.s.dim(1)});
    pad_grid_kernel<<<blocks_for(Rp * a.s.dim(1)), 256>>>(a.s.data<float>(), R, a.s.dim(1), ptr<float>(out.s), Rp);
    check_launch("fp8 scale padding");
  } else {
    out.s = a.s;  // a block grid covers the padded rows already (Rp < ⌈R/128⌉·128)
  }
  return out;
}

// c[M, N] (+)= (qa·sa)·(qb·sb)ᵀ: cuBLASLt's block-scaled FP8 GEMM (FP32 accumulation), zero-padded
// to its shape rules (M of 16 — of 128 when M counts tokens —, N of 16, K of 128); the dequantized
// FP32 product when a is scaled per 128×128 block (cuBLASLt's Hopper modes take blocks on the weight
// side only). A NaN scale on either side → c all NaN. The general path: fprop_direct and
// backward_direct below are the usual one.
void gemm_fp8(const Q& a, const Q& b, const Tensor& c, bool accumulate, bool m_tokens) {
  const int64_t M = a.q.dim(0), K = a.q.dim(1), N = b.q.dim(0);
  const int64_t m_align = m_tokens ? kFp8Block : 16;
  if (M == 0 || N == 0) return;
  Scratch flag(sizeof(unsigned));
  // Views (an expert's rows) are contiguous row ranges: numel floats from the view's first one.
  nan_flag_kernel<<<1, 1024>>>(a.s.data<float>(), a.s.numel(), b.s.data<float>(), b.s.numel(), flag.as<unsigned>());
  check_launch("fp8 non-finite flag");
  const bool a_block = a.s.dim(0) != M;
  if (a_block) {
    Tensor af = dequant(a), bf = dequant(b);
    sgemm(false, true, M, N, K, 1.0f, af.data<float>(), K, bf.data<float>(), K, accumulate ? 1.0f : 0.0f,
          ptr<float>(c), N);
  } else if (K % kFp8Block == 0 && M % m_align == 0 && N % 16 == 0 && aligned(a.q.raw()) && aligned(b.q.raw()) &&
             aligned(c.raw())) {
    Fp8GemmArgs g;
    g.a = a.q;
    g.a_scale = a.s;
    g.b = b.q;
    g.b_scale = b.s;
    g.c = c;
    g.accumulate = accumulate;
    cuda_fp8_gemm(g);
  } else {
    // M as tokens (Fprop, Dgrad: an expert's row count changes every step) is padded to 128, not
    // just 16, so that cuBLASLt's per-shape plans (one heuristic query each) stay few.
    const int64_t Mp = ceil_div(M, m_align) * m_align, Np = ceil_div(N, 16) * 16,
                  Kp = ceil_div(K, kFp8Block) * kFp8Block;
    Q ap = padded(a, Mp, Kp), bp = padded(b, Np, Kp);
    Tensor cp = cuda_backend().alloc(DType::F32, {Mp, Np});
    Fp8GemmArgs g;
    g.a = ap.q;
    g.a_scale = ap.s;
    g.b = bp.q;
    g.b_scale = bp.s;
    g.c = cp;
    cuda_fp8_gemm(g);
    add_block_kernel<<<std::min(blocks_for(M * N), 1u << 16), 256>>>(cp.data<float>(), Np, ptr<float>(c), M, N,
                                                                      accumulate, flag.as<unsigned>());
    check_launch("fp8 gemm output");  // also writes NaN where the flag is set
    return;
  }
  nan_fill_kernel<<<std::min(blocks_for(M * N), 1u << 16), 256>>>(flag.as<unsigned>(), ptr<float>(c), M * N);
  check_launch("fp8 non-finite output");
}

// ---------------------------------------------------------------------------------------------
// The direct FP8 path: each GEMM is its quantization launches, one weight_prep launch (Fprop, Dgrad)
// and the matmul, with every operand written in cuBLASLt's layouts and K padded by the quantizers
// themselves (linear_lowp.h, "GEMM preparation"). DSV3_FP8_LEGACY=1 runs every GEMM on the general
// path above instead (gemm_fp8: quantize, pad, relayout, NaN flag and fill per GEMM; the bench's before/after).

bool legacy() {
  static const bool v = off_unless_env_one("DSV3_FP8_LEGACY");
  return v;
}

int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Device scratch carved into 256-byte aligned pieces (one allocation per GEMM).
class Carve {
 public:
  explicit Carve(const std::vector<size_t>& bytes) {
    size_t total = 0;
    for (size_t b : bytes) total += (b + 255) / 256 * 256;
    s_ = std::make_unique<Scratch>(total);
    size_t off = 0;
    for (size_t b : bytes) {
      p_.push_back(s_->as<char>() + off);
      off += (b + 255) / 256 * 256;
    }
  }
  template <class T> T* at(size_t i) const { return reinterpret_cast<T*>(p_[i]); }

 private:
  std::unique_ptr<Scratch> s_;
  std::vector<char*> p_;
};

// cuBLASLt's rows of its A operand (our b: the weight side's rows, also c's row stride) in 16s.
bool lt_rows_ok(int64_t n) { return n % 16 == 0; }

WeightSide weight_side(const Tensor& w, const Tensor& w_scale_inv, bool transpose, int64_t ldq, uint8_t* q,
                       float* scale_lt) {
  WeightSide s;
  s.w = w.raw();
  s.wtype = w.dtype();
  s.w_scale_inv = w.dtype() == DType::F8_E4M3 ? w_scale_inv.data<float>() : nullptr;
  s.N = w.dim(0);
  s.K = w.dim(1);
  s.transpose = transpose;
  s.q = q;
  s.ldq = ldq;
  s.scale_lt = scale_lt;
  s.ld4 = round_up(ceil_div(transpose ? s.N : s.K, kFp8Block), 4);
  return s;
}

// c[i] (+)= s[i], i < len, for each of up to kPrepGroup pieces (blockIdx.y): the rows of matmuls
// computed with more rows than c has room for (cuBLASLt's multiple of 4, a BF16 batch's chunk), as
// cuBLASLt's β = 1 would add them (one FP32 addition; NaN stays NaN). vec: 16-byte aligned, len % 4 == 0.
struct PaddedRows {
  int n = 0;
  const float* s[kPrepGroup] = {};
  float* c[kPrepGroup] = {};
  int64_t len[kPrepGroup] = {};
};
__global__ void add_padded_rows_kernel(const __grid_constant__ PaddedRows t, bool accumulate, bool vec) {
  const int e = blockIdx.y;
  const int64_t n = vec ? t.len[e] / 4 : t.len[e], step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += step) {
    if (vec) {
      const float4 v = reinterpret_cast<const float4*>(t.s[e])[i];
      float4& o = reinterpret_cast<float4*>(t.c[e])[i];
      o = accumulate ? make_float4(o.x + v.x, o.y + v.y, o.z + v.z, o.w + v.w) : v;
    } else {
      t.c[e][i] = accumulate ? t.c[e][i] + t.s[e][i] : t.s[e][i];
    }
  }
}

// Rows computed in scratch written (added, with accumulate) into their place: pieces queued by add()
// and launched kPrepGroup at a time, by add() when the table is full and by flush() for the rest.
// A caller adding inside a lane scope, before the scratch is written, must add at most kPrepGroup
// pieces (each_group's groups) so that only its own flush, after the lanes, launches.
class PaddedAdd {
 public:
  explicit PaddedAdd(bool accumulate) : accumulate_(accumulate) {}
  void add(const float* s, float* c, int64_t len) {
    if (t_.n == kPrepGroup) flush();
    t_.s[t_.n] = s;
    t_.c[t_.n] = c;
    t_.len[t_.n++] = len;
    vec_ = vec_ && len % 4 == 0 && (reinterpret_cast<uintptr_t>(s) & 15u) == 0 &&
           (reinterpret_cast<uintptr_t>(c) & 15u) == 0;
    longest_ = std::max(longest_, len);
  }
  void flush() {
    if (t_.n == 0) return;
    const unsigned x = std::min(blocks_for(vec_ ? longest_ / 4 : longest_), 2048u);
    add_padded_rows_kernel<<<dim3(x, unsigned(t_.n)), 256, 0, stream()>>>(t_, accumulate_, vec_);
    check_launch("padded matmul rows");
    t_ = PaddedRows();
    vec_ = true;
    longest_ = 0;
  }

 private:
  bool accumulate_;
  PaddedRows t_;
  bool vec_ = true;
  int64_t longest_ = 0;
};

// The matmul of a token-side operand with M_lt ≥ M rows (rows M.. zero): straight into c when
// M_lt = M, else through scratch rows whose first M are then written (added) into c.
void gemm_token_rows(const uint8_t* a, const float* a_scale, int64_t M, int64_t M_lt, const uint8_t* b,
                     const float* b_scale, bool b_block, int64_t N, int64_t K, float* c, bool accumulate) {
  if (M_lt == M) return fp8_gemm_lt(a, a_scale, M, b, b_scale, b_block, N, K, c, accumulate);
  Scratch out(size_t(M_lt * N) * sizeof(float));
  fp8_gemm_lt(a, a_scale, M_lt, b, b_scale, b_block, N, K, out.as<float>(), false);
  PaddedAdd pad(accumulate);
  pad.add(out.as<float>(), c, M * N);
  pad.flush();
}

// One Fprop preparation's scratch, kFpropPieces pieces of a Carve from `base`: the weight's
// BLK128x128 scales, x's VEC128 scales, the weight's codes, and (copy) x's codes with cuBLASLt's
// padding rows.
constexpr size_t kFpropPieces = 4;
void fprop_bytes(std::vector<size_t>& out, int64_t N, int64_t K, int64_t M_lt, bool copy) {
  const int64_t kb = K / kFp8Block;
  out.insert(out.end(), {size_t(ceil_div(N, kFp8Block) * round_up(kb, 4)) * 4, size_t(kb * M_lt) * 4, size_t(N * K),
                         copy ? size_t(M_lt * K) : 0});
}
// The preparation writing there: x [M, K] quantized into xq / x_scale when x is set, else those read
// (FpropPrep).
FpropPrep fprop_prep_in(const Carve& buf, size_t base, const Tensor& w, const Tensor& w_scale_inv, bool pow2,
                        int64_t M, int64_t M_lt, const float* x, uint8_t* xq, float* x_scale, bool copy) {
  FpropPrep p;
  p.pow2 = pow2;
  p.w = weight_side(w, w_scale_inv, false, w.dim(1), buf.at<uint8_t>(base + 2), buf.at<float>(base));
  p.M = M;
  p.M_lt = M_lt;
  p.x = x;
  p.xq = xq;
  p.x_scale = x_scale;
  p.q_lt = copy ? buf.at<uint8_t>(base + 3) : xq;
  p.x_scale_lt = buf.at<float>(base + 1);
  return p;
}

// One backward preparation's scratch, kBackwardPieces pieces from `base`: Dgrad's (dx) dy scales,
// weight scales, dy codes and weight codes, Wgrad's (dw) dy and x̂ scales and codes.
constexpr size_t kBackwardPieces = 8;
void backward_bytes(std::vector<size_t>& out, int64_t M, int64_t N, int64_t K, bool dx, bool dw) {
  const int64_t Np = round_up(N, kFp8Block), Mp = round_up(M, kFp8Block), M1 = round_up(M, 4);
  const int64_t ld4 = round_up(Np / kFp8Block, 4);
  out.insert(out.end(), {dx ? size_t((Np / kFp8Block) * M1) * 4 : 0, dx ? size_t(ceil_div(K, kFp8Block) * ld4) * 4 : 0,
                         dw ? size_t((Mp / kFp8Block) * N) * 4 : 0, dw ? size_t((Mp / kFp8Block) * K) * 4 : 0,
                         dx ? size_t(M1 * Np) : 0, dx ? size_t(K * Np) : 0, dw ? size_t(N * Mp) : 0,
                         dw ? size_t(K * Mp) : 0});
}
// The preparation writing there (BackwardPrep): dy [M, N], the weight for Dgrad, x's FP8 copy for
// Wgrad.
BackwardPrep backward_prep_in(const Carve& buf, size_t base, const float* dy, int64_t M, int64_t N, int64_t K,
                              const Tensor& w, const Tensor& w_scale_inv, const uint8_t* xs_q, const float* xs_scale,
                              bool dx, bool dw, bool pow2) {
  const int64_t Np = round_up(N, kFp8Block);
  BackwardPrep p;
  p.pow2 = pow2;
  p.M = M;
  p.N = N;
  p.K = K;
  p.dy = dy;
  if (dx) {
    p.q1 = buf.at<uint8_t>(base + 4);
    p.ld1 = Np;
    p.M1 = round_up(M, 4);
    p.s1_lt = buf.at<float>(base);
    p.w = weight_side(w, w_scale_inv, true, Np, buf.at<uint8_t>(base + 5), buf.at<float>(base + 1));
  }
  if (dw) {
    p.q2 = buf.at<uint8_t>(base + 6);
    p.ld2 = round_up(M, kFp8Block);
    p.s2_lt = buf.at<float>(base + 2);
    p.xs_q = xs_q;
    p.xs_scale = xs_scale;
    p.q3 = buf.at<uint8_t>(base + 7);
    p.s3_lt = buf.at<float>(base + 3);
  }
  return p;
}

// y[M, N] (+)= Q(x)·Q(W)ᵀ, K a multiple of 128: one preparation launch and the matmul. qx holds x's
// 1×128 tiles (read) or, with x set, receives them (its q then allocated with M_lt rows).
void fprop_direct(const Tensor& x, const Q& qx, int64_t M_lt, const Tensor& w, const Tensor& w_scale_inv, bool pow2,
                  float* y, bool accumulate) {
  const int64_t M = qx.q.dim(0), K = qx.q.dim(1), N = w.dim(0);
  const bool copy = !x.defined() && M_lt != M;
  std::vector<size_t> bytes;
  fprop_bytes(bytes, N, K, M_lt, copy);
  const Carve buf(bytes);
  const FpropPrep p = fprop_prep_in(buf, 0, w, w_scale_inv, pow2, M, M_lt, x.defined() ? x.data<float>() : nullptr,
                                    ptr<uint8_t>(qx.q), ptr<float>(qx.s), copy);
  fp8_fprop_prep({&p, 1});
  gemm_token_rows(p.q_lt, p.x_scale_lt, M, M_lt, p.w.q, p.w.scale_lt, true, N, K, y, accumulate);
}

// Dgrad (dx set) and Wgrad (dw set) from one preparation launch: dy read once, the reductions (N for
// Dgrad, the tokens M for Wgrad) padded to 128 by the quantizers.
void backward_direct(const Tensor& dy, const Tensor& w, const Tensor& w_scale_inv, const Fp8Tiles& qx, bool pow2,
                     float* dx, bool accumulate_dx, float* dw, bool accumulate_dw) {
  if (!dx && !dw) return;
  const int64_t M = dy.dim(0), N = dy.dim(1), K = dx ? w.dim(1) : qx.q.dim(1);
  std::vector<size_t> bytes;
  backward_bytes(bytes, M, N, K, dx, dw);
  const Carve buf(bytes);
  const BackwardPrep p = backward_prep_in(buf, 0, dy.data<float>(), M, N, K, w, w_scale_inv,
                                          dw ? ptr<uint8_t>(qx.q) : nullptr, dw ? qx.scale.data<float>() : nullptr,
                                          dx, dw, pow2);
  fp8_backward_prep({&p, 1});
  if (dw) fp8_gemm_lt(p.q2, p.s2_lt, N, p.q3, p.s3_lt, false, K, p.ld2, dw, accumulate_dw);
  if (dx) gemm_token_rows(p.q1, p.s1_lt, M, p.M1, p.w.q, p.w.scale_lt, true, K, p.ld1, dx, accumulate_dx);
}

// ---------------------------------------------------------------------------------------------
// The MoE's experts (linear_lowp_grouped): the blocks' preparations in grouped launches, their
// matmuls on the lanes (LaneRuns), and the rows of padded matmuls that could not be written in
// place added into the output in one launch.
// A block whose row count is no multiple of 4 reads the rows after it in x's copy as its padding
// rows (another block's codes: the products of those rows are dropped, and a row of the product
// depends on its own row of codes only), so the codes are copied only when those rows run past x.

// The non-empty blocks, kPrepGroup at a time.
template <class F>
void each_group(std::span<const int64_t> offsets, F fn) {
  std::vector<size_t> blocks;
  for (size_t e = 0; e + 1 < offsets.size(); ++e)
    if (offsets[e + 1] > offsets[e]) blocks.push_back(e);
  for (size_t i = 0; i < blocks.size(); i += kPrepGroup)
    fn(std::span<const size_t>(blocks).subspan(i, std::min<size_t>(kPrepGroup, blocks.size() - i)));
}

// The lanes of a group's n blocks as contiguous runs (block i on lane i·L/n, L the lane count), so
// that the padding rows a block's matmul writes past its own rows (cuBLASLt's multiple of 4) land
// in later blocks of its own lane, whose matmuls then overwrite them in stream order. Only without
// accumulation (the padding rows' products would be added to those rows), and only up to the last
// block of the lane: past it the rows go to scratch and are added by PaddedAdd. With lanes off (or
// while a graph is captured) every block runs in issue order, a case of the same rule.
class LaneRuns {
 public:
  LaneRuns(std::span<const size_t> blocks, std::span<const int64_t> offsets) : lane_(blocks.size()) {
    const int64_t n = int64_t(blocks.size()), L = std::max(cuda_lanes(), 1);
    end_.assign(size_t(L), 0);
    for (int64_t i = 0; i < n; ++i) {
      lane_[size_t(i)] = i * L / n;
      end_[size_t(lane_[size_t(i)])] = offsets[blocks[size_t(i)] + 1];
    }
  }
  int64_t lane(size_t i) const { return lane_[i]; }
  // Whether block i's matmul may write rows up to `end` itself.
  bool writes(size_t i, int64_t rows, int64_t rows_lt, int64_t r0, bool accumulate) const {
    return rows_lt == rows || (!accumulate && r0 + rows_lt <= end_[size_t(lane_[i])]);
  }

 private:
  std::vector<int64_t> lane_, end_;
};

// The grouped FP8 calls' matmuls one cuBLASLt call per block, where the grouped kernel is off or
// refuses the operands: gemm(i, out, accumulate) for block i on the lanes in contiguous runs
// (LaneRuns), out its rows of c (W columns each, from c + offsets[blocks[i]]·W) or, when its
// padding rows would run past its lane's run or be added into c, scratch rows that one PaddedAdd
// then writes into c. c null: gemm writes elsewhere, nothing is padded.
template <class F>
void lt_blocks_on_lanes(std::span<const size_t> blocks, std::span<const int64_t> offsets, float* c, int64_t W,
                        bool accumulate, F gemm) {
  const size_t n = blocks.size();
  const LaneRuns runs(blocks, offsets);
  std::vector<size_t> bytes(n, 0);
  bool padded = false;
  for (size_t i = 0; i < n; ++i) {
    const int64_t r0 = offsets[blocks[i]], rows = offsets[blocks[i] + 1] - r0, rows_lt = round_up(rows, 4);
    if (c && !runs.writes(i, rows, rows_lt, r0, accumulate)) bytes[i] = size_t(rows_lt * W) * 4, padded = true;
  }
  std::optional<Carve> scratch;
  if (padded) scratch.emplace(bytes);
  PaddedAdd pad(accumulate);
  {
    LaneScope lanes(cuda_backend(), n > 1);
    for (size_t i = 0; i < n; ++i) {
      lanes(runs.lane(i));
      const int64_t r0 = offsets[blocks[i]];
      float* out = c ? c + r0 * W : nullptr;
      if (bytes[i] == 0) {
        gemm(i, out, accumulate);
        continue;
      }
      pad.add(scratch->at<float>(i), out, (offsets[blocks[i] + 1] - r0) * W);
      gemm(i, scratch->at<float>(i), false);
    }
  }
  pad.flush();
}

// Bf16 mode: the blocks' products as cuBLASLt pointer-array batches. Each block's rows are cut into
// chunks of kBf16Chunk rows, one batch written in place; a block's last Me % kBf16Chunk rows are the
// tail of a chunk that ends with the block (or starts at row 0, for the first rows of x), a second
// batch into scratch whose tails PaddedAdd writes (adds) into c. A chunk's other rows are products
// of other blocks' rows with this block's weight, dropped (a row of the product reads its own row
// of a only). On the H200, per block on four lanes the experts' GEMMs of a bench-0.7b step ran at
// ~250-300 TFLOP/s, as one batch of 256-row chunks at ~500-600 (docs/cuda.md).
constexpr int64_t kBf16Chunk = 256;

// The pointer arrays of bf16_blocks' two batches, written on the device (a pageable host copy may
// wait for the stream, and the experts' step is queued by a host only just ahead of the GPU). Per
// block: its weight, rows, the index of its first full chunk and of its tail (-1: none). One thread
// per block writes a[], w[], c[] of the full chunks (nf apart), then of the tails (nt apart).
constexpr int kTableBlocks = 64;
struct ChunkTable {
  int n = 0;
  const void* w[kTableBlocks] = {};
  int64_t r0[kTableBlocks] = {}, r1[kTableBlocks] = {};
  int first[kTableBlocks] = {}, tail[kTableBlocks] = {};
};
__global__ void chunk_pointers_kernel(const __grid_constant__ ChunkTable t, const __nv_bfloat16* a, int64_t kin,
                                      float* c, int64_t nout, float* prod, int64_t C, int64_t nf, int64_t nt,
                                      const void** out) {  // nf, nt: the arrays' strides
  const int e = threadIdx.x;
  if (e >= t.n) return;
  int64_t r = t.r0[e];
  for (int64_t j = t.first[e]; r + C <= t.r1[e]; r += C, ++j) {
    out[j] = a + r * kin;
    out[nf + j] = t.w[e];
    out[2 * nf + j] = c + r * nout;
  }
  if (t.tail[e] < 0) return;
  const int64_t j = t.tail[e], start = t.r1[e] - C > 0 ? t.r1[e] - C : 0;
  const void** o = out + 3 * nf;
  o[j] = a + start * kin;
  o[nt + j] = t.w[e];
  o[2 * nt + j] = prod + j * C * nout;
}

std::atomic<int64_t> g_bf16_batched{0};

// Whether bf16_blocks takes these operands: BF16 weights, 16-byte aligned rows of c (and of a, whose
// base the caller checks), two or more blocks with rows (one block is linear_lowp's one matmul), and
// at most twice x's rows computed: a tail costs a whole chunk, so many small blocks (V3's 256 experts
// at a few rows each) would multiply the work where the batch is only ~2x faster per row.
bool bf16_batchable(std::span<const int64_t> offsets, std::span<const Tensor> w, int64_t kin, const void* c,
                    int64_t nout) {
  if (kin <= 0 || nout <= 0 || kin % 8 != 0 || nout % 4 != 0 || !aligned16(c)) return false;
  const int64_t M = offsets.back(), C = std::min(kBf16Chunk, M);
  int64_t blocks = 0, computed = 0;
  for (size_t e = 0; e < w.size(); ++e) {
    if (w[e].dtype() != DType::BF16 || !aligned16(w[e].raw())) return false;
    const int64_t rows = offsets[e + 1] - offsets[e];
    blocks += rows > 0 ? 1 : 0;
    computed += (rows + C - 1) / C * C;
  }
  return blocks >= 2 && computed <= 2 * M;
}

// c[r] (+)= a[r] · op(w_e) for the rows r of every block e: a [M, kin] BF16, w_e [nout, kin] (trans_w:
// the forward) or [kin, nout] (Dgrad), c [M, nout] F32. False, nothing written into c, when cuBLASLt
// has no algorithm for a batch (the tails' batch runs first: it writes scratch only).
bool bf16_blocks(std::span<const int64_t> offsets, std::span<const Tensor> w, bool trans_w, const __nv_bfloat16* a,
                 int64_t kin, int64_t nout, float* c, bool accumulate) {
  const int64_t M = offsets.back(), C = std::min(kBf16Chunk, M);
  struct Tail { int64_t skip, r, len; };  // rows of its chunk before the tail; the tail's rows in c
  std::vector<Tail> tails;
  std::vector<int> first, tail_of;
  int64_t nf = 0;
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    const int64_t r0 = offsets[e], r1 = offsets[e + 1], full = (r1 - r0) / C, r = r0 + full * C;
    first.push_back(int(nf));
    nf += full;
    tail_of.push_back(r < r1 ? int(tails.size()) : -1);
    if (r < r1) tails.push_back({r - std::max<int64_t>(0, r1 - C), r, r1 - r});
  }
  const int64_t nt = int64_t(tails.size());
  // Scratch: the tails' products [nt·C, nout], then the pointer arrays (full: a, w, c; tails: a, w, c),
  // each of an even length so that every array starts 16-byte aligned.
  const int64_t sf = nf + (nf & 1), st = nt + (nt & 1);
  const size_t prod_bytes = (size_t(nt * C * nout) * 4 + 255) / 256 * 256;
  Scratch buf(prod_bytes + size_t(3 * (sf + st)) * sizeof(void*));
  float* prod = buf.as<float>();
  const void** table = reinterpret_cast<const void**>(buf.as<char>() + prod_bytes);
  for (size_t e0 = 0; e0 < w.size(); e0 += kTableBlocks) {
    ChunkTable t;
    for (size_t e = e0; e < std::min(w.size(), e0 + kTableBlocks); ++e, ++t.n) {
      t.w[t.n] = w[e].raw();
      t.r0[t.n] = offsets[e];
      t.r1[t.n] = offsets[e + 1];
      t.first[t.n] = first[e];
      t.tail[t.n] = tail_of[e];
    }
    chunk_pointers_kernel<<<1, kTableBlocks, 0, stream()>>>(t, a, kin, c, nout, prod, C, sf, st, table);
    check_launch("BF16 expert batches: pointer arrays");
  }
  // Every pointer is 16-byte aligned (bf16_batchable and the callers' checks); cuBLASLt cannot see
  // more through a pointer array.
  constexpr uint32_t align = 16;
  auto batch = [&](const void** t, int64_t n, int64_t stride, bool acc) {
    LtMatmul g = lt_row_major(false, trans_w, C, nout, kin, t, kin, t + stride, trans_w ? kin : nout, t + 2 * stride,
                              nout, acc);
    g.batch = n;
    g.pointer_array = true;
    g.align = align;
    return lt_try_matmul(g);
  };
  if (nt > 0 && !batch(table + 3 * sf, nt, st, false)) return false;
  if (nf > 0 && !batch(table, nf, sf, accumulate)) return false;
  ++g_bf16_batched;
  PaddedAdd pad(accumulate);
  for (size_t j = 0; j < tails.size(); ++j)
    pad.add(prod + (int64_t(j) * C + tails[j].skip) * nout, c + tails[j].r * nout, tails[j].len * nout);
  pad.flush();
  return true;
}

std::atomic<bool> g_grouped_wgrad{on_unless_env_zero("DSV3_GROUPED_WGRAD")};

// linear_backward_lowp_grouped in Bf16 mode: dy converted once, Dgrad as bf16_blocks, the blocks'
// Wgrads (their rows are the reduction, which a cuBLASLt batch cannot vary) in one grouped launch
// beside it, or one matmul per block on the lanes.
bool bf16_grouped_backward(const GroupedLinearBackwardArgs& a, const Fp8Tiles& xc) {
  const Tensor dy = mat(a.dy), x = mat(a.x);
  const int64_t N = dy.dim(1), K = x.dim(1);
  const bool want_dx = present(a.dx);
  if (!bf16_batchable(a.offsets, a.w, N, want_dx ? a.dx.raw() : nullptr, K)) return false;
  const Tensor dyb = to_bf16(dy), xb = bf16_input(x, &xc);
  if (!aligned16(dyb.raw()) || !aligned16(xb.raw())) return false;
  const size_t n = a.w.size();
  LaneScope lanes(cuda_backend());
  lanes(0);  // Dgrad's batch beside the other lanes' Wgrads
  if (want_dx && !bf16_blocks(a.offsets, a.w, false, bf(dyb), N, K, ptr<float>(a.dx), a.accumulate_dx)) return false;
  lanes(1);
  if (g_grouped_wgrad.load() && cuda::grouped_wgrad_bf16(dyb.raw(), xb.raw(), N, K, a.offsets, a.dw)) return true;
  for (size_t e = 0; e < n; ++e) {
    const int64_t r0 = a.offsets[e], Me = a.offsets[e + 1] - r0;
    if (Me == 0) continue;
    lanes(int64_t(e));
    gemm_bf16(true, false, N, K, Me, bf(dyb) + r0 * N, N, bf(xb) + r0 * K, K, true, ptr<float>(a.dw[e]), K);
  }
  return true;
}

}  // namespace

int64_t cuda_bf16_grouped_batches() { return g_bf16_batched.load(); }
void cuda_set_grouped_wgrad(bool on) { g_grouped_wgrad.store(on); }
bool cuda_grouped_wgrad() { return g_grouped_wgrad.load(); }

bool cuda_linear_lowp_grouped(const LinearPrecision& p, const GroupedLinearArgs& a, const Fp8Tiles& xc) {
  if (p.mode == LinearPrecisionMode::Bf16) {
    const int64_t K = a.x.dim(1), N = a.y.dim(1);
    if (!bf16_batchable(a.offsets, a.w, K, a.y.raw(), N)) return false;
    const Tensor xb = bf16_input(a.x, &xc);
    return aligned16(xb.raw()) && bf16_blocks(a.offsets, a.w, true, bf(xb), K, N, ptr<float>(a.y), a.accumulate);
  }
  if (p.mode != LinearPrecisionMode::Fp8 || legacy() || a.w.empty() || !xc.defined() ||
      xc.q.dtype() != DType::F8_E4M3 || !xc.scale.defined())
    return false;
  const int64_t M = a.x.dim(0), K = a.x.dim(1), N = a.w[0].dim(0), kb = K / kFp8Block;
  if (K % kFp8Block != 0 || !lt_rows_ok(N)) return false;
  each_group(a.offsets, [&](std::span<const size_t> blocks) {
    const size_t n = blocks.size();
    std::vector<size_t> bytes;
    for (size_t i = 0; i < n; ++i) {
      const int64_t r0 = a.offsets[blocks[i]], Mlt = round_up(a.offsets[blocks[i] + 1] - r0, 4);
      fprop_bytes(bytes, N, K, Mlt, r0 + Mlt > M);
    }
    const Carve buf(bytes);
    std::vector<FpropPrep> ps;
    for (size_t i = 0; i < n; ++i) {
      const size_t e = blocks[i];
      const int64_t r0 = a.offsets[e], Me = a.offsets[e + 1] - r0, Mlt = round_up(Me, 4);
      ps.push_back(fprop_prep_in(buf, kFpropPieces * i, a.w[e], a.w_scale_inv.empty() ? Tensor() : a.w_scale_inv[e],
                                 p.pow2_scale, Me, Mlt, nullptr, ptr<uint8_t>(xc.q) + r0 * K,
                                 ptr<float>(xc.scale) + r0 * kb, r0 + Mlt > M));
    }
    fp8_fprop_prep(ps);
    std::vector<cuda::Fp8GroupItem> items;
    for (size_t i = 0; i < n; ++i) {
      const FpropPrep& q = ps[i];
      items.push_back({q.q_lt, q.x_scale_lt, q.M_lt, q.w.q, q.w.scale_lt, q.w.ld4,
                       ptr<float>(a.y) + a.offsets[blocks[i]] * N, q.M, K, true, a.accumulate});
    }
    if (cuda::grouped_fp8_gemm(items, N)) return;
    lt_blocks_on_lanes(blocks, a.offsets, ptr<float>(a.y), N, a.accumulate, [&](size_t i, float* out, bool acc) {
      const FpropPrep& q = ps[i];
      fp8_gemm_lt(q.q_lt, q.x_scale_lt, q.M_lt, q.w.q, q.w.scale_lt, true, N, K, out, acc);
    });
  });
  return true;
}

bool cuda_linear_backward_lowp_grouped(const LinearPrecision& p, const GroupedLinearBackwardArgs& a,
                                       const Fp8Tiles& xc) {
  if (p.mode == LinearPrecisionMode::Bf16) return bf16_grouped_backward(a, xc);
  if (p.mode != LinearPrecisionMode::Fp8 || legacy() || p.dgrad_block || a.w.empty() || !xc.defined() ||
      xc.q.dtype() != DType::F8_E4M3 || !xc.scale.defined())
    return false;
  const Tensor dy = mat(a.dy);
  const int64_t N = dy.dim(1), K = a.w[0].dim(1), kbx = ceil_div(K, kFp8Block);
  if (!lt_rows_ok(K) || N % 4 != 0) return false;
  const bool want_dx = present(a.dx);
  each_group(a.offsets, [&](std::span<const size_t> blocks) {
    const size_t n = blocks.size();
    std::vector<size_t> bytes;
    for (size_t i = 0; i < n; ++i)
      backward_bytes(bytes, a.offsets[blocks[i] + 1] - a.offsets[blocks[i]], N, K, want_dx, true);
    const Carve buf(bytes);
    std::vector<BackwardPrep> ps;
    for (size_t i = 0; i < n; ++i) {
      const size_t e = blocks[i];
      const int64_t r0 = a.offsets[e];
      ps.push_back(backward_prep_in(buf, kBackwardPieces * i, dy.data<float>() + r0 * N, a.offsets[e + 1] - r0, N, K,
                                    a.w[e], a.w_scale_inv.empty() ? Tensor() : a.w_scale_inv[e],
                                    ptr<uint8_t>(xc.q) + r0 * K, ptr<float>(xc.scale) + r0 * kbx, want_dx, true,
                                    p.pow2_scale));
    }
    fp8_backward_prep(ps);
    std::vector<cuda::Fp8GroupItem> items;
    for (size_t i = 0; i < n; ++i) {
      const BackwardPrep& q = ps[i];
      items.push_back({q.q2, q.s2_lt, N, q.q3, q.s3_lt, K, ptr<float>(a.dw[blocks[i]]), N, q.ld2, false, true});
      if (want_dx)
        items.push_back({q.q1, q.s1_lt, q.M1, q.w.q, q.w.scale_lt, q.w.ld4, ptr<float>(a.dx) + a.offsets[blocks[i]] * K,
                         q.M, q.ld1, true, a.accumulate_dx});
    }
    if (cuda::grouped_fp8_gemm(items, K)) return;
    float* dx = want_dx ? ptr<float>(a.dx) : nullptr;
    lt_blocks_on_lanes(blocks, a.offsets, dx, K, a.accumulate_dx, [&](size_t i, float* out, bool acc) {
      const BackwardPrep& q = ps[i];
      fp8_gemm_lt(q.q2, q.s2_lt, N, q.q3, q.s3_lt, false, K, q.ld2, ptr<float>(a.dw[blocks[i]]), true);
      if (out) fp8_gemm_lt(q.q1, q.s1_lt, q.M1, q.w.q, q.w.scale_lt, true, K, q.ld1, out, acc);
    });
  });
  return true;
}

Fp8Tiles cuda_fp8_tiles(const Tensor& x, bool pow2_scale) {
  Q t = quant(mat(x), Fp8Tiling::Row1x128, false, pow2_scale);
  return {t.q, t.s, 0};
}

Tensor cuda_dequantize(const Fp8Tiles& t) { return dequant(Q{t.q, t.scale}); }

void cuda_linear_lowp(const LinearPrecision& p, const LinearArgs& a, Fp8Tiles* x_fp8) {
  CudaBackend& be = cuda_backend();
  if (p.mode == LinearPrecisionMode::F32) return be.linear(a);
  const Tensor x = mat(a.x), y = mat(a.y);
  const int64_t M = x.dim(0), K = x.dim(1), N = a.w.dim(0);
  if (M == 0) return;
  if (p.mode == LinearPrecisionMode::Bf16) {
    Tensor xb = bf16_input(x, x_fp8), wb = a.w.dtype() == DType::BF16 ? a.w : to_bf16(a.w, a.w_scale_inv);
    if (x_fp8 && !x_fp8->defined()) *x_fp8 = {xb, Tensor(), 0};
    gemm_bf16(false, true, M, N, K, bf(xb), K, bf(wb), K, a.accumulate,
              ptr<float>(y), N);
    return;
  }
  const bool cached = x_fp8 && x_fp8->defined();
  if (cached) DSV3_CHECK(x_fp8->q.numel() == x.numel(), "linear_lowp: the cached FP8 input does not match x");
  const bool x_aligned = (reinterpret_cast<uintptr_t>(x.raw()) & 15u) == 0;  // the preparation's 16-byte loads
  if (!legacy() && K % kFp8Block == 0 && lt_rows_ok(N) && (cached || x_aligned)) {
    const int64_t M_lt = round_up(M, 4);  // the new cache's codes get cuBLASLt's padding rows (a view hides them)
    const Q qx = cached ? Q{x_fp8->q, x_fp8->scale}
                        : Q{be.alloc(DType::F8_E4M3, {M_lt, K}).rows(0, M), be.alloc(DType::F32, {M, K / kFp8Block})};
    fprop_direct(cached ? Tensor() : x, qx, M_lt, a.w, a.w_scale_inv, p.pow2_scale, ptr<float>(y), a.accumulate);
    if (x_fp8 && !cached) *x_fp8 = {qx.q, qx.s, 0};
    return;
  }
  Q qx;
  if (cached) {
    qx = {x_fp8->q, x_fp8->scale};
  } else {
    qx = quant(x, Fp8Tiling::Row1x128, false, p.pow2_scale);
    if (x_fp8) *x_fp8 = {qx.q, qx.s, 0};
  }
  gemm_fp8(qx, quant(to_f32(a.w, a.w_scale_inv), Fp8Tiling::Block128x128, false, p.pow2_scale), y, a.accumulate, true);
}

void cuda_linear_backward_lowp(const LinearPrecision& p, const LinearBackwardArgs& a, const Fp8Tiles* x_fp8,
                               const Fp8Tiles* dy_copy) {
  CudaBackend& be = cuda_backend();
  if (p.mode == LinearPrecisionMode::F32) return be.linear_backward(a);
  const Tensor dy = mat(a.dy);
  const int64_t M = dy.dim(0), N = dy.dim(1);
  if (M == 0) return;
  if (p.mode == LinearPrecisionMode::Bf16) {
    Tensor dyb = bf16_input(dy, dy_copy);
    if (present(a.dx)) {  // dx[M, K] = dy[M, N] · W[N, K]
      const int64_t K = a.w.dim(1);
      Tensor wb = a.w.dtype() == DType::BF16 ? a.w : to_bf16(a.w, a.w_scale_inv);
      gemm_bf16(false, false, M, K, N, bf(dyb), N, bf(wb), K, a.accumulate_dx,
                ptr<float>(a.dx), K);
    }
    if (present(a.dw)) {  // dW[N, K] = dyᵀ · x
      const Tensor x = mat(a.x);
      const int64_t K = x.dim(1);
      Tensor xb = bf16_input(x, x_fp8);
      gemm_bf16(true, false, N, K, M, bf(dyb), N, bf(xb), K, a.accumulate_dw,
                ptr<float>(a.dw), K);
    }
    return;
  }
  if (!present(a.dx) && !present(a.dw)) return;
  const Fp8Tiling gtile = p.dgrad_block ? Fp8Tiling::Block128x128 : Fp8Tiling::Row1x128;
  // Wgrad: dW[N, K] = Q(dyᵀ)[N, M] · (Q(x̂ᵀ)[K, M])ᵀ; x̂ = the forward's FP8 copy of x, dequantized
  // and re-quantized per 128 tokens (a NaN scale in the copy comes back as NaN and is re-marked).
  Fp8Tiles qx;
  if (present(a.dw)) {
    qx = x_fp8 && x_fp8->defined() ? *x_fp8 : cuda_fp8_tiles(a.x, p.pow2_scale);
    DSV3_CHECK(qx.q.numel() == a.x.numel(), "linear_backward_lowp: the cached FP8 input does not match x");
  }
  // Dgrad: dx[M, K] = Q(dy)[M, N] · (Q(W)ᵀ [K, N])ᵀ
  const int64_t K = present(a.dx) ? a.w.dim(1) : qx.q.dim(1);
  if (!legacy() && !p.dgrad_block && lt_rows_ok(K) && N % 4 == 0)  // N: cuBLASLt takes Wgrad's n in 4s
    return backward_direct(dy, a.w, a.w_scale_inv, qx, p.pow2_scale, present(a.dx) ? ptr<float>(a.dx) : nullptr,
                           a.accumulate_dx, present(a.dw) ? ptr<float>(a.dw) : nullptr, a.accumulate_dw);
  if (present(a.dx))
    gemm_fp8(quant(dy, gtile, false, p.pow2_scale),
             quant(to_f32(a.w, a.w_scale_inv), Fp8Tiling::Block128x128, true, p.pow2_scale), mat(a.dx),
             a.accumulate_dx, true);
  if (present(a.dw))
    gemm_fp8(quant(dy, p.dgrad_block ? Fp8Tiling::Block128x128 : Fp8Tiling::Col128x1, true, p.pow2_scale),
             requant_cols_t(qx, p.pow2_scale), a.dw, a.accumulate_dw, false);
}

}  // namespace dsv3
