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
// launcher then restarts the whole group with a new generation).
#ifndef DN_SERVER_RANK_RUNNER_H_
#define DN_SERVER_RANK_RUNNER_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "server/credentials.h"

namespace dn::server {

struct RankOptions {
  std::string coordinator;  // HOST:PORT of the coordinator's worker port
  std::string group;
  int rank = 0;
  int world_size = 1;
  int64_t generation = 1;
  std::string model_dir;      // a diffusers checkpoint folder, or
  std::string preset;         // a preset name ("tiny", ...)
  uint64_t preset_seed = 0;
  std::string model_name;     // default: folder basename or preset name
  std::string backend = "cpu";
  int device = -1;            // CUDA ordinal; -1 = rank
  int threads = 0;            // CPU backend threads; 0 = all
  std::string host = "127.0.0.1";  // address the data/control groups bind
  std::string metrics_listen;       // empty = no /metrics
  std::string secret;
  int64_t max_tokens = 80000;
  std::string lora_dir;  // --lora-dir: LoRA files requests may name
  bool use_graphs = true;
  // 2 CFG halves x world_size/2 Ulysses ranks (docs/ENGINE.md, "CFG-parallel").
  bool cfg_parallel = false;
  std::string warmup_latent = "1x16x16";  // latent FxHxW
  int warmup_text_len = 32;
  int connect_timeout_s = 60;
  int pg_timeout_s = 120;  // rendezvous and collective timeout
  int64_t max_message_bytes = int64_t{256} << 20;
  // TLS to the coordinator's worker port (client cert for mutual TLS).
  TlsFiles tls;
};

// Runs the rank until it must exit; returns the process exit code.
int RunRank(const RankOptions& options);

// `denoised worker-rank ...` (hidden; started by `denoised worker`).
int WorkerRankMain(int argc, char** argv);

// The model name a worker registers: `name` if set, else the basename of
// `model_dir` (trailing slashes ignored), else the preset name.
std::string DefaultModelName(const std::string& name,
                             const std::string& model_dir,
                             const std::string& preset);

}  // namespace dn::server

#endif  // DN_SERVER_RANK_RUNNER_H_
