// Where the demo finds its model (server/demo_model.h), and the service's
// view of a pixel-space model: ListModels' fields (IsPixelSpaceRgb), pixel
// size -> latent shape with vae_stride 1, validation of the demo's request.
#include "server/demo_model.h"

#include <stdlib.h>

#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/client.h"
#include "server/request_validation.h"
#include "tests/server/service_test_util.h"
#include "worker/prompt_table.h"

namespace dn::server {
namespace {

namespace v1 = ::denoised::v1;
using ::testing::HasSubstr;

void Touch(const std::string& path) { std::ofstream(path) << "{}"; }

// Sets an environment variable for the scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    if (const char* old = std::getenv(name)) {
      old_ = old;
      had_ = true;
    }
    setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() {
    if (had_) {
      setenv(name_, old_.c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }

 private:
  const char* name_;
  std::string old_;
  bool had_ = false;
};

TEST(DemoModelTest, FlagAndEnvironmentMustNameACompleteModel) {
  testing::TempDir dir;
  const std::string m = dir.path() + "/model";
  ASSERT_EQ(system(("mkdir -p '" + m + "'").c_str()), 0);
  absl::StatusOr<DemoModelSearch> s = FindDemoModel(m);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("--model"));
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("config.json"));
  Touch(m + "/config.json");
  s = FindDemoModel(m);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("prompts.safetensors"));
  Touch(m + "/prompts.safetensors");
  s = FindDemoModel(m);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->dir, m);
  EXPECT_EQ(s->source, "--model");

  {
    ScopedEnv env(kDemoModelEnv, m);
    s = FindDemoModel("");
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ(s->dir, m);
    EXPECT_EQ(s->source, "$DENOISED_DEMO_MODEL");
  }
  {
    ScopedEnv env(kDemoModelEnv, dir.path() + "/missing");
    s = FindDemoModel("");
    ASSERT_FALSE(s.ok());
    EXPECT_THAT(std::string(s.status().message()), HasSubstr("$DENOISED_DEMO_MODEL"));
    EXPECT_THAT(std::string(s.status().message()), HasSubstr("missing"));
  }
}

TEST(DemoModelTest, DefaultSearchEndsInTheSourceTree) {
  unsetenv(kDemoModelEnv);
  absl::StatusOr<DemoModelSearch> s = FindDemoModel("");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_THAT(SourceDemoModelDir(), HasSubstr("tools/demo_model"));
  if (s->dir.empty()) {
    // No trained model yet: both default places were looked at.
    ASSERT_EQ(s->looked.size(), 2u);
    EXPECT_THAT(s->looked[0], HasSubstr("share/denoised/demo_model"));
    EXPECT_THAT(s->looked[1], HasSubstr(SourceDemoModelDir()));
  } else {
    EXPECT_EQ(s->dir, SourceDemoModelDir());
  }
}

v1::ModelInfo DemoModelInfo() {
  v1::ModelInfo m;
  m.set_name("denoised-demo");
  m.set_in_channels(3);
  m.set_out_channels(3);
  m.set_text_dim(64);
  m.set_num_heads(4);
  m.set_head_dim(32);
  for (int v : {1, 1, 1}) m.add_vae_stride(v);
  for (int v : {1, 2, 2}) m.add_patch_size(v);
  m.set_max_tokens(80000);
  return m;
}

TEST(DemoModelTest, PixelSpaceModelsAreRecognisedAndValidated) {
  v1::ModelInfo demo = DemoModelInfo();
  EXPECT_TRUE(IsPixelSpaceRgb(demo));
  v1::ModelInfo wan = demo;
  wan.clear_vae_stride();
  for (int v : {4, 8, 8}) wan.add_vae_stride(v);
  wan.set_in_channels(16);
  wan.set_out_channels(16);
  EXPECT_FALSE(IsPixelSpaceRgb(wan));
  v1::ModelInfo grey = demo;
  grey.set_out_channels(1);
  EXPECT_FALSE(IsPixelSpaceRgb(grey));

  v1::PixelSize px;
  px.set_frames(8);
  px.set_height(32);
  px.set_width(32);
  absl::StatusOr<v1::LatentShape> l = ResolvePixelSize(px, demo);
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_EQ(l->channels(), 3);
  EXPECT_EQ(l->frames(), 8);  // a Wan VAE would need 1 + 4k frames
  EXPECT_EQ(l->height(), 32);
  EXPECT_EQ(l->width(), 32);
  EXPECT_FALSE(ResolvePixelSize(px, wan).ok());

  // The demo's request: prompt embeddings [4, 64] from a prompt table.
  absl::StatusOr<worker::PromptTable> table = worker::PromptTable::Random(
      worker::DemoStandInVocabulary(), 4, 64, 1, worker::kDemoGrammar);
  ASSERT_TRUE(table.ok());
  v1::GenerateRequest req;
  req.set_model("denoised-demo");
  *req.mutable_pixel_size() = px;
  req.set_steps(16);
  req.set_guidance_scale(5);
  *req.mutable_prompt_embeds() = *EmbedPrompt(*table, "red square moving left");
  *req.mutable_negative_prompt_embeds() = *EmbedPrompt(*table, "");
  absl::StatusOr<ResolvedRequest> r = ValidateRequest(req, demo);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(PartialPromptNote(*table, "red square moving left"), "");
  EXPECT_EQ(PartialPromptNote(*table, ""), "");
  EXPECT_THAT(PartialPromptNote(*table, "red square"),
              HasSubstr("has 2 of the 4 words of \"<colour> <shape> moving <direction>\""));
  EXPECT_EQ(r->tokens, 8 * 16 * 16);
  EXPECT_EQ(r->text_len, 4);
  // Odd pixel sizes do not patch (1x2x2).
  req.mutable_pixel_size()->set_width(31);
  absl::StatusOr<ResolvedRequest> bad = ValidateRequest(req, demo);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("pixel_size.width"));
}

}  // namespace
}  // namespace dn::server
