// File: worker/rank_session.h
//
// The one rank-session builder (issue 14): what every rank process of the
// project sets up, in one place. Used by `denoised run` (worker/run_command),
// `denoised bench step` (bench/step_bench) and the service's rank
// (server/rank_runner).
//
// A session is built in two stages:
//   Prepare  (local)      weights (a checkpoint folder or a seeded preset,
//                         optionally cut to its first `layers` blocks) and
//                         the backend (CPU or CUDA device);
//   Connect  (collective) the control group (Gloo, host memory) and the data
//                         group (Gloo on CPU, NCCL on CUDA) through a store,
//                         then the engine on them.
// The service's rank attaches to the coordinator between the two (its Hello
// carries the model and the device), and connects through the coordinator's
// store; `denoised run` and the benches use Open: both stages over a
// FileStore in the folder their parent made.
#ifndef DN_WORKER_RANK_SESSION_H_
#define DN_WORKER_RANK_SESSION_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "base/flags.h"
#include "comm/process_group.h"
#include "comm/store.h"
#include "worker/backend.h"
#include "worker/checkpoint.h"
#include "worker/engine.h"

namespace dn::worker {

// How one rank is set up. `denoised run` and `denoised bench step` register
// these as flags with AddRankFlags; the service's rank has its own flag names
// for the same fields (server/rank_runner.cc).
struct RankOptions {
  // The model: exactly one of `model` (checkpoint folder) and `preset`.
  std::string model;
  std::string preset;
  uint64_t preset_seed = 0;
  int layers = 0;  // > 0: keep only the first `layers` blocks
  // The backend.
  std::string backend = "cpu";  // cpu | cuda
  int device = -1;              // CUDA ordinal; -1 = the rank
  int threads = 0;              // CPU threads; 0 = cores / ranks
  // The group.
  int ranks = 1;                // ranks in the group (world size)
  int rank = -1;                // this rank
  std::string host = "127.0.0.1";  // address the process groups listen on
  int timeout_s = 120;          // rendezvous and collective timeout
  // The engine.
  int64_t max_tokens = 80000;
  std::string lora_dir;         // EngineOptions::lora_dir: LoRA files requests may name
  bool graphs = true;           // EngineOptions::use_graphs
  // EngineOptions::cfg_parallel: 2 CFG halves x ranks/2 Ulysses ranks
  // (docs/ENGINE.md, "CFG-parallel"); needs an even `ranks`.
  bool cfg_parallel = false;
  // Open only: the FileStore folder (set by SpawnRanks).
  std::string store_dir;
};
// --model, --preset, --preset-seed, --backend, --ranks, --threads,
// --timeout-s, --max-tokens, --lora-dir, --graphs, --cfg-parallel.
void AddRankFlags(FlagSet& flags, RankOptions* options);
// Checks what can be checked before any process starts; messages name the
// flag.
absl::Status CheckRankOptions(const RankOptions& options);

// The model source of `options` (checkpoint or preset, --layers applied).
absl::StatusOr<std::unique_ptr<WeightSource>> OpenWeights(const RankOptions& options);

// Everything one rank holds; members are destroyed engine first, store last.
struct RankSession {
  std::unique_ptr<comm::Store> store;  // Open only (Connect borrows a store)
  std::unique_ptr<WeightSource> weights;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<comm::ProcessGroup> control;
  std::unique_ptr<comm::ProcessGroup> data;
  // With cfg_parallel and ranks/2 > 1: this rank's half (its all-to-alls).
  std::unique_ptr<comm::ProcessGroup> ulysses;
  std::unique_ptr<Engine> engine;
  RankOptions options;

  // Stage 1: weights and backend (local, nothing collective).
  static absl::StatusOr<std::unique_ptr<RankSession>> Prepare(const RankOptions& options);
  // Stage 2 (collective): the groups through `store`, keys under `prefix`
  // ("<prefix>control", "<prefix>data", and with CFG-parallel the half's
  // group), then the engine. `store` must
  // outlive the call only.
  absl::Status Connect(comm::Store& store, const std::string& prefix);
  // Both stages over a FileStore in options.store_dir (owned).
  static absl::StatusOr<std::unique_ptr<RankSession>> Open(const RankOptions& options);
};

}  // namespace dn::worker

#endif  // DN_WORKER_RANK_SESSION_H_
