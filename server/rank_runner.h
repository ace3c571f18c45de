// File: server/rank_runner.h
//
// One rank process of a worker group (`denoised worker-rank`, started by
// `denoised worker`): attaches to the coordinator (WorkerControl.Attach,
// Hello -> Welcome), forms the group's two process groups through the
// coordinator's store (data: Gloo on CPU / NCCL on CUDA; control: Gloo),
// loads the model, warms up, reports Ready, then runs Jobs: each Job becomes
// one collective Engine::Generate; rank 0 streams a StepReport per step and
// returns the latents in its JobResult. CancelJob messages set the engine's
// StopFlag (all ranks stop at the same step boundary). Heartbeats go out
// from their own thread. The rank serves its own /metrics.
//
// Exit codes: 0 after a Shutdown message or SIGTERM/SIGINT (a clean leave);
// non-zero when the coordinator connection drops or the group breaks (the
// launcher then restarts the whole group with a new generation). The rank's
// setup (weights, backend, process groups, engine) is the one rank-session
// builder of the worker library (worker/rank_session.h).
#ifndef DN_SERVER_RANK_RUNNER_H_
#define DN_SERVER_RANK_RUNNER_H_

#include <cstdint>
#include <string>

#include <memory>

#include "absl/status/status.h"
#include "server/credentials.h"
#include "worker/rank_session.h"

namespace dn::server {

// A rank of the service: the rank setup (worker::RankOptions: model,
// backend, group, engine; ranks = the group's world size) plus what the
// service adds.
struct ServiceRankOptions {
  worker::RankOptions rank;
  std::string coordinator;  // HOST:PORT of the coordinator's worker port
  std::string group;
  int64_t generation = 1;
  std::string model_name;     // default: folder basename or preset name
  std::string metrics_listen; // empty = no /metrics
  std::string secret;
  std::string warmup_latent = "1x16x16";  // latent FxHxW
  int warmup_text_len = 32;
  int connect_timeout_s = 60;
  int64_t max_message_bytes = int64_t{256} << 20;
  // TLS to the coordinator's worker port (client cert for mutual TLS).
  TlsFiles tls;
};

// One rank process of the service. It owns its threads (the stream reader,
// the heartbeat, the signal watcher and a stop watchdog): all are joined
// before Run returns. Stop (or SIGTERM/SIGINT) leaves the group cleanly: a
// Leave message, the stream half-closed, the job in progress stopped at its
// next step boundary. A rank that cannot stop within kStopGraceMs (blocked
// in a rendezvous or a collective with a dead peer) ends the process with
// its exit code: the launcher restarts the group anyway.
class ServiceRank {
 public:
  static constexpr int kStopGraceMs = 5000;

  explicit ServiceRank(ServiceRankOptions options);
  ~ServiceRank();
  ServiceRank(const ServiceRank&) = delete;
  ServiceRank& operator=(const ServiceRank&) = delete;

  // Runs the rank until it must exit; returns the process exit code (0
  // after a Shutdown message, Stop or a signal; 2 bad options; 3 the
  // coordinator stream broke; 4 the group or its setup broke).
  int Run();
  // From any thread: leave the group (Run then returns 0).
  void Stop();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

// `denoised worker-rank ...` (hidden; started by `denoised worker`).
int RankMain(int argc, char** argv);

// The model name a worker registers: `name` if set, else the basename of
// `model_dir` (trailing slashes ignored), else the preset name.
std::string DefaultModelName(const std::string& name,
                             const std::string& model_dir,
                             const std::string& preset);

}  // namespace dn::server

#endif  // DN_SERVER_RANK_RUNNER_H_
