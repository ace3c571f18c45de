// File: server/event_loop.h
//
// A single-threaded event loop: closures posted from any thread (gRPC
// reactors, signal handlers) run one at a time, in order, on the loop's own
// thread, plus a periodic tick. The coordinator keeps all of its state on
// this thread, so none of it needs a lock and no lock is ever held while
// calling into gRPC.
#ifndef DN_SERVER_EVENT_LOOP_H_
#define DN_SERVER_EVENT_LOOP_H_

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

namespace dn::server {

class EventLoop {
 public:
  EventLoop() = default;
  ~EventLoop();  // Stop()
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  // Starts the thread; `tick` runs every `period` between events.
  void Start(std::function<void()> tick, std::chrono::milliseconds period);
  // Queues `fn`. After Stop() has begun, `fn` is dropped.
  void Post(std::function<void()> fn);
  // Runs everything posted so far, then joins the thread. Idempotent.
  void Stop();
  bool InLoopThread() const {
    return std::this_thread::get_id() == thread_.get_id();
  }

 private:
  void Run();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stopping_ = false;
  std::function<void()> tick_;
  std::chrono::milliseconds period_{100};
  std::thread thread_;
};

}  // namespace dn::server

#endif  // DN_SERVER_EVENT_LOOP_H_
