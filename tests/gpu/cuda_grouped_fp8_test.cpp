// The grouped FP8 matmul (grouped_fp8_gemm.cu) on operands in the preparation's cuBLASLt layouts
// against the CPU's exact emulation (fp8_gemm: each 128-code block's sum in FP32, scaled and added):
// within kBf16, as cuBLASLt's FP8 GEMM is held (the tensor cores' in-block sums are not FP32-exact;
// a wrong scale index, tile or operand order gives errors of order 1). Items: partial row and
// column tiles, one row, an empty item, per-block and per-column weight scales in one launch,
// accumulate on and off, K from one block to 16, more items than one launch holds, every form
// of the kernel (tiles of 64 and 128 rows, out by registers or bulk copies; warp-specialised), scale
// grids with longer leading dimensions; nothing written outside each item's M rows (guard bytes;
// the padding rows cuBLASLt would compute are not written); NaN scales reach exactly the outputs
// they multiply.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "../backend/harness.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/linear_lowp.h"
#include "backend/fp8.h"
#include "backend/tolerance.h"

namespace dsv3::test {
namespace {

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// [R, C] → [C, ld] (ld ≥ R; the extra columns hold `pad`): the CPU's per-row scale grid in VEC128's
// layout.
Tensor transposed(const Tensor& s, int64_t ld, float pad) {
  const int64_t R = s.dim(0), C = s.dim(1);
  Tensor t = Tensor::empty(DType::F32, {C, ld});
  for (int64_t c = 0; c < C; ++c)
    for (int64_t r = 0; r < ld; ++r) t.data<float>()[c * ld + r] = r < R ? s.data<float>()[r * C + c] : pad;
  return t;
}

struct ItemCase {
  int64_t M, K;
  bool b_block, accumulate;
  int nan = 0;  // 1: a's scale of row 3, k-block 0; 2: b's scale of column block 1 (or column 5), k-block 0
  int64_t extra_ld = 0;  // added to the scale grids' leading dimensions (a's, and b's per-column one)
};

struct Item {
  ItemCase c;
  Tensor qa, sa, qb, sb;  // host, CPU layouts
  Tensor c0;              // host: c's starting values
  Tensor dev_qa, dev_sa, dev_qb, dev_sb, dev_c;
};

Item make_item(CudaBackend& be, Guards& g, const ItemCase& c, int64_t N, uint64_t seed) {
  Item it{c, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  const int64_t kb = c.K / 128, ld4 = round_up(kb, 4);
  const Tensor x = randn({std::max<int64_t>(c.M, 1), c.K}, seed, 1, 2.0f), w = randn({N, c.K}, seed, 2, 0.05f);
  it.qa = Tensor::empty(DType::F8_E4M3, x.shape());
  it.sa = Tensor::empty(DType::F32, {x.dim(0), kb});
  quantize_fp8({x, Fp8Tiling::Row1x128, false, false, it.qa, it.sa});
  it.qb = Tensor::empty(DType::F8_E4M3, {N, c.K});
  it.sb = Tensor::empty(DType::F32, c.b_block ? Shape{(N + 127) / 128, kb} : Shape{N, kb});
  quantize_fp8({w, c.b_block ? Fp8Tiling::Block128x128 : Fp8Tiling::Row1x128, false, false, it.qb, it.sb});
  if (c.nan == 1) it.sa.data<float>()[3 * kb] = NAN;
  if (c.nan == 2) it.sb.data<float>()[(c.b_block ? 1 : 5) * kb] = NAN;
  it.c0 = randn({std::max<int64_t>(c.M, 1), N}, seed, 3);
  // Device layouts: a's scales [kb, M rounded up to 4] (the padding rows' scale 1, as the
  // preparation writes it), b's per-block grid with its rows ld4 apart, per-column [kb, N].
  it.dev_qa = be.to_device(it.qa);
  it.dev_sa = be.to_device(transposed(it.sa, round_up(it.sa.dim(0), 4) + c.extra_ld, 1.0f));
  it.dev_qb = be.to_device(it.qb);
  if (c.b_block) {
    Tensor s = Tensor::empty(DType::F32, {it.sb.dim(0), ld4});
    for (int64_t r = 0; r < s.dim(0); ++r)
      for (int64_t j = 0; j < ld4; ++j) s.data<float>()[r * ld4 + j] = j < kb ? it.sb.data<float>()[r * kb + j] : 7.0f;
    it.dev_sb = be.to_device(s);
  } else {
    it.dev_sb = be.to_device(transposed(it.sb, N + c.extra_ld, 1.0f));
  }
  it.dev_c = c.accumulate ? g.init(it.c0) : g.out(DType::F32, it.c0.shape());
  return it;
}

cuda::Fp8GroupItem table_item(Item& it) {
  return {it.dev_qa.raw(),
          it.dev_sa.data<float>(),
          it.dev_sa.dim(1),
          it.dev_qb.raw(),
          it.dev_sb.data<float>(),
          it.dev_sb.dim(1),
          it.dev_c.data<float>(),
          it.c.M,
          it.c.K,
          it.c.b_block,
          it.c.accumulate};
}

// The CPU's emulation (plus c0 when accumulating).
Tensor reference(const Item& it, int64_t N) {
  Tensor c = Tensor::empty(DType::F32, {it.qa.dim(0), N});
  fp8_gemm({it.qa, it.sa, it.qb, it.sb, c});
  if (it.c.accumulate)
    for (int64_t i = 0; i < c.numel(); ++i) c.data<float>()[i] += it.c0.data<float>()[i];
  return c;
}

// One form of the grouped kernel: tile height, the warp-specialised kernel (128-row tiles) or the
// block kernels with their tiles out by bulk copies.
struct Form {
  int rows = 128;
  bool ws = false, bulk = false;
  std::string name() const {
    return ws ? std::string("warp-specialised kernel") : cat("tiles of ", rows, " rows", bulk ? ", bulk out" : "");
  }
};
const std::vector<Form> kForms = {{64}, {128}, {128, true}, {64, false, true}, {128, false, true}};

// The grouped kernel on, in the given form, for the object's life; the process's settings back
// afterwards.
struct KernelChoice {
  bool on = cuda::grouped_fp8(), ws = cuda::grouped_fp8_ws(), bulk = cuda::grouped_fp8_bulk();
  int rows = cuda::grouped_fp8_rows();
  explicit KernelChoice(const Form& f) {
    cuda::set_grouped_fp8(true);
    cuda::set_grouped_fp8_rows(f.rows);
    cuda::set_grouped_fp8_ws(f.ws);
    cuda::set_grouped_fp8_bulk(f.bulk);
  }
  ~KernelChoice() {
    cuda::set_grouped_fp8(on);
    cuda::set_grouped_fp8_rows(rows);
    cuda::set_grouped_fp8_ws(ws);
    cuda::set_grouped_fp8_bulk(bulk);
  }
};

void run_items(const std::vector<ItemCase>& cases, int64_t N, int64_t launches, const Form& form) {
  SCOPED_TRACE(form.name());
  CudaBackend& be = cuda_backend();
  Guards g(be);
  std::vector<Item> items;
  std::vector<cuda::Fp8GroupItem> table;
  for (size_t i = 0; i < cases.size(); ++i) items.push_back(make_item(be, g, cases[i], N, 300 + i));
  for (Item& it : items) table.push_back(table_item(it));
  {
    const KernelChoice choice(form);
    const int64_t l0 = cuda::grouped_fp8_launches();
    ASSERT_TRUE(cuda::grouped_fp8_gemm(table, N));
    EXPECT_EQ(cuda::grouped_fp8_launches() - l0, launches);
  }
  EXPECT_EQ(g.damaged(), "");
  for (size_t i = 0; i < items.size(); ++i) {
    const Item& it = items[i];
    const ItemCase& c = it.c;
    SCOPED_TRACE(cat("item ", i, " M ", c.M, " K ", c.K, " N ", N, c.b_block ? " block" : " column",
                     " scales, accumulate ", c.accumulate, " nan ", c.nan));
    const Tensor got = be.to_host(it.dev_c);
    if (c.M == 0) {  // untouched
      const Tensor want = c.accumulate ? it.c0 : Tensor();
      for (int64_t j = 0; j < got.numel(); ++j) {
        const float v = got.data<float>()[j];
        if (c.accumulate) {
          EXPECT_EQ(v, want.data<float>()[j]);
        } else {
          EXPECT_TRUE(std::isnan(v));
        }
      }
      continue;
    }
    const Tensor want = reference(it, N);
    int64_t misplaced = 0, nans = 0, non_finite = 0;
    double mref = 0, md = 0;
    for (int64_t j = 0; j < got.numel(); ++j) {
      const float gv = got.data<float>()[j], wv = want.data<float>()[j];
      misplaced += std::isnan(gv) != std::isnan(wv);
      nans += std::isnan(wv);
      if (std::isnan(wv)) continue;
      non_finite += !std::isfinite(gv);
      mref = std::max(mref, std::fabs(double(wv)));
      md = std::max(md, std::fabs(double(gv) - double(wv)));
    }
    EXPECT_EQ(misplaced, 0) << "NaN outputs in other places than the CPU's";
    if (c.nan == 1) {
      EXPECT_EQ(nans, N);
    }
    if (c.nan == 2) {
      EXPECT_EQ(nans, c.b_block ? c.M * std::min<int64_t>(128, N - 128) : c.M);
    }
    EXPECT_EQ(non_finite, 0);
    EXPECT_LE(md / mref, tol::kBf16);
    ::testing::Test::RecordProperty(cat("norm_err_", form.rows, form.ws ? "ws" : form.bulk ? "bulk" : "", "_", i),
                                     std::to_string(md / mref));
  }
}

TEST(CudaGroupedFp8, EqualsCpuEmulation) {
  ASSERT_GT(cuda_device_count(), 0);
  // N = 400: the last column tile is 16 wide, and the per-block grid's last block partial.
  for (const Form& f : kForms) {
    run_items({{200, 384, true, false},
               {1, 128, true, true},
               {0, 256, true, true},
               {130, 256, false, false},
               {513, 2048, true, true},
               {77, 512, false, true},
               {0, 128, false, false},
               {90, 256, false, true, 0, 12},
               {45, 384, true, false, 0, 20}},
              400, 1, f);
    run_items({{128, 1024, true, false}, {256, 128, false, true}}, 128, 1, f);
  }
}

TEST(CudaGroupedFp8, NanScalesReachTheirOutputs) {
  ASSERT_GT(cuda_device_count(), 0);
  for (const Form& f : kForms)
    run_items({{40, 256, true, false, 1},
               {40, 256, true, true, 2},
               {40, 256, false, false, 2},
               {40, 256, false, true, 1},
               {40, 256, true, false}},
              272, 1, f);
}

// 70 items: two launches (64 items each at most).
TEST(CudaGroupedFp8, MoreItemsThanOneLaunch) {
  ASSERT_GT(cuda_device_count(), 0);
  std::vector<ItemCase> cases;
  for (int i = 0; i < 70; ++i) cases.push_back({(i * 37) % 150 + 1, 128 * (1 + i % 3), i % 2 == 0, i % 3 == 0});
  for (const Form& f : kForms) run_items(cases, 144, 2, f);
}

// The warp-specialised kernel's arithmetic is the 128-row kernel's, in its order, and a bulk add
// rounds each sum as a load, add and store does (subnormal old values: the next test): each form
// gives the bits of its register-epilogue block kernel, on more tiles than the GPU has SMs (so the
// warp-specialised CTAs take several tiles, their loads running across tiles), with K from one
// block to 24 (more k-blocks than stages) and accumulation on and off.
TEST(CudaGroupedFp8, EveryFormGivesTheBlockKernelsBits) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  const std::vector<ItemCase> cases = {{1000, 1024, true, false}, {777, 128, false, true},  {2050, 512, true, true},
                                       {300, 3072, false, false}, {64, 256, true, false}, {1, 768, false, true}};
  const int64_t N = 1040;
  // Each form with the form it is compared with (an index into forms).
  const std::vector<std::pair<Form, size_t>> forms = {
      {{128}, 0}, {{128, true}, 0}, {{128, false, true}, 0}, {{64}, 3}, {{64, false, true}, 3}};
  std::vector<std::vector<Tensor>> got(forms.size());
  for (size_t f = 0; f < forms.size(); ++f) {
    Guards g(be);
    std::vector<Item> items;
    std::vector<cuda::Fp8GroupItem> table;
    for (size_t i = 0; i < cases.size(); ++i) items.push_back(make_item(be, g, cases[i], N, 700 + i));
    for (Item& it : items) table.push_back(table_item(it));
    {
      const KernelChoice choice(forms[f].first);
      ASSERT_TRUE(cuda::grouped_fp8_gemm(table, N));
    }
    EXPECT_EQ(g.damaged(), "");
    for (Item& it : items) got[f].push_back(be.to_host(it.dev_c));
  }
  for (size_t f = 0; f < forms.size(); ++f) {
    const size_t ref = forms[f].second;
    if (ref == f) continue;
    for (size_t i = 0; i < cases.size(); ++i) {
      SCOPED_TRACE(cat(forms[f].first.name(), " against ", forms[ref].first.name(), ", item ", i, " M ", cases[i].M,
                       " K ", cases[i].K));
      int64_t differ = 0;
      for (int64_t j = 0; j < got[ref][i].numel(); ++j)
        differ += std::memcmp(got[ref][i].data<float>() + j, got[f][i].data<float>() + j, sizeof(float)) != 0;
      EXPECT_EQ(differ, 0);
    }
  }
}

// Subnormal old values through the bulk FP32 add: the PTX ISA describes cp.reduce.async.bulk
// .add.f32 as flushing subnormal inputs and results to zero, but an H100 (2026-12-07) kept them, as
// the register epilogue and the CPU do. Row 2 of a's codes is zero, so that row's outputs are c's
// subnormal old values plus +0: the register epilogue must keep them and the bulk one give every
// output's bits alike. Should a GPU flush, this test names the difference the docs must then state.
TEST(CudaGroupedFp8, BulkAddKeepsSubnormalOldValues) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  const int64_t M = 8, K = 256, N = 128;
  std::vector<Tensor> got;
  Tensor c0;
  for (const Form& f : {Form{128}, Form{128, false, true}}) {
    Guards g(be);
    Item it = make_item(be, g, {M, K, true, true}, N, 900);
    std::memset(static_cast<uint8_t*>(it.qa.raw()) + 2 * K, 0, size_t(K));
    it.dev_qa = be.to_device(it.qa);
    for (int64_t j = 0; j < N; ++j)  // 1.6e-41 … 2e-39, alternating signs: all subnormal
      it.c0.data<float>()[2 * N + j] = (j % 2 ? -1e-39f : 1e-39f) * float(j + 1) / 64.0f;
    it.dev_c = g.init(it.c0);
    {
      const KernelChoice choice(f);
      ASSERT_TRUE(cuda::grouped_fp8_gemm(std::vector<cuda::Fp8GroupItem>{table_item(it)}, N));
    }
    EXPECT_EQ(g.damaged(), "");
    got.push_back(be.to_host(it.dev_c));
    c0 = it.c0;
  }
  const float *regs = got[0].data<float>(), *bulk = got[1].data<float>(), *old = c0.data<float>();
  int64_t kept = 0, differ = 0;
  for (int64_t j = 0; j < N; ++j) {
    ASSERT_TRUE(std::fpclassify(old[2 * N + j]) == FP_SUBNORMAL) << j;
    kept += std::memcmp(regs + 2 * N + j, old + 2 * N + j, sizeof(float)) == 0;
  }
  for (int64_t i = 0; i < M * N; ++i) differ += std::memcmp(regs + i, bulk + i, sizeof(float)) != 0;
  EXPECT_EQ(kept, N) << "the register epilogue's subnormal old values";
  EXPECT_EQ(differ, 0) << "bulk adds against registers, every output";
}

TEST(CudaGroupedFp8, RefusesOperandsOffItsRules) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  Guards g(be);
  Item it = make_item(be, g, {64, 256, true, false}, 128, 9);
  const cuda::Fp8GroupItem t = table_item(it);
  const bool before = cuda::grouped_fp8();
  cuda::set_grouped_fp8(true);  // refused for its operands, not because it is off
  const int64_t l0 = cuda::grouped_fp8_launches();
  EXPECT_FALSE(cuda::grouped_fp8_gemm(std::vector<cuda::Fp8GroupItem>{t}, 120));  // N no multiple of 16
  cuda::Fp8GroupItem k = t;
  k.K = 200;
  EXPECT_FALSE(cuda::grouped_fp8_gemm(std::vector<cuda::Fp8GroupItem>{k}, 128));
  cuda::Fp8GroupItem a = t;
  a.a = static_cast<const uint8_t*>(t.a) + 8;
  EXPECT_FALSE(cuda::grouped_fp8_gemm(std::vector<cuda::Fp8GroupItem>{a}, 128));
  cuda::Fp8GroupItem ld = t;
  ld.sa_ld = 62;  // below M
  EXPECT_FALSE(cuda::grouped_fp8_gemm(std::vector<cuda::Fp8GroupItem>{ld}, 128));
  EXPECT_EQ(cuda::grouped_fp8_launches(), l0);
  EXPECT_TRUE(cuda::grouped_fp8_gemm(std::vector<cuda::Fp8GroupItem>{t}, 128));  // the same item, as made
  EXPECT_EQ(cuda::grouped_fp8_launches(), l0 + 1);
  cuda::set_grouped_fp8(before);
}

}  // namespace
}  // namespace dsv3::test
