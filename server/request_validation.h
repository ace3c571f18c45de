// File: server/request_validation.h
//
// The coordinator's admission check of a public GenerateRequest: a thin
// adapter from the proto to worker::RequestRules (worker/request_rules.h),
// the same rules Engine::Validate applies on the ranks, against the geometry
// of the ModelInfo the model's worker groups registered. It fills the
// defaults, resolves pixel_size to the latent shape, checks every field and
// every input value. Errors are INVALID_ARGUMENT and start with the field.
#ifndef DN_SERVER_REQUEST_VALIDATION_H_
#define DN_SERVER_REQUEST_VALIDATION_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/statusor.h"
#include "denoised/v1/denoiser.pb.h"
#include "denoised/v1/worker.pb.h"
#include "worker/request_rules.h"

namespace dn::server {

// The rules' defaults and limits, as the proto's types carry them.
inline constexpr int kDefaultSteps = worker::kDefaultSteps;
using worker::kMaxSteps;
inline constexpr float kDefaultGuidance = static_cast<float>(worker::kDefaultGuidance);
inline constexpr float kDefaultShift = static_cast<float>(worker::kDefaultShift);
inline constexpr int kMaxPriority = 100;
inline constexpr size_t kMaxClientRequestIdLength = 128;

struct ResolvedRequest {
  // The request's own fields with every default filled in (steps,
  // guidance_scale, shift, scheduler, step_event_interval,
  // latent_shape.channels), for the coordinator's queue and the result's
  // metadata. Its tensors were moved into `job`: it carries none.
  denoised::v1::GenerateRequest request;
  // What the ranks run (request_id and deadline are set at dispatch). The
  // coordinator moves it into the one message it sends to every rank.
  denoised::v1::internal::Job job;
  denoised::v1::LatentShape latent;  // [C, F, H, W] in latent space
  int64_t tokens = 0;                // sequence length after patching
  int text_len = 0;                  // T of prompt_embeds
  int64_t tensor_bytes = 0;          // bytes of the tensors in `job`
};

// The rules' view of a registered model (GeometryOf's rule, from the proto).
worker::ModelGeometry GeometryFromModelInfo(const denoised::v1::ModelInfo& model);

// Pixel size -> latent shape with the model's VAE strides; errors name
// pixel_size.frames/height/width.
absl::StatusOr<denoised::v1::LatentShape> ResolvePixelSize(
    const denoised::v1::PixelSize& pixels, const denoised::v1::ModelInfo& model);

// Tokens of a latent shape after the model's patching (saturates at INT64_MAX).
int64_t LatentTokens(const denoised::v1::LatentShape& latent,
                     const denoised::v1::ModelInfo& model);

// Checks `request` (whose model is `model`) and fills defaults. Its tensors
// are moved into the result's job, not copied: pass an rvalue where the
// request is not needed any more.
absl::StatusOr<ResolvedRequest> ValidateRequest(
    denoised::v1::GenerateRequest request, const denoised::v1::ModelInfo& model);

}  // namespace dn::server

#endif  // DN_SERVER_REQUEST_VALIDATION_H_
