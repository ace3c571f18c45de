// File: server/clip_analyser.h
//
// A simple analyser of the demo model's clips (one coloured shape moving on
// black, tools/README.md), used to check that a generated clip matches its
// prompt: the foreground is every pixel whose brightest channel is >= 128;
// its mean colour gives the colour class (the nearest of the seven
// saturated RGB corners); the fill ratio of its bounding box and whether the
// box's four corner pixels are lit (medians / means over frames) give the
// shape class (square: fill ~1 with lit corners; circle: fill ~pi/4 and
// dark corners; triangle: fill ~1/2);
// the least-squares slope of its centroid over the frames gives the motion
// direction (image y grows downwards, so "up" is decreasing y).
// Used by the demo-model tests and by `denoised bench quality`.
#ifndef DN_SERVER_CLIP_ANALYSER_H_
#define DN_SERVER_CLIP_ANALYSER_H_

#include <string>
#include <vector>

#include "server/clip_image.h"

namespace dn::server {

// Shape classes: fill < kCircleMinFill is a triangle; fill >=
// kSquareMinFill with >= kSquareMinCorners of the box corners lit is a
// square (a small rasterised circle fills ~0.9 of its box, but not its
// corners); the rest are circles.
inline constexpr double kSquareMinFill = 0.86;
inline constexpr double kSquareMinCorners = 0.75;
inline constexpr double kCircleMinFill = 0.68;
// Less centroid travel than this over the clip (pixels) is "static".
inline constexpr double kMinTravel = 1.5;

struct ClipAnalysis {
  std::string colour;     // red green blue yellow magenta cyan white | none
  std::string shape;      // square circle triangle | none
  std::string direction;  // left right up down static | none
  double mean_rgb[3] = {0, 0, 0};  // of the foreground
  double fill = 0;                 // median bounding-box fill ratio
  double corners = 0;              // mean fraction of lit box corners
  double dx = 0, dy = 0;           // centroid travel over the clip, pixels
  double foreground = 0;           // fraction of all pixels
  int empty_frames = 0;            // frames without foreground

  // One line with every figure, for test failure messages.
  std::string Describe() const;
};

ClipAnalysis AnalyseClip(const Rgb8Clip& clip);

// Empty when `a` matches the prompt's colour, shape and direction words
// (words the analyser does not know are ignored, "moving" too); otherwise
// says which class differs.
std::string MismatchWithPrompt(const ClipAnalysis& a,
                               const std::vector<std::string>& prompt_words);

// The colour words the analyser can tell apart, with their RGB.
struct NamedColour {
  const char* name;
  int rgb[3];
};
const std::vector<NamedColour>& AnalyserColours();
bool IsAnalyserShape(const std::string& word);
bool IsAnalyserDirection(const std::string& word);

}  // namespace dn::server

#endif  // DN_SERVER_CLIP_ANALYSER_H_
