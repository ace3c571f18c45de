// `denoised generate --prompt ... --gif ... --png ...` against a real
// coordinator and worker groups on loopback: a pixel-space group (preset
// demo-pixel, random weights, tiny sizes so it is quick) and a Wan-latent
// group (preset tiny), whose latents are not a picture.
#include <gif_lib.h>
#include <png.h>
#include <sys/wait.h>

#include <memory>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "base/process.h"
#include "tests/server/service_test_util.h"
#include "worker/prompt_table.h"
#include "worker/safetensors.h"

namespace dn::server::testing {
namespace {

namespace v1 = ::denoised::v1;
using ::testing::HasSubstr;

TEST(GenerateImagesTest, PromptToGifAndPngAndTheErrors) {
  TempDir dir;
  absl::StatusOr<std::unique_ptr<CoordinatorProc>> coord = StartCoordinator(dir.path());
  ASSERT_TRUE(coord.ok()) << coord.status();
  const std::string target = (*coord)->target;
  Proc pixel({"worker", "--coordinator", target, "--preset", "demo-pixel",
              "--ranks", "1", "--backend", "cpu", "--name", "pixel",
              "--threads", "1", "--metrics-listen", "127.0.0.1:0",
              "--warmup-latent", "1x4x4"},
             dir.path() + "/pixel.log");
  Proc tiny = StartTinyGroup(target, "tiny", 1, dir.path() + "/tiny.log");
  DenoiserClient client(target);
  ASSERT_TRUE(WaitGroups(client, {"pixel", "tiny"}, v1::GROUP_STATE_READY,
                         std::chrono::seconds(120))
                  .ok())
      << ReadFile(dir.path() + "/pixel.log");

  const std::string table = dir.path() + "/prompts.safetensors";
  ASSERT_TRUE(worker::PromptTable::Random(worker::DemoStandInVocabulary(), 4, 64, 3,
                                          worker::kDemoGrammar)
                  ->Save(table)
                  .ok());
  const std::vector<std::string> base = {
      "generate", "--target", target, "--model", "demo-pixel", "--frames", "3",
      "--height", "8", "--width", "6", "--steps", "2", "--prompt-table", table,
      "--progress=false"};
  auto with = [&](std::vector<std::string> extra) {
    std::vector<std::string> a = base;
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  };
  const std::string log = dir.path() + "/generate.log";
  const std::string gif = dir.path() + "/x.gif", png = dir.path() + "/x.png";

  // A prompt -> GIF + PNG (+ the latents).
  ASSERT_EQ(RunDenoised(with({"--prompt", "Green Triangle moving UP", "--gif", gif,
                              "--png", png, "--image-scale", "3", "--out",
                              dir.path() + "/x.safetensors"}),
                        log),
            0)
      << ReadFile(log);
  EXPECT_THAT(ReadFile(log), HasSubstr(gif));
  int err = 0;
  GifFileType* g = DGifOpenFileName(gif.c_str(), &err);
  ASSERT_NE(g, nullptr) << GifErrorString(err);
  ASSERT_EQ(DGifSlurp(g), GIF_OK);
  EXPECT_EQ(g->ImageCount, 3);
  EXPECT_EQ(g->SWidth, 18);
  EXPECT_EQ(g->SHeight, 24);
  DGifCloseFile(g, &err);
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  ASSERT_TRUE(png_image_begin_read_from_file(&image, png.c_str())) << image.message;
  EXPECT_EQ(image.width, 3u * 18 + 2 * 2);
  EXPECT_EQ(image.height, 24u);
  png_image_free(&image);
  auto file = worker::SafetensorsFile::Open(dir.path() + "/x.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->header().metadata.at("prompt"), "Green Triangle moving UP");

  // An unknown word: exit 2, the vocabulary listed, nothing sent.
  EXPECT_EQ(RunDenoised(with({"--prompt", "purple square", "--gif", gif}), log), 2);
  EXPECT_THAT(ReadFile(log), HasSubstr("unknown word 'purple'"));
  EXPECT_THAT(ReadFile(log), HasSubstr("red green blue yellow white square"));
  // Too many words.
  EXPECT_EQ(RunDenoised(with({"--prompt", "red square moving left now", "--gif", gif}), log), 2);
  EXPECT_THAT(ReadFile(log), HasSubstr("at most 4"));

  // Images of a latent-space model are refused before anything runs.
  EXPECT_EQ(RunDenoised({"generate", "--target", target, "--model", "tiny",
                         "--frames", "5", "--height", "32", "--width", "32",
                         "--steps", "1", "--gif", gif},
                        log),
            1);
  EXPECT_THAT(ReadFile(log), HasSubstr("not a pixel-space RGB model"));
  EXPECT_THAT(ReadFile(log), HasSubstr("vae_stride [4, 8, 8]"));
}

}  // namespace
}  // namespace dn::server::testing
