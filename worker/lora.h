// File: worker/lora.h
//
// Per-request LoRA (docs/MODELS.md §6): parsing LoRA files against a model's
// Linear modules, a directory of them (`--lora-dir`, re-listed on every use,
// so files added later are usable without a restart), and the combination
// of several adapters with their request scales into one low-rank pair per
// module, which WanModel applies unmerged (y = x Wᵀ + b + (x Aᵀ) Bᵀ + Δb):
// the base weights are never modified, so a request without LoRA is
// bit-identical before and after any LoRA request.
//
// Formats: diffusers / PEFT ([transformer.|base_model.model.]<module>.lora_A/
// lora_B.weight, lora_B.bias; alpha from the safetensors metadata
// `lora_adapter_metadata` (lora_alpha, alpha_pattern), else alpha = rank);
// original Wan / ComfyUI ([model.]diffusion_model.<original module>.
// lora_down/lora_up(.weight) or lora_A/lora_B, .alpha, .diff_b); kohya /
// musubi (lora_unet_<original module, '.' -> '_'>.lora_down/.lora_up/.alpha).
// Full-weight `.diff` tensors are refused.
#ifndef DN_WORKER_LORA_H_
#define DN_WORKER_LORA_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/wan_config.h"

namespace dn::worker {

// One LoRA of a request: a file of the LoRA directory (name = file name
// without ".safetensors") and its scale. expert: -1 = every expert of the
// model; 0 / 1 = only the high-noise / low-noise expert of a two-expert model.
struct LoraRef {
  std::string name;
  double scale = 1.0;
  int expert = -1;
};

// "NAME[:SCALE[:EXPERT]][,...]" (EXPERT: all | high | low) -> LoraRefs, for
// the --lora flags of `run` and `generate`; errors name `flag`.
absl::StatusOr<std::vector<LoraRef>> ParseLoraSpecs(const std::string& list,
                                                   const std::string& flag);

// The adapter of one Linear module, f32 host copies.
struct LoraModule {
  int64_t rank = 0;        // 0 = a bias delta only (diff_b)
  int64_t in = 0, out = 0;
  std::vector<float> down;        // A [rank, in]
  std::vector<float> up;          // B [out, rank]
  double alpha = 0;               // scaling = alpha / rank
  std::vector<float> bias_delta;  // [out] or empty (diff_b, PEFT lora_B.bias × alpha/rank)
};

struct LoraFile {
  std::string path;
  std::map<std::string, LoraModule> modules;  // diffusers module name -> adapter
};

// Diffusers names of the Linear modules a LoRA may target, with their
// [out, in] (every 2-D weight but the patch embedding).
std::map<std::string, std::pair<int64_t, int64_t>> LoraTargets(const WanConfig& config);

// Parses and validates a LoRA file against `config`. Errors name the file
// and the tensor: INVALID_ARGUMENT (unknown module, wrong shape, non-finite,
// truncated or malformed file), NOT_FOUND (no such file).
absl::StatusOr<LoraFile> ParseLoraFile(const std::string& path, const WanConfig& config);

// The low-rank pair of one module after combining adapters:
// delta(x) = (x downᵀ) upᵀ + bias, with up already scaled by
// scale·alpha/rank per adapter (adapters stacked along the rank).
struct LoraLowRank {
  int64_t rank = 0, in = 0, out = 0;
  std::vector<float> down;  // [rank, in]
  std::vector<float> up;    // [out, rank]
  std::vector<float> bias;  // [out] or empty
};
std::map<std::string, LoraLowRank> CombineLoras(
    const std::vector<std::pair<const LoraFile*, double>>& adapters);

// A directory of LoRA files. Thread-compatible.
class LoraLibrary {
 public:
  explicit LoraLibrary(std::string dir) : dir_(std::move(dir)) {}
  const std::string& dir() const { return dir_; }
  // Names of the *.safetensors files now in the directory, sorted.
  std::vector<std::string> List() const;
  // Loads (and caches, keyed by size and modification time) the named file.
  // NOT_FOUND for an unknown name, INVALID_ARGUMENT for a bad name or file.
  absl::StatusOr<std::shared_ptr<const LoraFile>> Load(const std::string& name,
                                                      const WanConfig& config);

 private:
  struct Cached {
    int64_t size = 0;
    int64_t mtime_ns = 0;
    std::string config_hash;
    std::shared_ptr<const LoraFile> file;
  };
  std::string dir_;
  std::map<std::string, Cached> cache_;
};

}  // namespace dn::worker

#endif  // DN_WORKER_LORA_H_
