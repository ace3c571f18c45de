// The coordinator's protocol handling, against a real `denoised coordinator`
// process over loopback. The test itself speaks the internal WorkerControl
// protocol as the ranks (so it can hold a job, break a stream or report a
// failure at a chosen moment), and the public API as clients. The full
// service with real rank processes is tested in service_e2e_test.cc.
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <mutex>
#include <optional>
#include <chrono>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "denoised/v1/worker.grpc.pb.h"
#include "gmock/gmock.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/impl/codegen/client_unary_call.h"
#include "grpcpp/impl/codegen/rpc_method.h"
#include "grpcpp/impl/codegen/sync_stream.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "server/client.h"
#include "server/metrics_scrape.h"
#include "tests/server/service_test_util.h"

namespace dn::server {
namespace {

namespace v1 = ::denoised::v1;
namespace vi = ::denoised::v1::internal;
using ::dn::server::testing::CoordinatorProc;
using ::dn::server::testing::PromtoolCheck;
using ::dn::server::testing::RawGenerateCall;
using ::dn::server::testing::StartCoordinator;
using ::dn::server::testing::TempDir;
using ::dn::server::testing::TinyRequest;
using ::testing::HasSubstr;

v1::ModelInfo TinyInfo() {
  v1::ModelInfo m;
  m.set_name("tiny");
  m.set_config_hash("c0ffee");
  m.set_in_channels(16);
  m.set_out_channels(16);
  m.set_text_dim(32);
  m.set_num_layers(2);
  m.set_num_heads(4);
  m.set_head_dim(16);
  for (int s : {4, 8, 8}) m.add_vae_stride(s);
  for (int p : {1, 2, 2}) m.add_patch_size(p);
  m.set_max_tokens(100000);
  m.set_max_axis_tokens(1024);
  return m;
}

grpc::ChannelArguments LargeMessages() {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(256 << 20);
  args.SetMaxSendMessageSize(256 << 20);
  return args;
}

// The test's stand-in for a rank process: the real protocol, scripted.
class ScriptedRank {
 public:
  ScriptedRank(const std::string& target, const std::string& group, int rank,
               int world, int64_t generation, const std::string& secret = "",
               const std::string& config_hash = "c0ffee", int64_t max_tokens = 100000)
      : stub_(vi::WorkerControl::NewStub(grpc::CreateCustomChannel(
            target, grpc::InsecureChannelCredentials(), LargeMessages()))) {
    ctx_.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    stream_ = stub_->Attach(&ctx_);
    vi::RankMessage m;
    vi::Hello* h = m.mutable_hello();
    h->set_group(group);
    h->set_rank(rank);
    h->set_world_size(world);
    h->set_generation(generation);
    h->mutable_model()->set_name("tiny");
    h->mutable_model()->set_config_hash(config_hash);
    *h->mutable_model()->mutable_info() = TinyInfo();
    h->mutable_model()->mutable_info()->set_max_tokens(max_tokens);
    h->set_backend("cpu");
    h->set_host("test");
    h->set_device("scripted");
    h->set_secret(secret);
    stream_->Write(m);
    vi::CoordinatorMessage w;
    if (stream_->Read(&w) && w.has_welcome()) welcome_ = w.welcome();
  }
  ~ScriptedRank() {
    if (!finished_) {
      ctx_.TryCancel();
      stream_->Finish();
    }
  }

  bool welcomed() const { return welcome_.has_value(); }
  const vi::Welcome& welcome() const { return *welcome_; }
  bool Send(const vi::RankMessage& m) { return stream_->Write(m); }
  bool Read(vi::CoordinatorMessage* m) { return stream_->Read(m); }
  grpc::Status Finish() {
    finished_ = true;
    return stream_->Finish();
  }
  void Break() { ctx_.TryCancel(); }
  // A clean leave: Leave, then half-close.
  void Leave() {
    vi::RankMessage m;
    m.mutable_leave()->set_reason("test");
    Send(m);
    stream_->WritesDone();
  }
  // A half-close without Leave (a rank that ends its stream unannounced).
  void HalfClose() { stream_->WritesDone(); }

  void Ready() {
    vi::RankMessage m;
    m.mutable_ready()->set_warmup_seconds(0.1);
    m.mutable_ready()->set_seconds_per_token_step(1e-4);
    Send(m);
  }
  void Step(const std::string& id, int index, int total) {
    vi::RankMessage m;
    m.mutable_step()->set_request_id(id);
    v1::Step* s = m.mutable_step()->mutable_step();
    s->set_index(index);
    s->set_total(total);
    s->set_sigma(1.0 - static_cast<double>(index) / total);
    s->set_step_seconds(0.002);
    s->set_all_to_all_seconds(0.0005);
    s->set_rank_skew_seconds(0.0001);
    Send(m);
  }
  void Result(const std::string& id, int code, const vi::Job* job = nullptr) {
    vi::RankMessage m;
    m.mutable_result()->set_request_id(id);
    m.mutable_result()->set_status_code(code);
    m.mutable_result()->set_status_message(code == 0 ? "" : "scripted failure");
    m.mutable_result()->set_run_seconds(0.01);
    if (job != nullptr && code == 0) {
      const v1::LatentShape& l = job->latent_shape();
      v1::Tensor* t = m.mutable_result()->mutable_latents();
      t->set_dtype(v1::DTYPE_F32);
      for (int d : {l.channels(), l.frames(), l.height(), l.width()}) t->add_shape(d);
      t->mutable_data()->assign(
          static_cast<size_t>(4 * l.channels() * l.frames() * l.height() * l.width()),
          '\0');
    }
    Send(m);
  }
  // Reads until a Job arrives (heartbeat-free protocol: nothing else comes).
  std::optional<vi::Job> NextJob() {
    vi::CoordinatorMessage m;
    while (Read(&m)) {
      if (m.has_job()) return m.job();
    }
    return std::nullopt;
  }

 private:
  std::unique_ptr<vi::WorkerControl::Stub> stub_;
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReaderWriter<vi::RankMessage, vi::CoordinatorMessage>>
      stream_;
  std::optional<vi::Welcome> welcome_;
  bool finished_ = false;
};

// A Generate call running in a thread, recording its events.
struct Call {
  std::vector<v1::GenerateEvent> events;
  std::mutex mu;
  std::promise<void> accepted;
  bool accepted_set = false;
  std::future<absl::StatusOr<v1::GenerateResult>> done;

  Call(DenoiserClient& client, v1::GenerateRequest req) {
    done = std::async(std::launch::async, [this, &client, req] {
      return client.Generate(req, std::chrono::seconds(60),
                             [this](const v1::GenerateEvent& e) {
                               std::lock_guard<std::mutex> lock(mu);
                               events.push_back(e);
                               if (e.has_accepted() && !accepted_set) {
                                 accepted_set = true;
                                 accepted.set_value();
                               }
                               return true;
                             });
    });
  }
  // The final status (waits).
  absl::Status Status() {
    absl::StatusOr<v1::GenerateResult> r = done.get();
    return r.status();
  }
};

class CoordinatorTest : public ::testing::Test {
 protected:
  void Start(std::vector<std::string> extra = {}) {
    absl::StatusOr<std::unique_ptr<CoordinatorProc>> c =
        StartCoordinator(dir_.path(), std::move(extra));
    ASSERT_TRUE(c.ok()) << c.status();
    coord_ = *std::move(c);
    client_ = std::make_unique<DenoiserClient>(coord_->target);
  }
  std::vector<MetricSample> Scrape() {
    return ::dn::server::testing::Scrape(coord_->metrics);
  }
  absl::StatusOr<v1::GroupState> GroupState(const std::string& name) {
    absl::StatusOr<v1::ServerInfo> info = client_->GetServerInfo();
    if (!info.ok()) return info.status();
    for (const auto& g : info->groups()) {
      if (g.name() == name) return g.state();
    }
    return absl::NotFoundError(name);
  }
  void WaitState(const std::string& name, v1::GroupState want) {
    for (int i = 0; i < 200; ++i) {
      absl::StatusOr<v1::GroupState> s = GroupState(name);
      if (s.ok() && *s == want) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    FAIL() << "group " << name << " never reached state " << want;
  }

  TempDir dir_;
  std::unique_ptr<CoordinatorProc> coord_;
  std::unique_ptr<DenoiserClient> client_;
};

TEST_F(CoordinatorTest, NoGroupsMeansNotServingAndNotFound) {
  Start();
  EXPECT_EQ(client_->Health("").value_or("?"), "NOT_SERVING");
  EXPECT_EQ(client_->Health("denoised.v1.Denoiser").value_or("?"), "NOT_SERVING");
  EXPECT_EQ(client_->Health("no.such.Service").status().code(),
            absl::StatusCode::kNotFound);
  absl::StatusOr<v1::ListModelsResponse> models = client_->ListModels();
  ASSERT_TRUE(models.ok());
  EXPECT_EQ(models->models_size(), 0);
  absl::StatusOr<v1::GenerateResult> r =
      client_->Generate(TinyRequest(5, 64, 64, 4, 1), std::chrono::seconds(10), {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("tiny"));
}

// A message over --max-message-mb is refused by gRPC with RESOURCE_EXHAUSTED
// before it reaches validation; the server stays up for the next call.
TEST_F(CoordinatorTest, OversizedMessageIsRefused) {
  Start({"--max-message-mb", "1"});
  v1::GenerateRequest big = TinyRequest(5, 64, 64, 4, 1, /*text_len=*/12000);  // 1.5 MB
  absl::StatusOr<v1::GenerateResult> r =
      client_->Generate(big, std::chrono::seconds(10), {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  EXPECT_TRUE(client_->ListModels().ok());
  EXPECT_EQ(client_->Generate(TinyRequest(5, 64, 64, 4, 1), std::chrono::seconds(10), {})
                .status()
                .code(),
            absl::StatusCode::kNotFound);  // small enough: reaches the (empty) model table
}

TEST_F(CoordinatorTest, GroupFormsThenServes) {
  Start();
  ScriptedRank r0(coord_->target, "g", 0, 2, 1);
  ScriptedRank r1(coord_->target, "g", 1, 2, 1);
  ASSERT_TRUE(r0.welcomed());
  ASSERT_TRUE(r1.welcomed());
  EXPECT_EQ(r0.welcome().store_prefix(), "g/1/");
  EXPECT_EQ(GroupState("g").value_or(v1::GROUP_STATE_UNSPECIFIED),
            v1::GROUP_STATE_FORMING);
  r0.Ready();
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  // Half the group is ready: still forming, still not serving.
  EXPECT_EQ(GroupState("g").value_or(v1::GROUP_STATE_UNSPECIFIED),
            v1::GROUP_STATE_FORMING);
  EXPECT_EQ(client_->Health().value_or("?"), "NOT_SERVING");
  r1.Ready();
  WaitState("g", v1::GROUP_STATE_READY);
  EXPECT_EQ(client_->Health().value_or("?"), "SERVING");
  EXPECT_EQ(client_->Health("denoised.v1.Denoiser").value_or("?"), "SERVING");
  absl::StatusOr<v1::ListModelsResponse> models = client_->ListModels();
  ASSERT_TRUE(models.ok());
  ASSERT_EQ(models->models_size(), 1);
  EXPECT_EQ(models->models(0).name(), "tiny");
  EXPECT_EQ(models->models(0).ready_groups(), 1);
  EXPECT_EQ(models->models(0).text_dim(), 32);
  // A second rank 1 for the same generation is refused.
  ScriptedRank dup(coord_->target, "g", 1, 2, 1);
  EXPECT_FALSE(dup.welcomed());
  EXPECT_EQ(dup.Finish().error_code(), grpc::StatusCode::ALREADY_EXISTS);
}

TEST_F(CoordinatorTest, SecretIsRequired) {
  Start({"--secret", "s3cret"});
  ScriptedRank bad(coord_->target, "g", 0, 1, 1, "wrong");
  EXPECT_FALSE(bad.welcomed());
  EXPECT_EQ(bad.Finish().error_code(), grpc::StatusCode::PERMISSION_DENIED);
  ScriptedRank good(coord_->target, "g", 0, 1, 1, "s3cret");
  EXPECT_TRUE(good.welcomed());

  auto stub = vi::WorkerControl::NewStub(
      grpc::CreateChannel(coord_->target, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  vi::StoreSetRequest set;
  set.set_key("g/1/k");
  set.set_value("v");
  set.set_secret("wrong");
  vi::StoreSetResponse resp;
  EXPECT_EQ(stub->StoreSet(&ctx, set, &resp).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
}

TEST_F(CoordinatorTest, SeparateWorkerPort) {
  Start({"--worker-listen", "127.0.0.1:0"});
  ASSERT_NE(coord_->worker, coord_->target);
  ScriptedRank on_public(coord_->target, "g", 0, 1, 1);
  EXPECT_FALSE(on_public.welcomed());
  EXPECT_EQ(on_public.Finish().error_code(), grpc::StatusCode::UNIMPLEMENTED);
  ScriptedRank on_worker(coord_->worker, "g", 0, 1, 1);
  EXPECT_TRUE(on_worker.welcomed());
  DenoiserClient on_worker_port(coord_->worker);
  EXPECT_EQ(on_worker_port.ListModels().status().code(),
            absl::StatusCode::kUnimplemented);
}

// A second coordinator on an address already served fails to start and says
// why, instead of silently sharing the port (gRPC's SO_REUSEPORT default).
TEST_F(CoordinatorTest, ListenAddressInUseIsAnError) {
  Start();
  absl::StatusOr<std::unique_ptr<CoordinatorProc>> second =
      StartCoordinator(dir_.path(), {"--listen", coord_->target}, "second");
  ASSERT_FALSE(second.ok()) << "two coordinators serve " << coord_->target;
  EXPECT_THAT(std::string(second.status().message()),
              HasSubstr("--listen: cannot serve gRPC on " + coord_->target));
  EXPECT_TRUE(client_->ListModels().ok()) << "the first one still serves";
}

// grpc.health.v1 Watch: the current status at once, then every change, in
// order (the overall status follows the worker groups); an unknown service
// gets SERVICE_UNKNOWN.
TEST_F(CoordinatorTest, HealthWatchFollowsTheGroups) {
  namespace health = ::grpc::health::v1;
  Start();
  auto stub = health::Health::NewStub(
      grpc::CreateChannel(coord_->target, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  health::HealthCheckRequest req;
  req.set_service("denoised.v1.Denoiser");
  auto watch = stub->Watch(&ctx, req);
  health::HealthCheckResponse r;
  ASSERT_TRUE(watch->Read(&r));
  EXPECT_EQ(r.status(), health::HealthCheckResponse::NOT_SERVING);
  auto rank = std::make_unique<ScriptedRank>(coord_->target, "g", 0, 1, 1);
  ASSERT_TRUE(rank->welcomed());
  rank->Ready();
  ASSERT_TRUE(watch->Read(&r));
  EXPECT_EQ(r.status(), health::HealthCheckResponse::SERVING);
  rank->Break();
  ASSERT_TRUE(watch->Read(&r));
  EXPECT_EQ(r.status(), health::HealthCheckResponse::NOT_SERVING);

  grpc::ClientContext ctx2;
  ctx2.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  req.set_service("no.such.Service");
  auto unknown = stub->Watch(&ctx2, req);
  ASSERT_TRUE(unknown->Read(&r));
  EXPECT_EQ(r.status(), health::HealthCheckResponse::SERVICE_UNKNOWN);
  ctx.TryCancel();
  ctx2.TryCancel();
  watch->Finish();
  unknown->Finish();
}

TEST_F(CoordinatorTest, StoreIsScopedAndWaits) {
  Start();
  ScriptedRank r0(coord_->target, "g", 0, 1, 7);
  ASSERT_TRUE(r0.welcomed());
  auto stub = vi::WorkerControl::NewStub(
      grpc::CreateChannel(coord_->target, grpc::InsecureChannelCredentials()));
  auto set = [&](const std::string& key, const std::string& value) {
    grpc::ClientContext ctx;
    vi::StoreSetRequest req;
    req.set_key(key);
    req.set_value(value);
    vi::StoreSetResponse resp;
    return stub->StoreSet(&ctx, req, &resp);
  };
  auto get = [&](const std::string& key, int wait_ms, vi::StoreGetResponse* resp) {
    grpc::ClientContext ctx;
    vi::StoreGetRequest req;
    req.set_key(key);
    req.set_wait_millis(wait_ms);
    return stub->StoreGet(&ctx, req, resp);
  };
  EXPECT_TRUE(set("g/7/a", "alpha").ok());
  vi::StoreGetResponse resp;
  ASSERT_TRUE(get("g/7/a", 0, &resp).ok());
  EXPECT_TRUE(resp.found());
  EXPECT_EQ(resp.value(), "alpha");
  // Not under a live generation's prefix.
  EXPECT_EQ(set("g/6/a", "x").error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(set("other/7/a", "x").error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  // A waiting Get is answered by a later Set.
  auto later = std::async(std::launch::async, [&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    return set("g/7/b", "beta");
  });
  vi::StoreGetResponse waited;
  ASSERT_TRUE(get("g/7/b", 5000, &waited).ok());
  EXPECT_TRUE(waited.found());
  EXPECT_EQ(waited.value(), "beta");
  EXPECT_TRUE(later.get().ok());
  // A Get that times out says not found.
  vi::StoreGetResponse missing;
  ASSERT_TRUE(get("g/7/never", 200, &missing).ok());
  EXPECT_FALSE(missing.found());
}

// Server reflection (what grpcurl uses), spoken with raw bytes: the
// ServerReflectionRequest messages are tiny and their encoding is fixed.
std::string ReflectionCall(const std::string& target, const std::string& request) {
  auto channel = grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  const grpc::internal::RpcMethod method(
      "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
      grpc::internal::RpcMethod::BIDI_STREAMING);
  std::unique_ptr<grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>> stream(
      grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
          channel.get(), method, &ctx));
  grpc::Slice slice(request.data(), request.size());
  grpc::ByteBuffer out(&slice, 1);
  stream->Write(out);
  stream->WritesDone();
  grpc::ByteBuffer in;
  std::string response;
  while (stream->Read(&in)) {
    std::vector<grpc::Slice> slices;
    (void)in.Dump(&slices);
    for (const auto& s : slices) {
      response.append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
  }
  stream->Finish();
  return response;
}

TEST_F(CoordinatorTest, ReflectionDescribesTheApi) {
  Start();
  // list_services = "" (field 7, length-delimited, empty).
  const std::string list = ReflectionCall(coord_->target, std::string("\x3a\x00", 2));
  EXPECT_THAT(list, HasSubstr("denoised.v1.Denoiser"));
  EXPECT_THAT(list, HasSubstr("grpc.health.v1.Health"));
  // file_containing_symbol = "denoised.v1.Denoiser" (field 4).
  const std::string symbol = "denoised.v1.Denoiser";
  const std::string file = ReflectionCall(
      coord_->target,
      std::string("\x22") + static_cast<char>(symbol.size()) + symbol);
  EXPECT_THAT(file, HasSubstr("denoised/v1/denoiser.proto"));
  EXPECT_THAT(file, HasSubstr("GenerateRequest"));
}

class ReadyGroupTest : public CoordinatorTest {
 protected:
  void SetUpGroup(std::vector<std::string> extra = {}) {
    Start(std::move(extra));
    rank_ = std::make_unique<ScriptedRank>(coord_->target, "g", 0, 1, 1);
    ASSERT_TRUE(rank_->welcomed());
    rank_->Ready();
    WaitState("g", v1::GROUP_STATE_READY);
  }
  std::unique_ptr<ScriptedRank> rank_;
};

TEST_F(ReadyGroupTest, InvalidRequestsNameTheField) {
  SetUpGroup();
  struct Case {
    std::string field;
    std::function<void(v1::GenerateRequest&)> mutate;
  };
  const std::vector<Case> cases = {
      {"steps", [](v1::GenerateRequest& r) { r.set_steps(1001); }},
      {"steps", [](v1::GenerateRequest& r) { r.set_steps(-1); }},
      {"steps", [](v1::GenerateRequest& r) { r.set_steps(0); }},
      {"scheduler",
       [](v1::GenerateRequest& r) { r.set_scheduler(static_cast<v1::Scheduler>(42)); }},
      {"prompt_embeds.data",  // NaN (f32)
       [](v1::GenerateRequest& r) {
         const float nan = std::nanf("");
         std::memcpy(r.mutable_prompt_embeds()->mutable_data()->data() + 8, &nan, 4);
       }},
      {"negative_prompt_embeds.data",  // +Inf (bf16)
       [](v1::GenerateRequest& r) {
         v1::Tensor* t = r.mutable_negative_prompt_embeds();
         t->set_dtype(v1::DTYPE_BF16);
         t->add_shape(2);
         t->add_shape(32);
         std::string bytes(2 * 32 * 2, '\0');
         bytes[2 * 5 + 1] = static_cast<char>(0x7f);  // 0x7f80 little-endian
         bytes[2 * 5] = static_cast<char>(0x80);
         t->set_data(bytes);
       }},
      {"initial_latents.data",  // -Inf (f32) in an otherwise valid latent
       [](v1::GenerateRequest& r) {
         v1::Tensor* t = r.mutable_initial_latents();
         t->set_dtype(v1::DTYPE_F32);
         for (int d : {16, 2, 8, 8}) t->add_shape(d);
         std::string bytes(16 * 2 * 8 * 8 * 4, '\0');
         const float inf = -INFINITY;
         std::memcpy(bytes.data() + 4 * 100, &inf, 4);
         t->set_data(bytes);
       }},
      {"guidance_scale",
       [](v1::GenerateRequest& r) { r.set_guidance_scale(std::nanf("")); }},
      {"shift", [](v1::GenerateRequest& r) { r.set_shift(INFINITY); }},
      // The engine's own limits are checked at admission too.
      {"guidance_scale", [](v1::GenerateRequest& r) { r.set_guidance_scale(150); }},
      {"shift", [](v1::GenerateRequest& r) { r.set_shift(2000); }},
      {"prompt_embeds.shape",
       [](v1::GenerateRequest& r) { *r.mutable_prompt_embeds() = SeededEmbeds(1, 4097, 32); }},
      {"latent_shape.width",  // 1025 tokens along one axis (positions: 1024)
       [](v1::GenerateRequest& r) {
         r.mutable_latent_shape()->set_frames(1);
         r.mutable_latent_shape()->set_height(2);
         r.mutable_latent_shape()->set_width(2050);
       }},
      {"pixel_size.frames",
       [](v1::GenerateRequest& r) { r.mutable_pixel_size()->set_frames(6); }},
      {"pixel_size.height",
       [](v1::GenerateRequest& r) { r.mutable_pixel_size()->set_height(60); }},
      {"pixel_size.width",
       [](v1::GenerateRequest& r) { r.mutable_pixel_size()->set_width(72); }},
      {"latent_shape.channels",
       [](v1::GenerateRequest& r) {
         r.mutable_latent_shape()->set_channels(4);
         r.mutable_latent_shape()->set_frames(1);
         r.mutable_latent_shape()->set_height(8);
         r.mutable_latent_shape()->set_width(8);
       }},
      {"size", [](v1::GenerateRequest& r) { r.clear_pixel_size(); }},
      {"prompt_embeds", [](v1::GenerateRequest& r) { r.clear_prompt_embeds(); }},
      {"prompt_embeds.shape",
       [](v1::GenerateRequest& r) { *r.mutable_prompt_embeds() = SeededEmbeds(1, 4, 31); }},
      {"prompt_embeds.data",
       [](v1::GenerateRequest& r) { r.mutable_prompt_embeds()->mutable_data()->pop_back(); }},
      {"negative_prompt_embeds.dtype",
       [](v1::GenerateRequest& r) {
         *r.mutable_negative_prompt_embeds() = SeededEmbeds(1, 4, 32);
         r.mutable_negative_prompt_embeds()->set_dtype(v1::DTYPE_UNSPECIFIED);
       }},
      {"initial_latents.shape",
       [](v1::GenerateRequest& r) {
         *r.mutable_initial_latents() = SeededEmbeds(1, 4, 32);
       }},
      {"priority", [](v1::GenerateRequest& r) { r.set_priority(101); }},
      {"latent_shape",
       [](v1::GenerateRequest& r) {
         r.mutable_latent_shape()->set_frames(128);
         r.mutable_latent_shape()->set_height(128);
         r.mutable_latent_shape()->set_width(128);
       }},
  };
  for (const Case& c : cases) {
    v1::GenerateRequest req = TinyRequest(5, 64, 64, 4, 1);
    c.mutate(req);
    absl::StatusOr<v1::GenerateResult> r =
        client_->Generate(req, std::chrono::seconds(10), {});
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_THAT(std::string(r.status().message()), HasSubstr(c.field + ":"))
        << r.status();
  }
  // The group never saw any of them.
  EXPECT_EQ(GroupState("g").value_or(v1::GROUP_STATE_UNSPECIFIED),
            v1::GROUP_STATE_READY);
  const auto m = Scrape();
  EXPECT_EQ(SumSamples(m, "denoised_requests_total",
                       {{"model", "tiny"}, {"code", "INVALID_ARGUMENT"}}),
            static_cast<double>(cases.size()));
}

TEST_F(ReadyGroupTest, JobIsRelayedStepByStep) {
  SetUpGroup();
  v1::GenerateRequest req = TinyRequest(5, 64, 64, 4, 9);
  req.clear_steps();              // default 50 ...
  req.set_step_event_interval(2);  // ... but only every other Step event
  Call call(*client_, req);
  std::optional<vi::Job> job = rank_->NextJob();
  ASSERT_TRUE(job.has_value());
  // Defaults filled and the latent shape resolved.
  EXPECT_EQ(job->steps(), 50);
  EXPECT_FLOAT_EQ(job->guidance_scale(), 5.0f);
  EXPECT_FLOAT_EQ(job->shift(), 3.0f);
  EXPECT_EQ(job->scheduler(), v1::SCHEDULER_UNIPC);
  // The job carries what the ranks run: the prompt's tensor, the seed.
  EXPECT_EQ(job->prompt_embeds().data().size(),
            req.prompt_embeds().data().size());
  EXPECT_EQ(job->seed(), req.seed());
  EXPECT_EQ(job->latent_shape().channels(), 16);
  EXPECT_EQ(job->latent_shape().frames(), 2);
  EXPECT_EQ(job->latent_shape().height(), 8);
  EXPECT_EQ(job->latent_shape().width(), 8);
  EXPECT_EQ(GroupState("g").value_or(v1::GROUP_STATE_UNSPECIFIED),
            v1::GROUP_STATE_BUSY);
  for (int i = 0; i < 50; ++i) rank_->Step(job->request_id(), i, 50);
  rank_->Result(job->request_id(), 0, &*job);
  ASSERT_TRUE(call.Status().ok());
  std::lock_guard<std::mutex> lock(call.mu);
  ASSERT_GE(call.events.size(), 4u);
  EXPECT_TRUE(call.events[0].has_accepted());
  EXPECT_EQ(call.events[0].accepted().request_id(), job->request_id());
  EXPECT_TRUE(call.events[1].has_started());
  EXPECT_EQ(call.events[1].started().worker_group(), "g");
  std::vector<int> indices;
  for (size_t i = 2; i + 1 < call.events.size(); ++i) {
    ASSERT_TRUE(call.events[i].has_step());
    indices.push_back(call.events[i].step().index());
  }
  std::vector<int> want;
  for (int i = 0; i < 50; i += 2) want.push_back(i);
  want.push_back(49);
  EXPECT_EQ(indices, want);
  const v1::GenerateEvent& last = call.events.back();
  ASSERT_TRUE(last.has_result());
  EXPECT_EQ(last.result().metadata().model(), "tiny");
  EXPECT_EQ(last.result().metadata().model_config_hash(), "c0ffee");
  EXPECT_EQ(last.result().metadata().worker_group(), "g");
  EXPECT_EQ(last.result().metadata().ranks(), 1);
  EXPECT_EQ(last.result().metadata().steps(), 50);
  EXPECT_EQ(last.result().metadata().seed(), 9u);
  EXPECT_EQ(last.result().latents().shape_size(), 4);
  WaitState("g", v1::GROUP_STATE_READY);
  // Every step report is observed, whatever the event interval.
  const auto m = Scrape();
  EXPECT_EQ(SumSamples(m, "denoised_step_duration_seconds_count",
                       {{"model", "tiny"}, {"ranks", "1"}}),
            50);
  EXPECT_EQ(SumSamples(m, "denoised_steps_total"), 50);
  EXPECT_EQ(SumSamples(m, "denoised_requests_total", {{"code", "OK"}}), 1);
  absl::StatusOr<std::string> text =
      HttpGet(coord_->metrics, "/metrics", std::chrono::seconds(5));
  ASSERT_TRUE(text.ok());
  absl::StatusOr<std::string> promtool = PromtoolCheck(*text, dir_.path());
  EXPECT_TRUE(promtool.ok()) << promtool.status();
}

TEST_F(ReadyGroupTest, UnaryCallReturnsTheResult) {
  SetUpGroup();
  v1::GenerateRequest req = TinyRequest(1, 32, 32, 3, 5);
  auto unary = std::async(std::launch::async, [&] {
    return client_->GenerateUnary(req, std::chrono::seconds(30));
  });
  std::optional<vi::Job> job = rank_->NextJob();
  ASSERT_TRUE(job.has_value());
  for (int i = 0; i < 3; ++i) rank_->Step(job->request_id(), i, 3);
  rank_->Result(job->request_id(), 0, &*job);
  absl::StatusOr<v1::GenerateResult> r = unary.get();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->request_id(), job->request_id());
  EXPECT_EQ(r->metadata().steps(), 3);
  EXPECT_EQ(r->metadata().latent_shape().frames(), 1);
  EXPECT_EQ(r->metadata().latent_shape().height(), 4);
  EXPECT_EQ(r->latents().data().size(), 4u * 16 * 1 * 4 * 4);
}

// 720p video latents are tens of MB, far above gRPC's 4 MB default.
TEST_F(ReadyGroupTest, VideoSizedMessagesPass) {
  SetUpGroup();
  v1::GenerateRequest req = TinyRequest(81, 720, 1280, 2, 3, /*text_len=*/512);
  *req.mutable_initial_latents() = SeededEmbeds(3, 16 * 21 * 90, 160);
  req.mutable_initial_latents()->clear_shape();
  for (int d : {16, 21, 90, 160}) req.mutable_initial_latents()->add_shape(d);
  Call call(*client_, req);
  std::optional<vi::Job> job = rank_->NextJob();
  ASSERT_TRUE(job.has_value());
  EXPECT_EQ(job->initial_latents().data().size(), 4u * 16 * 21 * 90 * 160);
  rank_->Result(job->request_id(), 0, &*job);
  absl::StatusOr<v1::GenerateResult> r = call.done.get();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->latents().data().size(), 4u * 16 * 21 * 90 * 160);  // 19.4 MB
}

TEST_F(ReadyGroupTest, QueueFullCancelAndDuplicateIds) {
  SetUpGroup({"--max-queue", "1"});
  v1::GenerateRequest a = TinyRequest(5, 64, 64, 10, 1);
  a.set_client_request_id("job-a");
  Call call_a(*client_, a);
  std::optional<vi::Job> job_a = rank_->NextJob();
  ASSERT_TRUE(job_a.has_value());
  // The group is busy: b waits in the queue, c does not fit.
  v1::GenerateRequest b = TinyRequest(5, 64, 64, 10, 2);
  b.set_client_request_id("job-b");
  Call call_b(*client_, b);
  call_b.accepted.get_future().wait();
  absl::StatusOr<v1::GenerateResult> c =
      client_->Generate(TinyRequest(5, 64, 64, 10, 3), std::chrono::seconds(10), {});
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("queue"));
  // A live client_request_id cannot be reused.
  v1::GenerateRequest dup = TinyRequest(5, 64, 64, 10, 4);
  dup.set_client_request_id("job-a");
  EXPECT_EQ(client_->Generate(dup, std::chrono::seconds(10), {}).status().code(),
            absl::StatusCode::kAlreadyExists);
  const auto queued = Scrape();
  EXPECT_EQ(SumSamples(queued, "denoised_queue_depth", {{"model", "tiny"}}), 1);
  EXPECT_EQ(SumSamples(queued, "denoised_running_requests", {{"model", "tiny"}}), 1);

  // Cancel the queued one by its client id: it never reaches the rank.
  EXPECT_EQ(client_->Cancel("job-b").value_or(false), true);
  EXPECT_EQ(call_b.Status().code(), absl::StatusCode::kCancelled);
  // Cancel the running one: every rank is told, and its answer ends the call.
  EXPECT_EQ(client_->Cancel(job_a->request_id()).value_or(false), true);
  vi::CoordinatorMessage m;
  ASSERT_TRUE(rank_->Read(&m));
  ASSERT_TRUE(m.has_cancel());
  EXPECT_EQ(m.cancel().request_id(), job_a->request_id());
  EXPECT_EQ(m.cancel().status_code(), static_cast<int>(absl::StatusCode::kCancelled));
  rank_->Step(job_a->request_id(), 0, 10);
  rank_->Result(job_a->request_id(), static_cast<int>(absl::StatusCode::kCancelled));
  EXPECT_EQ(call_a.Status().code(), absl::StatusCode::kCancelled);
  WaitState("g", v1::GROUP_STATE_READY);
  EXPECT_EQ(client_->Cancel("job-a").value_or(true), false);  // gone
  // The id is free again, and the group takes new work.
  v1::GenerateRequest again = TinyRequest(5, 64, 64, 2, 5);
  again.set_client_request_id("job-a");
  Call call_again(*client_, again);
  std::optional<vi::Job> job = rank_->NextJob();
  ASSERT_TRUE(job.has_value());
  rank_->Result(job->request_id(), 0, &*job);
  EXPECT_TRUE(call_again.Status().ok());
  const auto after = Scrape();
  EXPECT_EQ(SumSamples(after, "denoised_requests_total",
                       {{"model", "tiny"}, {"code", "CANCELLED"}}),
            2);
  EXPECT_EQ(SumSamples(after, "denoised_requests_total",
                       {{"model", "tiny"}, {"code", "RESOURCE_EXHAUSTED"}}),
            1);
  EXPECT_EQ(SumSamples(after, "denoised_requests_total",
                       {{"model", "tiny"}, {"code", "ALREADY_EXISTS"}}),
            1);
}

TEST_F(ReadyGroupTest, BrokenRankFailsTheGroupUntilANewGeneration) {
  SetUpGroup();
  Call call(*client_, TinyRequest(5, 64, 64, 10, 1));
  std::optional<vi::Job> job = rank_->NextJob();
  ASSERT_TRUE(job.has_value());
  rank_->Step(job->request_id(), 0, 10);
  rank_->Break();  // the rank process "dies"
  const absl::Status s = call.Status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(s.message()), HasSubstr("worker group g"));
  WaitState("g", v1::GROUP_STATE_FAILED);
  EXPECT_EQ(client_->Health().value_or("?"), "NOT_SERVING");
  auto m = Scrape();
  EXPECT_EQ(SumSamples(m, "denoised_worker_groups", {{"state", "failed"}}), 1);
  // The launcher restarts the group with generation 2.
  ScriptedRank next(coord_->target, "g", 0, 1, 2);
  ASSERT_TRUE(next.welcomed());
  EXPECT_EQ(next.welcome().store_prefix(), "g/2/");
  next.Ready();
  WaitState("g", v1::GROUP_STATE_READY);
  EXPECT_EQ(client_->Health().value_or("?"), "SERVING");
  m = Scrape();
  EXPECT_EQ(SumSamples(m, "denoised_worker_group_restarts_total", {{"group", "g"}}), 1);
  EXPECT_EQ(SumSamples(m, "denoised_worker_groups", {{"state", "ready"}}), 1);
  EXPECT_EQ(SumSamples(m, "denoised_worker_groups", {{"state", "failed"}}), 0);
  // A stale generation cannot come back.
  ScriptedRank stale(coord_->target, "g", 0, 1, 1);
  EXPECT_FALSE(stale.welcomed());
  EXPECT_EQ(stale.Finish().error_code(), grpc::StatusCode::FAILED_PRECONDITION);
}

// A request queued behind a group that then fails waits for the launcher's
// next generation and runs on it.
TEST_F(ReadyGroupTest, QueuedRequestRunsOnTheNextGeneration) {
  SetUpGroup();
  Call running(*client_, TinyRequest(5, 64, 64, 10, 1));
  ASSERT_TRUE(rank_->NextJob().has_value());
  Call queued(*client_, TinyRequest(5, 64, 64, 2, 2));
  queued.accepted.get_future().wait();
  rank_->Break();
  EXPECT_EQ(running.Status().code(), absl::StatusCode::kUnavailable);
  WaitState("g", v1::GROUP_STATE_FAILED);
  ScriptedRank next(coord_->target, "g", 0, 1, 2);
  ASSERT_TRUE(next.welcomed());
  next.Ready();
  std::optional<vi::Job> job = next.NextJob();
  ASSERT_TRUE(job.has_value());
  next.Result(job->request_id(), 0, &*job);
  EXPECT_TRUE(queued.Status().ok()) << queued.Status();
}

// When no new generation comes, the queued request does not wait forever:
// after --unserved-timeout it ends UNAVAILABLE saying why, the failed group is
// forgotten, and the model is no longer served (NOT_FOUND).
TEST_F(ReadyGroupTest, QueuedRequestsEndWhenNoGroupComesBack) {
  SetUpGroup({"--unserved-timeout", "1"});
  Call running(*client_, TinyRequest(5, 64, 64, 10, 1));
  ASSERT_TRUE(rank_->NextJob().has_value());
  Call queued(*client_, TinyRequest(5, 64, 64, 2, 2));  // no deadline of its own
  queued.accepted.get_future().wait();
  rank_->Break();
  EXPECT_EQ(running.Status().code(), absl::StatusCode::kUnavailable);
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_EQ(queued.done.wait_for(std::chrono::seconds(20)), std::future_status::ready)
      << "the queued request is still waiting";
  const double waited =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const absl::Status s = queued.Status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("model 'tiny' has had no live worker group"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("worker group g failed"));
  EXPECT_GE(waited, 0.5);
  EXPECT_LT(waited, 5.0);
  absl::StatusOr<v1::ServerInfo> info = client_->GetServerInfo();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->groups_size(), 0) << "the failed group is forgotten";
  EXPECT_EQ(client_->Generate(TinyRequest(5, 64, 64, 2, 3), std::chrono::seconds(10), {})
                .status()
                .code(),
            absl::StatusCode::kNotFound);
  auto m = Scrape();
  EXPECT_EQ(SumSamples(m, "denoised_requests_total", {{"code", "UNAVAILABLE"}}), 2);
  EXPECT_EQ(SumSamples(m, "denoised_queue_depth"), 0);
  EXPECT_EQ(SumSamples(m, "denoised_worker_groups"), 0);
}

// A rank that announces its leave (Leave, then half-close) removes its group
// without counting a failure; a stream that ends without Leave fails it.
TEST_F(CoordinatorTest, LeaveRemovesTheGroupAnUnannouncedEndFailsIt) {
  Start();
  ScriptedRank a(coord_->target, "a", 0, 1, 1);
  ScriptedRank b(coord_->target, "b", 0, 1, 1);
  ASSERT_TRUE(a.welcomed());
  ASSERT_TRUE(b.welcomed());
  a.Ready();
  b.Ready();
  WaitState("a", v1::GROUP_STATE_READY);
  WaitState("b", v1::GROUP_STATE_READY);
  a.Leave();
  EXPECT_TRUE(a.Finish().ok());
  b.HalfClose();
  WaitState("b", v1::GROUP_STATE_FAILED);
  absl::StatusOr<v1::ServerInfo> info = client_->GetServerInfo();
  ASSERT_TRUE(info.ok());
  ASSERT_EQ(info->groups_size(), 1) << "group a is gone";
  EXPECT_EQ(info->groups(0).name(), "b");
  b.Finish();
}

// Groups of one model started with different --max-tokens: admission takes
// the largest, and a request runs only on a group that takes it (it waits for
// the big group rather than failing on the small one).
TEST_F(ReadyGroupTest, RequestsRunOnGroupsThatTakeTheirTokens) {
  SetUpGroup();  // "g": max_tokens 100000
  ScriptedRank small(coord_->target, "small", 0, 1, 1, "", "c0ffee", /*max_tokens=*/16);
  ASSERT_TRUE(small.welcomed());
  small.Ready();
  WaitState("small", v1::GROUP_STATE_READY);
  absl::StatusOr<v1::ListModelsResponse> models = client_->ListModels();
  ASSERT_TRUE(models.ok());
  EXPECT_EQ(models->models(0).max_tokens(), 100000);
  // 32 tokens (latent 2x8x8, patch 1x2x2): only "g" takes them.
  Call first(*client_, TinyRequest(5, 64, 64, 2, 1));
  std::optional<vi::Job> job1 = rank_->NextJob();
  ASSERT_TRUE(job1.has_value());
  Call second(*client_, TinyRequest(5, 64, 64, 2, 2));
  second.accepted.get_future().wait();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_EQ(GroupState("small").value_or(v1::GROUP_STATE_UNSPECIFIED),
            v1::GROUP_STATE_READY) << "the small group must not take 32 tokens";
  rank_->Result(job1->request_id(), 0, &*job1);
  EXPECT_TRUE(first.Status().ok());
  std::optional<vi::Job> job2 = rank_->NextJob();
  ASSERT_TRUE(job2.has_value());
  rank_->Result(job2->request_id(), 0, &*job2);
  EXPECT_TRUE(second.Status().ok()) << second.Status();
  // A request of 16 tokens or fewer runs on either: here the small group,
  // the least recently used.
  Call tiny(*client_, TinyRequest(1, 32, 32, 2, 3));  // latent 1x4x4: 4 tokens
  std::optional<vi::Job> job3 = small.NextJob();
  ASSERT_TRUE(job3.has_value());
  small.Result(job3->request_id(), 0, &*job3);
  EXPECT_TRUE(tiny.Status().ok()) << tiny.Status();
}

TEST_F(ReadyGroupTest, MismatchingModelConfigIsRefused) {
  SetUpGroup();
  // Another group registering the same model name with another architecture.
  ScriptedRank other_group(coord_->target, "g2", 0, 1, 1, "", "deadbeef");
  EXPECT_FALSE(other_group.welcomed());
  grpc::Status st = other_group.Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(st.error_message(), HasSubstr("config hash c0ffee"));
  EXPECT_THAT(st.error_message(), HasSubstr("deadbeef"));
  // The serving group is untouched and still takes work.
  WaitState("g", v1::GROUP_STATE_READY);
  EXPECT_EQ(client_->Health().value_or("?"), "SERVING");
  absl::StatusOr<v1::ServerInfo> info = client_->GetServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->groups_size(), 1);
}

TEST_F(ReadyGroupTest, RankReportingAFailureFailsTheGroup) {
  SetUpGroup();
  Call call(*client_, TinyRequest(5, 64, 64, 10, 1));
  std::optional<vi::Job> job = rank_->NextJob();
  ASSERT_TRUE(job.has_value());
  rank_->Result(job->request_id(), static_cast<int>(absl::StatusCode::kInternal));
  EXPECT_EQ(call.Status().code(), absl::StatusCode::kUnavailable);
  WaitState("g", v1::GROUP_STATE_FAILED);
  // Its stream is closed by the coordinator.
  vi::CoordinatorMessage m;
  EXPECT_FALSE(rank_->Read(&m));
  EXPECT_EQ(rank_->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
}

TEST_F(ReadyGroupTest, SilentRankFailsTheGroup) {
  SetUpGroup({"--heartbeat-timeout", "2"});
  // The scripted rank sends no heartbeats (a hung process).
  for (int i = 0; i < 200; ++i) {
    if (GroupState("g").value_or(v1::GROUP_STATE_UNSPECIFIED) ==
        v1::GROUP_STATE_FAILED) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(GroupState("g").value_or(v1::GROUP_STATE_UNSPECIFIED),
            v1::GROUP_STATE_FAILED);
  vi::CoordinatorMessage m;
  EXPECT_FALSE(rank_->Read(&m));
  const grpc::Status s = rank_->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(s.error_message(), HasSubstr("heartbeat"));
}

TEST_F(ReadyGroupTest, DeadlineInTheQueue) {
  SetUpGroup();
  Call busy(*client_, TinyRequest(5, 64, 64, 10, 1));
  std::optional<vi::Job> job = rank_->NextJob();
  ASSERT_TRUE(job.has_value());
  absl::StatusOr<v1::GenerateResult> late = client_->Generate(
      TinyRequest(5, 64, 64, 10, 2), std::chrono::milliseconds(300), {});
  EXPECT_EQ(late.status().code(), absl::StatusCode::kDeadlineExceeded);
  // The coordinator drops it from the queue on its own (bounded wait).
  for (int i = 0; i < 100; ++i) {
    if (SumSamples(Scrape(), "denoised_queue_depth", {{"model", "tiny"}}) == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  rank_->Result(job->request_id(), 0, &*job);
  EXPECT_TRUE(busy.Status().ok());
  const auto m = Scrape();
  EXPECT_EQ(SumSamples(m, "denoised_requests_total",
                       {{"model", "tiny"}, {"code", "DEADLINE_EXCEEDED"}}),
            1);
  EXPECT_EQ(SumSamples(m, "denoised_queue_depth", {{"model", "tiny"}}), 0);
}

}  // namespace
}  // namespace dn::server

namespace dn::server {
namespace {

// Issue 14, defect 5: a body that is not a GenerateRequest (random bytes, a
// truncated field, invalid UTF-8 in `model`) is INVALID_ARGUMENT saying so,
// on both Generate methods, and is counted like every other outcome.
TEST_F(ReadyGroupTest, UnparseableBodyIsInvalidArgumentAndCounted) {
  SetUpGroup();
  const std::string valid = TinyRequest(5, 32, 32, 2, 1).SerializeAsString();
  const std::vector<std::string> bodies = {
      std::string("\xff\xff\xff\xff\xff\xff\xff\xff", 8),     // random bytes
      valid.substr(0, valid.size() / 2),                      // truncated field
      std::string("\x0a\x03\xff\xfe\x41", 5),                 // model = invalid UTF-8
  };
  const double before = SumSamples(Scrape(), "denoised_requests_total",
                                   {{"code", "INVALID_ARGUMENT"}});
  int calls = 0;
  for (const std::string method : {"Generate", "GenerateUnary"}) {
    for (const std::string& body : bodies) {
      SCOPED_TRACE(method + " body of " + std::to_string(body.size()) + " bytes");
      grpc::Status s = RawGenerateCall(coord_->target, method, body);
      EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
      EXPECT_THAT(s.error_message(), HasSubstr("could not be parsed"));
      ++calls;
    }
  }
  double after = 0;
  for (int i = 0; i < 50; ++i) {  // counted on the coordinator's loop
    after = SumSamples(Scrape(), "denoised_requests_total", {{"code", "INVALID_ARGUMENT"}});
    if (after - before >= calls) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(after - before, calls);
  // The group is untouched.
  EXPECT_EQ(GroupState("g").value_or(v1::GROUP_STATE_UNSPECIFIED), v1::GROUP_STATE_READY);
}

// Issue 14, defect 2: a bound on the bytes of requests in flight, checked
// before the body is parsed or copied.
TEST_F(ReadyGroupTest, RequestOverTheMemoryBudgetIsRefused) {
  SetUpGroup({"--max-inflight-mb", "1"});
  v1::GenerateRequest big = TinyRequest(5, 64, 64, 4, 1, /*text_len=*/12000);  // 1.5 MB
  absl::StatusOr<v1::GenerateResult> r = client_->Generate(big, std::chrono::seconds(10), {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("--max-inflight-mb"));
  EXPECT_EQ(GroupState("g").value_or(v1::GROUP_STATE_UNSPECIFIED), v1::GROUP_STATE_READY);
}

// Issue 14, defect 2: client uploads do not starve the ranks' heartbeats.
// Three concurrent ~200 MiB Generate calls (refused after parsing: their
// embeddings do not match the model) while the group's only rank sends a
// heartbeat every 300 ms; with --heartbeat-timeout 2 the group must stay
// READY.
TEST_F(CoordinatorTest, UploadsDoNotStarveHeartbeats) {
  Start({"--heartbeat-timeout", "2"});
  ScriptedRank rank(coord_->target, "g", 0, 1, 1);
  ASSERT_TRUE(rank.welcomed());
  rank.Ready();
  WaitState("g", v1::GROUP_STATE_READY);
  std::atomic<bool> stop{false};
  std::thread beats([&] {
    vi::RankMessage hb;
    hb.mutable_heartbeat();
    while (!stop) {
      rank.Send(hb);
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
    }
  });
  // text_len 1.6M x 32 f32 = 200 MiB; text_dim 32 matches, so the request
  // is parsed and checked in full before it is refused.
  const std::string body = TinyRequest(5, 32, 32, 2, 1, /*text_len=*/1600000).SerializeAsString();
  std::vector<std::thread> uploads;
  std::vector<grpc::Status> statuses(3);
  for (int i = 0; i < 3; ++i) {
    uploads.emplace_back([&, i] {
      statuses[static_cast<size_t>(i)] = RawGenerateCall(coord_->target, "GenerateUnary", body);
    });
  }
  for (auto& t : uploads) t.join();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const auto state = GroupState("g");
  stop = true;
  beats.join();
  for (const grpc::Status& s : statuses) {
    EXPECT_NE(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  }
  EXPECT_EQ(state.value_or(v1::GROUP_STATE_UNSPECIFIED), v1::GROUP_STATE_READY)
      << ::dn::server::testing::ReadFile(coord_->log).substr(0, 4000);
}

}  // namespace
}  // namespace dn::server
