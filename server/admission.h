// File: server/admission.h
//
// Admission: the coordinator's estimates of a request's cost, used to refuse
// at admission a request whose deadline cannot be met (DEADLINE_EXCEEDED), to
// report Accepted.estimated_seconds, and to tell a refused client when to
// retry (retry-after-ms). Optimistic by design: each group is assumed to run
// at the fastest rate measured for the model. No gRPC; the clock is injected.
#ifndef DN_SERVER_ADMISSION_H_
#define DN_SERVER_ADMISSION_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "server/clock.h"
#include "server/core_types.h"

namespace dn::server {

// A live (READY or BUSY) worker group of the model, as admission sees it.
struct GroupLoad {
  bool idle = false;  // READY: takes a request now
  // Seconds per token-step: the last request's measured rate, and the
  // lowest rate known (the warm-up's or the last request's); 0 = unknown.
  double measured_rate = 0;
  double best_rate = 0;
  std::shared_ptr<const Request> running;  // BUSY: what it runs
};

class Admission {
 public:
  explicit Admission(const Clock& clock) : clock_(clock) {}

  // The lowest rate of any of `groups` (0 when none is known).
  static double BestRate(const std::vector<GroupLoad>& groups);
  // tokens x steps x rate.
  static double WorkSeconds(const Request& req, double rate);
  // Accepted.estimated_seconds: the run time at the fastest measured rate.
  static double EstimateSeconds(const std::vector<GroupLoad>& groups,
                                const Request& req);
  // What is left of a running request at `rate`. A request whose
  // cancellation was asked for has nothing left: its group stops at the next
  // step boundary.
  double RemainingSeconds(const Request& running, double rate) const;
  // The work ahead of a request of `priority`: what is left of the running
  // requests plus the `waiting` ones of the same or a higher priority, spread
  // over the busy groups; 0 when a group is idle.
  double WaitSeconds(const std::vector<GroupLoad>& groups,
                     const std::vector<std::shared_ptr<Request>>& waiting,
                     int priority) const;
  // When the first running request should end, in ms (clamped to
  // [100, 30000]; 1000 when unknown).
  int64_t RetryAfterMillis(const std::vector<GroupLoad>& groups) const;
  // OK, or DEADLINE_EXCEEDED (message starting "deadline:") when the wait
  // plus the run time exceeds what is left before `req`'s deadline.
  absl::Status CheckDeadline(const std::vector<GroupLoad>& groups,
                             const std::vector<std::shared_ptr<Request>>& waiting,
                             const Request& req) const;

 private:
  const Clock& clock_;
};

}  // namespace dn::server

#endif  // DN_SERVER_ADMISSION_H_
