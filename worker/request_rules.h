// File: worker/request_rules.h
//
// The one set of request rules (issue 14): pixel -> latent conversion, token
// counts, limits, defaults, input magnitudes and the sampler's schedule
// checks. No protobuf here. Two callers, one set of rules:
//   - the coordinator's admission (server/request_validation.cc adapts a
//     GenerateRequest to these calls), and
//   - Engine::Validate on every rank (worker/engine.cc),
// so a request the coordinator accepts is never refused by the ranks: both
// run the same checks against the same model geometry (the ranks' ModelInfo
// is made from the WanConfig with GeometryOf's rule).
//
// Every error is INVALID_ARGUMENT and its message starts with the public
// API's field name (docs/API.md), e.g. "shift: ...", "pixel_size.height: ...",
// "prompt_embeds.data: ...".
#ifndef DN_WORKER_REQUEST_RULES_H_
#define DN_WORKER_REQUEST_RULES_H_

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/acceleration.h"
#include "worker/sampler.h"
#include "worker/tensor.h"

namespace dn::worker {

struct WanConfig;

// Defaults (a request's 0 / unset value means the default).
inline constexpr int kDefaultSteps = 50;
inline constexpr double kDefaultGuidance = 5.0;
inline constexpr double kDefaultShift = 3.0;
inline constexpr SchedulerKind kDefaultScheduler = SchedulerKind::kUniPC;

// Limits.
inline constexpr int kMaxSteps = 1000;
inline constexpr double kMaxGuidance = 100;
inline constexpr double kMaxShift = 1000;
inline constexpr int64_t kMaxTextTokens = 4096;
// Largest |value| accepted in prompt_embeds, negative_prompt_embeds and
// initial_latents. Text-encoder outputs and unit-variance noise are orders
// of magnitude below it; values near the float range (3e38) overflow inside
// the model and would return NaN latents.
inline constexpr double kMaxInputMagnitude = 1e4;
inline constexpr size_t kMaxLorasPerRequest = 16;
inline constexpr size_t kMaxLoraNameLength = 255;
inline constexpr double kMaxLoraScale = 100;
inline constexpr int64_t kMaxImageTokens = 1024;  // CLIP image tokens (257 for Wan2.1 I2V)
// Largest acceleration.cache_threshold. The step-cache signal is a relative
// change (mean |r0 - r0_prev| / mean |r0_prev|, docs/ENGINE.md "Step
// caching"): at 1 a step is skipped unless block 0's residual changed by as
// much as its own size, past which nothing is computed but the first block.
inline constexpr double kMaxCacheThreshold = 1.0;

struct LatentShape {
  int channels = 0;
  int frames = 0;
  int height = 0;
  int width = 0;
};

struct PixelSize {
  int frames = 0;
  int height = 0;
  int width = 0;
};

// What the rules need to know of a model.
struct ModelGeometry {
  int in_channels = 0;   // the transformer's input channels (latent_shape.channels)
  // The sampler state's channels (initial_latents, the result); the other
  // in_channels - out_channels are the condition (I2V: mask 4 | image 16).
  // 0 = in_channels.
  int out_channels = 0;
  int text_dim = 0;
  int image_dim = 0;  // CLIP image-token width; 0 = no image branch
  int experts = 1;    // 2 = Wan2.2 A14B (high- and low-noise transformers)
  // Wan2.2 TI2V (expand_timesteps; ModelInfo kind "ti2v"): condition_latents
  // is optional and is the image latent of frame 0, [out_channels, 1, H, W]
  // (docs/MODELS.md §5), instead of extra input channels.
  bool first_frame_condition = false;
  std::array<int, 3> vae_stride = {1, 1, 1};  // (t, h, w); values < 1 count as 1
  std::array<int, 3> patch_size = {1, 1, 1};  // (t, h, w); values < 1 count as 1
  int64_t max_tokens = 0;   // most tokens of a request; 0 = not limited
  int max_axis_tokens = 0;  // most tokens along one axis (RoPE); 0 = not limited
};
// The geometry of a WanConfig served with `max_tokens` (max_axis_tokens is
// the config's rope_max_seq_len).
ModelGeometry GeometryOf(const WanConfig& config, int64_t max_tokens);

// The sampling settings of a request, defaults filled in.
struct Sampling {
  int steps = kDefaultSteps;
  double guidance = kDefaultGuidance;  // CFG on iff > 1
  double shift = kDefaultShift;
  SchedulerKind scheduler = kDefaultScheduler;
};

// Which field a latent shape came from: errors name "latent_shape.height"
// or "pixel_size.height".
enum class SizeField { kLatentShape, kPixelSize };

class RequestRules {
 public:
  explicit RequestRules(const ModelGeometry& model);
  const ModelGeometry& model() const { return model_; }

  // --- size ---------------------------------------------------------------
  // Pixel size -> latent shape through the VAE strides: frames (F-1)/st+1,
  // height H/sh, width W/sw, channels in_channels. Errors name
  // pixel_size.frames/height/width. Only the strides are checked here;
  // CheckLatent checks the result.
  absl::StatusOr<LatentShape> LatentFromPixels(const PixelSize& pixels) const;
  // Checks a latent shape (channels 0 = the model's) and returns it with the
  // channels filled: channels, frames/height/width positive multiples of the
  // patch size, at most max_axis_tokens along an axis, at most max_tokens.
  absl::StatusOr<LatentShape> CheckLatent(LatentShape latent,
                                          SizeField field) const;
  // Tokens after patching (F/pt * H/ph * W/pw), saturating at INT64_MAX.
  int64_t Tokens(const LatentShape& latent) const;

  // --- sampling -----------------------------------------------------------
  // Fills defaults (steps unset; guidance 0; shift 0) and checks the result
  // with CheckSampling.
  absl::StatusOr<Sampling> ResolveSampling(std::optional<int> steps,
                                           double guidance, double shift,
                                           SchedulerKind scheduler) const;
  // steps in [1, kMaxSteps], guidance finite in [0, kMaxGuidance], shift
  // finite in (0, kMaxShift], and the sampler's schedule for them not
  // degenerate (sigmas finite, in (0, 1], decreasing: an extreme shift such
  // as 1e-30 is refused here, naming "shift").
  absl::Status CheckSampling(const Sampling& sampling) const;

  // --- tensors ------------------------------------------------------------
  // Embeddings [T, text_dim] or [1, T, text_dim], 1 <= T <= kMaxTextTokens.
  // Returns T. Errors name "<field>.shape".
  absl::StatusOr<int64_t> CheckEmbedsShape(absl::string_view field,
                                           const Shape& shape) const;
  // Initial latents of exactly the sampler state's shape [out_channels, F, H, W].
  absl::Status CheckLatentsShape(absl::string_view field, const Shape& shape,
                                 const LatentShape& latent) const;
  // One element of an input tensor: finite and |v| <= kMaxInputMagnitude.
  // Errors name "<field>.data" and the element.
  static absl::Status CheckValue(absl::string_view field, int64_t index,
                                 float v) {
    if (v <= static_cast<float>(kMaxInputMagnitude) &&
        v >= -static_cast<float>(kMaxInputMagnitude))
      return absl::OkStatus();
    return ValueError(field, index, v);
  }
  // condition_latents of [in_channels - out_channels, F, H, W], or on a
  // first_frame_condition model (TI2V) [out_channels, 1, H, W].
  absl::Status CheckConditionShape(absl::string_view field, const Shape& shape,
                                   const LatentShape& latent) const;
  // image_embeds [N, image_dim] or [1, N, image_dim], 1 <= N <=
  // kMaxImageTokens, on a model with an image branch. Returns N.
  absl::StatusOr<int64_t> CheckImageEmbedsShape(absl::string_view field,
                                                const Shape& shape) const;
  // The model's conditioning inputs are present exactly when it takes them:
  // image_embeds iff it has an image branch, condition_latents iff
  // in_channels > out_channels (optional on a first_frame_condition model).
  // Errors name the field.
  absl::Status CheckConditioningPresent(bool has_image_embeds,
                                        bool has_condition_latents) const;

  // --- two experts, LoRA ----------------------------------------------------
  // guidance_scale_2: only for two-expert models; finite in [0, kMaxGuidance].
  absl::Status CheckGuidance2(double guidance_2) const;
  // At most kMaxLorasPerRequest LoRAs.
  absl::Status CheckLoraCount(size_t count) const;
  // lora[index]: name a plain file name of the LoRA directory, scale finite
  // with |scale| <= kMaxLoraScale, expert in the API's encoding (0 = all,
  // 1 = high-noise, 2 = low-noise; 1 and 2 only for two-expert models).
  absl::Status CheckLora(int index, absl::string_view name, double scale,
                         int expert) const;

  // --- fast tier ------------------------------------------------------------
  // acceleration (worker/acceleration.h): cache_threshold finite in [0,
  // kMaxCacheThreshold]. Errors name "acceleration.cache_threshold".
  static absl::Status CheckAcceleration(const Acceleration& acceleration);

  // CheckValue over n f32 values.
  static absl::Status CheckValues(absl::string_view field, const float* v,
                                  int64_t n);

  // The error for a request whose output came out non-finite although it
  // passed these rules: names the input most likely at fault (the one with
  // the largest |value| relative to kMaxInputMagnitude, else the sampling
  // settings), with the count of bad values.
  static absl::Status NonFiniteOutputError(int64_t bad, int64_t total,
                                           absl::string_view likely_field,
                                           double likely_max_abs);

 private:
  static absl::Status ValueError(absl::string_view field, int64_t index,
                                 float v);
  int Patch(int axis) const;
  int StateChannels() const;
  int Stride(int axis) const;

  ModelGeometry model_;
};

// Largest |value| of n floats (NaN if any is NaN).
double MaxAbs(const float* v, int64_t n);

}  // namespace dn::worker

#endif  // DN_WORKER_REQUEST_RULES_H_
