// File: server/launcher.h
//
// `denoised worker`: launches the N rank processes of one worker group
// (`denoised worker-rank`, fork + exec of this binary; under CUDA rank r uses
// GPU r) and supervises them. When any rank exits, the launcher stops the
// others and restarts the whole group with generation + 1, after a backoff
// (1 s doubling to 30 s; reset once a generation has run for a minute).
// Before each generation it waits for the coordinator to accept connections
// (each attempt waits up to 2 s for a connection, then backs off 0.5 s
// doubling to 5 s, logging why), so a group started
// before its coordinator, or one whose coordinator restarted (its ranks exit
// when the Attach stream ends), registers again on its own.
// SIGTERM/SIGINT stop the group cleanly (each rank leaves the coordinator)
// and the launcher exits 0.
//
// A launcher may start only a slice of a group (--group-size N --first-rank R
// --local-ranks K); several launchers, on several hosts, then form one
// group. Every launcher, sliced or not, syncs its slice with the coordinator
// (WorkerControl.SyncSlice, server/group_slices.h): the coordinator checks the
// slice against its peers' and assigns the generation, and a launcher whose
// group moved to another generation (a peer's rank failed) restarts its
// ranks in it. docs/SERVICE.md, "Groups across hosts".
#ifndef DN_SERVER_LAUNCHER_H_
#define DN_SERVER_LAUNCHER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "grpcpp/security/credentials.h"

namespace dn::server {

struct LauncherOptions {
  std::string coordinator;
  std::string model_dir;
  std::string preset;
  uint64_t preset_seed = 0;
  std::string model_name;
  // The slice of the group this launcher starts: global ranks
  // [first_rank, first_rank + ranks) of a group of group_size ranks (0: the
  // group is this launcher's alone, group_size = ranks). Local rank i (GPU i
  // under CUDA) runs global rank first_rank + i.
  int ranks = 1;
  int group_size = 0;
  int first_rank = 0;
  // The address this host's ranks advertise to their peers (--host). Empty:
  // 127.0.0.1 for a group of one launcher; discovered (a non-loopback
  // address) when the group spans launchers.
  std::string host;
  // A launcher whose group misses ranks (peer slices that never arrive) for
  // this long gives up (exit kExitSliceTimeout) and names them.
  int slice_timeout_s = 120;
  std::string backend = "cpu";
  std::string name;            // group name; default <model>-<host>-<pid>
  std::string metrics_listen;  // HOST:PORT; rank r uses PORT + r (0: any)
  std::string secret;
  int threads = 0;             // CPU threads per rank; 0 = cores / ranks
  // --cfg-parallel / --no-cfg-parallel; unset: CfgParallelDefault decides.
  std::optional<bool> cfg_parallel;
  // Passed through to every rank.
  std::vector<std::string> rank_flags;
  // How the launcher itself probes the coordinator's worker port before it
  // starts a generation (insecure when null; the ranks' TLS files otherwise).
  std::shared_ptr<grpc::ChannelCredentials> probe_credentials;
};

// Exit codes of RunLauncher besides 0 (stopped by SIGTERM/SIGINT): 2 for bad
// flags or a slice the coordinator refused (the message names the flag), and
// this one when the group missed ranks for --slice-timeout.
inline constexpr int kExitSliceTimeout = 3;

// Whether a group started by this launcher should run CFG-parallel by
// default: it spans launchers (hosts) and this launcher's slice is exactly
// one half of it, so Ulysses stays inside the host and only the CFG halves
// cross hosts (docs/SERVICE.md, "Which axis crosses hosts"). An explicit
// --cfg-parallel / --no-cfg-parallel overrides it; every launcher of a group
// must end up with the same choice (the coordinator refuses a slice that
// disagrees with its peers, FAILED_PRECONDITION naming --cfg-parallel).
bool CfgParallelDefault(int group_size, int first_rank, int local_ranks);

// Supervises the group until SIGTERM/SIGINT; returns the exit code.
int RunLauncher(const LauncherOptions& options);

// `denoised worker --coordinator HOST:PORT (--model DIR | --preset NAME)
//  --ranks N --backend cpu|cuda [--name] [--metrics-listen] [--secret]`.
int LauncherMain(int argc, char** argv);

}  // namespace dn::server

#endif  // DN_SERVER_LAUNCHER_H_
