// File: server/core_types.h
//
// The plain types shared by the parts of the coordinator's core (the request
// queue and admission, the group registry, CoordinatorCore): a request as
// the core tracks it, where its events go (RequestSink), and a rank's link
// (RankLink). No gRPC here: the shell (denoiser_service.*,
// worker_control_service.*) implements RequestSink and RankLink over gRPC
// reactors, and unit tests implement them with recorders.
#ifndef DN_SERVER_CORE_TYPES_H_
#define DN_SERVER_CORE_TYPES_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "denoised/v1/denoiser.pb.h"
#include "denoised/v1/worker.pb.h"
#include "server/clock.h"
#include "server/request_validation.h"

namespace dn::server {

// Where a request's events go (a Generate stream or a unary call). The core
// calls it from its own thread; Finish is called once.
class RequestSink {
 public:
  virtual ~RequestSink() = default;
  virtual void Event(denoised::v1::GenerateEvent event) = 0;
  virtual void Result(denoised::v1::GenerateResult result) = 0;
  virtual void Finish(absl::Status status) = 0;
  // Trailing metadata of the call (retry-after-ms).
  virtual void Trailer(const std::string& key, const std::string& value) = 0;
  // Set by the core when the request is admitted.
  std::string request_id;
  // Set by the shell when the client went away (before it tells the core):
  // a request that reaches Submit after that is not admitted.
  std::atomic<bool> cancelled{false};
};

struct Request {
  std::string id;
  std::string client_id;
  std::string model;
  ResolvedRequest resolved;
  int priority = 0;
  uint64_t seq = 0;
  Clock::time_point accepted;
  Clock::time_point started;
  int64_t deadline_unix_ms = 0;  // 0: none
  std::shared_ptr<RequestSink> sink;
  enum Phase { kQueued, kRunning, kDone } phase = kQueued;
  std::string group;  // while running
  int64_t group_generation = 0;
  // Cancellation asked for (CANCELLED / DEADLINE_EXCEEDED); OK = none.
  absl::StatusCode cancel_code = absl::StatusCode::kOk;
  int steps_seen = 0;
  double step_seconds_sum = 0;
};

// One rank's Attach stream. The shell's reactor implements Send and Close;
// the core keeps the rest (on its thread), except `last_seen`, which the
// shell stamps when a message arrives, so a busy core thread cannot make a
// live rank look silent.
class RankLink {
 public:
  virtual ~RankLink() = default;
  virtual void Send(denoised::v1::internal::CoordinatorMessage msg) = 0;
  // A message shared by several streams (a Job fanned out to the ranks of a
  // group is built once). The reactor queues the pointer: no copy per rank.
  virtual void SendShared(
      std::shared_ptr<const denoised::v1::internal::CoordinatorMessage> msg) {
    Send(*msg);
  }
  // Ends the stream with `status` (idempotent).
  virtual void Close(const absl::Status& status) = 0;

  void Touch(Clock::time_point t) {
    last_seen_.store(t.time_since_epoch().count(), std::memory_order_relaxed);
  }
  Clock::time_point last_seen() const {
    return Clock::time_point(Clock::time_point::duration(
        last_seen_.load(std::memory_order_relaxed)));
  }

  // Core-thread state.
  bool hello_done = false;
  bool ended = false;
  bool leaving = false;  // the rank sent Leave: its stream's end is no failure
  std::string group;
  int64_t generation = 0;
  int rank = -1;
  std::string peer;
  denoised::v1::RankInfo info;

 private:
  std::atomic<Clock::time_point::rep> last_seen_{0};
};

}  // namespace dn::server

#endif  // DN_SERVER_CORE_TYPES_H_
