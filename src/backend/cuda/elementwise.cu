// Elementwise ops, copies and conversions, column-block copies and the sum of squares (AdamW and the
// multi-tensor ops are in multi_tensor.cu).
#include <cmath>

#include "backend/cuda/common.cuh"
#include "backend/cuda/stream.h"
#include "backend/cuda/vec4.cuh"

namespace dsv3 {
using namespace cuda;

namespace {

#define GRID_LOOP(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

// The F32 maps run through map4_kernel (vec4.cuh): out may alias an input, as each element is read
// before it is written by the same thread.
struct AddOp {
  const float *a, *b;
  float* o;
  float al, be;
  template <int W> __device__ void at(int64_t i) const {
    const Floats<W> x = load_w<W>(a + i), y = load_w<W>(b + i);
    Floats<W> r;
#pragma unroll
    for (int j = 0; j < W; ++j) r.v[j] = al * x.v[j] + be * y.v[j];
    store_w<W>(o + i, r);
  }
};
struct ScaleOp {
  const float* x;
  float* o;
  float s;
  template <int W> __device__ void at(int64_t i) const {
    Floats<W> r = load_w<W>(x + i);
#pragma unroll
    for (int j = 0; j < W; ++j) r.v[j] = s * r.v[j];
    store_w<W>(o + i, r);
  }
};
struct MulOp {
  const float *a, *b;
  float* o;
  bool acc;
  template <int W> __device__ void at(int64_t i) const {
    const Floats<W> x = load_w<W>(a + i), y = load_w<W>(b + i);
    Floats<W> r;
    if (acc) r = load_w<W>(o + i);
#pragma unroll
    for (int j = 0; j < W; ++j) r.v[j] = acc ? r.v[j] + x.v[j] * y.v[j] : x.v[j] * y.v[j];
    store_w<W>(o + i, r);
  }
};
__global__ void convert_kernel(const void* s, DType st, void* d, DType dt, int64_t n) {
  GRID_LOOP(i, n) store_f(d, dt, i, load_f(s, st, i));
}
__global__ void fill_kernel(void* x, DType t, int64_t n, float v) {
  GRID_LOOP(i, n) {
    if (t == DType::I32) static_cast<int32_t*>(x)[i] = int32_t(v);
    else store_f(x, t, i, v);
  }
}
// dst row r, column c < w. Rs == Rd: r' = r; broadcast (g_b > 1): r' = r / g_b; reduce (g_r > 1):
// the sum of src rows r·g_r + j in ascending j.
__global__ void copy_cols_kernel(const float* s, int64_t cs, float* d, int64_t cd, int64_t rd, int64_t w,
                                 int64_t g_b, int64_t g_r, bool acc) {
  GRID_LOOP(i, rd * w) {
    int64_t r = i / w, c = i % w;
    float v;
    if (g_b > 1) {
      v = s[(r / g_b) * cs + c];
    } else {
      v = s[(r * g_r) * cs + c];
      if (acc) v = d[r * cd + c] + v;
      for (int64_t j = 1; j < g_r; ++j) v += s[(r * g_r + j) * cs + c];
      d[r * cd + c] = v;
      continue;
    }
    d[r * cd + c] = acc ? d[r * cd + c] + v : v;
  }
}
__global__ void sumsq_partial(const float* x, int64_t n, int64_t chunk, double* part) {
  int64_t lo = blockIdx.x * chunk, hi = lo + chunk < n ? lo + chunk : n;
  double s = 0.0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) s += double(x[i]) * double(x[i]);
  s = block_sum(s);
  if (threadIdx.x == 0) part[blockIdx.x] = s;
}
__global__ void sumsq_final(const double* part, int64_t np, float* out, bool acc) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < np; i += blockDim.x) s += part[i];
  s = block_sum(s);
  if (threadIdx.x == 0) out[0] = acc ? float(double(out[0]) + s) : float(s);
}
template <class O>
struct SwigluOp {
  const float *g, *u;
  O* o;
  template <int W> __device__ void at(int64_t i) const {
    const Floats<W> gv = load_w<W>(g + i), uv = load_w<W>(u + i);
    Floats<W> r;
#pragma unroll
    for (int j = 0; j < W; ++j) r.v[j] = swiglu_value(gv.v[j], uv.v[j]);
    store_w<W>(o + i, r);
  }
};
// dg may alias dout (elementwise); either output may be absent, or BF16 (then acc is false).
template <class G, class U>
struct SwigluBwdOp {
  const float *dout, *g, *u;
  G* dg;
  U* du;
  bool acc;
  template <int W> __device__ void at(int64_t i) const {
    const Floats<W> gv = load_w<W>(g + i), uv = load_w<W>(u + i), go = load_w<W>(dout + i);
    Floats<W> vg, vu;
#pragma unroll
    for (int j = 0; j < W; ++j) swiglu_grad(go.v[j], gv.v[j], uv.v[j], vg.v[j], vu.v[j]);
    if (acc) {
      const Floats<W> pg = dg ? load_w<W>(dg + i) : Floats<W>{}, pu = du ? load_w<W>(du + i) : Floats<W>{};
#pragma unroll
      for (int j = 0; j < W; ++j) vg.v[j] = pg.v[j] + vg.v[j], vu.v[j] = pu.v[j] + vu.v[j];
    }
    if (dg) store_w<W>(dg + i, vg);
    if (du) store_w<W>(du + i, vu);
  }
};

unsigned grid(int64_t n) { return std::min(blocks_for(n), 65535u * 8); }
unsigned grid4(int64_t n) { return grid((n + 3) / 4); }

// SwiGLU backward with each output in F32 or BF16 (absent outputs are null).
template <class G, class U>
void swiglu_bwd_launch(const float* dout, const float* g, const float* u, void* dg, void* du, int64_t n, bool acc,
                       bool vec) {
  map4_kernel<<<grid4(n), 256>>>(SwigluBwdOp<G, U>{dout, g, u, static_cast<G*>(dg), static_cast<U*>(du), acc}, n, vec);
}

// The same four columns at a time (float4), when every column offset and row length is a multiple
// of 4 and the bases are 16-byte aligned: MLA's head splits and concatenations are.
__global__ void copy_cols4_kernel(const float4* s, int64_t cs, float4* d, int64_t cd, int64_t rd, int64_t w,
                                  int64_t g_b, int64_t g_r, bool acc) {
  GRID_LOOP(i, rd * w) {
    int64_t r = i / w, c = i % w;
    float4 v = g_b > 1 ? s[(r / g_b) * cs + c] : s[(r * g_r) * cs + c];
    if (acc) {  // the scalar kernel's order: the destination first, then the source rows
      const float4 o = d[r * cd + c];
      v = make_float4(o.x + v.x, o.y + v.y, o.z + v.z, o.w + v.w);
    }
    for (int64_t j = 1; j < g_r; ++j) {
      const float4 u = s[(r * g_r + j) * cs + c];
      v.x += u.x, v.y += u.y, v.z += u.z, v.w += u.w;
    }
    d[r * cd + c] = v;
  }
}

}  // namespace

void CudaBackend::add(const AddArgs& a) {
  validate(a);
  int64_t n = a.out.numel();
  const AddOp op{ptr<float>(a.a), ptr<float>(a.b), ptr<float>(a.out), a.alpha, a.beta};
  if (n) map4_kernel<<<grid4(n), 256, 0, stream()>>>(op, n, all_aligned16({op.a, op.b, op.o}));
  check_launch("add");
}
void CudaBackend::scale(const ScaleArgs& a) {
  validate(a);
  int64_t n = a.out.numel();
  const ScaleOp op{ptr<float>(a.x), ptr<float>(a.out), a.s};
  if (n) map4_kernel<<<grid4(n), 256>>>(op, n, all_aligned16({op.x, op.o}));
  check_launch("scale");
}
void CudaBackend::mul(const MulArgs& a) {
  validate(a);
  int64_t n = a.out.numel();
  const MulOp op{ptr<float>(a.a), ptr<float>(a.b), ptr<float>(a.out), a.accumulate};
  if (n) map4_kernel<<<grid4(n), 256>>>(op, n, all_aligned16({op.a, op.b, op.o}));
  check_launch("mul");
}
void CudaBackend::copy(const CopyArgs& a) {
  validate(a);
  if (a.src.raw() == a.dst.raw() && a.src.dtype() == a.dst.dtype()) return;
  int64_t n = a.src.numel();
  if (n == 0) return;
  // Copies on the legacy stream, as every op here (the design rule in docs/cuda.md).
  if (a.src.dtype() == a.dst.dtype()) {
    const size_t bytes = size_t(a.src.nbytes());
    if (bytes_overlap(a.src, a.dst)) {  // a move (validated: only the same dtype may overlap)
      Scratch held(bytes);  // cudaMemcpy's bytes must not overlap: through scratch, as memmove
      DSV3_CUDA_CHECK(cudaMemcpyAsync(held.as<void>(), a.src.raw(), bytes, cudaMemcpyDeviceToDevice, nullptr));
      DSV3_CUDA_CHECK(cudaMemcpyAsync(ptr<void>(a.dst), held.as<void>(), bytes, cudaMemcpyDeviceToDevice, nullptr));
      return;
    }
    DSV3_CUDA_CHECK(cudaMemcpyAsync(ptr<void>(a.dst), a.src.raw(), bytes, cudaMemcpyDeviceToDevice, nullptr));
    return;
  }
  if (a.src.dtype() == DType::F32 && a.dst.dtype() == DType::BF16) {
    f32_to_bf16(a.src.data<float>(), n, ptr<__nv_bfloat16>(a.dst));
    return;
  }
  convert_kernel<<<grid(n), 256>>>(a.src.raw(), a.src.dtype(), ptr<void>(a.dst), a.dst.dtype(), n);
  check_launch("copy");
}
void CudaBackend::fill(const FillArgs& a) {
  validate(a);
  int64_t n = a.x.numel();
  if (n == 0) return;
  // +0 is all-zero bytes in every dtype: a memset (on the legacy stream, as the kernel) writes at
  // twice the kernel's rate.
  if (a.value == 0.0f && !std::signbit(a.value))
    DSV3_CUDA_CHECK(cudaMemsetAsync(ptr<void>(a.x), 0, a.x.nbytes(), nullptr));
  else
    fill_kernel<<<grid(n), 256>>>(ptr<void>(a.x), a.x.dtype(), n, a.value);
  check_launch("fill");
}
void CudaBackend::copy_cols(const CopyColsArgs& a) {
  validate(a);
  int64_t cs = last_dim(a.src), cd = last_dim(a.dst), rs = rows_of(a.src), rd = rows_of(a.dst), w = a.width;
  if (rd == 0 || w == 0) return;
  int64_t g_b = rs < rd ? rd / rs : 1, g_r = rs >= rd ? rs / rd : 1;
  const float* src = ptr<float>(a.src) + a.src_col;
  float* dst = ptr<float>(a.dst) + a.dst_col;
  if (cs % 4 == 0 && cd % 4 == 0 && w % 4 == 0 && (reinterpret_cast<uintptr_t>(src) & 15u) == 0 &&
      (reinterpret_cast<uintptr_t>(dst) & 15u) == 0) {
    copy_cols4_kernel<<<grid(rd * w / 4), 256, 0, stream()>>>(reinterpret_cast<const float4*>(src), cs / 4,
                                                              reinterpret_cast<float4*>(dst), cd / 4, rd, w / 4, g_b,
                                                              g_r, a.accumulate);
    check_launch("copy_cols");
    return;
  }
  copy_cols_kernel<<<grid(rd * w), 256, 0, stream()>>>(ptr<float>(a.src) + a.src_col, cs, ptr<float>(a.dst) + a.dst_col,
                                                       cd, rd, w, g_b, g_r, a.accumulate);
  check_launch("copy_cols");
}
void CudaBackend::sum_squares(const SumSquaresArgs& a) {
  validate(a);
  // Fixed chunks summed in a fixed order: deterministic, like the CPU's.
  constexpr int64_t kChunk = 1 << 14;
  int64_t n = a.x.numel(), nc = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
  Scratch part(size_t(nc) * sizeof(double));
  sumsq_partial<<<unsigned(nc), 256>>>(ptr<float>(a.x), n, kChunk, part.as<double>());
  sumsq_final<<<1, 256>>>(part.as<double>(), nc, ptr<float>(a.out), a.accumulate);
  check_launch("sum_squares");
}
void CudaBackend::swiglu(const SwigluArgs& a) {
  validate(a);
  int64_t n = a.out.numel();
  if (n == 0) return;
  const float *g = ptr<float>(a.gate), *u = ptr<float>(a.up);
  const bool vec = all_aligned16({g, u, a.out.raw()});
  if (a.out.dtype() == DType::BF16)
    map4_kernel<<<grid4(n), 256, 0, stream()>>>(SwigluOp<__nv_bfloat16>{g, u, ptr<__nv_bfloat16>(a.out)}, n, vec);
  else
    map4_kernel<<<grid4(n), 256, 0, stream()>>>(SwigluOp<float>{g, u, ptr<float>(a.out)}, n, vec);
  check_launch("swiglu");
}
void CudaBackend::swiglu_backward(const SwigluBackwardArgs& a) {
  validate(a);
  int64_t n = a.gate.numel();
  if (n == 0) return;
  const float *dout = ptr<float>(a.dout), *g = ptr<float>(a.gate), *u = ptr<float>(a.up);
  void* dg = present(a.dgate) ? ptr<void>(a.dgate) : nullptr;
  void* du = present(a.dup) ? ptr<void>(a.dup) : nullptr;
  const bool vec = all_aligned16({dout, g, u, dg, du});
  using B = __nv_bfloat16;
  const bool gb = present(a.dgate) && a.dgate.dtype() == DType::BF16, ub = present(a.dup) && a.dup.dtype() == DType::BF16;
  auto* launch = gb && ub ? swiglu_bwd_launch<B, B>
                 : gb     ? swiglu_bwd_launch<B, float>
                 : ub     ? swiglu_bwd_launch<float, B>
                          : swiglu_bwd_launch<float, float>;
  launch(dout, g, u, dg, du, n, a.accumulate, vec);
  check_launch("swiglu_backward");
}

}  // namespace dsv3
