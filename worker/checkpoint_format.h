// File: worker/checkpoint_format.h
//
// The on-disk conventions of Wan2.1 checkpoints that checkpoint.h does not
// expose: the original Wan2.1 -> diffusers tensor-name map (spec §2,
// including the norm2/norm3 swap and ComfyUI's `model.diffusion_model.`
// prefix), the original Wan2.1 form of config.json, the file names of a
// diffusers folder, WriteCheckpoint's full set of options, and the stream
// rule of preset weights.
#ifndef DN_WORKER_CHECKPOINT_FORMAT_H_
#define DN_WORKER_CHECKPOINT_FORMAT_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "worker/checkpoint.h"
#include "worker/tensor.h"
#include "worker/wan_config.h"

namespace dn::worker {

inline constexpr char kComfyPrefix[] = "model.diffusion_model.";
inline constexpr char kSingleFileName[] = "diffusion_pytorch_model.safetensors";
inline constexpr char kIndexFileName[] =
    "diffusion_pytorch_model.safetensors.index.json";

// "diffusion_pytorch_model-0000i-of-0000n.safetensors" (1-based i).
std::string ShardFileName(int index, int count);

// Removes a leading "model.diffusion_model." if present.
std::string StripComfyPrefix(const std::string& name);

// Original Wan2.1 name -> diffusers name (e.g. "blocks.3.self_attn.o.weight"
// -> "blocks.3.attn1.to_out.0.weight", "blocks.3.norm3.bias" ->
// "blocks.3.norm2.bias"). nullopt when `name` is not an original-layout name.
std::optional<std::string> WanOriginalToDiffusers(const std::string& name);
// The inverse; nullopt for diffusers names with no original counterpart
// (e.g. attn2.norm_added_q.*).
std::optional<std::string> DiffusersToWanOriginal(const std::string& name);

enum class NameLayout { kDiffusers, kWanOriginal, kUnknown };
// Which layout a (prefix-stripped) name can only belong to: kWanOriginal for
// e.g. "blocks.0.self_attn.q.weight" or "head.head.bias", kDiffusers for e.g.
// "blocks.0.attn1.to_q.weight" or "blocks.0.norm2.weight", kUnknown for names
// both share (patch_embedding.*) or neither knows.
NameLayout LayoutOfName(const std::string& name);

// config.json as the original Wan2.1 release writes it (_class_name WanModel,
// dim, num_heads, in_dim, out_dim, model_type, ...); FromJson reads it back
// to the same config.
std::string WanOriginalConfigJson(const WanConfig& config);

struct CheckpointWriteOptions {
  DType dtype = DType::kF32;
  int64_t max_shard_bytes = int64_t{4} << 30;
  // kWanOriginal writes original Wan2.1 tensor names and config.json (for
  // loader tests); anything else writes diffusers names.
  NameLayout names = NameLayout::kDiffusers;
};

// WriteCheckpoint with all options. Files of an earlier checkpoint with the
// names this writes (single file, shards, index) are removed first; config.json
// is written last, so an interrupted write leaves a folder OpenCheckpoint
// rejects.
absl::Status WriteCheckpointWithOptions(const WeightSource& source,
                                        const std::string& dir,
                                        const CheckpointWriteOptions& options);

// PresetInit's stream for a tensor: 64-bit FNV-1a of its diffusers name.
uint64_t TensorNameStream(const std::string& name);

}  // namespace dn::worker

#endif  // DN_WORKER_CHECKPOINT_FORMAT_H_
