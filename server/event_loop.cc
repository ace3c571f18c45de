#include "server/event_loop.h"

#include <utility>

namespace dn::server {

EventLoop::~EventLoop() { Stop(); }

void EventLoop::Start(std::function<void()> tick,
                      std::chrono::milliseconds period) {
  tick_ = std::move(tick);
  period_ = period;
  thread_ = std::thread([this] { Run(); });
}

void EventLoop::Post(std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return;
    queue_.push_back(std::move(fn));
  }
  cv_.notify_one();
}

void EventLoop::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ && !thread_.joinable()) return;
    stopping_ = true;
  }
  cv_.notify_one();
  if (thread_.joinable() && !InLoopThread()) thread_.join();
}

void EventLoop::Run() {
  auto next_tick = std::chrono::steady_clock::now() + period_;
  for (;;) {
    std::function<void()> fn;
    bool tick = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_until(lock, next_tick,
                     [this] { return !queue_.empty() || stopping_; });
      if (!queue_.empty()) {
        fn = std::move(queue_.front());
        queue_.pop_front();
      } else if (stopping_) {
        return;
      }
      if (std::chrono::steady_clock::now() >= next_tick) {
        tick = true;
        next_tick = std::chrono::steady_clock::now() + period_;
      }
    }
    if (fn) fn();
    if (tick && tick_) tick_();
  }
}

}  // namespace dn::server
