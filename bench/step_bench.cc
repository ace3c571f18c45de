#include "bench/step_bench.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/flags.h"
#include "bench/bench_common.h"
#include "worker/lora.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "worker/engine.h"
#include "worker/noise.h"
#include "worker/run_command.h"

namespace dn::bench {


namespace {

struct StepFlags {
  int64_t tokens = 0;
  int frames = 0;
  int height = 0;
  int width = 0;
  bool cfg = false;
  int iters = 5;
  int warmup = 1;
  int text_len = 512;
  std::string loras;  // --lora NAME[:SCALE[:EXPERT]][,...] of --lora-dir
  bool attention_fp8 = false;
  double cache_threshold = 0;
};

void AddStepFlags(FlagSet& flags, StepFlags* f, worker::RankOptions* ro) {
  flags.Int64("tokens", &f->tokens,
              "token count; latent of 1 patch-frame, H' x W' = N, H' the "
              "largest divisor <= sqrt(N)");
  flags.Int("frames", &f->frames, "pixel frames (instead of --tokens)");
  flags.Int("height", &f->height, "pixel height (instead of --tokens)");
  flags.Int("width", &f->width, "pixel width (instead of --tokens)");
  flags.Bool("cfg", &f->cfg, "run both CFG branches per step (batch 2)");
  flags.Int("iters", &f->iters, "timed steps");
  flags.Int("warmup", &f->warmup, "untimed steps first (plans, graphs)");
  flags.Int("text-len", &f->text_len, "text tokens");
  flags.String("lora", &f->loras,
               "LoRAs of --lora-dir applied to every step: NAME[:SCALE[:EXPERT]][,...] "
               "(the step then includes the unmerged low-rank path)");
  flags.Bool("attention-fp8", &f->attention_fp8,
             "fast tier: self-attention through the backend's fp8 attention");
  flags.Double("cache-threshold", &f->cache_threshold,
               "fast tier: step caching threshold in [0, 1] (0 = off); computed and cached "
               "steps are timed separately (docs/PERFORMANCE.md, method)");
  flags.Int("layers", &ro->layers,
            "keep only the first L blocks (cut-down big presets); 0 = all");
}

absl::Status CheckStepFlags(const StepFlags& f) {
  const bool pixels = f.frames > 0 || f.height > 0 || f.width > 0;
  if ((f.tokens > 0) == pixels)
    return absl::InvalidArgumentError(
        "give either --tokens or all of --frames/--height/--width");
  if (pixels && (f.frames < 1 || f.height < 1 || f.width < 1))
    return absl::InvalidArgumentError("--frames, --height and --width must all be given");
  if (f.iters < 1) return absl::InvalidArgumentError("--iters must be >= 1");
  if (f.warmup < 0) return absl::InvalidArgumentError("--warmup must be >= 0");
  if (f.text_len < 1 || f.text_len > 4096)
    return absl::InvalidArgumentError("--text-len must be in [1, 4096]");
  return absl::OkStatus();
}

absl::StatusOr<worker::LatentShape> ShapeFor(const worker::WanConfig& c,
                                             const StepFlags& f) {
  if (f.tokens <= 0) return worker::LatentFromPixels(c, f.frames, f.height, f.width);
  return TokenGridShape(c, f.tokens);
}

// FLOPs of one forward for one CFG branch (spec §6; FLOP = 2 MAC).
double ForwardFlops(const worker::WanConfig& c, double l, double t) {
  const double d = c.inner_dim(), fd = c.ffn_dim;
  const double per_layer = l * (12 * d * d + 4 * d * fd) + 4 * t * d * d +
                           4 * l * l * d + 4 * l * t * d;
  return per_layer * c.num_layers;
}

absl::Status RunBenchRank(const worker::RankOptions& ro, const StepFlags& f) {
  DN_ASSIGN_OR_RETURN(auto session, worker::RankSession::Open(ro));
  worker::Engine& engine = *session->engine;
  const worker::WanConfig& c = engine.config();
  worker::GenerateParams p;
  DN_ASSIGN_OR_RETURN(p.latent, ShapeFor(c, f));
  p.steps = f.warmup + f.iters;
  p.guidance = f.cfg ? 5.0 : 1.0;
  p.scheduler = worker::SchedulerKind::kEuler;
  p.acceleration.attention_fp8 = f.attention_fp8;
  p.acceleration.cache_threshold = f.cache_threshold;
  DN_ASSIGN_OR_RETURN(p.loras, worker::ParseLoraSpecs(f.loras, "--lora"));
  p.prompt_embeds = worker::Tensor::Host({f.text_len, c.text_dim});
  worker::FillNormal(1, worker::kEmbedStream, 0, 0.0f, 1.0f,
                     p.prompt_embeds.data_as<float>(),
                     static_cast<size_t>(p.prompt_embeds.numel()));
  // I2V models: 257 seeded image tokens (Wan2.1 image branch) and a zero
  // condition (the 20 extra input channels); their cost is in the step time
  // but not in the TFLOP/s formula.
  if (c.is_i2v()) {
    p.image_embeds = worker::Tensor::Host({257, c.image_dim});
    worker::FillNormal(2, worker::kEmbedStream, 0, 0.0f, 1.0f, p.image_embeds.data_as<float>(),
                       static_cast<size_t>(p.image_embeds.numel()));
  }
  if (c.in_channels > c.out_channels)
    p.condition_latents = worker::Tensor::Host({c.in_channels - c.out_channels, p.latent.frames,
                                                p.latent.height, p.latent.width});
  // TI2V: a seeded first-frame condition, so the step runs the per-token
  // timestep path (frame 0's tokens at t = 0; docs/MODELS.md §5).
  if (c.is_ti2v()) {
    p.condition_latents = worker::Tensor::Host({c.out_channels, 1, p.latent.height, p.latent.width});
    worker::FillNormal(3, worker::kNoiseStream, 0, 0.0f, 1.0f, p.condition_latents.data_as<float>(),
                       static_cast<size_t>(p.condition_latents.numel()));
  }
  // Step caching: a computed step and a cached one cost very different
  // times, so the timed steps are split by kind (computed_s, cached_s);
  // step_s holds all of them.
  std::vector<double> step_s, a2a_s, skew_s, computed_s, cached_s;
  DN_RETURN_IF_ERROR(engine
                         .Generate(p,
                                   [&](const worker::StepStats& s) {
                                     if (s.index < f.warmup) return;
                                     step_s.push_back(s.seconds);
                                     (s.cached ? cached_s : computed_s).push_back(s.seconds);
                                     a2a_s.push_back(s.alltoall_seconds);
                                     skew_s.push_back(s.skew_seconds);
                                   },
                                   nullptr)
                         .status());
  int64_t peak = session->backend->peak_memory_bytes();
  std::vector<int64_t> peaks(static_cast<size_t>(ro.ranks));
  DN_RETURN_IF_ERROR(session->control->AllGather(&peak, peaks.data(), sizeof(peak)));
  if (ro.rank != 0) return absl::OkStatus();

  worker::EngineOptions eo;
  eo.use_graphs = ro.graphs;
  eo = worker::WithEnvironment(eo);
  const int64_t tokens = worker::TokenCount(c, p.latent);
  const int batch = f.cfg ? 2 : 1;
  const double med = Median(step_s);
  const double flops = ForwardFlops(c, static_cast<double>(tokens), f.text_len) * batch;
  const double tflops = flops / med / 1e12;
  const int64_t peak_max = *std::max_element(peaks.begin(), peaks.end());
  std::string peak_list;
  for (int64_t b : peaks)
    peak_list += absl::StrCat(peak_list.empty() ? "" : ", ", b >> 20);
  std::printf(
      "bench step: %s on %s, %d rank(s)\n"
      "  shape: latent [%d, %d, %d, %d] = %lld tokens, text %d, CFG %s (batch %d), "
      "%d layers\n"
      "  step: median %.3f ms (min %.3f, max %.3f over %d iters), all-to-all "
      "%.3f ms/step, skew %.3f ms\n"
      "  compute: %.4f TFLOP per step, %.4f TFLOP/s achieved (%.4f per rank)\n"
      "  peak memory per rank: %.1f MiB max [%s] MiB\n"
      "  graphs: %s\n",
      session->weights->description().c_str(),
      session->backend->device_description().c_str(), ro.ranks, p.latent.channels,
      p.latent.frames, p.latent.height, p.latent.width,
      static_cast<long long>(tokens), f.text_len, f.cfg ? "on" : "off", batch,
      c.num_layers, med * 1e3, *std::min_element(step_s.begin(), step_s.end()) * 1e3,
      *std::max_element(step_s.begin(), step_s.end()) * 1e3, f.iters,
      Median(a2a_s) * 1e3, Median(skew_s) * 1e3, flops / 1e12, tflops,
      tflops / ro.ranks, static_cast<double>(peak_max) / (1 << 20), peak_list.c_str(),
      !eo.use_graphs ? "off (every step eager)"
      : ro.ranks == 1
          ? "on (step 0 eager, step 1 captures, later steps replay)"
          : absl::StrCat("on (steps 0, 1 and every ", eo.timing_every,
                         "th eager with all-to-all markers; step 2 captures, "
                         "the others replay and report the latest sampled "
                         "all-to-all)").c_str());
  // One machine-readable line for scripts.
  std::printf(
      "RESULT ranks=%d backend=%s tokens=%lld cfg=%d layers=%d graphs=%d "
      "step_ms=%.4f alltoall_ms=%.4f tflops=%.5f peak_mib=%.1f cfg_parallel=%d loras=%zu\n",
      ro.ranks, ro.backend.c_str(), static_cast<long long>(tokens), f.cfg ? 1 : 0,
      c.num_layers, eo.use_graphs ? 1 : 0, med * 1e3, Median(a2a_s) * 1e3, tflops,
      static_cast<double>(peak_max) / (1 << 20), ro.cfg_parallel ? 1 : 0, p.loras.size());
  if (!p.acceleration.exact()) {
    double mean = 0;
    for (double v : step_s) mean += v;
    mean /= static_cast<double>(step_s.size());
    std::printf(
        "  fast tier: attention_fp8 %s, cache_threshold %g: %zu computed steps (median %.3f "
        "ms), %zu cached (median %s ms), mean over the timed steps %.3f ms\n",
        f.attention_fp8 ? "on" : "off", f.cache_threshold, computed_s.size(),
        computed_s.empty() ? 0.0 : Median(computed_s) * 1e3, cached_s.size(),
        cached_s.empty() ? "-" : absl::StrCat(Median(cached_s) * 1e3).c_str(), mean * 1e3);
    std::printf(
        "RESULT_FAST attention_fp8=%d cache_threshold=%g computed_steps=%zu computed_ms=%.4f "
        "cached_steps=%zu cached_ms=%.4f mean_ms=%.4f\n",
        f.attention_fp8 ? 1 : 0, f.cache_threshold, computed_s.size(),
        computed_s.empty() ? 0.0 : Median(computed_s) * 1e3, cached_s.size(),
        cached_s.empty() ? 0.0 : Median(cached_s) * 1e3, mean * 1e3);
  }
  std::fflush(stdout);
  return absl::OkStatus();
}

}  // namespace

int BenchStepCommand(int argc, char** argv) {
  FlagSet flags("denoised bench step",
                "Milliseconds per denoising step on N local rank processes, "
                "all-to-all time, TFLOP/s and peak memory per rank.");
  worker::RankOptions ro;
  StepFlags f;
  worker::AddRankFlags(flags, &ro);
  AddStepFlags(flags, &f, &ro);
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;
  absl::Status s = worker::CheckRankOptions(ro);
  if (s.ok()) s = CheckStepFlags(f);
  if (!s.ok()) {
    std::fprintf(stderr, "denoised bench step: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  s = worker::SpawnRanks({"bench", "step-rank"},
                         std::vector<std::string>(argv + 1, argv + argc), ro);
  if (!s.ok()) {
    std::fprintf(stderr, "denoised bench step: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}

int BenchStepRankCommand(int argc, char** argv) {
  FlagSet flags("denoised bench step-rank", "One rank of `bench step` (internal).");
  worker::RankOptions ro;
  StepFlags f;
  worker::AddRankFlags(flags, &ro);
  AddStepFlags(flags, &f, &ro);
  flags.Int("rank", &ro.rank, "this process's rank");
  flags.String("store-dir", &ro.store_dir, "rendezvous folder");
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;
  SetLogTag(absl::StrCat("rank", ro.rank));
  absl::Status s = CheckStepFlags(f);
  if (s.ok()) s = RunBenchRank(ro, f);
  if (!s.ok()) {
    worker::ReportRankError(ro, s);
    return 1;
  }
  return 0;
}

}  // namespace dn::bench
