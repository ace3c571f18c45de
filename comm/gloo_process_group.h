// File: comm/gloo_process_group.h
//
// GlooProcessGroup: the host-memory ProcessGroup over Gloo's TCP transport
// (Debian's libgloo snapshot 2022-05-18). Made by MakeGlooProcessGroup
// (comm/process_group.h); this header exists so that code that needs the
// concrete type (tests, the comm benchmark) can name it. Gloo headers stay
// private to comm/gloo_process_group.cc.
//
// Timeouts and failure: rendezvous and every collective are bounded by
// GlooOptions::timeout. Gloo reports failures as C++ exceptions; they are
// caught here and become DEADLINE_EXCEEDED (a peer did not answer in time),
// UNAVAILABLE (a connection broke, e.g. a peer died) or ABORTED (Abort() was
// called, or any other Gloo failure). After the first error the group shuts
// its sockets down, so its peers fail promptly too, and every later call
// returns ABORTED. Forming a group ignores SIGPIPE process-wide (when it is
// at its default) so that a write to a dead peer is an error, not a crash.
//
// Abort(): this Gloo snapshot has no public way to cancel a pending
// operation, and its tcp/pair.h cannot be included (Debian ships it without
// gloo/common/memory.h). So at creation the ranks exchange both endpoint
// addresses of every connection (one all-gather), and Abort() finds this
// process's sockets of the group in /proc/self/fd by those addresses and
// shutdown(2)s them. Gloo's device loop then reads EOF and fails every
// pending operation of the pair; the peers read EOF too. Descriptors are
// never closed behind Gloo's back. Gloo does not fail a send it is in the
// middle of writing (a peer stopped reading), so Abort() also starts a waker
// thread that keeps interrupting the waits of the running call (its buffers
// are registered while it runs) until that call has returned ABORTED.
//
// A peer that dies while this rank is in the middle of writing to it is
// likewise not reported by Gloo: that call ends with DEADLINE_EXCEEDED at
// the timeout (every other dead-peer case is UNAVAILABLE at once).
#ifndef DN_COMM_GLOO_PROCESS_GROUP_H_
#define DN_COMM_GLOO_PROCESS_GROUP_H_

#include <sys/socket.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/process_group.h"
#include "comm/store.h"

namespace gloo {
class Context;
namespace transport {
class Device;
class UnboundBuffer;
}  // namespace transport
}  // namespace gloo

namespace dn::comm {

class GlooProcessGroup final : public ProcessGroup {
 public:
  static absl::StatusOr<std::unique_ptr<GlooProcessGroup>> Create(
      Store& store, const GlooOptions& options);
  ~GlooProcessGroup() override;

  GlooProcessGroup(const GlooProcessGroup&) = delete;
  GlooProcessGroup& operator=(const GlooProcessGroup&) = delete;

  int rank() const override { return options_.rank; }
  int size() const override { return options_.size; }
  MemoryKind memory() const override { return MemoryKind::kHost; }
  std::string backend_name() const override { return "gloo"; }

  absl::Status AllToAll(const void* send, void* recv,
                        size_t bytes_per_peer) override;
  absl::Status AllGather(const void* send, void* recv,
                         size_t bytes_per_rank) override;
  absl::Status Broadcast(void* buf, size_t bytes, int root) override;
  absl::Status AllReduce(void* buf, size_t count, ReduceType type,
                         ReduceOp op) override;
  absl::Status Barrier() override;
  void Abort() override;

 private:
  GlooProcessGroup(const GlooOptions& options,
                   std::shared_ptr<gloo::transport::Device> device,
                   std::shared_ptr<gloo::Context> context);

  // Fails fast when the group is already broken; otherwise hands `fn` a
  // fresh tag, runs it and turns any Gloo exception into a Status (and
  // breaks the group).
  template <typename Fn>
  absl::Status Run(const char* op, Fn&& fn);
  absl::Status Fail(absl::Status status);
  // Both ends of the TCP connection to one peer.
  struct PeerSocket {
    int peer;
    sockaddr_storage local;
    sockaddr_storage remote;
  };
  // This process's descriptors of the group's connections (looked up in
  // /proc/self/fd by their addresses; Gloo keeps them private).
  std::vector<int> FindPeerSockets() const;
  // Shuts every peer socket down: pending waits fail at once, locally and
  // on the peers.
  void ShutdownSockets();
  // Registers the unbound buffers of the running call (throws when the
  // group was aborted, so no call starts after Abort()); Untrack clears.
  void Track(std::vector<gloo::transport::UnboundBuffer*> buffers);
  void Untrack();
  // Starts (once) the thread that interrupts the running call's waits.
  void StartWaker();

  const GlooOptions options_;
  std::shared_ptr<gloo::transport::Device> device_;
  std::shared_ptr<gloo::Context> context_;
  std::vector<PeerSocket> peer_sockets_;
  uint32_t next_tag_ = 1;

  std::atomic<bool> aborted_{false};  // Abort() was called
  std::atomic<bool> broken_{false};   // any error, or Abort()
  std::mutex mu_;
  absl::Status first_error_;  // guarded by mu_

  std::mutex active_mu_;
  std::vector<gloo::transport::UnboundBuffer*> active_;  // guarded
  bool stopping_ = false;                                 // guarded
  std::atomic<bool> waker_started_{false};
  std::thread waker_;
};

}  // namespace dn::comm

#endif  // DN_COMM_GLOO_PROCESS_GROUP_H_
