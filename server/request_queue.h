// File: server/request_queue.h
//
// RequestQueue: the coordinator's bounded per-model priority queues of
// admitted requests that wait for a worker group. Order: higher priority
// first, then arrival (the sequence number the queue assigns). No gRPC.
#ifndef DN_SERVER_REQUEST_QUEUE_H_
#define DN_SERVER_REQUEST_QUEUE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "server/core_types.h"

namespace dn::server {

class RequestQueue {
 public:
  // `max_per_model`: requests waiting per model (not counting running ones).
  explicit RequestQueue(int max_per_model) : max_(max_per_model) {}

  int max_per_model() const { return max_; }
  size_t Size(const std::string& model) const;
  bool Full(const std::string& model) const {
    return static_cast<int>(Size(model)) >= max_;
  }
  // Queues `req` (assigns its seq; phase kQueued) and returns its position
  // (0: next to run). The caller checks Full first.
  int Push(const std::shared_ptr<Request>& req);
  // The request that runs next for `model`; null when none waits.
  std::shared_ptr<Request> Head(const std::string& model) const;
  // Removes `req` if it waits (no-op otherwise).
  void Remove(const Request& req);
  // The waiting requests of `model`, in order.
  std::vector<std::shared_ptr<Request>> Waiting(const std::string& model) const;
  // Every model with a queue (possibly empty), in name order.
  std::vector<std::string> Models() const;

 private:
  using Key = std::pair<int, uint64_t>;  // (-priority, seq): begin() runs first
  static Key KeyOf(const Request& r) { return {-r.priority, r.seq}; }

  const int max_;
  uint64_t next_seq_ = 0;
  std::map<std::string, std::map<Key, std::shared_ptr<Request>>> queues_;
};

}  // namespace dn::server

#endif  // DN_SERVER_REQUEST_QUEUE_H_
