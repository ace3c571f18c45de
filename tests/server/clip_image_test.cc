// The demo's client-side output (server/clip_image.h), read back with
// giflib's and libpng's own decoders, and the clip analyser of the demo's
// end-to-end test (server/clip_analyser.h) on clips drawn here.
#include "server/clip_image.h"

#include <gif_lib.h>
#include <png.h>
#include <sys/stat.h>

#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/clip_analyser.h"
#include "tests/server/service_test_util.h"

namespace dn::server {
namespace {

using ::testing::HasSubstr;

// --- drawing -----------------------------------------------------------------

struct Rgb {
  uint8_t r, g, b;
};

const std::vector<std::pair<std::string, Rgb>>& Colours() {
  static const auto* c = new std::vector<std::pair<std::string, Rgb>>{
      {"red", {255, 0, 0}},
      {"green", {0, 255, 0}},
      {"blue", {0, 0, 255}},
      {"yellow", {255, 255, 0}},
      {"white", {255, 255, 255}}};
  return *c;
}

// Whether pixel (x, y) is inside `shape` of side `size` whose top-left
// corner is at (x0, y0) (fractional: the shape moves by sub-pixels too).
bool Inside(const std::string& shape, double x0, double y0, int size, int x,
            int y) {
  const double px = x + 0.5 - x0, py = y + 0.5 - y0;  // pixel centre
  if (px < 0 || py < 0 || px > size || py > size) return false;
  if (shape == "square") return true;
  if (shape == "circle") {
    const double r = size / 2.0;
    return (px - r) * (px - r) + (py - r) * (py - r) <= r * r;
  }
  // Triangle: apex at the top centre, base along the bottom.
  return std::fabs(px - size / 2.0) <= py / 2.0;
}

// `frames` frames of a `shape` moving `direction` by `speed` px a frame on
// black, with optional per-pixel noise of amplitude `noise` (0..255) and a
// soft (half-intensity) edge when `soft`.
Rgb8Clip DrawClip(const std::string& colour, const std::string& shape,
                  const std::string& direction, int size, double x0, double y0,
                  double speed, int frames = 8, int side = 32, int noise = 0,
                  uint64_t seed = 1) {
  Rgb rgb{};
  for (const auto& [name, c] : Colours()) {
    if (name == colour) rgb = c;
  }
  double vx = 0, vy = 0;
  if (direction == "left") vx = -speed;
  if (direction == "right") vx = speed;
  if (direction == "up") vy = -speed;
  if (direction == "down") vy = speed;
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int> jitter(-noise, noise);
  Rgb8Clip clip;
  clip.frames = frames;
  clip.height = clip.width = side;
  clip.pixels.assign(static_cast<size_t>(frames) * side * side * 3, 0);
  for (int f = 0; f < frames; ++f) {
    for (int y = 0; y < side; ++y) {
      for (int x = 0; x < side; ++x) {
        const bool in = Inside(shape, x0 + vx * f, y0 + vy * f, size, x, y);
        uint8_t* p = clip.At(f, y, x);
        const uint8_t base[3] = {in ? rgb.r : uint8_t{0}, in ? rgb.g : uint8_t{0},
                                 in ? rgb.b : uint8_t{0}};
        for (int c = 0; c < 3; ++c) {
          const int v = base[c] + (noise ? jitter(gen) : 0);
          p[c] = static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
        }
      }
    }
  }
  return clip;
}

// Start position that keeps the shape inside the frame for the whole clip.
void StartFor(const std::string& direction, int size, double speed, int frames,
              int side, double* x0, double* y0) {
  (void)speed;
  (void)frames;
  const double mid = (side - size) / 2.0;
  *x0 = direction == "right" ? 1 : (direction == "left" ? side - size - 1 : mid);
  *y0 = direction == "down" ? 1 : (direction == "up" ? side - size - 1 : mid);
}

// --- ClipToRgb8 and the palette ---------------------------------------------

TEST(ClipImageTest, ClipToRgb8MapsMinusOneToOneOntoBytes) {
  worker::Tensor t = worker::Tensor::Host({3, 2, 1, 3});
  float* d = t.data_as<float>();
  // Channel-major [C, F, H, W]: element (c, f, 0, x) at c * 6 + f * 3 + x.
  const float vals[6] = {-1.0f, 1.0f, 0.0f, 2.5f, -7.0f, NAN};
  for (int c = 0; c < 3; ++c)
    for (int i = 0; i < 6; ++i) d[c * 6 + i] = c == 0 ? vals[i] : -1.0f;
  absl::StatusOr<Rgb8Clip> clip = ClipToRgb8(t);
  ASSERT_TRUE(clip.ok()) << clip.status();
  EXPECT_EQ(clip->frames, 2);
  EXPECT_EQ(clip->height, 1);
  EXPECT_EQ(clip->width, 3);
  const int want_r[6] = {0, 255, 128, 255, 0, 0};
  for (int i = 0; i < 6; ++i) {
    const uint8_t* p = clip->At(i / 3, 0, i % 3);
    EXPECT_EQ(p[0], want_r[i]) << "value " << vals[i];
    EXPECT_EQ(p[1], 0);
    EXPECT_EQ(p[2], 0);
  }
  // Not an RGB clip: a Wan latent [16, F, H, W].
  absl::StatusOr<Rgb8Clip> bad = ClipToRgb8(worker::Tensor::Host({16, 2, 4, 4}));
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("[16, 2, 4, 4]"));
}

TEST(ClipImageTest, NearestPaletteIndexIsTheNearestEntry) {
  const auto& pal = GifPalette();
  ASSERT_EQ(pal.size(), 256u);
  auto dist = [](const std::array<uint8_t, 3>& p, int r, int g, int b) {
    return (p[0] - r) * (p[0] - r) + (p[1] - g) * (p[1] - g) +
           (p[2] - b) * (p[2] - b);
  };
  // The saturated colours and black map exactly.
  for (const auto& [name, c] : Colours()) {
    const auto& e = pal[static_cast<size_t>(NearestPaletteIndex(c.r, c.g, c.b))];
    EXPECT_EQ(dist(e, c.r, c.g, c.b), 0) << name;
  }
  EXPECT_EQ(dist(pal[static_cast<size_t>(NearestPaletteIndex(0, 0, 0))], 0, 0, 0), 0);
  // Against brute force on random colours and on every grey.
  std::mt19937 gen(3);
  std::uniform_int_distribution<int> u(0, 255);
  for (int i = 0; i < 20000; ++i) {
    const int r = i < 256 ? i : u(gen), g = i < 256 ? i : u(gen),
              b = i < 256 ? i : u(gen);
    int best = 1 << 30;
    for (const auto& p : pal) best = std::min(best, dist(p, r, g, b));
    const int got = NearestPaletteIndex(static_cast<uint8_t>(r),
                                        static_cast<uint8_t>(g),
                                        static_cast<uint8_t>(b));
    ASSERT_EQ(dist(pal[static_cast<size_t>(got)], r, g, b), best)
        << r << "," << g << "," << b;
  }
}

// --- GIF ---------------------------------------------------------------------

struct GifReader {
  void operator()(GifFileType* g) const {
    int err = 0;
    DGifCloseFile(g, &err);
  }
};

TEST(ClipImageTest, GifReadsBackWithGiflib) {
  testing::TempDir dir;
  double x0, y0;
  StartFor("right", 8, 2, 8, 32, &x0, &y0);
  Rgb8Clip clip = DrawClip("yellow", "square", "right", 8, x0, y0, 2);
  // One pixel of a colour off the palette: it must come back as its nearest.
  clip.At(3, 0, 0)[0] = 200;
  clip.At(3, 0, 0)[1] = 10;
  clip.At(3, 0, 0)[2] = 30;
  const std::string path = dir.path() + "/clip.gif";
  ClipImageOptions o;
  o.scale = 4;
  o.frame_delay_cs = 9;
  ASSERT_TRUE(WriteClipGif(path, clip, o).ok());

  int err = 0;
  std::unique_ptr<GifFileType, GifReader> gif(DGifOpenFileName(path.c_str(), &err));
  ASSERT_NE(gif, nullptr) << GifErrorString(err);
  ASSERT_EQ(DGifSlurp(gif.get()), GIF_OK) << GifErrorString(gif->Error);
  EXPECT_EQ(gif->SWidth, 128);
  EXPECT_EQ(gif->SHeight, 128);
  ASSERT_EQ(gif->ImageCount, 8);
  ASSERT_NE(gif->SColorMap, nullptr);
  EXPECT_EQ(gif->SColorMap->ColorCount, 256);
  bool loops = false;
  for (int i = 0; i < gif->SavedImages[0].ExtensionBlockCount; ++i) {
    const ExtensionBlock& e = gif->SavedImages[0].ExtensionBlocks[i];
    if (e.Function == APPLICATION_EXT_FUNC_CODE && e.ByteCount == 11 &&
        std::string(reinterpret_cast<char*>(e.Bytes), 11) == "NETSCAPE2.0") {
      loops = true;
    }
  }
  EXPECT_TRUE(loops) << "no NETSCAPE2.0 loop extension";
  for (int f = 0; f < 8; ++f) {
    const SavedImage& img = gif->SavedImages[f];
    ASSERT_EQ(img.ImageDesc.Width, 128);
    ASSERT_EQ(img.ImageDesc.Height, 128);
    GraphicsControlBlock gcb;
    ASSERT_EQ(DGifSavedExtensionToGCB(gif.get(), f, &gcb), GIF_OK);
    EXPECT_EQ(gcb.DelayTime, 9);
    for (int y = 0; y < 128; ++y) {
      for (int x = 0; x < 128; ++x) {
        const GifColorType c =
            gif->SColorMap->Colors[img.RasterBits[y * 128 + x]];
        const uint8_t* want = clip.At(f, y / 4, x / 4);
        if (f == 3 && y < 4 && x < 4) {
          // (200, 10, 30) -> the cube's (204, 0, 51).
          ASSERT_EQ(c.Red, 204);
          ASSERT_EQ(c.Green, 0);
          ASSERT_EQ(c.Blue, 51);
          continue;
        }
        ASSERT_EQ(c.Red, want[0]) << "frame " << f << " at " << x << "," << y;
        ASSERT_EQ(c.Green, want[1]);
        ASSERT_EQ(c.Blue, want[2]);
      }
    }
  }
}

// --- PNG ---------------------------------------------------------------------

TEST(ClipImageTest, ContactSheetReadsBackWithLibpng) {
  testing::TempDir dir;
  double x0, y0;
  StartFor("down", 6, 1.5, 5, 16, &x0, &y0);
  // Soft colours survive exactly in the PNG (no palette).
  Rgb8Clip clip = DrawClip("blue", "circle", "down", 6, x0, y0, 1.5, 5, 16, 20);
  const std::string path = dir.path() + "/sheet.png";
  ClipImageOptions o;
  o.scale = 3;
  o.gap = 2;
  o.gap_rgb = {7, 8, 9};
  ASSERT_TRUE(WriteClipContactSheet(path, clip, o).ok());

  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  ASSERT_TRUE(png_image_begin_read_from_file(&image, path.c_str())) << image.message;
  const int w = 5 * 16 * 3 + 4 * 2, h = 16 * 3;
  EXPECT_EQ(image.width, static_cast<png_uint_32>(w));
  EXPECT_EQ(image.height, static_cast<png_uint_32>(h));
  image.format = PNG_FORMAT_RGB;
  std::vector<uint8_t> px(PNG_IMAGE_SIZE(image));
  ASSERT_TRUE(png_image_finish_read(&image, nullptr, px.data(), 0, nullptr))
      << image.message;
  ASSERT_EQ(px.size(), static_cast<size_t>(w) * h * 3);
  for (int y = 0; y < h; ++y) {
    for (int x = 0; x < w; ++x) {
      const uint8_t* got = &px[(static_cast<size_t>(y) * w + x) * 3];
      const int f = x / (48 + 2), fx = x % (48 + 2);
      const uint8_t* want;
      const uint8_t gap[3] = {7, 8, 9};
      want = fx >= 48 ? gap : clip.At(f, y / 3, fx / 3);
      ASSERT_EQ(got[0], want[0]) << x << "," << y;
      ASSERT_EQ(got[1], want[1]) << x << "," << y;
      ASSERT_EQ(got[2], want[2]) << x << "," << y;
    }
  }
}

// Output files get the usual permissions: 0644 before the umask (giflib's
// own EGifOpenFileName would create the GIF 0600).
TEST(ClipImageTest, OutputFilesAre0644BeforeTheUmask) {
  testing::TempDir dir;
  Rgb8Clip clip = DrawClip("red", "square", "left", 4, 20, 10, 1, 2, 8);
  const mode_t old = ::umask(022);
  const std::string gif = dir.path() + "/clip.gif", png = dir.path() + "/clip.png";
  const absl::Status g = WriteClipGif(gif, clip);
  const absl::Status p = WriteClipContactSheet(png, clip);
  ::umask(old);
  ASSERT_TRUE(g.ok()) << g;
  ASSERT_TRUE(p.ok()) << p;
  for (const std::string& path : {gif, png}) {
    struct stat st {};
    ASSERT_EQ(::stat(path.c_str(), &st), 0) << path;
    EXPECT_EQ(st.st_mode & 0777, 0644u) << path;
  }
}

TEST(ClipImageTest, WriteErrorsNameTheFile) {
  Rgb8Clip clip = DrawClip("red", "square", "left", 4, 20, 10, 1, 2, 8);
  absl::Status g = WriteClipGif("/nonexistent-dir/x.gif", clip);
  ASSERT_FALSE(g.ok());
  EXPECT_THAT(std::string(g.message()), HasSubstr("/nonexistent-dir/x.gif"));
  absl::Status p = WriteClipContactSheet("/nonexistent-dir/x.png", clip);
  ASSERT_FALSE(p.ok());
  EXPECT_THAT(std::string(p.message()), HasSubstr("/nonexistent-dir/x.png"));
  ClipImageOptions o;
  o.scale = 0;
  EXPECT_FALSE(WriteClipGif("/tmp/never.gif", clip, o).ok());
  Rgb8Clip broken = clip;
  broken.pixels.pop_back();
  EXPECT_FALSE(WriteClipContactSheet("/tmp/never.png", broken).ok());
}

// --- the analyser ------------------------------------------------------------

TEST(ClipAnalyserTest, ClassifiesEveryColourShapeAndDirection) {
  const std::vector<std::string> shapes = {"square", "circle", "triangle"};
  const std::vector<std::string> dirs = {"left", "right", "up", "down"};
  int checked = 0;
  for (const auto& [colour, rgb] : Colours()) {
    for (const std::string& shape : shapes) {
      for (const std::string& dir : dirs) {
        for (int size : {6, 8, 11}) {
          for (double speed : {1.0, 2.0}) {
            double x0, y0;
            StartFor(dir, size, speed, 8, 32, &x0, &y0);
            const Rgb8Clip clip =
                DrawClip(colour, shape, dir, size, x0, y0, speed, 8, 32,
                         /*noise=*/40, /*seed=*/static_cast<uint64_t>(checked));
            const ClipAnalysis a = AnalyseClip(clip);
            const std::string prompt =
                colour + " " + shape + " moving " + dir;
            ASSERT_EQ(a.colour, colour) << prompt << ": " << a.Describe();
            ASSERT_EQ(a.shape, shape) << prompt << ": " << a.Describe();
            ASSERT_EQ(a.direction, dir) << prompt << ": " << a.Describe();
            ASSERT_EQ(MismatchWithPrompt(a, {colour, shape, "moving", dir}), "");
            ++checked;
          }
        }
      }
    }
  }
  EXPECT_EQ(checked, 5 * 3 * 4 * 3 * 2);
}

TEST(ClipAnalyserTest, ReportsEveryMismatch) {
  double x0, y0;
  StartFor("left", 8, 2, 8, 32, &x0, &y0);
  const ClipAnalysis left = AnalyseClip(DrawClip("red", "square", "left", 8, x0, y0, 2));
  EXPECT_EQ(left.direction, "left");
  EXPECT_LT(left.dx, -10);  // 7 frames x 2 px
  StartFor("right", 8, 2, 8, 32, &x0, &y0);
  const ClipAnalysis right = AnalyseClip(DrawClip("red", "square", "right", 8, x0, y0, 2));
  EXPECT_EQ(right.direction, "right");
  EXPECT_GT(right.dx, 10);
  // A clip moving right does not match a prompt saying left, and vice versa.
  EXPECT_THAT(MismatchWithPrompt(right, {"red", "square", "moving", "left"}),
              HasSubstr("direction is right, not left"));
  EXPECT_THAT(MismatchWithPrompt(left, {"red", "square", "moving", "right"}),
              HasSubstr("direction is left, not right"));
  EXPECT_THAT(MismatchWithPrompt(left, {"blue", "square", "moving", "left"}),
              HasSubstr("colour is red, not blue"));
  EXPECT_THAT(MismatchWithPrompt(left, {"red", "circle", "moving", "left"}),
              HasSubstr("shape is square, not circle"));
  const std::string all = MismatchWithPrompt(left, {"green", "triangle", "moving", "down"});
  EXPECT_THAT(all, HasSubstr("colour"));
  EXPECT_THAT(all, HasSubstr("shape"));
  EXPECT_THAT(all, HasSubstr("direction"));
}

TEST(ClipAnalyserTest, StaticEmptyAndNoiseClipsMatchNoPrompt) {
  const ClipAnalysis still = AnalyseClip(DrawClip("green", "circle", "none", 8, 12, 12, 0));
  EXPECT_EQ(still.direction, "static");
  EXPECT_NE(MismatchWithPrompt(still, {"green", "circle", "moving", "up"}), "");

  Rgb8Clip black = DrawClip("green", "circle", "none", 0, -50, -50, 0);
  const ClipAnalysis empty = AnalyseClip(black);
  EXPECT_EQ(empty.colour, "none");
  EXPECT_EQ(empty.empty_frames, 8);
  EXPECT_NE(MismatchWithPrompt(empty, {"red", "square", "moving", "left"}), "");

  // Uniform noise, as from random weights: no prompt matches.
  Rgb8Clip noise = black;
  std::mt19937 gen(5);
  for (uint8_t& v : noise.pixels) v = static_cast<uint8_t>(gen() & 255);
  const ClipAnalysis n = AnalyseClip(noise);
  for (const auto& [colour, rgb] : Colours()) {
    for (const char* shape : {"square", "circle", "triangle"}) {
      for (const char* dir : {"left", "right", "up", "down"}) {
        EXPECT_NE(MismatchWithPrompt(n, {colour, shape, "moving", dir}), "")
            << n.Describe();
      }
    }
  }
}

}  // namespace
}  // namespace dn::server
