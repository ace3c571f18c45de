#include "bench/quality_bench.h"

#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "base/flags.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "bench/bench_common.h"
#include "server/clip_analyser.h"
#include "server/clip_image.h"
#include "server/demo_model.h"
#include "worker/acceleration.h"
#include "worker/engine.h"
#include "worker/noise.h"
#include "worker/prompt_table.h"
#include "worker/rank_session.h"

namespace dn::bench {
namespace {

struct QualityFlags {
  std::string model;   // checkpoint folder; default: the demo model
  std::string preset;  // or a preset (random weights)
  uint64_t preset_seed = 0;
  int layers = 0;
  std::string backend = "cpu";
  int threads = 0;
  bool graphs = true;
  int frames = 8, height = 32, width = 32;  // the demo model's clip
  int64_t tokens = 0;                       // instead of frames/height/width
  int steps = 20;
  double guidance = 5.0;
  int prompts = 24;
  int seeds = 2;
  int text_len = 512;  // models without a prompt table: seeded random embeddings
  std::string thresholds = "0.02,0.05,0.1,0.2";
  std::string fp8 = "auto";  // auto | on | off
  std::string out;           // also write the table here
};

struct Case {
  std::string name;                // the prompt, or "embeddings seed N"
  std::vector<std::string> words;  // demo mode: the prompt's words
  uint64_t seed = 0;
  worker::Tensor embeds;
};

struct Tier {
  std::string label;
  worker::Acceleration acceleration;
  bool exact = false;
  std::optional<std::string> unavailable;  // why the backend cannot run it
  int n = 0;
  int colour = 0, shape = 0, direction = 0, all = 0, agree = 0;
  double rel_sum = 0, rel_max = 0, psnr_sum = 0, psnr_min = std::numeric_limits<double>::infinity();
  int psnr_finite = 0;
  int64_t cached = 0;
  double seconds = 0;
};

// The word classes of the clip analyser.
std::string WordOf(const std::vector<std::string>& words, bool (*is)(const std::string&)) {
  for (const std::string& w : words)
    if (is(w)) return w;
  return "";
}
bool IsColour(const std::string& w) {
  for (const server::NamedColour& c : server::AnalyserColours())
    if (w == c.name) return true;
  return false;
}

// The prompts: colour i mod C, shape i mod S, direction i mod D over the
// analyser's words the table knows (distinct for i < lcm(C, S, D)).
absl::StatusOr<std::vector<std::string>> DemoPrompts(const worker::PromptTable& table, int n) {
  auto known = [&](const std::string& w) {
    const auto& v = table.vocabulary();
    return std::find(v.begin(), v.end(), w) != v.end();
  };
  std::vector<std::string> colours, shapes, dirs;
  for (const std::string& w : table.vocabulary()) {
    if (IsColour(w)) colours.push_back(w);
    if (server::IsAnalyserShape(w)) shapes.push_back(w);
    if (server::IsAnalyserDirection(w)) dirs.push_back(w);
  }
  if (colours.empty() || shapes.empty() || dirs.empty() || !known("moving"))
    return absl::FailedPreconditionError(
        "the prompt table has no <colour> <shape> moving <direction> "
        "vocabulary the clip "
        "analyser knows");
  std::vector<std::string> out;
  for (int i = 0; i < n; ++i)
    out.push_back(absl::StrCat(colours[i % colours.size()], " ", shapes[i % shapes.size()],
                               " moving ", dirs[i % dirs.size()]));
  return out;
}

struct RunOut {
  absl::Status status;
  worker::Tensor latents;
  int cached = 0;
  double seconds = 0;
  // The smallest step-cache signal of the run's candidate steps (infinity
  // when none was measured).
  double min_signal = std::numeric_limits<double>::infinity();
};

// The exact path's run, measured: a threshold below every signal (1e-30)
// runs the split forward every step without skipping, bit-identical to the
// exact path (step_cache_test), and reports each step's signal against the
// previous step.
constexpr double kMeasureThreshold = 1e-30;

RunOut Run(worker::Engine& engine, const worker::LatentShape& latent, const Case& c,
           const QualityFlags& f, const worker::Acceleration& a) {
  worker::GenerateParams p;
  p.latent = latent;
  p.steps = f.steps;
  p.guidance = f.guidance;
  p.seed = c.seed;
  p.prompt_embeds = c.embeds;  // the negative: zeros of its shape (the empty prompt)
  p.acceleration = a;
  RunOut r;
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<worker::Tensor> x = engine.Generate(
      p,
      [&](const worker::StepStats& s) {
        r.cached += s.cached ? 1 : 0;
        if (s.cache_signal >= 0) r.min_signal = std::min(r.min_signal, s.cache_signal);
      },
      nullptr);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!x.ok()) {
    r.status = x.status();
    return r;
  }
  r.latents = *std::move(x);
  return r;
}

// rel L2 and PSNR of x against ref (pixels: both clamped to [-1, 1], peak 2;
// else peak = ref's range).
void Compare(const worker::Tensor& x, const worker::Tensor& ref, bool pixels, double* rel,
             double* psnr) {
  const float* a = x.data_as<float>();
  const float* b = ref.data_as<float>();
  const int64_t n = ref.numel();
  double num = 0, den = 0, mse = 0, lo = b[0], hi = b[0];
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
    lo = std::min<double>(lo, b[i]);
    hi = std::max<double>(hi, b[i]);
    const double pa = pixels ? std::clamp<double>(a[i], -1, 1) : a[i];
    const double pb = pixels ? std::clamp<double>(b[i], -1, 1) : b[i];
    mse += (pa - pb) * (pa - pb);
  }
  mse /= static_cast<double>(n);
  *rel = den > 0 ? std::sqrt(num / den) : 0;
  const double peak = pixels ? 2.0 : hi - lo;
  *psnr = mse > 0 ? 10 * std::log10(peak * peak / mse) : std::numeric_limits<double>::infinity();
}

std::string Percent(int k, int n) { return absl::StrFormat("%.0f%%", n > 0 ? 100.0 * k / n : 0); }

absl::Status RunQuality(const QualityFlags& f) {
  worker::RankOptions ro;
  ro.model = f.model;
  ro.preset = f.preset;
  ro.preset_seed = f.preset_seed;
  ro.layers = f.layers;
  ro.backend = f.backend;
  ro.threads = f.threads;
  ro.graphs = f.graphs;
  ro.ranks = 1;
  ro.rank = 0;
  if (ro.model.empty() && ro.preset.empty()) {
    DN_ASSIGN_OR_RETURN(server::DemoModelSearch found, server::FindDemoModel(""));
    if (found.dir.empty())
      return absl::NotFoundError("no --model/--preset and no demo model found");
    ro.model = found.dir;
  }
  DN_RETURN_IF_ERROR(worker::CheckRankOptions(ro));
  const char* tmp = std::getenv("TMPDIR");
  std::string dir = absl::StrCat(tmp != nullptr && *tmp ? tmp : "/tmp", "/denoised-quality-XXXXXX");
  if (mkdtemp(dir.data()) == nullptr) return absl::InternalError("mkdtemp " + dir);
  ro.store_dir = dir;
  struct RemoveDir {
    std::string dir;
    ~RemoveDir() {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
  } remove_dir{dir};
  DN_ASSIGN_OR_RETURN(std::unique_ptr<worker::RankSession> session, worker::RankSession::Open(ro));
  worker::Engine& engine = *session->engine;
  const worker::WanConfig& c = engine.config();

  // Demo mode: a prompt table next to a pixel-space RGB model.
  std::optional<worker::PromptTable> table;
  const std::string table_path = absl::StrCat(ro.model, "/", server::kDemoPromptTableFile);
  const bool pixels =
      c.out_channels == 3 && c.vae_stride[0] == 1 && c.vae_stride[1] == 1 && c.vae_stride[2] == 1;
  if (!ro.model.empty() && pixels && std::filesystem::exists(table_path)) {
    DN_ASSIGN_OR_RETURN(worker::PromptTable t, worker::PromptTable::Load(table_path));
    table = std::move(t);
  }
  worker::LatentShape latent;
  if (f.tokens > 0) {
    DN_ASSIGN_OR_RETURN(latent, TokenGridShape(c, f.tokens));
  } else {
    DN_ASSIGN_OR_RETURN(latent, worker::LatentFromPixels(c, f.frames, f.height, f.width));
  }

  std::vector<Case> cases;
  if (table.has_value()) {
    DN_ASSIGN_OR_RETURN(const std::vector<std::string> prompts, DemoPrompts(*table, f.prompts));
    for (int s = 1; s <= f.seeds; ++s)
      for (const std::string& prompt : prompts) {
        Case k;
        k.name = prompt;
        k.words = worker::PromptTable::Tokenize(prompt);
        k.seed = static_cast<uint64_t>(s);
        DN_ASSIGN_OR_RETURN(k.embeds, table->Embed(prompt));
        cases.push_back(std::move(k));
      }
  } else {
    for (int s = 1; s <= f.seeds; ++s)
      for (int i = 0; i < f.prompts; ++i) {
        Case k;
        k.name = absl::StrCat("embeddings ", i);
        k.seed = static_cast<uint64_t>(s);
        k.embeds = worker::Tensor::Host({f.text_len, c.text_dim});
        worker::FillNormal(static_cast<uint64_t>(1000 + i), worker::kEmbedStream, 0, 0.0f, 1.0f,
                           k.embeds.data_as<float>(), static_cast<size_t>(k.embeds.numel()));
        cases.push_back(std::move(k));
      }
  }

  std::vector<double> thresholds;
  for (absl::string_view t : absl::StrSplit(f.thresholds, ',', absl::SkipEmpty())) {
    double v = 0;
    if (!absl::SimpleAtod(t, &v))
      return absl::InvalidArgumentError(absl::StrCat("--thresholds: '", t, "' is not a number"));
    DN_RETURN_IF_ERROR(worker::RequestRules::CheckAcceleration({false, v}));
    thresholds.push_back(v);
  }
  std::vector<Tier> tiers;
  auto add = [&](std::string label, bool fp8, double threshold, bool exact) {
    Tier t;
    t.label = std::move(label);
    t.acceleration.attention_fp8 = fp8;
    t.acceleration.cache_threshold = threshold;
    t.exact = exact;
    tiers.push_back(std::move(t));
  };
  add("exact", false, 0, true);
  for (double t : thresholds) add(absl::StrCat("cache ", t), false, t, false);
  if (f.fp8 != "off") {
    add("fp8 attention", true, 0, false);
    for (double t : thresholds) add(absl::StrCat("fp8 + cache ", t), true, t, false);
  }

  // The table over the first `done` cases.
  auto table_md = [&](size_t done) {
    const Tier& exact = tiers[0];
    std::string md = absl::StrFormat(
        "`denoised bench quality`: %s on %s, latent [%d, %d, %d, %d] = %lld "
        "tokens, %d UniPC "
        "steps, CFG %g, %zu cases done (of %s x %d seeds)\n\n",
        session->weights->description(), session->backend->device_description(), latent.channels,
        latent.frames, latent.height, latent.width,
        static_cast<long long>(worker::TokenCount(c, latent)), f.steps, f.guidance, done,
        table.has_value() ? absl::StrCat(f.prompts, " prompts")
                          : absl::StrCat(f.prompts, " embeddings"),
        f.seeds);
    absl::StrAppend(&md,
                    "| tier | steps skipped (mean) | time vs exact | colour | "
                    "shape | direction | "
                    "all three vs prompt | reading = exact's | rel L2 mean "
                    "(max) | PSNR dB mean "
                    "(min) |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for (const Tier& t : tiers) {
      if (t.unavailable.has_value()) {
        absl::StrAppend(&md, "| ", t.label, " | not available on this backend (", *t.unavailable,
                        ") |||||||||\n");
        continue;
      }
      const bool an = table.has_value();
      const std::string psnr =
          t.psnr_finite == 0
              ? std::string("inf (identical)")
              : absl::StrFormat("%.1f (%s)", t.psnr_sum / t.psnr_finite,
                                std::isfinite(t.psnr_min) ? absl::StrFormat("%.1f", t.psnr_min)
                                                          : std::string("inf"));
      absl::StrAppend(
          &md, "| ", t.label, " | ",
          absl::StrFormat("%.2f of %d", t.n > 0 ? static_cast<double>(t.cached) / t.n : 0, f.steps),
          " | ", absl::StrFormat("%.2f", exact.seconds > 0 ? t.seconds / exact.seconds : 0), " | ",
          an ? Percent(t.colour, t.n) : "n/a", " | ", an ? Percent(t.shape, t.n) : "n/a", " | ",
          an ? Percent(t.direction, t.n) : "n/a", " | ", an ? Percent(t.all, t.n) : "n/a", " | ",
          an ? Percent(t.agree, t.n) : "n/a", " | ",
          absl::StrFormat("%.4f (%.4f)", t.n > 0 ? t.rel_sum / t.n : 0, t.rel_max), " | ", psnr,
          " |\n");
    }
    return md;
  };
  auto write_out = [&](const std::string& md) -> absl::Status {
    if (f.out.empty()) return absl::OkStatus();
    std::ofstream out(f.out);
    out << md;
    if (!out) return absl::InternalError("writing --out " + f.out);
    return absl::OkStatus();
  };
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const Case& k = cases[ci];
    worker::Acceleration measure;
    measure.cache_threshold = kMeasureThreshold;
    const RunOut ref = Run(engine, latent, k, f, measure);
    DN_RETURN_IF_ERROR(ref.status);
    if (ci == 0) {
      // Once: the measured run is the exact path, bit for bit.
      const RunOut plain = Run(engine, latent, k, f, {});
      DN_RETURN_IF_ERROR(plain.status);
      if (plain.latents.numel() != ref.latents.numel() ||
          std::memcmp(plain.latents.data(), ref.latents.data(),
                      static_cast<size_t>(ref.latents.numel()) * sizeof(float)) != 0)
        return absl::InternalError(
            "the measured run (step caching at 1e-30, nothing skipped) differs from the exact "
            "path: the split forward is not exact");
    }
    std::optional<server::ClipAnalysis> ref_a;
    if (table.has_value()) {
      DN_ASSIGN_OR_RETURN(const server::Rgb8Clip rgb, server::ClipToRgb8(ref.latents));
      ref_a = server::AnalyseClip(rgb);
    }
    for (Tier& tier : tiers) {
      if (tier.unavailable.has_value()) continue;
      // A step-caching tier whose threshold is at or below every signal of
      // the exact sequence skips nothing: its first skip would be at the
      // first step whose signal is below the threshold, and before it the
      // run is the exact one. Its result is the exact result, so it is not
      // run again.
      const bool same_as_exact =
          tier.exact || (!tier.acceleration.attention_fp8 &&
                         tier.acceleration.cache_threshold <= ref.min_signal);
      const RunOut r = same_as_exact ? ref : Run(engine, latent, k, f, tier.acceleration);
      if (!r.status.ok()) {
        // A backend that cannot run fp8 attention at this shape refuses the
        // tier before step 0 (FAILED_PRECONDITION, docs/ENGINE.md).
        const bool no_fp8 = tier.acceleration.attention_fp8 &&
                            r.status.code() == absl::StatusCode::kFailedPrecondition;
        if (!no_fp8 || f.fp8 == "on") return r.status;
        for (Tier& t : tiers)
          if (t.acceleration.attention_fp8) t.unavailable = std::string(r.status.message());
        continue;
      }
      ++tier.n;
      tier.cached += r.cached;
      tier.seconds += r.seconds;
      double rel = 0, psnr = 0;
      Compare(r.latents, ref.latents, table.has_value(), &rel, &psnr);
      tier.rel_sum += rel;
      tier.rel_max = std::max(tier.rel_max, rel);
      if (std::isfinite(psnr)) {
        tier.psnr_sum += psnr;
        ++tier.psnr_finite;
      }
      tier.psnr_min = std::min(tier.psnr_min, psnr);
      if (table.has_value()) {
        DN_ASSIGN_OR_RETURN(const server::Rgb8Clip rgb, server::ClipToRgb8(r.latents));
        const server::ClipAnalysis a = server::AnalyseClip(rgb);
        const bool col = a.colour == WordOf(k.words, IsColour);
        const bool shp = a.shape == WordOf(k.words, server::IsAnalyserShape);
        const bool dir = a.direction == WordOf(k.words, server::IsAnalyserDirection);
        tier.colour += col;
        tier.shape += shp;
        tier.direction += dir;
        tier.all += col && shp && dir;
        tier.agree +=
            a.colour == ref_a->colour && a.shape == ref_a->shape && a.direction == ref_a->direction;
      }
    }
    std::fprintf(stderr, "bench quality: case %zu/%zu done (%s, seed %llu)\n", ci + 1, cases.size(),
                 k.name.c_str(), static_cast<unsigned long long>(k.seed));
    // The partial table after every case, so a long run can be read early.
    DN_RETURN_IF_ERROR(write_out(table_md(ci + 1)));
  }
  const std::string md = table_md(cases.size());

  std::fputs(md.c_str(), stdout);
  std::fflush(stdout);
  return write_out(md);
}

}  // namespace

int BenchQualityCommand(int argc, char** argv) {
  FlagSet flags("denoised bench quality",
                "The fast tier's quality against the exact path "
                "(docs/QUALITY.md): per tier, the "
                "clip analyser's prompt scores (demo model), rel L2 and PSNR "
                "of the final latents, "
                "steps skipped; one rank in-process; prints a markdown table.");
  QualityFlags f;
  flags.String("model", &f.model,
               "checkpoint folder (default: the demo model, found as `demo` does)");
  flags.String("preset", &f.preset, "or a preset with random weights (e.g. wan2.1-t2v-1.3b)");
  flags.Uint64("preset-seed", &f.preset_seed, "seed of the preset's weights");
  flags.Int("layers", &f.layers, "keep only the first L blocks; 0 = all");
  flags.String("backend", &f.backend, "cpu | cuda");
  flags.Int("threads", &f.threads, "CPU threads (0 = all cores)");
  flags.Bool("graphs", &f.graphs, "CUDA graphs");
  flags.Int("frames", &f.frames, "pixel frames");
  flags.Int("height", &f.height, "pixel height");
  flags.Int("width", &f.width, "pixel width");
  flags.Int64("tokens", &f.tokens, "or: a token count (one patch-frame, as bench step)");
  flags.Int("steps", &f.steps, "UniPC steps");
  flags.Double("guidance", &f.guidance, "CFG scale");
  flags.Int("prompts", &f.prompts, "prompts (demo) or random embeddings (other models)");
  flags.Int("seeds", &f.seeds, "seeds per prompt (1..N)");
  flags.Int("text-len", &f.text_len,
            "tokens of the random embeddings (models without a prompt table)");
  flags.String("thresholds", &f.thresholds, "step-caching thresholds, comma-separated");
  flags.String("fp8", &f.fp8,
               "fp8 attention tiers: auto (where the backend has it), on "
               "(required), off");
  flags.String("out", &f.out, "also write the table to this file");
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;
  std::string bad;
  if (f.fp8 != "auto" && f.fp8 != "on" && f.fp8 != "off") bad = "--fp8 must be auto, on or off";
  if (f.prompts < 1 || f.seeds < 1) bad = "--prompts and --seeds must be >= 1";
  if (f.steps < 1) bad = "--steps must be >= 1";
  if (!f.model.empty() && !f.preset.empty()) bad = "give --model or --preset, not both";
  if (!bad.empty()) {
    std::fprintf(stderr, "denoised bench quality: %s\n", bad.c_str());
    return 2;
  }
  const absl::Status s = RunQuality(f);
  if (!s.ok()) {
    std::fprintf(stderr, "denoised bench quality: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}

}  // namespace dn::bench
