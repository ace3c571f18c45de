#include "server/rendezvous_store.h"

#include <algorithm>
#include <utility>

#include "absl/strings/match.h"

namespace dn::server {

void RendezvousStore::Set(const std::string& key, const std::string& value) {
  values_[key] = value;
  std::vector<Answer> answer;
  for (auto it = waiters_.begin(); it != waiters_.end();) {
    if (it->key == key) {
      answer.push_back(std::move(it->done));
      it = waiters_.erase(it);
    } else {
      ++it;
    }
  }
  // Answered after the book is consistent: a callback may call back in.
  for (Answer& done : answer) done(std::optional<std::string>(value));
}

void RendezvousStore::Get(const std::string& key, int wait_ms, Answer done) {
  auto it = values_.find(key);
  if (it != values_.end()) {
    done(std::optional<std::string>(it->second));
    return;
  }
  if (wait_ms <= 0) {
    done(std::optional<std::string>());
    return;
  }
  const int wait = std::min(wait_ms, kMaxWaitMs);
  waiters_.push_back(
      {key, clock_.Now() + std::chrono::milliseconds(wait), std::move(done)});
}

void RendezvousStore::ExpireWaits() {
  const auto now = clock_.Now();
  std::vector<Answer> expired;
  for (auto it = waiters_.begin(); it != waiters_.end();) {
    if (it->deadline <= now) {
      expired.push_back(std::move(it->done));
      it = waiters_.erase(it);
    } else {
      ++it;
    }
  }
  for (Answer& done : expired) done(std::optional<std::string>());
}

void RendezvousStore::EraseUnder(const std::string& prefix) {
  for (auto it = values_.lower_bound(prefix);
       it != values_.end() && absl::StartsWith(it->first, prefix);) {
    it = values_.erase(it);
  }
}

void RendezvousStore::CloseWaits(const absl::Status& status) {
  std::vector<Waiter> waiters = std::move(waiters_);
  waiters_.clear();
  for (Waiter& w : waiters) w.done(status);
}

}  // namespace dn::server
