#include "server/inflight_budget.h"

#include "absl/strings/str_cat.h"

namespace dn::server {

InflightBudget::InflightBudget(int64_t limit_bytes) : limit_(limit_bytes) {}

absl::StatusOr<InflightBudget::Hold> InflightBudget::Acquire(int64_t bytes) {
  std::lock_guard<std::mutex> lock(state_->mu);
  if (limit_ > 0 && state_->used + bytes > limit_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "memory budget: this request's ", bytes, " bytes would exceed the ",
        limit_ >> 20, " MiB of requests in flight (--max-inflight-mb; ",
        state_->used, " bytes in flight now); retry later"));
  }
  state_->used += bytes;
  // The deleter keeps the state alive on its own.
  auto state = state_;
  return Hold(static_cast<void*>(nullptr), [state, bytes](void*) {
    std::lock_guard<std::mutex> l(state->mu);
    state->used -= bytes;
  });
}

int64_t InflightBudget::in_flight() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->used;
}

}  // namespace dn::server
