// File: worker/run_command.h
//
// `denoised run`: the engine without the service. The parent process spawns
// N rank processes of this same binary (`denoised run-rank ...`, hidden),
// which rendezvous through a FileStore in a temp folder, form the "data"
// (activations; Gloo, or NCCL with --backend cuda) and "ctl" (control words;
// Gloo) groups, load the model, and run one Generate. Rank 0 draws the
// progress bar and writes the latents. If any rank fails, the parent kills
// the others and exits non-zero with that rank's error.
//
// The spawning is shared with `denoised bench step` (bench/step_bench.cc);
// each rank is set up by the one rank-session builder (worker/rank_session.h).
#ifndef DN_WORKER_RUN_COMMAND_H_
#define DN_WORKER_RUN_COMMAND_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/rank_session.h"

namespace dn::worker {

int RunCommand(int argc, char** argv);
int RunRankCommand(int argc, char** argv);

// The ranks' options and their setup (RankOptions, AddRankFlags,
// RankSession) are worker/rank_session.h.

// Runs `options.ranks` processes of /proc/self/exe with argv
// {command..., args..., --rank=r, --store-dir=DIR} (DIR: a fresh temp
// folder, removed afterwards) and waits for all. When one fails (non-zero
// exit or signal) the others are killed and the error is that rank's message
// (from ReportRankError) or its exit status.
absl::Status SpawnRanks(const std::vector<std::string>& command,
                        const std::vector<std::string>& args,
                        const RankOptions& options);
// For a rank process: logs `status` and leaves it for the parent to report.
void ReportRankError(const RankOptions& options, const absl::Status& status);

}  // namespace dn::worker

#endif  // DN_WORKER_RUN_COMMAND_H_
