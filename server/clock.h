// File: server/clock.h
//
// The time source of the coordinator's core (request queue, admission, group
// registry, rendezvous store). The core never reads a clock itself: it is
// given one, so unit tests drive time with FakeClock, without sleeping.
// Two readings: a monotonic one for intervals (heartbeats, waits, leases)
// and the wall clock in Unix milliseconds, for call deadlines (gRPC hands
// those over as wall-clock times).
#ifndef DN_SERVER_CLOCK_H_
#define DN_SERVER_CLOCK_H_

#include <chrono>
#include <cstdint>

namespace dn::server {

class Clock {
 public:
  using time_point = std::chrono::steady_clock::time_point;
  virtual ~Clock() = default;
  virtual time_point Now() const = 0;
  virtual int64_t UnixMillis() const = 0;

  double SecondsSince(time_point t) const {
    return std::chrono::duration<double>(Now() - t).count();
  }
};

// The process's clocks.
class RealClock final : public Clock {
 public:
  time_point Now() const override { return std::chrono::steady_clock::now(); }
  int64_t UnixMillis() const override {
    return std::chrono::duration_cast<std::chrono::milliseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  }
};

// A clock that moves only when told to (tests). Both readings advance
// together.
class FakeClock final : public Clock {
 public:
  time_point Now() const override { return now_; }
  int64_t UnixMillis() const override { return unix_ms_; }
  void Advance(std::chrono::milliseconds d) {
    now_ += d;
    unix_ms_ += d.count();
  }

 private:
  time_point now_ = time_point() + std::chrono::hours(1);
  int64_t unix_ms_ = int64_t{1'800'000'000'000};
};

}  // namespace dn::server

#endif  // DN_SERVER_CLOCK_H_
