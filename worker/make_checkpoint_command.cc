#include "worker/make_checkpoint_command.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <optional>
#include <cstdio>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/flags.h"
#include "worker/checkpoint.h"
#include "worker/lora.h"
#include "worker/noise.h"
#include "worker/safetensors.h"
#include "worker/checkpoint_format.h"
#include "worker/prompt_table.h"
#include "worker/wan_config.h"

namespace dn::worker {
namespace {

// --lora-out: a seeded random LoRA of `config` on every block Linear (attn1
// q/k/v/o, attn2 q/k/v/o, ffn up/down), in one of the file formats of
// docs/MODELS.md §6, for tests. down ~ N(0, 1/in), up ~ N(0, 1/rank).
absl::Status WriteRandomLora(const WanConfig& config, uint64_t seed, int rank,
                             double alpha, const std::string& format,
                             const std::string& path) {
  if (rank < 1) return absl::InvalidArgumentError("--lora-rank must be >= 1");
  if (format != "diffusers" && format != "original" && format != "kohya")
    return absl::InvalidArgumentError(absl::StrCat(
        "--lora-format '", format, "' must be diffusers, original or kohya"));
  std::vector<std::string> names;
  std::vector<std::vector<float>> data;
  std::vector<Shape> shapes;
  for (const auto& [mod, shape] : LoraTargets(config)) {
    if (mod.rfind("blocks.", 0) != 0) continue;
    const auto [out, in] = shape;
    std::string base = mod, down = ".lora_A.weight", up = ".lora_B.weight";
    if (format != "diffusers") {
      std::optional<std::string> o = DiffusersToWanOriginal(mod + ".weight");
      if (!o) return absl::InternalError(absl::StrCat("no original name for ", mod));
      base = o->substr(0, o->size() - 7);
      down = ".lora_down.weight";
      up = ".lora_up.weight";
      if (format == "kohya") {
        std::replace(base.begin(), base.end(), '.', '_');
        base = "lora_unet_" + base;
      } else {
        base = "diffusion_model." + base;
      }
    } else {
      base = "transformer." + mod;
    }
    const uint64_t stream = TensorNameStream(mod);
    std::vector<float> a(static_cast<size_t>(rank * in)), b(static_cast<size_t>(out * rank));
    FillNormal(seed, stream, 0, 0.0f, static_cast<float>(1.0 / std::sqrt(double(in))),
               a.data(), a.size());
    FillNormal(seed, stream + 1, 0, 0.0f, static_cast<float>(1.0 / std::sqrt(double(rank))),
               b.data(), b.size());
    names.push_back(base + down), shapes.push_back({rank, in}), data.push_back(std::move(a));
    names.push_back(base + up), shapes.push_back({out, rank}), data.push_back(std::move(b));
    if (format != "diffusers") {
      names.push_back(base + ".alpha"), shapes.push_back({}),
          data.push_back({static_cast<float>(alpha)});
    }
  }
  std::vector<SafetensorsTensorRef> refs;
  for (size_t i = 0; i < names.size(); ++i)
    refs.push_back({names[i], DType::kF32, shapes[i], data[i].data()});
  std::map<std::string, std::string> metadata = {{"format", "pt"}};
  if (format == "diffusers")  // PEFT LoraConfig as a pipeline save writes it
    metadata["lora_adapter_metadata"] = absl::StrCat(
        "{\"transformer.r\": ", rank, ", \"transformer.lora_alpha\": ", alpha, "}");
  return WriteSafetensors(path, refs, metadata);
}

}  // namespace

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
  std::string lora_out, lora_format = "diffusers";
  int lora_rank = 4;
  double lora_alpha = 0;
  flags.String("preset", &preset,
               absl::StrCat(absl::StrJoin(PresetNames(), " | "),
                            " (two experts: a pipeline folder "
               "with transformer/ and transformer_2/, the low-noise expert "
               "seeded with --seed + 1)"));
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
  flags.String("lora-out", &lora_out,
               "instead of a checkpoint, write a seeded random LoRA of the preset "
               "(every block Linear) to this .safetensors file (tests)");
  flags.Int("lora-rank", &lora_rank, "rank of --lora-out");
  flags.Double("lora-alpha", &lora_alpha, "alpha of --lora-out (0: = rank)");
  flags.String("lora-format", &lora_format,
               "names of --lora-out: diffusers (PEFT lora_A/lora_B, alpha in the "
               "metadata) | original (diffusion_model.*.lora_down/lora_up/alpha) | "
               "kohya (lora_unet_*)");
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;
  if (!lora_out.empty()) {
    absl::StatusOr<WanConfig> c = PresetConfig(preset);
    absl::Status s = c.ok() ? WriteRandomLora(c->TransformerOnly(), seed, lora_rank,
                                              lora_alpha > 0 ? lora_alpha : lora_rank,
                                              lora_format, lora_out)
                            : c.status();
    if (!s.ok()) {
      std::fprintf(stderr, "make-checkpoint: %s\n", std::string(s.message()).c_str());
      return 1;
    }
    std::printf("wrote LoRA %s: preset %s, rank %d, format %s, seed %llu\n", lora_out.c_str(),
                preset.c_str(), lora_rank, lora_format.c_str(),
                static_cast<unsigned long long>(seed));
    return 0;
  }

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
