#include "server/rank_runner.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "base/flags.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "comm/process_group.h"
#include "denoised/v1/worker.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "server/grpc_store.h"
#include "server/credentials.h"
#include "server/metrics.h"
#include "base/process.h"
#include "server/proto_convert.h"
#include "server/protocol.h"
#include "server/version.h"
#include "worker/backend.h"
#include "worker/checkpoint.h"
#include "worker/engine.h"
#include "worker/lora.h"
#include "worker/wan_config.h"

namespace dn::server {

namespace v1 = ::denoised::v1;
namespace vi = ::denoised::v1::internal;

std::string DefaultModelName(const std::string& name,
                             const std::string& model_dir,
                             const std::string& preset) {
  if (!name.empty()) return name;
  if (!model_dir.empty()) {
    std::string d = model_dir;
    while (d.size() > 1 && d.back() == '/') d.pop_back();
    const size_t slash = d.rfind('/');
    return slash == std::string::npos ? d : d.substr(slash + 1);
  }
  return preset;
}

namespace {

int64_t UnixMillisNow() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

absl::StatusOr<worker::LatentShape> ParseWarmupLatent(const std::string& s,
                                                      int channels) {
  std::vector<std::string> parts = absl::StrSplit(s, 'x');
  worker::LatentShape l;
  l.channels = channels;
  if (parts.size() != 3 || !absl::SimpleAtoi(parts[0], &l.frames) ||
      !absl::SimpleAtoi(parts[1], &l.height) ||
      !absl::SimpleAtoi(parts[2], &l.width) || l.frames < 1 || l.height < 1 ||
      l.width < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--warmup-latent: expected FxHxW, got '", s, "'"));
  }
  return l;
}

v1::ModelInfo ModelInfoFromConfig(const worker::WanConfig& config,
                                  const std::string& name,
                                  int64_t max_tokens) {
  v1::ModelInfo info;
  info.set_name(name);
  info.set_config_hash(config.Hash());
  info.set_in_channels(config.in_channels);
  info.set_out_channels(config.out_channels);
  info.set_text_dim(config.text_dim);
  info.set_num_layers(config.num_layers);
  info.set_num_heads(config.num_attention_heads);
  info.set_head_dim(config.attention_head_dim);
  for (int s : config.vae_stride) info.add_vae_stride(s);
  for (int p : config.patch_size) info.add_patch_size(p);
  info.set_max_tokens(max_tokens);
  info.set_max_axis_tokens(config.rope_max_seq_len);
  info.set_experts(config.num_experts());
  info.set_kind(config.is_ti2v() ? "ti2v"
                : config.in_channels > config.out_channels || config.is_i2v() ? "i2v"
                                                                                : "t2v");
  info.set_image_dim(config.image_dim);
  info.set_boundary_ratio(config.boundary_ratio);
  return info;
}

// Embeddings [T, D] or [1, T, D] -> host f32 [T, D].
absl::StatusOr<worker::Tensor> EmbedsFromProto(const v1::Tensor& t,
                                               const std::string& field) {
  DN_ASSIGN_OR_RETURN(worker::Tensor host, TensorFromProto(t, field));
  if (host.rank() == 3) host = host.View({host.dim(1), host.dim(2)});
  return host;
}

// The engine's params of a job. The job's tensors are decoded into host
// f32 tensors and then released, so a rank holds each input once.
absl::StatusOr<worker::GenerateParams> ParamsFromJob(vi::Job& job) {
  worker::GenerateParams p;
  p.latent = LatentFromProto(job.latent_shape());
  p.steps = job.steps();
  p.guidance = job.guidance_scale();
  if (job.has_guidance_scale_2()) p.guidance_2 = job.guidance_scale_2();
  for (const v1::LoraRef& l : job.lora())
    p.loras.push_back({l.name(), l.has_scale() ? l.scale() : 1.0, l.expert() - 1});
  p.scheduler = SchedulerFromProto(job.scheduler());
  p.shift = job.shift();
  p.seed = job.seed();
  DN_ASSIGN_OR_RETURN(p.prompt_embeds,
                      EmbedsFromProto(job.prompt_embeds(), "prompt_embeds"));
  job.clear_prompt_embeds();
  if (job.has_negative_prompt_embeds()) {
    DN_ASSIGN_OR_RETURN(p.negative_embeds,
                        EmbedsFromProto(job.negative_prompt_embeds(),
                                        "negative_prompt_embeds"));
    job.clear_negative_prompt_embeds();
  }
  if (job.has_initial_latents()) {
    DN_ASSIGN_OR_RETURN(p.initial_latents,
                        TensorFromProto(job.initial_latents(), "initial_latents"));
    job.clear_initial_latents();
  }
  if (job.has_image_embeds()) {
    DN_ASSIGN_OR_RETURN(p.image_embeds, EmbedsFromProto(job.image_embeds(), "image_embeds"));
    job.clear_image_embeds();
  }
  if (job.has_condition_latents()) {
    DN_ASSIGN_OR_RETURN(p.condition_latents,
                        TensorFromProto(job.condition_latents(), "condition_latents"));
    job.clear_condition_latents();
  }
  p.deadline_unix_millis = job.deadline_unix_millis();
  p.acceleration.attention_fp8 = job.acceleration().attention_fp8();
  p.acceleration.cache_threshold = job.acceleration().cache_threshold();
  return p;
}

// The rank's end of the Attach stream. Writes are serialized by a mutex;
// one reader thread reads.
class Connection {
 public:
  explicit Connection(std::shared_ptr<grpc::Channel> channel)
      : stub_(vi::WorkerControl::NewStub(std::move(channel))) {
    stream_ = stub_->Attach(&ctx_);
  }

  bool Write(const vi::RankMessage& msg) {
    std::lock_guard<std::mutex> lock(write_mu_);
    if (closed_) return false;
    return stream_->Write(msg);
  }
  bool Read(vi::CoordinatorMessage* msg) { return stream_->Read(msg); }

  // After Read returned false: the final status (blocks other writers).
  grpc::Status Finish() {
    std::lock_guard<std::mutex> lock(write_mu_);
    closed_ = true;
    return stream_->Finish();
  }
  void WritesDone() {
    std::lock_guard<std::mutex> lock(write_mu_);
    if (!closed_) stream_->WritesDone();
  }
  void Cancel() { ctx_.TryCancel(); }

 private:
  std::unique_ptr<vi::WorkerControl::Stub> stub_;
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReaderWriter<vi::RankMessage,
                                           vi::CoordinatorMessage>>
      stream_;
  std::mutex write_mu_;
  bool closed_ = false;
};

// Jobs handed from the reader thread to the main thread, and the stop flag
// of the job in progress.
class JobQueue {
 public:
  void Push(vi::Job job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      current_id_ = job.request_id();
      stop_.Reset();
      jobs_.push_back(std::move(job));
    }
    cv_.notify_one();
  }
  // The next job, or nothing once Close was called.
  std::optional<vi::Job> Pop() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return !jobs_.empty() || closed_; });
    if (closed_) return std::nullopt;
    vi::Job job = std::move(jobs_.front());
    jobs_.pop_front();
    return job;
  }
  // Stops the job in progress at its next step boundary and ends Pop.
  void Close() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      closed_ = true;
      stop_.Request(absl::StatusCode::kCancelled);
    }
    cv_.notify_all();
  }
  void Cancel(const vi::CancelJob& c) {
    std::lock_guard<std::mutex> lock(mu_);
    if (c.request_id() != current_id_) return;
    const auto code = static_cast<absl::StatusCode>(c.status_code());
    stop_.Request(code == absl::StatusCode::kDeadlineExceeded
                      ? code
                      : absl::StatusCode::kCancelled);
  }
  const worker::StopFlag* stop() const { return &stop_; }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<vi::Job> jobs_;
  bool closed_ = false;
  std::string current_id_;
  worker::StopFlag stop_;
};

// Runs one job; returns the result to send.
vi::JobResult RunJob(vi::Job& job, worker::Engine& engine,
                     worker::Backend& backend, Connection& conn,
                     JobQueue& jobs, RankMetrics& metrics, int rank,
                     bool* fatal) {
  vi::JobResult result;
  result.set_request_id(job.request_id());
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<worker::Tensor> latents;
  absl::StatusOr<worker::GenerateParams> params = ParamsFromJob(job);
  if (!params.ok()) {
    latents = params.status();
  } else if (absl::Status v = engine.Validate(*params); !v.ok()) {
    latents = v;
  } else {
    const std::string& id = job.request_id();
    auto on_step = [&](const worker::StepStats& s) {
      metrics.ObserveStep(s.rank_seconds, s.alltoall_seconds);
      if (s.cached) result.add_cached_steps(s.index);
      if (rank != 0) return;
      vi::RankMessage m;
      vi::StepReport* r = m.mutable_step();
      r->set_request_id(id);
      v1::Step* step = r->mutable_step();
      step->set_index(s.index);
      step->set_total(s.total);
      step->set_sigma(s.sigma);
      step->set_timestep(s.timestep);
      step->set_step_seconds(s.seconds);
      step->set_all_to_all_seconds(s.alltoall_seconds);
      step->set_rank_skew_seconds(s.skew_seconds);
      step->set_cached(s.cached);
      r->set_rank_step_seconds(s.rank_seconds);
      conn.Write(m);
    };
    latents = engine.Generate(*params, on_step, jobs.stop());
  }
  metrics.SetMemoryPeak(backend.peak_memory_bytes());
  result.set_run_seconds(std::chrono::duration<double>(
                             std::chrono::steady_clock::now() - t0)
                             .count());
  if (latents.ok()) {
    if (rank == 0) TensorToProto(*latents, result.mutable_latents());
    result.set_status_code(0);
    return result;
  }
  absl::Status s = latents.status();
  // The engine knows whether its data group survived (an agreed stop or a
  // setup failure leave it usable; a failure inside a step does not). Every
  // rank gets the same answer from it; none guesses from its own clock.
  *fatal = engine.broken() || !IsRequestLevelError(s.code());
  if (*fatal && IsRequestLevelError(s.code())) {
    s = absl::UnavailableError(absl::StrCat("rank ", rank, ": ", s.ToString()));
  }
  result.set_status_code(static_cast<int>(s.code()));
  result.set_status_message(std::string(s.message()));
  return result;
}

}  // namespace

class ServiceRank::Impl {
 public:
  explicit Impl(ServiceRankOptions o) : o_(std::move(o)) {}
  ~Impl() { Shutdown(); }

  int Run();
  // Ends the rank with `code` (the first code wins): the job loop ends, the
  // watchdog starts counting. `leave`: say goodbye to the coordinator first.
  void RequestStop(int code, bool leave);

 private:
  void StartThreads();
  void ReaderLoop();
  void HeartbeatLoop(int interval_ms);
  void SignalLoop();
  void WatchdogLoop();
  // Joins every thread (after RequestStop).
  void Shutdown();
  int Fail(const absl::Status& s, int code) {
    DN_LOG(ERROR) << s.ToString();
    RequestStop(code, false);
    return code;
  }

  ServiceRankOptions o_;
  std::unique_ptr<Connection> conn_;
  JobQueue jobs_;

  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  bool leaving_ = false;
  bool done_ = false;  // Run is past its work: the watchdog stands down
  bool reader_done_ = false;
  int exit_code_ = 0;
  std::thread reader_, heartbeat_, signal_, watchdog_;
};

void ServiceRank::Impl::RequestStop(int code, bool leave) {
  Connection* conn = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return;
    stopping_ = true;
    exit_code_ = code;
    leaving_ = leave;
    conn = conn_.get();
  }
  cv_.notify_all();
  jobs_.Close();
  if (conn == nullptr) return;
  if (leave) {
    vi::RankMessage bye;
    bye.mutable_leave()->set_reason("leaving the group");
    conn->Write(bye);
    conn->WritesDone();  // the coordinator closes the stream; the reader ends
  } else {
    conn->Cancel();
  }
}

void ServiceRank::Impl::StartThreads() {
  reader_ = std::thread([this] { ReaderLoop(); });
  signal_ = std::thread([this] { SignalLoop(); });
  watchdog_ = std::thread([this] { WatchdogLoop(); });
}

void ServiceRank::Impl::ReaderLoop() {
  vi::CoordinatorMessage msg;
  bool shutdown = false;
  while (conn_->Read(&msg)) {
    switch (msg.msg_case()) {
      case vi::CoordinatorMessage::kJob:
        jobs_.Push(std::move(*msg.mutable_job()));
        break;
      case vi::CoordinatorMessage::kCancel:
        jobs_.Cancel(msg.cancel());
        break;
      case vi::CoordinatorMessage::kShutdown:
        DN_LOG(INFO) << "shutdown: " << msg.shutdown().reason();
        shutdown = true;
        break;
      default:
        break;
    }
  }
  const grpc::Status s = conn_->Finish();
  {
    std::lock_guard<std::mutex> lock(mu_);
    reader_done_ = true;
  }
  cv_.notify_all();
  // Every RequestStop below is a no-op when the rank is already stopping.
  if (shutdown) {
    RequestStop(0, false);
  } else if (s.ok()) {
    DN_LOG(INFO) << "the coordinator closed the stream: " << s.error_message();
    RequestStop(0, false);
  } else {
    DN_LOG(ERROR) << "coordinator stream ended: " << StatusCodeName(s.error_code())
                  << ": " << s.error_message();
    RequestStop(3, false);
  }
}

void ServiceRank::Impl::HeartbeatLoop(int interval_ms) {
  std::unique_lock<std::mutex> lock(mu_);
  while (!cv_.wait_for(lock, std::chrono::milliseconds(interval_ms),
                       [this] { return stopping_; })) {
    lock.unlock();
    vi::RankMessage m;
    m.mutable_heartbeat()->set_unix_millis(UnixMillisNow());
    // Rank 0 reports the LoRA files now in --lora-dir (ModelInfo.loras).
    const worker::RankOptions& ro = o_.rank;
    if (ro.rank == 0 && !ro.lora_dir.empty())
      for (const std::string& l : worker::LoraLibrary(ro.lora_dir).List())
        m.mutable_heartbeat()->add_loras(l);
    conn_->Write(m);
    lock.lock();
  }
}

void ServiceRank::Impl::SignalLoop() {
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return;
    }
    const int sig = WaitStopSignal(std::chrono::milliseconds(200));
    if (sig != 0) {
      DN_LOG(INFO) << "signal " << sig << ": leaving the group";
      RequestStop(0, true);
      return;
    }
  }
}

void ServiceRank::Impl::WatchdogLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return stopping_ || done_; });
  if (done_) return;
  if (cv_.wait_for(lock, std::chrono::milliseconds(kStopGraceMs), [this] { return done_; }))
    return;
  // Blocked in a rendezvous or a collective with a dead peer: the process
  // ends here, with the code the stop was asked with.
  DN_LOG(WARNING) << "could not stop within " << kStopGraceMs << " ms; exiting";
  const int code = exit_code_;
  std::fflush(nullptr);
  std::_Exit(code);
}

void ServiceRank::Impl::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
    if (!stopping_) {
      stopping_ = true;
    }
  }
  cv_.notify_all();
  jobs_.Close();
  if (heartbeat_.joinable()) heartbeat_.join();
  if (signal_.joinable()) signal_.join();
  if (reader_.joinable()) {
    // A leaving rank gives the coordinator up to 3 s to close the stream.
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (leaving_)
        cv_.wait_for(lock, std::chrono::seconds(3), [this] { return reader_done_; });
    }
    conn_->Cancel();
    reader_.join();
  }
  if (watchdog_.joinable()) watchdog_.join();
}

int ServiceRank::Impl::Run() {
  const worker::RankOptions& ro = o_.rank;
  SetLogTag(absl::StrCat(o_.group, "/r", ro.rank));
  if (ro.ranks < 1 || ro.rank < 0 || ro.rank >= ro.ranks) {
    return Fail(absl::InvalidArgumentError(absl::StrCat(
                    "--rank/--world-size: rank ", ro.rank, " of ", ro.ranks)),
                2);
  }
  if (absl::Status s = worker::CheckRankOptions(ro); !s.ok()) return Fail(s, 2);

  // SIGTERM/SIGINT are watched by the signal thread (a clean leave).
  InstallStopSignalHandlers();

  RankMetrics metrics(o_.group, ro.rank);
  std::unique_ptr<MetricsEndpoint> endpoint;
  if (!o_.metrics_listen.empty()) {
    absl::StatusOr<std::unique_ptr<MetricsEndpoint>> e =
        MetricsEndpoint::Start(o_.metrics_listen, metrics.registry);
    if (!e.ok()) return Fail(e.status(), 2);
    endpoint = *std::move(e);
  }

  // Stage 1 of the rank session: weights and backend.
  absl::StatusOr<std::unique_ptr<worker::RankSession>> prepared =
      worker::RankSession::Prepare(ro);
  if (!prepared.ok()) return Fail(prepared.status(), 2);
  worker::RankSession& session = **prepared;
  const worker::WanConfig& config = session.weights->config();
  const std::string model_name = DefaultModelName(o_.model_name, ro.model, ro.preset);
  metrics.SetInfo(session.backend->name(), session.backend->device_description());

  // Attach.
  grpc::ChannelArguments args;
  const int max_msg = static_cast<int>(std::min<int64_t>(
      o_.max_message_bytes, std::numeric_limits<int>::max()));
  args.SetMaxReceiveMessageSize(max_msg);
  args.SetMaxSendMessageSize(max_msg);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> creds =
      MakeChannelCredentials(o_.tls, "");
  if (!creds.ok()) return Fail(creds.status(), 2);
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateCustomChannel(o_.coordinator, *creds, args);
  if (!channel->WaitForConnected(std::chrono::system_clock::now() +
                                 std::chrono::seconds(o_.connect_timeout_s))) {
    return Fail(absl::UnavailableError(
                    absl::StrCat("--coordinator: cannot reach ", o_.coordinator,
                                 " within ", o_.connect_timeout_s, " s")),
                2);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    conn_ = std::make_unique<Connection>(channel);
  }
  {
    vi::RankMessage m;
    vi::Hello* h = m.mutable_hello();
    h->set_group(o_.group);
    h->set_rank(ro.rank);
    h->set_world_size(ro.ranks);
    h->set_generation(o_.generation);
    h->mutable_model()->set_name(model_name);
    h->mutable_model()->set_config_hash(config.Hash());
    *h->mutable_model()->mutable_info() =
        ModelInfoFromConfig(config, model_name, ro.max_tokens);
    for (const std::string& l : worker::LoraLibrary(ro.lora_dir).List())
      h->mutable_model()->mutable_info()->add_loras(l);
    h->set_backend(session.backend->name());
    char host[256] = {0};
    gethostname(host, sizeof(host) - 1);
    h->set_host(host);
    h->set_device(session.backend->device_description());
    if (endpoint) h->set_metrics_address(endpoint->address());
    h->set_secret(o_.secret);
    h->set_server_version(Version());
    h->set_cfg_degree(ro.cfg_parallel ? 2 : 1);
    if (!conn_->Write(m)) {
      const grpc::Status s = conn_->Finish();
      return Fail(absl::UnavailableError("Attach: " + s.error_message()), 2);
    }
  }
  vi::CoordinatorMessage welcome;
  if (!conn_->Read(&welcome) || !welcome.has_welcome()) {
    const grpc::Status s = conn_->Finish();
    return Fail(absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                             "the coordinator refused this rank: " + s.error_message()),
                2);
  }
  const std::string prefix = welcome.welcome().store_prefix();
  const int heartbeat_ms = welcome.welcome().heartbeat_interval_ms() > 0
                               ? welcome.welcome().heartbeat_interval_ms()
                               : kHeartbeatIntervalMs;
  DN_LOG(INFO) << "attached to " << o_.coordinator << " as rank " << ro.rank << "/"
               << ro.ranks << " of group " << o_.group << " (generation "
               << o_.generation << ", model " << model_name << ", "
               << session.backend->device_description() << ")";
  StartThreads();
  heartbeat_ = std::thread([this, heartbeat_ms] { HeartbeatLoop(heartbeat_ms); });

  // Stage 2 of the rank session: process groups (through the coordinator's
  // store) and the engine; then the warm-up.
  const auto t_load = std::chrono::steady_clock::now();
  GrpcStore store(channel, o_.secret);
  if (absl::Status s = session.Connect(store, prefix); !s.ok()) return Fail(s, 4);
  worker::Engine& engine = *session.engine;
  absl::StatusOr<worker::LatentShape> warm =
      ParseWarmupLatent(o_.warmup_latent, config.in_channels);
  if (!warm.ok()) return Fail(warm.status(), 2);
  absl::StatusOr<double> step_seconds = engine.Warmup(*warm, o_.warmup_text_len);
  if (!step_seconds.ok()) return Fail(step_seconds.status(), 4);
  const double load_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count();
  metrics.SetMemoryPeak(session.backend->peak_memory_bytes());
  {
    vi::RankMessage m;
    m.mutable_ready()->set_warmup_seconds(load_seconds);
    const int64_t tokens = worker::TokenCount(config, *warm);
    m.mutable_ready()->set_seconds_per_token_step(
        tokens > 0 ? *step_seconds / static_cast<double>(tokens) : 0);
    conn_->Write(m);
  }
  DN_LOG(INFO) << "ready: loaded " << session.weights->description()
               << " and warmed up in " << load_seconds << " s (" << *step_seconds
               << " s/step at latent " << o_.warmup_latent << ")";

  // Jobs, until a stop.
  while (std::optional<vi::Job> job = jobs_.Pop()) {
    bool fatal = false;
    vi::RankMessage m;
    *m.mutable_result() =
        RunJob(*job, engine, *session.backend, *conn_, jobs_, metrics, ro.rank, &fatal);
    const int code = m.result().status_code();
    conn_->Write(m);
    if (fatal) {
      return Fail(absl::Status(static_cast<absl::StatusCode>(code),
                               absl::StrCat("job ", job->request_id(),
                                            " broke the group: ",
                                            m.result().status_message())),
                  4);
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  return exit_code_;
}

ServiceRank::ServiceRank(ServiceRankOptions options)
    : impl_(std::make_unique<Impl>(std::move(options))) {}
ServiceRank::~ServiceRank() = default;
int ServiceRank::Run() { return impl_->Run(); }
void ServiceRank::Stop() { impl_->RequestStop(0, true); }

int RankMain(int argc, char** argv) {
  ServiceRankOptions o;
  worker::RankOptions& r = o.rank;
  r.rank = 0;
  int max_message_mb = static_cast<int>(o.max_message_bytes >> 20);
  FlagSet flags("denoised worker-rank",
                "One rank of a worker group (started by `denoised worker`).");
  flags.String("coordinator", &o.coordinator, "coordinator worker address HOST:PORT");
  flags.String("group", &o.group, "worker group name");
  flags.Int("rank", &r.rank, "this rank");
  flags.Int("world-size", &r.ranks, "ranks in the group");
  flags.Int64("generation", &o.generation, "the launcher's restart counter");
  flags.String("model", &r.model, "checkpoint folder");
  flags.String("preset", &r.preset, "preset model with seeded random weights");
  flags.Uint64("preset-seed", &r.preset_seed, "seed of the preset weights");
  flags.String("model-name", &o.model_name, "registered model name");
  flags.String("backend", &r.backend, "cpu | cuda");
  flags.Int("device", &r.device, "CUDA device (-1: the rank)");
  flags.Int("threads", &r.threads, "CPU backend threads (0: cores / world size)");
  flags.String("host", &r.host, "address the rank's process groups listen on");
  flags.String("metrics-listen", &o.metrics_listen, "/metrics address HOST:PORT");
  flags.Int64("max-tokens", &r.max_tokens, "largest request, in tokens");
  flags.String("lora-dir", &r.lora_dir, "directory of LoRA files (*.safetensors) requests may name");
  flags.Bool("graphs", &r.graphs, "capture steps as CUDA graphs");
  flags.Bool("cfg-parallel", &r.cfg_parallel,
             "run as 2 CFG halves x world-size/2 Ulysses ranks");
  flags.String("warmup-latent", &o.warmup_latent, "warm-up latent size FxHxW");
  flags.Int("warmup-text-len", &o.warmup_text_len, "warm-up text tokens");
  flags.Int("connect-timeout", &o.connect_timeout_s, "seconds to reach the coordinator");
  flags.Int("pg-timeout", &r.timeout_s, "process-group timeout, seconds");
  flags.Int("max-message-mb", &max_message_mb, "largest gRPC message, MiB");
  AddTlsFlags(flags, "", &o.tls, "TLS to the coordinator's worker port");
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;
  o.max_message_bytes = int64_t{max_message_mb} << 20;
  if (const char* s = std::getenv(kSecretEnv)) o.secret = s;
  ServiceRank rank(std::move(o));
  return rank.Run();
}

}  // namespace dn::server
