#include "server/worker_launcher.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "comm/base/flags.h"
#include "comm/base/log.h"
#include "server/credentials.h"
#include "server/process.h"
#include "server/protocol.h"
#include "server/rank_runner.h"

namespace dn::server {

namespace {

using Clock = std::chrono::steady_clock;

std::string HostName() {
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  return host;
}

// "HOST:PORT" -> "HOST:(PORT+rank)"; port 0 stays 0.
std::string RankMetricsAddress(const std::string& listen, int rank) {
  if (listen.empty()) return "";
  const size_t colon = listen.rfind(':');
  int port = 0;
  if (colon == std::string::npos ||
      !absl::SimpleAtoi(listen.substr(colon + 1), &port)) {
    return listen;  // the rank reports the error
  }
  return absl::StrCat(listen.substr(0, colon), ":", port == 0 ? 0 : port + rank);
}

// Waits up to `timeout` for SIGTERM/SIGINT; true if one came.
bool WaitForStopSignal(std::chrono::milliseconds timeout) {
  return WaitStopSignal(timeout) != 0;
}

// Waits until a TCP/HTTP2 connection to the coordinator succeeds, retrying
// with backoff (each attempt waits up to 2 s, then 0.5 s doubling to 5 s)
// and logging each failure. False if a
// stop signal came first.
bool WaitForCoordinator(
    const std::string& target,
    const std::shared_ptr<grpc::ChannelCredentials>& credentials) {
  auto backoff = std::chrono::milliseconds(500);
  const auto since = Clock::now();
  for (int attempt = 1;; ++attempt) {
    grpc::ChannelArguments args;
    // A fresh subchannel each time, with short reconnect backoffs of its own.
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
    args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 200);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
    std::shared_ptr<grpc::Channel> channel = grpc::CreateCustomChannel(
        target,
        credentials ? credentials : grpc::InsecureChannelCredentials(), args);
    if (channel->WaitForConnected(std::chrono::system_clock::now() +
                                  std::chrono::seconds(2))) {
      if (attempt > 1) {
        DN_LOG(INFO) << "coordinator " << target << " reachable again after "
                     << std::chrono::duration<double>(Clock::now() - since).count()
                     << " s";
      }
      return true;
    }
    DN_LOG(WARNING) << "coordinator " << target
                    << " unreachable (no connection within 2 s, channel "
                    << (channel->GetState(false) == GRPC_CHANNEL_TRANSIENT_FAILURE
                            ? "failing to connect"
                            : "still connecting")
                    << ", attempt " << attempt << "); retrying in "
                    << backoff.count() << " ms";
    if (WaitForStopSignal(backoff)) return false;
    backoff = std::min(backoff * 2, std::chrono::milliseconds(5000));
  }
}

}  // namespace

int RunLauncher(const LauncherOptions& o) {
  const std::string model_name =
      DefaultModelName(o.model_name, o.model_dir, o.preset);
  const std::string name =
      o.name.empty() ? absl::StrCat(model_name, "-", HostName(), "-", getpid())
                     : o.name;
  SetLogTag(absl::StrCat("worker ", name));
  if (o.ranks < 1) {
    DN_LOG(ERROR) << "--ranks: must be >= 1";
    return 2;
  }
  if (o.model_dir.empty() == o.preset.empty()) {
    DN_LOG(ERROR) << "give exactly one of --model DIR, --preset NAME";
    return 2;
  }
  if (o.coordinator.empty()) {
    DN_LOG(ERROR) << "--coordinator: required";
    return 2;
  }
  int threads = o.threads;
  if (threads <= 0 && o.backend == "cpu") {
    const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    threads = std::max(1, static_cast<int>(cores) / o.ranks);
  }

  InstallStopSignalHandlers();

  int64_t generation = 1;
  auto backoff = std::chrono::seconds(1);
  for (;;) {
    // Ranks attach to the coordinator at once and exit if it is not there:
    // wait for it first (a group started before its coordinator, or one
    // whose coordinator restarted).
    if (!WaitForCoordinator(o.coordinator, o.probe_credentials)) {
      DN_LOG(INFO) << "group " << name << " stopped";
      return 0;
    }
    std::vector<pid_t> pids(static_cast<size_t>(o.ranks), -1);
    bool spawn_failed = false;
    for (int r = 0; r < o.ranks && !spawn_failed; ++r) {
      SpawnOptions so;
      so.args = {"worker-rank",
                 "--coordinator", o.coordinator,
                 "--group", name,
                 "--rank", absl::StrCat(r),
                 "--world-size", absl::StrCat(o.ranks),
                 "--generation", absl::StrCat(generation),
                 "--model-name", model_name,
                 "--backend", o.backend,
                 "--device", absl::StrCat(r),
                 "--threads", absl::StrCat(threads)};
      if (!o.model_dir.empty()) {
        so.args.insert(so.args.end(), {"--model", o.model_dir});
      } else {
        so.args.insert(so.args.end(),
                       {"--preset", o.preset, "--preset-seed",
                        absl::StrCat(o.preset_seed)});
      }
      const std::string metrics = RankMetricsAddress(o.metrics_listen, r);
      if (!metrics.empty()) {
        so.args.insert(so.args.end(), {"--metrics-listen", metrics});
      }
      so.args.insert(so.args.end(), o.rank_flags.begin(), o.rank_flags.end());
      if (!o.secret.empty()) so.env.emplace_back(kSecretEnv, o.secret);
      absl::StatusOr<pid_t> pid = Spawn(so);
      if (!pid.ok()) {
        DN_LOG(ERROR) << "rank " << r << ": " << pid.status().ToString();
        spawn_failed = true;
      } else {
        pids[static_cast<size_t>(r)] = *pid;
      }
    }
    const auto started = Clock::now();
    if (!spawn_failed) {
      DN_LOG(INFO) << "group " << name << " generation " << generation << ": "
                   << o.ranks << " " << o.backend << " rank(s) of model "
                   << model_name << " started, coordinator " << o.coordinator;
    }

    // Wait for a stop signal or a rank exit.
    bool stop = false;
    int dead_rank = -1;
    int dead_status = 0;
    while (!spawn_failed && !stop && dead_rank < 0) {
      stop = WaitForStopSignal(std::chrono::milliseconds(200));
      for (int r = 0; r < o.ranks && !stop; ++r) {
        int status = 0;
        if (waitpid(pids[static_cast<size_t>(r)], &status, WNOHANG) ==
            pids[static_cast<size_t>(r)]) {
          dead_rank = r;
          dead_status = status;
          pids[static_cast<size_t>(r)] = -1;
          break;
        }
      }
    }
    if (dead_rank >= 0) {
      DN_LOG(WARNING) << "rank " << dead_rank << " (generation " << generation
                      << ") ended: " << DescribeWaitStatus(dead_status)
                      << "; stopping the other ranks";
    }
    // Stop the rest: SIGTERM all first so they leave together.
    for (pid_t pid : pids) {
      if (pid > 0) kill(pid, SIGTERM);
    }
    for (pid_t pid : pids) {
      if (pid > 0) Terminate(pid, std::chrono::seconds(10));
    }
    if (stop) {
      DN_LOG(INFO) << "group " << name << " stopped";
      return 0;
    }
    if (Clock::now() - started > std::chrono::minutes(1)) {
      backoff = std::chrono::seconds(1);
    }
    DN_LOG(INFO) << "restarting group " << name << " as generation "
                 << generation + 1 << " in " << backoff.count() << " s";
    if (WaitForStopSignal(backoff)) {
      DN_LOG(INFO) << "group " << name << " stopped";
      return 0;
    }
    backoff = std::min(backoff * 2, std::chrono::seconds(30));
    ++generation;
  }
}

int WorkerMain(int argc, char** argv) {
  LauncherOptions o;
  std::string host, warmup_latent;
  int64_t max_tokens = 0;
  FlagSet flags("denoised worker",
                "Starts and supervises one worker group: --ranks rank "
                "processes that serve one model for the coordinator.");
  flags.String("coordinator", &o.coordinator,
               "the coordinator's worker address HOST:PORT");
  flags.String("model", &o.model_dir, "diffusers checkpoint folder");
  flags.String("preset", &o.preset,
               "or a preset with seeded random weights (tiny, demo-pixel, "
               "wan2.1-t2v-1.3b, wan2.1-t2v-14b)");
  flags.Uint64("preset-seed", &o.preset_seed, "seed of the preset weights");
  flags.String("model-name", &o.model_name,
               "model name clients ask for (default: the folder's basename "
               "or the preset name)");
  flags.Int("ranks", &o.ranks, "rank processes (sequence-parallel degree)");
  flags.String("backend", &o.backend, "cpu | cuda (rank r uses GPU r)");
  flags.String("name", &o.name, "group name (default: <model>-<host>-<pid>)");
  flags.String("metrics-listen", &o.metrics_listen,
               "/metrics of rank r on HOST:PORT+r (port 0: any free port)");
  flags.String("secret", &o.secret,
               "shared secret of the coordinator (default: $DENOISED_SECRET)");
  flags.Int("threads", &o.threads, "CPU threads per rank (0: cores / ranks)");
  flags.String("host", &host,
               "address ranks bind their process groups to (default 127.0.0.1)");
  flags.Int64("max-tokens", &max_tokens, "largest request in tokens (0: default)");
  flags.String("warmup-latent", &warmup_latent, "warm-up latent FxHxW");
  TlsFiles tls;
  AddTlsFlags(flags, "", &tls, "TLS to the coordinator's worker port (passed to the ranks)");
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;
  if (tls.enabled()) {
    // Check the files once here, so a typo fails the launcher, not every rank.
    if (absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> c =
            MakeChannelCredentials(tls, "");
        !c.ok()) {
      std::fprintf(stderr, "denoised worker: %s\n", c.status().ToString().c_str());
      return 2;
    } else {
      o.probe_credentials = *c;
    }
    for (const auto& [flag, value] :
         {std::pair<const char*, const std::string*>{"--tls-cert", &tls.cert},
          {"--tls-key", &tls.key},
          {"--tls-ca", &tls.ca}}) {
      if (!value->empty()) o.rank_flags.insert(o.rank_flags.end(), {flag, *value});
    }
  }
  if (o.secret.empty()) {
    if (const char* s = std::getenv(kSecretEnv)) o.secret = s;
  }
  if (!host.empty()) o.rank_flags.insert(o.rank_flags.end(), {"--host", host});
  if (max_tokens > 0) {
    o.rank_flags.insert(o.rank_flags.end(),
                        {"--max-tokens", absl::StrCat(max_tokens)});
  }
  if (!warmup_latent.empty()) {
    o.rank_flags.insert(o.rank_flags.end(), {"--warmup-latent", warmup_latent});
  }
  return RunLauncher(o);
}

}  // namespace dn::server
