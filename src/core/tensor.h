// Tensor: a dtype, a shape of up to 5 dims, and a view into contiguous storage on one device.
// Storage is either owned (allocated here) or borrowed (e.g. from a memory-mapped file, kept alive
// by a shared owner). Views over a range of the leading dimension share the storage.
#pragma once
#include <array>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>

#include "core/dtype.h"
#include "core/error.h"

namespace dsv3 {

enum class Device : uint8_t { CPU, CUDA };
const char* device_name(Device d);

constexpr int kMaxDims = 5;

struct Shape {
  int n = 0;
  std::array<int64_t, kMaxDims> d{};

  Shape() = default;
  Shape(std::initializer_list<int64_t> dims);
  static Shape of(const int64_t* dims, int n);
  int64_t operator[](int i) const { return d[size_t(i < 0 ? i + n : i)]; }
  int64_t numel() const;
  bool operator==(const Shape& o) const;
  std::string str() const;  // "[2, 3, 4]"
};

// Device allocators are plugged in by backends so core does not depend on CUDA.
struct Allocator {
  std::function<void*(size_t)> alloc;
  std::function<void(void*)> free;
};
void set_allocator(Device d, Allocator a);
Allocator get_allocator(Device d);  // the one registered (empty if none), e.g. to restore it later

class Tensor {
 public:
  Tensor() = default;
  static Tensor empty(DType t, const Shape& s, Device dev = Device::CPU);
  static Tensor zeros(DType t, const Shape& s, Device dev = Device::CPU);
  // Wrap memory someone else owns; `owner` keeps it alive as long as any view exists.
  static Tensor borrow(void* data, DType t, const Shape& s, std::shared_ptr<void> owner,
                       Device dev = Device::CPU);

  bool defined() const { return buf_ != nullptr || shape_.numel() == 0; }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int ndim() const { return shape_.n; }
  int64_t dim(int i) const { return shape_[i]; }
  int64_t numel() const { return shape_.numel(); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype_); }
  Device device() const { return device_; }
  bool owns_memory() const { return owned_; }

  void* raw() { return ptr_; }
  const void* raw() const { return ptr_; }
  template <class T> T* data() {
    check_type(dtype_of<T>());
    return static_cast<T*>(ptr_);
  }
  template <class T> const T* data() const {
    check_type(dtype_of<T>());
    return static_cast<const T*>(ptr_);
  }

  // Rows [begin, end) of the leading dimension, sharing storage.
  Tensor rows(int64_t begin, int64_t end) const;
  // Same elements, another shape (numel must match).
  Tensor reshape(const Shape& s) const;
  // A fresh CPU copy converted to `t` (CPU tensors only).
  Tensor to(DType t) const;
  Tensor clone() const;
  // Fill every element with v converted to the dtype (CPU only).
  void fill(float v);

 private:
  void check_type(DType want) const;
  std::shared_ptr<void> buf_;
  void* ptr_ = nullptr;
  DType dtype_ = DType::F32;
  Shape shape_;
  Device device_ = Device::CPU;
  bool owned_ = false;
};

}  // namespace dsv3
