// Units of server/: request validation and pixel -> latent resolution, the
// metric bucket layouts, and the Prometheus text parser / quantile helper.
#include <cmath>
#include <cstring>
#include <vector>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/client.h"
#include "server/metrics.h"
#include "server/metrics_scrape.h"
#include "server/proto_convert.h"
#include "server/protocol.h"
#include "server/request_validation.h"
#include "worker/tensor.h"

namespace dn::server {
namespace {

namespace v1 = ::denoised::v1;
using ::testing::HasSubstr;

v1::ModelInfo WanLike() {
  v1::ModelInfo m;
  m.set_name("wan");
  m.set_in_channels(16);
  m.set_text_dim(32);
  for (int s : {4, 8, 8}) m.add_vae_stride(s);
  for (int p : {1, 2, 2}) m.add_patch_size(p);
  m.set_max_tokens(100000);
  return m;
}

TEST(RequestValidation, ResolvesPixelsLikeWan) {
  v1::PixelSize p;
  p.set_frames(81);
  p.set_height(480);
  p.set_width(832);
  absl::StatusOr<v1::LatentShape> l = ResolvePixelSize(p, WanLike());
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_EQ(l->channels(), 16);
  EXPECT_EQ(l->frames(), 21);
  EXPECT_EQ(l->height(), 60);
  EXPECT_EQ(l->width(), 104);
  EXPECT_EQ(LatentTokens(*l, WanLike()), 21 * 30 * 52);
}

TEST(RequestValidation, FillsDefaults) {
  v1::GenerateRequest r;
  r.set_model("wan");
  r.mutable_latent_shape()->set_frames(1);
  r.mutable_latent_shape()->set_height(4);
  r.mutable_latent_shape()->set_width(4);
  *r.mutable_prompt_embeds() = SeededEmbeds(0, 3, 32);
  r.mutable_prompt_embeds()->clear_shape();  // [3, 1, 32]: right size, bad shape
  for (int d : {3, 1, 32}) r.mutable_prompt_embeds()->add_shape(d);
  EXPECT_THAT(std::string(ValidateRequest(r, WanLike()).status().message()),
              HasSubstr("prompt_embeds.shape"));
  // [1, T, D] is accepted.
  *r.mutable_prompt_embeds() = SeededEmbeds(0, 3, 32);
  r.mutable_prompt_embeds()->clear_shape();
  for (int d : {1, 3, 32}) r.mutable_prompt_embeds()->add_shape(d);
  absl::StatusOr<ResolvedRequest> ok = ValidateRequest(r, WanLike());
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->request.steps(), kDefaultSteps);
  EXPECT_FLOAT_EQ(ok->request.guidance_scale(), kDefaultGuidance);
  EXPECT_FLOAT_EQ(ok->request.shift(), kDefaultShift);
  EXPECT_EQ(ok->request.scheduler(), v1::SCHEDULER_UNIPC);
  EXPECT_EQ(ok->request.step_event_interval(), 1);
  EXPECT_EQ(ok->latent.channels(), 16);
  EXPECT_EQ(ok->tokens, 4);
  EXPECT_EQ(ok->text_len, 3);
}

// Wan2.2 TI2V (ListModels kind "ti2v"): condition_latents is optional and
// is frame 0's image latent [out_channels, 1, H, W] (docs/MODELS.md §5).
TEST(RequestValidation, Ti2vFirstFrameCondition) {
  v1::ModelInfo m = WanLike();
  m.set_in_channels(48);
  m.set_out_channels(48);
  m.clear_vae_stride();
  for (int s : {4, 16, 16}) m.add_vae_stride(s);
  m.set_kind("ti2v");
  v1::GenerateRequest r;
  r.set_model("wan");
  r.mutable_pixel_size()->set_frames(9);
  r.mutable_pixel_size()->set_height(64);
  r.mutable_pixel_size()->set_width(96);
  *r.mutable_prompt_embeds() = SeededEmbeds(0, 3, 32);
  absl::StatusOr<ResolvedRequest> text = ValidateRequest(r, m);  // text-only: no condition
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(text->latent.channels(), 48);
  EXPECT_EQ(text->latent.frames(), 3);
  EXPECT_EQ(text->latent.height(), 4);
  EXPECT_EQ(text->latent.width(), 6);
  TensorToProto(worker::Tensor::Host({48, 1, 4, 6}), r.mutable_condition_latents());
  absl::StatusOr<ResolvedRequest> cond = ValidateRequest(r, m);
  EXPECT_TRUE(cond.ok()) << cond.status();
  TensorToProto(worker::Tensor::Host({48, 3, 4, 6}), r.mutable_condition_latents());
  EXPECT_THAT(std::string(ValidateRequest(r, m).status().message()),
              HasSubstr("condition_latents.shape: expected [48, 1, 4, 6]"));
  // The same geometry as "t2v" takes no condition at all.
  m.set_kind("t2v");
  TensorToProto(worker::Tensor::Host({48, 1, 4, 6}), r.mutable_condition_latents());
  const absl::Status s = ValidateRequest(r, m).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("condition_latents: this model takes no condition"));
}

TEST(RequestValidation, TooManyTokens) {
  v1::GenerateRequest r;
  r.mutable_pixel_size()->set_frames(81);
  r.mutable_pixel_size()->set_height(1280);
  r.mutable_pixel_size()->set_width(1280);
  *r.mutable_prompt_embeds() = SeededEmbeds(0, 3, 32);
  const absl::Status s = ValidateRequest(r, WanLike()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("pixel_size: latent"));
}

v1::GenerateRequest SmallRequest() {
  v1::GenerateRequest r;
  r.set_model("wan");
  r.mutable_latent_shape()->set_frames(1);
  r.mutable_latent_shape()->set_height(4);
  r.mutable_latent_shape()->set_width(4);
  *r.mutable_prompt_embeds() = SeededEmbeds(0, 3, 32);
  return r;
}

v1::Tensor F32Tensor(std::vector<int64_t> shape, float fill) {
  v1::Tensor t;
  t.set_dtype(v1::DTYPE_F32);
  int64_t n = 1;
  for (int64_t d : shape) {
    t.add_shape(d);
    n *= d;
  }
  std::string data(static_cast<size_t>(n) * 4, '\0');
  for (int64_t i = 0; i < n; ++i) std::memcpy(data.data() + 4 * i, &fill, 4);
  t.set_data(std::move(data));
  return t;
}

void ExpectRefused(const v1::GenerateRequest& r, const std::string& field_prefix) {
  const absl::Status s = ValidateRequest(r, WanLike()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field_prefix << ": " << s;
  EXPECT_THAT(std::string(s.message()), ::testing::StartsWith(field_prefix + ":"))
      << "the message must start with the field name";
}

// Issue 14 defect 8: an extreme shift made a degenerate schedule that
// admission passed and the ranks refused after Accepted/Started.
TEST(RequestValidation, RefusesDegenerateScheduleUpFront) {
  for (v1::Scheduler sch : {v1::SCHEDULER_UNIPC, v1::SCHEDULER_EULER}) {
    v1::GenerateRequest r = SmallRequest();
    r.set_scheduler(sch);
    r.set_shift(1e-30f);
    ExpectRefused(r, "shift");
    r.set_shift(3.0f);
    EXPECT_TRUE(ValidateRequest(r, WanLike()).ok());
  }
}

// Issue 14 defect 7: finite but extreme inputs returned OK with NaN
// latents; magnitudes over 1e4 are refused up front, naming the field.
TEST(RequestValidation, RefusesExtremeInputMagnitudes) {
  v1::GenerateRequest r = SmallRequest();
  *r.mutable_prompt_embeds() = F32Tensor({3, 32}, 3.4e38f);
  ExpectRefused(r, "prompt_embeds.data");
  *r.mutable_prompt_embeds() = F32Tensor({3, 32}, -2e4f);
  ExpectRefused(r, "prompt_embeds.data");
  *r.mutable_prompt_embeds() = F32Tensor({3, 32}, 1e4f);  // the limit itself is fine
  EXPECT_TRUE(ValidateRequest(r, WanLike()).ok());

  r = SmallRequest();
  *r.mutable_negative_prompt_embeds() = F32Tensor({2, 32}, 1e30f);
  ExpectRefused(r, "negative_prompt_embeds.data");

  r = SmallRequest();
  *r.mutable_initial_latents() = F32Tensor({16, 1, 4, 4}, 3e38f);
  ExpectRefused(r, "initial_latents.data");
  *r.mutable_initial_latents() = F32Tensor({16, 1, 4, 4}, 2.5f);
  EXPECT_TRUE(ValidateRequest(r, WanLike()).ok());

  // bf16 inputs are decoded and held to the same limit (0x7f00 = 1.7e38).
  r = SmallRequest();
  v1::Tensor bf16;
  bf16.set_dtype(v1::DTYPE_BF16);
  bf16.add_shape(1);
  bf16.add_shape(32);
  std::string data(64, '\0');
  for (int i = 0; i < 32; ++i) {
    data[2 * i] = 0x00;
    data[2 * i + 1] = 0x7f;
  }
  bf16.set_data(data);
  *r.mutable_prompt_embeds() = bf16;
  ExpectRefused(r, "prompt_embeds.data");
}

TEST(RequestValidation, MessagesStartWithTheField) {
  v1::GenerateRequest r = SmallRequest();
  r.set_steps(0);
  ExpectRefused(r, "steps");
  r = SmallRequest();
  r.set_guidance_scale(101);
  ExpectRefused(r, "guidance_scale");
  r = SmallRequest();
  r.set_shift(-1);
  ExpectRefused(r, "shift");
  r = SmallRequest();
  r.mutable_latent_shape()->set_height(3);
  ExpectRefused(r, "latent_shape.height");
  r = SmallRequest();
  r.mutable_latent_shape()->set_channels(4);
  ExpectRefused(r, "latent_shape.channels");
  r = SmallRequest();
  r.mutable_pixel_size()->set_frames(2);
  r.mutable_pixel_size()->set_height(32);
  r.mutable_pixel_size()->set_width(32);
  ExpectRefused(r, "pixel_size.frames");
  r = SmallRequest();
  *r.mutable_initial_latents() = F32Tensor({16, 1, 4, 5}, 0);
  ExpectRefused(r, "initial_latents.shape");
  // A huge shape is not echoed whole.
  r = SmallRequest();
  v1::Tensor wide;
  wide.set_dtype(v1::DTYPE_F32);
  for (int i = 0; i < 20000; ++i) wide.add_shape(1);
  wide.set_data(std::string(4, '\0'));
  *r.mutable_prompt_embeds() = wide;
  const absl::Status s = ValidateRequest(r, WanLike()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_LT(s.message().size(), 300u) << s;
}

// The ranks' Job takes the request's tensors by move: the very bytes the
// client sent, counted, and none left in the public request.
TEST(RequestValidation, JobTakesTheTensorsWithoutACopy) {
  v1::GenerateRequest r = SmallRequest();
  *r.mutable_negative_prompt_embeds() = SeededEmbeds(1, 2, 32);
  *r.mutable_initial_latents() = F32Tensor({16, 1, 4, 4}, 0.5f);
  r.set_seed(99);
  const char* prompt = r.prompt_embeds().data().data();
  const char* latents = r.initial_latents().data().data();
  const int64_t bytes = static_cast<int64_t>(r.prompt_embeds().data().size() +
                                             r.negative_prompt_embeds().data().size() +
                                             r.initial_latents().data().size());
  absl::StatusOr<ResolvedRequest> ok = ValidateRequest(std::move(r), WanLike());
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->job.prompt_embeds().data().data(), prompt);
  EXPECT_EQ(ok->job.initial_latents().data().data(), latents);
  EXPECT_EQ(ok->tensor_bytes, bytes);
  EXPECT_FALSE(ok->request.has_prompt_embeds());
  EXPECT_FALSE(ok->request.has_negative_prompt_embeds());
  EXPECT_FALSE(ok->request.has_initial_latents());
  EXPECT_EQ(ok->job.seed(), 99u);
  EXPECT_EQ(ok->job.steps(), kDefaultSteps);
  EXPECT_EQ(ok->job.latent_shape().channels(), 16);
}

TEST(Protocol, FatalCodes) {
  EXPECT_TRUE(IsRequestLevelError(absl::StatusCode::kCancelled));
  EXPECT_TRUE(IsRequestLevelError(absl::StatusCode::kInvalidArgument));
  EXPECT_FALSE(IsRequestLevelError(absl::StatusCode::kInternal));
  EXPECT_FALSE(IsRequestLevelError(absl::StatusCode::kAborted));
  EXPECT_FALSE(IsRequestLevelError(absl::StatusCode::kUnavailable));
}

TEST(Metrics, BucketLayouts) {
  const auto& step = StepBuckets();
  EXPECT_DOUBLE_EQ(step.front(), 0.001);
  EXPECT_DOUBLE_EQ(step.back(), 60.0);
  EXPECT_TRUE(std::is_sorted(step.begin(), step.end()));
  const auto& a2a = AllToAllBuckets();
  EXPECT_DOUBLE_EQ(a2a.front(), 1e-5);
  EXPECT_DOUBLE_EQ(a2a.back(), 10.0);
  for (size_t i = 1; i < a2a.size(); ++i) EXPECT_GT(a2a[i], a2a[i - 1]);
}

TEST(MetricsScrape, ParsesAndEstimatesQuantiles) {
  const std::string text =
      "# HELP x_seconds a histogram\n"
      "# TYPE x_seconds histogram\n"
      "x_seconds_bucket{model=\"m\",le=\"0.1\"} 2\n"
      "x_seconds_bucket{model=\"m\",le=\"0.2\"} 6\n"
      "x_seconds_bucket{model=\"m\",le=\"+Inf\"} 8\n"
      "x_seconds_count{model=\"m\"} 8\n"
      "x_seconds_sum{model=\"m\"} 1.1\n"
      "y_total{code=\"OK\",model=\"m\"} 3\n"
      "y_total{code=\"CANCELLED\",model=\"m\"} 1\n";
  const auto samples = ParseMetricsText(text);
  EXPECT_EQ(SumSamples(samples, "y_total"), 4);
  EXPECT_EQ(SumSamples(samples, "y_total", {{"code", "OK"}}), 3);
  EXPECT_EQ(SumSamples(samples, "x_seconds_count", {{"model", "m"}}), 8);
  // Rank 4 of 8 lies half way through the (0.1, 0.2] bucket.
  EXPECT_NEAR(HistogramQuantile(samples, "x_seconds", 0.5), 0.15, 1e-12);
  EXPECT_TRUE(std::isnan(HistogramQuantile(samples, "nope", 0.5)));
}

}  // namespace
}  // namespace dn::server
