#include "server/clip_analyser.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace dn::server {

const std::vector<NamedColour>& AnalyserColours() {
  static const auto* colours = new std::vector<NamedColour>{
      {"red", {255, 0, 0}},      {"green", {0, 255, 0}},
      {"blue", {0, 0, 255}},     {"yellow", {255, 255, 0}},
      {"magenta", {255, 0, 255}}, {"cyan", {0, 255, 255}},
      {"white", {255, 255, 255}}};
  return *colours;
}

bool IsAnalyserShape(const std::string& w) {
  return w == "square" || w == "circle" || w == "triangle";
}

bool IsAnalyserDirection(const std::string& w) {
  return w == "left" || w == "right" || w == "up" || w == "down";
}

ClipAnalysis AnalyseClip(const Rgb8Clip& clip) {
  ClipAnalysis a;
  a.colour = a.shape = a.direction = "none";
  double sum[3] = {0, 0, 0};
  int64_t fg_total = 0;
  std::vector<double> fills, ts, cxs, cys;
  double corner_sum = 0;
  auto lit = [&](int f, int y, int x) {
    const uint8_t* p = clip.At(f, y, x);
    return std::max({p[0], p[1], p[2]}) >= 128;
  };
  for (int f = 0; f < clip.frames; ++f) {
    int n = 0, x0 = clip.width, x1 = -1, y0 = clip.height, y1 = -1;
    double sx = 0, sy = 0;
    for (int y = 0; y < clip.height; ++y) {
      for (int x = 0; x < clip.width; ++x) {
        if (!lit(f, y, x)) continue;
        const uint8_t* p = clip.At(f, y, x);
        ++n;
        sx += x;
        sy += y;
        x0 = std::min(x0, x);
        x1 = std::max(x1, x);
        y0 = std::min(y0, y);
        y1 = std::max(y1, y);
        for (int c = 0; c < 3; ++c) sum[c] += p[c];
      }
    }
    if (n == 0) {
      ++a.empty_frames;
      continue;
    }
    fg_total += n;
    corner_sum += (lit(f, y0, x0) + lit(f, y0, x1) + lit(f, y1, x0) +
                   lit(f, y1, x1)) / 4.0;
    fills.push_back(static_cast<double>(n) / ((x1 - x0 + 1) * (y1 - y0 + 1)));
    ts.push_back(f);
    cxs.push_back(sx / n);
    cys.push_back(sy / n);
  }
  const double all = static_cast<double>(clip.frames) * clip.height * clip.width;
  a.foreground = all > 0 ? fg_total / all : 0;
  if (fg_total == 0) return a;

  for (int c = 0; c < 3; ++c) a.mean_rgb[c] = sum[c] / fg_total;
  double best = 1e30;
  for (const NamedColour& nc : AnalyserColours()) {
    double d = 0;
    for (int c = 0; c < 3; ++c) {
      d += (a.mean_rgb[c] - nc.rgb[c]) * (a.mean_rgb[c] - nc.rgb[c]);
    }
    if (d < best) {
      best = d;
      a.colour = nc.name;
    }
  }

  std::sort(fills.begin(), fills.end());
  const size_t m = fills.size();
  a.fill = m % 2 ? fills[m / 2] : 0.5 * (fills[m / 2 - 1] + fills[m / 2]);
  a.corners = corner_sum / static_cast<double>(m);
  a.shape = a.fill < kCircleMinFill ? "triangle"
            : (a.fill >= kSquareMinFill && a.corners >= kSquareMinCorners)
                ? "square"
                : "circle";

  if (ts.size() < 2) return a;
  // Least-squares slopes of the centroid over the frame index.
  double mt = 0, mx = 0, my = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    mt += ts[i];
    mx += cxs[i];
    my += cys[i];
  }
  mt /= ts.size();
  mx /= ts.size();
  my /= ts.size();
  double stt = 0, stx = 0, sty = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    stt += (ts[i] - mt) * (ts[i] - mt);
    stx += (ts[i] - mt) * (cxs[i] - mx);
    sty += (ts[i] - mt) * (cys[i] - my);
  }
  const double span = clip.frames - 1;
  a.dx = stx / stt * span;
  a.dy = sty / stt * span;
  if (std::max(std::fabs(a.dx), std::fabs(a.dy)) < kMinTravel) {
    a.direction = "static";
  } else if (std::fabs(a.dx) >= std::fabs(a.dy)) {
    a.direction = a.dx > 0 ? "right" : "left";
  } else {
    a.direction = a.dy > 0 ? "down" : "up";
  }
  return a;
}

std::string ClipAnalysis::Describe() const {
  return absl::StrFormat(
      "colour %s (foreground mean RGB %.0f,%.0f,%.0f), shape %s (bounding-box "
      "fill %.2f, corners lit %.2f), direction %s (centroid travel dx %+.1f dy %+.1f px), "
      "foreground %.1f%% of pixels, %d empty frames",
      colour, mean_rgb[0], mean_rgb[1], mean_rgb[2], shape, fill, corners,
      direction,
      dx, dy, foreground * 100, empty_frames);
}

std::string MismatchWithPrompt(const ClipAnalysis& a,
                               const std::vector<std::string>& words) {
  std::string out;
  for (const std::string& w : words) {
    bool colour = false;
    for (const NamedColour& nc : AnalyserColours()) colour |= w == nc.name;
    if (colour && a.colour != w) {
      absl::StrAppend(&out, "colour is ", a.colour, ", not ", w, "; ");
    }
    if (IsAnalyserShape(w) && a.shape != w) {
      absl::StrAppend(&out, "shape is ", a.shape, ", not ", w, "; ");
    }
    if (IsAnalyserDirection(w) && a.direction != w) {
      absl::StrAppend(&out, "direction is ", a.direction, ", not ", w, "; ");
    }
  }
  if (!out.empty()) out.resize(out.size() - 2);
  return out;
}

}  // namespace dn::server
