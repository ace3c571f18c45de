// File: server/coordinator.h
//
// `denoised coordinator`: the public gRPC front end. It serves
// - denoised.v1.Denoiser (Generate streaming, GenerateUnary, Cancel,
//   ListModels, GetServerInfo) with the gRPC callback API,
// - grpc.health.v1.Health (NOT_SERVING until a worker group is READY; both
//   the overall status "" and "denoised.v1.Denoiser"),
// - server reflection,
// - the internal denoised.v1.internal.WorkerControl service (one Attach
//   stream per rank process, plus the rendezvous store) on --worker-listen
//   (by default the same port as --listen),
// - Prometheus metrics (server/metrics.h) on --metrics-listen.
//
// Request path: ClientGate and memory budget (before the body is parsed) ->
// validate (server/request_validation.h) -> bounded per-model priority queue
// -> an idle READY worker group serving the model (one request per group at
// a time) -> the Job fanned out to every rank -> rank 0's step reports
// relayed as Step events -> the result.
//
// This is the gRPC shell (coordinator.cc: servers, start, shutdown;
// denoiser_service.*, worker_control_service.*, health_service.h: the
// services). The logic is CoordinatorCore (coordinator_core.h), with no gRPC
// in it; all its state lives on one event-loop thread, and the reactors only
// post events to it. docs/ARCHITECTURE.md draws the parts.
#ifndef DN_SERVER_COORDINATOR_H_
#define DN_SERVER_COORDINATOR_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/credentials.h"
#include "server/protocol.h"

namespace dn::server {

struct CoordinatorOptions {
  std::string listen = "127.0.0.1:50051";
  // Empty: WorkerControl is served on `listen` too.
  std::string worker_listen;
  std::string metrics_listen = "127.0.0.1:9090";
  // Requests waiting per model (not counting running ones).
  int max_queue = 16;
  int64_t max_message_bytes = int64_t{256} << 20;
  // Memory budget: bytes of Generate requests in flight (received, not yet
  // finished); a call over it is refused RESOURCE_EXHAUSTED before its body
  // is parsed. 0: no limit.
  int64_t max_inflight_bytes = int64_t{1} << 30;
  // When set, ranks must present it in Hello and store calls.
  std::string secret;
  int heartbeat_timeout_ms = kHeartbeatTimeoutMs;
  // How long a model may have no live worker group (none forming, ready or
  // busy) before its queued requests end UNAVAILABLE, and how long a FAILED
  // group waits for its launcher to register a new generation before it is
  // forgotten (then the model is no longer served: NOT_FOUND).
  int unserved_timeout_ms = 60000;
  // Reject at admission (DEADLINE_EXCEEDED) a request whose deadline cannot
  // be met by the estimate: tokens x steps x the fastest ready group's
  // measured seconds per token-step, plus the work queued and running ahead
  // of it shared over the model's groups.
  bool admission_by_cost = true;
  // Security (docs/SECURITY.md). Non-empty: Denoiser calls must carry
  // `authorization: Bearer <one of these>`.
  std::vector<std::string> auth_tokens;
  // Concurrent Generate/GenerateUnary calls per client (token, or peer
  // address without auth); 0 = unlimited.
  int max_streams_per_client = 0;
  TlsFiles tls;         // public port (server TLS)
  TlsFiles worker_tls;  // worker port (mutual TLS; needs --worker-listen)
};

class Coordinator {
 public:
  // Binds every port and starts serving. Port 0 picks free ports.
  static absl::StatusOr<std::unique_ptr<Coordinator>> Start(
      const CoordinatorOptions& options);
  ~Coordinator();  // Shutdown()
  Coordinator(const Coordinator&) = delete;
  Coordinator& operator=(const Coordinator&) = delete;

  // Bound addresses, "HOST:PORT".
  const std::string& address() const;
  const std::string& worker_address() const;
  const std::string& metrics_address() const;

  // Health NOT_SERVING, fails queued and running requests with UNAVAILABLE,
  // tells every rank to shut down, and stops the servers. Idempotent.
  void Shutdown();

  class Impl;

 private:
  explicit Coordinator(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Whether a listen address is on loopback (127.x, localhost, [::1], unix:).
bool IsLoopbackListen(const std::string& listen);

}  // namespace dn::server

#endif  // DN_SERVER_COORDINATOR_H_
