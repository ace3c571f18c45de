// File: cmd/main.cc
//
// The `denoised` executable: one binary, many subcommands. This table is the
// only place that knows every command; each library exposes its commands as
// `int XxxMain/XxxCommand(int argc, char** argv)` and nothing depends on cmd/.
#include <cstdio>
#include <cstring>
#include <string>

#include "bench/comm_bench.h"
#include "bench/load_bench.h"
#include "bench/quality_bench.h"
#include "bench/step_bench.h"
#include "cmd/coordinator_command.h"
#include "server/client.h"
#include "server/coordinator.h"
#include "server/demo.h"
#include "server/health_check_command.h"
#include "server/rank_runner.h"
#include "server/launcher.h"
#include "server/version.h"
#include "worker/make_checkpoint_command.h"
#include "worker/run_command.h"

namespace {

using CommandFn = int (*)(int argc, char** argv);

struct Command {
  const char* name;
  const char* summary;
  CommandFn fn;
  bool hidden;  // internal subcommands (rank processes) are not listed
};

// Every subcommand, in the order --help lists them. Each takes argv starting
// at its own name.
const Command kCommands[] = {
    {"version", "print the version", [](int, char**) {
       std::printf("denoised %s\n", dn::Version());
       return 0;
     }, false},
    {"demo", "run the whole service locally (CPU, demo model): one prompt -> an animated GIF",
     dn::server::DemoMain, false},
    {"coordinator", "serve the Denoiser gRPC API and dispatch to worker groups",
     dn::cmd::CoordinatorCommand, false},
    {"worker", "start and supervise one worker group (N rank processes)",
     dn::server::LauncherMain, false},
    {"generate", "call a coordinator's Generate and write the latents (or a GIF/PNG)",
     dn::server::GenerateMain, false},
    {"health", "check a server's grpc.health.v1 status (exit 0 iff SERVING)",
     dn::server::HealthCommand, false},
    {"worker-rank", "one rank of a worker group (started by `worker`)",
     dn::server::RankMain, true},
    {"bench comm", "all-to-all latency and bus bandwidth (Gloo CPU ranks or NCCL GPUs)", dn::bench::BenchCommCommand, false},
    {"bench comm-rank", "one rank of `bench comm` (internal)", dn::bench::BenchCommRankCommand, true},
    {"make-checkpoint", "write a diffusers-layout checkpoint with seeded random weights", dn::worker::MakeCheckpointCommand, false},
    {"run", "run the engine without the service (N local rank processes)",
     dn::worker::RunCommand, false},
    {"run-rank", "", dn::worker::RunRankCommand, true},
    {"bench step", "time one denoising step (ms, all-to-all, TFLOP/s, memory)",
     dn::bench::BenchStepCommand, false},
    {"bench step-rank", "", dn::bench::BenchStepRankCommand, true},
    {"bench quality", "the fast tier's quality against the exact path (markdown table; docs/QUALITY.md)",
     dn::bench::BenchQualityCommand, false},
    {"bench load", "N concurrent streaming clients against a coordinator (throughput, latency, outcomes)",
     dn::bench::BenchLoadCommand, false},
};

void PrintUsage() {
  std::printf(
      "denoised %s: diffusion-transformer denoising over gRPC, sharded across "
      "GPUs\n\nusage: denoised <command> [flags]   (denoised <command> --help "
      "for its flags)\n\ncommands:\n",
      dn::Version());
  for (const Command& c : kCommands)
    if (!c.hidden) std::printf("  %-16s %s\n", c.name, c.summary);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 ||
      std::strcmp(argv[1], "-h") == 0 || std::strcmp(argv[1], "help") == 0) {
    PrintUsage();
    return argc < 2 ? 2 : 0;
  }
  // Two-word commands ("bench comm") are matched first.
  if (argc >= 3) {
    const std::string two = std::string(argv[1]) + " " + argv[2];
    for (const Command& c : kCommands)
      if (two == c.name) return c.fn(argc - 2, argv + 2);
  }
  for (const Command& c : kCommands)
    if (std::strcmp(argv[1], c.name) == 0) return c.fn(argc - 1, argv + 1);
  std::fprintf(stderr, "denoised: unknown command '%s'\n\n", argv[1]);
  PrintUsage();
  return 2;
}
