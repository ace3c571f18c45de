// File: base/process.h
//
// Child processes of the `denoised` binary: spawning (fork + exec, with the
// child tied to its parent's life through PR_SET_PDEATHSIG so no rank or
// demo child outlives a killed parent), waiting with a timeout, and
// terminating (SIGTERM, a grace period, then SIGKILL). Used by the worker
// launcher, the demo and the service tests.
#ifndef DN_BASE_PROCESS_H_
#define DN_BASE_PROCESS_H_

#include <sys/types.h>

#include <chrono>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace dn {

struct SpawnOptions {
  std::string exe = "/proc/self/exe";
  std::vector<std::string> args;  // argv[1..]
  // Environment entries added to (or replacing in) the parent's.
  std::vector<std::pair<std::string, std::string>> env;
  // Appends the child's stdout and stderr to this file; empty = inherit.
  std::string log_file;
  // The signal the child gets when the spawning thread's process dies.
  int parent_death_signal = 15;  // SIGTERM
  // Puts the child in its own process group, so a terminal's Ctrl-C reaches
  // only the parent (which then stops the child in order).
  bool new_process_group = false;
};

// Starts the child. The child's signal mask is cleared before exec.
absl::StatusOr<pid_t> Spawn(const SpawnOptions& options);

// Waits up to `timeout` for `pid` to exit and reaps it; returns its wait
// status, or nullopt if it is still running.
std::optional<int> WaitPid(pid_t pid, std::chrono::milliseconds timeout);

// Sends SIGTERM, waits up to `grace`, then SIGKILLs; reaps the child and
// returns its wait status.
int Terminate(pid_t pid, std::chrono::milliseconds grace);

// "exit code 3", "killed by signal 9 (Killed)".
std::string DescribeWaitStatus(int status);

// SIGTERM/SIGINT as events: installs handlers that record the signal through
// a self-pipe (async-signal-safe), so the signal is caught whichever thread
// the kernel delivers it to (libraries such as OpenBLAS start threads before
// main() that do not block signals). Call once, before waiting.
void InstallStopSignalHandlers();
// Waits for SIGTERM/SIGINT; returns the signal, or 0 after `timeout`
// (negative: wait forever).
int WaitStopSignal(std::chrono::milliseconds timeout);

}  // namespace dn

#endif  // DN_BASE_PROCESS_H_
