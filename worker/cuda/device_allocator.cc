#include "worker/cuda/device_allocator.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/log.h"

namespace dn::worker::cuda {

namespace {
constexpr size_t kMinBlock = 512;
constexpr size_t kSmallLimit = size_t{1} << 20;  // 1 MiB
}  // namespace

size_t DeviceAllocator::SizeClass(size_t bytes) {
  if (bytes <= kMinBlock) return kMinBlock;
  if (bytes <= kSmallLimit) return (bytes + kMinBlock - 1) / kMinBlock * kMinBlock;
  // 8 classes per power of two: step = 2^(floor(log2(bytes)) - 3).
  size_t top = size_t{1} << (63 - __builtin_clzll(bytes));
  const size_t step = top / 8;
  return (bytes + step - 1) / step * step;
}

std::shared_ptr<DeviceAllocator> DeviceAllocator::Create(int device) {
  return std::shared_ptr<DeviceAllocator>(new DeviceAllocator(device));
}

DeviceAllocator::~DeviceAllocator() {
  // Every in-use block holds a reference to this allocator, so only cached
  // blocks are left here.
  int previous = -1;
  (void)cudaGetDevice(&previous);
  if (previous != device_) (void)cudaSetDevice(device_);
  for (auto& [size_class, blocks] : free_)
    for (void* p : blocks) (void)cudaFree(p);
  if (previous >= 0 && previous != device_) (void)cudaSetDevice(previous);
}

absl::StatusOr<std::shared_ptr<void>> DeviceAllocator::Allocate(size_t bytes) {
  const size_t size_class = SizeClass(bytes);
  void* ptr = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(size_class);
    if (it != free_.end() && !it->second.empty()) {
      ptr = it->second.back();
      it->second.pop_back();
    } else {
      cudaError_t err = cudaMalloc(&ptr, size_class);
      if (err == cudaErrorMemoryAllocation && !retaining_) {
        (void)cudaGetLastError();  // an OOM is not sticky; clear it
        DN_LOG(WARNING) << "cuda: cudaMalloc(" << size_class
                        << ") failed; releasing " << (reserved_ - in_use_)
                        << " cached bytes and retrying";
        absl::Status released = ReleaseCachedLocked();
        if (!released.ok()) return released;
        err = cudaMalloc(&ptr, size_class);
      }
      if (err != cudaSuccess) {
        (void)cudaGetLastError();
        const std::string what = absl::StrCat(
            "cuda: cannot allocate ", bytes, " bytes (size class ", size_class,
            ") on device ", device_, ": ", cudaGetErrorString(err), "; ",
            in_use_, " bytes in use, ", reserved_ - in_use_, " cached");
        if (err == cudaErrorMemoryAllocation)
          return absl::ResourceExhaustedError(what);
        return absl::InternalError(what);
      }
      reserved_ += static_cast<int64_t>(size_class);
      peak_reserved_ = std::max(peak_reserved_, reserved_);
    }
    in_use_ += static_cast<int64_t>(size_class);
    peak_in_use_ = std::max(peak_in_use_, in_use_);
  }
  std::shared_ptr<DeviceAllocator> self = shared_from_this();
  std::shared_ptr<void> block(ptr, [self, size_class](void* p) {
    self->Release(p, size_class);
  });
  std::lock_guard<std::mutex> lock(mu_);
  if (retaining_) retained_.push_back(block);
  return block;
}

void DeviceAllocator::Release(void* ptr, size_t size_class) {
  std::lock_guard<std::mutex> lock(mu_);
  in_use_ -= static_cast<int64_t>(size_class);
  free_[size_class].push_back(ptr);
}

absl::Status DeviceAllocator::ReleaseCached() {
  std::lock_guard<std::mutex> lock(mu_);
  if (retaining_)
    return absl::FailedPreconditionError(
        "cuda: cannot release cached memory while a CUDA graph is being "
        "captured");
  return ReleaseCachedLocked();
}

absl::Status DeviceAllocator::ReleaseCachedLocked() {
  // cudaFree synchronizes the device, so pending work that used a cached
  // block finishes first.
  for (auto& [size_class, blocks] : free_) {
    while (!blocks.empty()) {
      DN_CUDA_RETURN_IF_ERROR(cudaFree(blocks.back()));
      blocks.pop_back();
      reserved_ -= static_cast<int64_t>(size_class);
    }
  }
  return absl::OkStatus();
}

void DeviceAllocator::BeginRetain() {
  std::vector<std::shared_ptr<void>> stale;  // dies after the lock is released
  std::lock_guard<std::mutex> lock(mu_);
  retaining_ = true;
  stale.swap(retained_);
}

std::vector<std::shared_ptr<void>> DeviceAllocator::EndRetain() {
  std::lock_guard<std::mutex> lock(mu_);
  retaining_ = false;
  return std::exchange(retained_, {});
}

int64_t DeviceAllocator::in_use_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return in_use_;
}
int64_t DeviceAllocator::peak_in_use_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return peak_in_use_;
}
int64_t DeviceAllocator::reserved_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return reserved_;
}
int64_t DeviceAllocator::peak_reserved_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return peak_reserved_;
}

}  // namespace dn::worker::cuda
