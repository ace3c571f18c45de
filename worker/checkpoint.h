// File: worker/checkpoint.h
//
// Where the model's weights come from. A WeightSource lists the diffusers
// tensor names of a model, with their shapes, and converts any of them to f32
// on request, one tensor at a time (so a 14B checkpoint never sits in host
// memory as f32).
//
// - OpenCheckpoint: a diffusers-layout folder: config.json plus one
//   *.safetensors file, or shards with `diffusion_pytorch_model.safetensors.
//   index.json`. Memory-mapped. f32/bf16/f16 tensors. Original Wan2.1 names
//   are mapped to diffusers names (spec §2, including the norm2/norm3 swap).
//   A missing, extra or mis-shaped tensor is an error naming the tensor, its
//   expected and its actual shape.
//   Two-expert pipelines (Wan2.2 A14B, docs/MODELS.md §3): a folder with
//   model_index.json (`boundary_ratio`) and transformer/ (high-noise expert)
//   + transformer_2/ (low-noise expert), or the original layout
//   high_noise_model/ + low_noise_model/ (boundary 0.9 for 36 input
//   channels, else 0.875, as the Wan2.2 configs say). Both experts must have
//   the same transformer config.
// - MakePresetWeights: seeded random weights computed on demand; Backends can
//   produce the same numbers on the device (Backend::FillNormal with
//   init.seed/init.stream), which is how `--preset` avoids any file.
#ifndef DN_WORKER_CHECKPOINT_H_
#define DN_WORKER_CHECKPOINT_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/tensor.h"
#include "worker/wan_config.h"

namespace dn::worker {

struct TensorSpec {
  std::string name;  // diffusers name
  Shape shape;       // PyTorch shape, e.g. [out, in] for Linear weights
};

// Every tensor the config requires, in a fixed order (spec §2).
std::vector<TensorSpec> ExpectedTensors(const WanConfig& config);

// How preset tensor `name` is initialised: value = mean + std * N(0,1)
// drawn with (seed, stream) from worker/noise.h, element index = flat index.
// The rule (D = inner_dim; first match wins, by the name's last component):
//   stream = 64-bit FNV-1a of the diffusers name (TensorNameStream);
//   "...scale_shift_table"            mean 0, std 1/sqrt(D)
//   "....bias"                        mean 0, std 0.02   (Linear, conv, norm)
//   "<norm*>.weight" (norm2, norm_q, norm_k, norm_added_k, image norm1/2)
//                                     mean 1, std 0.05
//   other ".weight" with rank >= 2    mean 0, std 1/sqrt(fan_in), fan_in =
//                                     product of all dims but the first
//                                     (Linear: in; patch embedding: C_in*pt*ph*pw)
//   anything else (pos_embed)         mean 0, std 0.02
struct RandomInit {
  uint64_t seed = 0;
  uint64_t stream = 0;  // derived from the tensor name
  float mean = 0.0f;
  float std = 0.0f;
};
RandomInit PresetInit(const WanConfig& config, const std::string& name,
                      uint64_t seed);

class WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual const WanConfig& config() const = 0;
  // Human-readable origin, e.g. the folder or "preset tiny seed 0".
  virtual std::string description() const = 0;
  // Fills dst (NumElements(spec.shape) floats) with the tensor as f32.
  virtual absl::Status ReadF32(const std::string& name, float* dst) const = 0;
  // Set for random presets: lets a backend fill the tensor itself.
  virtual const RandomInit* random_init(const std::string& name) const {
    (void)name;
    return nullptr;
  }
  // Two-expert models (config().boundary_ratio > 0): expert 0 is the
  // high-noise `transformer`, expert 1 the low-noise `transformer_2`; each
  // expert's own config() has boundary_ratio 0. One-transformer models have
  // one expert, the source itself.
  int num_experts() const { return config().num_experts(); }
  virtual const WeightSource& expert(int i) const {
    (void)i;
    return *this;
  }
};

absl::StatusOr<std::unique_ptr<WeightSource>> OpenCheckpoint(
    const std::string& dir);
// A two-expert config (boundary_ratio > 0) gets two experts: the high-noise
// one with `seed`, the low-noise one with `seed + 1`.
absl::StatusOr<std::unique_ptr<WeightSource>> MakePresetWeights(
    const WanConfig& config, uint64_t seed);

// Two-expert sources: `high` and `low` must have equal transformer configs;
// the result's config is theirs with `boundary_ratio` set.
absl::StatusOr<std::unique_ptr<WeightSource>> MakeTwoExpertWeights(
    std::unique_ptr<WeightSource> high, std::unique_ptr<WeightSource> low,
    double boundary_ratio);

// Writes a diffusers-layout checkpoint (config.json + safetensors, split into
// shards of at most `max_shard_bytes` with an index when larger) of `source`'s
// tensors in `dtype`. A two-expert source becomes a pipeline folder:
// model_index.json + transformer/ + transformer_2/ (original names:
// high_noise_model/ + low_noise_model/).
absl::Status WriteCheckpoint(const WeightSource& source,
                             const std::string& dir, DType dtype,
                             int64_t max_shard_bytes = int64_t{4} << 30);

}  // namespace dn::worker

#endif  // DN_WORKER_CHECKPOINT_H_
