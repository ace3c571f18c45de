// File: server/denoiser_service.h
//
// The public denoised.v1.Denoiser service of the coordinator (gRPC callback
// API): the shell over CoordinatorCore. With tokens on, a call without a
// valid one never gets here: the port's credentials refuse it on its
// metadata, before its body is read (server/metadata_gate.h). Each call then
// passes, in order, before its body is parsed:
//   1. the ClientGate (server/auth.h): bearer token again, per-client stream
//      limit;
//   2. the InflightBudget: bytes of Generate requests in flight;
// then the body is moved (not copied) to the `intake` thread and parsed there,
// off gRPC's threads, which also deliver the ranks' messages (an unparseable
// body is INVALID_ARGUMENT "the request could not be parsed", counted like
// every outcome); the message is moved to the core's event loop, and the
// core's answers are written back. Generate and GenerateUnary are raw
// methods (grpc::ByteBuffer) for that.
#ifndef DN_SERVER_DENOISER_SERVICE_H_
#define DN_SERVER_DENOISER_SERVICE_H_

#include <memory>

#include "grpcpp/grpcpp.h"
#include "server/auth.h"
#include "server/coordinator_core.h"
#include "server/event_loop.h"
#include "server/inflight_budget.h"

namespace dn::server {

// The service keeps references to its arguments; they must outlive it.
std::unique_ptr<grpc::Service> MakeDenoiserService(EventLoop& intake, EventLoop& loop,
                                                   CoordinatorCore& core,
                                                   ClientGate& gate,
                                                   InflightBudget& budget);

}  // namespace dn::server

#endif  // DN_SERVER_DENOISER_SERVICE_H_
