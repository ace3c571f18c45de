// File: server/client.h
//
// The C++ client of the Denoiser service, and `denoised generate`: streams a
// Generate call, draws a progress bar from the Step events (stderr), writes
// the latents as a safetensors file (tensor `latents`, f32 [C, F, H, W]) with
// the reproduction metadata in `__metadata__`, for pixel-space RGB models
// also as an animated GIF and a PNG contact sheet (server/clip_image.h), and
// prints a one-line summary. Prompts of a model without a text encoder are
// embedded through its prompt table (worker/prompt_table.h). The demo and the
// service tests use the same client.
#ifndef DN_SERVER_CLIENT_H_
#define DN_SERVER_CLIENT_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "denoised/v1/denoiser.pb.h"
#include "server/protocol.h"

namespace grpc {
class Channel;
class ChannelCredentials;
}  // namespace grpc

namespace dn::worker {
class PromptTable;
}  // namespace dn::worker

namespace dn::server {

class DenoiserClient {
 public:
  // Plaintext channel to HOST:PORT allowing messages up to `max_message_bytes`.
  explicit DenoiserClient(const std::string& target,
                          int64_t max_message_bytes = kDefaultMaxMessageBytes);
  // Channel with `credentials` (server/credentials.h: TLS or plaintext);
  // every call carries `authorization: Bearer <bearer_token>` when the token
  // is non-empty (docs/SECURITY.md).
  DenoiserClient(const std::string& target,
                 std::shared_ptr<grpc::ChannelCredentials> credentials,
                 std::string bearer_token,
                 int64_t max_message_bytes = kDefaultMaxMessageBytes);
  ~DenoiserClient();
  DenoiserClient(const DenoiserClient&) = delete;
  DenoiserClient& operator=(const DenoiserClient&) = delete;

  // Called for every event of a Generate stream, in order. Returning false
  // cancels the call (the client side of a cancellation).
  using EventFn = std::function<bool(const denoised::v1::GenerateEvent&)>;

  // Streams Generate. Returns the Result, or the call's final status.
  // `deadline` 0 = none.
  absl::StatusOr<denoised::v1::GenerateResult> Generate(
      const denoised::v1::GenerateRequest& request,
      std::chrono::milliseconds deadline, const EventFn& on_event);
  absl::StatusOr<denoised::v1::GenerateResult> GenerateUnary(
      const denoised::v1::GenerateRequest& request,
      std::chrono::milliseconds deadline);
  absl::StatusOr<bool> Cancel(const std::string& request_id);
  absl::StatusOr<denoised::v1::ListModelsResponse> ListModels();
  absl::StatusOr<denoised::v1::ServerInfo> GetServerInfo();
  // grpc.health.v1 Check: "SERVING", "NOT_SERVING", ... or the RPC error.
  absl::StatusOr<std::string> Health(const std::string& service = "");
  // Polls Health until SERVING or `timeout`; `keep_waiting` (optional) may
  // abort the wait early by returning a non-OK status.
  absl::Status WaitServing(std::chrono::milliseconds timeout,
                           const std::function<absl::Status()>& keep_waiting = {});

  const std::string& target() const { return target_; }

 private:
  struct Stubs;
  std::string target_;
  std::string bearer_token_;
  std::unique_ptr<Stubs> stubs_;
};

// Seeded random prompt embeddings [text_len, text_dim], the same numbers
// `denoised run` uses without --embeds (worker/noise.h, kEmbedStream).
denoised::v1::Tensor SeededEmbeds(uint64_t seed, int text_len, int text_dim);

// Reads embeddings [T, D] (or [1, T, D]) from a safetensors file: the first
// tensor named in `names` (e.g. prompt_embeds). `flag` names the source in
// errors.
absl::StatusOr<denoised::v1::Tensor> ReadTensorFile(
    const std::string& path, const std::vector<std::string>& names,
    const std::string& flag);

// The `__metadata__` written next to the latents: seed, scheduler, steps,
// shift, guidance, model, model_config_hash, ranks, backend, latent_shape,
// server_version, worker_group, request_id, queue/run seconds, plus `extra`.
std::map<std::string, std::string> ResultMetadata(
    const denoised::v1::GenerateResult& result,
    const std::map<std::string, std::string>& extra);

// Writes result.latents as tensor `latents` with ResultMetadata.
absl::Status WriteResult(const std::string& path,
                         const denoised::v1::GenerateResult& result,
                         const std::map<std::string, std::string>& extra);

// Whether `model` works in pixel space on RGB (vae_stride 1,1,1 and 3
// output channels, like the demo model): its latents are the picture.
bool IsPixelSpaceRgb(const denoised::v1::ModelInfo& model);

// Writes a pixel-space RGB result (latents [3, F, H, W] in [-1, 1]) as an
// animated GIF and/or a PNG contact sheet, upscaled `scale` times (nearest);
// an empty path is skipped. Errors name the file.
absl::Status WriteResultImages(const denoised::v1::GenerateResult& result,
                               const std::string& gif_path,
                               const std::string& png_path, int scale);

// The request tensor [T, text_dim] of `prompt` through a prompt table.
absl::StatusOr<denoised::v1::Tensor> EmbedPrompt(const worker::PromptTable& table,
                                                 const std::string& prompt);

// A note for a non-empty prompt with fewer words than the table's T when the
// table states a grammar (the demo model was trained on full prompts only,
// so "red square" is accepted but was never seen); "" otherwise.
std::string PartialPromptNote(const worker::PromptTable& table,
                              const std::string& prompt);

// Progress on stderr from Step events: a redrawn bar on a terminal, one line
// per event otherwise.
class ProgressPrinter {
 public:
  explicit ProgressPrinter(std::string indent = "");
  bool operator()(const denoised::v1::GenerateEvent& event);

 private:
  std::string indent_;
  bool tty_;
  bool bar_open_ = false;
};

// `denoised generate ...`; argv[0] is "generate".
int GenerateMain(int argc, char** argv);

}  // namespace dn::server

#endif  // DN_SERVER_CLIENT_H_
