// Step caching through the service, as real processes on loopback: a
// coordinator and a 2-rank CPU group serving the trained demo model
// (tools/demo_model). A request with acceleration.cache_threshold is run with
// step caching; the result's metadata echoes the acceleration and lists the
// skipped steps, which are exactly the Step events marked cached and the
// steps `denoised run` skips on 1 rank for the same request (and the latents
// are byte-equal to that run's); the coordinator counts them in
// denoised_cached_steps_total. Bad thresholds are refused at admission
// naming acceleration.cache_threshold.
#include <chrono>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "denoised/v1/denoiser.pb.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/client.h"
#include "tests/server/service_test_util.h"
#include "worker/safetensors.h"

namespace dn::server {
namespace {

namespace v1 = ::denoised::v1;
using ::dn::server::testing::CoordinatorProc;
using ::dn::server::testing::Proc;
using ::dn::server::testing::ReadFile;
using ::dn::server::testing::StartCoordinator;
using ::dn::server::testing::TempDir;
using ::dn::server::testing::WaitGroups;
using ::testing::HasSubstr;
using ::testing::StartsWith;

constexpr int kSteps = 12;
constexpr float kThreshold = 0.2f;  // skips some of the 12 steps, not all

v1::GenerateRequest Request(int text_dim) {
  v1::GenerateRequest req;
  req.set_model("demo");
  req.mutable_pixel_size()->set_frames(2);
  req.mutable_pixel_size()->set_height(32);
  req.mutable_pixel_size()->set_width(32);
  req.set_steps(kSteps);
  req.set_guidance_scale(5);
  req.set_seed(7);
  // `denoised run --seed 7 --text-len 80`'s embeddings.
  *req.mutable_prompt_embeds() = SeededEmbeds(7, 80, text_dim);
  return req;
}

TEST(StepCacheServiceTest, SkippedStepsAreReportedAndCounted) {
  TempDir dir;
  absl::StatusOr<std::unique_ptr<CoordinatorProc>> c = StartCoordinator(dir.path());
  ASSERT_TRUE(c.ok()) << c.status();
  const std::string log = dir.path() + "/demo.log";
  Proc group({"worker", "--coordinator", (*c)->target, "--model", DN_DEMO_MODEL_DIR,
              "--model-name", "demo", "--ranks", "2", "--backend", "cpu", "--name", "demo",
              "--threads", "1", "--metrics-listen", "127.0.0.1:0"},
             log);
  DenoiserClient client((*c)->target);
  absl::Status ready =
      WaitGroups(client, {"demo"}, v1::GROUP_STATE_READY, std::chrono::seconds(180));
  ASSERT_TRUE(ready.ok()) << ready << ReadFile(log);
  absl::StatusOr<v1::ListModelsResponse> models = client.ListModels();
  ASSERT_TRUE(models.ok()) << models.status();
  ASSERT_EQ(models->models_size(), 1);
  const int text_dim = models->models(0).text_dim();

  // Bad thresholds: refused at admission, naming the field.
  for (float bad : {-0.5f, 1.5f, std::numeric_limits<float>::quiet_NaN()}) {
    v1::GenerateRequest req = Request(text_dim);
    req.mutable_acceleration()->set_cache_threshold(bad);
    absl::StatusOr<v1::GenerateResult> r = client.Generate(req, std::chrono::seconds(60), {});
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_THAT(std::string(r.status().message()), StartsWith("acceleration.cache_threshold:"));
  }

  // The exact path: nothing cached, no acceleration echoed.
  const v1::GenerateRequest exact_req = Request(text_dim);
  absl::StatusOr<v1::GenerateResult> exact =
      client.Generate(exact_req, std::chrono::seconds(120), {});
  ASSERT_TRUE(exact.ok()) << exact.status();
  EXPECT_FALSE(exact->metadata().has_acceleration());
  EXPECT_EQ(exact->metadata().cached_steps_size(), 0);

  v1::GenerateRequest req = Request(text_dim);
  req.mutable_acceleration()->set_cache_threshold(kThreshold);
  std::vector<int> cached_events;
  int step_events = 0;
  absl::StatusOr<v1::GenerateResult> fast =
      client.Generate(req, std::chrono::seconds(120), [&](const v1::GenerateEvent& e) {
        if (e.has_step()) {
          ++step_events;
          if (e.step().cached()) cached_events.push_back(e.step().index());
        }
        return true;
      });
  ASSERT_TRUE(fast.ok()) << fast.status();
  const v1::GenerationMetadata& md = fast->metadata();
  ASSERT_TRUE(md.has_acceleration());
  EXPECT_FLOAT_EQ(md.acceleration().cache_threshold(), kThreshold);
  EXPECT_FALSE(md.acceleration().attention_fp8());
  const std::vector<int> cached(md.cached_steps().begin(), md.cached_steps().end());
  EXPECT_EQ(step_events, kSteps);
  EXPECT_EQ(cached, cached_events);
  ASSERT_FALSE(cached.empty()) << "the threshold skipped nothing: a vacuous check";
  EXPECT_LT(cached.size(), static_cast<size_t>(kSteps - 2));
  EXPECT_NE(fast->latents().data(), exact->latents().data());

  // The same request through `denoised run` on 1 rank: the same steps
  // skipped, the same latents byte for byte.
  const std::string out = dir.path() + "/run.safetensors";
  ASSERT_EQ(testing::RunDenoised({"run", "--model", DN_DEMO_MODEL_DIR, "--frames", "2",
                                  "--height", "32", "--width", "32", "--steps",
                                  std::to_string(kSteps), "--guidance", "5", "--seed", "7",
                                  "--text-len", "80", "--ranks", "1", "--threads", "1",
                                  "--cache-threshold", absl::StrCat(kThreshold), "--out", out},
                                 dir.path() + "/run.log"),
            0)
      << ReadFile(dir.path() + "/run.log");
  auto file = worker::SafetensorsFile::Open(out);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->header().metadata.at("cached_steps"), absl::StrJoin(cached, ","));
  const worker::SafetensorsEntry* e = (*file)->Find("latents");
  ASSERT_NE(e, nullptr);
  std::vector<float> run(static_cast<size_t>(worker::NumElements(e->shape)));
  ASSERT_TRUE((*file)->ReadF32(*e, run.data()).ok());
  ASSERT_EQ(fast->latents().data().size(), run.size() * sizeof(float));
  EXPECT_EQ(std::memcmp(fast->latents().data().data(), run.data(), run.size() * sizeof(float)),
            0);

  // fp8 attention (the CPU backend's emulation): the tier is echoed, and the
  // next exact request gets the exact bytes again (the setting never leaks
  // into a later request).
  {
    v1::GenerateRequest fp8_req = Request(text_dim);
    fp8_req.mutable_acceleration()->set_attention_fp8(true);
    absl::StatusOr<v1::GenerateResult> fp8 =
        client.Generate(fp8_req, std::chrono::seconds(120), {});
    ASSERT_TRUE(fp8.ok()) << fp8.status() << ReadFile(log);
    EXPECT_TRUE(fp8->metadata().acceleration().attention_fp8());
    EXPECT_EQ(fp8->metadata().cached_steps_size(), 0);
    EXPECT_NE(fp8->latents().data(), exact->latents().data());
    absl::StatusOr<v1::GenerateResult> again =
        client.Generate(exact_req, std::chrono::seconds(120), {});
    ASSERT_TRUE(again.ok()) << again.status() << ReadFile(log);
    EXPECT_EQ(again->latents().data(), exact->latents().data());
  }

  // The coordinator counted them.
  const double counted =
      SumSamples(testing::Scrape((*c)->metrics), "denoised_cached_steps_total");
  EXPECT_EQ(counted, static_cast<double>(cached.size()));
  EXPECT_EQ(group.Stop(), 0);
}

}  // namespace
}  // namespace dn::server
