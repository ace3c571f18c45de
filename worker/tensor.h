// File: worker/tensor.h
//
// The engine's tensor: a dense, row-major block of one dtype in one device's
// memory, with shared ownership of its storage. Views (View, Rows) share the
// storage. Host tensors are made here; device tensors are made by a Backend.
#ifndef DN_WORKER_TENSOR_H_
#define DN_WORKER_TENSOR_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dn::worker {

enum class DType : uint8_t { kF32, kBF16, kF16 };
enum class Device : uint8_t { kCpu, kCuda };

using Shape = std::vector<int64_t>;

size_t DTypeSize(DType dtype);
const char* DTypeName(DType dtype);  // "f32", "bf16", "f16"
int64_t NumElements(const Shape& shape);
std::string ShapeString(const Shape& shape);  // "[2, 3]"

// bf16/f16 <-> f32, round to nearest even.
float BF16ToF32(uint16_t v);
uint16_t F32ToBF16(float v);
float F16ToF32(uint16_t v);
uint16_t F32ToF16(float v);

class Tensor {
 public:
  Tensor() = default;
  // `storage` must own at least offset_bytes + nbytes() bytes.
  Tensor(std::shared_ptr<void> storage, size_t offset_bytes, Device device,
         DType dtype, Shape shape);

  // A zero-filled host tensor.
  static Tensor Host(Shape shape, DType dtype = DType::kF32);

  bool defined() const { return storage_ != nullptr; }
  Device device() const { return device_; }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const { return shape_.at(static_cast<size_t>(i)); }
  int64_t numel() const { return NumElements(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype_); }

  void* data() { return static_cast<char*>(storage_.get()) + offset_; }
  const void* data() const {
    return static_cast<const char*>(storage_.get()) + offset_;
  }
  template <typename T>
  T* data_as() { return static_cast<T*>(data()); }
  template <typename T>
  const T* data_as() const { return static_cast<const T*>(data()); }

  // Same storage, another shape with the same number of elements.
  Tensor View(Shape shape) const;
  // Rows [begin, end) along dim 0, sharing storage.
  Tensor Rows(int64_t begin, int64_t end) const;

  std::string DebugString() const;  // e.g. "f32[2, 3]@cpu"

 private:
  std::shared_ptr<void> storage_;
  size_t offset_ = 0;
  Device device_ = Device::kCpu;
  DType dtype_ = DType::kF32;
  Shape shape_;
};

}  // namespace dn::worker

#endif  // DN_WORKER_TENSOR_H_
