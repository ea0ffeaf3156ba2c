// Index range checks on the GPU are queued, not synchronised: an op with an index outside its range
// runs without touching memory it does not own (its kernel skips the index), and the next read-back
// (to_host or synchronize) raises the error that names the op, the value and its position, as the
// CPU raises it at the call. After the error nothing stays queued. compute-sanitizer memcheck over
// this suite (bench/gpu.sh's default filter) checks the "skips" part.
#include <gtest/gtest.h>

#include <string>

#include "../backend/harness.h"
#include "backend/cuda/cuda_backend.h"

namespace dsv3::test {
namespace {

Tensor ints(std::initializer_list<int32_t> v) {
  Tensor t = Tensor::empty(DType::I32, {int64_t(v.size())});
  int64_t i = 0;
  for (int32_t x : v) t.data<int32_t>()[i++] = x;
  return t;
}

template <class Error, class F>
void expect_raised_at_sync(F&& op, const std::string& says) {
  CudaBackend& be = cuda_backend();
  op(be);
  try {
    be.synchronize();
    ADD_FAILURE() << "no error raised; expected one saying \"" << says << "\"";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(be.synchronize()) << "a raised check stayed queued";
}

TEST(CudaRangeCheck, EmbeddingIdOutsideVocabulary) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  Tensor table = be.to_device(randn({5, 8}, 1, 1)), out = be.alloc(DType::F32, {3, 8});
  Tensor ids = be.to_device(ints({1, 4, 9}));
  expect_raised_at_sync<InputError>([&](Backend& b) { b.embedding({ids, table, out}); },
                                    "token id 9 at position 2 is outside the vocabulary [0, 5)");
  const Tensor h = be.to_host(out);
  for (int64_t j = 0; j < 8; ++j) EXPECT_EQ(h.data<float>()[2 * 8 + j], 0.0f) << "the bad id's row reads as zeros";
  Tensor dt = be.alloc(DType::F32, {5, 8}), dout = be.to_device(randn({3, 8}, 1, 2));
  be.fill({dt, 0.0f});
  expect_raised_at_sync<InputError>([&](Backend& b) { b.embedding_backward({ids, dout, dt}); },
                                    "embedding_backward: token id 9 at position 2");
}

TEST(CudaRangeCheck, RopePositionOutsideTable) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  Tensor x = be.to_device(randn({2, 1, 4}, 2, 1)), cs = be.to_device(randn({3, 2}, 2, 2));
  Tensor sn = be.to_device(randn({3, 2}, 2, 3)), pos = be.to_device(ints({0, -1}));
  expect_raised_at_sync<InputError>([&](Backend& b) { b.rope({x, pos, cs, sn, 0, 4, true, false}); },
                                    "rope: position -1 of token 1 is outside the table [0, 3)");
}

TEST(CudaRangeCheck, CrossEntropyTargetOutsideVocabulary) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  Tensor l = be.to_device(randn({3, 6}, 3, 1)), loss = be.alloc(DType::F32, {3}), dl = be.alloc(DType::F32, {3, 6});
  Tensor tg = be.to_device(ints({0, 6, -1}));
  expect_raised_at_sync<InputError>(
      [&](Backend& b) { b.cross_entropy({l, tg, loss, Tensor(), dl, 1.0f}); },
      "cross_entropy: target 6 at position 1 is outside [-1, 6)");
}

TEST(CudaRangeCheck, MoeIndicesOutsideRowsAreInternalErrors) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  Tensor src = be.to_device(randn({4, 16}, 4, 1)), out = be.alloc(DType::F32, {3, 16});
  Tensor idx = be.to_device(ints({3, 7, 0}));
  expect_raised_at_sync<InternalError>([&](Backend& b) { b.gather_rows({src, idx, Tensor(), out, false}); },
                                       "gather_rows: idx[1] = 7 outside [0, 4)");
  // A source with no rows: every index is outside, and none may be read (not even row 0).
  Tensor none = be.alloc(DType::F32, {0, 16});
  expect_raised_at_sync<InternalError>([&](Backend& b) { b.gather_rows({none, idx, Tensor(), out, false}); },
                                       "outside [0, 0)");
  const Tensor zeros = be.to_host(out);
  for (int64_t i = 0; i < zeros.numel(); ++i) ASSERT_EQ(zeros.data<float>()[i], 0.0f) << "element " << i;
  Tensor rows = be.alloc(DType::F32, {4, 16}), x3 = be.to_device(randn({3, 16}, 4, 2));
  be.fill({rows, 0.0f});
  expect_raised_at_sync<InternalError>([&](Backend& b) { b.scatter_add_rows({x3, idx, Tensor(), rows}); },
                                       "scatter_add_rows: idx[1] = 7 outside [0, 4)");
  Tensor dsrc = be.alloc(DType::F32, {3, 16});
  expect_raised_at_sync<InternalError>(
      [&](Backend& b) { b.scatter_add_rows_backward({rows, x3, idx, Tensor(), dsrc, Tensor(), false}); },
      "scatter_add_rows_backward: idx[1] = 7 outside [0, 4)");
  Tensor ids = be.to_device(ints({0, 1, 2, 5})).reshape({2, 2});
  Tensor pick = be.alloc(DType::I32, {4}), token = be.alloc(DType::I32, {4}), counts = be.alloc(DType::I32, {4});
  expect_raised_at_sync<InternalError>([&](Backend& b) { b.moe_sort({ids, 4, pick, token, counts}); },
                                       "moe_sort: expert id 5 at 3 outside [0, 4)");
}

TEST(CudaRangeCheck, ToHostRaisesTheFirstFailedCheck) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  Tensor table = be.to_device(randn({5, 8}, 5, 1)), out = be.alloc(DType::F32, {2, 8});
  be.embedding({be.to_device(ints({7, 0})), table, out});  // fails first
  be.embedding({be.to_device(ints({0, 8})), table, out});  // fails second
  try {
    (void)be.to_host(out);
    ADD_FAILURE() << "to_host raised nothing";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("token id 7 at position 0"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW((void)be.to_host(out));
}

// FP8 quantization reads its non-finite count back: a queued error of an earlier op surfaces there.
TEST(CudaRangeCheck, Fp8QuantizeReadBackRaisesAQueuedError) {
  ASSERT_GT(cuda_device_count(), 0);
  CudaBackend& be = cuda_backend();
  Tensor table = be.to_device(randn({5, 8}, 6, 1)), out = be.alloc(DType::F32, {1, 8});
  be.embedding({be.to_device(ints({6})), table, out});
  QuantizeFp8Args q;
  q.x = be.to_device(randn({2, 128}, 6, 2));
  q.tiling = Fp8Tiling::Row1x128;
  q.q = be.alloc(DType::F8_E4M3, {2, 128});
  q.scale = be.alloc(DType::F32, {2, 1});
  q.name = "x";
  try {
    (void)cuda_quantize_fp8(q);
    ADD_FAILURE() << "cuda_quantize_fp8 raised nothing";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("token id 6 at position 0"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW((void)cuda_quantize_fp8(q));
}

}  // namespace
}  // namespace dsv3::test
