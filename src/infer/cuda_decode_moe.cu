// The grouped MoE of decode steps on the device (cuda_decode_ops.h: cuda_moe_forward): picks grouped
// by expert in one CTA, the experts' gate/up and down as work items of up to kChunk picks (the
// tensor-core kernels of cuda_decode_mma.cuh for BF16 and FP8 weights, the F32-FMA ones of
// cuda_decode_fma.cuh otherwise), and the combine in top-k order with the residual and the next
// block's RMSNorm.
#include <algorithm>
#include <type_traits>

#include "backend/cuda/common.cuh"
#include "backend/cuda/graph.h"
#include "backend/cuda/pdl.cuh"
#include "infer/cuda_decode_fma.cuh"
#include "infer/cuda_decode_launch.cuh"
#include "infer/cuda_decode_mma.cuh"
#include "infer/cuda_decode_ops.h"
#include "model/module_ops.h"

namespace dsv3 {
using namespace cuda;

namespace {

// One CTA: picks (r·k + j) grouped by expert, token order kept within an expert.
// order[p] = pick at grouped position p, inv[pick] = p, offsets[e] = first position of expert e.
// With a fused shared expert (group E), every token r is one more pick nk + r, after the routed ones.
// items[2i], items[2i + 1] (i < items[2·max_items]): the expert kernels' work items, a group with picks
// and the first of up to kChunk of its picks, groups ascending (their CTAs index the list: no CTA
// for a group without picks or a chunk past a group's end). Each warp takes experts warp, warp + nw,
// …, and finds an expert's picks 32 at a time by ballot (a pick's place is the count of earlier
// lanes' and chunks' matches); warp 0 scans the counts. The former kernel, one thread per expert
// scanning every pick and one thread writing the items, took 10 µs of a 160 µs bench-0.7b layer at
// 32 rows (Nsight Compute, H200).
__global__ void group_kernel(const int32_t* ids, int nk, int E, int n_shared_rows, int32_t* order, int32_t* inv,
                             int32_t* offsets, int32_t* items, int max_items) {
  extern __shared__ int32_t gsm[];
  int32_t* off = gsm;                 // [E] counts, then first grouped positions
  int32_t* first_item = off + E;      // [E + 1] first work item of each group (E: the shared expert)
  int32_t* sid = first_item + E + 1;  // [nk] the ids, read once (coalesced)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  pdl_wait();
  pdl_trigger();
  for (int i = threadIdx.x; i < nk; i += blockDim.x) sid[i] = ids[i];
  __syncthreads();
  for (int e = warp; e < E; e += nw) {
    int c = 0;
    for (int i0 = 0; i0 < nk; i0 += 32) c += __popc(__ballot_sync(0xffffffffu, i0 + lane < nk && sid[i0 + lane] == e));
    if (lane == 0) off[e] = c;
  }
  __syncthreads();
  if (warp == 0) {  // exclusive scans of the counts and of the items (ceil(count / kChunk) per expert)
    int pos = 0, it = 0;
    for (int e0 = 0; e0 < E; e0 += 32) {
      const int e = e0 + lane, c = e < E ? off[e] : 0, ni = (c + kChunk - 1) / kChunk;
      int cs = c, is = ni;
      for (int o = 1; o < 32; o <<= 1) {
        const int u = __shfl_up_sync(0xffffffffu, cs, o), v = __shfl_up_sync(0xffffffffu, is, o);
        if (lane >= o) {
          cs += u;
          is += v;
        }
      }
      if (e < E) {
        off[e] = offsets[e] = pos + cs - c;
        first_item[e] = it + is - ni;
      }
      pos += __shfl_sync(0xffffffffu, cs, 31);
      it += __shfl_sync(0xffffffffu, is, 31);
    }
    if (lane == 0) {
      offsets[E] = pos;
      if (n_shared_rows) offsets[E + 1] = pos + n_shared_rows;
      first_item[E] = it;
    }
  }
  __syncthreads();
  const unsigned below = (1u << lane) - 1u;
  for (int e = warp; e < E; e += nw) {
    const int start = off[e];
    int p = start;
    for (int i0 = 0; i0 < nk; i0 += 32) {
      const int i = i0 + lane;
      const bool mine = i < nk && sid[i] == e;
      const unsigned m = __ballot_sync(0xffffffffu, mine);
      if (mine) {
        const int q = p + __popc(m & below);
        order[q] = i;
        inv[i] = q;
      }
      p += __popc(m);
    }
    for (int ch = lane * kChunk; ch < p - start; ch += 32 * kChunk) {
      const int ni = first_item[e] + ch / kChunk;
      if (ni < max_items) {
        items[2 * ni] = e;
        items[2 * ni + 1] = ch;
      }
    }
  }
  const int shared_first = first_item[E];
  for (int r = threadIdx.x; r < n_shared_rows; r += blockDim.x) order[nk + r] = nk + r;
  for (int ch = threadIdx.x * kChunk; ch < n_shared_rows; ch += blockDim.x * kChunk) {
    const int ni = shared_first + ch / kChunk;
    if (ni < max_items) {
      items[2 * ni] = E;
      items[2 * ni + 1] = ch;
    }
  }
  if (threadIdx.x == 0) items[2 * max_items] = min(shared_first + (n_shared_rows + kChunk - 1) / kChunk, max_items);
}

// out[r] = Σ_j weights[r, j]·y[inv[r·k + j]] in top-k order (+ the fused shared expert's row), plus
// the residual row. With norm_w, also normed[r] = RMSNorm(out[r])·norm_w — the next block's input
// norm, one launch less per layer — with the backend's factor (rms_rstd, the same 256-thread column
// stride) and w·(x·rs), so its bits are the backend's. The row is kept in registers (NPT values per
// thread: H ≤ 256·NPT). Only y comes from the kernel before (the experts' down projection): inv
// (the grouping), the weights (the router) and the residual are older, complete by now (pdl.cuh),
// so they are read before the wait.
template <int NPT>
__global__ void combine_kernel(const float* y, const int32_t* inv, const float* wts, int k, int nk, bool shared,
                               int H, const float* residual, float* out, const void* norm_w, DType norm_t, float eps,
                               float* normed) {
  const int r = blockIdx.x;
  __shared__ const float* rows[32];
  __shared__ float w[32];
  if (threadIdx.x < k) {  // k ≤ 32 (checked on the host)
    rows[threadIdx.x] = y + int64_t(inv[r * k + threadIdx.x]) * H;
    w[threadIdx.x] = wts[r * k + threadIdx.x];
  }
  float res[NPT];
#pragma unroll
  for (int i = 0; i < NPT; ++i) {
    const int col = threadIdx.x + i * blockDim.x;
    res[i] = residual && col < H ? residual[int64_t(r) * H + col] : 0.0f;
  }
  __syncthreads();
  pdl_wait();
  pdl_trigger();
  // Picks outer, columns inner: a pick's NPT loads are independent (and the unrolled picks' too),
  // where a loop over the picks per column waited for every load in turn (k·NPT round trips to L2,
  // ~6 µs for one row). Each column still sums in top-k order.
  float acc[NPT] = {}, sh[NPT];
#pragma unroll
  for (int i = 0; i < NPT; ++i) {
    const int col = threadIdx.x + i * blockDim.x;
    sh[i] = shared && col < H ? y[int64_t(nk + r) * H + col] : 0.0f;
  }
#pragma unroll 4
  for (int j = 0; j < k; ++j) {
    const float* row = rows[j];
    const float wj = w[j];
#pragma unroll
    for (int i = 0; i < NPT; ++i) {
      const int col = threadIdx.x + i * blockDim.x;
      if (col < H) acc[i] = fmaf(wj, row[col], acc[i]);
    }
  }
  float v[NPT];
#pragma unroll
  for (int i = 0; i < NPT; ++i) {
    const int col = threadIdx.x + i * blockDim.x;
    v[i] = 0.0f;
    if (col >= H) continue;
    if (shared) acc[i] += sh[i];
    v[i] = residual ? res[i] + acc[i] : acc[i];
    out[int64_t(r) * H + col] = v[i];
  }
  if (!norm_w) return;  // grid-uniform
  const float rs = rms_rstd(v, H, eps);
#pragma unroll
  for (int i = 0; i < NPT; ++i) {
    const int col = threadIdx.x + i * blockDim.x;
    if (col < H) normed[int64_t(r) * H + col] = load_f(norm_w, norm_t, col) * (v[i] * rs);
  }
}

}  // namespace

namespace {
// Weights the expert kernels take: F32 or BF16 (all three of one dtype), no bias, 16-byte aligned
// rows of whole vectors; or FP8 with block scales (fp8_rows).
bool vec_mlp(const MlpParams& m) {
  for (const LinearParam* l : {&m.gate_proj, &m.up_proj, &m.down_proj})
    if (l->w.dtype() != m.gate_proj.w.dtype() || l->w.device() != Device::CUDA || present(l->bias) ||
        !(vector_rows(l->w) || fp8_rows(*l)))
      return false;
  return true;
}

// rows: the most picks of a work item (min(N, kChunk): an expert takes a token once). At one, the
// kernel built for one row (its code a fraction of the kChunk-row kernel's).
template <class WT, bool kGateUp, int U, int R, int kRows> void launch_expert_k(dim3 grid, int rows, const ExpertArgs& a) {
  static const bool once = (allow_smem(expert_kernel<WT, kGateUp, U, R, kRows>, tile_smem<WT, U>()), true);
  (void)once;
  launch_pdl(expert_kernel<WT, kGateUp, U, R, kRows>, grid, dim3(32 * kExpertWarps),
             size_t(rows) * tile_smem<WT, U>() / kChunk, a);
}
template <class WT, bool kGateUp, int U, int R> void launch_expert_u(dim3 grid, int rows, const ExpertArgs& a) {
  rows == 1 ? launch_expert_k<WT, kGateUp, U, R, 1>(grid, rows, a) : launch_expert_k<WT, kGateUp, U, R, kChunk>(grid, rows, a);
}
template <class WT, bool kGateUp, int R> void launch_expert(int U, dim3 grid, int rows, const ExpertArgs& a) {
  switch (U) {
    case 1: launch_expert_u<WT, kGateUp, 1, R>(grid, rows, a); break;
    case 2: launch_expert_u<WT, kGateUp, 2, R>(grid, rows, a); break;
    case 4: launch_expert_u<WT, kGateUp, 4, R>(grid, rows, a); break;
    default: launch_expert_u<WT, kGateUp, 8, R>(grid, rows, a); break;
  }
}
// expert_rows_kernel when its k-blocks fit (gate/up: one per warp and step, down: two): one CTA per
// SM (a CTA's 16 warps take its registers), each a part of all items' steps. DSV3_DECODE_MMA_ROWS_KERNEL=0
// keeps expert_mma_kernel (for comparison).
template <bool kF8> bool launch_expert_rows(bool gate_up, const ExpertArgs& a) {
  static const bool on = cuda::on_unless_env_zero("DSV3_DECODE_MMA_ROWS_KERNEL");
  const int nkb = (a.K + kMmaKb - 1) / kMmaKb, bpw = gate_up ? 1 : 2;
  int ks = 1;
  while (ks * bpw < nkb) ks *= 2;
  if (!on || ks > kExpRowWarps) return false;
  const int64_t step_rows = 16 * (kExpRowWarps / ks), steps = (a.rows_out + step_rows - 1) / step_rows;
  DSV3_CHECK(steps * a.max_items <= INT32_MAX, "cuda_moe_forward: ", a.max_items, " work items × ", steps,
             " steps exceed the expert kernel's step index");
  const dim3 grid(unsigned(std::min<int64_t>(sm_count(), steps * a.max_items)));
  const size_t smem = size_t(2) * (gate_up ? 2 : 1) * kExpRowWarps * kMmaStash<1> * sizeof(float);
  if (gate_up)
    launch_pdl(expert_rows_kernel<true, 1, kF8>, grid, dim3(32 * kExpRowWarps), smem, a, ks);
  else
    launch_pdl(expert_rows_kernel<false, 2, kF8>, grid, dim3(32 * kExpRowWarps), smem, a, ks);
  return true;
}

// The F32-FMA expert kernels (F32 or BF16 weights). gate/up: one row of each per warp (two weight
// streams); down: two rows per warp when they pair up. Grid: weight-row blocks × the most work
// items a step can have.
template <class WT> void launch_experts_fma(bool gate_up, int64_t N, const ExpertArgs& a) {
  const int R = gate_up || a.rows_out % 2 != 0 ? 1 : 2;
  const int U = vectors_per_lane(a.K / kVecCols<WT>);
  const dim3 grid(unsigned((a.rows_out + kExpertWarps * R - 1) / (kExpertWarps * R)), unsigned(a.max_items));
  const int rows = int(std::min<int64_t>(N, kChunk));
  if (gate_up)
    launch_expert<WT, true, 1>(U, grid, rows, a);
  else if (R == 2)
    launch_expert<WT, false, 2>(U, grid, rows, a);
  else
    launch_expert<WT, false, 1>(U, grid, rows, a);
}
// WT: float, __nv_bfloat16, or __nv_fp8_e4m3 (the tensor-core kernels at every N).
template <class WT> void launch_experts(bool gate_up, int64_t N, const ExpertArgs& a) {
  constexpr bool f8 = std::is_same_v<WT, __nv_fp8_e4m3>, mma = f8 || std::is_same_v<WT, __nv_bfloat16>;
  if (mma && (f8 || mma_wanted(N))) {
    if (launch_expert_rows<f8>(gate_up, a)) return;
    const int ks = mma_ksplit(a.K, true), rows_per_cta = 16 * (kMmaWarps / ks);
    const dim3 grid(unsigned((a.rows_out + rows_per_cta - 1) / rows_per_cta), unsigned(a.max_items));
    const size_t smem = size_t(gate_up ? 2 : 1) * kMmaWarps * kMmaStash<1> * sizeof(float);
    if (gate_up)
      launch_pdl(expert_mma_kernel<true, f8>, grid, dim3(32 * kMmaWarps), smem, a, ks);
    else
      launch_pdl(expert_mma_kernel<false, f8>, grid, dim3(32 * kMmaWarps), smem, a, ks);
    return;
  }
  if constexpr (!f8) launch_experts_fma<WT>(gate_up, N, a);
}
}  // namespace

bool cuda_moe_supported(const MoeParams& p) {
  // The combine kernel holds a row of up to 256·32 values in registers.
  if (p.experts.empty() || p.experts.size() > 1024 || p.experts[0].gate_proj.w.dim(1) > 256 * 32) return false;
  for (const MlpParams& m : p.experts)
    if (!vec_mlp(m) || m.gate_proj.w.dtype() != p.experts[0].gate_proj.w.dtype()) return false;
  return true;
}

CudaMoeTables cuda_moe_tables(const MoeParams& p) {
  DSV3_CHECK(cuda_moe_supported(p), "cuda_moe_tables: unsupported experts");
  CudaMoeTables t;
  t.E = int64_t(p.experts.size());
  t.I = p.experts[0].gate_proj.w.dim(0);
  t.H = p.experts[0].gate_proj.w.dim(1);
  // The shared experts join as one more group when they have the routed experts' shape.
  const MlpParams& sh = p.shared_experts;
  t.wt = p.experts[0].gate_proj.w.dtype();
  t.shared = p.has_shared && vec_mlp(sh) && sh.gate_proj.w.dtype() == t.wt && sh.gate_proj.w.dim(0) == t.I &&
             sh.gate_proj.w.dim(1) == t.H;
  const int64_t cols = t.E + (t.shared ? 1 : 0);
  const bool f8 = t.wt == DType::F8_E4M3;
  Tensor h = Tensor::empty(DType::I64, {f8 ? 6 : 3, cols});
  int64_t* d = h.data<int64_t>();
  auto addr = [](const Tensor& x) { return int64_t(reinterpret_cast<uintptr_t>(x.raw())); };
  for (int64_t e = 0; e < cols; ++e) {
    const MlpParams& m = e < t.E ? p.experts[size_t(e)] : sh;
    DSV3_CHECK(m.gate_proj.w.dim(0) == t.I && m.up_proj.w.dim(0) == t.I && m.down_proj.w.dim(0) == t.H &&
                   m.down_proj.w.dim(1) == t.I,
               "cuda_moe_tables: expert ", e, " shapes differ");
    const LinearParam* l[3] = {&m.gate_proj, &m.up_proj, &m.down_proj};
    for (int j = 0; j < 3; ++j) {
      d[j * cols + e] = addr(l[j]->w);
      if (f8) d[(3 + j) * cols + e] = addr(l[j]->scale_inv);
    }
  }
  t.ptrs = cuda_backend().to_device(h);
  return t;
}

Tensor cuda_moe_forward(Backend& be, const ModelDims& d, const MoeParams& p, const CudaMoeTables& t,
                        const Tensor& x, const Tensor* residual, bool small_gemv, CudaNextNorm* next_norm,
                        const Tensor* router_logits, const Tensor& into) {
  const int64_t N = x.dim(0), E = t.E, k = d.top_k, H = t.H, I = t.I;
  DSV3_CHECK(x.device() == Device::CUDA && x.dim(1) == H && E == d.n_experts && k <= 32, "cuda_moe_forward: x ",
             x.shape().str());
  DSV3_CHECK(!router_logits || router_logits->numel() == N * E, "cuda_moe_forward: router logits ",
             router_logits ? router_logits->shape().str() : "");
  for (const Tensor* o : std::initializer_list<const Tensor*>{&into, next_norm ? &next_norm->out : nullptr})
    DSV3_CHECK(!o || !o->defined() ||
                   (o->device() == Device::CUDA && o->dtype() == DType::F32 && o->numel() == N * H),
               "cuda_moe_forward: an output given must be [", N, ", ", H, "] F32 on the GPU, got ",
               o ? o->shape().str() : "");
  Tensor logits = router_logits ? *router_logits : be.alloc(DType::F32, {N, E});
  if (!router_logits) {
    if (small_gemv && cuda_small_linear_ok(p.gate, x)) {
      cuda_small_linear(p.gate, x, logits, false);
    } else {
      cuda_graph_mark_unsafe("the router's gate through the backend's linear");
      linear_forward(be, p.gate, x, logits);
    }
  }
  Tensor ids = be.alloc(DType::I32, {N, k}), wts = be.alloc(DType::F32, {N, k});
  Tensor scores = be.alloc(DType::F32, {N, E});
  moe_route(be, d, p, logits, scores, ids, wts);

  const int64_t nk = N * k, groups = E + (t.shared ? 1 : 0), picks = nk + (t.shared ? N : 0);
  DSV3_CHECK(cuda_moe_fits(t, N, k), "cuda_moe_forward: ", N, " rows × top-", k, " picks exceed the grouping kernel");
  // Work items: Σ over groups with picks of ceil(c / kChunk) ≤ picks / kChunk + (groups with picks).
  const int64_t max_items = picks / kChunk + std::min(groups, nk + (t.shared ? 1 : 0));
  Tensor grp = be.alloc(DType::I32, {picks + nk + groups + 1 + 2 * max_items + 1});
  int32_t* order = ptr<int32_t>(grp);
  int32_t* inv = order + picks;
  int32_t* offsets = inv + nk;
  int32_t* items = offsets + groups + 1;
  launch_pdl(group_kernel, dim3(1), dim3(unsigned(32 * std::min<int64_t>(E, 32))), size_t(2 * E + 1 + nk) * sizeof(int32_t),
             ids.data<int32_t>(), int(nk), int(E), t.shared ? int(N) : 0, order, inv, offsets, items, int(max_items));
  check_launch("moe grouping");
  const int64_t* w = t.ptrs.data<int64_t>();
  Tensor act = be.alloc(DType::F32, {picks, I});
  const bool f8 = t.wt == DType::F8_E4M3;
  auto launch = [&](bool gate_up, const ExpertArgs& a) {
    if (f8)
      launch_experts<__nv_fp8_e4m3>(gate_up, N, a);
    else if (t.wt == DType::BF16)
      launch_experts<__nv_bfloat16>(gate_up, N, a);
    else
      launch_experts<float>(gate_up, N, a);
  };
  ExpertArgs ea{x.data<float>(), order, offsets, items, int(max_items), w, w + groups, int(k), int(nk), int(H),
                int(I), ptr<float>(act)};
  if (f8) {
    ea.s0 = w + 3 * groups;
    ea.s1 = w + 4 * groups;
    ea.lds = int((H + 127) / 128);
  }
  launch(true, ea);
  check_launch("experts gate/up");
  Tensor y = be.alloc(DType::F32, {picks, H});
  ExpertArgs ed{act.data<float>(), order, offsets, items, int(max_items), w + 2 * groups, nullptr, int(k), int(nk),
                int(I), int(H), ptr<float>(y)};
  if (f8) {
    ed.s0 = w + 5 * groups;
    ed.lds = int((I + 127) / 128);
  }
  launch(false, ed);
  check_launch("experts down");
  Tensor out = into.defined() ? into : be.alloc(DType::F32, {N, H});
  const bool late_shared = p.has_shared && !t.shared;
  const bool fold = residual && !late_shared;
  const bool norm_here = next_norm && fold;
  if (next_norm && !next_norm->out.defined()) next_norm->out = be.alloc(DType::F32, {N, H});
  DSV3_CHECK(H <= 256 * 32, "cuda_moe_forward: hidden size ", H, " above the combine kernel's 8192 (cuda_moe_supported)");
  auto combine = [&](auto kernel) {
    launch_pdl(kernel, dim3(unsigned(N)), dim3(256), 0, y.data<float>(), static_cast<const int32_t*>(inv),
               wts.data<float>(), int(k), int(nk), t.shared, int(H), fold ? residual->data<float>() : nullptr,
               ptr<float>(out), norm_here ? next_norm->weight.raw() : nullptr,
               norm_here ? next_norm->weight.dtype() : DType::F32, norm_here ? next_norm->eps : 0.0f,
               norm_here ? ptr<float>(next_norm->out) : nullptr);
  };
  if (H <= 256 * 4)
    combine(combine_kernel<4>);
  else if (H <= 256 * 8)
    combine(combine_kernel<8>);
  else
    combine(combine_kernel<32>);
  check_launch("moe combine");
  if (late_shared) {
    cuda_graph_mark_unsafe("shared experts through the backend's linears");
    MlpActs m;
    m.out = out;
    mlp_forward(be, p.shared_experts, x, m, true);  // out += shared experts
  }
  if (residual && !fold) {
    AddArgs a;
    a.a = *residual;
    a.b = out;
    a.out = out;
    be.add(a);
  }
  if (next_norm && !norm_here) {
    RmsNormArgs r;
    r.x = out;
    r.weight = next_norm->weight;
    r.eps = next_norm->eps;
    r.y = next_norm->out;
    be.rmsnorm(r);
  }
  return out;
}

}  // namespace dsv3
