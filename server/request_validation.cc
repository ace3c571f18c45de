#include "server/request_validation.h"

#include <algorithm>
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "server/proto_convert.h"

namespace dn::server {

namespace v1 = ::denoised::v1;
namespace v1i = ::denoised::v1::internal;

namespace {

absl::Status Invalid(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

int At(const google::protobuf::RepeatedField<int32_t>& v, int i) {
  return i < v.size() && v.Get(i) > 0 ? v.Get(i) : 1;
}

worker::Shape ShapeOf(const v1::Tensor& t) {
  return worker::Shape(t.shape().begin(), t.shape().end());
}

// A wire embeddings tensor: well formed, the rules' shape, every value in
// range. Returns T.
absl::StatusOr<int64_t> CheckEmbeds(const worker::RequestRules& rules,
                                    const v1::Tensor& t, const std::string& field) {
  DN_RETURN_IF_ERROR(CheckTensor(t, field));
  DN_ASSIGN_OR_RETURN(int64_t len, rules.CheckEmbedsShape(field, ShapeOf(t)));
  DN_RETURN_IF_ERROR(CheckTensorValues(t, field));
  return len;
}

}  // namespace

worker::ModelGeometry GeometryFromModelInfo(const v1::ModelInfo& model) {
  worker::ModelGeometry g;
  g.in_channels = model.in_channels();
  g.out_channels = model.out_channels();
  g.text_dim = model.text_dim();
  g.image_dim = model.image_dim();
  g.experts = std::max(1, model.experts());
  g.first_frame_condition = model.kind() == "ti2v";
  for (int i = 0; i < 3; ++i) {
    g.vae_stride[static_cast<size_t>(i)] = At(model.vae_stride(), i);
    g.patch_size[static_cast<size_t>(i)] = At(model.patch_size(), i);
  }
  g.max_tokens = model.max_tokens();
  g.max_axis_tokens = model.max_axis_tokens();
  return g;
}

absl::StatusOr<v1::LatentShape> ResolvePixelSize(const v1::PixelSize& pixels,
                                                 const v1::ModelInfo& model) {
  const worker::RequestRules rules(GeometryFromModelInfo(model));
  DN_ASSIGN_OR_RETURN(
      worker::LatentShape latent,
      rules.LatentFromPixels({pixels.frames(), pixels.height(), pixels.width()}));
  return LatentToProto(latent);
}

int64_t LatentTokens(const v1::LatentShape& latent, const v1::ModelInfo& model) {
  return worker::RequestRules(GeometryFromModelInfo(model)).Tokens(LatentFromProto(latent));
}

absl::StatusOr<ResolvedRequest> ValidateRequest(v1::GenerateRequest in,
                                                const v1::ModelInfo& model) {
  const worker::RequestRules rules(GeometryFromModelInfo(model));
  ResolvedRequest out;
  // Checked in place; moved into `out` at the end.
  v1::GenerateRequest& r = in;

  // --- size --------------------------------------------------------------
  worker::LatentShape latent;
  worker::SizeField size_field = worker::SizeField::kLatentShape;
  if (in.has_latent_shape()) {
    latent = LatentFromProto(in.latent_shape());
  } else if (in.has_pixel_size()) {
    size_field = worker::SizeField::kPixelSize;
    const v1::PixelSize& p = in.pixel_size();
    DN_ASSIGN_OR_RETURN(latent, rules.LatentFromPixels({p.frames(), p.height(), p.width()}));
  } else {
    return Invalid("size", "set latent_shape or pixel_size");
  }
  DN_ASSIGN_OR_RETURN(latent, rules.CheckLatent(latent, size_field));
  out.latent = LatentToProto(latent);
  out.tokens = rules.Tokens(latent);

  // --- embeddings --------------------------------------------------------
  if (!in.has_prompt_embeds()) {
    return Invalid("prompt_embeds", absl::StrCat("required (text-encoder output [T, ",
                                                 model.text_dim(), "])"));
  }
  DN_ASSIGN_OR_RETURN(int64_t text_len,
                      CheckEmbeds(rules, in.prompt_embeds(), "prompt_embeds"));
  out.text_len = static_cast<int>(text_len);
  if (in.has_negative_prompt_embeds()) {
    DN_RETURN_IF_ERROR(
        CheckEmbeds(rules, in.negative_prompt_embeds(), "negative_prompt_embeds").status());
  }

  // --- sampling ----------------------------------------------------------
  if (!v1::Scheduler_IsValid(r.scheduler())) {
    return Invalid("scheduler",
                   absl::StrCat("unknown value ", static_cast<int>(r.scheduler())));
  }
  // Unset steps: the default; an explicit 0 is refused.
  DN_ASSIGN_OR_RETURN(
      worker::Sampling sampling,
      rules.ResolveSampling(in.has_steps() ? std::optional<int>(in.steps()) : std::nullopt,
                            in.guidance_scale(), in.shift(),
                            SchedulerFromProto(r.scheduler())));
  r.set_steps(sampling.steps);
  r.set_guidance_scale(static_cast<float>(sampling.guidance));
  r.set_shift(static_cast<float>(sampling.shift));
  r.set_scheduler(SchedulerToProto(sampling.scheduler));
  if (in.has_guidance_scale_2())
    DN_RETURN_IF_ERROR(rules.CheckGuidance2(in.guidance_scale_2()));

  // --- fast tier ---------------------------------------------------------
  if (in.has_acceleration())
    DN_RETURN_IF_ERROR(worker::RequestRules::CheckAcceleration(
        {in.acceleration().attention_fp8(), in.acceleration().cache_threshold()}));

  // --- LoRA --------------------------------------------------------------
  DN_RETURN_IF_ERROR(rules.CheckLoraCount(static_cast<size_t>(r.lora_size())));
  for (int i = 0; i < r.lora_size(); ++i) {
    const v1::LoraRef& l = r.lora(i);
    DN_RETURN_IF_ERROR(rules.CheckLora(i, l.name(), l.has_scale() ? l.scale() : 1.0,
                                       l.expert()));
  }

  // --- conditioning (I2V) ------------------------------------------------
  DN_RETURN_IF_ERROR(
      rules.CheckConditioningPresent(in.has_image_embeds(), in.has_condition_latents()));
  if (in.has_image_embeds()) {
    DN_RETURN_IF_ERROR(CheckTensor(in.image_embeds(), "image_embeds"));
    DN_RETURN_IF_ERROR(
        rules.CheckImageEmbedsShape("image_embeds", ShapeOf(in.image_embeds())).status());
    DN_RETURN_IF_ERROR(CheckTensorValues(in.image_embeds(), "image_embeds"));
  }
  if (in.has_condition_latents()) {
    DN_RETURN_IF_ERROR(CheckTensor(in.condition_latents(), "condition_latents"));
    DN_RETURN_IF_ERROR(rules.CheckConditionShape("condition_latents",
                                                 ShapeOf(in.condition_latents()), latent));
    DN_RETURN_IF_ERROR(CheckTensorValues(in.condition_latents(), "condition_latents"));
  }

  // --- initial latents ---------------------------------------------------
  if (in.has_initial_latents()) {
    DN_RETURN_IF_ERROR(CheckTensor(in.initial_latents(), "initial_latents"));
    DN_RETURN_IF_ERROR(
        rules.CheckLatentsShape("initial_latents", ShapeOf(in.initial_latents()), latent));
    DN_RETURN_IF_ERROR(CheckTensorValues(in.initial_latents(), "initial_latents"));
  }

  // --- scheduling (the coordinator's own fields) --------------------------
  if (r.priority() < -kMaxPriority || r.priority() > kMaxPriority) {
    return Invalid("priority", absl::StrCat("must be in [-", kMaxPriority, ", ",
                                            kMaxPriority, "], got ", in.priority()));
  }
  if (r.client_request_id().size() > kMaxClientRequestIdLength) {
    return Invalid("client_request_id",
                   absl::StrCat("longer than ", kMaxClientRequestIdLength, " bytes"));
  }
  if (r.step_event_interval() < 0) {
    return Invalid("step_event_interval",
                   absl::StrCat("must be >= 0, got ", in.step_event_interval()));
  }
  if (r.step_event_interval() == 0) r.set_step_event_interval(1);

  // --- the job: the ranks' part, tensors moved -----------------------------
  *r.mutable_latent_shape() = out.latent;  // clears pixel_size (oneof)
  v1i::Job& job = out.job;
  *job.mutable_latent_shape() = out.latent;
  job.set_steps(r.steps());
  job.set_guidance_scale(r.guidance_scale());
  job.set_scheduler(r.scheduler());
  job.set_shift(r.shift());
  job.set_seed(r.seed());
  if (r.has_guidance_scale_2()) job.set_guidance_scale_2(r.guidance_scale_2());
  *job.mutable_lora() = r.lora();
  if (r.has_acceleration()) *job.mutable_acceleration() = r.acceleration();
  job.set_allocated_prompt_embeds(r.release_prompt_embeds());
  if (r.has_negative_prompt_embeds())
    job.set_allocated_negative_prompt_embeds(r.release_negative_prompt_embeds());
  if (r.has_initial_latents())
    job.set_allocated_initial_latents(r.release_initial_latents());
  if (r.has_condition_latents())
    job.set_allocated_condition_latents(r.release_condition_latents());
  if (r.has_image_embeds()) job.set_allocated_image_embeds(r.release_image_embeds());
  out.tensor_bytes = static_cast<int64_t>(
      job.prompt_embeds().data().size() + job.negative_prompt_embeds().data().size() +
      job.initial_latents().data().size() + job.condition_latents().data().size() +
      job.image_embeds().data().size());
  out.request = std::move(in);
  return out;
}

}  // namespace dn::server
