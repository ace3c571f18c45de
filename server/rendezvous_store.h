// File: server/rendezvous_store.h
//
// RendezvousStore: the key-value store ranks use to form their process
// groups (Gloo store keys, the NCCL unique id), served over WorkerControl's
// StoreSet/StoreGet. A Get may wait for its key: the store answers it later
// through its callback (when the key is set, when its wait ends, or when the
// store closes). No gRPC; the clock is injected. Which keys a caller may use
// (the prefix of a live group generation) is the coordinator's rule, checked
// before these calls.
#ifndef DN_SERVER_RENDEZVOUS_STORE_H_
#define DN_SERVER_RENDEZVOUS_STORE_H_

#include <chrono>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/clock.h"

namespace dn::server {

class RendezvousStore {
 public:
  // The value, std::nullopt when the key is not (yet) set, or an error.
  using Answer = std::function<void(absl::StatusOr<std::optional<std::string>>)>;
  // Waits are capped at this.
  static constexpr int kMaxWaitMs = 60000;

  explicit RendezvousStore(const Clock& clock) : clock_(clock) {}

  // Sets `key` and answers every Get waiting for it.
  void Set(const std::string& key, const std::string& value);
  // Answers at once when the key is set or `wait_ms` <= 0; otherwise when
  // the key is set or after min(wait_ms, kMaxWaitMs) (not found).
  void Get(const std::string& key, int wait_ms, Answer done);
  // Answers the waits that have run out (call periodically).
  void ExpireWaits();
  // Forgets every key that starts with `prefix` (a group generation's).
  void EraseUnder(const std::string& prefix);
  // Answers every waiting Get with `status` (shutdown).
  void CloseWaits(const absl::Status& status);

  size_t waiting() const { return waiters_.size(); }

 private:
  struct Waiter {
    std::string key;
    Clock::time_point deadline;
    Answer done;
  };
  const Clock& clock_;
  std::map<std::string, std::string> values_;
  std::vector<Waiter> waiters_;
};

}  // namespace dn::server

#endif  // DN_SERVER_RENDEZVOUS_STORE_H_
