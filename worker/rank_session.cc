#include "worker/rank_session.h"

#include <algorithm>
#include <chrono>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"
#include "comm/cfg_parallel.h"
#include "worker/wan_config.h"

#ifdef DENOISED_WITH_CUDA
#include "comm/nccl_process_group.h"
#endif

namespace dn::worker {
namespace {

// A weight source that keeps only the first `layers` blocks of another
// (`--layers`, to run cut-down big presets).
class LayerLimitedWeights : public WeightSource {
 public:
  LayerLimitedWeights(std::unique_ptr<WeightSource> inner, int layers)
      : LayerLimitedWeights(inner.get(), layers) {
    owned_ = std::move(inner);
  }
  // Non-owning: `inner` outlives this.
  LayerLimitedWeights(const WeightSource* inner, int layers)
      : inner_(inner), config_(inner->config()) {
    config_.num_layers = layers;
    if (inner->num_experts() == 2)  // each expert cut down alike
      for (int e = 0; e < 2; ++e)
        experts_.push_back(
            std::make_unique<LayerLimitedWeights>(&inner->expert(e), layers));
  }
  const WanConfig& config() const override { return config_; }
  std::string description() const override {
    return absl::StrCat(inner_->description(), ", first ", config_.num_layers,
                        " layers");
  }
  absl::Status ReadF32(const std::string& name, float* dst) const override {
    return inner_->ReadF32(name, dst);
  }
  const RandomInit* random_init(const std::string& name) const override {
    return inner_->random_init(name);
  }
  const WeightSource& expert(int i) const override {
    return experts_.empty() ? *this : *experts_[static_cast<size_t>(i)];
  }

 private:
  std::unique_ptr<WeightSource> owned_;
  const WeightSource* inner_;
  WanConfig config_;
  std::vector<std::unique_ptr<LayerLimitedWeights>> experts_;
};

}  // namespace

void AddRankFlags(FlagSet& flags, RankOptions* o) {
  flags.String("model", &o->model, "diffusers checkpoint folder");
  flags.String("preset", &o->preset,
               "preset with seeded random weights instead of --model "
               "(" + absl::StrJoin(PresetNames(), ", ") + ")");
  flags.Uint64("preset-seed", &o->preset_seed, "seed of the preset's weights");
  flags.String("backend", &o->backend, "cpu | cuda");
  flags.Int("ranks", &o->ranks, "rank processes (sequence-parallel degree)");
  flags.Int("threads", &o->threads,
            "CPU threads per rank (0 = cores / ranks)");
  flags.Int("timeout-s", &o->timeout_s,
            "rendezvous and collective timeout in seconds");
  flags.Int64("max-tokens", &o->max_tokens, "admission limit on tokens");
  flags.String("lora-dir", &o->lora_dir,
               "directory of LoRA files (*.safetensors) that requests may name");
  flags.Bool("graphs", &o->graphs,
             "capture each step as a CUDA graph (all-to-alls inside) and "
             "replay it; DN_CUDA_GRAPHS=0 also turns it off");
  flags.Bool("cfg-parallel", &o->cfg_parallel,
             "run the ranks as 2 CFG halves x ranks/2 Ulysses ranks (the "
             "conditional branch on ranks [0, N/2), the unconditional on "
             "[N/2, N)); needs an even --ranks");
}

absl::Status CheckRankOptions(const RankOptions& o) {
  if (o.model.empty() == o.preset.empty())
    return absl::InvalidArgumentError("give exactly one of --model and --preset");
  if (o.ranks < 1 || o.ranks > 4096)
    return absl::InvalidArgumentError(
        absl::StrCat("--ranks ", o.ranks, " must be in [1, 4096]"));
  if (o.rank >= o.ranks)
    return absl::InvalidArgumentError(
        absl::StrCat("--rank ", o.rank, " must be below the group size ", o.ranks));
  if (o.backend != "cpu" && o.backend != "cuda")
    return absl::InvalidArgumentError(
        absl::StrCat("--backend '", o.backend, "' must be cpu or cuda"));
  if (o.threads < 0)
    return absl::InvalidArgumentError(
        absl::StrCat("--threads ", o.threads, " must be >= 0"));
  if (o.timeout_s < 1)
    return absl::InvalidArgumentError(
        absl::StrCat("--timeout-s ", o.timeout_s, " must be >= 1"));
  if (o.layers < 0)
    return absl::InvalidArgumentError(
        absl::StrCat("--layers ", o.layers, " must be >= 0"));
  if (o.cfg_parallel && o.ranks % 2 != 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "--cfg-parallel needs an even --ranks (2 CFG halves x ranks/2 Ulysses "
        "ranks), got --ranks ",
        o.ranks));
  if (o.max_tokens < 1)
    return absl::InvalidArgumentError(
        absl::StrCat("--max-tokens ", o.max_tokens, " must be >= 1"));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<WeightSource>> OpenWeights(const RankOptions& o) {
  std::unique_ptr<WeightSource> weights;
  if (!o.model.empty()) {
    DN_ASSIGN_OR_RETURN(weights, OpenCheckpoint(o.model));
  } else {
    DN_ASSIGN_OR_RETURN(WanConfig config, PresetConfig(o.preset));
    DN_ASSIGN_OR_RETURN(weights, MakePresetWeights(config, o.preset_seed));
  }
  if (o.layers > 0 && o.layers < weights->config().num_layers)
    weights = std::make_unique<LayerLimitedWeights>(std::move(weights), o.layers);
  return weights;
}

absl::StatusOr<std::unique_ptr<RankSession>> RankSession::Prepare(const RankOptions& o) {
  DN_RETURN_IF_ERROR(CheckRankOptions(o));
  if (o.rank < 0)
    return absl::InvalidArgumentError(absl::StrCat("--rank ", o.rank, " must be >= 0"));
  DN_RETURN_IF_ERROR(comm::SplitForCfg(o.ranks, o.rank, o.cfg_parallel).status());
  auto s = std::make_unique<RankSession>();
  s->options = o;
  DN_ASSIGN_OR_RETURN(s->weights, OpenWeights(o));
  BackendOptions bo;
  bo.name = o.backend;
  bo.device = o.device >= 0 ? o.device : o.rank;
  bo.threads = o.threads > 0
                   ? o.threads
                   : std::max(1, static_cast<int>(std::thread::hardware_concurrency()) /
                                     o.ranks);
  DN_ASSIGN_OR_RETURN(s->backend, MakeBackend(bo));
  return s;
}

absl::Status RankSession::Connect(comm::Store& store, const std::string& prefix) {
  const RankOptions& o = options;
  comm::GlooOptions go;
  go.rank = o.rank;
  go.size = o.ranks;
  if (!o.host.empty()) go.hostname = o.host;
  go.timeout = std::chrono::milliseconds(int64_t{o.timeout_s} * 1000);
  go.prefix = prefix + "control";
  DN_ASSIGN_OR_RETURN(control, comm::MakeGlooProcessGroup(store, go));
  DN_ASSIGN_OR_RETURN(const comm::CfgSplit split,
                      comm::SplitForCfg(o.ranks, o.rank, o.cfg_parallel));
  const bool halves = split.cfg_degree > 1 && split.ulysses_degree > 1;
  if (backend->device() == Device::kCpu) {
    go.prefix = prefix + "data";
    DN_ASSIGN_OR_RETURN(data, comm::MakeGlooProcessGroup(store, go));
    if (halves) {
      DN_ASSIGN_OR_RETURN(ulysses,
                          comm::MakeGlooProcessGroup(store, comm::HalfGroupOptions(go, split)));
    }
  } else {
#ifdef DENOISED_WITH_CUDA
    comm::NcclOptions no;
    no.rank = o.rank;
    no.size = o.ranks;
    no.device = o.device >= 0 ? o.device : o.rank;
    no.timeout = go.timeout;
    no.prefix = prefix + "data";
    no.stream = backend->stream();
    DN_ASSIGN_OR_RETURN(data, comm::MakeNcclProcessGroup(store, no));
    if (halves) {
      DN_ASSIGN_OR_RETURN(ulysses,
                          comm::MakeNcclProcessGroup(store, comm::HalfGroupOptions(no, split)));
    }
#else
    return absl::UnimplementedError(
        "--backend cuda: this build has no CUDA support (DENOISED_CUDA=OFF)");
#endif
  }
  EngineOptions eo;
  eo.max_tokens = o.max_tokens;
  eo.lora_dir = o.lora_dir;
  eo.use_graphs = o.graphs;
  eo.cfg_parallel = o.cfg_parallel;
  DN_ASSIGN_OR_RETURN(engine, Engine::Create(*weights, *backend, *data, *control, eo,
                                             ulysses.get()));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<RankSession>> RankSession::Open(const RankOptions& o) {
  DN_ASSIGN_OR_RETURN(std::unique_ptr<comm::Store> store, comm::MakeFileStore(o.store_dir));
  DN_ASSIGN_OR_RETURN(std::unique_ptr<RankSession> s, Prepare(o));
  s->store = std::move(store);
  DN_RETURN_IF_ERROR(s->Connect(*s->store, ""));
  return s;
}

}  // namespace dn::worker
