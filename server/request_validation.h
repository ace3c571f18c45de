// File: server/request_validation.h
//
// Validation of a public GenerateRequest against the ModelInfo its worker
// groups registered, done by the coordinator before admission: fills the
// defaults (steps 50, guidance 5, shift 3, UniPC, one step event per step),
// resolves pixel_size to the latent shape through the model's VAE strides
// (the same rule as worker::LatentFromPixels) and checks every field. Errors
// are INVALID_ARGUMENT and name the field.
#ifndef DN_SERVER_REQUEST_VALIDATION_H_
#define DN_SERVER_REQUEST_VALIDATION_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "denoised/v1/denoiser.pb.h"
#include "worker/engine.h"

namespace dn::server {

inline constexpr int kDefaultSteps = 50;
using worker::kMaxSteps;  // the engine's limits (worker/engine.h)
inline constexpr float kDefaultGuidance = 5.0f;
inline constexpr float kDefaultShift = 3.0f;
inline constexpr int kMaxPriority = 100;
inline constexpr size_t kMaxClientRequestIdLength = 128;

struct ResolvedRequest {
  // The request with every default filled in (steps, guidance_scale, shift,
  // scheduler, step_event_interval, latent_shape.channels).
  denoised::v1::GenerateRequest request;
  denoised::v1::LatentShape latent;  // [C, F, H, W] in latent space
  int64_t tokens = 0;                // sequence length after patching
  int text_len = 0;                  // T of prompt_embeds
};

// Pixel size -> latent shape with the model's VAE strides; errors name
// pixel_size.frames/height/width.
absl::StatusOr<denoised::v1::LatentShape> ResolvePixelSize(
    const denoised::v1::PixelSize& pixels, const denoised::v1::ModelInfo& model);

// Tokens of a latent shape after the model's patching (saturates at INT64_MAX).
int64_t LatentTokens(const denoised::v1::LatentShape& latent,
                     const denoised::v1::ModelInfo& model);

// Checks `request` (whose model is `model`) and fills defaults.
absl::StatusOr<ResolvedRequest> ValidateRequest(
    const denoised::v1::GenerateRequest& request,
    const denoised::v1::ModelInfo& model);

}  // namespace dn::server

#endif  // DN_SERVER_REQUEST_VALIDATION_H_
