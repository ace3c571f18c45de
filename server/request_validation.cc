#include "server/request_validation.h"

#include <cmath>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/base/status_macros.h"
#include "server/proto_convert.h"

namespace dn::server {

namespace v1 = ::denoised::v1;

namespace {

absl::Status Invalid(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

int At(const google::protobuf::RepeatedField<int32_t>& v, int i, int dflt) {
  return i < v.size() && v.Get(i) > 0 ? v.Get(i) : dflt;
}

// Checks an embeddings tensor: [T, text_dim] or [1, T, text_dim]. Returns T.
absl::StatusOr<int> CheckEmbeds(const v1::Tensor& t, const std::string& field,
                                int text_dim) {
  DN_RETURN_IF_ERROR(CheckFinite(t, field));
  const auto& s = t.shape();
  const bool rank2 = s.size() == 2;
  const bool rank3 = s.size() == 3 && s.Get(0) == 1;
  if (!(rank2 || rank3) || s.Get(s.size() - 1) != text_dim ||
      s.Get(s.size() - 2) < 1) {
    return Invalid(field + ".shape",
                   absl::StrCat("expected [T, ", text_dim, "] or [1, T, ",
                                text_dim, "] with T >= 1, got [",
                                absl::StrJoin(s, ", "), "]"));
  }
  if (s.Get(s.size() - 2) > worker::kMaxTextTokens) {
    return Invalid(field + ".shape",
                   absl::StrCat("T = ", s.Get(s.size() - 2), " text tokens is more than ",
                                worker::kMaxTextTokens));
  }
  return static_cast<int>(s.Get(s.size() - 2));
}

}  // namespace

absl::StatusOr<v1::LatentShape> ResolvePixelSize(const v1::PixelSize& pixels,
                                                 const v1::ModelInfo& model) {
  const int st = At(model.vae_stride(), 0, 1);
  const int sh = At(model.vae_stride(), 1, 1);
  const int sw = At(model.vae_stride(), 2, 1);
  if (pixels.frames() < 1 || (pixels.frames() - 1) % st != 0) {
    return Invalid("pixel_size.frames",
                   absl::StrCat(pixels.frames(), " is not 1 + a multiple of ",
                                st, " (the model's temporal VAE stride)"));
  }
  if (pixels.height() < 1 || pixels.height() % sh != 0) {
    return Invalid("pixel_size.height",
                   absl::StrCat(pixels.height(),
                                " is not a positive multiple of ", sh,
                                " (the model's VAE stride)"));
  }
  if (pixels.width() < 1 || pixels.width() % sw != 0) {
    return Invalid("pixel_size.width",
                   absl::StrCat(pixels.width(),
                                " is not a positive multiple of ", sw,
                                " (the model's VAE stride)"));
  }
  v1::LatentShape latent;
  latent.set_channels(model.in_channels());
  latent.set_frames((pixels.frames() - 1) / st + 1);
  latent.set_height(pixels.height() / sh);
  latent.set_width(pixels.width() / sw);
  return latent;
}

int64_t LatentTokens(const v1::LatentShape& latent, const v1::ModelInfo& model) {
  const int pt = At(model.patch_size(), 0, 1);
  const int ph = At(model.patch_size(), 1, 1);
  const int pw = At(model.patch_size(), 2, 1);
  // Each factor is < 2^31, so the product of three can overflow int64 (found
  // by tests/fuzz): saturate, and the max_tokens check rejects it.
  const int64_t ft = int64_t{latent.frames() / pt} * (latent.height() / ph);
  int64_t tokens = 0;
  if (__builtin_mul_overflow(ft, int64_t{latent.width() / pw}, &tokens)) {
    return std::numeric_limits<int64_t>::max();
  }
  return tokens;
}

absl::StatusOr<ResolvedRequest> ValidateRequest(const v1::GenerateRequest& in,
                                                const v1::ModelInfo& model) {
  ResolvedRequest out;
  out.request = in;
  v1::GenerateRequest& r = out.request;

  // --- size --------------------------------------------------------------
  v1::LatentShape latent;
  const bool from_pixels = in.has_pixel_size();
  if (in.has_latent_shape()) {
    latent = in.latent_shape();
    if (latent.channels() == 0) latent.set_channels(model.in_channels());
    if (latent.channels() != model.in_channels()) {
      return Invalid("latent_shape.channels",
                     absl::StrCat(latent.channels(), " != the model's ",
                                  model.in_channels(), " input channels"));
    }
  } else if (from_pixels) {
    DN_ASSIGN_OR_RETURN(latent, ResolvePixelSize(in.pixel_size(), model));
  } else {
    return Invalid("size", "set latent_shape or pixel_size");
  }
  const std::string shape_field = from_pixels ? "pixel_size" : "latent_shape";
  const int patch[3] = {At(model.patch_size(), 0, 1),
                        At(model.patch_size(), 1, 1),
                        At(model.patch_size(), 2, 1)};
  const int dims[3] = {latent.frames(), latent.height(), latent.width()};
  const char* names[3] = {"frames", "height", "width"};
  for (int i = 0; i < 3; ++i) {
    if (dims[i] < 1 || dims[i] % patch[i] != 0) {
      return Invalid(
          absl::StrCat(shape_field, ".", names[i]),
          absl::StrCat("latent ", names[i], " ", dims[i],
                       " is not a positive multiple of the patch size ",
                       patch[i],
                       from_pixels ? " (pixel size / VAE stride)" : ""));
    }
    if (model.max_axis_tokens() > 0 && dims[i] / patch[i] > model.max_axis_tokens()) {
      return Invalid(absl::StrCat(shape_field, ".", names[i]),
                     absl::StrCat("latent ", names[i], " ", dims[i], " is ", dims[i] / patch[i],
                                  " tokens along the axis; the model has positions for ",
                                  model.max_axis_tokens()));
    }
  }
  out.latent = latent;
  out.tokens = LatentTokens(latent, model);
  if (model.max_tokens() > 0 && out.tokens > model.max_tokens()) {
    return Invalid(shape_field,
                   absl::StrCat("latent ", LatentString(latent), " is ",
                                out.tokens, " tokens; the model serves at most ",
                                model.max_tokens()));
  }
  *r.mutable_latent_shape() = latent;  // clears pixel_size (oneof)

  // --- embeddings --------------------------------------------------------
  if (!in.has_prompt_embeds()) {
    return Invalid("prompt_embeds", "required (text-encoder output [T, " +
                                        std::to_string(model.text_dim()) +
                                        "])");
  }
  DN_ASSIGN_OR_RETURN(out.text_len, CheckEmbeds(in.prompt_embeds(),
                                                "prompt_embeds",
                                                model.text_dim()));
  if (in.has_negative_prompt_embeds()) {
    DN_RETURN_IF_ERROR(CheckEmbeds(in.negative_prompt_embeds(),
                                   "negative_prompt_embeds", model.text_dim())
                           .status());
  }

  // --- sampling ----------------------------------------------------------
  if (!in.has_steps()) r.set_steps(kDefaultSteps);  // unset: the default; 0 is refused
  if (r.steps() < 1 || r.steps() > kMaxSteps) {
    return Invalid("steps", absl::StrCat("must be in [1, ", kMaxSteps,
                                         "], got ", in.steps()));
  }
  if (!std::isfinite(r.guidance_scale()) || r.guidance_scale() < 0 ||
      r.guidance_scale() > worker::kMaxGuidance) {
    return Invalid("guidance_scale", absl::StrCat("must be finite and in [0, ",
                                                  worker::kMaxGuidance, "], got ",
                                                  in.guidance_scale()));
  }
  if (r.guidance_scale() == 0) r.set_guidance_scale(kDefaultGuidance);
  if (in.has_guidance_scale_2()) {
    if (model.experts() < 2)
      return Invalid("guidance_scale_2",
                     "is for two-expert models (Wan2.2 A14B); model '" +
                         model.name() + "' has one transformer");
    if (!std::isfinite(r.guidance_scale_2()) || r.guidance_scale_2() < 0 ||
        r.guidance_scale_2() > worker::kMaxGuidance)
      return Invalid("guidance_scale_2",
                     absl::StrCat("must be finite and in [0, ", worker::kMaxGuidance,
                                  "], got ", in.guidance_scale_2()));
  }
  if (r.lora_size() > static_cast<int>(worker::kMaxLorasPerRequest))
    return Invalid("lora", absl::StrCat(r.lora_size(), " LoRAs, at most ",
                                        worker::kMaxLorasPerRequest));
  for (int i = 0; i < r.lora_size(); ++i) {
    const v1::LoraRef& l = r.lora(i);
    const std::string f = absl::StrCat("lora[", i, "]");
    if (l.name().empty() || l.name().size() > 255 || l.name().find('/') != std::string::npos ||
        l.name() == "." || l.name() == ".." || l.name().find('\0') != std::string::npos)
      return Invalid(f + ".name", "must be a LoRA file name (ModelInfo.loras)");
    if (l.has_scale() && (!std::isfinite(l.scale()) || std::abs(l.scale()) > worker::kMaxLoraScale))
      return Invalid(f + ".scale", absl::StrCat("must be finite with |scale| <= ",
                                                worker::kMaxLoraScale, ", got ", l.scale()));
    if (l.expert() < 0 || l.expert() > std::max(1, model.experts()) ||
        (l.expert() > 0 && model.experts() < 2))
      return Invalid(f + ".expert", absl::StrCat("must be 0 (all)", model.experts() == 2
                                                                      ? ", 1 (high-noise) or 2 (low-noise)"
                                                                      : " for a one-transformer model",
                                                 ", got ", l.expert()));
  }
  if (!std::isfinite(r.shift()) || r.shift() < 0 || r.shift() > worker::kMaxShift) {
    return Invalid("shift", absl::StrCat("must be finite and in (0, ", worker::kMaxShift,
                                         "] (0: the default), got ", in.shift()));
  }
  if (r.shift() == 0) r.set_shift(kDefaultShift);
  if (!v1::Scheduler_IsValid(r.scheduler())) {
    return Invalid("scheduler",
                   absl::StrCat("unknown value ", static_cast<int>(r.scheduler())));
  }
  if (r.scheduler() == v1::SCHEDULER_UNSPECIFIED) {
    r.set_scheduler(v1::SCHEDULER_UNIPC);
  }

  // --- image tokens (Wan2.1 I2V) -----------------------------------------
  if (in.has_image_embeds()) {
    if (model.image_dim() <= 0)
      return Invalid("image_embeds", "model '" + model.name() +
                                         "' has no image branch (a t2v or Wan2.2 model)");
    DN_RETURN_IF_ERROR(CheckFinite(in.image_embeds(), "image_embeds"));
    const auto& s = in.image_embeds().shape();
    const bool ok2 = s.size() == 2, ok3 = s.size() == 3 && s.Get(0) == 1;
    const int64_t n = ok2 ? s.Get(0) : ok3 ? s.Get(1) : 0;
    if ((!ok2 && !ok3) || s.Get(s.size() - 1) != model.image_dim() || n < 1 ||
        n > worker::kMaxImageTokens)
      return Invalid("image_embeds.shape",
                     absl::StrCat("expected [N, ", model.image_dim(), "] or [1, N, ",
                                  model.image_dim(), "] with 1 <= N <= ", worker::kMaxImageTokens,
                                  ", got [", absl::StrJoin(s, ", "), "]"));
  } else if (model.image_dim() > 0) {
    return Invalid("image_embeds", absl::StrCat("required: model '", model.name(),
                                                "' has an image branch (CLIP tokens [N, ",
                                                model.image_dim(), "], 257 for Wan2.1)"));
  }

  // --- initial latents / condition ---------------------------------------
  // The sampler state has out_channels; in_channels - out_channels more are
  // the condition (I2V).
  const int state_channels = model.out_channels() > 0 ? model.out_channels() : latent.channels();
  const int cond_channels = latent.channels() - state_channels;
  if (in.has_condition_latents()) {
    if (cond_channels <= 0)
      return Invalid("condition_latents",
                     absl::StrCat("model '", model.name(), "' takes no condition (in_channels ",
                                  latent.channels(), " = out_channels)"));
    DN_RETURN_IF_ERROR(CheckFinite(in.condition_latents(), "condition_latents"));
    const auto& s = in.condition_latents().shape();
    if (s.size() != 4 || s.Get(0) != cond_channels || s.Get(1) != latent.frames() ||
        s.Get(2) != latent.height() || s.Get(3) != latent.width())
      return Invalid("condition_latents.shape",
                     absl::StrCat("expected [", cond_channels, ", ", latent.frames(), ", ",
                                  latent.height(), ", ", latent.width(), "], got [",
                                  absl::StrJoin(s, ", "), "]"));
  } else if (cond_channels > 0) {
    return Invalid("condition_latents",
                   absl::StrCat("required: model '", model.name(), "' takes ", latent.channels(),
                                " input channels = ", state_channels, " latent + ", cond_channels,
                                " condition (mask 4 | image latent 16)"));
  }
  if (in.has_initial_latents()) {
    DN_RETURN_IF_ERROR(CheckFinite(in.initial_latents(), "initial_latents"));
    const auto& s = in.initial_latents().shape();
    if (s.size() != 4 || s.Get(0) != state_channels ||
        s.Get(1) != latent.frames() || s.Get(2) != latent.height() ||
        s.Get(3) != latent.width()) {
      return Invalid("initial_latents.shape",
                     absl::StrCat("expected the latent shape ",
                                  LatentString(latent), ", got [",
                                  absl::StrJoin(s, ", "), "]"));
    }
  }

  // --- scheduling --------------------------------------------------------
  if (r.priority() < -kMaxPriority || r.priority() > kMaxPriority) {
    return Invalid("priority", absl::StrCat("must be in [-", kMaxPriority,
                                            ", ", kMaxPriority, "], got ",
                                            in.priority()));
  }
  if (r.client_request_id().size() > kMaxClientRequestIdLength) {
    return Invalid("client_request_id",
                   absl::StrCat("longer than ", kMaxClientRequestIdLength,
                                " bytes"));
  }
  if (r.step_event_interval() < 0) {
    return Invalid("step_event_interval",
                   absl::StrCat("must be >= 0, got ", in.step_event_interval()));
  }
  if (r.step_event_interval() == 0) r.set_step_event_interval(1);
  return out;
}

}  // namespace dn::server
