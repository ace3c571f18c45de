// File: comm/nccl_process_group.h
//
// The device-memory ProcessGroup over NCCL (built only when CMake's
// DENOISED_WITH_CUDA is ON; denoised_comm then defines DENOISED_WITH_CUDA).
// This header itself needs no CUDA headers: the stream is passed as void*.
//
// - Rank 0 makes the ncclUniqueId and publishes it in the store under
//   "<prefix>/nccl_unique_id"; the others read it (bounded by the timeout).
// - One persistent communicator per group, blocking by default
//   (ncclConfig_t::blocking = 1): measured on H200 x2, a non-blocking
//   communicator (whose calls answer ncclInProgress and finish enqueueing in
//   the background) added 60-90 us to every all-to-all, 5x PyTorch's latency
//   at 64 KiB; blocking mode beats PyTorch at every size. A blocking init
//   and teardown cannot time out on the host, so fail-stop timers bound them
//   (below). DN_NCCL_BLOCKING=0 selects the non-blocking mode.
// - Collectives are issued on the caller's stream (NcclOptions::stream) into
//   caller-owned device buffers: no allocation and no host synchronisation
//   inside AllToAll/AllGather/Broadcast/AllReduce. Barrier() is the one call
//   that waits for the stream (it is a barrier for the host).
// - A watchdog thread checks, every few milliseconds, the CUDA event recorded
//   after the last collective and ncclCommGetAsyncError. If that event has not
//   completed `timeout` after the collective was issued, or NCCL reports an
//   asynchronous error (e.g. a peer died), it aborts the communicator
//   (ncclCommAbort): kernels that wait on a dead peer exit, so a
//   cudaStreamSynchronize blocked elsewhere returns, and every later call
//   fails with ABORTED naming the cause. Abort() does the same at once.
// - Fail-stop: an NCCL kernel inside a replayed CUDA graph may not observe
//   ncclCommAbort (seen on H200/NCCL 2.28.9: the survivor of a killed peer
//   stayed blocked in cudaStreamSynchronize, or in the abort itself). So
//   when the watchdog aborts, it also arms a timer: unless the owner shows
//   it is not stuck within `stuck_exit_after` (any later call on the group,
//   which fails with ABORTED, or destroying the group), the process exits
//   with kStuckCollectiveExitCode after logging why, so its supervisor (the
//   worker launcher, `denoised run`) can restart the group. PyTorch's NCCL
//   watchdog tears the process down in the same situation.
// - Creating the group makes `device` the calling thread's current device.
#ifndef DN_COMM_NCCL_PROCESS_GROUP_H_
#define DN_COMM_NCCL_PROCESS_GROUP_H_

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "comm/process_group.h"
#include "comm/store.h"

namespace dn::comm {

struct NcclOptions {
  int rank = 0;
  int size = 1;
  int device = 0;          // CUDA device of this rank
  void* stream = nullptr;  // cudaStream_t the collectives are issued on
                           // (nullptr: the legacy default stream)
  // Bounds init, each call's enqueueing, and each collective's completion
  // on the GPU (measured from when it was issued).
  std::chrono::milliseconds timeout{30000};
  std::string prefix = "nccl";  // store keys (group + generation)
  // Fail-stop bound after a watchdog abort (see above); 0 disables it.
  std::chrono::milliseconds stuck_exit_after{5000};
  // Blocking communicator (see above); DN_NCCL_BLOCKING=0|1 overrides it.
  // The watchdog aborts stuck collectives in either mode.
  bool blocking = true;
};

// Exit status of a process ended by the fail-stop timer.
inline constexpr int kStuckCollectiveExitCode = 70;

absl::StatusOr<std::unique_ptr<ProcessGroup>> MakeNcclProcessGroup(
    Store& store, const NcclOptions& options);

}  // namespace dn::comm

#endif  // DN_COMM_NCCL_PROCESS_GROUP_H_
