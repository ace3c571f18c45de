#include "server/clip_image.h"

#include <fcntl.h>
#include <gif_lib.h>
#include <unistd.h>
#include <png.h>

#include <cmath>
#include <cstdio>
#include <memory>

#include "absl/strings/str_cat.h"

namespace dn::server {

namespace {

constexpr int kCubeLevels = 6;
constexpr int kCubeStep = 51;  // 255 / 5
constexpr int kGreys = 40;
constexpr int kMaxScale = 64;
constexpr int kMaxImageSide = 65535;  // GIF's 16-bit screen size

// Greys between the cube's black and white: 255 * i / 41, i = 1..40.
uint8_t GreyLevel(int i) {
  return static_cast<uint8_t>((255 * i + 20) / (kGreys + 1));
}

int Dist2(const std::array<uint8_t, 3>& p, int r, int g, int b) {
  const int dr = p[0] - r, dg = p[1] - g, db = p[2] - b;
  return dr * dr + dg * dg + db * db;
}

absl::Status CheckClip(const Rgb8Clip& clip, const ClipImageOptions& o,
                       const std::string& path) {
  if (clip.frames < 1 || clip.height < 1 || clip.width < 1 ||
      clip.pixels.size() != static_cast<size_t>(clip.frames) * clip.height *
                                clip.width * 3) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": not a clip (", clip.frames, " frames of ", clip.width, "x",
        clip.height, ", ", clip.pixels.size(), " bytes)"));
  }
  if (o.scale < 1 || o.scale > kMaxScale) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": scale ", o.scale, " is not in [1, ", kMaxScale, "]"));
  }
  if (o.gap < 0 || o.gap > kMaxScale) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": gap ", o.gap, " is not in [0, ", kMaxScale, "]"));
  }
  if (static_cast<int64_t>(clip.width) * o.scale > kMaxImageSide ||
      static_cast<int64_t>(clip.height) * o.scale > kMaxImageSide) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": the scaled image is larger than ", kMaxImageSide,
                     " pixels a side"));
  }
  return absl::OkStatus();
}

// Closes a giflib encoder (EGifCloseFile frees it, even on error).
struct GifCloser {
  void operator()(GifFileType* g) const {
    int err = 0;
    EGifCloseFile(g, &err);
  }
};

struct ColorMapFree {
  void operator()(ColorMapObject* m) const { GifFreeMapObject(m); }
};

absl::Status GifError(const std::string& path, const char* what, int code) {
  const char* msg = GifErrorString(code);
  return absl::InternalError(absl::StrCat(path, ": giflib ", what, ": ",
                                          msg ? msg : "unknown error", " (",
                                          code, ")"));
}

}  // namespace

absl::StatusOr<Rgb8Clip> ClipToRgb8(const worker::Tensor& t) {
  if (t.dtype() != worker::DType::kF32 || t.device() != worker::Device::kCpu) {
    return absl::InvalidArgumentError(absl::StrCat(
        "clip: want a host f32 tensor [3, F, H, W], got ", t.DebugString()));
  }
  if (t.rank() != 4 || t.dim(0) != 3 || t.dim(1) < 1 || t.dim(2) < 1 ||
      t.dim(3) < 1 || t.dim(2) > kMaxImageSide || t.dim(3) > kMaxImageSide ||
      t.dim(1) > kMaxImageSide) {
    return absl::InvalidArgumentError(absl::StrCat(
        "clip: want an RGB clip [3, F, H, W] (a pixel-space model), got shape ",
        worker::ShapeString(t.shape())));
  }
  Rgb8Clip c;
  c.frames = static_cast<int>(t.dim(1));
  c.height = static_cast<int>(t.dim(2));
  c.width = static_cast<int>(t.dim(3));
  c.pixels.resize(static_cast<size_t>(t.numel()));
  const float* src = t.data_as<float>();
  const size_t plane = static_cast<size_t>(c.frames) * c.height * c.width;
  for (size_t i = 0; i < plane; ++i) {
    for (size_t ch = 0; ch < 3; ++ch) {
      const float v = src[ch * plane + i];
      // NaN maps to 0 (and so shows as black).
      float u = std::isnan(v) ? 0.0f : (v + 1.0f) * 0.5f * 255.0f;
      u = u < 0.0f ? 0.0f : (u > 255.0f ? 255.0f : u);
      c.pixels[i * 3 + ch] = static_cast<uint8_t>(std::lround(u));
    }
  }
  return c;
}

const std::vector<std::array<uint8_t, 3>>& GifPalette() {
  static const std::vector<std::array<uint8_t, 3>>* palette = [] {
    auto* p = new std::vector<std::array<uint8_t, 3>>();
    for (int r = 0; r < kCubeLevels; ++r)
      for (int g = 0; g < kCubeLevels; ++g)
        for (int b = 0; b < kCubeLevels; ++b)
          p->push_back({static_cast<uint8_t>(r * kCubeStep),
                        static_cast<uint8_t>(g * kCubeStep),
                        static_cast<uint8_t>(b * kCubeStep)});
    for (int i = 1; i <= kGreys; ++i) {
      const uint8_t v = GreyLevel(i);
      p->push_back({v, v, v});
    }
    return p;
  }();
  return *palette;
}

int NearestPaletteIndex(uint8_t r, uint8_t g, uint8_t b) {
  const auto& pal = GifPalette();
  // The cube is separable: the nearest cube entry rounds each channel.
  auto level = [](int v) { return (v + kCubeStep / 2) / kCubeStep; };
  int best = 36 * level(r) + 6 * level(g) + level(b);
  int best_d = Dist2(pal[static_cast<size_t>(best)], r, g, b);
  // The nearest grey to (r, g, b) is the grey nearest to their mean.
  const double mean = (r + g + b) / 3.0;
  int gi = static_cast<int>(std::lround(mean * (kGreys + 1) / 255.0));
  for (int i = gi - 1; i <= gi + 1; ++i) {
    if (i < 1 || i > kGreys) continue;
    const int idx = 216 + i - 1;
    const int d = Dist2(pal[static_cast<size_t>(idx)], r, g, b);
    if (d < best_d) {
      best_d = d;
      best = idx;
    }
  }
  return best;
}

absl::Status WriteClipGif(const std::string& path, const Rgb8Clip& clip,
                          const ClipImageOptions& o) {
  if (absl::Status s = CheckClip(clip, o, path); !s.ok()) return s;
  const int sw = clip.width * o.scale, sh = clip.height * o.scale;
  const std::string tmp = path + ".tmp";
  int err = 0;
  // giflib's EGifOpenFileName creates the file 0600; every output file of
  // ours is 0644 before the umask, like the PNG and safetensors writers.
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return GifError(path, "open", E_GIF_ERR_OPEN_FAILED);
  std::unique_ptr<GifFileType, GifCloser> gif(EGifOpenFileHandle(fd, &err));
  if (!gif) {
    ::close(fd);
    std::remove(tmp.c_str());
    return GifError(path, "open", err);
  }
  EGifSetGifVersion(gif.get(), /*gif89=*/true);

  const auto& pal = GifPalette();
  std::vector<GifColorType> colours(pal.size());
  for (size_t i = 0; i < pal.size(); ++i) {
    colours[i] = {pal[i][0], pal[i][1], pal[i][2]};
  }
  std::unique_ptr<ColorMapObject, ColorMapFree> map(
      GifMakeMapObject(static_cast<int>(colours.size()), colours.data()));
  if (!map) return absl::ResourceExhaustedError(path + ": giflib colour map");
  auto fail = [&](const char* what) {
    const int code = gif->Error;
    gif.reset();
    std::remove(tmp.c_str());
    return GifError(path, what, code);
  };
  if (EGifPutScreenDesc(gif.get(), sw, sh, 8, 0, map.get()) == GIF_ERROR) {
    return fail("screen descriptor");
  }
  // NETSCAPE2.0 application extension: loop forever.
  static const char kNetscape[] = "NETSCAPE2.0";
  const unsigned char loop[3] = {1, 0, 0};
  if (EGifPutExtensionLeader(gif.get(), APPLICATION_EXT_FUNC_CODE) == GIF_ERROR ||
      EGifPutExtensionBlock(gif.get(), 11, kNetscape) == GIF_ERROR ||
      EGifPutExtensionBlock(gif.get(), 3, loop) == GIF_ERROR ||
      EGifPutExtensionTrailer(gif.get()) == GIF_ERROR) {
    return fail("loop extension");
  }
  std::vector<GifPixelType> line(static_cast<size_t>(sw));
  std::vector<GifPixelType> row(static_cast<size_t>(clip.width));
  for (int f = 0; f < clip.frames; ++f) {
    GraphicsControlBlock gcb;
    gcb.DisposalMode = DISPOSE_DO_NOT;
    gcb.UserInputFlag = false;
    gcb.DelayTime = o.frame_delay_cs;
    gcb.TransparentColor = NO_TRANSPARENT_COLOR;
    GifByteType ext[4];
    const size_t n = EGifGCBToExtension(&gcb, ext);
    if (EGifPutExtension(gif.get(), GRAPHICS_EXT_FUNC_CODE,
                         static_cast<int>(n), ext) == GIF_ERROR) {
      return fail("graphics control extension");
    }
    if (EGifPutImageDesc(gif.get(), 0, 0, sw, sh, false, nullptr) == GIF_ERROR) {
      return fail("image descriptor");
    }
    for (int y = 0; y < clip.height; ++y) {
      for (int x = 0; x < clip.width; ++x) {
        const uint8_t* p = clip.At(f, y, x);
        row[static_cast<size_t>(x)] =
            static_cast<GifPixelType>(NearestPaletteIndex(p[0], p[1], p[2]));
      }
      for (int x = 0; x < sw; ++x) {
        line[static_cast<size_t>(x)] = row[static_cast<size_t>(x / o.scale)];
      }
      for (int k = 0; k < o.scale; ++k) {
        if (EGifPutLine(gif.get(), line.data(), sw) == GIF_ERROR) {
          return fail("image data");
        }
      }
    }
  }
  GifFileType* g = gif.release();
  if (EGifCloseFile(g, &err) == GIF_ERROR) {
    std::remove(tmp.c_str());
    return GifError(path, "close", err);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return absl::InternalError(absl::StrCat(path, ": rename from ", tmp,
                                            " failed"));
  }
  return absl::OkStatus();
}

absl::Status WriteClipContactSheet(const std::string& path,
                                   const Rgb8Clip& clip,
                                   const ClipImageOptions& o) {
  if (absl::Status s = CheckClip(clip, o, path); !s.ok()) return s;
  const int64_t fw = int64_t{clip.width} * o.scale;
  const int64_t w64 = clip.frames * fw + int64_t{clip.frames - 1} * o.gap;
  const int h = clip.height * o.scale;
  if (w64 > (int64_t{1} << 20)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": contact sheet ", w64, " pixels wide is too wide"));
  }
  const int w = static_cast<int>(w64);
  std::vector<uint8_t> img(static_cast<size_t>(w) * h * 3);
  for (int y = 0; y < h; ++y) {
    for (int x = 0; x < w; ++x) {
      const int f = static_cast<int>(x / (fw + o.gap));
      const int fx = static_cast<int>(x - f * (fw + o.gap));
      uint8_t* dst = &img[(static_cast<size_t>(y) * w + x) * 3];
      if (fx >= fw) {
        dst[0] = o.gap_rgb[0];
        dst[1] = o.gap_rgb[1];
        dst[2] = o.gap_rgb[2];
        continue;
      }
      const uint8_t* src = clip.At(f, y / o.scale, fx / o.scale);
      dst[0] = src[0];
      dst[1] = src[1];
      dst[2] = src[2];
    }
  }
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  image.width = static_cast<png_uint_32>(w);
  image.height = static_cast<png_uint_32>(h);
  image.format = PNG_FORMAT_RGB;
  const std::string tmp = path + ".tmp";
  if (!png_image_write_to_file(&image, tmp.c_str(), 0, img.data(), w * 3,
                               nullptr)) {
    const std::string msg = image.message;
    png_image_free(&image);
    std::remove(tmp.c_str());
    return absl::InternalError(absl::StrCat(path, ": libpng: ", msg));
  }
  png_image_free(&image);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return absl::InternalError(absl::StrCat(path, ": rename from ", tmp,
                                            " failed"));
  }
  return absl::OkStatus();
}

}  // namespace dn::server
