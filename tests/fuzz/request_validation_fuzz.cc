// File: tests/fuzz/request_validation_fuzz.cc
//
// libFuzzer target: the coordinator's admission path for an untrusted
// GenerateRequest: protobuf parse of the wire bytes, then
// server::ValidateRequest against a fixed tiny model. A request that
// validates must have a consistent resolved shape within the model's token
// limit, and the tensors moved into its Job must convert (TensorFromProto).
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "denoised/v1/denoiser.pb.h"
#include "server/proto_convert.h"
#include "server/request_validation.h"

namespace {

namespace v1 = ::denoised::v1;

v1::ModelInfo TinyModel() {
  v1::ModelInfo m;
  m.set_name("tiny");
  m.set_in_channels(4);
  m.set_out_channels(4);
  m.set_text_dim(8);
  m.set_num_layers(1);
  m.set_num_heads(2);
  m.set_head_dim(4);
  for (int s : {4, 8, 8}) m.add_vae_stride(s);
  for (int p : {1, 2, 2}) m.add_patch_size(p);
  m.set_max_tokens(4096);
  return m;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const v1::ModelInfo* const model = new v1::ModelInfo(TinyModel());
  v1::GenerateRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  absl::StatusOr<dn::server::ResolvedRequest> r =
      dn::server::ValidateRequest(request, *model);
  if (!r.ok()) {
    if (r.status().code() != absl::StatusCode::kInvalidArgument) abort();
    return 0;
  }
  if (r->latent.channels() != model->in_channels()) abort();
  if (r->latent.frames() < 1 || r->latent.height() < 1 || r->latent.width() < 1) abort();
  if (r->tokens < 1 || r->tokens > model->max_tokens()) abort();
  if (r->tokens != dn::server::LatentTokens(r->latent, *model)) abort();
  if (r->request.steps() < 1 || r->request.steps() > dn::server::kMaxSteps) abort();
  // The tensors moved into the job (the request keeps none) and convert.
  if (r->request.has_prompt_embeds() || !r->job.has_prompt_embeds()) abort();
  if (!dn::server::TensorFromProto(r->job.prompt_embeds(), "prompt_embeds").ok()) abort();
  if (r->job.has_negative_prompt_embeds() &&
      !dn::server::TensorFromProto(r->job.negative_prompt_embeds(), "negative_prompt_embeds").ok())
    abort();
  if (r->job.has_initial_latents() &&
      !dn::server::TensorFromProto(r->job.initial_latents(), "initial_latents").ok())
    abort();
  if (r->job.steps() != r->request.steps()) abort();
  return 0;
}
