// File: comm/process_group.h
//
// The one process-group interface of denoised. A ProcessGroup is a fixed set
// of `size()` ranks (one process each) that run collectives together.
// Implementations: Gloo over TCP (host memory; CPU ranks, CI and the control
// plane of every group) and NCCL (device memory, issued on a CUDA stream).
//
// Rules shared by all implementations:
// - Buffers are caller-owned and preallocated; a call never allocates.
//   `memory()` says where they must live.
// - Every call is bounded by the group's timeout. A dead or stuck peer gives
//   an error (DEADLINE_EXCEEDED / UNAVAILABLE / ABORTED), never a hang.
// - After an error, or after Abort(), the group is unusable: every later call
//   fails with ABORTED. Form a new group to continue.
// - Calls are not thread-safe: one thread drives a group.
#ifndef DN_COMM_PROCESS_GROUP_H_
#define DN_COMM_PROCESS_GROUP_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/store.h"

namespace dn::comm {

enum class MemoryKind { kHost, kDevice };
enum class ReduceOp { kSum, kMax };
enum class ReduceType { kF32, kF64, kI64 };

class ProcessGroup {
 public:
  virtual ~ProcessGroup() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual MemoryKind memory() const = 0;
  virtual std::string backend_name() const = 0;  // "gloo" | "nccl"

  // All-to-all with equal contiguous per-peer blocks: `send` holds size()
  // blocks of `bytes_per_peer` bytes, block p going to rank p; `recv` gets
  // size() blocks, block p coming from rank p. send and recv must not overlap.
  virtual absl::Status AllToAll(const void* send, void* recv,
                                size_t bytes_per_peer) = 0;
  // recv gets size() blocks of `bytes_per_rank`, block p from rank p.
  virtual absl::Status AllGather(const void* send, void* recv,
                                 size_t bytes_per_rank) = 0;
  virtual absl::Status Broadcast(void* buf, size_t bytes, int root) = 0;
  // In-place all-reduce of `count` elements; meant for small control words
  // and timings.
  virtual absl::Status AllReduce(void* buf, size_t count, ReduceType type,
                                 ReduceOp op) = 0;
  virtual absl::Status Barrier() = 0;
  // For collectives this group did not issue itself: a replayed CUDA graph
  // that captured them (issued on the group's stream during the capture,
  // where nothing is watched). Runs `launch` (which enqueues that work on the
  // group's stream) and then watches the stream up to that point like a
  // collective: not complete within the timeout -> the group aborts, so a
  // dead peer gives an error, never a hang. Fails with ABORTED without
  // running `launch` when the group is already unusable. Default (Gloo, host
  // collectives, nothing enqueued): just runs `launch`.
  virtual absl::Status LaunchWatched(const std::function<absl::Status()>& launch) {
    return launch();
  }
  // Makes every pending and later call fail promptly. Safe to call from
  // another thread (e.g. a watchdog).
  virtual void Abort() = 0;
};

struct GlooOptions {
  int rank = 0;
  int size = 1;
  // Interface address this rank listens on for its peers.
  std::string hostname = "127.0.0.1";
  // Bounds rendezvous and every collective.
  std::chrono::milliseconds timeout{30000};
  // Prefix for this group's keys in the store (group + generation).
  std::string prefix = "pg";
};

// Forms a Gloo group over TCP through `store`. Blocks until all ranks have
// joined or the timeout passes.
absl::StatusOr<std::unique_ptr<ProcessGroup>> MakeGlooProcessGroup(
    Store& store, const GlooOptions& options);

}  // namespace dn::comm

#endif  // DN_COMM_PROCESS_GROUP_H_
