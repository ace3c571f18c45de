// The engine loop of one rank: Wan2.1 DiT forward of the rank's token shard,
// all-gather of the head outputs, unpatchify, classifier-free guidance and
// the sampler step on the replicated host latent; one control all-reduce per
// step decides stops and carries errors and timings.
#include "worker/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "worker/expert_schedule.h"
#include "worker/noise.h"
#include "worker/wan_model.h"

namespace dn::worker {

absl::StatusOr<LatentShape> LatentFromPixels(const WanConfig& config,
                                             int frames, int height,
                                             int width) {
  const RequestRules rules(GeometryOf(config, 0));
  DN_ASSIGN_OR_RETURN(LatentShape latent,
                      rules.LatentFromPixels({frames, height, width}));
  return rules.CheckLatent(latent, SizeField::kPixelSize);
}

int64_t TokenCount(const WanConfig& config, const LatentShape& shape) {
  return RequestRules(GeometryOf(config, 0)).Tokens(shape);
}

namespace {

// Control words all-reduced (max, f64) once per step.
enum ControlWord {
  kStopCode = 0,     // absl::StatusCode of a requested stop, 0 = none
  kErrorRank,        // 1 + rank of a failed rank, 0 = none
  kStepSeconds,      // this rank's step time
  kNegStepSeconds,   // minus it (max of it = -fastest)
  kAllToAllSeconds,  // this rank's all-to-all time in the step
  kControlWords
};

int64_t UnixMillis() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

class EngineImpl : public Engine {
 public:
  EngineImpl(const WanConfig& config, std::unique_ptr<WanModel> model,
             std::unique_ptr<WanModel> low_noise, Backend& backend,
             comm::ProcessGroup& data, comm::ProcessGroup& control,
             comm::ProcessGroup* ulysses, const comm::CfgSplit& split,
             const EngineOptions& options)
      : config_(config),
        model_(std::move(model)),
        low_noise_(std::move(low_noise)),
        loras_(options.lora_dir),
        backend_(backend),
        data_(data),
        control_(control),
        ulysses_(ulysses),
        split_(split),
        options_(options) {}

  const WanConfig& config() const override { return config_; }
  const comm::CfgSplit& split() const override { return split_; }
  absl::Status Validate(const GenerateParams& params) const override;
  absl::StatusOr<Tensor> Generate(const GenerateParams& params,
                                  const StepCallback& on_step,
                                  const StopFlag* stop) override;
  absl::StatusOr<double> Warmup(const LatentShape& shape,
                                int text_len) override;
  bool broken() const override { return broken_; }
  std::vector<std::string> ListLoras() const override { return loras_.List(); }

 private:
  // Aborts the data group (and a CFG-parallel half's Ulysses group) so peers
  // blocked in a data collective with this rank fail promptly; the engine is
  // broken from then on.
  void AbortData() {
    broken_ = true;
    data_.Abort();
    if (ulysses_ != nullptr && ulysses_ != &data_) ulysses_->Abort();
  }
  // Everything before the first step that may fail on one rank only.
  absl::Status Setup(const GenerateParams& params, bool cfg);
  // FAILED_PRECONDITION naming acceleration.attention_fp8 when the backend
  // cannot run AttentionFp8 at this request's self-attention shape (probed
  // once per shape on the model's own operands), so such a request fails in Setup, where the group stays READY, instead
  // of mid-step.
  absl::Status CheckFp8Available();
  // sampled: eager forward with all-to-all markers; else the graph (when
  // use_graphs) and the latest sampled all-to-all time.
  absl::Status RunStep(int i, Sampler& sampler, bool cfg,
                       const GenerateParams& params, bool sampled,
                       double* step_seconds, double* alltoall_seconds,
                       bool* cached, double* cache_signal);
  // Step caching (docs/ENGINE.md "Step caching"): this rank's per-tile sums
  // of |r0 - r0_prev| and |r0_prev| over its real (unpadded) token rows,
  // r0 = the model's first-block residual, reduced where it lives
  // (Backend::TileAbsDiffSums; only the sums reach the host).
  absl::Status FirstBlockSums(const WanModel& model);
  // Collective over the control group (every rank calls it, also after its
  // own kFirstBlock failed: `ok` false). Gathers every rank's tile sums and
  // sums them in one fixed order (branch, then global tile), the same for
  // any rank count and CFG layout. Returns the signal, or -1 when some rank
  // failed (the step's control all-reduce then ends the request).
  absl::StatusOr<double> AgreeCacheSignal(bool ok, bool cfg);
  // Expert e (0 = the only / high-noise transformer, 1 = low-noise).
  WanModel& expert(int e) { return e == 0 ? *model_ : *low_noise_; }
  int num_experts() const { return low_noise_ != nullptr ? 2 : 1; }
  void Unpatchify(const float* gathered, int batch_index, float* v) const;
  // INVALID_ARGUMENT naming the likely input when the latent x_ holds a NaN
  // or Inf after the last step.
  absl::Status CheckOutputFinite(const GenerateParams& params) const;
  // The text context of each batch row this rank runs (CFG-parallel: its
  // half's branch only).
  std::vector<const Tensor*> BranchEmbeds(const GenerateParams& p, bool cfg);
  // After the all-gather: unpatchify the branches' velocities from the
  // gathered outputs and combine them; returns the velocity to step with.
  const float* CombineVelocities(bool cfg, float guidance);
  bool cfg_split() const { return split_.cfg_degree > 1; }
  // latent [C, F, H, W] (the request's shape): frame 0 of every channel :=
  // first_frame_ [C, 1, H, W].
  void ReplaceFirstFrame(float* latent) const {
    const size_t hw = static_cast<size_t>(latent_.height) * latent_.width;
    const size_t per_channel = hw * static_cast<size_t>(latent_.frames);
    for (int ch = 0; ch < config_.out_channels; ++ch)
      std::memcpy(latent + ch * per_channel, first_frame_.data() + ch * hw,
                  hw * sizeof(float));
  }

  WanConfig config_;  // the model's (with boundary_ratio for two experts)
  // The only transformer, or the high-noise expert; low_noise_ is the
  // low-noise expert of a two-expert model (null otherwise). Both resident;
  // they share one set of activation buffers (WanModel::ShareBuffers).
  std::unique_ptr<WanModel> model_;
  std::unique_ptr<WanModel> low_noise_;
  LoraLibrary loras_;
  Backend& backend_;
  comm::ProcessGroup& data_;
  comm::ProcessGroup& control_;
  // The group of the model's all-to-alls: data_ (Ulysses over all ranks), or
  // with CFG-parallel this rank's half (null when a half is one rank).
  comm::ProcessGroup* ulysses_;
  comm::CfgSplit split_;
  EngineOptions options_;

  // Per-shape state (reused across requests of the same shape).
  LatentShape latent_;
  Tensor gathered_;                   // backend [P, B, S, patch_out]
  std::vector<float> gathered_host_;  // host copy of it
  std::vector<float> x_;              // the replicated latent (sampler state)
  std::vector<float> xin_;            // model input: x_ | condition (in > out),
                                      // or x_ with frame 0 replaced (TI2V)
  std::vector<float> first_frame_;    // TI2V condition [C, 1, H, W]; empty = none
  std::vector<float> v_cond_, v_uncond_, v_;
  Tensor zero_negative_;
  MarkerList markers_;
  double last_alltoall_seconds_ = 0;  // of the latest sampled step
  // Step cache (per request; buffers per shape): minus block 0's residual of
  // the last computed step, backend [B, S, D] in the compute dtype (this
  // step's is the model's); whether r0_prev_ and the model's cached residual
  // are valid, and of which expert.
  Tensor r0_prev_;
  bool cache_valid_ = false;
  int cache_expert_ = -1;
  int64_t cache_tile_ = 0;             // rows per tile (alignment, or S)
  std::vector<double> cache_sums_;     // this rank: [ok, B x tiles x (num, den)]
  std::vector<double> cache_gathered_; // every rank's, [P][...]
  bool broken_ = false;
  // The fp8 probe's answer for the last planned shape.
  std::optional<std::pair<ModelShape, absl::Status>> fp8_probe_;
};

absl::Status EngineImpl::Validate(const GenerateParams& p) const {
  // The same rules as the coordinator's admission (server/request_validation.cc).
  const RequestRules rules(GeometryOf(config(), options_.max_tokens));
  DN_RETURN_IF_ERROR(rules.CheckSampling({p.steps, p.guidance, p.shift, p.scheduler}));
  if (p.guidance_2.has_value()) DN_RETURN_IF_ERROR(rules.CheckGuidance2(*p.guidance_2));
  DN_ASSIGN_OR_RETURN(LatentShape latent,
                      rules.CheckLatent(p.latent, SizeField::kLatentShape));
  if (latent.channels != p.latent.channels)  // 0 is the coordinator's to fill
    return absl::InvalidArgumentError(absl::StrCat(
        "latent_shape.channels: ", p.latent.channels, " != the model's ",
        latent.channels, " input channels"));
  auto host_f32 = [](const Tensor& t, const char* field) -> absl::Status {
    if (t.device() != Device::kCpu || t.dtype() != DType::kF32)
      return absl::InvalidArgumentError(absl::StrCat(
          field, ": must be a host f32 tensor, got ", t.DebugString()));
    return absl::OkStatus();
  };
  auto values = [](const Tensor& t, const char* field) {
    return RequestRules::CheckValues(field, t.data_as<float>(), t.numel());
  };
  auto check_embeds = [&](const Tensor& e, const char* field) -> absl::Status {
    DN_RETURN_IF_ERROR(host_f32(e, field));
    if (e.rank() != 2)  // the ranks take [T, text_dim]; [1, T, D] is flattened before
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".shape: expected [T, ", config().text_dim, "], got ",
          ShapeString(e.shape())));
    DN_RETURN_IF_ERROR(rules.CheckEmbedsShape(field, e.shape()).status());
    return values(e, field);
  };
  if (!p.prompt_embeds.defined())
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt_embeds: required (text-encoder output [T, ", config().text_dim, "])"));
  DN_RETURN_IF_ERROR(check_embeds(p.prompt_embeds, "prompt_embeds"));
  if (p.negative_embeds.defined())
    DN_RETURN_IF_ERROR(check_embeds(p.negative_embeds, "negative_prompt_embeds"));
  DN_RETURN_IF_ERROR(rules.CheckConditioningPresent(p.image_embeds.defined(),
                                                    p.condition_latents.defined()));
  if (p.image_embeds.defined()) {
    DN_RETURN_IF_ERROR(host_f32(p.image_embeds, "image_embeds"));
    if (p.image_embeds.rank() != 2)  // [1, N, D] is flattened before
      return absl::InvalidArgumentError(absl::StrCat(
          "image_embeds.shape: expected [N, ", config().image_dim, "], got ",
          ShapeString(p.image_embeds.shape())));
    DN_RETURN_IF_ERROR(rules.CheckImageEmbedsShape("image_embeds", p.image_embeds.shape()).status());
    DN_RETURN_IF_ERROR(values(p.image_embeds, "image_embeds"));
  }
  if (p.condition_latents.defined()) {
    DN_RETURN_IF_ERROR(host_f32(p.condition_latents, "condition_latents"));
    DN_RETURN_IF_ERROR(rules.CheckConditionShape("condition_latents",
                                                 p.condition_latents.shape(), latent));
    DN_RETURN_IF_ERROR(values(p.condition_latents, "condition_latents"));
  }
  if (p.initial_latents.defined()) {
    DN_RETURN_IF_ERROR(host_f32(p.initial_latents, "initial_latents"));
    DN_RETURN_IF_ERROR(
        rules.CheckLatentsShape("initial_latents", p.initial_latents.shape(), latent));
    DN_RETURN_IF_ERROR(values(p.initial_latents, "initial_latents"));
  }
  DN_RETURN_IF_ERROR(RequestRules::CheckAcceleration(p.acceleration));
  DN_RETURN_IF_ERROR(rules.CheckLoraCount(p.loras.size()));
  for (size_t i = 0; i < p.loras.size(); ++i) {
    const LoraRef& l = p.loras[i];
    // LoraRef::expert: -1 = all, 0 = high-noise, 1 = low-noise; the API's
    // encoding (the rules') is one more.
    DN_RETURN_IF_ERROR(rules.CheckLora(static_cast<int>(i), l.name, l.scale, l.expert + 1));
  }
  if (p.deadline_unix_millis < 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "deadline_unix_millis: ", p.deadline_unix_millis, " is negative"));
  return absl::OkStatus();
}

absl::Status EngineImpl::Setup(const GenerateParams& p, bool cfg) {
  const WanConfig& c = config();
  const auto& ps = c.patch_size;
  ModelShape shape;
  // CFG-parallel: each half runs one branch, batch 1.
  shape.batch = cfg && !cfg_split() ? 2 : 1;
  shape.grid_f = p.latent.frames / ps[0];
  shape.grid_h = p.latent.height / ps[1];
  shape.grid_w = p.latent.width / ps[2];
  // The low-noise expert shares the high-noise expert's buffers: drop its
  // reference first so a new shape never holds two sets.
  if (low_noise_ != nullptr && !(model_->shape() == shape))
    low_noise_->ShareBuffers(nullptr);
  DN_RETURN_IF_ERROR(model_->Plan(shape));
  if (low_noise_ != nullptr) low_noise_->ShareBuffers(model_.get());
  const int64_t world = data_.size();
  const Shape gshape = {world, shape.batch, model_->shard(), model_->patch_out()};
  if (world > 1 && (!gathered_.defined() || gathered_.shape() != gshape)) {
    gathered_ = Tensor();
    DN_ASSIGN_OR_RETURN(gathered_, backend_.Empty(gshape, backend_.compute_dtype()));
  }
  gathered_host_.resize(static_cast<size_t>(NumElements(gshape)));
  // The sampler state has out_channels; the model input in_channels (the
  // state, then the condition, when in > out).
  const size_t plane = static_cast<size_t>(p.latent.frames) * p.latent.height * p.latent.width;
  const size_t n = static_cast<size_t>(c.out_channels) * plane;
  x_.resize(n);
  first_frame_.clear();
  if (c.is_ti2v() && p.condition_latents.defined()) {
    // TI2V (docs/MODELS.md §5): the image latent of frame 0 [C, 1, H, W]
    // replaces frame 0 of the model input at every step and of the result.
    first_frame_.assign(p.condition_latents.data_as<float>(),
                        p.condition_latents.data_as<float>() + p.condition_latents.numel());
    xin_.resize(n);
  } else if (p.condition_latents.defined()) {
    xin_.resize(static_cast<size_t>(c.in_channels) * plane);
    std::memcpy(xin_.data() + n, p.condition_latents.data(),
                (xin_.size() - n) * sizeof(float));
  } else {
    xin_.clear();
  }
  v_cond_.resize(n);
  v_uncond_.resize(cfg ? n : 0);
  v_.resize(cfg ? n : 0);
  latent_ = p.latent;

  if (p.acceleration.attention_fp8) DN_RETURN_IF_ERROR(CheckFp8Available());
  // LoRAs (before the context: the text embedder and cross K/V may be
  // targets). Files are read here, so a bad or missing file fails Setup on
  // every rank alike and the group keeps serving.
  {
    std::vector<std::pair<const LoraFile*, double>> per_expert[2];
    std::vector<std::shared_ptr<const LoraFile>> keep;
    for (const LoraRef& ref : p.loras) {
      DN_ASSIGN_OR_RETURN(std::shared_ptr<const LoraFile> file,
                          loras_.Load(ref.name, config_.TransformerOnly()));
      keep.push_back(file);
      for (int e = 0; e < num_experts(); ++e)
        if (ref.expert < 0 || ref.expert == e) per_expert[e].emplace_back(file.get(), ref.scale);
    }
    for (int e = 0; e < num_experts(); ++e)
      DN_RETURN_IF_ERROR(expert(e).SetLora(CombineLoras(per_expert[e])));
  }
  // Wan2.1 I2V: the image tokens' K/V (the same for both CFG branches).
  for (int e = 0; e < num_experts(); ++e)
    DN_RETURN_IF_ERROR(
        expert(e).SetImageContext(p.image_embeds.defined() ? &p.image_embeds : nullptr));
  // Each expert has its own text embedder and cross-attention K/V.
  {
    const std::vector<const Tensor*> embeds = BranchEmbeds(p, cfg);
    for (int e = 0; e < num_experts(); ++e)
      DN_RETURN_IF_ERROR(expert(e).SetContext(embeds));
  }

  if (p.initial_latents.defined()) {
    std::memcpy(x_.data(), p.initial_latents.data(), n * sizeof(float));
  } else {
    FillNormal(p.seed, kNoiseStream, 0, 0.0f, 1.0f, x_.data(), n);
  }
  markers_.reserve(4 * config().num_layers + 4);
  if (p.acceleration.cache_threshold > 0) {
    // Experts share buffers, so this enables the cache for both.
    DN_RETURN_IF_ERROR(model_->EnableStepCache());
    const Shape r0_shape{shape.batch, model_->shard(), c.inner_dim()};
    if (!r0_prev_.defined() || r0_prev_.shape() != r0_shape) {
      DN_ASSIGN_OR_RETURN(r0_prev_, backend_.Empty(r0_shape, backend_.compute_dtype()));
    }
    const int64_t align = backend_.shard_alignment();
    cache_tile_ = align > 1 && model_->shard() % align == 0 ? align : model_->shard();
    const size_t words = 1 + 2 * static_cast<size_t>(shape.batch * (model_->shard() / cache_tile_));
    cache_sums_.resize(words);
    cache_gathered_.resize(words * static_cast<size_t>(world));
  }
  return absl::OkStatus();
}

absl::Status EngineImpl::CheckFp8Available() {
  // Probed at this plan's real self-attention shape, once per shape: a
  // backend may lack fp8 attention altogether (UNIMPLEMENTED) or have no
  // engine for a given shape (cuDNN's fp8 SDPA has none for 1 token, for
  // example), and either must fail here, where the group stays READY,
  // rather than mid-step. The experts share buffers, so one probe covers
  // both. CPU: one attention call per new shape.
  if (!fp8_probe_.has_value() || !(fp8_probe_->first == model_->shape())) {
    fp8_probe_.emplace(model_->shape(), model_->ProbeAttentionFp8());
  }
  const absl::Status& s = fp8_probe_->second;
  if (s.ok()) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("acceleration.attention_fp8: ", s.message(),
                   " (this worker group cannot run the fp8 tier at this shape; send the request without it)"));
}

std::vector<const Tensor*> EngineImpl::BranchEmbeds(const GenerateParams& p,
                                                     bool cfg) {
  const bool cond = !cfg || !cfg_split() || split_.half == 0;
  const bool uncond = cfg && (!cfg_split() || split_.half == 1);
  std::vector<const Tensor*> embeds;
  if (cond) embeds.push_back(&p.prompt_embeds);
  if (uncond) {
    if (p.negative_embeds.defined()) {
      embeds.push_back(&p.negative_embeds);
    } else {
      if (!zero_negative_.defined() ||
          zero_negative_.shape() != p.prompt_embeds.shape())
        zero_negative_ = Tensor::Host(p.prompt_embeds.shape());
      embeds.push_back(&zero_negative_);
    }
  }
  return embeds;
}

const float* EngineImpl::CombineVelocities(bool cfg, float guidance) {
  // Ulysses over all ranks: [P, B, S, patch_out], batch row 0 = cond, 1 =
  // uncond. CFG-parallel: [2 halves x P/2 ranks, 1, S, patch_out], half 0's
  // blocks hold the conditional velocity, half 1's the unconditional one;
  // without CFG both halves ran the conditional branch and every rank takes
  // half 0's, so all keep the same latent.
  const float* gathered = gathered_host_.data();
  Unpatchify(gathered, 0, v_cond_.data());
  if (!cfg) return v_cond_.data();
  if (cfg_split()) {
    const int64_t half_stride =
        int64_t{split_.ulysses_degree} * model_->shard() * model_->patch_out();
    Unpatchify(gathered + half_stride, 0, v_uncond_.data());
  } else {
    Unpatchify(gathered, 1, v_uncond_.data());
  }
  ApplyGuidance(v_cond_.data(), v_uncond_.data(), guidance, v_.data(), v_.size());
  return v_.data();
}

void EngineImpl::Unpatchify(const float* gathered, int batch_index,
                            float* v) const {
  // gathered [P, B, S, patch_out]; token n = p*S + s (n < L); patch vector
  // index ((a*ph + y)*pw + x)*C_out + c (spec §3 step 9).
  const WanConfig& c = config();
  const int pt = c.patch_size[0], ph = c.patch_size[1], pw = c.patch_size[2];
  const ModelShape& shape = model_->shape();
  const int64_t s = model_->shard(), cp = model_->patch_out();
  const int64_t gh = shape.grid_h, gw = shape.grid_w;
  const int64_t l = shape.tokens();
  const int64_t frames = latent_.frames, height = latent_.height,
                width = latent_.width;
  const int64_t batch = shape.batch;
  for (int64_t n = 0; n < l; ++n) {
    const int64_t p = n / s, si = n % s;
    const float* row = gathered + ((p * batch + batch_index) * s + si) * cp;
    const int64_t f = n / (gh * gw), hh = (n / gw) % gh, ww = n % gw;
    for (int a = 0; a < pt; ++a)
      for (int y = 0; y < ph; ++y)
        for (int x = 0; x < pw; ++x) {
          const float* src = row + ((a * ph + y) * pw + x) * c.out_channels;
          const int64_t base =
              ((f * pt + a) * height + hh * ph + y) * width + ww * pw + x;
          for (int ch = 0; ch < c.out_channels; ++ch)
            v[ch * frames * height * width + base] = src[ch];
        }
  }
}

absl::Status EngineImpl::RunStep(int i, Sampler& sampler, bool cfg,
                                 const GenerateParams& params, bool sampled,
                                 double* step_seconds,
                                 double* alltoall_seconds, bool* cached,
                                 double* cache_signal) {
  const int world = data_.size();
  markers_.clear();
  const double t = sampler.timesteps()[static_cast<size_t>(i)];
  // Two experts: the timestep picks the expert and its guidance scale; the
  // sampler (and its multistep history) is shared across the switch.
  const int e = ExpertForTimestep(t, config_.boundary_ratio);
  WanModel& model = expert(e);
  const float guidance = static_cast<float>(
      e == 1 && params.guidance_2.has_value() ? *params.guidance_2 : params.guidance);
  DN_ASSIGN_OR_RETURN(std::unique_ptr<Marker> start, backend_.Mark());
  if (!xin_.empty()) std::memcpy(xin_.data(), x_.data(), x_.size() * sizeof(float));
  int64_t zero_t_tokens = 0;
  if (!first_frame_.empty()) {
    // Model input (1 - M)·z + M·x: frame 0 is the condition, and its tokens
    // (the first grid_h·grid_w) get t = 0 (diffusers' expand_timesteps).
    ReplaceFirstFrame(xin_.data());
    const ModelShape& ms = model.shape();
    // (Token frame 0 reads M[0] = 0 through the stride-pt subsampling.)
    zero_t_tokens = static_cast<int64_t>(ms.grid_h) * ms.grid_w;
  }
  DN_RETURN_IF_ERROR(
      model.UploadInputs(xin_.empty() ? x_.data() : xin_.data(), t, zero_t_tokens));
  // A graph is captured per expert (and forward part) at its first
  // non-sampled step.
  const bool graph = options_.use_graphs && !sampled;
  comm::ProcessGroup* sp = model.world() > 1 ? ulysses_ : nullptr;
  MarkerList* marks = graph ? nullptr : &markers_;
  const double threshold = params.acceleration.cache_threshold;
  if (threshold <= 0) {
    DN_RETURN_IF_ERROR(model.Forward(sp, marks, graph));
  } else {
    // First-Block-Cache: block 0, then one decision for the whole group.
    const int steps = sampler.steps();
    absl::Status first = model.ForwardPart(WanModel::Part::kFirstBlock, sp, marks, graph);
    // Skipping is considered only between the first and the last step, with
    // a cache of the same expert (docs/ENGINE.md "Step caching").
    const bool candidate = i > 0 && i + 1 < steps && cache_valid_ && cache_expert_ == e;
    if (first.ok() && candidate) first = FirstBlockSums(model);
    bool skip = false;
    if (candidate) {
      // Every rank takes part, also one whose block 0 failed, so nobody
      // waits in this exchange for a rank that left.
      DN_ASSIGN_OR_RETURN(const double signal, AgreeCacheSignal(first.ok(), cfg));
      DN_RETURN_IF_ERROR(first);
      if (signal < 0) return absl::OkStatus();  // a peer failed: the control word says so
      *cache_signal = signal;
      skip = signal < threshold;
    }
    DN_RETURN_IF_ERROR(first);
    if (skip) {
      DN_RETURN_IF_ERROR(model.ForwardPart(WanModel::Part::kCached, sp, marks, graph));
    } else {
      DN_RETURN_IF_ERROR(model.ForwardPart(WanModel::Part::kRest, sp, marks, graph));
      // The next step compares with this one (the last step needs nothing).
      if (i + 1 < steps)
        DN_RETURN_IF_ERROR(backend_.Copy(model.first_block_residual(), &r0_prev_));
      cache_valid_ = true;
      cache_expert_ = e;
    }
    *cached = skip;
  }
  if (world > 1) {
    const Tensor& out = model.output();
    DN_RETURN_IF_ERROR(data_.AllGather(out.data(), gathered_.data(), out.nbytes()));
    DN_RETURN_IF_ERROR(backend_.CopyToHost(gathered_, gathered_host_.data()));
  } else {
    DN_RETURN_IF_ERROR(
        backend_.CopyToHost(model.output(), gathered_host_.data()));
  }
  const float* v = CombineVelocities(cfg, guidance);
  DN_RETURN_IF_ERROR(sampler.Step(i, v, x_.data(), x_.size()));
  DN_ASSIGN_OR_RETURN(std::unique_ptr<Marker> end, backend_.Mark());
  DN_ASSIGN_OR_RETURN(*step_seconds, backend_.ElapsedSeconds(*start, *end));
  double a2a = 0;
  for (size_t m = 0; m + 1 < markers_.size(); m += 2) {
    DN_ASSIGN_OR_RETURN(double sec,
                        backend_.ElapsedSeconds(*markers_[m], *markers_[m + 1]));
    a2a += sec;
  }
  if (graph) {
    a2a = last_alltoall_seconds_;
  } else {
    last_alltoall_seconds_ = a2a;
  }
  *alltoall_seconds = a2a;
  return absl::OkStatus();
}

absl::Status EngineImpl::FirstBlockSums(const WanModel& model) {
  const int64_t s = model.shard(), l = model.shape().tokens();
  const int64_t first_row = static_cast<int64_t>(model.rank()) * s;  // global token of row 0
  // Real rows only: padded rows differ with the rank count.
  const int64_t valid_rows = std::clamp<int64_t>(l - first_row, 0, s);
  return backend_.TileAbsDiffSums(model.first_block_residual(), r0_prev_, cache_tile_,
                                  valid_rows, cache_sums_.data() + 1);
}

absl::StatusOr<double> EngineImpl::AgreeCacheSignal(bool ok, bool cfg) {
  cache_sums_[0] = ok ? 1.0 : 0.0;
  const size_t words = cache_sums_.size();
  const absl::Status gs =
      control_.AllGather(cache_sums_.data(), cache_gathered_.data(), words * sizeof(double));
  if (!gs.ok())
    return absl::Status(gs.code(), absl::StrCat("step cache exchange: ", gs.message()));
  const int world = control_.size();
  for (int p = 0; p < world; ++p)
    if (cache_gathered_[static_cast<size_t>(p) * words] == 0) return -1.0;
  // One order for every layout: branch (cond, then uncond), then global
  // tile (rank, then tile in the rank). Padded tiles hold 0 and add nothing.
  const int64_t tiles = model_->shard() / cache_tile_;
  const int branches = cfg ? 2 : 1;
  double num = 0, den = 0;
  for (int br = 0; br < branches; ++br) {
    // CFG-parallel: half br's ranks hold branch br as their batch row 0;
    // otherwise every rank holds branch br as batch row br.
    const int p_begin = cfg_split() ? br * split_.ulysses_degree : 0;
    const int p_end = cfg_split() ? p_begin + split_.ulysses_degree : world;
    const int64_t b = cfg_split() ? 0 : br;
    for (int p = p_begin; p < p_end; ++p) {
      const double* w = cache_gathered_.data() + static_cast<size_t>(p) * words + 1 +
                        2 * static_cast<size_t>(b * tiles);
      for (int64_t t = 0; t < tiles; ++t) {
        num += w[2 * t];
        den += w[2 * t + 1];
      }
    }
  }
  // No reference to compare with: compute the step.
  if (!(den > 0)) return std::numeric_limits<double>::infinity();
  return num / den;
}

absl::StatusOr<Tensor> EngineImpl::Generate(const GenerateParams& params,
                                            const StepCallback& on_step,
                                            const StopFlag* stop) {
  // Params are identical on every rank, so every rank fails validation alike.
  DN_RETURN_IF_ERROR(Validate(params));
  DN_ASSIGN_OR_RETURN(std::unique_ptr<Sampler> sampler,
                      Sampler::Create(params.scheduler, params.steps, params.shift));
  const bool cfg = params.guidance > 1.0;
  const int rank = data_.rank();
  const int steps = sampler->steps();

  if (broken_)
    return absl::FailedPreconditionError(
        "the engine's data group was aborted by an earlier failure; restart the rank");
  absl::Status local = Setup(params, cfg);
  {
    // Agree on Setup before any data collective: a rank whose Setup failed
    // (out of memory, a plan the library refused) says so here, nobody waits
    // for it in a collective, and the data group stays usable. Its code
    // travels in the stop word; its message stays in its own result.
    double words[kControlWords] = {0, 0, 0, 0, 0};
    if (!local.ok()) {
      words[kStopCode] = static_cast<double>(local.code());
      words[kErrorRank] = static_cast<double>(rank + 1);
    }
    const absl::Status cs = control_.AllReduce(words, kControlWords, comm::ReduceType::kF64,
                                               comm::ReduceOp::kMax);
    if (!cs.ok()) {
      AbortData();
      return absl::Status(cs.code(), absl::StrCat("control all-reduce before step 0: ",
                                                  cs.message()));
    }
    if (!local.ok()) return local;
    if (words[kErrorRank] > 0)
      return absl::Status(
          static_cast<absl::StatusCode>(static_cast<int>(words[kStopCode])),
          absl::StrCat("rank ", static_cast<int>(words[kErrorRank]) - 1,
                       " could not set up the request (its log has why); rank ", rank,
                       " stopped with it"));
  }
  last_alltoall_seconds_ = 0;
  cache_valid_ = false;
  cache_expert_ = -1;
  // fp8 self-attention for this request only (the model keys its graphs on
  // it); reset on every way out.
  for (int e = 0; e < num_experts(); ++e)
    expert(e).set_attention_fp8(params.acceleration.attention_fp8);
  struct ResetFp8 {
    EngineImpl* self;
    ~ResetFp8() {
      for (int e = 0; e < self->num_experts(); ++e) self->expert(e).set_attention_fp8(false);
    }
  } reset_fp8{this};
  const int every = data_.size() > 1 ? options_.timing_every : 0;
  // Only a graph whose replay skips the body's host code hides the
  // all-to-alls from the markers (CUDA); where a replay runs the body again
  // (CPU), every step is timed.
  const bool replays = options_.use_graphs && backend_.replay_skips_host();
  // The first step of the low-noise expert (two experts) runs eagerly too,
  // like step 0: its graph is captured after an eager forward.
  const int switch_step =
      num_experts() == 2 ? HighNoiseSteps(sampler->timesteps(), config_.boundary_ratio)
                         : -1;
  for (int i = 0; i < steps; ++i) {
    double step_seconds = 0, a2a_seconds = 0, cache_signal = -1;
    bool cached = false;
    // Step 0 of every request runs eagerly (plans, NCCL connections); with
    // P > 1 step 1 too (the first all-to-all of a size may set up
    // connections, so step 1 gives the timing), then every `every`-th step.
    const bool sampled = !replays || i == 0 || (data_.size() > 1 && i == 1) ||
                         i == switch_step || (every > 0 && i % every == 0);
    if (local.ok())
      local = RunStep(i, *sampler, cfg, params, sampled, &step_seconds,
                      &a2a_seconds, &cached, &cache_signal);
    if (!local.ok()) AbortData();  // peers in a data collective with us fail promptly
    double words[kControlWords] = {0, 0, 0, 0, 0};
    if (stop != nullptr && stop->code() != absl::StatusCode::kOk)
      words[kStopCode] = static_cast<double>(stop->code());
    if (params.deadline_unix_millis > 0 &&
        UnixMillis() >= params.deadline_unix_millis)
      words[kStopCode] = std::max(
          words[kStopCode], static_cast<double>(absl::StatusCode::kDeadlineExceeded));
    words[kErrorRank] = local.ok() ? 0.0 : static_cast<double>(rank + 1);
    words[kStepSeconds] = step_seconds;
    words[kNegStepSeconds] = -step_seconds;
    words[kAllToAllSeconds] = a2a_seconds;
    absl::Status cs = control_.AllReduce(words, kControlWords,
                                         comm::ReduceType::kF64,
                                         comm::ReduceOp::kMax);
    if (!cs.ok()) {
      AbortData();
      if (!local.ok()) return local;
      return absl::Status(cs.code(), absl::StrCat("control all-reduce at step ",
                                                  i, ": ", cs.message()));
    }
    if (words[kErrorRank] > 0) {
      if (!local.ok()) return local;
      AbortData();
      return absl::AbortedError(absl::StrCat(
          "rank ", static_cast<int>(words[kErrorRank]) - 1, " failed at step ",
          i, "; rank ", rank, " stopped with it"));
    }
    StepStats stats;
    stats.index = i;
    stats.total = steps;
    stats.sigma = sampler->sigmas()[static_cast<size_t>(i)];
    stats.timestep = sampler->timesteps()[static_cast<size_t>(i)];
    stats.seconds = words[kStepSeconds];
    stats.rank_seconds = step_seconds;
    stats.alltoall_seconds = words[kAllToAllSeconds];
    stats.skew_seconds = words[kStepSeconds] + words[kNegStepSeconds];
    stats.cached = cached;
    stats.cache_signal = cache_signal;
    if (on_step) on_step(stats);
    if (words[kStopCode] > 0 && i + 1 < steps) {
      const auto code = static_cast<absl::StatusCode>(
          static_cast<int>(words[kStopCode]));
      if (code == absl::StatusCode::kDeadlineExceeded)
        return absl::DeadlineExceededError(absl::StrCat(
            "deadline exceeded after step ", i + 1, " of ", steps));
      return absl::Status(code, absl::StrCat("stopped after step ", i + 1,
                                             " of ", steps));
    }
  }
  // Finite inputs within the rules can still overflow inside the model (a
  // checkpoint with huge weights, extreme guidance): every rank holds the
  // same latent, so every rank refuses alike, and the engine stays usable.
  // TI2V: the sampler state's frame 0 evolved unread; the result's frame 0
  // is the condition (docs/MODELS.md §5).
  if (!first_frame_.empty()) ReplaceFirstFrame(x_.data());
  if (absl::Status finite = CheckOutputFinite(params); !finite.ok()) return finite;
  Tensor result = Tensor::Host({config_.out_channels, params.latent.frames,
                                params.latent.height, params.latent.width});
  std::memcpy(result.data(), x_.data(), x_.size() * sizeof(float));
  return result;
}

absl::Status EngineImpl::CheckOutputFinite(const GenerateParams& p) const {
  int64_t bad = 0;
  for (float v : x_) bad += std::isfinite(v) ? 0 : 1;
  if (bad == 0) return absl::OkStatus();
  // The likely cause: the input largest relative to the limit on inputs.
  std::string field = "guidance_scale";
  double worst = 0, worst_abs = p.guidance;
  auto consider = [&](const Tensor& t, const char* name) {
    if (!t.defined()) return;
    const double m = MaxAbs(t.data_as<float>(), t.numel());
    if (m / kMaxInputMagnitude > worst) {
      worst = m / kMaxInputMagnitude;
      worst_abs = m;
      field = name;
    }
  };
  consider(p.prompt_embeds, "prompt_embeds");
  consider(p.negative_embeds, "negative_prompt_embeds");
  consider(p.initial_latents, "initial_latents");
  consider(p.condition_latents, "condition_latents");
  consider(p.image_embeds, "image_embeds");
  return RequestRules::NonFiniteOutputError(bad, static_cast<int64_t>(x_.size()),
                                            field, worst_abs);
}

absl::StatusOr<double> EngineImpl::Warmup(const LatentShape& shape,
                                          int text_len) {
  if (text_len < 1)
    return absl::InvalidArgumentError(
        absl::StrCat("warmup text_len ", text_len, " must be >= 1"));
  GenerateParams p;
  p.latent = shape;
  // With graphs the capture happens at the first non-sampled step (1 on one
  // rank, 2 on several): warm up through it, so requests only replay.
  p.steps = options_.use_graphs && data_.size() > 1 ? 3 : 2;
  p.guidance = 2.0;  // both CFG branches, as served requests run them
  p.prompt_embeds = Tensor::Host({text_len, config().text_dim});
  if (config().is_i2v()) p.image_embeds = Tensor::Host({257, config().image_dim});
  if (config().in_channels > config().out_channels)
    p.condition_latents = Tensor::Host(
        {config().in_channels - config().out_channels, shape.frames, shape.height, shape.width});
  double seconds = 0;
  DN_RETURN_IF_ERROR(
      Generate(p,
               [&](const StepStats& s) {
                 // Step 0 builds plans; later steps are representative.
                 if (s.index == 1 || (s.index > 1 && s.seconds < seconds))
                   seconds = s.seconds;
               },
               nullptr)
          .status());
  return seconds;
}

}  // namespace

namespace {

// The group's CFG-parallel topology (docs/ENGINE.md): the split of this rank,
// the heads against the Ulysses degree, and the half group against it.
absl::StatusOr<comm::CfgSplit> CheckCfgTopology(const WanConfig& c,
                                                const comm::ProcessGroup& data,
                                                comm::MemoryKind want, bool cfg_parallel,
                                                const comm::ProcessGroup* ulysses) {
  DN_ASSIGN_OR_RETURN(const comm::CfgSplit split,
                      comm::SplitForCfg(data.size(), data.rank(), cfg_parallel));
  if (c.num_attention_heads % split.ulysses_degree != 0) {
    if (cfg_parallel)
      return absl::FailedPreconditionError(absl::StrCat(
          "num_attention_heads ", c.num_attention_heads,
          " does not divide by the Ulysses degree ", split.ulysses_degree,
          " (--cfg-parallel: ", data.size(), " ranks = 2 CFG halves x ",
          split.ulysses_degree, " Ulysses ranks, which shard the heads)"));
    return absl::FailedPreconditionError(absl::StrCat(
        "num_attention_heads ", c.num_attention_heads,
        " does not divide by the group size ", data.size(),
        " (Ulysses shards heads across ranks",
        data.size() % 2 == 0 && c.num_attention_heads % (data.size() / 2) == 0
            ? absl::StrCat("; --cfg-parallel would run 2 CFG halves x ",
                           data.size() / 2, " Ulysses ranks")
            : std::string(),
        ")"));
  }
  if (!cfg_parallel) {
    if (ulysses != nullptr)
      return absl::InvalidArgumentError(
          "a Ulysses half group was given without cfg_parallel");
    return split;
  }
  if (split.ulysses_degree == 1) return split;  // a half of one rank talks to nobody
  if (ulysses == nullptr)
    return absl::InvalidArgumentError(absl::StrCat(
        "cfg_parallel with ", split.ulysses_degree,
        " Ulysses ranks per half needs the half's group"));
  if (ulysses->size() != split.ulysses_degree ||
      ulysses->rank() != split.ulysses_rank || ulysses->memory() != want)
    return absl::InvalidArgumentError(absl::StrCat(
        "Ulysses half group (rank ", ulysses->rank(), " of ", ulysses->size(),
        ") does not match rank ", data.rank(), " of ", data.size(),
        " under cfg_parallel (want rank ", split.ulysses_rank, " of ",
        split.ulysses_degree, " in the data group's memory)"));
  return split;
}

}  // namespace

EngineOptions WithEnvironment(EngineOptions options) {
  if (const char* g = std::getenv("DN_CUDA_GRAPHS");
      g != nullptr && std::string(g) == "0")
    options.use_graphs = false;
  if (const char* n = std::getenv("DN_A2A_SAMPLE_EVERY"); n != nullptr) {
    char* end = nullptr;
    const long v = std::strtol(n, &end, 10);
    if (end != n && *end == '\0' && v >= 0 && v <= 1000000)
      options.timing_every = static_cast<int>(v);
    else
      DN_LOG(WARNING) << "ignoring DN_A2A_SAMPLE_EVERY='" << n
                      << "' (want an integer >= 0)";
  }
  return options;
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(
    const WeightSource& weights, Backend& backend, comm::ProcessGroup& data,
    comm::ProcessGroup& control, const EngineOptions& options,
    comm::ProcessGroup* ulysses) {
  const WanConfig& c = weights.config();
  if (data.size() != control.size() || data.rank() != control.rank())
    return absl::InvalidArgumentError(absl::StrCat(
        "data group (rank ", data.rank(), " of ", data.size(),
        ") and control group (rank ", control.rank(), " of ", control.size(),
        ") must have the same ranks"));
  const comm::MemoryKind want = backend.device() == Device::kCpu
                                    ? comm::MemoryKind::kHost
                                    : comm::MemoryKind::kDevice;
  if (data.memory() != want)
    return absl::InvalidArgumentError(absl::StrCat(
        "data group '", data.backend_name(), "' moves ",
        data.memory() == comm::MemoryKind::kHost ? "host" : "device",
        " memory, but backend '", backend.name(), "' keeps activations in ",
        want == comm::MemoryKind::kHost ? "host" : "device", " memory"));
  if (control.memory() != comm::MemoryKind::kHost)
    return absl::InvalidArgumentError(absl::StrCat(
        "control group '", control.backend_name(), "' must move host memory"));
  DN_ASSIGN_OR_RETURN(const comm::CfgSplit split,
                      CheckCfgTopology(c, data, want, options.cfg_parallel, ulysses));
  if (options.max_tokens < 1)
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens ", options.max_tokens, " must be >= 1"));
  if (options.timing_every < 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "timing_every ", options.timing_every, " must be >= 0"));
  // Two experts (Wan2.2 A14B): both resident, loaded one after the other.
  DN_ASSIGN_OR_RETURN(std::unique_ptr<WanModel> model,
                      WanModel::Load(weights.expert(0), backend, split.ulysses_degree,
                                     split.ulysses_rank));
  std::unique_ptr<WanModel> low_noise;
  if (c.num_experts() == 2) {
    DN_ASSIGN_OR_RETURN(low_noise, WanModel::Load(weights.expert(1), backend,
                                                  split.ulysses_degree, split.ulysses_rank));
    DN_LOG(INFO) << "engine: two experts, boundary_ratio " << c.boundary_ratio
                 << " (high-noise for t >= " << c.boundary_ratio * kNumTrainTimesteps
                 << ")";
  }
  const EngineOptions effective = WithEnvironment(options);
  DN_LOG(INFO) << "engine: " << data.size() << " ranks = cfg " << split.cfg_degree
               << " x ulysses " << split.ulysses_degree << ", graphs " << (effective.use_graphs ? "on" : "off")
               << (effective.use_graphs && data.size() > 1
                       ? absl::StrCat(", all-to-all timed on steps 0, 1 and every ",
                                      effective.timing_every, "th step")
                       : std::string())
               << ", fused q/k norm+RoPE+pack "
               << (model->fused_qkv_pack() ? "on" : "off");
  comm::ProcessGroup* sp = split.cfg_degree > 1 ? ulysses : &data;
  return std::unique_ptr<Engine>(std::make_unique<EngineImpl>(
      c, std::move(model), std::move(low_noise), backend, data, control, sp, split, effective));
}

}  // namespace dn::worker
