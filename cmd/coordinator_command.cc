// `denoised coordinator`: flags -> CoordinatorOptions, then serve until
// SIGTERM/SIGINT.
#include "cmd/coordinator_command.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "base/flags.h"
#include "base/log.h"
#include "server/auth.h"
#include "server/coordinator.h"
#include "base/process.h"
#include "server/protocol.h"
#include "server/version.h"

namespace dn::cmd {

using namespace ::dn::server;  // NOLINT: this file only wires the server's parts

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

int CoordinatorCommand(int argc, char** argv) {
  CoordinatorOptions o;
  int max_message_mb = static_cast<int>(o.max_message_bytes >> 20);
  int max_inflight_mb = static_cast<int>(o.max_inflight_bytes >> 20);
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
  flags.Int("max-inflight-mb", &max_inflight_mb,
            "memory budget: MiB of Generate requests in flight; a call over it "
            "is refused RESOURCE_EXHAUSTED before it is parsed (0: no limit)");
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
  o.max_inflight_bytes = int64_t{max_inflight_mb} << 20;
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

}  // namespace dn::cmd
