#include "worker/make_checkpoint_command.h"

#include <cstdint>
#include <cstdio>
#include <string>

#include "comm/base/flags.h"
#include "worker/checkpoint.h"
#include "worker/checkpoint_format.h"
#include "worker/prompt_table.h"
#include "worker/wan_config.h"

namespace dn::worker {

int MakeCheckpointCommand(int argc, char** argv) {
  FlagSet flags("denoised make-checkpoint",
                "Writes a diffusers-layout checkpoint (config.json + "
                "safetensors) with seeded random weights.");
  std::string preset = "tiny";
  uint64_t seed = 0;
  std::string out;
  std::string dtype_name = "f32";
  int layers = 0;
  bool original_names = false;
  int64_t max_shard_bytes = int64_t{4} << 30;
  bool prompt_table = false;
  flags.String("preset", &preset,
               "tiny | demo-pixel | wan2.1-t2v-1.3b | wan2.1-t2v-14b | "
               "wan2.2-t2v-a14b | tiny-t2v-a14b (two experts: a pipeline folder "
               "with transformer/ and transformer_2/, the low-noise expert "
               "seeded with --seed + 1)");
  flags.Uint64("seed", &seed, "seed of the random weights");
  flags.String("out", &out, "output folder (created if missing)");
  flags.String("dtype", &dtype_name, "stored dtype: f32 | bf16 | f16");
  flags.Int("layers", &layers,
            "override num_layers (cut-down test checkpoints); 0 = preset's");
  flags.Bool("original-names", &original_names,
             "write original Wan2.1 tensor names and config.json (loader tests)");
  flags.Int64("max-shard-bytes", &max_shard_bytes,
              "split into shards of at most this many bytes, with an index");
  flags.Bool("prompt-table", &prompt_table,
             "also write OUT/prompts.safetensors: seeded random vectors for "
             "the demo vocabulary (a stand-in for tools/demo_model)");
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;

  if (out.empty()) {
    std::fprintf(stderr, "make-checkpoint: --out is required\n");
    return 2;
  }
  DType dtype;
  if (dtype_name == "f32") {
    dtype = DType::kF32;
  } else if (dtype_name == "bf16") {
    dtype = DType::kBF16;
  } else if (dtype_name == "f16") {
    dtype = DType::kF16;
  } else {
    std::fprintf(stderr, "make-checkpoint: --dtype must be f32, bf16 or f16 (got '%s')\n",
                 dtype_name.c_str());
    return 2;
  }
  absl::StatusOr<WanConfig> config = PresetConfig(preset);
  if (!config.ok()) {
    std::fprintf(stderr, "make-checkpoint: --preset: %s\n",
                 std::string(config.status().message()).c_str());
    return 2;
  }
  if (layers < 0) {
    std::fprintf(stderr, "make-checkpoint: --layers must be >= 1 (got %d)\n", layers);
    return 2;
  }
  if (layers > 0) config->num_layers = layers;
  if (absl::Status s = config->Validate(); !s.ok()) {
    std::fprintf(stderr, "make-checkpoint: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  absl::StatusOr<std::unique_ptr<WeightSource>> weights =
      MakePresetWeights(*config, seed);
  if (!weights.ok()) {
    std::fprintf(stderr, "make-checkpoint: %s\n",
                 std::string(weights.status().message()).c_str());
    return 1;
  }
  CheckpointWriteOptions options;
  options.dtype = dtype;
  options.max_shard_bytes = max_shard_bytes;
  options.names = original_names ? NameLayout::kWanOriginal : NameLayout::kDiffusers;
  if (absl::Status s = WriteCheckpointWithOptions(**weights, out, options); !s.ok()) {
    std::fprintf(stderr, "make-checkpoint: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  if (prompt_table) {
    absl::StatusOr<PromptTable> table =
        PromptTable::Random(DemoStandInVocabulary(), kDemoStandInTokens,
                            config->text_dim, seed, kDemoGrammar);
    absl::Status s = table.ok() ? table->Save(out + "/prompts.safetensors")
                                : table.status();
    if (!s.ok()) {
      std::fprintf(stderr, "make-checkpoint: --prompt-table: %s\n",
                   std::string(s.message()).c_str());
      return 1;
    }
  }
  int64_t params = 0;
  const std::vector<TensorSpec> specs = ExpectedTensors(*config);
  for (const TensorSpec& spec : specs) params += NumElements(spec.shape);
  params *= config->num_experts();
  std::printf("wrote %s: preset %s, %d expert(s), %d layers, seed %llu, %zu "
              "tensors, %lld parameters, %s%s%s, config %s\n",
              out.c_str(), preset.c_str(), config->num_experts(), config->num_layers,
              static_cast<unsigned long long>(seed),
              specs.size() * static_cast<size_t>(config->num_experts()),
              static_cast<long long>(params), DTypeName(dtype),
              original_names ? ", original Wan2.1 names" : "",
              prompt_table ? ", random prompt table" : "",
              config->Hash().c_str());
  return 0;
}

}  // namespace dn::worker
