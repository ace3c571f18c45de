// File: server/worker_control_service.h
//
// The internal denoised.v1.internal.WorkerControl service of the coordinator
// (gRPC callback API): one Attach stream per rank process (a RankLink of
// CoordinatorCore), the rendezvous store (StoreSet/StoreGet; a waiting Get
// is answered through the store's callback) and the launchers' SyncSlice.
// A rank's message is stamped (RankLink::Touch) when it arrives, on gRPC's
// thread, so a busy event loop never makes a live rank look silent.
#ifndef DN_SERVER_WORKER_CONTROL_SERVICE_H_
#define DN_SERVER_WORKER_CONTROL_SERVICE_H_

#include <memory>

#include "grpcpp/grpcpp.h"
#include "server/clock.h"
#include "server/coordinator_core.h"
#include "server/event_loop.h"

namespace dn::server {

// The service keeps references to its arguments; they must outlive it.
std::unique_ptr<grpc::Service> MakeWorkerControlService(EventLoop& loop,
                                                        CoordinatorCore& core,
                                                        const Clock& clock);

}  // namespace dn::server

#endif  // DN_SERVER_WORKER_CONTROL_SERVICE_H_
