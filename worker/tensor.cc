#include "worker/tensor.h"

#include <cstdlib>
#include <cstring>
#include <sstream>

#include "base/log.h"

namespace dn::worker {

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kF32: return 4;
    case DType::kBF16: return 2;
    case DType::kF16: return 2;
  }
  return 0;
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "f32";
    case DType::kBF16: return "bf16";
    case DType::kF16: return "f16";
  }
  return "?";
}

int64_t NumElements(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeString(const Shape& shape) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

float BF16ToF32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t F32ToBF16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0)
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);  // quiet NaN
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float F16ToF32(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t F32ToF16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const int32_t exp = static_cast<int32_t>((bits >> 23) & 0xffu);
  uint32_t mant = bits & 0x7fffffu;
  if (exp == 0xff)  // inf / nan
    return static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0u));
  int32_t e = exp - 127 + 15;
  if (e >= 0x1f) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow
  if (e <= 0) {  // subnormal or zero
    if (e < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    const int shift = 14 - e;
    uint32_t half = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = sign | (static_cast<uint32_t>(e) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) ++half;
  return static_cast<uint16_t>(half);
}

Tensor::Tensor(std::shared_ptr<void> storage, size_t offset_bytes,
               Device device, DType dtype, Shape shape)
    : storage_(std::move(storage)),
      offset_(offset_bytes),
      device_(device),
      dtype_(dtype),
      shape_(std::move(shape)) {}

Tensor Tensor::Host(Shape shape, DType dtype) {
  const size_t bytes =
      static_cast<size_t>(NumElements(shape)) * DTypeSize(dtype);
  // 64-byte aligned, zero-filled.
  const size_t rounded = ((bytes + 63) / 64) * 64;
  void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
  if (p == nullptr) DN_LOG(FATAL) << "host allocation of " << bytes << " bytes failed";
  std::memset(p, 0, rounded == 0 ? 64 : rounded);
  return Tensor(std::shared_ptr<void>(p, std::free), 0, Device::kCpu, dtype,
                std::move(shape));
}

Tensor Tensor::View(Shape shape) const {
  if (NumElements(shape) != numel())
    DN_LOG(FATAL) << "View " << ShapeString(shape) << " of " << DebugString();
  return Tensor(storage_, offset_, device_, dtype_, std::move(shape));
}

Tensor Tensor::Rows(int64_t begin, int64_t end) const {
  if (shape_.empty() || begin < 0 || end < begin || end > shape_[0])
    DN_LOG(FATAL) << "Rows(" << begin << ", " << end << ") of " << DebugString();
  Shape s = shape_;
  s[0] = end - begin;
  const size_t row_bytes =
      static_cast<size_t>(NumElements(shape_) / (shape_[0] ? shape_[0] : 1)) *
      DTypeSize(dtype_);
  return Tensor(storage_, offset_ + static_cast<size_t>(begin) * row_bytes,
                device_, dtype_, std::move(s));
}

std::string Tensor::DebugString() const {
  std::ostringstream out;
  out << DTypeName(dtype_) << ShapeString(shape_) << '@'
      << (device_ == Device::kCpu ? "cpu" : "cuda");
  return out.str();
}

}  // namespace dn::worker
