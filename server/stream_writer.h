// File: server/stream_writer.h
//
// OrderedWriter: the write side of a server streaming reactor (gRPC callback
// API), usable from any thread. gRPC allows one outstanding write per
// stream; this keeps a queue, starts the next write from OnWriteDone, and
// defers Finish until the queued writes are out. No lock is held while
// calling StartWrite/Finish, so reactions that gRPC runs inline cannot
// deadlock against it.
//
//   class MyReactor : public grpc::ServerWriteReactor<Msg> {
//     OrderedWriter<MyReactor, Msg> writer_{this};
//     void OnWriteDone(bool ok) override { writer_.OnWriteDone(ok); }
//     void OnDone() override { writer_.Detach(); delete this; }
//   };
#ifndef DN_SERVER_STREAM_WRITER_H_
#define DN_SERVER_STREAM_WRITER_H_

#include <deque>
#include <memory>
#include <mutex>
#include <utility>

#include "grpcpp/support/status.h"

namespace dn::server {

template <typename Reactor, typename Msg>
class OrderedWriter {
 public:
  explicit OrderedWriter(Reactor* reactor) : reactor_(reactor) {}

  // Queues `msg`. Returns false (dropping it) once Finish was requested, the
  // call is over, or an earlier write failed (the peer is gone).
  bool Write(Msg msg) { return Write(std::make_shared<const Msg>(std::move(msg))); }
  // Queues a message shared with other streams (a Job fanned out to every
  // rank of a group is built once and never copied per stream).
  bool Write(std::shared_ptr<const Msg> msg) {
    const Msg* next = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finish_requested_ || reactor_ == nullptr || failed_) return false;
      queue_.push_back(std::move(msg));
      if (writing_) return true;
      writing_ = true;
      next = queue_.front().get();
    }
    reactor_->StartWrite(next);
    return true;
  }

  // Finishes the call with `status` after the queued writes (once; later
  // calls are ignored).
  void Finish(grpc::Status status) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finish_requested_ || reactor_ == nullptr) return;
      finish_requested_ = true;
      final_status_ = std::move(status);
      if (writing_) return;  // OnWriteDone finishes
    }
    reactor_->Finish(final_status_);
  }

  bool finish_requested() const {
    std::lock_guard<std::mutex> lock(mu_);
    return finish_requested_;
  }

  // From the reactor's OnWriteDone.
  void OnWriteDone(bool ok) {
    const Msg* next = nullptr;
    bool finish = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!queue_.empty()) queue_.pop_front();
      if (!ok) {
        failed_ = true;
        queue_.clear();
      }
      if (!queue_.empty()) {
        next = queue_.front().get();
      } else {
        writing_ = false;
        finish = finish_requested_;
      }
    }
    if (next != nullptr) {
      reactor_->StartWrite(next);
    } else if (finish) {
      reactor_->Finish(final_status_);
    }
  }

  // From the reactor's OnDone: the reactor is about to be deleted.
  void Detach() {
    std::lock_guard<std::mutex> lock(mu_);
    reactor_ = nullptr;
    queue_.clear();
  }

 private:
  mutable std::mutex mu_;
  Reactor* reactor_;
  std::deque<std::shared_ptr<const Msg>> queue_;  // front = the write in flight
  bool writing_ = false;
  bool failed_ = false;
  bool finish_requested_ = false;
  grpc::Status final_status_;
};

}  // namespace dn::server

#endif  // DN_SERVER_STREAM_WRITER_H_
