// The coordinator's gRPC shell: binds the public server (Denoiser, Health,
// reflection, and WorkerControl when it shares the port) and the worker
// server, owns the event loop the core runs on, and stops it all in order.
// The services live in denoiser_service.*, worker_control_service.* and
// health_service.h; the logic in coordinator_core.* and the parts it uses.
#include "server/coordinator.h"

#include <algorithm>
#include <chrono>
#include <future>
#include <limits>
#include <memory>
#include <mutex>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "server/auth.h"
#include "server/clock.h"
#include "server/coordinator_core.h"
#include "server/denoiser_service.h"
#include "server/event_loop.h"
#include "server/health_service.h"
#include "server/inflight_budget.h"
#include "server/metadata_gate.h"
#include "server/metrics.h"
#include "server/worker_control_service.h"

namespace dn::server {

class Coordinator::Impl {
 public:
  explicit Impl(const CoordinatorOptions& options)
      : options_(options),
        gate_(std::make_shared<ClientGate>(options.auth_tokens,
                                           options.max_streams_per_client)),
        budget_(options.max_inflight_bytes),
        core_(CoreOptions{options.max_queue, options.max_message_bytes,
                          options.secret, options.heartbeat_timeout_ms,
                          options.unserved_timeout_ms, options.admission_by_cost},
              clock_, metrics_, [this](bool serving) { health_.SetServing(serving); }) {}

  absl::Status Start();
  void Shutdown();

  std::string address_, worker_address_, metrics_address_;

 private:
  CoordinatorOptions options_;
  RealClock clock_;
  // Shared with the public port's credentials (server/metadata_gate.h).
  std::shared_ptr<ClientGate> gate_;
  InflightBudget budget_;
  CoordinatorMetrics metrics_;
  HealthService health_;
  // Lives on loop_'s thread: every call into it is posted there.
  CoordinatorCore core_;
  EventLoop loop_;
  // Parses Generate bodies, off gRPC's threads (denoiser_service.h).
  EventLoop intake_;
  std::unique_ptr<MetricsEndpoint> metrics_endpoint_;
  std::unique_ptr<grpc::Service> denoiser_service_;
  std::unique_ptr<grpc::Service> worker_service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<grpc::Server> worker_server_;
  bool shut_down_ = false;  // Shutdown() ran (caller thread)
};

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
  if (options_.max_inflight_bytes < 0) {
    return absl::InvalidArgumentError("--max-inflight-mb: must be >= 0");
  }
  DN_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> public_creds,
                      MakeServerCredentials(options_.tls, false, ""));
  // Tokens are checked on a call's metadata, before its body is read; a
  // refused generation call is counted like every outcome.
  public_creds = GateByMetadata(
      options_.tls.enabled() ? public_creds : nullptr, gate_, kDenoiserPathPrefix,
      [this](std::string_view path) {
        const std::string_view method = path.substr(path.rfind('/') + 1);
        if (method != "Generate" && method != "GenerateUnary") return;
        loop_.Post([this] {
          core_.CountRefused("", absl::StatusCode::kUnauthenticated);
        });
      });
  DN_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> worker_creds,
                      MakeServerCredentials(options_.worker_tls, true, "worker-"));
  DN_ASSIGN_OR_RETURN(metrics_endpoint_,
                      MetricsEndpoint::Start(options_.metrics_listen,
                                             metrics_.registry));
  metrics_address_ = metrics_endpoint_->address();

  loop_.Start([this] { core_.Tick(); }, std::chrono::milliseconds(100));
  intake_.Start([] {}, std::chrono::seconds(3600));

  static std::once_flag reflection_once;
  std::call_once(reflection_once,
                 [] { grpc::reflection::InitProtoReflectionServerBuilderPlugin(); });

  denoiser_service_ = MakeDenoiserService(intake_, loop_, core_, *gate_, budget_);
  worker_service_ = MakeWorkerControlService(loop_, core_, clock_);
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
  if (options_.secret.empty() && !IsLoopbackListen(options_.worker_listen.empty()
                                                       ? options_.listen
                                                       : options_.worker_listen)) {
    DN_LOG(WARNING) << "no --secret: any party that reaches the worker port "
                    << worker_address_ << " can attach ranks (docs/SECURITY.md)";
  }
  return absl::OkStatus();
}

void Coordinator::Impl::Shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  // Fail the work and release the ranks on the loop, then wait for it.
  std::promise<void> done;
  loop_.Post([this, &done] {
    core_.Shutdown();
    done.set_value();
  });
  done.get_future().wait();
  DN_VLOG << "shutdown: work failed, ranks released";
  health_.SetServing(false);
  health_.FinishWatchers();
  // Every call has been answered above; the short deadline only lets the
  // final statuses go out (an idle client connection would otherwise hold
  // the shutdown until the deadline).
  const auto deadline =
      std::chrono::system_clock::now() + std::chrono::milliseconds(500);
  if (worker_server_) worker_server_->Shutdown(deadline);
  if (server_) server_->Shutdown(deadline);
  DN_VLOG << "shutdown: servers stopped";
  // Bodies still being parsed reach the core, which refuses them now; then
  // the loop runs what is left (cancellations the servers' shutdown posted).
  intake_.Stop();
  loop_.Stop();
  if (worker_server_) worker_server_->Wait();
  if (server_) server_->Wait();
  DN_VLOG << "shutdown: done";
}

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

bool IsLoopbackListen(const std::string& listen) {
  return absl::StartsWith(listen, "127.") || absl::StartsWith(listen, "localhost:") ||
         absl::StartsWith(listen, "[::1]:") || absl::StartsWith(listen, "unix:");
}

}  // namespace dn::server
