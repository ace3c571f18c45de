// File: worker/engine.h
//
// The denoising engine of one rank of a worker group: the Wan DiT (one
// transformer, or the two experts of Wan2.2 A14B) on a Backend, sharded over a Ulysses process group, driven by a sampler with
// classifier-free guidance. No gRPC here: the service (server/) and the
// `denoised run` command both drive this class.
//
// Collective contract: every rank of the group calls Generate with the same
// params; all ranks leave at the same step boundary (success, stop or error),
// because the stop decision, timings and errors are all-reduced over the
// control group once per step.
#ifndef DN_WORKER_ENGINE_H_
#define DN_WORKER_ENGINE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/cfg_parallel.h"
#include "comm/process_group.h"
#include "worker/acceleration.h"
#include "worker/backend.h"
#include "worker/checkpoint.h"
#include "worker/lora.h"
#include "worker/request_rules.h"
#include "worker/sampler.h"
#include "worker/tensor.h"
#include "worker/wan_config.h"

namespace dn::worker {

// Pixel size (frames, height, width) -> latent shape through the config's
// VAE strides (RequestRules::LatentFromPixels, then CheckLatent without a
// token limit). Errors name pixel_size.frames/height/width.
absl::StatusOr<LatentShape> LatentFromPixels(const WanConfig& config,
                                             int frames, int height, int width);
// Token count of a latent shape after patching (F/pt * H/ph * W/pw).
int64_t TokenCount(const WanConfig& config, const LatentShape& shape);

// The limits and defaults every request must meet live in
// worker/request_rules.h; Engine::Validate and the coordinator's admission
// both apply them, so a request the coordinator accepts is never refused by
// the ranks.

struct GenerateParams {
  LatentShape latent;
  int steps = kDefaultSteps;
  double guidance = kDefaultGuidance;  // CFG on iff > 1
  // Two-expert models: the low-noise expert's scale (guidance_scale_2);
  // unset = `guidance`. CFG on/off follows `guidance` alone (diffusers).
  // Setting it for a one-transformer model is INVALID_ARGUMENT.
  std::optional<double> guidance_2;
  SchedulerKind scheduler = kDefaultScheduler;
  double shift = kDefaultShift;
  uint64_t seed = 0;
  Tensor prompt_embeds;    // host f32 [T, text_dim]
  Tensor negative_embeds;  // host f32 [T', text_dim]; undefined -> zeros [T, text_dim]
  // host f32 [out_channels,F,H,W] (the sampler state); undefined -> seeded noise
  Tensor initial_latents;
  // Models whose in_channels exceed out_channels (I2V: 36 = noise 16 | mask 4
  // | image latent 16, docs/MODELS.md §4): host f32 [in - out, F, H, W],
  // concatenated after the sampler state on channels at every step. Required
  // for those models, INVALID_ARGUMENT for the others.
  Tensor condition_latents;
  // Wan2.1 I2V (config image_dim > 0): CLIP image tokens, host f32
  // [N, image_dim] (257 x 1280 for Wan2.1), the same for both CFG branches.
  // Required for those models, INVALID_ARGUMENT for the others.
  Tensor image_embeds;
  // LoRAs of this request, by file name in the engine's LoRA directory, with
  // their scales (combined additively). Empty = none: the base model,
  // bit-identical whatever ran before.
  std::vector<LoraRef> loras;
  // Absolute deadline in unix milliseconds; 0 = none. Checked at every step
  // boundary (collectively).
  int64_t deadline_unix_millis = 0;
  // The fast tier (worker/acceleration.h; docs/ENGINE.md "Step caching" and
  // "fp8 attention"). Default: the exact path.
  Acceleration acceleration;
};

struct StepStats {
  int index = 0;
  int total = 0;
  double sigma = 0;
  double timestep = 0;
  double seconds = 0;             // slowest rank's step time
  double rank_seconds = 0;        // this rank's step time
  double alltoall_seconds = 0;    // slowest rank's all-to-all time in the step
  double skew_seconds = 0;        // slowest minus fastest rank
  // Step caching: this step reused the cached residual of blocks 1..L-1
  // (the same on every rank). signal: the step's cache signal (-1 when not
  // measured: caching off, the first step, or an expert switch).
  bool cached = false;
  double cache_signal = -1;
};
using StepCallback = std::function<void(const StepStats&)>;

// Set from any thread to stop the request at the next step boundary with
// the given code (CANCELLED or DEADLINE_EXCEEDED).
class StopFlag {
 public:
  void Request(absl::StatusCode code) { code_.store(static_cast<int>(code)); }
  absl::StatusCode code() const {
    return static_cast<absl::StatusCode>(code_.load());
  }
  void Reset() { code_.store(0); }

 private:
  std::atomic<int> code_{0};
};

struct EngineOptions {
  int64_t max_tokens = 80000;  // admission limit on TokenCount
  // Capture the forward (both CFG branches, all-to-alls included) as a graph
  // once per shape and replay it. The first step of every request runs
  // eagerly (it builds plans and connections, and times the all-to-alls).
  bool use_graphs = true;
  // With graphs and P > 1: every timing_every-th step also runs eagerly with
  // all-to-all markers; the other steps report the latest sampled all-to-all
  // time. 0 = only the first step of each request.
  int timing_every = 10;
  // Directory of LoRA files (*.safetensors) requests may name; empty = none.
  // Listed and read at each request, so files added later are usable.
  std::string lora_dir;
  // CFG-parallel (docs/ENGINE.md): the group of N ranks runs as 2 CFG halves
  // x N/2 Ulysses ranks. Needs an even group size and Create's `ulysses`
  // group (this rank's half) when N/2 > 1.
  bool cfg_parallel = false;
};
// `options` after the environment, as Engine::Create applies it:
// DN_CUDA_GRAPHS=0 turns use_graphs off, DN_A2A_SAMPLE_EVERY=N sets
// timing_every.
EngineOptions WithEnvironment(EngineOptions options);

class Engine {
 public:
  // Loads the weights onto the backend. `data` carries activations (its
  // memory kind must match the backend's device); `control` (host memory)
  // carries stop words and timings. With options.cfg_parallel, `data` and
  // `control` span all N ranks and `ulysses` is this rank's half (N/2 ranks,
  // ranks [0, N/2) or [N/2, N) of `data`; null when N/2 == 1), which carries
  // the all-to-alls; `data` then carries only the step's all-gather. Fails
  // with FAILED_PRECONDITION when the head count does not divide by the
  // Ulysses degree (N, or N/2 with cfg_parallel).
  static absl::StatusOr<std::unique_ptr<Engine>> Create(
      const WeightSource& weights, Backend& backend, comm::ProcessGroup& data,
      comm::ProcessGroup& control, const EngineOptions& options,
      comm::ProcessGroup* ulysses = nullptr);
  virtual ~Engine() = default;

  virtual const WanConfig& config() const = 0;
  // This rank's place in the group: cfg degree, Ulysses degree, half.
  virtual const comm::CfgSplit& split() const = 0;
  // Checks params with the request rules (worker/request_rules.h) for this
  // model and max_tokens, plus what only the engine sees (host f32 tensors,
  // the deadline); messages start with the API field name.
  virtual absl::Status Validate(const GenerateParams& params) const = 0;
  // Runs the denoising loop (collective). Returns the final latents
  // [C,F,H,W] (host f32) on every rank. Every rank returns the same outcome
  // class: an agreed stop (CANCELLED / DEADLINE_EXCEEDED at the same step),
  // a setup failure of some rank (its code, before any data collective), or
  // a failure mid-step, after which the engine is broken(). Latents that
  // come out non-finite end the request with INVALID_ARGUMENT naming the
  // likely input (RequestRules::NonFiniteOutputError); the engine stays
  // usable.
  virtual absl::StatusOr<Tensor> Generate(const GenerateParams& params,
                                          const StepCallback& on_step,
                                          const StopFlag* stop) = 0;
  // True once the engine aborted its data process group (a rank failed in a
  // step, or a collective failed): every later Generate fails, so the rank
  // must be restarted. A stop or a setup failure leaves it usable.
  virtual bool broken() const = 0;
  // Names of the LoRA files now in the LoRA directory.
  virtual std::vector<std::string> ListLoras() const = 0;
  // Measures seconds per step at `shape` (collective), after building any
  // per-shape plans; used for warm-up and admission estimates.
  virtual absl::StatusOr<double> Warmup(const LatentShape& shape,
                                        int text_len) = 0;
};

}  // namespace dn::worker

#endif  // DN_WORKER_ENGINE_H_
