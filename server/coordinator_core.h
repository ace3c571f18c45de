// File: server/coordinator_core.h
//
// CoordinatorCore: the coordinator without gRPC. It ties the request queue
// and admission (server/request_queue.h, server/admission.h), the worker
// groups (server/group_registry.h) and the rendezvous store
// (server/rendezvous_store.h) together: a request is checked
// (server/request_validation.h), admitted or refused, queued, dispatched to
// an idle READY group serving its model as a Job for every rank, relayed
// step by step and finished with its result. Single-threaded: the shell
// (server/coordinator.cc) calls every method on its event loop. The clock is
// injected, so tests drive the core with a FakeClock, without processes.
#ifndef DN_SERVER_COORDINATOR_CORE_H_
#define DN_SERVER_COORDINATOR_CORE_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "denoised/v1/denoiser.pb.h"
#include "denoised/v1/worker.pb.h"
#include "server/admission.h"
#include "server/clock.h"
#include "server/core_types.h"
#include "server/group_registry.h"
#include "server/metrics.h"
#include "server/rendezvous_store.h"
#include "server/request_queue.h"
#include "server/protocol.h"

namespace dn::server {

struct CoreOptions {
  int max_queue = 16;                           // waiting requests per model
  int64_t max_message_bytes = int64_t{256} << 20;  // reported in ServerInfo
  std::string secret;                           // worker secret ("" = none)
  int heartbeat_timeout_ms = kHeartbeatTimeoutMs;
  int unserved_timeout_ms = 60000;
  bool admission_by_cost = true;
};

// Longest model name a request may carry (INVALID_ARGUMENT naming `model`).
inline constexpr size_t kMaxModelNameLength = 256;

class CoordinatorCore {
 public:
  // `set_serving` is told when the coordinator starts or stops serving (a
  // group READY or BUSY); the shell drives grpc.health.v1 with it.
  CoordinatorCore(const CoreOptions& options, const Clock& clock,
                  CoordinatorMetrics& metrics,
                  std::function<void(bool)> set_serving);

  // --- requests ---
  // Admits (Accepted event) or refuses (the sink finishes) a request.
  // `deadline_unix_ms` 0: none.
  void Submit(denoised::v1::GenerateRequest request,
              std::shared_ptr<RequestSink> sink, int64_t deadline_unix_ms);
  // The client cancelled the call (or its deadline passed: `deadline`).
  void ClientGone(RequestSink& sink, bool deadline);
  // Counts a call refused before it reached Submit (authentication, stream
  // limit, memory budget, an unparseable body) in denoised_requests_total.
  void CountRefused(const std::string& model, absl::StatusCode code);
  denoised::v1::CancelResponse Cancel(const denoised::v1::CancelRequest& request);
  denoised::v1::ListModelsResponse ListModels() const;
  denoised::v1::ServerInfo GetServerInfo() const;

  // --- ranks (WorkerControl) ---
  void OnRankMessage(const std::shared_ptr<RankLink>& link,
                     denoised::v1::internal::RankMessage& msg);
  void OnRankStreamEnd(const std::shared_ptr<RankLink>& link, bool broken);
  absl::Status StoreSet(const denoised::v1::internal::StoreSetRequest& request);
  // Answers through `done`, now or when the key is set or the wait ends.
  void StoreGet(const denoised::v1::internal::StoreGetRequest& request,
                std::function<void(absl::StatusOr<denoised::v1::internal::StoreGetResponse>)>
                    done);
  absl::StatusOr<denoised::v1::internal::SliceStatus> SyncSlice(
      const denoised::v1::internal::SliceRequest& request);

  // Timers: store waits, queued deadlines, heartbeats (once a second),
  // unserved models and forgotten groups. Call about every 100 ms.
  void Tick();
  // Fails every request (UNAVAILABLE), releases the ranks, answers the
  // store's waiters; later calls are refused.
  void Shutdown();

  const GroupRegistry& registry() const { return registry_; }
  const RequestQueue& queue() const { return queue_; }
  size_t live_requests() const { return requests_.size(); }

 private:
  std::string NewRequestId();
  void Reject(RequestSink& sink, const std::string& model_label,
              absl::Status status);
  void Dispatch();
  void StartOnGroup(const std::shared_ptr<Request>& req, Group& group);
  void CancelRunning(Request& req, absl::StatusCode code);
  void FinishRequest(const std::shared_ptr<Request>& req, absl::Status status);
  void HandleStep(Group& group, const RankLink& link,
                  const denoised::v1::internal::StepReport& report);
  void HandleResult(Group& group, const RankLink& link,
                    denoised::v1::internal::JobResult& result);
  void OnGroupFailed(Group& group, std::shared_ptr<Request> running,
                     absl::Status status);
  void ExpireQueued();
  void ExpireUnserved();
  void UpdateHealthAndGauges();

  const CoreOptions options_;
  const Clock& clock_;
  CoordinatorMetrics& metrics_;
  std::function<void(bool)> set_serving_;
  Admission admission_;
  RequestQueue queue_;
  RendezvousStore store_;
  GroupRegistry registry_;

  bool shutting_down_ = false;
  bool serving_ = false;
  std::mt19937_64 rng_;
  std::map<std::string, std::shared_ptr<Request>> requests_;  // live, by id
  std::map<std::string, std::string> client_ids_;  // client id -> id
  std::map<std::string, int> running_;             // per model
  Clock::time_point last_heartbeat_check_;
};

// `text` cut to `max` bytes with a marker naming the original length, for
// echoing client input in error messages (kept well below gRPC's metadata
// limit). Never splits a UTF-8 sequence.
std::string Bounded(absl::string_view text, size_t max = 64);

}  // namespace dn::server

#endif  // DN_SERVER_COORDINATOR_CORE_H_
