// File: server/inflight_budget.h
//
// InflightBudget: the coordinator's memory budget for client requests, a
// bound on the bytes of Generate requests in flight (received and not yet
// finished). A call over the budget is refused with RESOURCE_EXHAUSTED
// before its body is parsed or copied. Thread-safe.
#ifndef DN_SERVER_INFLIGHT_BUDGET_H_
#define DN_SERVER_INFLIGHT_BUDGET_H_

#include <cstdint>
#include <memory>
#include <mutex>

#include "absl/status/statusor.h"

namespace dn::server {

class InflightBudget {
 public:
  // `limit_bytes` <= 0: no limit.
  explicit InflightBudget(int64_t limit_bytes);

  // Bytes held until the handle is destroyed.
  using Hold = std::shared_ptr<void>;
  // RESOURCE_EXHAUSTED (naming --max-inflight-mb) when `bytes` more would
  // exceed the limit. A request larger than the whole budget is refused too.
  absl::StatusOr<Hold> Acquire(int64_t bytes);

  int64_t in_flight() const;
  int64_t limit() const { return limit_; }

 private:
  struct State {
    std::mutex mu;
    int64_t used = 0;
  };
  const int64_t limit_;
  std::shared_ptr<State> state_ = std::make_shared<State>();
};

}  // namespace dn::server

#endif  // DN_SERVER_INFLIGHT_BUDGET_H_
