#include "core/tensor.h"

#include <gtest/gtest.h>

using namespace dsv3;

TEST(Tensor, ShapeAndViews) {
  Tensor t = Tensor::zeros(DType::F32, {4, 3});
  EXPECT_EQ(t.numel(), 12);
  EXPECT_EQ(t.nbytes(), 48u);
  float* p = t.data<float>();
  for (int i = 0; i < 12; ++i) p[i] = float(i);
  Tensor v = t.rows(1, 3);
  EXPECT_EQ(v.shape(), Shape({2, 3}));
  EXPECT_EQ(v.data<float>()[0], 3.f);
  v.data<float>()[0] = 42.f;  // a view shares storage
  EXPECT_EQ(p[3], 42.f);
  Tensor r = t.reshape({2, 6});
  EXPECT_EQ(r.data<float>()[3], 42.f);
  EXPECT_THROW(t.rows(2, 5), InternalError);
  EXPECT_THROW(t.reshape({5}), InternalError);
  EXPECT_THROW(t.data<bf16>(), InternalError);
  EXPECT_EQ(Shape({2, 3, 4}).str(), "[2, 3, 4]");
}

TEST(Tensor, BorrowKeepsOwnerAlive) {
  auto owner = std::make_shared<std::vector<float>>(6, 2.f);
  std::weak_ptr<std::vector<float>> w = owner;
  Tensor t = Tensor::borrow(owner->data(), DType::F32, {2, 3}, owner);
  owner.reset();
  EXPECT_FALSE(w.expired());
  EXPECT_FALSE(t.owns_memory());
  EXPECT_EQ(t.rows(1, 2).data<float>()[2], 2.f);
  t = Tensor();
  EXPECT_TRUE(w.expired());
}

TEST(Tensor, ConvertAndFill) {
  Tensor t = Tensor::empty(DType::BF16, {5});
  t.fill(1.5f);
  Tensor f = t.to(DType::F32);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(f.data<float>()[i], 1.5f);
}
