// File: server/worker_launcher.h
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
#ifndef DN_SERVER_WORKER_LAUNCHER_H_
#define DN_SERVER_WORKER_LAUNCHER_H_

#include <cstdint>
#include <string>
#include <vector>

namespace dn::server {

struct LauncherOptions {
  std::string coordinator;
  std::string model_dir;
  std::string preset;
  uint64_t preset_seed = 0;
  std::string model_name;
  int ranks = 1;
  std::string backend = "cpu";
  std::string name;            // group name; default <model>-<host>-<pid>
  std::string metrics_listen;  // HOST:PORT; rank r uses PORT + r (0: any)
  std::string secret;
  int threads = 0;             // CPU threads per rank; 0 = cores / ranks
  // Passed through to every rank.
  std::vector<std::string> rank_flags;
};

// Supervises the group until SIGTERM/SIGINT; returns the exit code.
int RunLauncher(const LauncherOptions& options);

// `denoised worker --coordinator HOST:PORT (--model DIR | --preset NAME)
//  --ranks N --backend cpu|cuda [--name] [--metrics-listen] [--secret]`.
int WorkerMain(int argc, char** argv);

}  // namespace dn::server

#endif  // DN_SERVER_WORKER_LAUNCHER_H_
