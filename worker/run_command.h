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
// The spawning and per-rank setup are shared with `denoised bench step`
// (bench/step_bench.cc).
#ifndef DN_WORKER_RUN_COMMAND_H_
#define DN_WORKER_RUN_COMMAND_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/base/flags.h"
#include "comm/process_group.h"
#include "comm/store.h"
#include "worker/backend.h"
#include "worker/checkpoint.h"
#include "worker/engine.h"

namespace dn::worker {

int RunCommand(int argc, char** argv);
int RunRankCommand(int argc, char** argv);

// Where a rank's model, backend and group come from. Registered as flags by
// AddRankFlags (--model, --preset, --preset-seed, --backend, --threads,
// --timeout-s, --max-tokens, --graphs, --cfg-parallel, and the hidden --rank/--store-dir set by
// SpawnRanks).
struct RankOptions {
  std::string model;                 // checkpoint folder
  std::string preset;                // or a preset name (random weights)
  uint64_t preset_seed = 0;
  std::string backend = "cpu";
  int ranks = 1;
  int threads = 0;                   // per rank; 0 = cores / ranks
  int timeout_s = 120;               // rendezvous and collective timeout
  int64_t max_tokens = 80000;
  std::string lora_dir;  // --lora-dir: LoRA files requests may name
  int layers = 0;                    // > 0: keep only the first `layers` blocks
  bool graphs = true;                // EngineOptions::use_graphs (--graphs)
  // EngineOptions::cfg_parallel (--cfg-parallel): 2 CFG halves x ranks/2
  // Ulysses ranks.
  bool cfg_parallel = false;
  // Set by SpawnRanks for each child.
  int rank = -1;
  std::string store_dir;
};
void AddRankFlags(FlagSet& flags, RankOptions* options);
// Checks the flags a parent can check before spawning; messages name them.
absl::Status CheckRankOptions(const RankOptions& options);

// Everything one rank holds; members are destroyed engine first.
struct RankSession {
  std::unique_ptr<comm::Store> store;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<comm::ProcessGroup> control;
  std::unique_ptr<comm::ProcessGroup> data;
  // With --cfg-parallel and ranks/2 > 1: this rank's half (its all-to-alls).
  std::unique_ptr<comm::ProcessGroup> ulysses;
  std::unique_ptr<WeightSource> weights;
  std::unique_ptr<Engine> engine;
};
absl::StatusOr<std::unique_ptr<RankSession>> OpenRankSession(
    const RankOptions& options);

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
