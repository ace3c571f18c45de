#include "server/admission.h"

#include <algorithm>

#include "absl/strings/str_format.h"

namespace dn::server {

double Admission::BestRate(const std::vector<GroupLoad>& groups) {
  double best = 0;
  for (const GroupLoad& g : groups) {
    for (double rate : {g.measured_rate, g.best_rate}) {
      if (rate > 0 && (best == 0 || rate < best)) best = rate;
    }
  }
  return best;
}

double Admission::WorkSeconds(const Request& req, double rate) {
  return rate * static_cast<double>(req.resolved.tokens) *
         req.resolved.request.steps();
}

double Admission::EstimateSeconds(const std::vector<GroupLoad>& groups,
                                  const Request& req) {
  double best = 0;
  for (const GroupLoad& g : groups) {
    if (g.measured_rate > 0 && (best == 0 || g.measured_rate < best)) {
      best = g.measured_rate;
    }
  }
  return WorkSeconds(req, best);
}

double Admission::RemainingSeconds(const Request& running, double rate) const {
  if (running.cancel_code != absl::StatusCode::kOk ||
      running.phase != Request::kRunning) {
    return 0;
  }
  return std::max(0.0, WorkSeconds(running, rate) -
                           clock_.SecondsSince(running.started));
}

double Admission::WaitSeconds(const std::vector<GroupLoad>& groups,
                              const std::vector<std::shared_ptr<Request>>& waiting,
                              int priority) const {
  const double rate = BestRate(groups);
  int busy = 0;
  double ahead = 0;
  for (const GroupLoad& g : groups) {
    if (g.idle) return 0;
    ++busy;
    if (g.running) ahead += RemainingSeconds(*g.running, rate);
  }
  if (busy == 0) return 0;
  for (const auto& q : waiting) {
    if (q->priority >= priority) ahead += WorkSeconds(*q, rate);
  }
  return ahead / busy;
}

int64_t Admission::RetryAfterMillis(const std::vector<GroupLoad>& groups) const {
  const double rate = BestRate(groups);
  double soonest = -1;
  for (const GroupLoad& g : groups) {
    if (g.idle || !g.running) continue;
    if (WorkSeconds(*g.running, rate) <= 0) continue;
    const double left = RemainingSeconds(*g.running, rate);
    if (soonest < 0 || left < soonest) soonest = left;
  }
  if (soonest < 0) return 1000;
  return std::clamp<int64_t>(static_cast<int64_t>(soonest * 1e3), 100, 30000);
}

absl::Status Admission::CheckDeadline(
    const std::vector<GroupLoad>& groups,
    const std::vector<std::shared_ptr<Request>>& waiting,
    const Request& req) const {
  if (req.deadline_unix_ms <= 0) return absl::OkStatus();
  const double rate = BestRate(groups);
  const double run = WorkSeconds(req, rate);
  if (run <= 0) return absl::OkStatus();
  const double wait = WaitSeconds(groups, waiting, req.priority);
  const double left =
      static_cast<double>(req.deadline_unix_ms - clock_.UnixMillis()) / 1e3;
  if (wait + run <= left) return absl::OkStatus();
  return absl::DeadlineExceededError(absl::StrFormat(
      "deadline: rejected at admission: estimated %.3f s (%.3f s to run: %d "
      "tokens x %d steps x %.3g s per token-step, plus %.3f s for the work "
      "ahead) exceeds the %.3f s left before the deadline",
      wait + run, run, static_cast<int>(req.resolved.tokens),
      req.resolved.request.steps(), rate, wait, left));
}

}  // namespace dn::server
