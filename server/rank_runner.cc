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
#include "comm/base/flags.h"
#include "comm/base/log.h"
#include "comm/base/status_macros.h"
#include "comm/process_group.h"
#include "denoised/v1/worker.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "server/grpc_store.h"
#include "server/credentials.h"
#include "server/metrics.h"
#include "server/process.h"
#include "server/proto_convert.h"
#include "server/protocol.h"
#include "server/version.h"
#include "worker/backend.h"
#include "worker/checkpoint.h"
#include "worker/engine.h"
#include "worker/wan_config.h"
#ifdef DENOISED_WITH_CUDA
#include "comm/nccl_process_group.h"
#endif

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

[[noreturn]] void ExitNow(int code) {
  std::fflush(nullptr);
  std::_Exit(code);
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
  p.deadline_unix_millis = job.deadline_unix_millis();
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
  vi::Job Pop() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return !jobs_.empty(); });
    vi::Job job = std::move(jobs_.front());
    jobs_.pop_front();
    return job;
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
  std::string current_id_;
  worker::StopFlag stop_;
};

struct ProcessGroups {
  std::unique_ptr<comm::ProcessGroup> data;
  std::unique_ptr<comm::ProcessGroup> control;
};

absl::StatusOr<ProcessGroups> FormGroups(comm::Store& store,
                                         const RankOptions& o,
                                         const std::string& prefix,
                                         const worker::Backend& backend,
                                         int device) {
  ProcessGroups pgs;
  comm::GlooOptions control;
  control.rank = o.rank;
  control.size = o.world_size;
  control.hostname = o.host;
  control.timeout = std::chrono::seconds(o.pg_timeout_s);
  control.prefix = prefix + "control";
  DN_ASSIGN_OR_RETURN(pgs.control, comm::MakeGlooProcessGroup(store, control));
  if (backend.device() == worker::Device::kCpu) {
    comm::GlooOptions data = control;
    data.prefix = prefix + "data";
    DN_ASSIGN_OR_RETURN(pgs.data, comm::MakeGlooProcessGroup(store, data));
  } else {
#ifdef DENOISED_WITH_CUDA
    comm::NcclOptions data;
    data.rank = o.rank;
    data.size = o.world_size;
    data.device = device;
    data.stream = backend.stream();
    data.timeout = std::chrono::seconds(o.pg_timeout_s);
    data.prefix = prefix + "data";
    DN_ASSIGN_OR_RETURN(pgs.data, comm::MakeNcclProcessGroup(store, data));
#else
    (void)device;
    return absl::UnimplementedError(
        "--backend cuda: this build has no CUDA support (DENOISED_CUDA=OFF)");
#endif
  }
  return pgs;
}

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

int RunRank(const RankOptions& o) {
  SetLogTag(absl::StrCat(o.group, "/r", o.rank));
  auto fail = [](const absl::Status& s) {
    DN_LOG(ERROR) << s.ToString();
    return 2;
  };
  if (o.world_size < 1 || o.rank < 0 || o.rank >= o.world_size) {
    return fail(absl::InvalidArgumentError(absl::StrCat(
        "--rank/--world-size: rank ", o.rank, " of ", o.world_size)));
  }
  if (o.model_dir.empty() == o.preset.empty()) {
    return fail(absl::InvalidArgumentError("give exactly one of --model, --preset"));
  }

  // SIGTERM/SIGINT are handled by a thread (a clean leave).
  InstallStopSignalHandlers();

  RankMetrics metrics(o.group, o.rank);
  std::unique_ptr<MetricsEndpoint> endpoint;
  if (!o.metrics_listen.empty()) {
    absl::StatusOr<std::unique_ptr<MetricsEndpoint>> e =
        MetricsEndpoint::Start(o.metrics_listen, metrics.registry);
    if (!e.ok()) return fail(e.status());
    endpoint = *std::move(e);
  }

  // Model and backend.
  absl::StatusOr<std::unique_ptr<worker::WeightSource>> weights;
  if (!o.model_dir.empty()) {
    weights = worker::OpenCheckpoint(o.model_dir);
  } else {
    absl::StatusOr<worker::WanConfig> config = worker::PresetConfig(o.preset);
    if (!config.ok()) return fail(config.status());
    weights = worker::MakePresetWeights(*config, o.preset_seed);
  }
  if (!weights.ok()) return fail(weights.status());
  const worker::WanConfig& config = (*weights)->config();
  const std::string model_name =
      DefaultModelName(o.model_name, o.model_dir, o.preset);
  worker::BackendOptions bo;
  bo.name = o.backend;
  bo.device = o.device >= 0 ? o.device : o.rank;
  bo.threads = o.threads;
  absl::StatusOr<std::unique_ptr<worker::Backend>> backend =
      worker::MakeBackend(bo);
  if (!backend.ok()) return fail(backend.status());
  metrics.SetInfo((*backend)->name(), (*backend)->device_description());

  // Attach.
  grpc::ChannelArguments args;
  const int max_msg = static_cast<int>(std::min<int64_t>(
      o.max_message_bytes, std::numeric_limits<int>::max()));
  args.SetMaxReceiveMessageSize(max_msg);
  args.SetMaxSendMessageSize(max_msg);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> creds =
      MakeChannelCredentials(o.tls, "");
  if (!creds.ok()) return fail(creds.status());
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateCustomChannel(o.coordinator, *creds, args);
  if (!channel->WaitForConnected(std::chrono::system_clock::now() +
                                 std::chrono::seconds(o.connect_timeout_s))) {
    return fail(absl::UnavailableError(
        absl::StrCat("--coordinator: cannot reach ", o.coordinator, " within ",
                     o.connect_timeout_s, " s")));
  }
  Connection conn(channel);
  {
    vi::RankMessage m;
    vi::Hello* h = m.mutable_hello();
    h->set_group(o.group);
    h->set_rank(o.rank);
    h->set_world_size(o.world_size);
    h->set_generation(o.generation);
    h->mutable_model()->set_name(model_name);
    h->mutable_model()->set_config_hash(config.Hash());
    *h->mutable_model()->mutable_info() =
        ModelInfoFromConfig(config, model_name, o.max_tokens);
    h->set_backend((*backend)->name());
    char host[256] = {0};
    gethostname(host, sizeof(host) - 1);
    h->set_host(host);
    h->set_device((*backend)->device_description());
    if (endpoint) h->set_metrics_address(endpoint->address());
    h->set_secret(o.secret);
    h->set_server_version(Version());
    if (!conn.Write(m)) {
      const grpc::Status s = conn.Finish();
      return fail(absl::UnavailableError("Attach: " + s.error_message()));
    }
  }
  vi::CoordinatorMessage welcome;
  if (!conn.Read(&welcome) || !welcome.has_welcome()) {
    const grpc::Status s = conn.Finish();
    return fail(absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                             "the coordinator refused this rank: " +
                                 s.error_message()));
  }
  const std::string prefix = welcome.welcome().store_prefix();
  const int heartbeat_ms = welcome.welcome().heartbeat_interval_ms() > 0
                               ? welcome.welcome().heartbeat_interval_ms()
                               : kHeartbeatIntervalMs;
  DN_LOG(INFO) << "attached to " << o.coordinator << " as rank " << o.rank
               << "/" << o.world_size << " of group " << o.group
               << " (generation " << o.generation << ", model " << model_name
               << ", " << (*backend)->device_description() << ")";

  // Reader, heartbeat and signal threads. They end the process.
  JobQueue jobs;
  std::atomic<bool> leaving{false};
  std::thread reader([&] {
    vi::CoordinatorMessage msg;
    bool shutdown = false;
    while (conn.Read(&msg)) {
      switch (msg.msg_case()) {
        case vi::CoordinatorMessage::kJob:
          jobs.Push(std::move(*msg.mutable_job()));
          break;
        case vi::CoordinatorMessage::kCancel:
          jobs.Cancel(msg.cancel());
          break;
        case vi::CoordinatorMessage::kShutdown:
          DN_LOG(INFO) << "shutdown: " << msg.shutdown().reason();
          shutdown = true;
          break;
        default:
          break;
      }
    }
    const grpc::Status s = conn.Finish();
    if (shutdown || leaving.load()) ExitNow(0);
    if (s.ok()) {
      DN_LOG(INFO) << "the coordinator closed the stream: " << s.error_message();
      ExitNow(0);
    }
    DN_LOG(ERROR) << "coordinator stream ended: "
                  << StatusCodeName(s.error_code()) << ": " << s.error_message();
    ExitNow(3);
  });
  reader.detach();
  std::thread heartbeat([&] {
    for (;;) {
      std::this_thread::sleep_for(std::chrono::milliseconds(heartbeat_ms));
      vi::RankMessage m;
      m.mutable_heartbeat()->set_unix_millis(UnixMillisNow());
      conn.Write(m);
    }
  });
  heartbeat.detach();
  std::thread signal_thread([&] {
    const int sig = WaitStopSignal(std::chrono::milliseconds(-1));
    DN_LOG(INFO) << "signal " << sig << ": leaving the group";
    leaving = true;
    vi::RankMessage bye;
    bye.mutable_leave()->set_reason(absl::StrCat("signal ", sig));
    conn.Write(bye);
    conn.WritesDone();
    // The coordinator closes the stream; the reader then exits 0.
    std::this_thread::sleep_for(std::chrono::seconds(3));
    ExitNow(0);
  });
  signal_thread.detach();

  // From here on, threads use the locals: leave only through ExitNow.
  auto die = [](const absl::Status& s, int code) {
    DN_LOG(ERROR) << s.ToString();
    ExitNow(code);
  };

  // Process groups, engine, warm-up.
  GrpcStore store(channel, o.secret);
  absl::StatusOr<ProcessGroups> pgs =
      FormGroups(store, o, prefix, **backend, bo.device);
  if (!pgs.ok()) die(pgs.status(), 4);
  worker::EngineOptions eo;
  eo.max_tokens = o.max_tokens;
  eo.use_graphs = o.use_graphs;
  const auto t_load = std::chrono::steady_clock::now();
  absl::StatusOr<std::unique_ptr<worker::Engine>> engine = worker::Engine::Create(
      **weights, **backend, *pgs->data, *pgs->control, eo);
  if (!engine.ok()) die(engine.status(), 4);
  absl::StatusOr<worker::LatentShape> warm =
      ParseWarmupLatent(o.warmup_latent, config.in_channels);
  if (!warm.ok()) die(warm.status(), 2);
  absl::StatusOr<double> step_seconds =
      (*engine)->Warmup(*warm, o.warmup_text_len);
  if (!step_seconds.ok()) die(step_seconds.status(), 4);
  const double load_seconds = std::chrono::duration<double>(
                                  std::chrono::steady_clock::now() - t_load)
                                  .count();
  metrics.SetMemoryPeak((*backend)->peak_memory_bytes());
  {
    vi::RankMessage m;
    m.mutable_ready()->set_warmup_seconds(load_seconds);
    const int64_t tokens = worker::TokenCount(config, *warm);
    m.mutable_ready()->set_seconds_per_token_step(
        tokens > 0 ? *step_seconds / static_cast<double>(tokens) : 0);
    conn.Write(m);
  }
  DN_LOG(INFO) << "ready: loaded " << (*weights)->description() << " and warmed up in "
               << load_seconds << " s (" << *step_seconds
               << " s/step at latent " << o.warmup_latent << ")";

  // Jobs.
  for (;;) {
    vi::Job job = jobs.Pop();
    bool fatal = false;
    vi::JobResult result =
        RunJob(job, **engine, **backend, conn, jobs, metrics, o.rank, &fatal);
    vi::RankMessage m;
    *m.mutable_result() = std::move(result);
    const int code = m.result().status_code();
    conn.Write(m);
    if (fatal) {
      die(absl::Status(static_cast<absl::StatusCode>(code),
                       absl::StrCat("job ", job.request_id(),
                                    " broke the group: ",
                                    m.result().status_message())),
          4);
    }
  }
}

int WorkerRankMain(int argc, char** argv) {
  RankOptions o;
  int max_message_mb = static_cast<int>(o.max_message_bytes >> 20);
  FlagSet flags("denoised worker-rank",
                "One rank of a worker group (started by `denoised worker`).");
  flags.String("coordinator", &o.coordinator, "coordinator worker address HOST:PORT");
  flags.String("group", &o.group, "worker group name");
  flags.Int("rank", &o.rank, "this rank");
  flags.Int("world-size", &o.world_size, "ranks in the group");
  flags.Int64("generation", &o.generation, "the launcher's restart counter");
  flags.String("model", &o.model_dir, "checkpoint folder");
  flags.String("preset", &o.preset, "preset model with seeded random weights");
  flags.Uint64("preset-seed", &o.preset_seed, "seed of the preset weights");
  flags.String("model-name", &o.model_name, "registered model name");
  flags.String("backend", &o.backend, "cpu | cuda");
  flags.Int("device", &o.device, "CUDA device (-1: the rank)");
  flags.Int("threads", &o.threads, "CPU backend threads (0: all cores)");
  flags.String("host", &o.host, "address the rank's process groups listen on");
  flags.String("metrics-listen", &o.metrics_listen, "/metrics address HOST:PORT");
  flags.Int64("max-tokens", &o.max_tokens, "largest request, in tokens");
  flags.Bool("graphs", &o.use_graphs, "capture steps as CUDA graphs");
  flags.String("warmup-latent", &o.warmup_latent, "warm-up latent size FxHxW");
  flags.Int("warmup-text-len", &o.warmup_text_len, "warm-up text tokens");
  flags.Int("connect-timeout", &o.connect_timeout_s, "seconds to reach the coordinator");
  flags.Int("pg-timeout", &o.pg_timeout_s, "process-group timeout, seconds");
  flags.Int("max-message-mb", &max_message_mb, "largest gRPC message, MiB");
  AddTlsFlags(flags, "", &o.tls, "TLS to the coordinator's worker port");
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;
  o.max_message_bytes = int64_t{max_message_mb} << 20;
  if (const char* s = std::getenv(kSecretEnv)) o.secret = s;
  return RunRank(o);
}

}  // namespace dn::server
