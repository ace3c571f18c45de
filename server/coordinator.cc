#include "server/coordinator.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <future>
#include <limits>
#include <map>
#include <optional>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "comm/base/flags.h"
#include "comm/base/log.h"
#include "comm/base/status_macros.h"
#include "denoised/v1/denoiser.grpc.pb.h"
#include "denoised/v1/worker.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "server/auth.h"
#include "server/event_loop.h"
#include "server/group_slices.h"
#include "server/hello_validation.h"
#include "server/metrics.h"
#include "server/process.h"
#include "server/proto_convert.h"
#include "server/protocol.h"
#include "server/request_validation.h"
#include "server/stream_writer.h"
#include "server/version.h"

namespace dn::server {

namespace v1 = ::denoised::v1;
namespace vi = ::denoised::v1::internal;
namespace health = ::grpc::health::v1;

using Clock = std::chrono::steady_clock;

namespace {

constexpr char kDenoiserServiceName[] = "denoised.v1.Denoiser";

double SecondsSince(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

int64_t UnixMillisNow() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Constant-time comparison, so the secret cannot be guessed byte by byte.
bool SecretMatches(const std::string& expected, const std::string& given) {
  if (expected.empty()) return true;
  if (expected.size() != given.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    diff |= static_cast<unsigned char>(expected[i] ^ given[i]);
  }
  return diff == 0;
}

const char* StateLabel(v1::GroupState s) {
  switch (s) {
    case v1::GROUP_STATE_FORMING: return "forming";
    case v1::GROUP_STATE_READY: return "ready";
    case v1::GROUP_STATE_BUSY: return "busy";
    case v1::GROUP_STATE_FAILED: return "failed";
    default: return "unknown";
  }
}

// Whether a cancelled call was cancelled by its deadline. The client's own
// deadline timer usually fires first and cancels the call a moment before
// the server's copy of the deadline (computed from grpc-timeout on arrival)
// passes, so a cancellation this close to the deadline counts as one.
bool DeadlineReached(grpc::CallbackServerContext* ctx) {
  return ctx->deadline() <=
         std::chrono::system_clock::now() + std::chrono::milliseconds(500);
}

// A unary reactor whose work runs on the event loop; `fn` fills the
// response and returns the status. The reactor deletes itself.
class LoopUnaryReactor : public grpc::ServerUnaryReactor {
 public:
  LoopUnaryReactor(EventLoop& loop, std::function<grpc::Status()> fn) {
    loop.Post([this, fn = std::move(fn)] { Finish(fn()); });
  }
  void OnDone() override { delete this; }
};

}  // namespace

// ---------------------------------------------------------------------------
// Health
// ---------------------------------------------------------------------------

// grpc.health.v1.Health with the callback API. The overall status ("") and
// "denoised.v1.Denoiser" follow the coordinator: SERVING while at least one
// worker group is READY or BUSY.
class HealthService final : public health::Health::CallbackService {
 public:
  HealthService() {
    status_[""] = false;
    status_[kDenoiserServiceName] = false;
  }

  void SetServing(bool serving) {
    std::vector<std::shared_ptr<Watcher>> watchers;
    uint64_t version;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [name, s] : status_) s = serving;
      watchers = watchers_;
      version = ++version_;
    }
    for (auto& w : watchers) w->Update(Status(serving), version);
  }

  grpc::ServerUnaryReactor* Check(grpc::CallbackServerContext* ctx,
                                  const health::HealthCheckRequest* request,
                                  health::HealthCheckResponse* response) override {
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    std::lock_guard<std::mutex> lock(mu_);
    auto it = status_.find(request->service());
    if (it == status_.end()) {
      reactor->Finish(grpc::Status(grpc::StatusCode::NOT_FOUND,
                                   "unknown service " + request->service()));
    } else {
      response->set_status(Status(it->second));
      reactor->Finish(grpc::Status::OK);
    }
    return reactor;
  }

  grpc::ServerWriteReactor<health::HealthCheckResponse>* Watch(
      grpc::CallbackServerContext* /*ctx*/,
      const health::HealthCheckRequest* request) override {
    auto* reactor = new WatchReactor(this);
    health::HealthCheckResponse::ServingStatus current;
    uint64_t version;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = status_.find(request->service());
      current = it == status_.end()
                    ? health::HealthCheckResponse::SERVICE_UNKNOWN
                    : Status(it->second);
      if (it != status_.end()) watchers_.push_back(reactor->watcher());
      version = version_;
    }
    // A SetServing between the unlock and here has already sent a newer
    // status; the version keeps this older one from overwriting it.
    reactor->watcher()->Update(current, version);
    return reactor;
  }

 private:
  static health::HealthCheckResponse::ServingStatus Status(bool serving) {
    return serving ? health::HealthCheckResponse::SERVING
                   : health::HealthCheckResponse::NOT_SERVING;
  }

  class WatchReactor;
  // The thread-safe part of a Watch call; outlives the reactor.
  class Watcher {
   public:
    explicit Watcher(WatchReactor* r) : writer(r) {}
    // `version` orders the updates (SetServing's counter): an older one
    // arriving late is dropped.
    void Update(health::HealthCheckResponse::ServingStatus s, uint64_t version) {
      {
        std::lock_guard<std::mutex> lock(mu);
        if (version < last_version) return;
        last_version = version;
        if (s == last) return;
        last = s;
      }
      health::HealthCheckResponse msg;
      msg.set_status(s);
      writer.Write(std::move(msg));
    }
    std::mutex mu;
    int last = -1;
    uint64_t last_version = 0;
    OrderedWriter<WatchReactor, health::HealthCheckResponse> writer;
  };

  class WatchReactor
      : public grpc::ServerWriteReactor<health::HealthCheckResponse> {
   public:
    explicit WatchReactor(HealthService* service)
        : service_(service), watcher_(std::make_shared<Watcher>(this)) {}
    const std::shared_ptr<Watcher>& watcher() { return watcher_; }
    void OnWriteDone(bool ok) override { watcher_->writer.OnWriteDone(ok); }
    void OnCancel() override { watcher_->writer.Finish(grpc::Status::CANCELLED); }
    void OnDone() override {
      watcher_->writer.Detach();
      service_->RemoveWatcher(watcher_.get());
      delete this;
    }

   private:
    HealthService* service_;
    std::shared_ptr<Watcher> watcher_;
  };

  void RemoveWatcher(Watcher* w) {
    std::lock_guard<std::mutex> lock(mu_);
    watchers_.erase(std::remove_if(watchers_.begin(), watchers_.end(),
                                   [w](const auto& p) { return p.get() == w; }),
                    watchers_.end());
  }

 public:
  // Ends every Watch stream (server shutdown).
  void FinishWatchers() {
    std::vector<std::shared_ptr<Watcher>> watchers;
    {
      std::lock_guard<std::mutex> lock(mu_);
      watchers = watchers_;
    }
    for (auto& w : watchers) w->writer.Finish(grpc::Status::OK);
  }

 private:
  std::mutex mu_;
  std::map<std::string, bool> status_;
  uint64_t version_ = 0;  // SetServing calls so far
  std::vector<std::shared_ptr<Watcher>> watchers_;
};

// ---------------------------------------------------------------------------
// Sinks: where a request's events go (a Generate stream or a unary call).
// Thread-safe; the core calls them from the loop thread.
// ---------------------------------------------------------------------------

class RequestSink {
 public:
  virtual ~RequestSink() = default;
  virtual void Event(v1::GenerateEvent event) = 0;
  virtual void Result(v1::GenerateResult result) = 0;
  virtual void Finish(grpc::Status status) = 0;
  // Set by the core when the request is admitted (loop thread only).
  std::string request_id;
  // The call's context, for trailing metadata; set before the request is
  // posted and valid until Finish.
  grpc::CallbackServerContext* ctx = nullptr;
  void Trailer(const std::string& key, const std::string& value) {
    if (ctx != nullptr) ctx->AddTrailingMetadata(key, value);
  }
};

class GenerateReactor;
class StreamSink final : public RequestSink {
 public:
  explicit StreamSink(GenerateReactor* r) : writer(r) {}
  void Event(v1::GenerateEvent event) override { writer.Write(std::move(event)); }
  void Result(v1::GenerateResult result) override {
    v1::GenerateEvent event;
    *event.mutable_result() = std::move(result);
    writer.Write(std::move(event));
  }
  void Finish(grpc::Status status) override { writer.Finish(std::move(status)); }
  OrderedWriter<GenerateReactor, v1::GenerateEvent> writer;
};

class UnaryGenerateReactor;
class UnarySink final : public RequestSink {
 public:
  UnarySink(grpc::ServerUnaryReactor* r, v1::GenerateResult* response)
      : reactor_(r), response_(response) {}
  void Event(v1::GenerateEvent) override {}
  void Result(v1::GenerateResult result) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!finished_) *response_ = std::move(result);
  }
  void Finish(grpc::Status status) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) return;
      finished_ = true;
    }
    reactor_->Finish(status);
  }

 private:
  std::mutex mu_;
  bool finished_ = false;
  grpc::ServerUnaryReactor* reactor_;
  v1::GenerateResult* response_;
};

// ---------------------------------------------------------------------------
// Rank links: one per Attach stream.
// ---------------------------------------------------------------------------

class AttachReactor;
struct RankLink {
  explicit RankLink(AttachReactor* r) : writer(r) {}
  OrderedWriter<AttachReactor, vi::CoordinatorMessage> writer;
  // Loop-thread state.
  bool hello_done = false;
  bool ended = false;
  bool leaving = false;  // the rank sent Leave: its stream's end is no failure
  std::string group;
  int64_t generation = 0;
  int rank = -1;
  std::string peer;
  Clock::time_point last_seen = Clock::now();
  v1::RankInfo info;
};

// ---------------------------------------------------------------------------
// Core state (loop thread only)
// ---------------------------------------------------------------------------

struct Request {
  std::string id;
  std::string client_id;
  std::string model;
  ResolvedRequest resolved;
  int priority = 0;
  uint64_t seq = 0;
  Clock::time_point accepted;
  Clock::time_point started;
  int64_t deadline_unix_ms = 0;
  std::shared_ptr<RequestSink> sink;
  enum Phase { kQueued, kRunning, kDone } phase = kQueued;
  std::string group;  // while running
  int64_t group_generation = 0;
  int ranks = 0;
  // Cancellation asked for (CANCELLED / DEADLINE_EXCEEDED); OK = none.
  absl::StatusCode cancel_code = absl::StatusCode::kOk;
  int steps_seen = 0;
  double step_seconds_sum = 0;
};

struct Group {
  std::string name;
  std::string model;
  std::string config_hash;
  std::string backend;
  std::string store_prefix;
  int64_t generation = 0;
  int world_size = 0;
  v1::GroupState state = v1::GROUP_STATE_FORMING;
  std::vector<std::shared_ptr<RankLink>> ranks;
  std::vector<bool> ready;
  std::shared_ptr<Request> running;
  int results_pending = 0;
  double seconds_per_token_step = 0;
  // From the ranks' warm-up (Ready); kept when later requests update the
  // measured rate above.
  double warmup_seconds_per_token_step = 0;
  double mean_step_seconds = 0;
  Clock::time_point last_dispatch;
  std::string failure;
  Clock::time_point failed_at;  // when state became FAILED
  int64_t max_tokens = 0;       // its ranks' --max-tokens (0: no limit)
};

struct ModelEntry {
  v1::ModelInfo info;
  // (-priority, seq) -> request: begin() runs first.
  std::map<std::pair<int, uint64_t>, std::shared_ptr<Request>> queue;
  int running = 0;
  // Since when no group of the model is forming, ready or busy (Tick).
  std::optional<Clock::time_point> unserved_since;
  std::string last_failure;  // "worker group g failed: ..." (FailGroup)
};

struct StoreWaiter {
  std::string key;
  Clock::time_point deadline;
  grpc::ServerUnaryReactor* reactor;
  vi::StoreGetResponse* response;
};

class Coordinator::Impl {
 public:
  explicit Impl(const CoordinatorOptions& options)
      : options_(options),
        gate_(options.auth_tokens, options.max_streams_per_client),
        rng_(std::random_device{}()) {}

  absl::Status Start();
  void Shutdown();

  // --- entry points from reactors (any thread): post to the loop ---
  void PostSubmit(v1::GenerateRequest request,
                  std::shared_ptr<RequestSink> sink, int64_t deadline_ms) {
    loop_.Post([this, request = std::move(request), sink = std::move(sink),
                deadline_ms]() mutable {
      Submit(std::move(request), std::move(sink), deadline_ms);
    });
  }
  void PostClientGone(std::shared_ptr<RequestSink> sink, bool deadline) {
    loop_.Post([this, sink = std::move(sink), deadline] {
      ClientGone(*sink, deadline);
    });
  }
  void PostRankMessage(std::shared_ptr<RankLink> link,
                       std::shared_ptr<vi::RankMessage> msg) {
    loop_.Post([this, link = std::move(link), msg = std::move(msg)] {
      OnRankMessage(link, *msg);
    });
  }
  // A Generate call the ClientGate refused (token, per-client limit) is
  // counted like every other outcome.
  void PostGateRejection(std::string model, grpc::StatusCode code) {
    loop_.Post([this, model = std::move(model), code] {
      metrics_.CountRequest(models_.count(model) > 0 ? model : kUnknownModelLabel,
                            StatusCodeName(code));
    });
  }
  void PostRankStreamEnd(std::shared_ptr<RankLink> link, bool broken) {
    loop_.Post([this, link = std::move(link), broken] {
      OnRankStreamEnd(link, broken);
    });
  }

  EventLoop& loop() { return loop_; }
  const CoordinatorOptions& options() const { return options_; }
  ClientGate& gate() { return gate_; }

  // --- loop-thread operations ---
  grpc::Status Cancel(const v1::CancelRequest& req, v1::CancelResponse* resp);
  grpc::Status ListModels(v1::ListModelsResponse* resp);
  grpc::Status GetServerInfo(v1::ServerInfo* resp);
  grpc::Status StoreSet(const vi::StoreSetRequest& req);
  // Returns true when the call was answered now; false when it waits.
  bool StoreGet(const vi::StoreGetRequest& req, vi::StoreGetResponse* resp,
                grpc::ServerUnaryReactor* reactor, grpc::Status* status);
  // A launcher's slice of a group (server/group_slices.h).
  grpc::Status SyncSlice(const vi::SliceRequest& req, vi::SliceStatus* resp);

  std::string address_, worker_address_, metrics_address_;

 private:
  void Submit(v1::GenerateRequest request, std::shared_ptr<RequestSink> sink,
              int64_t deadline_ms);
  void ClientGone(RequestSink& sink, bool deadline);
  void OnRankMessage(const std::shared_ptr<RankLink>& link,
                     vi::RankMessage& msg);
  void OnRankStreamEnd(const std::shared_ptr<RankLink>& link, bool broken);
  void HandleHello(const std::shared_ptr<RankLink>& link, const vi::Hello& hello);
  void HandleResult(Group& group, const RankLink& link,
                    vi::JobResult& result);
  void HandleStep(Group& group, const RankLink& link,
                  const vi::StepReport& report);
  void Dispatch();
  void StartOnGroup(const std::shared_ptr<Request>& req, Group& group);
  void CancelRunning(Request& req, absl::StatusCode code);
  void FinishRequest(const std::shared_ptr<Request>& req, grpc::Status status);
  // Marks the group FAILED, fails its running request with UNAVAILABLE and
  // closes its rank streams (with OK when the group is leaving cleanly).
  void FailGroup(Group& group, const std::string& reason, bool leaving = false);
  // Tick, once a second: forgets FAILED groups and ends queued requests of
  // models without a live group, after options_.unserved_timeout_ms.
  void ExpireUnserved(Clock::time_point now);
  void CloseLink(RankLink& link, grpc::Status status);
  void RejectRequest(RequestSink& sink, const std::string& model_label,
                     grpc::Status status);
  Group* FindGroup(const RankLink& link);
  // The least recently used READY group of `model` that takes `tokens`.
  Group* IdleGroupFor(const std::string& model, int64_t tokens);
  // The largest max_tokens over the model's live groups (groups may be
  // started with different --max-tokens); the model entry's when none.
  int64_t ModelMaxTokens(const std::string& model) const;
  bool ModelServed(const std::string& model) const;
  void UpdateHealthAndGauges();
  void Tick();
  std::string NewRequestId();
  double EstimateSeconds(const Request& req) const;
  double BestSecondsPerTokenStep(const std::string& model) const;
  double OptimisticSeconds(const Request& req) const;
  double EstimateWaitSeconds(const std::string& model, int priority) const;
  int64_t RetryAfterMillis(const std::string& model) const;

  CoordinatorOptions options_;
  ClientGate gate_;
  EventLoop loop_;
  CoordinatorMetrics metrics_;
  HealthService health_;
  std::unique_ptr<MetricsEndpoint> metrics_endpoint_;
  std::unique_ptr<v1::Denoiser::CallbackService> denoiser_service_;
  std::unique_ptr<vi::WorkerControl::CallbackService> worker_service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<grpc::Server> worker_server_;
  bool shut_down_ = false;  // Shutdown() ran (caller thread)

  // Loop-thread state.
  bool shutting_down_ = false;
  std::mt19937_64 rng_;
  uint64_t next_seq_ = 0;
  std::map<std::string, ModelEntry> models_;
  std::map<std::string, std::unique_ptr<Group>> groups_;
  std::map<std::string, std::shared_ptr<Request>> requests_;  // live, by id
  std::map<std::string, std::string> client_ids_;  // client id -> id
  std::map<std::string, std::string> store_;
  std::vector<StoreWaiter> store_waiters_;
  SliceRegistry slices_;
  std::set<std::string> known_model_labels_;
  bool serving_ = false;
  Clock::time_point last_heartbeat_check_ = Clock::now();
};

// ---------------------------------------------------------------------------
// Reactors
// ---------------------------------------------------------------------------

class GenerateReactor final
    : public grpc::ServerWriteReactor<v1::GenerateEvent> {
 public:
  GenerateReactor(Coordinator::Impl* core, grpc::CallbackServerContext* ctx,
                  const v1::GenerateRequest* request, ClientGate::Slot slot)
      : core_(core),
        ctx_(ctx),
        sink_(std::make_shared<StreamSink>(this)),
        slot_(std::move(slot)) {
    sink_->ctx = ctx;
    core_->PostSubmit(*request, sink_, DeadlineUnixMillis(ctx));
  }
  void OnWriteDone(bool ok) override { sink_->writer.OnWriteDone(ok); }
  void OnCancel() override {
    core_->PostClientGone(sink_, DeadlineReached(ctx_));
  }
  void OnDone() override {
    sink_->writer.Detach();
    delete this;
  }

  static int64_t DeadlineUnixMillis(grpc::CallbackServerContext* ctx) {
    const auto d = ctx->deadline();
    if (d >= std::chrono::system_clock::time_point::max() -
                 std::chrono::hours(24 * 365)) {
      return 0;
    }
    return std::chrono::duration_cast<std::chrono::milliseconds>(
               d.time_since_epoch())
        .count();
  }

 private:
  Coordinator::Impl* core_;
  grpc::CallbackServerContext* ctx_;
  std::shared_ptr<StreamSink> sink_;
  ClientGate::Slot slot_;  // released when the call is done
};

class UnaryGenerateReactor final : public grpc::ServerUnaryReactor {
 public:
  UnaryGenerateReactor(Coordinator::Impl* core,
                       grpc::CallbackServerContext* ctx,
                       const v1::GenerateRequest* request,
                       v1::GenerateResult* response, ClientGate::Slot slot)
      : core_(core),
        ctx_(ctx),
        sink_(std::make_shared<UnarySink>(this, response)),
        slot_(std::move(slot)) {
    sink_->ctx = ctx;
    core_->PostSubmit(*request, sink_,
                      GenerateReactor::DeadlineUnixMillis(ctx));
  }
  void OnCancel() override {
    core_->PostClientGone(sink_, DeadlineReached(ctx_));
  }
  void OnDone() override { delete this; }

 private:
  Coordinator::Impl* core_;
  grpc::CallbackServerContext* ctx_;
  std::shared_ptr<UnarySink> sink_;
  ClientGate::Slot slot_;  // released when the call is done
};

class AttachReactor final
    : public grpc::ServerBidiReactor<vi::RankMessage, vi::CoordinatorMessage> {
 public:
  AttachReactor(Coordinator::Impl* core, grpc::CallbackServerContext* ctx)
      : core_(core), ctx_(ctx), link_(std::make_shared<RankLink>(this)) {
    link_->peer = ctx->peer();
    StartRead(&in_);
  }
  void OnReadDone(bool ok) override {
    if (!ok) {
      // A half-close after the rank's Leave is a clean leave; anything else
      // (no Leave, a cancelled call) is a broken stream.
      core_->PostRankStreamEnd(link_, ctx_->IsCancelled());
      return;
    }
    auto msg = std::make_shared<vi::RankMessage>(std::move(in_));
    in_.Clear();
    core_->PostRankMessage(link_, std::move(msg));
    StartRead(&in_);
  }
  void OnWriteDone(bool ok) override { link_->writer.OnWriteDone(ok); }
  void OnCancel() override { core_->PostRankStreamEnd(link_, true); }
  void OnDone() override {
    link_->writer.Detach();
    delete this;
  }

 private:
  Coordinator::Impl* core_;
  grpc::CallbackServerContext* ctx_;
  std::shared_ptr<RankLink> link_;
  vi::RankMessage in_;
};

// Every Denoiser call passes the ClientGate first (bearer token, per-client
// generation limit); a rejected call finishes at once with its status.
class DenoiserServiceImpl final : public v1::Denoiser::CallbackService {
 public:
  explicit DenoiserServiceImpl(Coordinator::Impl* core) : core_(core) {}

  grpc::ServerWriteReactor<v1::GenerateEvent>* Generate(
      grpc::CallbackServerContext* ctx,
      const v1::GenerateRequest* request) override {
    ClientGate::Slot slot;
    if (grpc::Status s = core_->gate().Admit(*ctx, true, &slot); !s.ok()) {
      core_->PostGateRejection(request->model(), s.error_code());
      return new RejectedWriteReactor<v1::GenerateEvent>(s);
    }
    return new GenerateReactor(core_, ctx, request, std::move(slot));
  }
  grpc::ServerUnaryReactor* GenerateUnary(
      grpc::CallbackServerContext* ctx, const v1::GenerateRequest* request,
      v1::GenerateResult* response) override {
    ClientGate::Slot slot;
    if (grpc::Status s = core_->gate().Admit(*ctx, true, &slot); !s.ok()) {
      core_->PostGateRejection(request->model(), s.error_code());
      return Reject(ctx, s);
    }
    return new UnaryGenerateReactor(core_, ctx, request, response, std::move(slot));
  }
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* ctx,
                                   const v1::CancelRequest* request,
                                   v1::CancelResponse* response) override {
    if (grpc::Status s = Authenticate(ctx); !s.ok()) return Reject(ctx, s);
    return new LoopUnaryReactor(core_->loop(), [this, request, response] {
      return core_->Cancel(*request, response);
    });
  }
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* ctx,
                                       const v1::ListModelsRequest*,
                                       v1::ListModelsResponse* response) override {
    if (grpc::Status s = Authenticate(ctx); !s.ok()) return Reject(ctx, s);
    return new LoopUnaryReactor(core_->loop(), [this, response] {
      return core_->ListModels(response);
    });
  }
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* ctx,
                                          const v1::GetServerInfoRequest*,
                                          v1::ServerInfo* response) override {
    if (grpc::Status s = Authenticate(ctx); !s.ok()) return Reject(ctx, s);
    return new LoopUnaryReactor(core_->loop(), [this, response] {
      return core_->GetServerInfo(response);
    });
  }

 private:
  grpc::Status Authenticate(grpc::CallbackServerContext* ctx) {
    ClientGate::Slot unused;
    return core_->gate().Admit(*ctx, false, &unused);
  }
  static grpc::ServerUnaryReactor* Reject(grpc::CallbackServerContext* ctx,
                                          const grpc::Status& status) {
    grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
    r->Finish(status);
    return r;
  }

  Coordinator::Impl* core_;
};

class StoreGetReactor final : public grpc::ServerUnaryReactor {
 public:
  StoreGetReactor(Coordinator::Impl* core, const vi::StoreGetRequest* request,
                  vi::StoreGetResponse* response) {
    core->loop().Post([this, core, request, response] {
      grpc::Status status;
      if (core->StoreGet(*request, response, this, &status)) Finish(status);
    });
  }
  void OnDone() override { delete this; }
};

class WorkerControlServiceImpl final
    : public vi::WorkerControl::CallbackService {
 public:
  explicit WorkerControlServiceImpl(Coordinator::Impl* core) : core_(core) {}

  grpc::ServerBidiReactor<vi::RankMessage, vi::CoordinatorMessage>* Attach(
      grpc::CallbackServerContext* ctx) override {
    return new AttachReactor(core_, ctx);
  }
  grpc::ServerUnaryReactor* StoreSet(grpc::CallbackServerContext*,
                                     const vi::StoreSetRequest* request,
                                     vi::StoreSetResponse*) override {
    return new LoopUnaryReactor(core_->loop(), [this, request] {
      return core_->StoreSet(*request);
    });
  }
  grpc::ServerUnaryReactor* StoreGet(grpc::CallbackServerContext*,
                                     const vi::StoreGetRequest* request,
                                     vi::StoreGetResponse* response) override {
    return new StoreGetReactor(core_, request, response);
  }
  grpc::ServerUnaryReactor* SyncSlice(grpc::CallbackServerContext*,
                                      const vi::SliceRequest* request,
                                      vi::SliceStatus* response) override {
    return new LoopUnaryReactor(core_->loop(), [this, request, response] {
      return core_->SyncSlice(*request, response);
    });
  }

 private:
  Coordinator::Impl* core_;
};

// ---------------------------------------------------------------------------
// Start / Shutdown
// ---------------------------------------------------------------------------

namespace {

void ApplyServerArgs(grpc::ServerBuilder& b, int64_t max_message_bytes) {
  const int max = static_cast<int>(
      std::min<int64_t>(max_message_bytes, std::numeric_limits<int>::max()));
  b.SetMaxReceiveMessageSize(max);
  b.SetMaxSendMessageSize(max);
  // Ping idle connections so dead peers are noticed; let ranks ping us.
  b.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 20000);
  b.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  b.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  b.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                       5000);
  b.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  // gRPC binds with SO_REUSEPORT by default on Linux: a second server on a
  // port already in use would then start fine and take a share of the new
  // connections. A port in use is an error (--listen: cannot serve ...).
  b.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
}

std::string BoundAddress(const std::string& listen, int port) {
  const size_t colon = listen.rfind(':');
  return absl::StrCat(listen.substr(0, colon), ":", port);
}

}  // namespace

absl::Status Coordinator::Impl::Start() {
  if (options_.max_queue < 0) {
    return absl::InvalidArgumentError("--max-queue: must be >= 0");
  }
  if (options_.max_message_bytes < (int64_t{1} << 20)) {
    return absl::InvalidArgumentError("--max-message-mb: must be >= 1");
  }
  if (options_.max_streams_per_client < 0) {
    return absl::InvalidArgumentError("--max-streams-per-client: must be >= 0");
  }
  DN_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> public_creds,
                      MakeServerCredentials(options_.tls, false, ""));
  DN_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> worker_creds,
                      MakeServerCredentials(options_.worker_tls, true, "worker-"));
  DN_ASSIGN_OR_RETURN(metrics_endpoint_,
                      MetricsEndpoint::Start(options_.metrics_listen,
                                             metrics_.registry));
  metrics_address_ = metrics_endpoint_->address();

  loop_.Start([this] { Tick(); }, std::chrono::milliseconds(100));

  static std::once_flag reflection_once;
  std::call_once(reflection_once,
                 [] { grpc::reflection::InitProtoReflectionServerBuilderPlugin(); });

  denoiser_service_ = std::make_unique<DenoiserServiceImpl>(this);
  worker_service_ = std::make_unique<WorkerControlServiceImpl>(this);
  // "HOST:0" twice means two free ports, not one.
  const bool shared_port =
      options_.worker_listen.empty() ||
      (options_.worker_listen == options_.listen &&
       !absl::EndsWith(options_.listen, ":0"));
  if (shared_port && options_.worker_tls.enabled()) {
    loop_.Stop();
    return absl::InvalidArgumentError(
        "--worker-tls-*: need a separate --worker-listen port");
  }

  int port = 0;
  grpc::ServerBuilder b;
  b.AddListeningPort(options_.listen, public_creds, &port);
  ApplyServerArgs(b, options_.max_message_bytes);
  b.RegisterService(denoiser_service_.get());
  b.RegisterService(&health_);
  if (shared_port) b.RegisterService(worker_service_.get());
  server_ = b.BuildAndStart();
  if (server_ == nullptr || port == 0) {
    loop_.Stop();
    return absl::UnavailableError(
        absl::StrCat("--listen: cannot serve gRPC on ", options_.listen));
  }
  address_ = BoundAddress(options_.listen, port);
  worker_address_ = address_;
  if (!shared_port) {
    int wport = 0;
    grpc::ServerBuilder wb;
    wb.AddListeningPort(options_.worker_listen, worker_creds, &wport);
    ApplyServerArgs(wb, options_.max_message_bytes);
    wb.RegisterService(worker_service_.get());
    worker_server_ = wb.BuildAndStart();
    if (worker_server_ == nullptr || wport == 0) {
      server_->Shutdown(std::chrono::system_clock::now());
      loop_.Stop();
      return absl::UnavailableError(absl::StrCat(
          "--worker-listen: cannot serve gRPC on ", options_.worker_listen));
    }
    worker_address_ = BoundAddress(options_.worker_listen, wport);
  }
  return absl::OkStatus();
}

void Coordinator::Impl::Shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  // Fail the work and release the ranks on the loop, then wait for it.
  std::promise<void> done;
  loop_.Post([this, &done] {
    shutting_down_ = true;
    serving_ = false;
    health_.SetServing(false);
    std::vector<std::shared_ptr<Request>> live;
    for (auto& [id, r] : requests_) live.push_back(r);
    for (auto& r : live) {
      FinishRequest(r, grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                    "the coordinator is shutting down"));
    }
    for (auto& [name, g] : groups_) {
      for (auto& link : g->ranks) {
        if (link == nullptr || link->ended) continue;
        vi::CoordinatorMessage m;
        m.mutable_shutdown()->set_reason("coordinator shutting down");
        link->writer.Write(std::move(m));
        CloseLink(*link, grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                      "coordinator shutting down"));
      }
    }
    for (auto& w : store_waiters_) {
      w.response->set_found(false);
      w.reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                     "coordinator shutting down"));
    }
    store_waiters_.clear();
    done.set_value();
  });
  done.get_future().wait();
  DN_VLOG << "shutdown: work failed, ranks released";
  health_.FinishWatchers();
  // Every call has been answered above; the short deadline only lets the
  // final statuses go out (an idle client connection would otherwise hold
  // the shutdown until the deadline).
  const auto deadline =
      std::chrono::system_clock::now() + std::chrono::milliseconds(500);
  if (worker_server_) worker_server_->Shutdown(deadline);
  if (server_) server_->Shutdown(deadline);
  DN_VLOG << "shutdown: servers stopped";
  loop_.Stop();
  if (worker_server_) worker_server_->Wait();
  if (server_) server_->Wait();
  DN_VLOG << "shutdown: done";
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

std::string Coordinator::Impl::NewRequestId() {
  static constexpr char kHex[] = "0123456789abcdef";
  uint64_t v = rng_();
  std::string id = "req-";
  for (int i = 0; i < 16; ++i) {
    id.push_back(kHex[v & 15]);
    v >>= 4;
  }
  return id;
}

bool Coordinator::Impl::ModelServed(const std::string& model) const {
  for (const auto& [name, g] : groups_) {
    if (g->model == model) return true;
  }
  return false;
}

void Coordinator::Impl::RejectRequest(RequestSink& sink,
                                      const std::string& model_label,
                                      grpc::Status status) {
  metrics_.CountRequest(model_label, StatusCodeName(status.error_code()));
  sink.Finish(std::move(status));
}

void Coordinator::Impl::Submit(v1::GenerateRequest request,
                               std::shared_ptr<RequestSink> sink,
                               int64_t deadline_ms) {
  if (shutting_down_) {
    RejectRequest(*sink,
                  models_.count(request.model()) > 0 ? request.model()
                                                     : kUnknownModelLabel,
                  grpc::Status(grpc::StatusCode::UNAVAILABLE,
                               "the coordinator is shutting down"));
    return;
  }
  if (request.model().empty()) {
    RejectRequest(*sink, kUnknownModelLabel,
                  grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                               "model: required (see ListModels)"));
    return;
  }
  auto mit = models_.find(request.model());
  if (mit == models_.end() || !ModelServed(request.model())) {
    std::vector<std::string> names;
    for (const auto& [name, m] : models_) {
      if (ModelServed(name)) names.push_back(name);
    }
    RejectRequest(
        *sink, kUnknownModelLabel,
        grpc::Status(grpc::StatusCode::NOT_FOUND,
                     absl::StrCat("model '", request.model(),
                                  "' is not served by any worker group "
                                  "(served: ",
                                  names.empty() ? "none" : absl::StrJoin(names, ", "),
                                  ")")));
    return;
  }
  ModelEntry& model = mit->second;
  v1::ModelInfo limits = model.info;
  limits.set_max_tokens(ModelMaxTokens(request.model()));
  // The request's tensors move into the resolved job (no copy).
  absl::StatusOr<ResolvedRequest> resolved = ValidateRequest(std::move(request), limits);
  if (!resolved.ok()) {
    RejectRequest(*sink, mit->first, ToGrpcStatus(resolved.status()));
    return;
  }
  const std::string& client_id = resolved->request.client_request_id();
  if (!client_id.empty() && client_ids_.count(client_id) > 0) {
    RejectRequest(*sink, mit->first,
                  grpc::Status(grpc::StatusCode::ALREADY_EXISTS,
                               absl::StrCat("client_request_id '", client_id,
                                            "' is already live as ",
                                            client_ids_.at(client_id))));
    return;
  }
  if (IdleGroupFor(mit->first, resolved->tokens) == nullptr &&
      static_cast<int>(model.queue.size()) >= options_.max_queue) {
    const int64_t retry_ms = RetryAfterMillis(mit->first);
    sink->Trailer(kRetryAfterMetadata, absl::StrCat(retry_ms));
    RejectRequest(
        *sink, mit->first,
        grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                     absl::StrCat("the queue for model '", mit->first,
                                  "' is full (", model.queue.size(),
                                  " waiting, --max-queue ", options_.max_queue,
                                  "); retry after ", retry_ms, " ms (",
                                  kRetryAfterMetadata, " trailer)")));
    return;
  }

  auto req = std::make_shared<Request>();
  req->id = NewRequestId();
  req->client_id = client_id;
  req->model = mit->first;
  req->resolved = *std::move(resolved);
  req->priority = req->resolved.request.priority();
  if (options_.admission_by_cost && deadline_ms > 0) {
    const double run = OptimisticSeconds(*req);
    if (run > 0) {
      const double wait = EstimateWaitSeconds(req->model, req->priority);
      const double left = static_cast<double>(deadline_ms - UnixMillisNow()) / 1e3;
      if (wait + run > left) {
        RejectRequest(
            *sink, mit->first,
            grpc::Status(
                grpc::StatusCode::DEADLINE_EXCEEDED,
                absl::StrFormat(
                    "deadline: rejected at admission: estimated %.3f s (%.3f s "
                    "to run: %d tokens x %d steps x %.3g s per token-step, "
                    "plus %.3f s for the work ahead) exceeds the %.3f s left "
                    "before the deadline",
                    wait + run, run, static_cast<int>(req->resolved.tokens),
                    req->resolved.request.steps(), BestSecondsPerTokenStep(req->model),
                    wait, left)));
        return;
      }
    }
  }
  req->seq = next_seq_++;
  req->accepted = Clock::now();
  req->deadline_unix_ms = deadline_ms;
  req->sink = std::move(sink);
  req->sink->request_id = req->id;
  requests_[req->id] = req;
  if (!req->client_id.empty()) client_ids_[req->client_id] = req->id;
  const auto key = std::make_pair(-req->priority, req->seq);
  model.queue[key] = req;

  v1::GenerateEvent accepted;
  accepted.mutable_accepted()->set_request_id(req->id);
  accepted.mutable_accepted()->set_queue_position(static_cast<int>(
      std::distance(model.queue.begin(), model.queue.find(key))));
  accepted.mutable_accepted()->set_estimated_seconds(EstimateSeconds(*req));
  req->sink->Event(std::move(accepted));
  DN_VLOG << "request " << req->id << " accepted for " << req->model;
  Dispatch();
  UpdateHealthAndGauges();
}

double Coordinator::Impl::EstimateSeconds(const Request& req) const {
  double best = 0;
  for (const auto& [name, g] : groups_) {
    if (g->model != req.model || g->seconds_per_token_step <= 0) continue;
    if (g->state != v1::GROUP_STATE_READY && g->state != v1::GROUP_STATE_BUSY) {
      continue;
    }
    if (best == 0 || g->seconds_per_token_step < best) {
      best = g->seconds_per_token_step;
    }
  }
  return best * static_cast<double>(req.resolved.tokens) *
         req.resolved.request.steps();
}

double Coordinator::Impl::BestSecondsPerTokenStep(const std::string& model) const {
  // The lowest rate known of any ready group: the warm-up's or the last
  // request's (a small request's per-token rate is inflated by the fixed
  // cost of a step, so the minimum keeps the estimate optimistic).
  double best = 0;
  for (const auto& [name, g] : groups_) {
    if (g->model != model) continue;
    if (g->state != v1::GROUP_STATE_READY && g->state != v1::GROUP_STATE_BUSY) {
      continue;
    }
    for (double rate : {g->seconds_per_token_step, g->warmup_seconds_per_token_step}) {
      if (rate > 0 && (best == 0 || rate < best)) best = rate;
    }
  }
  return best;
}

double Coordinator::Impl::OptimisticSeconds(const Request& req) const {
  return BestSecondsPerTokenStep(req.model) *
         static_cast<double>(req.resolved.tokens) * req.resolved.request.steps();
}

double Coordinator::Impl::EstimateWaitSeconds(const std::string& model,
                                              int priority) const {
  // Optimistic: the work ahead (what is left of the running requests, and
  // the queued ones of the same or higher priority) spread evenly over the
  // model's ready groups, each at the fastest group's rate. An idle group
  // means no wait.
  int groups = 0;
  double ahead = 0;
  for (const auto& [name, g] : groups_) {
    if (g->model != model) continue;
    if (g->state == v1::GROUP_STATE_READY) return 0;
    if (g->state != v1::GROUP_STATE_BUSY) continue;
    ++groups;
    if (g->running) {
      ahead += std::max(0.0, OptimisticSeconds(*g->running) -
                                 SecondsSince(g->running->started));
    }
  }
  if (groups == 0) return 0;
  auto mit = models_.find(model);
  if (mit != models_.end()) {
    for (const auto& [key, q] : mit->second.queue) {
      if (q->priority >= priority) ahead += OptimisticSeconds(*q);
    }
  }
  return ahead / groups;
}

int64_t Coordinator::Impl::RetryAfterMillis(const std::string& model) const {
  // When the first running request of the model should end; 1 s if unknown.
  double soonest = -1;
  for (const auto& [name, g] : groups_) {
    if (g->model != model || g->state != v1::GROUP_STATE_BUSY || !g->running) {
      continue;
    }
    const double est = OptimisticSeconds(*g->running);
    if (est <= 0) continue;
    const double left = std::max(0.0, est - SecondsSince(g->running->started));
    if (soonest < 0 || left < soonest) soonest = left;
  }
  if (soonest < 0) return 1000;
  return std::clamp<int64_t>(static_cast<int64_t>(soonest * 1e3), 100, 30000);
}

int64_t Coordinator::Impl::ModelMaxTokens(const std::string& model) const {
  int64_t most = -1;
  for (const auto& [name, g] : groups_) {
    if (g->model != model || g->state == v1::GROUP_STATE_FAILED) continue;
    if (g->max_tokens <= 0) return 0;  // one group without a limit
    most = std::max(most, g->max_tokens);
  }
  if (most >= 0) return most;
  auto it = models_.find(model);
  return it == models_.end() ? 0 : it->second.info.max_tokens();
}

Group* Coordinator::Impl::IdleGroupFor(const std::string& model, int64_t tokens) {
  Group* best = nullptr;
  for (auto& [name, g] : groups_) {
    if (g->model != model || g->state != v1::GROUP_STATE_READY) continue;
    if (g->max_tokens > 0 && tokens > g->max_tokens) continue;  // too big for it
    if (best == nullptr || g->last_dispatch < best->last_dispatch) {
      best = g.get();
    }
  }
  return best;
}

void Coordinator::Impl::Dispatch() {
  if (shutting_down_) return;
  for (auto& [name, model] : models_) {
    while (!model.queue.empty()) {
      // In order: the head waits for a group that takes it (no overtaking).
      std::shared_ptr<Request> req = model.queue.begin()->second;
      Group* group = IdleGroupFor(name, req->resolved.tokens);
      if (group == nullptr) break;
      if (req->deadline_unix_ms > 0 && UnixMillisNow() >= req->deadline_unix_ms) {
        req->cancel_code = absl::StatusCode::kDeadlineExceeded;
        FinishRequest(req, grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                                        "deadline exceeded in the queue"));
        continue;
      }
      model.queue.erase(model.queue.begin());
      StartOnGroup(req, *group);
    }
  }
}

void Coordinator::Impl::StartOnGroup(const std::shared_ptr<Request>& req,
                                     Group& group) {
  req->phase = Request::kRunning;
  req->started = Clock::now();
  req->group = group.name;
  req->group_generation = group.generation;
  req->ranks = group.world_size;
  group.state = v1::GROUP_STATE_BUSY;
  group.running = req;
  group.results_pending = group.world_size;
  group.last_dispatch = Clock::now();
  models_[req->model].running++;
  const double queued = SecondsSince(req->accepted);
  metrics_.ObserveQueueDuration(req->model, queued);

  v1::GenerateEvent started;
  started.mutable_started()->set_worker_group(group.name);
  started.mutable_started()->set_ranks(group.world_size);
  started.mutable_started()->set_queue_seconds(queued);
  req->sink->Event(std::move(started));
  UpdateHealthAndGauges();

  // One message for every rank: the job (its tensors moved in at
  // validation) moves into it and the ranks' streams share it.
  auto m = std::make_shared<vi::CoordinatorMessage>();
  vi::Job* job = m->mutable_job();
  *job = std::move(req->resolved.job);
  job->set_request_id(req->id);
  job->set_deadline_unix_millis(req->deadline_unix_ms);
  for (auto& link : group.ranks) link->writer.Write(m);
  DN_LOG(INFO) << "request " << req->id << " -> group " << group.name
               << " (" << group.world_size << " ranks, latent "
               << LatentString(req->resolved.latent) << ", "
               << req->resolved.request.steps() << " steps, "
               << req->resolved.tensor_bytes << " tensor bytes in one shared job)";
  // A cancel that raced with dispatch.
  if (req->cancel_code != absl::StatusCode::kOk) {
    const absl::StatusCode code = req->cancel_code;
    req->cancel_code = absl::StatusCode::kOk;
    CancelRunning(*req, code);
  }
}

void Coordinator::Impl::CancelRunning(Request& req, absl::StatusCode code) {
  if (req.cancel_code != absl::StatusCode::kOk) return;  // already asked
  req.cancel_code = code;
  auto it = groups_.find(req.group);
  if (it == groups_.end() || it->second->generation != req.group_generation) {
    return;
  }
  vi::CoordinatorMessage m;
  m.mutable_cancel()->set_request_id(req.id);
  m.mutable_cancel()->set_status_code(static_cast<int>(code));
  for (auto& link : it->second->ranks) link->writer.Write(m);
  DN_LOG(INFO) << "request " << req.id << ": "
               << StatusCodeName(static_cast<int>(code))
               << ", stopping group " << req.group;
}

void Coordinator::Impl::FinishRequest(const std::shared_ptr<Request>& req,
                                      grpc::Status status) {
  if (req->phase == Request::kDone) return;
  if (req->phase == Request::kQueued) {
    auto mit = models_.find(req->model);
    if (mit != models_.end()) {
      mit->second.queue.erase(std::make_pair(-req->priority, req->seq));
    }
  } else if (req->phase == Request::kRunning) {
    models_[req->model].running--;
  }
  req->phase = Request::kDone;
  requests_.erase(req->id);
  if (!req->client_id.empty()) client_ids_.erase(req->client_id);
  // A call the client abandoned ends with the code it abandoned it for.
  if (req->cancel_code != absl::StatusCode::kOk && !status.ok() &&
      status.error_code() != grpc::StatusCode::UNAVAILABLE) {
    status = grpc::Status(static_cast<grpc::StatusCode>(req->cancel_code),
                          status.error_message());
  }
  metrics_.CountRequest(req->model, StatusCodeName(status.error_code()));
  metrics_.ObserveRequestDuration(req->model, SecondsSince(req->accepted));
  DN_LOG(INFO) << "request " << req->id << " finished: "
               << StatusCodeName(status.error_code())
               << (status.ok() ? "" : " (" + status.error_message() + ")");
  req->sink->Finish(std::move(status));
  UpdateHealthAndGauges();
}

void Coordinator::Impl::ClientGone(RequestSink& sink, bool deadline) {
  auto it = requests_.find(sink.request_id);
  if (sink.request_id.empty() || it == requests_.end()) {
    // Not admitted (or already finished): just make sure the call ends.
    sink.Finish(grpc::Status::CANCELLED);
    return;
  }
  std::shared_ptr<Request> req = it->second;
  const absl::StatusCode code = deadline ? absl::StatusCode::kDeadlineExceeded
                                         : absl::StatusCode::kCancelled;
  if (req->phase == Request::kQueued) {
    req->cancel_code = code;
    FinishRequest(req, grpc::Status(static_cast<grpc::StatusCode>(code),
                                    deadline ? "deadline exceeded in the queue"
                                             : "cancelled by the client"));
    Dispatch();
  } else if (req->phase == Request::kRunning) {
    CancelRunning(*req, code);
  }
}

grpc::Status Coordinator::Impl::Cancel(const v1::CancelRequest& in,
                                       v1::CancelResponse* resp) {
  std::string id = in.request_id();
  if (auto c = client_ids_.find(id); c != client_ids_.end()) id = c->second;
  auto it = requests_.find(id);
  resp->set_found(it != requests_.end());
  if (it == requests_.end()) return grpc::Status::OK;
  std::shared_ptr<Request> req = it->second;
  if (req->phase == Request::kQueued) {
    req->cancel_code = absl::StatusCode::kCancelled;
    FinishRequest(req, grpc::Status(grpc::StatusCode::CANCELLED,
                                    "cancelled by a Cancel call"));
  } else if (req->phase == Request::kRunning) {
    CancelRunning(*req, absl::StatusCode::kCancelled);
  }
  return grpc::Status::OK;
}

// ---------------------------------------------------------------------------
// Ranks
// ---------------------------------------------------------------------------

Group* Coordinator::Impl::FindGroup(const RankLink& link) {
  auto it = groups_.find(link.group);
  if (it == groups_.end() || it->second->generation != link.generation) {
    return nullptr;
  }
  return it->second.get();
}

void Coordinator::Impl::CloseLink(RankLink& link, grpc::Status status) {
  link.writer.Finish(std::move(status));
}

void Coordinator::Impl::OnRankMessage(const std::shared_ptr<RankLink>& link,
                                      vi::RankMessage& msg) {
  if (link->ended) return;
  link->last_seen = Clock::now();
  if (!link->hello_done) {
    if (msg.msg_case() != vi::RankMessage::kHello) {
      CloseLink(*link, grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                                    "the first message must be Hello"));
      link->ended = true;
      return;
    }
    HandleHello(link, msg.hello());
    return;
  }
  Group* group = FindGroup(*link);
  if (group == nullptr || group->state == v1::GROUP_STATE_FAILED) {
    // A rank of a replaced or failed generation: it is being closed.
    return;
  }
  switch (msg.msg_case()) {
    case vi::RankMessage::kHeartbeat:
      break;
    case vi::RankMessage::kLeave:
      DN_LOG(INFO) << "rank " << link->rank << " of group " << group->name
                   << " is leaving: " << msg.leave().reason();
      link->leaving = true;
      break;
    case vi::RankMessage::kReady: {
      if (group->state != v1::GROUP_STATE_FORMING) break;
      group->ready[static_cast<size_t>(link->rank)] = true;
      if (link->rank == 0) {
        group->seconds_per_token_step = msg.ready().seconds_per_token_step();
        group->warmup_seconds_per_token_step =
            std::max(group->warmup_seconds_per_token_step,
                     msg.ready().seconds_per_token_step());
      }
      if (std::all_of(group->ready.begin(), group->ready.end(),
                      [](bool b) { return b; })) {
        group->state = v1::GROUP_STATE_READY;
        DN_LOG(INFO) << "group " << group->name << " (generation "
                     << group->generation << ", " << group->world_size
                     << " ranks, " << group->backend << ", model "
                     << group->model << ") is READY; warm-up took "
                     << msg.ready().warmup_seconds() << " s";
        UpdateHealthAndGauges();
        Dispatch();
      }
      break;
    }
    case vi::RankMessage::kStep:
      HandleStep(*group, *link, msg.step());
      break;
    case vi::RankMessage::kResult:
      HandleResult(*group, *link, *msg.mutable_result());
      break;
    case vi::RankMessage::kHello:
      CloseLink(*link, grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                                    "Hello sent twice"));
      FailGroup(*group, absl::StrCat("rank ", link->rank, " sent Hello twice"));
      break;
    default:
      break;
  }
}

void Coordinator::Impl::HandleHello(const std::shared_ptr<RankLink>& link,
                                    const vi::Hello& hello) {
  auto reject = [&](grpc::StatusCode code, const std::string& why) {
    DN_LOG(WARNING) << "rejected rank " << hello.rank() << " of group '"
                    << hello.group() << "' from " << link->peer << ": " << why;
    link->ended = true;
    CloseLink(*link, grpc::Status(code, why));
  };
  if (!SecretMatches(options_.secret, hello.secret())) {
    return reject(grpc::StatusCode::PERMISSION_DENIED,
                  "Hello.secret does not match the coordinator's --secret");
  }
  if (shutting_down_) {
    return reject(grpc::StatusCode::UNAVAILABLE, "coordinator shutting down");
  }
  const v1::ModelInfo& info = hello.model().info();
  if (absl::Status v = ValidateHello(hello); !v.ok()) {
    return reject(grpc::StatusCode::INVALID_ARGUMENT, std::string(v.message()));
  }
  // A group whose launchers sync their slices runs the generation and size
  // they agreed on (docs/SERVICE.md, "Groups across hosts").
  if (std::optional<SliceRegistry::Expected> want =
          slices_.ExpectedFor(hello.group(), Clock::now());
      want.has_value() && (hello.generation() != want->generation ||
                           hello.world_size() != want->group_size)) {
    return reject(grpc::StatusCode::FAILED_PRECONDITION,
                  absl::StrCat("Hello.generation/world_size: generation ",
                               hello.generation(), " of ", hello.world_size(),
                               " ranks, but the launchers of group ",
                               hello.group(), " run generation ",
                               want->generation, " of ", want->group_size));
  }
  const std::string& model_name = hello.model().name();
  if (auto mit = models_.find(model_name);
      mit != models_.end() && ModelServed(model_name) &&
      mit->second.info.config_hash() != hello.model().config_hash()) {
    // Another generation of this very group may replace it, though.
    auto git = groups_.find(hello.group());
    bool only_this_group = git != groups_.end();
    for (const auto& [n, g] : groups_) {
      if (g->model == model_name && n != hello.group()) only_this_group = false;
    }
    if (!only_this_group) {
      return reject(grpc::StatusCode::FAILED_PRECONDITION,
                    absl::StrCat("model '", model_name,
                                 "' is served with config hash ",
                                 mit->second.info.config_hash(),
                                 "; this rank has ",
                                 hello.model().config_hash()));
    }
  }

  Group* group = nullptr;
  auto git = groups_.find(hello.group());
  if (git != groups_.end() && git->second->generation != hello.generation()) {
    Group& old = *git->second;
    if (hello.generation() < old.generation &&
        old.state != v1::GROUP_STATE_FAILED) {
      return reject(grpc::StatusCode::FAILED_PRECONDITION,
                    absl::StrCat("Hello.generation ", hello.generation(),
                                 " is older than the live generation ",
                                 old.generation, " of group ", old.name));
    }
    DN_LOG(INFO) << "group " << old.name << " re-registers: generation "
                 << old.generation << " -> " << hello.generation();
    FailGroup(old, absl::StrCat("replaced by generation ", hello.generation()));
    metrics_.CountRestart(old.name);
    groups_.erase(git);
    git = groups_.end();
  }
  if (git == groups_.end()) {
    auto g = std::make_unique<Group>();
    g->name = hello.group();
    g->model = model_name;
    g->config_hash = hello.model().config_hash();
    g->backend = hello.backend();
    g->generation = hello.generation();
    g->max_tokens = info.max_tokens();
    g->world_size = hello.world_size();
    g->store_prefix = StorePrefix(g->name, g->generation);
    g->ranks.resize(static_cast<size_t>(g->world_size));
    g->ready.assign(static_cast<size_t>(g->world_size), false);
    group = g.get();
    groups_[g->name] = std::move(g);
    ModelEntry& m = models_[model_name];
    m.info = info;
    m.info.set_name(model_name);
    m.info.set_config_hash(hello.model().config_hash());
    DN_LOG(INFO) << "group " << group->name << " (generation "
                 << group->generation << ", " << group->world_size
                 << " ranks, model " << model_name << ") is forming";
  } else {
    group = git->second.get();
    if (group->state == v1::GROUP_STATE_FAILED) {
      return reject(grpc::StatusCode::UNAVAILABLE,
                    absl::StrCat("group ", group->name, " generation ",
                                 group->generation,
                                 " has failed (", group->failure,
                                 "); restart it with a new generation"));
    }
    if (group->world_size != hello.world_size() ||
        group->model != model_name ||
        group->config_hash != hello.model().config_hash() ||
        group->backend != hello.backend()) {
      return reject(grpc::StatusCode::FAILED_PRECONDITION,
                    absl::StrCat("Hello of rank ", hello.rank(),
                                 " does not match group ", group->name,
                                 " (world size, model, config hash or "
                                 "backend differ)"));
    }
    if (group->ranks[static_cast<size_t>(hello.rank())] != nullptr) {
      return reject(grpc::StatusCode::ALREADY_EXISTS,
                    absl::StrCat("rank ", hello.rank(), " of group ",
                                 group->name, " generation ",
                                 group->generation, " is already attached"));
    }
  }
  if (!hello.server_version().empty() && hello.server_version() != Version()) {
    DN_LOG(WARNING) << "rank " << hello.rank() << " of group " << group->name
                    << " runs denoised " << hello.server_version()
                    << ", the coordinator " << Version();
  }
  link->hello_done = true;
  link->group = group->name;
  link->generation = group->generation;
  link->rank = hello.rank();
  link->info.set_rank(hello.rank());
  link->info.set_host(hello.host());
  link->info.set_device(hello.device());
  link->info.set_metrics_address(hello.metrics_address());
  group->ranks[static_cast<size_t>(hello.rank())] = link;

  vi::CoordinatorMessage welcome;
  welcome.mutable_welcome()->set_store_prefix(group->store_prefix);
  welcome.mutable_welcome()->set_heartbeat_interval_ms(kHeartbeatIntervalMs);
  link->writer.Write(std::move(welcome));
  DN_VLOG << "rank " << hello.rank() << " of group " << group->name
          << " attached from " << link->peer;
  UpdateHealthAndGauges();
}

void Coordinator::Impl::HandleStep(Group& group, const RankLink& link,
                                   const vi::StepReport& report) {
  if (link.rank != 0 || group.running == nullptr ||
      group.running->id != report.request_id()) {
    return;
  }
  Request& req = *group.running;
  const v1::Step& step = report.step();
  metrics_.ObserveStep(req.model, group.world_size, step.step_seconds(),
                       step.all_to_all_seconds(), step.rank_skew_seconds());
  req.steps_seen++;
  req.step_seconds_sum += step.step_seconds();
  const int interval = std::max(1, req.resolved.request.step_event_interval());
  if (step.index() % interval == 0 || step.index() == step.total() - 1) {
    v1::GenerateEvent event;
    *event.mutable_step() = step;
    req.sink->Event(std::move(event));
  }
}

void Coordinator::Impl::HandleResult(Group& group, const RankLink& link,
                                     vi::JobResult& result) {
  if (group.running == nullptr || group.running->id != result.request_id()) {
    return;
  }
  std::shared_ptr<Request> req = group.running;
  const auto code = static_cast<absl::StatusCode>(result.status_code());
  if (!IsRequestLevelError(code)) {
    FailGroup(group, absl::StrCat("rank ", link.rank, " failed: ",
                                  StatusCodeName(result.status_code()), ": ",
                                  result.status_message()));
    return;
  }
  if (link.rank == 0 && req->phase == Request::kRunning) {
    if (req->steps_seen > 0) {
      group.mean_step_seconds = req->step_seconds_sum / req->steps_seen;
      if (req->resolved.tokens > 0) {
        group.seconds_per_token_step =
            group.mean_step_seconds / static_cast<double>(req->resolved.tokens);
      }
    }
    if (code == absl::StatusCode::kOk) {
      v1::GenerateResult out;
      out.set_request_id(req->id);
      out.mutable_latents()->Swap(result.mutable_latents());
      v1::GenerationMetadata* md = out.mutable_metadata();
      const v1::GenerateRequest& r = req->resolved.request;
      md->set_seed(r.seed());
      md->set_scheduler(r.scheduler());
      md->set_steps(r.steps());
      md->set_shift(r.shift());
      md->set_guidance_scale(r.guidance_scale());
      md->set_model(req->model);
      md->set_model_config_hash(group.config_hash);
      md->set_ranks(group.world_size);
      md->set_backend(group.backend);
      md->set_server_version(Version());
      *md->mutable_latent_shape() = req->resolved.latent;
      md->set_worker_group(group.name);
      out.set_queue_seconds(
          std::chrono::duration<double>(req->started - req->accepted).count());
      out.set_run_seconds(result.run_seconds());
      req->sink->Result(std::move(out));
      FinishRequest(req, grpc::Status::OK);
    } else {
      FinishRequest(req, grpc::Status(static_cast<grpc::StatusCode>(code),
                                      result.status_message()));
    }
  }
  if (--group.results_pending <= 0) {
    if (req->phase != Request::kDone) {
      // Rank 0's result never came (it cannot be missing if the others
      // succeeded): treat as a group failure.
      FailGroup(group, "rank 0 sent no result");
      return;
    }
    group.running = nullptr;
    group.state = v1::GROUP_STATE_READY;
    UpdateHealthAndGauges();
    Dispatch();
  }
}

void Coordinator::Impl::FailGroup(Group& group, const std::string& reason,
                                  bool leaving) {
  if (group.state == v1::GROUP_STATE_FAILED) return;
  group.state = v1::GROUP_STATE_FAILED;
  group.failure = reason;
  group.failed_at = Clock::now();
  models_[group.model].last_failure =
      absl::StrCat("worker group ", group.name, leaving ? " left: " : " failed: ", reason);
  if (leaving) {
    DN_LOG(INFO) << "group " << group.name << " generation "
                 << group.generation << " is leaving: " << reason;
  } else {
    DN_LOG(WARNING) << "group " << group.name << " generation "
                    << group.generation << " FAILED: " << reason;
  }
  if (group.running != nullptr) {
    std::shared_ptr<Request> req = group.running;
    group.running = nullptr;
    FinishRequest(req, grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                    absl::StrCat("worker group ", group.name,
                                                 " failed: ", reason)));
  }
  for (auto& link : group.ranks) {
    if (link == nullptr || link->ended) continue;
    CloseLink(*link, leaving ? grpc::Status(grpc::StatusCode::OK,
                                            "worker group leaving: " + reason)
                             : grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                            "worker group failed: " + reason));
  }
  // Forget the rendezvous keys of this generation.
  for (auto it = store_.lower_bound(group.store_prefix);
       it != store_.end() && absl::StartsWith(it->first, group.store_prefix);) {
    it = store_.erase(it);
  }
  UpdateHealthAndGauges();
  Dispatch();
}

void Coordinator::Impl::OnRankStreamEnd(const std::shared_ptr<RankLink>& link,
                                        bool broken) {
  if (link->ended) {
    CloseLink(*link, grpc::Status::OK);  // make sure the call is finished
    return;
  }
  link->ended = true;
  CloseLink(*link, grpc::Status::OK);
  if (!link->hello_done) return;
  auto git = groups_.find(link->group);
  if (git == groups_.end() || git->second->generation != link->generation) {
    return;
  }
  Group& group = *git->second;
  if (broken || !link->leaving || group.state == v1::GROUP_STATE_FAILED) {
    // Kept as FAILED until a new generation registers (the launcher restarts
    // the whole group).
    FailGroup(group, absl::StrCat("rank ", link->rank, " disconnected"));
  } else {
    // A clean leave (the launcher stopped the group): fail what runs, then
    // forget the group.
    FailGroup(group, absl::StrCat("rank ", link->rank, " left"), true);
    groups_.erase(git);
    UpdateHealthAndGauges();
  }
}

// ---------------------------------------------------------------------------
// Store
// ---------------------------------------------------------------------------

namespace {

bool KeyUnderLivePrefix(const std::map<std::string, std::unique_ptr<Group>>& groups,
                        const std::string& key) {
  const size_t slash = key.find('/');
  if (slash == std::string::npos) return false;
  auto it = groups.find(key.substr(0, slash));
  if (it == groups.end() || it->second->state == v1::GROUP_STATE_FAILED) {
    return false;
  }
  return absl::StartsWith(key, it->second->store_prefix);
}

}  // namespace

grpc::Status Coordinator::Impl::StoreSet(const vi::StoreSetRequest& req) {
  if (!SecretMatches(options_.secret, req.secret())) {
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        "StoreSetRequest.secret does not match");
  }
  if (!KeyUnderLivePrefix(groups_, req.key())) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        absl::StrCat("store key '", req.key(),
                                     "' is not under the prefix of a live "
                                     "worker-group generation"));
  }
  store_[req.key()] = req.value();
  for (auto it = store_waiters_.begin(); it != store_waiters_.end();) {
    if (it->key == req.key()) {
      it->response->set_found(true);
      it->response->set_value(req.value());
      it->reactor->Finish(grpc::Status::OK);
      it = store_waiters_.erase(it);
    } else {
      ++it;
    }
  }
  return grpc::Status::OK;
}

bool Coordinator::Impl::StoreGet(const vi::StoreGetRequest& req,
                                 vi::StoreGetResponse* resp,
                                 grpc::ServerUnaryReactor* reactor,
                                 grpc::Status* status) {
  if (!SecretMatches(options_.secret, req.secret())) {
    *status = grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                           "StoreGetRequest.secret does not match");
    return true;
  }
  if (!KeyUnderLivePrefix(groups_, req.key())) {
    *status = grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                           absl::StrCat("store key '", req.key(),
                                        "' is not under the prefix of a live "
                                        "worker-group generation"));
    return true;
  }
  auto it = store_.find(req.key());
  if (it != store_.end()) {
    resp->set_found(true);
    resp->set_value(it->second);
    *status = grpc::Status::OK;
    return true;
  }
  if (req.wait_millis() <= 0 || shutting_down_) {
    resp->set_found(false);
    *status = grpc::Status::OK;
    return true;
  }
  const int wait = std::min(req.wait_millis(), 60000);
  store_waiters_.push_back(
      {req.key(), Clock::now() + std::chrono::milliseconds(wait), reactor, resp});
  return false;
}

// ---------------------------------------------------------------------------
// Launcher slices (the bookkeeping is server/group_slices.*)
// ---------------------------------------------------------------------------

grpc::Status Coordinator::Impl::SyncSlice(const vi::SliceRequest& req,
                                          vi::SliceStatus* resp) {
  if (!SecretMatches(options_.secret, req.secret())) {
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        "SliceRequest.secret does not match the coordinator's --secret");
  }
  if (shutting_down_) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "coordinator shutting down");
  }
  SliceSync sync{req.group(),       req.group_size(), req.first_rank(),
                 req.local_ranks(), req.launcher_id(), req.generation(),
                 req.host(),        req.leaving()};
  LiveGroupView live;
  auto git = groups_.find(req.group());
  if (git != groups_.end()) {
    const Group& g = *git->second;
    live.exists = true;
    live.generation = g.generation;
    live.forming = g.state == v1::GROUP_STATE_FORMING;
    live.failed = g.state == v1::GROUP_STATE_FAILED;
    live.world_size = g.world_size;
    for (const auto& link : g.ranks) {
      live.attached.push_back(link != nullptr && !link->ended);
    }
  }
  absl::StatusOr<SliceAnswer> a = slices_.Sync(sync, live, Clock::now());
  if (!a.ok()) {
    DN_LOG(WARNING) << "refused the launcher slice of group '" << req.group()
                    << "' from " << req.host() << ": " << a.status().message();
    return grpc::Status(static_cast<grpc::StatusCode>(a.status().code()),
                        std::string(a.status().message()));
  }
  if (a->fail_generation != 0 && git != groups_.end() &&
      git->second->generation == a->fail_generation) {
    FailGroup(*git->second, a->fail_reason);
  }
  resp->set_generation(a->generation);
  git = groups_.find(req.group());
  resp->set_state(git != groups_.end() && git->second->generation == a->generation
                      ? git->second->state
                      : v1::GROUP_STATE_UNSPECIFIED);
  for (int r : a->missing_ranks) resp->add_missing_ranks(r);
  for (int r : a->unclaimed_ranks) resp->add_unclaimed_ranks(r);
  return grpc::Status::OK;
}

// ---------------------------------------------------------------------------
// Info, health, metrics, timers
// ---------------------------------------------------------------------------

grpc::Status Coordinator::Impl::ListModels(v1::ListModelsResponse* resp) {
  for (const auto& [name, m] : models_) {
    if (!ModelServed(name)) continue;
    v1::ModelInfo* info = resp->add_models();
    *info = m.info;
    info->set_max_tokens(ModelMaxTokens(name));
    int ready = 0;
    for (const auto& [gname, g] : groups_) {
      if (g->model == name && (g->state == v1::GROUP_STATE_READY ||
                               g->state == v1::GROUP_STATE_BUSY)) {
        ++ready;
      }
    }
    info->set_ready_groups(ready);
  }
  return grpc::Status::OK;
}

grpc::Status Coordinator::Impl::GetServerInfo(v1::ServerInfo* resp) {
  resp->set_version(Version());
  resp->set_max_queue_per_model(options_.max_queue);
  resp->set_max_message_bytes(options_.max_message_bytes);
  for (const auto& [name, g] : groups_) {
    v1::WorkerGroupInfo* gi = resp->add_groups();
    gi->set_name(g->name);
    gi->set_model(g->model);
    gi->set_state(g->state);
    gi->set_world_size(g->world_size);
    gi->set_backend(g->backend);
    gi->set_generation(g->generation);
    gi->set_mean_step_seconds(g->mean_step_seconds);
    if (g->running != nullptr) gi->set_running_request_id(g->running->id);
    for (const auto& link : g->ranks) {
      if (link != nullptr) *gi->add_ranks() = link->info;
    }
  }
  return grpc::Status::OK;
}

void Coordinator::Impl::UpdateHealthAndGauges() {
  bool serving = false;
  std::map<std::string, std::map<std::string, int>> counts;
  for (const auto& [name, m] : models_) {
    for (const char* s : kGroupStateLabels) counts[name][s] = 0;
  }
  for (const auto& [name, g] : groups_) {
    counts[g->model][StateLabel(g->state)]++;
    if (g->state == v1::GROUP_STATE_READY || g->state == v1::GROUP_STATE_BUSY) {
      serving = true;
    }
  }
  for (const auto& [model, states] : counts) {
    for (const auto& [state, n] : states) metrics_.SetGroups(model, state, n);
  }
  for (const auto& [name, m] : models_) {
    metrics_.SetQueueDepth(name, static_cast<double>(m.queue.size()));
    metrics_.SetRunning(name, m.running);
  }
  if (shutting_down_) serving = false;
  if (serving != serving_) {
    serving_ = serving;
    health_.SetServing(serving);
    DN_LOG(INFO) << "health: " << (serving ? "SERVING" : "NOT_SERVING");
  }
}

void Coordinator::Impl::Tick() {
  const auto now = Clock::now();
  for (auto it = store_waiters_.begin(); it != store_waiters_.end();) {
    if (it->deadline <= now) {
      it->response->set_found(false);
      it->reactor->Finish(grpc::Status::OK);
      it = store_waiters_.erase(it);
    } else {
      ++it;
    }
  }
  // Queued requests whose deadline passed (the call's own cancellation may
  // come later than the deadline).
  const int64_t now_ms = UnixMillisNow();
  std::vector<std::shared_ptr<Request>> expired;
  for (auto& [id, r] : requests_) {
    if (r->phase == Request::kQueued && r->deadline_unix_ms > 0 &&
        now_ms >= r->deadline_unix_ms) {
      expired.push_back(r);
    }
  }
  for (auto& r : expired) {
    r->cancel_code = absl::StatusCode::kDeadlineExceeded;
    FinishRequest(r, grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                                  "deadline exceeded in the queue"));
  }
  if (now - last_heartbeat_check_ < std::chrono::seconds(1)) return;
  last_heartbeat_check_ = now;
  const auto timeout = std::chrono::milliseconds(options_.heartbeat_timeout_ms);
  std::vector<std::pair<std::string, std::string>> failed;
  for (auto& [name, g] : groups_) {
    if (g->state == v1::GROUP_STATE_FAILED) continue;
    for (const auto& link : g->ranks) {
      if (link != nullptr && !link->ended && now - link->last_seen > timeout) {
        failed.emplace_back(name, absl::StrCat("rank ", link->rank,
                                               " sent no heartbeat for ",
                                               options_.heartbeat_timeout_ms / 1000,
                                               " s"));
        break;
      }
    }
  }
  for (const auto& [name, why] : failed) {
    auto it = groups_.find(name);
    if (it != groups_.end()) FailGroup(*it->second, why);
  }
  ExpireUnserved(now);
}

void Coordinator::Impl::ExpireUnserved(Clock::time_point now) {
  const auto limit = std::chrono::milliseconds(options_.unserved_timeout_ms);
  // Requests queued for a model that has had no live group for the limit
  // would otherwise wait for their deadline, or forever without one.
  for (auto& [name, model] : models_) {
    bool live = false;
    for (const auto& [gname, g] : groups_) {
      if (g->model == name && g->state != v1::GROUP_STATE_FAILED) live = true;
    }
    if (live) {
      model.unserved_since.reset();
      continue;
    }
    if (!model.unserved_since.has_value()) model.unserved_since = now;
    if (model.queue.empty() || now - *model.unserved_since < limit) continue;
    std::vector<std::shared_ptr<Request>> queued;
    for (auto& [key, r] : model.queue) queued.push_back(r);
    for (auto& r : queued) {
      FinishRequest(r, grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                    absl::StrCat("model '", name, "' has had no live worker "
                                                 "group for ", options_.unserved_timeout_ms / 1000,
                                                 " s (last: ", model.last_failure,
                                                 "); the request left the queue")));
    }
  }
  // A FAILED group whose launcher never registered a new generation (it
  // died with its ranks, or its host did) is forgotten.
  bool forgot = false;
  for (auto it = groups_.begin(); it != groups_.end();) {
    const Group& g = *it->second;
    if (g.state == v1::GROUP_STATE_FAILED && now - g.failed_at >= limit) {
      DN_LOG(WARNING) << "group " << g.name << " generation " << g.generation
                      << " failed " << SecondsSince(g.failed_at)
                      << " s ago and no new generation registered; forgetting it";
      it = groups_.erase(it);
      forgot = true;
    } else {
      ++it;
    }
  }
  if (forgot) UpdateHealthAndGauges();
}

// ---------------------------------------------------------------------------
// Coordinator
// ---------------------------------------------------------------------------

Coordinator::Coordinator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Coordinator::~Coordinator() { Shutdown(); }

absl::StatusOr<std::unique_ptr<Coordinator>> Coordinator::Start(
    const CoordinatorOptions& options) {
  auto impl = std::make_unique<Impl>(options);
  DN_RETURN_IF_ERROR(impl->Start());
  return std::unique_ptr<Coordinator>(new Coordinator(std::move(impl)));
}

const std::string& Coordinator::address() const { return impl_->address_; }
const std::string& Coordinator::worker_address() const {
  return impl_->worker_address_;
}
const std::string& Coordinator::metrics_address() const {
  return impl_->metrics_address_;
}
void Coordinator::Shutdown() { impl_->Shutdown(); }

// ---------------------------------------------------------------------------
// `denoised coordinator`
// ---------------------------------------------------------------------------

namespace {

absl::Status WriteReadyFile(const std::string& path, const Coordinator& c) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    out << "listen=" << c.address() << "\n"
        << "worker_listen=" << c.worker_address() << "\n"
        << "metrics=" << c.metrics_address() << "\n";
    if (!out) return absl::UnavailableError("--ready-file: cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::UnavailableError("--ready-file: cannot rename to " + path);
  }
  return absl::OkStatus();
}

}  // namespace

int CoordinatorMain(int argc, char** argv) {
  CoordinatorOptions o;
  int max_message_mb = static_cast<int>(o.max_message_bytes >> 20);
  int heartbeat_timeout_s = o.heartbeat_timeout_ms / 1000;
  int unserved_timeout_s = o.unserved_timeout_ms / 1000;
  std::string ready_file;
  std::string auth_token_file;
  FlagSet flags("denoised coordinator",
                "Serves the Denoiser gRPC API and dispatches requests to "
                "worker groups.");
  flags.String("listen", &o.listen, "public gRPC address HOST:PORT (port 0: any)");
  flags.String("metrics-listen", &o.metrics_listen,
               "Prometheus /metrics address HOST:PORT");
  flags.String("worker-listen", &o.worker_listen,
               "address for worker ranks (default: the --listen port)");
  flags.Int("max-queue", &o.max_queue, "waiting requests per model");
  flags.Int("max-message-mb", &max_message_mb, "largest gRPC message, MiB");
  flags.String("secret", &o.secret,
               "shared secret ranks must present (default: $DENOISED_SECRET)");
  flags.Int("heartbeat-timeout", &heartbeat_timeout_s,
            "seconds of rank silence before its group is failed");
  flags.Int("unserved-timeout", &unserved_timeout_s,
            "seconds a model may have no live worker group before its queued "
            "requests end UNAVAILABLE, and a failed group is forgotten");
  flags.Bool("admission-by-cost", &o.admission_by_cost,
             "reject at admission (DEADLINE_EXCEEDED) a request whose "
             "estimated queue + run time exceeds its deadline");
  flags.String("ready-file", &ready_file,
               "write the bound addresses here once serving (for scripts)");
  flags.String("auth-token-file", &auth_token_file,
               "bearer tokens clients must present, one per line (default: none)");
  flags.Int("max-streams-per-client", &o.max_streams_per_client,
            "concurrent Generate calls per client (token or peer host); 0: no limit");
  AddTlsFlags(flags, "", &o.tls, "TLS of the public port");
  AddTlsFlags(flags, "worker-", &o.worker_tls,
              "mutual TLS of --worker-listen (clients need a cert the CA signed)");
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;
  if (!auth_token_file.empty()) {
    absl::StatusOr<std::vector<std::string>> tokens =
        ReadTokenFile(auth_token_file, "auth-token-file");
    if (!tokens.ok()) {
      std::fprintf(stderr, "denoised coordinator: %s\n",
                   tokens.status().ToString().c_str());
      return 2;
    }
    o.auth_tokens = std::move(*tokens);
  }
  if (o.secret.empty()) {
    if (const char* s = std::getenv(kSecretEnv)) o.secret = s;
  }
  o.max_message_bytes = int64_t{max_message_mb} << 20;
  o.heartbeat_timeout_ms = std::max(2, heartbeat_timeout_s) * 1000;
  o.unserved_timeout_ms = std::max(1, unserved_timeout_s) * 1000;
  SetLogTag("coordinator");

  InstallStopSignalHandlers();

  absl::StatusOr<std::unique_ptr<Coordinator>> c = Coordinator::Start(o);
  if (!c.ok()) {
    std::fprintf(stderr, "denoised coordinator: %s\n",
                 c.status().ToString().c_str());
    return 1;
  }
  DN_LOG(INFO) << "denoised " << Version() << " coordinator: gRPC on "
               << (*c)->address() << ", workers on " << (*c)->worker_address()
               << ", metrics on http://" << (*c)->metrics_address()
               << "/metrics, max queue " << o.max_queue << " per model";
  if (!ready_file.empty()) {
    if (absl::Status s = WriteReadyFile(ready_file, **c); !s.ok()) {
      std::fprintf(stderr, "denoised coordinator: %s\n", s.ToString().c_str());
      return 1;
    }
  }
  const int sig = WaitStopSignal(std::chrono::milliseconds(-1));
  DN_LOG(INFO) << "signal " << sig << ": shutting down";
  (*c)->Shutdown();
  // Everything is stopped; skip the destructors (nothing is left to flush,
  // and the metrics endpoint's threads need not be joined on the way out).
  std::fflush(nullptr);
  std::_Exit(0);
}

}  // namespace dn::server
