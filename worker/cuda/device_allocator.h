// File: worker/cuda/device_allocator.h
//
// DeviceAllocator: the CUDA backend's caching allocator. Blocks come from
// cudaMalloc, rounded up to a size class (multiples of 512 B up to 1 MiB,
// then 8 classes per power of two, so at most 12.5% is wasted), and go back
// to a per-class free list when the last Tensor that shares them dies; the
// next request of the same class reuses them without touching the driver. So
// the warm-up step allocates, and every later step only recycles.
//
// Stream safety: the backend has one stream and every op and collective runs
// on it, so a block freed on the host and handed out again is only written by
// work ordered after everything that used it before. Memory is returned to
// the driver only by ReleaseCached() (never called during capture) and by the
// destructor.
//
// CUDA graphs: between BeginRetain() and EndRetain() (a Capture), every block
// handed out is also recorded; EndRetain() returns those references and the
// Graph keeps them, so a temporary freed inside the captured body can never
// be handed to someone else while the graph may still write it on replay.
//
// Each block's deleter holds a shared_ptr to the allocator, so the allocator
// outlives every tensor, whatever the destruction order.
#ifndef DN_WORKER_CUDA_DEVICE_ALLOCATOR_H_
#define DN_WORKER_CUDA_DEVICE_ALLOCATOR_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace dn::worker::cuda {

class DeviceAllocator : public std::enable_shared_from_this<DeviceAllocator> {
 public:
  // `device` must be current on the calling thread whenever Allocate runs.
  static std::shared_ptr<DeviceAllocator> Create(int device);
  ~DeviceAllocator();

  DeviceAllocator(const DeviceAllocator&) = delete;
  DeviceAllocator& operator=(const DeviceAllocator&) = delete;

  // A block of at least `bytes` bytes (256-byte aligned), freed back to the
  // cache when the last copy of the shared_ptr dies. RESOURCE_EXHAUSTED when
  // the device is out of memory even after the cache was released.
  absl::StatusOr<std::shared_ptr<void>> Allocate(size_t bytes);

  // Returns every cached (free) block to the driver. Synchronizes the device.
  absl::Status ReleaseCached();

  void BeginRetain();
  std::vector<std::shared_ptr<void>> EndRetain();

  int64_t in_use_bytes() const;
  int64_t peak_in_use_bytes() const;
  int64_t reserved_bytes() const;       // cudaMalloc'd, in use or cached
  int64_t peak_reserved_bytes() const;

  // The size class `bytes` is rounded up to (exposed for tests/docs).
  static size_t SizeClass(size_t bytes);

 private:
  explicit DeviceAllocator(int device) : device_(device) {}
  void Release(void* ptr, size_t size_class);
  absl::Status ReleaseCachedLocked();

  const int device_;
  mutable std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;  // size class -> blocks
  int64_t in_use_ = 0;
  int64_t peak_in_use_ = 0;
  int64_t reserved_ = 0;
  int64_t peak_reserved_ = 0;
  bool retaining_ = false;
  std::vector<std::shared_ptr<void>> retained_;
};

}  // namespace dn::worker::cuda

#endif  // DN_WORKER_CUDA_DEVICE_ALLOCATOR_H_
