// worker::RequestRules (issue 14): the one set of request rules that the
// coordinator's admission and Engine::Validate both apply. Units of the type,
// then a real one-rank engine (tiny preset, Gloo group of one) showing that
// the engine refuses exactly what the rules refuse, and that latents which
// come out non-finite end the request with an error naming the likely input.
#include "worker/request_rules.h"

#include <stdlib.h>

#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/process_group.h"
#include "comm/store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/backend.h"
#include "worker/checkpoint.h"
#include "worker/cpu/cpu_backend.h"
#include "worker/engine.h"
#include "worker/noise.h"
#include "worker/sampler.h"
#include "worker/wan_config.h"

namespace dn::worker {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

ModelGeometry WanGeometry(int64_t max_tokens = 80000) {
  ModelGeometry g;
  g.in_channels = 16;
  g.text_dim = 32;
  g.vae_stride = {4, 8, 8};
  g.patch_size = {1, 2, 2};
  g.max_tokens = max_tokens;
  g.max_axis_tokens = 1024;
  return g;
}

void ExpectField(const absl::Status& s, const std::string& field) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field << ": " << s;
  EXPECT_THAT(std::string(s.message()), StartsWith(field + ":"));
}

TEST(RequestRules, PixelsToLatentLikeWan) {
  const RequestRules rules(WanGeometry());
  absl::StatusOr<LatentShape> l = rules.LatentFromPixels({81, 480, 832});
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_EQ(l->channels, 16);
  EXPECT_EQ(l->frames, 21);
  EXPECT_EQ(l->height, 60);
  EXPECT_EQ(l->width, 104);
  EXPECT_EQ(rules.Tokens(*l), 32760);
  ExpectField(rules.LatentFromPixels({80, 480, 832}).status(), "pixel_size.frames");
  ExpectField(rules.LatentFromPixels({81, 470, 832}).status(), "pixel_size.height");
  ExpectField(rules.LatentFromPixels({81, 480, 0}).status(), "pixel_size.width");
  // 472 is a multiple of the stride 8 but gives an odd latent height: the
  // patch check names the pixel field.
  l = rules.LatentFromPixels({81, 472, 832});
  ASSERT_TRUE(l.ok());
  ExpectField(rules.CheckLatent(*l, SizeField::kPixelSize).status(), "pixel_size.height");
}

TEST(RequestRules, LatentLimits) {
  const RequestRules rules(WanGeometry(1000));
  absl::StatusOr<LatentShape> l = rules.CheckLatent({0, 1, 8, 8}, SizeField::kLatentShape);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->channels, 16);  // 0: the model's
  ExpectField(rules.CheckLatent({4, 1, 8, 8}, SizeField::kLatentShape).status(),
              "latent_shape.channels");
  ExpectField(rules.CheckLatent({0, 1, 7, 8}, SizeField::kLatentShape).status(),
              "latent_shape.height");
  ExpectField(rules.CheckLatent({0, 1, 8, 4096}, SizeField::kLatentShape).status(),
              "latent_shape.width");  // 2048 tokens on the axis > 1024
  ExpectField(rules.CheckLatent({0, 21, 60, 104}, SizeField::kLatentShape).status(),
              "latent_shape");  // 32760 tokens > 1000
  // Three factors near 2^31 saturate instead of overflowing.
  const int big = std::numeric_limits<int>::max() - 1;
  EXPECT_EQ(rules.Tokens({16, big, big, big}), std::numeric_limits<int64_t>::max());
}

TEST(RequestRules, SamplingDefaultsAndLimits) {
  const RequestRules rules(WanGeometry());
  absl::StatusOr<Sampling> s = rules.ResolveSampling(std::nullopt, 0, 0, SchedulerKind::kUniPC);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->steps, kDefaultSteps);
  EXPECT_EQ(s->guidance, kDefaultGuidance);
  EXPECT_EQ(s->shift, kDefaultShift);
  ExpectField(rules.ResolveSampling(0, 0, 0, SchedulerKind::kUniPC).status(), "steps");
  ExpectField(rules.ResolveSampling(kMaxSteps + 1, 0, 0, SchedulerKind::kEuler).status(), "steps");
  ExpectField(rules.ResolveSampling(10, -1, 0, SchedulerKind::kEuler).status(), "guidance_scale");
  ExpectField(rules.ResolveSampling(10, NAN, 0, SchedulerKind::kEuler).status(), "guidance_scale");
  ExpectField(rules.ResolveSampling(10, 5, -2, SchedulerKind::kEuler).status(), "shift");
  ExpectField(rules.ResolveSampling(10, 5, 1001, SchedulerKind::kEuler).status(), "shift");
}

// Defect 8's root: extreme shifts make degenerate schedules. The rules build
// the schedule the sampler will run and refuse it naming "shift"; whatever
// they accept gives a finite, decreasing schedule.
TEST(RequestRules, DegenerateSchedulesAreRefusedNamingShift) {
  const RequestRules rules(WanGeometry());
  for (SchedulerKind k : {SchedulerKind::kUniPC, SchedulerKind::kEuler}) {
    const absl::Status s = rules.CheckSampling({50, 5, 1e-30, k});
    ExpectField(s, "shift");
    EXPECT_THAT(std::string(s.message()), HasSubstr("degenerate schedule"));
  }
  for (SchedulerKind k : {SchedulerKind::kUniPC, SchedulerKind::kEuler}) {
    for (int steps : {1, 2, 50, 1000}) {
      for (double shift = 1e-30; shift <= kMaxShift; shift *= 7.3) {
        if (!rules.CheckSampling({steps, 5, shift, k}).ok()) continue;
        auto sampler = Sampler::Create(k, steps, shift);
        ASSERT_TRUE(sampler.ok()) << SchedulerName(k) << " " << steps << " " << shift;
        const std::vector<double>& sig = (*sampler)->sigmas();
        for (size_t i = 0; i + 1 < sig.size(); ++i) {
          ASSERT_TRUE(std::isfinite(sig[i]) && sig[i] > 0 && sig[i] <= 1)
              << SchedulerName(k) << " steps " << steps << " shift " << shift;
          if (i > 0) ASSERT_LE(sig[i], sig[i - 1]);
        }
      }
    }
  }
}

TEST(RequestRules, TensorShapesAndValues) {
  const RequestRules rules(WanGeometry());
  absl::StatusOr<int64_t> t = rules.CheckEmbedsShape("prompt_embeds", {7, 32});
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(*t, 7);
  EXPECT_EQ(*rules.CheckEmbedsShape("prompt_embeds", {1, 5, 32}), 5);
  ExpectField(rules.CheckEmbedsShape("prompt_embeds", {7, 31}).status(), "prompt_embeds.shape");
  ExpectField(rules.CheckEmbedsShape("negative_prompt_embeds", {kMaxTextTokens + 1, 32}).status(),
              "negative_prompt_embeds.shape");
  Shape wide(20000, 1);
  const absl::Status w = rules.CheckEmbedsShape("prompt_embeds", wide).status();
  ExpectField(w, "prompt_embeds.shape");
  EXPECT_LT(w.message().size(), 200u) << "a 20000-dim shape is not echoed whole";
  ExpectField(rules.CheckLatentsShape("initial_latents", {16, 1, 4, 5}, {16, 1, 4, 4}),
              "initial_latents.shape");

  const std::vector<float> ok = {0, -1e4f, 1e4f, 3.5f};
  EXPECT_TRUE(RequestRules::CheckValues("prompt_embeds", ok.data(), 4).ok());
  for (float bad : {3.4e38f, -2e4f, INFINITY, NAN}) {
    const std::vector<float> v = {1, bad};
    const absl::Status s = RequestRules::CheckValues("initial_latents", v.data(), 2);
    ExpectField(s, "initial_latents.data");
    EXPECT_THAT(std::string(s.message()), HasSubstr("element 1"));
  }
}

// --- the engine applies the same rules ---------------------------------------

struct OneRank {
  std::string dir;
  std::unique_ptr<comm::Store> store;
  std::unique_ptr<comm::ProcessGroup> data, control;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<WeightSource> weights;
  std::unique_ptr<Engine> engine;
};

// Preset weights read through ReadF32 (no on-device random init), with
// proj_out.weight overwritten by `proj_out_value` when non-zero: a checkpoint
// whose output projection overflows.
class OverflowingWeights : public WeightSource {
 public:
  OverflowingWeights(std::unique_ptr<WeightSource> inner, float proj_out_value)
      : inner_(std::move(inner)), value_(proj_out_value) {}
  const WanConfig& config() const override { return inner_->config(); }
  std::string description() const override { return "overflowing " + inner_->description(); }
  absl::Status ReadF32(const std::string& name, float* dst) const override {
    if (absl::Status s = inner_->ReadF32(name, dst); !s.ok()) return s;
    if (value_ != 0 && name == "proj_out.weight") {
      const WanConfig& c = config();
      const int64_t n = int64_t{c.out_channels} * c.patch_size[0] * c.patch_size[1] *
                        c.patch_size[2] * c.inner_dim();
      for (int64_t i = 0; i < n; ++i) dst[i] = value_;
    }
    return absl::OkStatus();
  }

 private:
  std::unique_ptr<WeightSource> inner_;
  float value_;
};

// The CPU backend, but with no fp8 attention over fewer than `min_seq` keys
// (cuDNN's fp8 SDPA has no engine for very short sequences); counts the fp8
// calls it runs.
class CpuBackendWithoutShortFp8 : public CpuBackend {
 public:
  explicit CpuBackendWithoutShortFp8(int64_t min_seq) : CpuBackend(1), min_seq_(min_seq) {}
  absl::Status AttentionFp8(const Tensor& q, const Tensor& k, const Tensor& v,
                            int64_t kv_len, float scale, Tensor* o) override {
    if (kv_len < min_seq_)
      return absl::UnimplementedError(
          absl::StrCat("no fp8 attention engine for kv_len=", kv_len));
    ++fp8_calls;
    return CpuBackend::AttentionFp8(q, k, v, kv_len, scale, o);
  }
  int fp8_calls = 0;

 private:
  int64_t min_seq_;
};

OneRank MakeEngine(int64_t max_tokens, float proj_out_value = 0,
                   std::unique_ptr<Backend> backend = nullptr) {
  OneRank r;
  char tmpl[] = "/tmp/dn_rules_test_XXXXXX";
  r.dir = mkdtemp(tmpl);
  r.store = comm::MakeFileStore(r.dir).value();
  comm::GlooOptions o;
  o.prefix = "data";
  r.data = comm::MakeGlooProcessGroup(*r.store, o).value();
  o.prefix = "ctl";
  r.control = comm::MakeGlooProcessGroup(*r.store, o).value();
  BackendOptions bo;
  bo.threads = 1;
  r.backend = backend != nullptr ? std::move(backend) : MakeBackend(bo).value();
  const WanConfig c = PresetConfig("tiny").value();
  r.weights = std::make_unique<OverflowingWeights>(MakePresetWeights(c, 0).value(),
                                                   proj_out_value);
  EngineOptions eo;
  eo.max_tokens = max_tokens;
  r.engine = Engine::Create(*r.weights, *r.backend, *r.data, *r.control, eo).value();
  return r;
}

GenerateParams SmallParams(const WanConfig& c) {
  GenerateParams p;
  p.latent = {c.in_channels, 1, 4, 4};
  p.steps = 2;
  p.prompt_embeds = Tensor::Host({3, c.text_dim});
  FillNormal(1, kEmbedStream, 0, 0.0f, 1.0f, p.prompt_embeds.data_as<float>(),
             static_cast<size_t>(p.prompt_embeds.numel()));
  return p;
}

// By construction: for every sampling setting the rules accept, the engine
// accepts the request, and for every one they refuse, the engine refuses it
// with the same message (the coordinator's adapter calls the same rules).
// The issue-15 inputs under the same rules: Wan2.1 I2V (36 input channels =
// 16 of state + 20 of condition, CLIP tokens of width 1280), two experts
// (guidance_scale_2, LoRA experts), and the refusals a t2v model gives.
ModelGeometry I2vGeometry() {
  ModelGeometry g = WanGeometry();
  g.in_channels = 36;
  g.out_channels = 16;
  g.image_dim = 1280;
  return g;
}

TEST(RequestRules, ConditioningInputsOfI2vAndT2v) {
  const RequestRules i2v(I2vGeometry()), t2v(WanGeometry());
  const LatentShape l = *i2v.CheckLatent({0, 3, 8, 12}, SizeField::kLatentShape);
  EXPECT_EQ(l.channels, 36);
  // Required on I2V, refused on t2v, each naming its field.
  ExpectField(i2v.CheckConditioningPresent(false, true), "image_embeds");
  ExpectField(i2v.CheckConditioningPresent(true, false), "condition_latents");
  EXPECT_TRUE(i2v.CheckConditioningPresent(true, true).ok());
  EXPECT_TRUE(t2v.CheckConditioningPresent(false, false).ok());
  ExpectField(t2v.CheckImageEmbedsShape("image_embeds", {257, 1280}).status(), "image_embeds");
  ExpectField(t2v.CheckConditionShape("condition_latents", {20, 3, 8, 12}, l),
              "condition_latents");
  // Shapes.
  EXPECT_EQ(*i2v.CheckImageEmbedsShape("image_embeds", {257, 1280}), 257);
  EXPECT_EQ(*i2v.CheckImageEmbedsShape("image_embeds", {1, 257, 1280}), 257);
  for (const Shape& bad : {Shape{257, 1024}, Shape{0, 1280}, Shape{2, 257, 1280},
                           Shape{kMaxImageTokens + 1, 1280}, Shape{1280}})
    ExpectField(i2v.CheckImageEmbedsShape("image_embeds", bad).status(), "image_embeds.shape");
  EXPECT_TRUE(i2v.CheckConditionShape("condition_latents", {20, 3, 8, 12}, l).ok());
  ExpectField(i2v.CheckConditionShape("condition_latents", {36, 3, 8, 12}, l),
              "condition_latents.shape");
  // The sampler state (initial_latents) has out_channels, not in_channels.
  EXPECT_TRUE(i2v.CheckLatentsShape("initial_latents", {16, 3, 8, 12}, l).ok());
  ExpectField(i2v.CheckLatentsShape("initial_latents", {36, 3, 8, 12}, l),
              "initial_latents.shape");
}

// Wan2.2 TI2V: condition_latents is optional and is frame 0's image latent
// [out_channels, 1, H, W] (docs/MODELS.md §5).
TEST(RequestRules, FirstFrameConditionOfTi2v) {
  ModelGeometry g = WanGeometry();
  g.in_channels = 48;
  g.out_channels = 48;
  g.vae_stride = {4, 16, 16};
  g.first_frame_condition = true;
  const RequestRules ti2v(g);
  const LatentShape l = *ti2v.CheckLatent({0, 3, 8, 12}, SizeField::kLatentShape);
  EXPECT_EQ(l.channels, 48);
  EXPECT_TRUE(ti2v.CheckConditioningPresent(false, false).ok());  // text-only
  EXPECT_TRUE(ti2v.CheckConditioningPresent(false, true).ok());
  EXPECT_TRUE(ti2v.CheckConditionShape("condition_latents", {48, 1, 8, 12}, l).ok());
  for (const Shape& bad : {Shape{48, 3, 8, 12}, Shape{16, 1, 8, 12}, Shape{48, 1, 8, 6},
                           Shape{48, 1, 12, 8}, Shape{48, 8, 12}})
    ExpectField(ti2v.CheckConditionShape("condition_latents", bad, l), "condition_latents.shape");
  // Without the flag the same geometry (48 = 48) takes no condition.
  g.first_frame_condition = false;
  ExpectField(RequestRules(g).CheckConditionShape("condition_latents", {48, 1, 8, 12}, l),
              "condition_latents");
}

TEST(RequestRules, TwoExpertsAndLora) {
  ModelGeometry two = WanGeometry();
  two.experts = 2;
  const RequestRules a14b(two), one(WanGeometry());
  EXPECT_TRUE(a14b.CheckGuidance2(3.0).ok());
  ExpectField(a14b.CheckGuidance2(std::nan("")), "guidance_scale_2");
  ExpectField(a14b.CheckGuidance2(kMaxGuidance + 1), "guidance_scale_2");
  ExpectField(one.CheckGuidance2(3.0), "guidance_scale_2");
  EXPECT_TRUE(a14b.CheckLoraCount(kMaxLorasPerRequest).ok());
  ExpectField(a14b.CheckLoraCount(kMaxLorasPerRequest + 1), "lora");
  EXPECT_TRUE(a14b.CheckLora(0, "style", 0.8, 2).ok());
  EXPECT_TRUE(one.CheckLora(0, "style", -1.0, 0).ok());
  ExpectField(one.CheckLora(3, "style", 1.0, 1), "lora[3].expert");
  ExpectField(a14b.CheckLora(0, "style", 1.0, 3), "lora[0].expert");
  ExpectField(a14b.CheckLora(0, "style", 1.0, -1), "lora[0].expert");
  for (const std::string& name : {std::string(), std::string("a/b"), std::string(".."),
                                  std::string("."), std::string("a\0b", 3),
                                  std::string(kMaxLoraNameLength + 1, 'x')})
    ExpectField(a14b.CheckLora(1, name, 1.0, 0), "lora[1].name");
  ExpectField(a14b.CheckLora(1, "style", kMaxLoraScale * 2, 0), "lora[1].scale");
  ExpectField(a14b.CheckLora(1, "style", std::numeric_limits<double>::infinity(), 0),
              "lora[1].scale");
}

TEST(RequestRules, AccelerationCacheThreshold) {
  for (double t : {0.0, 1e-30, 0.05, 0.2, kMaxCacheThreshold}) {
    Acceleration a;
    a.cache_threshold = t;
    EXPECT_TRUE(RequestRules::CheckAcceleration(a).ok()) << t;
    a.attention_fp8 = true;
    EXPECT_TRUE(RequestRules::CheckAcceleration(a).ok()) << t;
  }
  for (double t : {-1e-9, -1.0, kMaxCacheThreshold + 1e-9, 2.0, std::nan(""),
                   std::numeric_limits<double>::infinity(),
                   -std::numeric_limits<double>::infinity()}) {
    Acceleration a;
    a.cache_threshold = t;
    ExpectField(RequestRules::CheckAcceleration(a), "acceleration.cache_threshold");
  }
}

// The engine applies the same acceleration rule before any step.
TEST(RequestRulesEngine, EngineRefusesBadCacheThresholdsNamingTheField) {
  OneRank r = MakeEngine(64);
  GenerateParams p = SmallParams(r.engine->config());
  for (double t : {-0.5, 1.5, std::nan("")}) {
    p.acceleration.cache_threshold = t;
    ExpectField(r.engine->Validate(p), "acceleration.cache_threshold");
    ExpectField(r.engine->Generate(p, nullptr, nullptr).status(),
                "acceleration.cache_threshold");
  }
  p.acceleration.cache_threshold = 0.1;
  EXPECT_TRUE(r.engine->Validate(p).ok());
}

TEST(RequestRulesEngine, EngineRefusesExactlyWhatTheRulesRefuse) {
  OneRank r = MakeEngine(64);
  const RequestRules rules(GeometryOf(r.engine->config(), 64));
  GenerateParams p = SmallParams(r.engine->config());
  int accepted = 0, refused = 0;
  for (SchedulerKind k : {SchedulerKind::kUniPC, SchedulerKind::kEuler}) {
    for (int steps : {-1, 0, 1, 3, 1000, 1001}) {
      for (double shift : {-1.0, 1e-30, 1e-12, 1e-3, 0.5, 1.0, 3.0, 999.0, 1000.0, 1e4}) {
        for (double guidance : {-1.0, 0.0, 1.0, 5.0, 100.0, 101.0}) {
          p.scheduler = k;
          p.steps = steps;
          p.shift = shift;
          p.guidance = guidance;
          const absl::Status want = rules.CheckSampling({steps, guidance, shift, k});
          const absl::Status got = r.engine->Validate(p);
          ASSERT_EQ(got, want) << SchedulerName(k) << " steps " << steps << " shift "
                               << shift << " guidance " << guidance;
          (want.ok() ? accepted : refused)++;
        }
      }
    }
  }
  EXPECT_GT(accepted, 50);
  EXPECT_GT(refused, 50);
  p = SmallParams(r.engine->config());
  p.latent.frames = 5;  // 5 x 2 x 2 = 20 tokens; 16 x 2 x 2 = 64 is the limit
  EXPECT_TRUE(r.engine->Validate(p).ok());
  p.latent.frames = 17;
  ExpectField(r.engine->Validate(p), "latent_shape");
}

// Defect 8 at the ranks: the shift is refused by Validate, naming the field,
// before any step (it used to fail inside Sampler::Create with "unipc: ...").
TEST(RequestRulesEngine, ExtremeShiftRefusedNamingTheField) {
  OneRank r = MakeEngine(80000);
  GenerateParams p = SmallParams(r.engine->config());
  p.shift = 1e-30;
  for (SchedulerKind k : {SchedulerKind::kUniPC, SchedulerKind::kEuler}) {
    p.scheduler = k;
    ExpectField(r.engine->Validate(p), "shift");
    ExpectField(r.engine->Generate(p, nullptr, nullptr).status(), "shift");
  }
}

// Defect 7 at the ranks: extreme inputs are refused naming the field, and
// latents that still come out non-finite (here: a checkpoint whose output
// projection overflows) end the request with INVALID_ARGUMENT naming the
// likely input, instead of OK with NaN latents. The engine stays usable.
TEST(RequestRulesEngine, ExtremeInputsAndNonFiniteOutput) {
  {
    OneRank r = MakeEngine(80000);
    GenerateParams p = SmallParams(r.engine->config());
    p.prompt_embeds.data_as<float>()[5] = 3.4e38f;
    ExpectField(r.engine->Validate(p), "prompt_embeds.data");
    p = SmallParams(r.engine->config());
    p.initial_latents = Tensor::Host({p.latent.channels, 1, 4, 4});
    p.initial_latents.data_as<float>()[0] = 3e38f;
    ExpectField(r.engine->Generate(p, nullptr, nullptr).status(), "initial_latents.data");
    p.initial_latents.data_as<float>()[0] = 0.5f;
    absl::StatusOr<Tensor> fine = r.engine->Generate(p, nullptr, nullptr);
    ASSERT_TRUE(fine.ok()) << fine.status();
    for (int64_t i = 0; i < fine->numel(); ++i)
      ASSERT_TRUE(std::isfinite(fine->data_as<float>()[i]));
  }
  OneRank r = MakeEngine(80000, 3e38f);
  GenerateParams p = SmallParams(r.engine->config());
  p.scheduler = SchedulerKind::kEuler;
  ASSERT_TRUE(r.engine->Validate(p).ok());
  const absl::Status s = r.engine->Generate(p, nullptr, nullptr).status();
  ExpectField(s, "prompt_embeds");
  EXPECT_THAT(std::string(s.message()), HasSubstr("not finite"));
  EXPECT_FALSE(r.engine->broken());
  // The engine still runs the next request (which fails the same way: the
  // weights overflow whatever the input).
  EXPECT_EQ(r.engine->Generate(p, nullptr, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// The fp8 tier on a backend that has fp8 attention, but not at every shape:
// the engine probes the request's own self-attention shape in Setup (not a
// token or two: the defect found on the H100, where that refused every fp8
// request), so a shape the backend has runs, and one it lacks is refused
// with FAILED_PRECONDITION naming the field, before any step, leaving the
// engine ready for the next request.
TEST(RequestRulesEngine, Fp8IsProbedAtTheRequestsOwnShape) {
  auto owned = std::make_unique<CpuBackendWithoutShortFp8>(8);
  CpuBackendWithoutShortFp8* backend = owned.get();
  OneRank r = MakeEngine(80000, 0, std::move(owned));
  GenerateParams p = SmallParams(r.engine->config());
  p.latent.frames = 5;  // 5 x 2 x 2 = 20 tokens: the backend has fp8 here
  absl::StatusOr<Tensor> exact = r.engine->Generate(p, nullptr, nullptr);
  ASSERT_TRUE(exact.ok()) << exact.status();
  EXPECT_EQ(backend->fp8_calls, 0);
  p.acceleration.attention_fp8 = true;
  absl::StatusOr<Tensor> fp8 = r.engine->Generate(p, nullptr, nullptr);
  ASSERT_TRUE(fp8.ok()) << fp8.status();
  EXPECT_GT(backend->fp8_calls, 0);
  // 1 x 2 x 2 = 4 tokens: no fp8 engine; refused before any step.
  p.latent.frames = 1;
  int steps_seen = 0;
  const absl::Status refused =
      r.engine->Generate(p, [&](const StepStats&) { ++steps_seen; }, nullptr).status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition) << refused;
  EXPECT_THAT(std::string(refused.message()), StartsWith("acceleration.attention_fp8: "));
  EXPECT_THAT(std::string(refused.message()), HasSubstr("kv_len=4"));
  EXPECT_EQ(steps_seen, 0);
  EXPECT_FALSE(r.engine->broken());
  // The same shape exactly, then fp8 at 20 tokens again: both run.
  p.acceleration.attention_fp8 = false;
  EXPECT_TRUE(r.engine->Generate(p, nullptr, nullptr).ok());
  p.latent.frames = 5;
  p.acceleration.attention_fp8 = true;
  absl::StatusOr<Tensor> again = r.engine->Generate(p, nullptr, nullptr);
  ASSERT_TRUE(again.ok()) << again.status();
  ASSERT_EQ(again->numel(), fp8->numel());
  for (int64_t i = 0; i < again->numel(); ++i)
    ASSERT_EQ(again->data_as<float>()[i], fp8->data_as<float>()[i]) << i;
}

}  // namespace
}  // namespace dn::worker
