#include "server/launcher.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <random>
#include <string>
#include <vector>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "denoised/v1/worker.grpc.pb.h"
#include "base/flags.h"
#include "base/log.h"
#include "server/credentials.h"
#include "server/group_slices.h"
#include "server/host_address.h"
#include "base/process.h"
#include "server/proto_convert.h"
#include "server/protocol.h"
#include "server/rank_runner.h"
#include "worker/wan_config.h"

namespace dn::server {

namespace vi = ::denoised::v1::internal;

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
    const std::shared_ptr<grpc::ChannelCredentials>& credentials,
    bool* was_down) {
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
      *was_down = attempt > 1;
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

// The launcher's end of WorkerControl.SyncSlice.
class SliceClient {
 public:
  SliceClient(const LauncherOptions& o, std::string group, std::string host)
      : stub_(vi::WorkerControl::NewStub(grpc::CreateChannel(
            o.coordinator, o.probe_credentials ? o.probe_credentials
                                               : grpc::InsecureChannelCredentials()))) {
    base_.set_secret(o.secret);
    base_.set_group(std::move(group));
    base_.set_group_size(o.group_size);
    base_.set_first_rank(o.first_rank);
    base_.set_local_ranks(o.ranks);
    base_.set_cfg_degree(o.cfg_parallel.value_or(false) ? 2 : 1);
    base_.set_host(std::move(host));
    base_.set_launcher_id(absl::StrCat(HostName(), "/", getpid(), "/",
                                       absl::Hex(std::random_device{}())));
  }

  absl::StatusOr<vi::SliceStatus> Sync(int64_t generation, bool leaving = false) {
    vi::SliceRequest req = base_;
    req.set_generation(generation);
    req.set_leaving(leaving);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    vi::SliceStatus resp;
    const grpc::Status s = stub_->SyncSlice(&ctx, req, &resp);
    if (!s.ok()) {
      return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                          s.error_message());
    }
    return resp;
  }

 private:
  std::unique_ptr<vi::WorkerControl::Stub> stub_;
  vi::SliceRequest base_;
};

bool Transient(const absl::Status& s) {
  return s.code() == absl::StatusCode::kUnavailable ||
         s.code() == absl::StatusCode::kDeadlineExceeded;
}

std::string Ranks(const google::protobuf::RepeatedField<int32_t>& r) {
  return RankList(std::vector<int>(r.begin(), r.end()));
}

// The one place where the launcher's CFG-parallel choice (the explicit flag,
// else CfgParallelDefault) reaches its ranks.
std::vector<std::string> CfgParallelRankFlags(bool cfg_parallel) {
  if (!cfg_parallel) return {};
  return {"--cfg-parallel"};
}

}  // namespace

bool CfgParallelDefault(int group_size, int first_rank, int local_ranks) {
  return group_size > local_ranks && group_size % 2 == 0 &&
         local_ranks == group_size / 2 &&
         (first_rank == 0 || first_rank == group_size / 2);
}

int RunLauncher(const LauncherOptions& options) {
  LauncherOptions o = options;
  const std::string model_name =
      DefaultModelName(o.model_name, o.model_dir, o.preset);
  const std::string name =
      o.name.empty() ? absl::StrCat(model_name, "-", HostName(), "-", getpid())
                     : o.name;
  SetLogTag(absl::StrCat("worker ", name));
  if (o.ranks < 1) {
    DN_LOG(ERROR) << "--ranks/--local-ranks: must be >= 1";
    return 2;
  }
  if (o.group_size == 0) o.group_size = o.ranks;
  if (o.group_size < 1 || o.first_rank < 0 ||
      o.first_rank > o.group_size - o.ranks) {
    DN_LOG(ERROR) << "--first-rank/--local-ranks/--group-size: ranks "
                  << o.first_rank << ".." << o.first_rank + o.ranks - 1
                  << " do not lie inside a group of " << o.group_size;
    return 2;
  }
  if (o.slice_timeout_s < 1) {
    DN_LOG(ERROR) << "--slice-timeout: must be >= 1 second";
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
  const bool spans_launchers = o.group_size != o.ranks;
  if (spans_launchers && o.host.empty()) {
    absl::StatusOr<std::string> a = DiscoverNonLoopbackAddress();
    if (!a.ok()) {
      DN_LOG(ERROR) << "--host: the group spans launchers (--group-size "
                    << o.group_size << ", --local-ranks " << o.ranks
                    << ") so its ranks must advertise an address their peers "
                       "reach, and none was found ("
                    << a.status().message() << "); pass --host ADDR";
      return 2;
    }
    o.host = *a;
    DN_LOG(INFO) << "--host not given: ranks advertise " << o.host;
  } else if (spans_launchers && IsLoopbackAddress(o.host)) {
    DN_LOG(WARNING) << "--host " << o.host
                    << ": a loopback address; only launchers on this host can "
                       "reach these ranks";
  }
  int threads = o.threads;
  if (threads <= 0 && o.backend == "cpu") {
    const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    threads = std::max(1, static_cast<int>(cores) / o.ranks);
  }
  const bool cfg_parallel_default =
      CfgParallelDefault(o.group_size, o.first_rank, o.ranks);
  const bool cfg_parallel = o.cfg_parallel.value_or(cfg_parallel_default);
  if (cfg_parallel && o.group_size % 2 != 0) {
    DN_LOG(ERROR) << "--cfg-parallel: needs an even group size (2 CFG halves x "
                     "N/2 Ulysses ranks), got "
                  << o.group_size << " ranks";
    return 2;
  }
  o.cfg_parallel = cfg_parallel;
  const std::vector<std::string> cfg_flags = CfgParallelRankFlags(cfg_parallel);
  if (spans_launchers || cfg_parallel) {
    DN_LOG(INFO) << "slice: ranks " << o.first_rank << ".."
                 << o.first_rank + o.ranks - 1 << " of a group of "
                 << o.group_size << ", "
                 << (cfg_parallel ? absl::StrCat("CFG-parallel: cfg 2 x ulysses ",
                                                 o.group_size / 2)
                                  : absl::StrCat("Ulysses over all ", o.group_size,
                                                 " ranks"))
                 << (options.cfg_parallel.has_value()
                         ? " (--cfg-parallel given)"
                         : absl::StrCat(" (the default for this slice: ",
                                        cfg_parallel_default ? "on" : "off", ")"));
  }

  InstallStopSignalHandlers();

  SliceClient slices(o, name, o.host.empty() ? HostName() : o.host);
  const auto slice_timeout = std::chrono::seconds(o.slice_timeout_s);
  // Since when the group has missed ranks (reset whenever every rank is
  // attached, and after the coordinator was unreachable).
  auto waiting_since = Clock::now();
  auto leave = [&] {
    (void)slices.Sync(0, /*leaving=*/true);
    DN_LOG(INFO) << "group " << name << " stopped";
    return 0;
  };
  auto backoff = std::chrono::seconds(1);
  for (;;) {
    // Ranks attach to the coordinator at once and exit if it is not there:
    // wait for it first (a group started before its coordinator, or one
    // whose coordinator restarted).
    bool was_down = false;
    if (!WaitForCoordinator(o.coordinator, o.probe_credentials, &was_down)) {
      return leave();
    }
    if (was_down) waiting_since = Clock::now();
    // The coordinator checks the slice and assigns the generation.
    absl::StatusOr<vi::SliceStatus> claim = slices.Sync(0);
    if (!claim.ok()) {
      const absl::Status& s = claim.status();
      if (s.code() == absl::StatusCode::kAlreadyExists &&
          Clock::now() - waiting_since < slice_timeout) {
        DN_LOG(WARNING) << "slice not taken yet (retrying until --slice-timeout "
                        << o.slice_timeout_s << " s): " << s.message();
        if (WaitForStopSignal(std::chrono::seconds(1))) return leave();
        continue;
      }
      if (Transient(s)) {
        DN_LOG(WARNING) << "SyncSlice: " << s.ToString() << "; retrying";
        if (WaitForStopSignal(std::chrono::seconds(1))) return leave();
        continue;
      }
      DN_LOG(ERROR) << "the coordinator refused this launcher's slice of group "
                    << name << ": " << StatusCodeName(static_cast<int>(s.code()))
                    << ": " << s.message();
      return 2;
    }
    const int64_t generation = claim->generation();
    std::vector<pid_t> pids(static_cast<size_t>(o.ranks), -1);
    bool spawn_failed = false;
    for (int i = 0; i < o.ranks && !spawn_failed; ++i) {
      const int r = o.first_rank + i;
      SpawnOptions so;
      so.args = {"worker-rank",
                 "--coordinator", o.coordinator,
                 "--group", name,
                 "--rank", absl::StrCat(r),
                 "--world-size", absl::StrCat(o.group_size),
                 "--generation", absl::StrCat(generation),
                 "--model-name", model_name,
                 "--backend", o.backend,
                 "--device", absl::StrCat(i),
                 "--threads", absl::StrCat(threads)};
      if (!o.model_dir.empty()) {
        so.args.insert(so.args.end(), {"--model", o.model_dir});
      } else {
        so.args.insert(so.args.end(),
                       {"--preset", o.preset, "--preset-seed",
                        absl::StrCat(o.preset_seed)});
      }
      if (!o.host.empty()) so.args.insert(so.args.end(), {"--host", o.host});
      const std::string metrics = RankMetricsAddress(o.metrics_listen, i);
      if (!metrics.empty()) {
        so.args.insert(so.args.end(), {"--metrics-listen", metrics});
      }
      so.args.insert(so.args.end(), cfg_flags.begin(), cfg_flags.end());
      so.args.insert(so.args.end(), o.rank_flags.begin(), o.rank_flags.end());
      if (!o.secret.empty()) so.env.emplace_back(kSecretEnv, o.secret);
      absl::StatusOr<pid_t> pid = Spawn(so);
      if (!pid.ok()) {
        DN_LOG(ERROR) << "rank " << r << ": " << pid.status().ToString();
        spawn_failed = true;
      } else {
        pids[static_cast<size_t>(i)] = *pid;
      }
    }
    const auto started = Clock::now();
    if (!spawn_failed) {
      DN_LOG(INFO) << "group " << name << " generation " << generation << ": "
                   << o.ranks << " " << o.backend << " rank(s) "
                   << (spans_launchers
                           ? absl::StrCat("(", o.first_rank, "..",
                                          o.first_rank + o.ranks - 1, " of ",
                                          o.group_size, ") ")
                           : std::string())
                   << "of model " << model_name << " started, coordinator "
                   << o.coordinator;
    }

    // Wait for a stop signal, a rank exit, a new generation of the group, or
    // the slice timeout.
    bool stop = false;
    bool moved_on = false;  // the group re-forms as another generation
    int exit_code = -1;     // give up with this code
    int dead_rank = -1;
    int dead_status = 0;
    auto last_sync = Clock::now();
    while (!spawn_failed && !stop && dead_rank < 0 && !moved_on && exit_code < 0) {
      stop = WaitForStopSignal(std::chrono::milliseconds(200));
      for (int i = 0; i < o.ranks && !stop; ++i) {
        int status = 0;
        if (waitpid(pids[static_cast<size_t>(i)], &status, WNOHANG) ==
            pids[static_cast<size_t>(i)]) {
          dead_rank = o.first_rank + i;
          dead_status = status;
          pids[static_cast<size_t>(i)] = -1;
          break;
        }
      }
      if (stop || dead_rank >= 0 || Clock::now() - last_sync < std::chrono::seconds(1)) {
        continue;
      }
      last_sync = Clock::now();
      absl::StatusOr<vi::SliceStatus> st = slices.Sync(generation);
      if (!st.ok()) {
        if (Transient(st.status())) continue;  // the ranks see it too
        DN_LOG(ERROR) << "the coordinator refused this launcher's slice of group "
                      << name << ": " << st.status().ToString();
        exit_code = st.status().code() == absl::StatusCode::kAlreadyExists ? -1 : 2;
        moved_on = exit_code < 0;  // claim it again, within --slice-timeout
        continue;
      }
      if (st->generation() != generation) {
        DN_LOG(WARNING) << "group " << name << " re-forms as generation "
                        << st->generation() << " (generation " << generation
                        << " failed or a peer slice restarted); restarting ranks "
                        << o.first_rank << ".." << o.first_rank + o.ranks - 1;
        moved_on = true;
        continue;
      }
      // Only peer slices count against --slice-timeout: this launcher's own
      // ranks that fail to start are restarted with backoff, as always (and a
      // launcher of a whole group never times out).
      std::vector<int> peers_missing;
      for (int r : st->missing_ranks()) {
        if (r < o.first_rank || r >= o.first_rank + o.ranks) peers_missing.push_back(r);
      }
      if (peers_missing.empty()) {
        waiting_since = Clock::now();
      } else if (Clock::now() - waiting_since >= slice_timeout) {
        DN_LOG(ERROR) << "giving up: group " << name << " generation "
                      << generation << " has missed ranks "
                      << RankList(peers_missing) << " of " << o.group_size
                      << " for --slice-timeout " << o.slice_timeout_s << " s"
                      << (st->unclaimed_ranks().empty()
                              ? std::string(" (their launchers started them but "
                                            "they never attached)")
                              : absl::StrCat(" (no launcher started ranks ",
                                             Ranks(st->unclaimed_ranks()), ")"));
        exit_code = kExitSliceTimeout;
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
    if (stop) return leave();
    if (exit_code >= 0) {
      (void)slices.Sync(0, /*leaving=*/true);
      return exit_code;
    }
    if (moved_on) continue;  // a peer already waited out the failure
    if (Clock::now() - started > std::chrono::minutes(1)) {
      backoff = std::chrono::seconds(1);
    }
    DN_LOG(INFO) << "restarting ranks of group " << name << " in "
                 << backoff.count() << " s (the coordinator assigns the next "
                 "generation)";
    if (WaitForStopSignal(backoff)) return leave();
    backoff = std::min(backoff * 2, std::chrono::seconds(30));
  }
}

int LauncherMain(int argc, char** argv) {
  LauncherOptions o;
  o.ranks = 0;
  int local_ranks = 0;
  std::string warmup_latent;
  int64_t max_tokens = 0;
  FlagSet flags("denoised worker",
                "Starts and supervises one worker group: --ranks rank "
                "processes that serve one model for the coordinator; or one "
                "slice of a group started by several launchers (--group-size, "
                "--first-rank, --local-ranks, the same --name on each).");
  flags.String("coordinator", &o.coordinator,
               "the coordinator's worker address HOST:PORT");
  flags.String("model", &o.model_dir, "diffusers checkpoint folder");
  flags.String("preset", &o.preset,
               "or a preset with seeded random weights (" +
                   absl::StrJoin(worker::PresetNames(), ", ") + ")");
  flags.Uint64("preset-seed", &o.preset_seed, "seed of the preset weights");
  flags.String("model-name", &o.model_name,
               "model name clients ask for (default: the folder's basename "
               "or the preset name)");
  flags.Int("ranks", &o.ranks,
            "rank processes of a group of this launcher alone (0: 1, or "
            "--local-ranks); --ranks N = --group-size N --first-rank 0 "
            "--local-ranks N");
  flags.Int("group-size", &o.group_size,
            "ranks in the whole group, over all its launchers (0: "
            "--local-ranks)");
  flags.Int("first-rank", &o.first_rank,
            "first global rank this launcher starts (local GPU i runs rank "
            "first-rank + i)");
  flags.Int("local-ranks", &local_ranks, "ranks this launcher starts");
  flags.Int("slice-timeout", &o.slice_timeout_s,
            "seconds the group may miss ranks (peer slices that never "
            "arrive) before this launcher gives up, naming them (exit 3)");
  flags.String("backend", &o.backend, "cpu | cuda (rank r uses GPU r)");
  flags.String("name", &o.name, "group name (default: <model>-<host>-<pid>)");
  flags.String("metrics-listen", &o.metrics_listen,
               "/metrics of rank r on HOST:PORT+r (port 0: any free port)");
  flags.String("secret", &o.secret,
               "shared secret of the coordinator (default: $DENOISED_SECRET)");
  flags.Int("threads", &o.threads, "CPU threads per rank (0: cores / ranks)");
  flags.OptionalBool(
      "cfg-parallel", &o.cfg_parallel,
      "run the group as 2 CFG halves x group-size/2 Ulysses ranks (ranks "
      "[0, N/2) the conditional branch, [N/2, N) the unconditional); unset: on "
      "when the group spans launchers and this slice is one half of it, so "
      "Ulysses stays inside a host (--no-cfg-parallel turns it off)");
  flags.String("host", &o.host,
               "address this host's ranks bind and advertise to their peers "
               "(default 127.0.0.1; a discovered non-loopback address when "
               "the group spans launchers)");
  flags.Int64("max-tokens", &max_tokens, "largest request in tokens (0: default)");
  std::string lora_dir;
  flags.String("lora-dir", &lora_dir,
               "directory of LoRA files (*.safetensors) requests may name (passed to the ranks)");
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
  if (o.ranks > 0 && local_ranks > 0 && o.ranks != local_ranks) {
    std::fprintf(stderr,
                 "denoised worker: --ranks %d and --local-ranks %d disagree "
                 "(give one)\n", o.ranks, local_ranks);
    return 2;
  }
  if (local_ranks > 0) o.ranks = local_ranks;
  if (o.ranks == 0) o.ranks = 1;
  if (max_tokens > 0) {
    o.rank_flags.insert(o.rank_flags.end(),
                        {"--max-tokens", absl::StrCat(max_tokens)});
  }
  if (!lora_dir.empty()) {
    o.rank_flags.insert(o.rank_flags.end(), {"--lora-dir", lora_dir});
  }
  if (!warmup_latent.empty()) {
    o.rank_flags.insert(o.rank_flags.end(), {"--warmup-latent", warmup_latent});
  }
  return RunLauncher(o);
}

}  // namespace dn::server
