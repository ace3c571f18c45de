// File: server/clip_image.h
//
// Client-side output of pixel-space models (the demo model: RGB, values in
// [-1, 1], tensor [3, F, H, W]): 8-bit RGB frames, an animated GIF written
// with giflib (a fixed 256-colour palette: the 6x6x6 colour cube plus 40
// greys, each pixel mapped to its nearest entry; giflib does the LZW
// encoding), and a PNG contact sheet of the frames side by side written with
// libpng. Both are upscaled by nearest neighbour so a person can see 32x32
// frames.
#ifndef DN_SERVER_CLIP_IMAGE_H_
#define DN_SERVER_CLIP_IMAGE_H_

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/tensor.h"

namespace dn::server {

// A clip of 8-bit RGB frames; pixel (f, y, x) is pixels[((f * height + y) *
// width + x) * 3 + c].
struct Rgb8Clip {
  int frames = 0;
  int height = 0;
  int width = 0;
  std::vector<uint8_t> pixels;

  const uint8_t* At(int f, int y, int x) const {
    return &pixels[((static_cast<size_t>(f) * height + y) * width + x) * 3];
  }
  uint8_t* At(int f, int y, int x) {
    return &pixels[((static_cast<size_t>(f) * height + y) * width + x) * 3];
  }
};

// f32 [3, F, H, W] in [-1, 1] -> 8-bit: round((v + 1) / 2 * 255), clamped.
// Errors name the shape or dtype that is not an RGB clip.
absl::StatusOr<Rgb8Clip> ClipToRgb8(const worker::Tensor& clip);

// The GIF palette: 216 colour-cube entries (levels 0, 51, ..., 255; index
// 36 r + 6 g + b) then 40 greys.
const std::vector<std::array<uint8_t, 3>>& GifPalette();
// Index of the palette entry nearest (squared RGB distance) to a colour.
int NearestPaletteIndex(uint8_t r, uint8_t g, uint8_t b);

struct ClipImageOptions {
  int scale = 4;             // nearest-neighbour upscaling, 1..64
  int frame_delay_cs = 12;   // GIF: 1/100 s per frame
  int gap = 2;               // PNG: pixels between frames (after scaling)
  std::array<uint8_t, 3> gap_rgb = {96, 96, 96};
};

// Animated GIF89a, looping forever: F frames of (W*scale) x (H*scale).
// Written to PATH.tmp and renamed. Errors name the file and giflib's error.
absl::Status WriteClipGif(const std::string& path, const Rgb8Clip& clip,
                          const ClipImageOptions& options = {});

// RGB PNG contact sheet: the frames left to right, `gap` pixels of gap_rgb
// between them: (F*W*scale + (F-1)*gap) x (H*scale).
absl::Status WriteClipContactSheet(const std::string& path,
                                   const Rgb8Clip& clip,
                                   const ClipImageOptions& options = {});

}  // namespace dn::server

#endif  // DN_SERVER_CLIP_IMAGE_H_
