// NcclProcessGroup: ProcessGroup over NCCL. See comm/nccl_process_group.h.
#include "comm/nccl_process_group.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/log.h"
#include "base/status_macros.h"

namespace dn::comm {
namespace {

using Clock = std::chrono::steady_clock;

struct EventDeleter {
  void operator()(CUevent_st* e) const {
    absl::Status st = DN_CUDA_STATUS(cudaEventDestroy(e));
    if (!st.ok()) DN_LOG(WARNING) << st;
  }
};
using EventPtr = std::unique_ptr<CUevent_st, EventDeleter>;

struct DeviceFree {
  void operator()(void* p) const {
    absl::Status st = DN_CUDA_STATUS(cudaFree(p));
    if (!st.ok()) DN_LOG(WARNING) << st;
  }
};
using DevicePtr = std::unique_ptr<void, DeviceFree>;

// The communicator handle. Released normally by Finalize+Destroy in the
// group's destructor; this deleter is the fallback and aborts.
struct CommAborter {
  void operator()(ncclComm* c) const {
    absl::Status st = DN_NCCL_STATUS(ncclCommAbort(c));
    if (!st.ok()) DN_LOG(WARNING) << st;
  }
};
using CommPtr = std::unique_ptr<ncclComm, CommAborter>;

// Waits (polling ncclCommGetAsyncError) until a non-blocking NCCL call on
// `comm` is no longer in progress, or until `deadline`.
absl::Status WaitNotInProgress(ncclComm_t comm, Clock::time_point deadline,
                               const std::string& what) {
  auto sleep = std::chrono::microseconds(20);
  for (;;) {
    ncclResult_t state = ncclInProgress;
    DN_NCCL_RETURN_IF_ERROR(ncclCommGetAsyncError(comm, &state));
    if (state != ncclInProgress) {
      return ::dn::internal::NcclStatus(state, what.c_str(), __FILE__,
                                        __LINE__);
    }
    if (Clock::now() >= deadline)
      return absl::DeadlineExceededError(
          absl::StrCat(what, " still in progress at the deadline"));
    std::this_thread::sleep_for(sleep);
    sleep = std::min(sleep * 2, std::chrono::microseconds(2000));
  }
}

// A fail-stop timer (see the header): unless disarmed within `after`, it
// logs `why` and ends the process with kStuckCollectiveExitCode. Destroying
// it disarms it. The timer thread shares only a flag, so it may outlive
// the object. `after` <= 0 makes an inert timer.
class FailStopTimer {
 public:
  FailStopTimer(std::chrono::milliseconds after, std::string why)
      : disarmed_(std::make_shared<std::atomic<bool>>(false)) {
    if (after.count() <= 0) return;
    std::thread([disarmed = disarmed_, after, why = std::move(why)] {
      const auto until = Clock::now() + after;
      while (Clock::now() < until) {
        if (disarmed->load()) return;
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      if (disarmed->load()) return;
      DN_LOG(ERROR) << why << "; exiting with status " << kStuckCollectiveExitCode
                    << " so the group can be restarted";
      std::fflush(nullptr);
      std::_Exit(kStuckCollectiveExitCode);
    }).detach();
  }
  ~FailStopTimer() { Disarm(); }
  FailStopTimer(const FailStopTimer&) = delete;
  FailStopTimer& operator=(const FailStopTimer&) = delete;
  void Disarm() { *disarmed_ = true; }

 private:
  std::shared_ptr<std::atomic<bool>> disarmed_;
};

class NcclProcessGroup final : public ProcessGroup {
 public:
  NcclProcessGroup(const NcclOptions& options, CommPtr comm, EventPtr event,
                   DevicePtr scratch)
      : options_(options),
        stream_(static_cast<cudaStream_t>(options.stream)),
        comm_(std::move(comm)),
        event_(std::move(event)),
        scratch_(std::move(scratch)),
        watchdog_([this] { WatchdogLoop(); }) {}

  ~NcclProcessGroup() override {
    {
      std::lock_guard<std::mutex> lock(stop_mu_);
      stop_ = true;
    }
    stop_cv_.notify_all();
    watchdog_.join();
    std::lock_guard<std::mutex> lock(mu_);
    if (reaper_) reaper_->Disarm();
    if (!comm_) return;
    // Flush and release; a peer that never finishes makes this time out,
    // and the deleter then aborts. A blocking communicator cannot time out
    // inside ncclCommFinalize/Destroy, so a fail-stop timer bounds them.
    const FailStopTimer bound(
        options_.blocking && options_.stuck_exit_after.count() > 0
            ? options_.timeout + options_.stuck_exit_after
            : std::chrono::milliseconds(0),
        Where("destroy") + "ncclCommFinalize/Destroy did not return");
    absl::Status st = DN_NCCL_STATUS(ncclCommFinalize(comm_.get()));
    if (st.ok())
      st = WaitNotInProgress(comm_.get(), Clock::now() + options_.timeout,
                             "ncclCommFinalize");
    if (st.ok()) {
      st = DN_NCCL_STATUS(ncclCommDestroy(comm_.get()));
      if (st.ok()) {
        (void)comm_.release();
        return;
      }
    }
    DN_LOG(WARNING) << Where("destroy") << st << "; aborting the communicator";
  }

  int rank() const override { return options_.rank; }
  int size() const override { return options_.size; }
  MemoryKind memory() const override { return MemoryKind::kDevice; }
  std::string backend_name() const override { return "nccl"; }

  absl::Status AllToAll(const void* send, void* recv,
                        size_t bytes_per_peer) override {
    if (bytes_per_peer == 0) return Check("AllToAll");
    return Issue("AllToAll", [&](ncclComm_t c) {
      return ncclAlltoAll(send, recv, bytes_per_peer, ncclUint8, c, stream_);
    });
  }

  absl::Status AllGather(const void* send, void* recv,
                         size_t bytes_per_rank) override {
    if (bytes_per_rank == 0) return Check("AllGather");
    return Issue("AllGather", [&](ncclComm_t c) {
      return ncclAllGather(send, recv, bytes_per_rank, ncclUint8, c, stream_);
    });
  }

  absl::Status Broadcast(void* buf, size_t bytes, int root) override {
    if (root < 0 || root >= size())
      return absl::InvalidArgumentError(absl::StrCat(
          "nccl Broadcast: root ", root, " outside [0, ", size(), ")"));
    if (bytes == 0) return Check("Broadcast");
    return Issue("Broadcast", [&](ncclComm_t c) {
      return ncclBroadcast(buf, buf, bytes, ncclUint8, root, c, stream_);
    });
  }

  absl::Status AllReduce(void* buf, size_t count, ReduceType type,
                         ReduceOp op) override {
    if (count == 0) return Check("AllReduce");
    const ncclDataType_t dt = type == ReduceType::kF32   ? ncclFloat32
                              : type == ReduceType::kF64 ? ncclFloat64
                                                         : ncclInt64;
    const ncclRedOp_t rop = op == ReduceOp::kSum ? ncclSum : ncclMax;
    return Issue("AllReduce", [&](ncclComm_t c) {
      return ncclAllReduce(buf, buf, count, dt, rop, c, stream_);
    });
  }

  // A one-word all-reduce on the stream, then a bounded wait for it: when
  // this returns OK every rank has reached its Barrier() and the stream's
  // earlier work is done.
  absl::Status Barrier() override {
    DN_RETURN_IF_ERROR(Issue("Barrier", [&](ncclComm_t c) {
      return ncclAllReduce(scratch_.get(), scratch_.get(), 1, ncclInt64,
                           ncclSum, c, stream_);
    }));
    const auto deadline = Clock::now() + options_.timeout;
    auto sleep = std::chrono::microseconds(20);
    for (;;) {
      cudaError_t q;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!comm_) return BrokenLocked("Barrier");
        q = cudaEventQuery(event_.get());
      }
      // "Not ready" is no error; keep it out of this thread's last-error
      // state, which callers check after their kernel launches.
      if (q == cudaErrorNotReady && cudaPeekAtLastError() == cudaErrorNotReady)
        (void)cudaGetLastError();
      if (q == cudaSuccess) return absl::OkStatus();
      if (q != cudaErrorNotReady) {
        std::lock_guard<std::mutex> lock(mu_);
        return AbortLocked(::dn::internal::CudaStatus(
            q, "cudaEventQuery(barrier)", __FILE__, __LINE__));
      }
      if (Clock::now() >= deadline) {
        std::lock_guard<std::mutex> lock(mu_);
        if (!comm_) return BrokenLocked("Barrier");
        return AbortLocked(absl::DeadlineExceededError(absl::StrCat(
            Where("Barrier"), "not complete within ",
            options_.timeout.count(), " ms")));
      }
      std::this_thread::sleep_for(sleep);
      sleep = std::min(sleep * 2, std::chrono::microseconds(1000));
    }
  }

  // The lock is held across `launch`, so the communicator cannot be
  // aborted (and freed) between the check and the launch of work that uses it.
  absl::Status LaunchWatched(
      const std::function<absl::Status()>& launch) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!comm_) return BrokenLocked("LaunchWatched");
    DN_RETURN_IF_ERROR(launch());
    return WatchLocked();
  }

  void Abort() override {
    std::lock_guard<std::mutex> lock(mu_);
    if (comm_) (void)AbortLocked(absl::AbortedError("Abort() was called"));
  }

 private:
  std::string Where(const char* op) const {
    return absl::StrCat("nccl ", op, " (group '", options_.prefix, "' rank ",
                        options_.rank, "/", options_.size, "): ");
  }

  // mu_ held. Aborts the communicator, keeps the first error, returns it.
  absl::Status AbortLocked(absl::Status why) {
    if (first_error_.ok()) first_error_ = why;
    if (comm_) comm_.reset();  // the deleter calls ncclCommAbort
    pending_ = false;
    return why;
  }

  absl::Status BrokenLocked(const char* op) const {
    if (reaper_) reaper_->Disarm();  // the owner is not stuck: it is calling us
    return absl::AbortedError(
        absl::StrCat(Where(op), "group is unusable after an earlier failure: ",
                     first_error_.message()));
  }

  absl::Status Check(const char* op) {
    std::lock_guard<std::mutex> lock(mu_);
    return comm_ ? absl::OkStatus() : BrokenLocked(op);
  }

  // Issues one NCCL call on the stream, waits only for its enqueueing (a
  // non-blocking communicator may answer ncclInProgress), and records the
  // completion event that the watchdog watches.
  template <typename Fn>
  absl::Status Issue(const char* op, Fn&& call) {
    std::unique_lock<std::mutex> lock(mu_);
    if (!comm_) return BrokenLocked(op);
    ncclResult_t r = call(comm_.get());
    const auto deadline = Clock::now() + options_.timeout;
    auto sleep = std::chrono::microseconds(10);
    while (r == ncclInProgress) {
      // (Only with DN_NCCL_BLOCKING=0.) Let Abort() and the watchdog in while
      // NCCL finishes enqueueing.
      lock.unlock();
      std::this_thread::sleep_for(sleep);
      sleep = std::min(sleep * 2, std::chrono::microseconds(1000));
      lock.lock();
      if (!comm_) return BrokenLocked(op);
      absl::Status st = DN_NCCL_STATUS(ncclCommGetAsyncError(comm_.get(), &r));
      if (!st.ok()) return AbortLocked(st);
      if (r == ncclInProgress && Clock::now() >= deadline)
        return AbortLocked(absl::DeadlineExceededError(
            absl::StrCat(Where(op), "NCCL did not finish enqueueing within ",
                         options_.timeout.count(), " ms")));
    }
    absl::Status st = ::dn::internal::NcclStatus(r, op, __FILE__, __LINE__);
    if (!st.ok())
      return AbortLocked(absl::Status(st.code(), absl::StrCat(Where(op), st.message())));
    return WatchLocked();
  }

  // mu_ held. Records the watchdog's event after the work enqueued so far and
  // arms the timeout. Not while the stream is being captured into a CUDA
  // graph: an event recorded there is a graph node, not something the
  // watchdog can query; the graph's replays are watched (LaunchWatched).
  absl::Status WatchLocked() {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    absl::Status st = DN_CUDA_STATUS(cudaStreamIsCapturing(stream_, &capture));
    if (!st.ok()) return AbortLocked(st);
    if (capture != cudaStreamCaptureStatusNone) return absl::OkStatus();
    st = DN_CUDA_STATUS(cudaEventRecord(event_.get(), stream_));
    if (!st.ok()) return AbortLocked(st);
    issued_at_ = Clock::now();
    pending_ = true;
    return absl::OkStatus();
  }

  void WatchdogLoop() {
    // Events belong to the device; make it current on this thread too.
    absl::Status dev = DN_CUDA_STATUS(cudaSetDevice(options_.device));
    if (!dev.ok()) DN_LOG(WARNING) << Where("watchdog") << dev;
    const auto tick = std::chrono::milliseconds(
        std::clamp<int64_t>(options_.timeout.count() / 20, 1, 50));
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(stop_mu_);
        if (stop_cv_.wait_for(lock, tick, [this] { return stop_; })) return;
      }
      std::lock_guard<std::mutex> lock(mu_);
      if (!comm_) continue;
      ncclResult_t async = ncclSuccess;
      absl::Status st = DN_NCCL_STATUS(ncclCommGetAsyncError(comm_.get(), &async));
      if (st.ok())
        st = ::dn::internal::NcclStatus(async, "ncclCommGetAsyncError",
                                        __FILE__, __LINE__);
      if (!st.ok()) {
        DN_LOG(ERROR) << Where("watchdog") << "NCCL reports " << st
                      << "; aborting the communicator";
        ArmFailStop();
        (void)AbortLocked(absl::Status(
            st.code(), absl::StrCat(Where("watchdog"), st.message())));
        continue;
      }
      if (!pending_) continue;
      const cudaError_t q = cudaEventQuery(event_.get());
      if (q == cudaSuccess) {
        pending_ = false;
      } else if (q != cudaErrorNotReady) {
        ArmFailStop();
        (void)AbortLocked(::dn::internal::CudaStatus(q, "cudaEventQuery", __FILE__,
                                               __LINE__));
      } else if (Clock::now() - issued_at_ > options_.timeout) {
        DN_LOG(ERROR) << Where("watchdog") << "collective not complete "
                      << options_.timeout.count()
                      << " ms after it was issued; aborting the communicator";
        ArmFailStop();
        (void)AbortLocked(absl::DeadlineExceededError(absl::StrCat(
            Where("watchdog"), "collective not complete within ",
            options_.timeout.count(), " ms (a peer is dead or stuck)")));
      }
    }
  }

  // mu_ held (watchdog). Arms the fail-stop timer once, before an abort.
  void ArmFailStop() {
    if (reaper_) return;
    reaper_ = std::make_unique<FailStopTimer>(
        options_.stuck_exit_after,
        absl::StrCat(Where("watchdog"), "the process is still blocked ",
                     options_.stuck_exit_after.count(),
                     " ms after the communicator was aborted (a collective that does "
                     "not observe ncclCommAbort, e.g. inside a CUDA graph)"));
  }

  const NcclOptions options_;
  const cudaStream_t stream_;

  std::mutex mu_;  // guards everything below up to the watchdog
  CommPtr comm_;   // null once aborted
  EventPtr event_;
  DevicePtr scratch_;  // one int64 for Barrier()
  bool pending_ = false;
  Clock::time_point issued_at_;
  absl::Status first_error_;
  // Armed by the first watchdog abort; disarmed by any later call (the owner
  // is not stuck) or by destruction.
  std::unique_ptr<FailStopTimer> reaper_;

  std::mutex stop_mu_;
  std::condition_variable stop_cv_;
  bool stop_ = false;
  std::thread watchdog_;  // last: starts after everything above exists
};

}  // namespace

absl::StatusOr<std::unique_ptr<ProcessGroup>> MakeNcclProcessGroup(
    Store& store, const NcclOptions& options) {
  if (options.size < 1)
    return absl::InvalidArgumentError(
        absl::StrCat("nccl group: size must be >= 1, got ", options.size));
  if (options.rank < 0 || options.rank >= options.size)
    return absl::InvalidArgumentError(absl::StrCat(
        "nccl group: rank ", options.rank, " outside [0, ", options.size, ")"));
  if (options.timeout.count() <= 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "nccl group: timeout must be positive, got ", options.timeout.count(),
        " ms"));
  int devices = 0;
  DN_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&devices));
  if (options.device < 0 || options.device >= devices)
    return absl::InvalidArgumentError(
        absl::StrCat("nccl group: device ", options.device, " outside [0, ",
                     devices, ")"));
  DN_CUDA_RETURN_IF_ERROR(cudaSetDevice(options.device));

  const auto start = Clock::now();
  const std::string key = absl::StrCat(options.prefix, "/nccl_unique_id");
  ncclUniqueId id;
  if (options.rank == 0) {
    DN_NCCL_RETURN_IF_ERROR(ncclGetUniqueId(&id));
    std::vector<char> bytes(sizeof(id));
    std::memcpy(bytes.data(), &id, sizeof(id));
    DN_RETURN_IF_ERROR(store.Set(key, bytes));
  } else {
    DN_ASSIGN_OR_RETURN(std::vector<char> bytes,
                        store.Get(key, options.timeout));
    if (bytes.size() != sizeof(id))
      return absl::InvalidArgumentError(
          absl::StrCat("nccl group: store key '", key, "' holds ",
                       bytes.size(), " bytes, want ", sizeof(id)));
    std::memcpy(&id, bytes.data(), sizeof(id));
  }

  NcclOptions opts = options;
  if (const char* e = std::getenv("DN_NCCL_BLOCKING"); e != nullptr && e[0] != '\0')
    opts.blocking = e[0] == '1';
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = opts.blocking ? 1 : 0;
  config.commName = options.prefix.c_str();
  ncclComm_t raw = nullptr;
  // A blocking init cannot be abandoned (there is no handle to abort until
  // it returns): a peer that dies during it would hang us, so a fail-stop
  // timer bounds it.
  const std::string where = absl::StrCat("nccl group '", options.prefix, "' rank ",
                                         options.rank, "/", options.size, ": ");
  const auto fail_stop_after = opts.blocking && opts.stuck_exit_after.count() > 0
                                   ? options.timeout
                                   : std::chrono::milliseconds(0);
  FailStopTimer init_bound(fail_stop_after,
                           absl::StrCat(where, "ncclCommInitRankConfig did not return within ",
                                        options.timeout.count(), " ms (a peer never joined)"));
  const ncclResult_t init =
      ncclCommInitRankConfig(&raw, options.size, id, options.rank, &config);
  init_bound.Disarm();
  CommPtr comm(raw);  // aborted on every early return below
  DN_RETURN_IF_ERROR(::dn::internal::NcclStatus(
      init, "ncclCommInitRankConfig", __FILE__, __LINE__));
  if (!comm)
    return absl::InternalError("nccl group: ncclCommInitRankConfig gave no communicator");
  absl::Status ready =
      WaitNotInProgress(comm.get(), start + options.timeout,
                        absl::StrCat("ncclCommInitRankConfig (group '",
                                     options.prefix, "' rank ", options.rank,
                                     "/", options.size, ")"));
  if (!ready.ok()) return ready;

  cudaEvent_t raw_event = nullptr;
  DN_CUDA_RETURN_IF_ERROR(
      cudaEventCreateWithFlags(&raw_event, cudaEventDisableTiming));
  EventPtr event(raw_event);
  void* raw_scratch = nullptr;
  DN_CUDA_RETURN_IF_ERROR(cudaMalloc(&raw_scratch, sizeof(int64_t)));
  DevicePtr scratch(raw_scratch);
  DN_CUDA_RETURN_IF_ERROR(cudaMemset(raw_scratch, 0, sizeof(int64_t)));

  if (opts.blocking) {
    // NCCL connects peers lazily, inside the first call of each kind, and a
    // blocking communicator does that on the calling thread: a peer that is
    // gone by then would block the host where neither the watchdog nor
    // Abort() can reach it. So every kind of call the group makes runs once
    // here, while all ranks are creating the group, under a fail-stop timer.
    const FailStopTimer warm_bound(
        fail_stop_after, absl::StrCat(where, "connecting the peers (warm-up collectives) "
                                             "did not finish within ",
                                      options.timeout.count(), " ms"));
    const size_t n = static_cast<size_t>(options.size);
    void* raw_warm = nullptr;
    DN_CUDA_RETURN_IF_ERROR(cudaMalloc(&raw_warm, 2 * n * sizeof(int64_t)));
    DevicePtr warm(raw_warm);
    char* w = static_cast<char*>(raw_warm);
    cudaStream_t st = static_cast<cudaStream_t>(options.stream);
    ncclComm_t c = comm.get();
    DN_NCCL_RETURN_IF_ERROR(ncclAlltoAll(w, w + n * 8, 8, ncclUint8, c, st));
    DN_NCCL_RETURN_IF_ERROR(ncclAllGather(w, w + n * 8, 8, ncclUint8, c, st));
    DN_NCCL_RETURN_IF_ERROR(ncclBroadcast(w, w, 8, ncclUint8, 0, c, st));
    DN_NCCL_RETURN_IF_ERROR(ncclAllReduce(w, w, 1, ncclInt64, ncclSum, c, st));
    DN_NCCL_RETURN_IF_ERROR(ncclAllReduce(w, w, 1, ncclFloat64, ncclMax, c, st));
    DN_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(st));
  }

  DN_LOG(INFO) << "nccl group '" << options.prefix << "' rank " << options.rank << "/"
               << options.size << ": " << (opts.blocking ? "blocking" : "non-blocking")
               << " communicator";
  return std::unique_ptr<ProcessGroup>(std::make_unique<NcclProcessGroup>(
      opts, std::move(comm), std::move(event), std::move(scratch)));
}

}  // namespace dn::comm
