// File: server/loop_reactor.h
//
// LoopUnaryReactor: a unary gRPC call whose work runs on the coordinator's
// event loop (server/event_loop.h), where CoordinatorCore lives. `fn` fills
// the response and returns the status; the reactor deletes itself.
#ifndef DN_SERVER_LOOP_REACTOR_H_
#define DN_SERVER_LOOP_REACTOR_H_

#include <functional>
#include <utility>

#include "grpcpp/grpcpp.h"
#include "server/event_loop.h"

namespace dn::server {

class LoopUnaryReactor : public grpc::ServerUnaryReactor {
 public:
  LoopUnaryReactor(EventLoop& loop, std::function<grpc::Status()> fn) {
    loop.Post([this, fn = std::move(fn)] { Finish(fn()); });
  }
  void OnDone() override { delete this; }
};

// A unary call refused before any work: finishes at once with `status`.
inline grpc::ServerUnaryReactor* RejectUnary(grpc::CallbackServerContext* ctx,
                                             const grpc::Status& status) {
  grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
  r->Finish(status);
  return r;
}

}  // namespace dn::server

#endif  // DN_SERVER_LOOP_REACTOR_H_
