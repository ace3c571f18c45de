#include "server/client.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/flags.h"
#include "base/status_macros.h"
#include "denoised/v1/denoiser.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "server/auth.h"
#include "server/clip_image.h"
#include "worker/lora.h"
#include "server/credentials.h"
#include "server/demo_model.h"
#include "server/proto_convert.h"
#include "worker/noise.h"
#include "worker/prompt_table.h"
#include "worker/safetensors.h"
#include "worker/tensor.h"

namespace dn::server {

namespace v1 = ::denoised::v1;
namespace health = ::grpc::health::v1;

struct DenoiserClient::Stubs {
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::Denoiser::Stub> denoiser;
  std::unique_ptr<health::Health::Stub> health;
};

namespace {

constexpr auto kRpcTimeout = std::chrono::seconds(10);

void SetTimeout(grpc::ClientContext& ctx, std::chrono::milliseconds timeout) {
  if (timeout.count() > 0) {
    ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  }
}

// One unary call of `stub`: the bearer token (if any), a deadline,
// and the gRPC status as an absl::Status.
template <typename Stub, typename Request, typename Response>
absl::StatusOr<Response> Unary(
    Stub& stub,
    grpc::Status (Stub::*method)(grpc::ClientContext*, const Request&, Response*),
    const Request& request, const std::string& bearer_token,
    std::chrono::milliseconds timeout) {
  grpc::ClientContext ctx;
  AddBearerToken(ctx, bearer_token);  // none when empty
  SetTimeout(ctx, timeout);
  Response response;
  const grpc::Status s = (stub.*method)(&ctx, request, &response);
  if (!s.ok()) return FromGrpcStatus(s);
  return response;
}

}  // namespace

DenoiserClient::DenoiserClient(const std::string& target,
                               int64_t max_message_bytes)
    : DenoiserClient(target, grpc::InsecureChannelCredentials(), "",
                     max_message_bytes) {}

DenoiserClient::DenoiserClient(
    const std::string& target,
    std::shared_ptr<grpc::ChannelCredentials> credentials,
    std::string bearer_token, int64_t max_message_bytes)
    : target_(target),
      bearer_token_(std::move(bearer_token)),
      stubs_(std::make_unique<Stubs>()) {
  grpc::ChannelArguments args;
  const int max = static_cast<int>(
      std::min<int64_t>(max_message_bytes, std::numeric_limits<int>::max()));
  args.SetMaxReceiveMessageSize(max);
  args.SetMaxSendMessageSize(max);
  stubs_->channel = grpc::CreateCustomChannel(target, credentials, args);
  stubs_->denoiser = v1::Denoiser::NewStub(stubs_->channel);
  stubs_->health = health::Health::NewStub(stubs_->channel);
}

DenoiserClient::~DenoiserClient() = default;

absl::StatusOr<v1::GenerateResult> DenoiserClient::Generate(
    const v1::GenerateRequest& request, std::chrono::milliseconds deadline,
    const EventFn& on_event) {
  grpc::ClientContext ctx;
  AddBearerToken(ctx, bearer_token_);
  SetTimeout(ctx, deadline);
  std::unique_ptr<grpc::ClientReader<v1::GenerateEvent>> reader =
      stubs_->denoiser->Generate(&ctx, request);
  v1::GenerateEvent event;
  std::optional<v1::GenerateResult> result;
  while (reader->Read(&event)) {
    if (on_event && !on_event(event)) ctx.TryCancel();
    if (event.has_result()) result = std::move(*event.mutable_result());
  }
  const grpc::Status status = reader->Finish();
  if (!status.ok()) return FromGrpcStatus(status);
  if (!result.has_value()) {
    return absl::InternalError("the Generate stream ended OK without a Result");
  }
  return *std::move(result);
}

absl::StatusOr<v1::GenerateResult> DenoiserClient::GenerateUnary(
    const v1::GenerateRequest& request, std::chrono::milliseconds deadline) {
  return Unary(*stubs_->denoiser, &v1::Denoiser::Stub::GenerateUnary, request,
               bearer_token_, deadline);
}

absl::StatusOr<bool> DenoiserClient::Cancel(const std::string& request_id) {
  v1::CancelRequest req;
  req.set_request_id(request_id);
  DN_ASSIGN_OR_RETURN(const v1::CancelResponse resp,
                      Unary(*stubs_->denoiser, &v1::Denoiser::Stub::Cancel, req,
                            bearer_token_, kRpcTimeout));
  return resp.found();
}

absl::StatusOr<v1::ListModelsResponse> DenoiserClient::ListModels() {
  return Unary(*stubs_->denoiser, &v1::Denoiser::Stub::ListModels,
               v1::ListModelsRequest(), bearer_token_, kRpcTimeout);
}

absl::StatusOr<v1::ServerInfo> DenoiserClient::GetServerInfo() {
  return Unary(*stubs_->denoiser, &v1::Denoiser::Stub::GetServerInfo,
               v1::GetServerInfoRequest(), bearer_token_, kRpcTimeout);
}

absl::StatusOr<std::string> DenoiserClient::Health(const std::string& service) {
  health::HealthCheckRequest req;  // Health is not authenticated
  req.set_service(service);
  DN_ASSIGN_OR_RETURN(const health::HealthCheckResponse resp,
                      Unary(*stubs_->health, &health::Health::Stub::Check, req, "",
                            std::chrono::seconds(3)));
  return health::HealthCheckResponse::ServingStatus_Name(resp.status());
}

absl::Status DenoiserClient::WaitServing(
    std::chrono::milliseconds timeout,
    const std::function<absl::Status()>& keep_waiting) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::string last = "no answer";
  for (;;) {
    absl::StatusOr<std::string> h = Health();
    if (h.ok() && *h == "SERVING") return absl::OkStatus();
    last = h.ok() ? *h : h.status().ToString();
    if (keep_waiting) DN_RETURN_IF_ERROR(keep_waiting());
    if (std::chrono::steady_clock::now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          target_, " is not SERVING after ", timeout.count() / 1000,
          " s (last health answer: ", last, ")"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

// ---------------------------------------------------------------------------

v1::Tensor SeededEmbeds(uint64_t seed, int text_len, int text_dim) {
  worker::Tensor t = worker::Tensor::Host({text_len, text_dim});
  worker::FillNormal(seed, worker::kEmbedStream, 0, 0.0f, 1.0f,
                     t.data_as<float>(), static_cast<size_t>(t.numel()));
  v1::Tensor out;
  TensorToProto(t, &out);
  return out;
}

absl::StatusOr<v1::Tensor> ReadTensorFile(const std::string& path,
                                          const std::vector<std::string>& names,
                                          const std::string& flag) {
  auto file = worker::SafetensorsFile::Open(path);
  if (!file.ok()) {
    return absl::Status(file.status().code(),
                        absl::StrCat(flag, " ", path, ": ",
                                     file.status().message()));
  }
  for (const std::string& name : names) {
    const worker::SafetensorsEntry* e = (*file)->Find(name);
    if (e == nullptr) continue;
    worker::Tensor t = worker::Tensor::Host(e->shape);
    DN_RETURN_IF_ERROR((*file)->ReadF32(*e, t.data_as<float>()));
    v1::Tensor out;
    TensorToProto(t, &out);
    return out;
  }
  return absl::NotFoundError(absl::StrCat(flag, " ", path, " has no tensor ",
                                          absl::StrJoin(names, " or ")));
}

std::map<std::string, std::string> ResultMetadata(
    const v1::GenerateResult& result,
    const std::map<std::string, std::string>& extra) {
  const v1::GenerationMetadata& md = result.metadata();
  auto num = [](double v) {
    std::ostringstream s;
    s << v;
    return s.str();
  };
  std::map<std::string, std::string> m = {
      {"seed", std::to_string(md.seed())},
      {"scheduler", SchedulerWireName(md.scheduler())},
      {"steps", std::to_string(md.steps())},
      {"shift", num(md.shift())},
      {"guidance", num(md.guidance_scale())},
      {"model", md.model()},
      {"model_config_hash", md.model_config_hash()},
      {"ranks", std::to_string(md.ranks())},
      {"backend", md.backend()},
      {"latent_shape", LatentString(md.latent_shape())},
      {"server_version", md.server_version()},
      {"worker_group", md.worker_group()},
      {"request_id", result.request_id()},
      {"queue_seconds", num(result.queue_seconds())},
      {"run_seconds", num(result.run_seconds())},
  };
  if (md.has_acceleration()) {
    m["attention_fp8"] = md.acceleration().attention_fp8() ? "true" : "false";
    m["cache_threshold"] = num(md.acceleration().cache_threshold());
    m["cached_steps"] = absl::StrJoin(md.cached_steps(), ",");
  }
  for (const auto& [k, v] : extra) m[k] = v;
  return m;
}

absl::Status WriteResult(const std::string& path,
                         const v1::GenerateResult& result,
                         const std::map<std::string, std::string>& extra) {
  DN_ASSIGN_OR_RETURN(worker::Tensor latents,
                      TensorFromProto(result.latents(), "result.latents"));
  return worker::WriteSafetensors(
      path, {{"latents", worker::DType::kF32, latents.shape(), latents.data()}},
      ResultMetadata(result, extra));
}

bool IsPixelSpaceRgb(const v1::ModelInfo& model) {
  if (model.out_channels() != 3 || model.vae_stride_size() != 3) return false;
  for (int v : model.vae_stride()) {
    if (v != 1) return false;
  }
  return true;
}

absl::Status WriteResultImages(const v1::GenerateResult& result,
                               const std::string& gif_path,
                               const std::string& png_path, int scale) {
  if (gif_path.empty() && png_path.empty()) return absl::OkStatus();
  DN_ASSIGN_OR_RETURN(worker::Tensor latents,
                      TensorFromProto(result.latents(), "result.latents"));
  DN_ASSIGN_OR_RETURN(Rgb8Clip clip, ClipToRgb8(latents));
  ClipImageOptions o;
  o.scale = scale;
  if (!gif_path.empty()) DN_RETURN_IF_ERROR(WriteClipGif(gif_path, clip, o));
  if (!png_path.empty()) {
    DN_RETURN_IF_ERROR(WriteClipContactSheet(png_path, clip, o));
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::Tensor> EmbedPrompt(const worker::PromptTable& table,
                                       const std::string& prompt) {
  DN_ASSIGN_OR_RETURN(worker::Tensor t, table.Embed(prompt));
  v1::Tensor out;
  TensorToProto(t, &out);
  return out;
}

std::string PartialPromptNote(const worker::PromptTable& table,
                              const std::string& prompt) {
  const size_t words = worker::PromptTable::Tokenize(prompt).size();
  if (words == 0 || table.grammar().empty() ||
      words >= static_cast<size_t>(table.tokens())) {
    return "";
  }
  return absl::StrCat("note: \"", prompt, "\" has ", words, " of the ", table.tokens(),
                      " words of \"", table.grammar(),
                      "\"; the model was trained on full prompts, so expect a weaker match");
}

// ---------------------------------------------------------------------------

ProgressPrinter::ProgressPrinter(std::string indent)
    : indent_(std::move(indent)), tty_(isatty(STDERR_FILENO) != 0) {}

bool ProgressPrinter::operator()(const v1::GenerateEvent& event) {
  switch (event.event_case()) {
    case v1::GenerateEvent::kAccepted: {
      const v1::Accepted& a = event.accepted();
      std::fprintf(stderr, "%saccepted as %s, queue position %d", indent_.c_str(),
                   a.request_id().c_str(), a.queue_position());
      if (a.estimated_seconds() > 0) {
        std::fprintf(stderr, ", about %.1f s of compute", a.estimated_seconds());
      }
      std::fprintf(stderr, "\n");
      break;
    }
    case v1::GenerateEvent::kStarted: {
      const v1::Started& s = event.started();
      std::fprintf(stderr, "%srunning on worker group %s (%d rank%s) after %.3f s in the queue\n",
                   indent_.c_str(), s.worker_group().c_str(), s.ranks(),
                   s.ranks() == 1 ? "" : "s", s.queue_seconds());
      break;
    }
    case v1::GenerateEvent::kStep: {
      const v1::Step& s = event.step();
      constexpr int kWidth = 24;
      // (The server's numbers: clamp rather than trust them.)
      const int64_t filled = std::clamp<int64_t>(
          (int64_t{s.index()} + 1) * kWidth / std::max(1, s.total()), 0, kWidth);
      std::string bar(static_cast<size_t>(filled), '#');
      bar.resize(kWidth, '.');
      const bool last = s.index() + 1 >= s.total();
      std::fprintf(stderr,
                   "%s%sstep %d/%d [%s] sigma %.4f | %.1f ms/step (all-to-all "
                   "%.2f ms, skew %.2f ms)%s%s",
                   tty_ ? "\r" : "", indent_.c_str(), s.index() + 1, s.total(),
                   bar.c_str(), s.sigma(), s.step_seconds() * 1e3,
                   s.all_to_all_seconds() * 1e3, s.rank_skew_seconds() * 1e3,
                   s.cached() ? " cached" : "", tty_ && !last ? "" : "\n");
      bar_open_ = tty_ && !last;
      break;
    }
    case v1::GenerateEvent::kResult:
      if (bar_open_) std::fprintf(stderr, "\n");
      bar_open_ = false;
      break;
    default:
      break;
  }
  std::fflush(stderr);
  return true;
}

// ---------------------------------------------------------------------------
// `denoised generate`
// ---------------------------------------------------------------------------

int GenerateMain(int argc, char** argv) {
  std::string target = "127.0.0.1:50051", model, scheduler = "unipc";
  std::string embeds, negative_embeds, latents_file, request_id, out;
  std::string prompt, prompt_table, gif, png;
  int image_scale = 4;
  int frames = 0, height = 0, width = 0;
  int latent_frames = 0, latent_height = 0, latent_width = 0;
  int steps = 50, priority = 0, text_len = 512, step_interval = 1;
  double guidance = 5.0, shift = 3.0, deadline_s = 0;
  double guidance_2 = -1;  // < 0: unset
  std::string loras;
  uint64_t seed = 0;
  bool progress = true;
  bool attention_fp8 = false;
  double cache_threshold = 0;
  FlagSet flags("denoised generate",
                "Calls a coordinator's Generate and writes the latents as "
                "safetensors (tensor `latents` + reproduction metadata).");
  flags.String("target", &target, "coordinator address HOST:PORT");
  flags.String("model", &model, "model name (see GetServerInfo / ListModels)");
  flags.Int("frames", &frames, "video frames in pixel space (1 + 4k for Wan)");
  flags.Int("height", &height, "height in pixels");
  flags.Int("width", &width, "width in pixels");
  flags.Int("latent-frames", &latent_frames, "or: latent frames");
  flags.Int("latent-height", &latent_height, "latent height");
  flags.Int("latent-width", &latent_width, "latent width");
  flags.Int("steps", &steps, "denoising steps");
  flags.Double("guidance", &guidance, "CFG scale (CFG on iff > 1)");
  flags.Double("guidance-2", &guidance_2,
               "two-expert models: CFG scale of the low-noise expert "
               "(guidance_scale_2); unset = --guidance");
  flags.String("lora", &loras,
               "LoRAs of the worker's --lora-dir (ListModels): NAME[:SCALE[:high|low]][,...]");
  flags.Double("shift", &shift, "flow shift");
  flags.String("scheduler", &scheduler, "unipc | euler");
  flags.Uint64("seed", &seed, "seed of the noise (and of random embeddings)");
  flags.Bool("attention-fp8", &attention_fp8,
             "fast tier: self-attention in fp8 (acceleration.attention_fp8; not exact)");
  flags.Double("cache-threshold", &cache_threshold,
               "fast tier: step caching threshold in [0, 1] (acceleration.cache_threshold; "
               "0 = off; not exact)");
  flags.Int("priority", &priority, "queue priority in [-100, 100]");
  flags.String("embeds", &embeds,
               "safetensors file with tensor prompt_embeds [T, text_dim]");
  flags.String("negative-embeds", &negative_embeds,
               "safetensors file with prompt_embeds or negative_embeds");
  flags.String("latents", &latents_file,
               "safetensors file with tensor latents to start from");
  std::string condition_file, image_file;
  flags.String("image-embeds", &image_file,
               "Wan2.1 I2V: safetensors file with tensor image_embeds [N, image_dim] (CLIP, 257 x 1280)");
  flags.String("condition", &condition_file,
               "I2V models: safetensors file with tensor condition_latents [in - out, F, H, W]; "
               "TI2V (optional): the image latent of frame 0 [out_channels, 1, H, W]");
  flags.Int("text-len", &text_len,
            "tokens of the seeded random embeddings used without --embeds");
  flags.Double("deadline", &deadline_s, "gRPC deadline in seconds (0: none)");
  flags.String("request-id", &request_id, "client_request_id (idempotency key)");
  flags.Int("step-interval", &step_interval, "a Step event every n steps");
  flags.Bool("progress", &progress, "draw the progress bar on stderr");
  flags.String("prompt", &prompt,
               "a prompt of a model with a prompt table (e.g. the demo model: "
               "\"red square moving left\"), embedded through --prompt-table");
  flags.String("prompt-table", &prompt_table,
               "prompt table safetensors (default with --prompt: the demo "
               "model's prompts.safetensors, found as `denoised demo` does)");
  flags.String("out", &out, "output .safetensors file");
  flags.String("gif", &gif,
               "also write the clip as an animated GIF (pixel-space RGB models "
               "only, e.g. the demo model)");
  flags.String("png", &png,
               "also write the frames side by side as a PNG (pixel-space RGB "
               "models only)");
  flags.Int("image-scale", &image_scale, "upscaling of --gif/--png (nearest), 1..64");
  int max_message_mb = static_cast<int>(kDefaultMaxMessageBytes >> 20);
  flags.Int("max-message-mb", &max_message_mb, "largest gRPC message, MiB");
  std::string auth_token_file;
  flags.String("auth-token-file", &auth_token_file,
               "file whose first token is sent as 'authorization: Bearer'");
  TlsFiles tls;
  AddTlsFlags(flags, "", &tls, "TLS to the coordinator (--tls-ca alone: server TLS)");
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;
  auto usage_error = [](const std::string& msg) {
    std::fprintf(stderr, "denoised generate: %s\n", msg.c_str());
    return 2;
  };
  if (model.empty()) return usage_error("--model is required");
  if (out.empty() && gif.empty() && png.empty()) {
    return usage_error("give --out (latents) and/or --gif/--png (images)");
  }
  if (!prompt.empty() && !embeds.empty()) {
    return usage_error("give --prompt or --embeds, not both");
  }
  if (!prompt_table.empty() && prompt.empty()) {
    return usage_error("--prompt-table needs --prompt");
  }
  if (!std::isfinite(deadline_s) || deadline_s < 0 || deadline_s > 1e7) {
    return usage_error("--deadline must be in [0, 1e7] seconds (0: none)");
  }
  if (image_scale < 1 || image_scale > 64) {
    return usage_error("--image-scale must be in [1, 64]");
  }
  const bool pixels = frames > 0 || height > 0 || width > 0;
  const bool latent = latent_frames > 0 || latent_height > 0 || latent_width > 0;
  if (pixels == latent) {
    return usage_error(
        "give --frames/--height/--width or --latent-frames/--latent-height/"
        "--latent-width");
  }
  absl::StatusOr<v1::Scheduler> sched = ParseScheduler(scheduler);
  if (!sched.ok()) return usage_error(std::string(sched.status().message()));

  std::string token;
  if (!auth_token_file.empty()) {
    absl::StatusOr<std::vector<std::string>> tokens =
        ReadTokenFile(auth_token_file, "auth-token-file");
    if (!tokens.ok()) return usage_error(std::string(tokens.status().message()));
    token = tokens->front();
  }
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> creds =
      MakeChannelCredentials(tls, "");
  if (!creds.ok()) return usage_error(std::string(creds.status().message()));
  if (max_message_mb < 1) return usage_error("--max-message-mb: must be >= 1");
  DenoiserClient client(target, *creds, token, int64_t{max_message_mb} << 20);
  v1::GenerateRequest req;
  req.set_model(model);
  if (pixels) {
    req.mutable_pixel_size()->set_frames(frames);
    req.mutable_pixel_size()->set_height(height);
    req.mutable_pixel_size()->set_width(width);
  } else {
    req.mutable_latent_shape()->set_frames(latent_frames);
    req.mutable_latent_shape()->set_height(latent_height);
    req.mutable_latent_shape()->set_width(latent_width);
  }
  req.set_steps(steps);
  req.set_guidance_scale(static_cast<float>(guidance));
  if (guidance_2 >= 0) req.set_guidance_scale_2(static_cast<float>(guidance_2));
  {
    absl::StatusOr<std::vector<worker::LoraRef>> refs = worker::ParseLoraSpecs(loras, "--lora");
    if (!refs.ok()) {
      std::fprintf(stderr, "denoised generate: %s\n", std::string(refs.status().message()).c_str());
      return 2;
    }
    for (const worker::LoraRef& r : *refs) {
      v1::LoraRef* l = req.add_lora();
      l->set_name(r.name);
      l->set_scale(static_cast<float>(r.scale));
      l->set_expert(r.expert + 1);
    }
  }
  req.set_shift(static_cast<float>(shift));
  req.set_scheduler(*sched);
  req.set_seed(seed);
  req.set_priority(priority);
  req.set_client_request_id(request_id);
  req.set_step_event_interval(step_interval);
  if (attention_fp8 || cache_threshold != 0) {
    req.mutable_acceleration()->set_attention_fp8(attention_fp8);
    req.mutable_acceleration()->set_cache_threshold(static_cast<float>(cache_threshold));
  }
  std::map<std::string, std::string> extra;
  if (pixels) {
    extra["frames"] = std::to_string(frames);
    extra["height"] = std::to_string(height);
    extra["width"] = std::to_string(width);
  }
  auto fail = [](const absl::Status& s) {
    std::fprintf(stderr, "denoised generate: %s: %s\n",
                 absl::StatusCodeToString(s.code()).c_str(),
                 std::string(s.message()).c_str());
    return 1;
  };
  // Random embeddings, prompts and images need the model's description.
  std::optional<v1::ModelInfo> info;
  if (embeds.empty() || !gif.empty() || !png.empty()) {
    absl::StatusOr<v1::ListModelsResponse> models = client.ListModels();
    if (!models.ok()) return fail(models.status());
    for (const auto& m : models->models()) {
      if (m.name() == model) info = m;
    }
    if (!info) {
      return fail(absl::NotFoundError(absl::StrCat(
          "model '", model, "' is not served by ", target)));
    }
    if ((!gif.empty() || !png.empty()) && !IsPixelSpaceRgb(*info)) {
      return fail(absl::InvalidArgumentError(absl::StrCat(
          "--gif/--png: model '", model, "' is not a pixel-space RGB model ",
          "(vae_stride [", absl::StrJoin(info->vae_stride(), ", "), "], ",
          info->out_channels(),
          " channels): its latents need a VAE decoder, which is not part of "
          "denoised")));
    }
  }
  if (!embeds.empty()) {
    absl::StatusOr<v1::Tensor> t =
        ReadTensorFile(embeds, {"prompt_embeds"}, "--embeds");
    if (!t.ok()) return fail(t.status());
    *req.mutable_prompt_embeds() = *std::move(t);
    extra["embeds"] = embeds;
  } else if (!prompt.empty()) {
    if (prompt_table.empty()) {
      absl::StatusOr<DemoModelSearch> found = FindDemoModel("");
      if (!found.ok()) return fail(found.status());
      if (found->dir.empty()) {
        return usage_error(absl::StrCat(
            "--prompt: no --prompt-table given and no demo model found (",
            absl::StrJoin(found->looked, "; "), ")"));
      }
      prompt_table = absl::StrCat(found->dir, "/", kDemoPromptTableFile);
    }
    absl::StatusOr<worker::PromptTable> table =
        worker::PromptTable::Load(prompt_table);
    if (!table.ok()) return fail(table.status());
    if (table->text_dim() != info->text_dim()) {
      return fail(absl::InvalidArgumentError(absl::StrCat(
          "--prompt-table ", prompt_table, " has text_dim ", table->text_dim(),
          ", model '", model, "' takes ", info->text_dim())));
    }
    absl::StatusOr<v1::Tensor> pos = EmbedPrompt(*table, prompt);
    if (!pos.ok()) return usage_error(std::string(pos.status().message()));
    if (const std::string note = PartialPromptNote(*table, prompt); !note.empty())
      std::fprintf(stderr, "denoised generate: %s\n", note.c_str());
    *req.mutable_prompt_embeds() = *std::move(pos);
    extra["prompt"] = prompt;
    extra["prompt_table"] = prompt_table;
    if (negative_embeds.empty()) {
      // The empty prompt: the unconditional embedding of CFG.
      *req.mutable_negative_prompt_embeds() = *EmbedPrompt(*table, "");
    }
  } else {
    const int text_dim = info->text_dim();
    if (text_len < 1 || text_len > 4096) {
      return usage_error("--text-len must be in [1, 4096]");
    }
    *req.mutable_prompt_embeds() = SeededEmbeds(seed, text_len, text_dim);
    extra["embeds"] = absl::StrCat("random, text_len ", text_len);
  }
  if (!negative_embeds.empty()) {
    absl::StatusOr<v1::Tensor> t = ReadTensorFile(
        negative_embeds, {"prompt_embeds", "negative_embeds"},
        "--negative-embeds");
    if (!t.ok()) return fail(t.status());
    *req.mutable_negative_prompt_embeds() = *std::move(t);
    extra["negative_embeds"] = negative_embeds;
  }
  if (!latents_file.empty()) {
    absl::StatusOr<v1::Tensor> t =
        ReadTensorFile(latents_file, {"latents"}, "--latents");
    if (!t.ok()) return fail(t.status());
    *req.mutable_initial_latents() = *std::move(t);
    extra["initial_latents"] = latents_file;
  }
  if (!image_file.empty()) {
    absl::StatusOr<v1::Tensor> t = ReadTensorFile(image_file, {"image_embeds"}, "--image-embeds");
    if (!t.ok()) return fail(t.status());
    *req.mutable_image_embeds() = *std::move(t);
    extra["image_embeds"] = image_file;
  }
  if (!condition_file.empty()) {
    absl::StatusOr<v1::Tensor> t =
        ReadTensorFile(condition_file, {"condition_latents"}, "--condition");
    if (!t.ok()) return fail(t.status());
    *req.mutable_condition_latents() = *std::move(t);
    extra["condition_latents"] = condition_file;
  }

  ProgressPrinter printer;
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<v1::GenerateResult> result = client.Generate(
      req, std::chrono::milliseconds(static_cast<int64_t>(deadline_s * 1000)),
      [&](const v1::GenerateEvent& e) { return progress ? printer(e) : true; });
  if (!result.ok()) return fail(result.status());
  if (!out.empty()) {
    if (absl::Status s = WriteResult(out, *result, extra); !s.ok()) return fail(s);
  }
  if (absl::Status s = WriteResultImages(*result, gif, png, image_scale);
      !s.ok()) {
    return fail(s);
  }
  std::string written = out;
  for (const std::string* p : {&gif, &png}) {
    if (!p->empty()) written += (written.empty() ? "" : ", ") + *p;
  }
  const double wall =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const v1::GenerationMetadata& md = result->metadata();
  std::printf(
      "%s: %s latents %s from model %s (%d steps %s, CFG %g, seed %llu) on "
      "group %s (%d %s rank%s) in %.2f s (queue %.3f s, run %.2f s) -> %s\n",
      result->request_id().c_str(), "f32", LatentString(md.latent_shape()).c_str(),
      md.model().c_str(), md.steps(), SchedulerWireName(md.scheduler()),
      md.guidance_scale(), static_cast<unsigned long long>(md.seed()),
      md.worker_group().c_str(), md.ranks(), md.backend().c_str(),
      md.ranks() == 1 ? "" : "s", wall, result->queue_seconds(),
      result->run_seconds(), written.c_str());
  if (md.has_acceleration())
    std::printf("fast tier: attention_fp8 %s, cache_threshold %g: %d of %d steps cached [%s]\n",
                md.acceleration().attention_fp8() ? "on" : "off",
                md.acceleration().cache_threshold(), md.cached_steps_size(), md.steps(),
                absl::StrJoin(md.cached_steps(), ",").c_str());
  return 0;
}

}  // namespace dn::server
