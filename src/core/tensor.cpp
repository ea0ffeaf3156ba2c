#include "core/tensor.h"

#include <cstdlib>
#include <cstring>
#include <mutex>

namespace dsv3 {

const char* device_name(Device d) { return d == Device::CPU ? "cpu" : "cuda"; }

Shape::Shape(std::initializer_list<int64_t> dims) {
  DSV3_CHECK(dims.size() <= size_t(kMaxDims), "shape has ", dims.size(), " dims, max ", kMaxDims);
  for (int64_t v : dims) d[size_t(n++)] = v;
}

Shape Shape::of(const int64_t* dims, int n) {
  DSV3_CHECK(n >= 0 && n <= kMaxDims, "shape has ", n, " dims, max ", kMaxDims);
  Shape s;
  s.n = n;
  for (int i = 0; i < n; ++i) s.d[size_t(i)] = dims[i];
  return s;
}

int64_t Shape::numel() const {
  int64_t p = 1;
  for (int i = 0; i < n; ++i) p *= d[size_t(i)];
  return p;
}

bool Shape::operator==(const Shape& o) const {
  if (n != o.n) return false;
  for (int i = 0; i < n; ++i)
    if (d[size_t(i)] != o.d[size_t(i)]) return false;
  return true;
}

std::string Shape::str() const {
  std::string s = "[";
  for (int i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(d[size_t(i)]);
  return s + "]";
}

namespace {
// Function-local statics: a backend may register its allocator from another translation unit's
// static initializer, which can run before this file's globals would be constructed.
struct AllocatorTable {
  std::mutex mu;
  Allocator by_device[2];
};
AllocatorTable& allocators() {
  static AllocatorTable t;
  return t;
}

Allocator cpu_allocator() {
  return {[](size_t n) {
            void* p = std::aligned_alloc(64, (n + 63) / 64 * 64);
            if (!p) internal_error("out of memory allocating ", n, " bytes");
            return p;
          },
          [](void* p) { std::free(p); }};
}
}  // namespace

void set_allocator(Device d, Allocator a) {
  AllocatorTable& t = allocators();
  std::lock_guard<std::mutex> l(t.mu);
  t.by_device[int(d)] = std::move(a);
}

Allocator get_allocator(Device d) {
  AllocatorTable& t = allocators();
  std::lock_guard<std::mutex> l(t.mu);
  return t.by_device[int(d)];
}

Tensor Tensor::empty(DType t, const Shape& s, Device dev) {
  for (int i = 0; i < s.n; ++i)
    DSV3_CHECK(s.d[size_t(i)] >= 0, "negative dimension in ", s.str());
  Allocator a;
  {
    AllocatorTable& t = allocators();
    std::lock_guard<std::mutex> l(t.mu);
    a = t.by_device[int(dev)];
  }
  if (dev == Device::CPU && !a.alloc) a = cpu_allocator();
  if (!a.alloc) internal_error("no allocator registered for device ", device_name(dev));
  Tensor x;
  x.dtype_ = t;
  x.shape_ = s;
  x.device_ = dev;
  x.owned_ = true;
  size_t bytes = x.nbytes();
  void* p = a.alloc(bytes ? bytes : 1);
  x.buf_ = std::shared_ptr<void>(p, a.free);
  x.ptr_ = p;
  return x;
}

Tensor Tensor::zeros(DType t, const Shape& s, Device dev) {
  Tensor x = empty(t, s, dev);
  if (dev == Device::CPU) std::memset(x.ptr_, 0, x.nbytes());
  else internal_error("Tensor::zeros on ", device_name(dev), ": use the backend's fill");
  return x;
}

Tensor Tensor::borrow(void* data, DType t, const Shape& s, std::shared_ptr<void> owner, Device dev) {
  Tensor x;
  x.dtype_ = t;
  x.shape_ = s;
  x.device_ = dev;
  x.buf_ = std::move(owner);
  x.ptr_ = data;
  return x;
}

void Tensor::check_type(DType want) const {
  if (want != dtype_) internal_error("tensor is ", dtype_name(dtype_), ", accessed as ", dtype_name(want));
}

Tensor Tensor::rows(int64_t begin, int64_t end) const {
  DSV3_CHECK(shape_.n >= 1, "rows() of a scalar");
  DSV3_CHECK(0 <= begin && begin <= end && end <= shape_.d[0], "rows [", begin, ", ", end, ") of ",
             shape_.str());
  Tensor v = *this;
  size_t row_bytes = nbytes() / size_t(shape_.d[0] ? shape_.d[0] : 1);
  v.ptr_ = static_cast<char*>(ptr_) + size_t(begin) * row_bytes;
  v.shape_.d[0] = end - begin;
  return v;
}

Tensor Tensor::reshape(const Shape& s) const {
  DSV3_CHECK(s.numel() == numel(), "reshape ", shape_.str(), " to ", s.str());
  Tensor v = *this;
  v.shape_ = s;
  return v;
}

Tensor Tensor::to(DType t) const {
  DSV3_CHECK(device_ == Device::CPU, "Tensor::to on ", device_name(device_));
  Tensor y = empty(t, shape_);
  convert(ptr_, dtype_, y.ptr_, t, size_t(numel()));
  return y;
}

Tensor Tensor::clone() const { return to(dtype_); }

void Tensor::fill(float v) {
  DSV3_CHECK(device_ == Device::CPU, "Tensor::fill on ", device_name(device_));
  size_t n = size_t(numel());
  if (dtype_ == DType::F32) {
    float* p = static_cast<float*>(ptr_);
    for (size_t i = 0; i < n; ++i) p[i] = v;
    return;
  }
  Tensor one = empty(dtype_, {1});
  convert(&v, DType::F32, one.ptr_, dtype_, 1);
  size_t es = dtype_size(dtype_);
  for (size_t i = 0; i < n; ++i) std::memcpy(static_cast<char*>(ptr_) + i * es, one.ptr_, es);
}

}  // namespace dsv3
