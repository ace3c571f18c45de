// File: tests/server/clip_analyser.h
//
// A simple analyser of the demo model's clips (one coloured shape moving on
// black, DEMO_CONTRACT.md), used to check that a generated clip matches its
// prompt: the foreground is every pixel whose brightest channel is >= 128;
// its mean colour gives the colour class (the nearest of the seven
// saturated RGB corners); the fill ratio of its bounding box (median over
// frames) gives the shape class (square ~1, circle ~pi/4, triangle ~1/2);
// the least-squares slope of its centroid over the frames gives the motion
// direction (image y grows downwards, so "up" is decreasing y).
#ifndef DN_TESTS_SERVER_CLIP_ANALYSER_H_
#define DN_TESTS_SERVER_CLIP_ANALYSER_H_

#include <string>
#include <vector>

#include "server/clip_image.h"

namespace dn::server::testing {

// Fill-ratio bounds of the shape classes: >= kSquareMinFill is a square,
// >= kCircleMinFill a circle, below it a triangle.
inline constexpr double kSquareMinFill = 0.88;
inline constexpr double kCircleMinFill = 0.64;
// Less centroid travel than this over the clip (pixels) is "static".
inline constexpr double kMinTravel = 1.5;

struct ClipAnalysis {
  std::string colour;     // red green blue yellow magenta cyan white | none
  std::string shape;      // square circle triangle | none
  std::string direction;  // left right up down static | none
  double mean_rgb[3] = {0, 0, 0};  // of the foreground
  double fill = 0;                 // median bounding-box fill ratio
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

}  // namespace dn::server::testing

#endif  // DN_TESTS_SERVER_CLIP_ANALYSER_H_
