#include "worker/run_command.h"

#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "worker/noise.h"
#include "worker/safetensors.h"
#include "worker/sampler.h"
#include "worker/wan_config.h"


namespace dn::worker {
namespace {

struct RunFlags {
  int frames = 0;
  int height = 0;
  int width = 0;
  int steps = 50;
  double guidance = 5.0;
  double guidance_2 = -1;  // < 0: unset (two experts: = guidance)
  double shift = 3.0;
  std::string scheduler = "unipc";
  uint64_t seed = 0;
  std::string embeds;
  std::string negative_embeds;
  int text_len = 512;
  std::string latents;
  std::string out;
  std::string loras;  // --lora NAME[:SCALE[:EXPERT]][,...]
  std::string condition;
  std::string image_embeds;
  bool attention_fp8 = false;
  double cache_threshold = 0;
  // Testing: at step `fault_step` (0-based, after its stats), rank
  // `fault_rank` requests a cancel ("cancel") or dies ("exit").
  int fault_rank = -1;
  int fault_step = 0;
  std::string fault;
};

void AddRunFlags(FlagSet& flags, RunFlags* f) {
  flags.Int("frames", &f->frames, "video frames in pixel space (1 + 4k for Wan)");
  flags.Int("height", &f->height, "height in pixels (multiple of 16 for Wan)");
  flags.Int("width", &f->width, "width in pixels (multiple of 16 for Wan)");
  flags.Int("steps", &f->steps, "denoising steps");
  flags.Double("guidance", &f->guidance, "CFG scale (CFG on iff > 1)");
  flags.Double("guidance-2", &f->guidance_2,
               "two-expert models: CFG scale of the low-noise expert "
               "(guidance_scale_2); unset = --guidance");
  flags.Double("shift", &f->shift, "flow shift of the sigma schedule");
  flags.String("scheduler", &f->scheduler, "unipc | euler");
  flags.Uint64("seed", &f->seed, "seed of the initial noise (and random embeddings)");
  flags.String("embeds", &f->embeds,
               "safetensors file with tensor prompt_embeds [T, text_dim] "
               "(f32/bf16/f16); without it, seeded random embeddings");
  flags.String("negative-embeds", &f->negative_embeds,
               "safetensors file with tensor prompt_embeds (or negative_embeds) "
               "[T, text_dim]; without it, zeros of the prompt's shape");
  flags.Int("text-len", &f->text_len, "tokens of the random embeddings");
  flags.String("latents", &f->latents,
               "safetensors file with tensor latents [C, F, H, W] to start "
               "from instead of seeded noise");
  flags.String("out", &f->out, "output safetensors file (tensor latents)");
  flags.String("condition", &f->condition,
               "I2V models (in_channels > out_channels): safetensors file with tensor "
               "condition_latents [in - out, F, H, W] (mask 4 | image latent 16); TI2V "
               "(optional): the image latent of frame 0 [out_channels, 1, H, W]");
  flags.String("image-embeds", &f->image_embeds,
               "Wan2.1 I2V: safetensors file with tensor image_embeds [N, image_dim] "
               "(CLIP penultimate hidden states, 257 x 1280)");
  flags.String("lora", &f->loras,
                   "LoRA of --lora-dir: NAME[:SCALE[:EXPERT]] (scale 1; expert all, "
                   "or high / low for two-expert models); comma-separated list");
  flags.Bool("attention-fp8", &f->attention_fp8,
             "fast tier: self-attention in fp8 (docs/ENGINE.md; not exact)");
  flags.Double("cache-threshold", &f->cache_threshold,
               "fast tier: step caching (First-Block-Cache) threshold in [0, 1]; 0 = off "
               "(docs/ENGINE.md \"Step caching\"; not exact)");
  flags.Int("fault-rank", &f->fault_rank, "testing: rank that injects --fault");
  flags.Int("fault-step", &f->fault_step, "testing: step index of --fault");
  flags.String("fault", &f->fault,
               "testing: cancel (request a stop) | exit (die) on --fault-rank");
}

absl::Status CheckRunFlags(const RunFlags& f) {
  if (f.frames < 1) return absl::InvalidArgumentError("--frames must be given (>= 1)");
  if (f.height < 1) return absl::InvalidArgumentError("--height must be given (>= 1)");
  if (f.width < 1) return absl::InvalidArgumentError("--width must be given (>= 1)");
  if (f.out.empty()) return absl::InvalidArgumentError("--out must be given");
  if (f.scheduler != "unipc" && f.scheduler != "euler")
    return absl::InvalidArgumentError(absl::StrCat(
        "--scheduler '", f.scheduler, "' must be unipc or euler"));
  if (f.embeds.empty() && (f.text_len < 1 || f.text_len > 4096))
    return absl::InvalidArgumentError(
        absl::StrCat("--text-len ", f.text_len, " must be in [1, 4096]"));
  if (!f.fault.empty() && f.fault != "cancel" && f.fault != "exit")
    return absl::InvalidArgumentError(
        absl::StrCat("--fault '", f.fault, "' must be cancel or exit"));
  return absl::OkStatus();
}

// Reads the first of `names` found in a safetensors file as host f32.
absl::StatusOr<Tensor> ReadTensorFile(const std::string& path,
                                      const std::vector<std::string>& names,
                                      const char* flag) {
  auto file = SafetensorsFile::Open(path);
  if (!file.ok())
    return absl::Status(file.status().code(),
                        absl::StrCat(flag, " ", path, ": ", file.status().message()));
  for (const std::string& name : names) {
    const SafetensorsEntry* e = (*file)->Find(name);
    if (e == nullptr) continue;
    Tensor t = Tensor::Host(e->shape);
    DN_RETURN_IF_ERROR((*file)->ReadF32(*e, t.data_as<float>()));
    return t;
  }
  std::string list;
  for (const std::string& n : names) list += (list.empty() ? "" : " or ") + n;
  return absl::NotFoundError(
      absl::StrCat(flag, " ", path, " has no tensor ", list));
}

absl::StatusOr<Tensor> ReadEmbeds(const std::string& path,
                                  const std::vector<std::string>& names,
                                  const char* flag, int text_dim) {
  DN_ASSIGN_OR_RETURN(Tensor t, ReadTensorFile(path, names, flag));
  if (t.rank() != 2 || t.dim(0) < 1 || t.dim(1) != text_dim)
    return absl::InvalidArgumentError(absl::StrCat(
        flag, " ", path, ": embeddings have shape ", ShapeString(t.shape()),
        ", expected [T, ", text_dim, "] (text_dim of the model)"));
  return t;
}

// Progress on stderr: a redrawn bar on a terminal, a line per step otherwise.
void DrawProgress(const StepStats& s) {
  const bool tty = isatty(STDERR_FILENO) != 0;
  constexpr int kWidth = 24;
  const int filled = (s.index + 1) * kWidth / std::max(1, s.total);
  std::string bar(static_cast<size_t>(filled), '#');
  bar.resize(kWidth, '.');
  std::fprintf(stderr, "%sstep %d/%d [%s] sigma %.4f t %.1f | %.1f ms/step "
               "(all-to-all %.1f ms, skew %.1f ms)%s%s",
               tty ? "\r" : "", s.index + 1, s.total, bar.c_str(), s.sigma,
               s.timestep, s.seconds * 1e3, s.alltoall_seconds * 1e3,
               s.skew_seconds * 1e3,
               s.cache_signal >= 0
                   ? absl::StrCat(" cache signal ", s.cache_signal, s.cached ? " cached" : "")
                         .c_str()
                   : "",
               tty && s.index + 1 < s.total ? "" : "\n");
  std::fflush(stderr);
}

// One rank of `denoised run`: one Generate; rank 0 writes the latents.
absl::Status RunGeneration(const RankOptions& ro, const RunFlags& rf) {
  DN_ASSIGN_OR_RETURN(std::unique_ptr<RankSession> session, RankSession::Open(ro));
  Engine& engine = *session->engine;
  const WanConfig& config = engine.config();
  GenerateParams p;
  absl::StatusOr<LatentShape> latent =
      LatentFromPixels(config, rf.frames, rf.height, rf.width);
  if (!latent.ok()) {
    // The rules name the API field (pixel_size.frames); here it is a flag.
    std::string message(latent.status().message());
    if (message.rfind("pixel_size.", 0) == 0) message = "--" + message.substr(11);
    return absl::Status(latent.status().code(), message);
  }
  p.latent = *latent;
  p.steps = rf.steps;
  p.guidance = rf.guidance;
  if (rf.guidance_2 >= 0) p.guidance_2 = rf.guidance_2;
  p.shift = rf.shift;
  p.scheduler = rf.scheduler == "euler" ? SchedulerKind::kEuler : SchedulerKind::kUniPC;
  p.seed = rf.seed;
  p.acceleration.attention_fp8 = rf.attention_fp8;
  p.acceleration.cache_threshold = rf.cache_threshold;
  DN_ASSIGN_OR_RETURN(p.loras, ParseLoraSpecs(rf.loras, "--lora"));
  if (!rf.embeds.empty()) {
    DN_ASSIGN_OR_RETURN(p.prompt_embeds,
                        ReadEmbeds(rf.embeds, {"prompt_embeds"}, "--embeds",
                                   config.text_dim));
  } else {
    if (ro.rank == 0)
      DN_LOG(WARNING) << "no --embeds: using seeded random prompt embeddings ["
                      << rf.text_len << ", " << config.text_dim
                      << "] (seed " << rf.seed << "); the output is not a real video";
    p.prompt_embeds = Tensor::Host({rf.text_len, config.text_dim});
    FillNormal(rf.seed, kEmbedStream, 0, 0.0f, 1.0f,
               p.prompt_embeds.data_as<float>(),
               static_cast<size_t>(p.prompt_embeds.numel()));
  }
  if (!rf.negative_embeds.empty()) {
    DN_ASSIGN_OR_RETURN(
        p.negative_embeds,
        ReadEmbeds(rf.negative_embeds, {"prompt_embeds", "negative_embeds"},
                   "--negative-embeds", config.text_dim));
  }
  if (!rf.latents.empty()) {
    DN_ASSIGN_OR_RETURN(p.initial_latents,
                        ReadTensorFile(rf.latents, {"latents"}, "--latents"));
    const Shape want = {config.out_channels, p.latent.frames, p.latent.height,
                        p.latent.width};
    if (p.initial_latents.shape() != want)
      return absl::InvalidArgumentError(absl::StrCat(
          "--latents ", rf.latents, ": tensor latents has shape ",
          ShapeString(p.initial_latents.shape()), ", expected ",
          ShapeString(want), " for --frames/--height/--width"));
  }
  if (!rf.image_embeds.empty()) {
    DN_ASSIGN_OR_RETURN(p.image_embeds,
                        ReadTensorFile(rf.image_embeds, {"image_embeds"}, "--image-embeds"));
    if (p.image_embeds.rank() == 3 && p.image_embeds.dim(0) == 1)
      p.image_embeds = p.image_embeds.View({p.image_embeds.dim(1), p.image_embeds.dim(2)});
  }
  if (!rf.condition.empty()) {
    DN_ASSIGN_OR_RETURN(p.condition_latents,
                        ReadTensorFile(rf.condition, {"condition_latents"}, "--condition"));
  }
  if (absl::Status v = engine.Validate(p); !v.ok()) {
    // The rules name the API field (acceleration.cache_threshold); here it
    // is a flag.
    std::string message(v.message());
    if (message.rfind("acceleration.cache_threshold", 0) == 0)
      message = "--cache-threshold" + message.substr(28);
    return absl::Status(v.code(), message);
  }
  if (ro.rank == 0)
    DN_LOG(INFO) << "model " << session->weights->description() << " on "
                 << session->backend->device_description() << " x" << ro.ranks
                 << (ro.cfg_parallel ? absl::StrCat(" (cfg 2 x ulysses ", ro.ranks / 2, ")")
                                     : std::string())
                 << ": latent [" << p.latent.channels << ", " << p.latent.frames
                 << ", " << p.latent.height << ", " << p.latent.width << "], "
                 << TokenCount(config, p.latent) << " tokens, " << p.steps
                 << " steps, CFG " << (p.guidance > 1 ? "on" : "off");
  StopFlag stop;
  const bool inject = !rf.fault.empty() && rf.fault_rank == ro.rank;
  std::vector<int> cached_steps;
  StepCallback progress = [&](const StepStats& s) {
    if (ro.rank == 0) DrawProgress(s);
    if (s.cached) cached_steps.push_back(s.index);
    if (inject && s.index == rf.fault_step) {
      if (rf.fault == "exit") {
        DN_LOG(WARNING) << "--fault exit: rank " << ro.rank << " dies at step " << s.index;
        _exit(3);
      }
      stop.Request(absl::StatusCode::kCancelled);
    }
  };
  DN_ASSIGN_OR_RETURN(Tensor latents, engine.Generate(p, progress, &stop));
  if (ro.rank != 0) return absl::OkStatus();
  std::ostringstream guidance, shift;
  guidance << rf.guidance;
  shift << rf.shift;
  if (p.acceleration.cache_threshold > 0)
    DN_LOG(INFO) << "step cache: " << cached_steps.size() << " of " << p.steps
                 << " steps cached [" << absl::StrJoin(cached_steps, ",") << "]";
  std::map<std::string, std::string> metadata = {
      {"seed", std::to_string(rf.seed)},
      {"scheduler", rf.scheduler},
      {"steps", std::to_string(rf.steps)},
      {"shift", shift.str()},
      {"guidance", guidance.str()},
      {"guidance_2", rf.guidance_2 >= 0 ? absl::StrCat(rf.guidance_2) : "unset"},
      {"model_config_hash", config.Hash()},
      {"model", session->weights->description()},
      {"ranks", std::to_string(ro.ranks)},
      {"backend", ro.backend},
      {"frames", std::to_string(rf.frames)},
      {"height", std::to_string(rf.height)},
      {"width", std::to_string(rf.width)},
      {"embeds", rf.embeds.empty() ? absl::StrCat("random, text_len ", rf.text_len)
                                   : rf.embeds},
  };
  if (!p.acceleration.exact()) {
    metadata["attention_fp8"] = p.acceleration.attention_fp8 ? "true" : "false";
    metadata["cache_threshold"] = absl::StrCat(p.acceleration.cache_threshold);
    metadata["cached_steps"] = absl::StrJoin(cached_steps, ",");
  }
  DN_RETURN_IF_ERROR(WriteSafetensors(
      rf.out, {{"latents", DType::kF32, latents.shape(), latents.data()}},
      metadata));
  DN_LOG(INFO) << "wrote " << rf.out;
  return absl::OkStatus();
}

std::string ErrorFile(const std::string& dir, int rank) {
  return absl::StrCat(dir, "/rank", rank, ".error");
}

// Transport-level codes a rank gets when a *peer* fails; the root cause is
// a rank with another code.
bool IsSecondary(absl::StatusCode code) {
  return code == absl::StatusCode::kAborted ||
         code == absl::StatusCode::kUnavailable ||
         code == absl::StatusCode::kDeadlineExceeded;
}

}  // namespace

void ReportRankError(const RankOptions& o, const absl::Status& status) {
  DN_LOG(ERROR) << "rank " << o.rank << " failed: " << status;
  if (o.store_dir.empty()) return;
  std::ofstream out(ErrorFile(o.store_dir, o.rank));
  out << static_cast<int>(status.code()) << "\n" << status.message();
}

absl::Status SpawnRanks(const std::vector<std::string>& command,
                        const std::vector<std::string>& args,
                        const RankOptions& options) {
  DN_RETURN_IF_ERROR(CheckRankOptions(options));
  const char* tmp = std::getenv("TMPDIR");
  std::string tmpl = absl::StrCat(tmp != nullptr && *tmp ? tmp : "/tmp",
                                  "/denoised-run-XXXXXX");
  if (mkdtemp(tmpl.data()) == nullptr)
    return absl::InternalError(absl::StrCat("mkdtemp ", tmpl, ": ", std::strerror(errno)));
  const std::string dir = tmpl;
  std::error_code ec;
  const std::string exe = std::filesystem::read_symlink("/proc/self/exe", ec).string();
  if (ec)
    return absl::InternalError(absl::StrCat("reading /proc/self/exe: ", ec.message()));

  const pid_t parent = getpid();
  std::vector<pid_t> pids;
  for (int r = 0; r < options.ranks; ++r) {
    std::vector<std::string> argv_s = {"denoised"};
    argv_s.insert(argv_s.end(), command.begin(), command.end());
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    argv_s.push_back(absl::StrCat("--rank=", r));
    argv_s.push_back(absl::StrCat("--store-dir=", dir));
    std::vector<char*> argv;
    for (std::string& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    const pid_t pid = fork();
    if (pid < 0) {
      for (pid_t p : pids) kill(p, SIGKILL);
      for (pid_t p : pids) waitpid(p, nullptr, 0);
      std::filesystem::remove_all(dir, ec);
      return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
    }
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the parent
      if (getppid() != parent) _exit(1);
      execv(exe.c_str(), argv.data());
      std::fprintf(stderr, "exec %s: %s\n", exe.c_str(), std::strerror(errno));
      _exit(127);
    }
    pids.push_back(pid);
  }

  // Wait for all; on the first failure give the others a moment to fail on
  // their own (so the root cause can be told apart), then kill them.
  std::vector<int> status(pids.size(), 0);
  std::vector<bool> done(pids.size(), false);
  size_t alive = pids.size();
  int first_failed = -1;
  std::chrono::steady_clock::time_point kill_at{};
  bool killed = false;
  while (alive > 0) {
    bool reaped = false;
    for (size_t i = 0; i < pids.size(); ++i) {
      if (done[i]) continue;
      int st = 0;
      const pid_t r = waitpid(pids[i], &st, WNOHANG);
      if (r == 0) continue;
      done[i] = true;
      reaped = true;
      --alive;
      status[i] = r < 0 ? -1 : st;
      const bool ok = r > 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0;
      if (!ok && first_failed < 0) {
        first_failed = static_cast<int>(i);
        kill_at = std::chrono::steady_clock::now() + std::chrono::seconds(3);
      }
    }
    if (alive == 0) break;
    if (first_failed >= 0 && !killed && std::chrono::steady_clock::now() >= kill_at) {
      for (size_t i = 0; i < pids.size(); ++i)
        if (!done[i]) kill(pids[i], SIGKILL);
      killed = true;
    }
    if (!reaped) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  absl::Status result;
  if (first_failed >= 0) {
    // The root cause: a rank that reported an error other than losing its
    // peers; else the first rank to die without reporting (crash, signal);
    // else the first report.
    struct Report {
      bool present = false;
      absl::StatusCode code = absl::StatusCode::kUnknown;
      std::string message;
    };
    std::vector<Report> reports(pids.size());
    for (size_t r = 0; r < pids.size(); ++r) {
      std::ifstream in(ErrorFile(dir, static_cast<int>(r)));
      int code = 0;
      if (!(in >> code)) continue;
      in.ignore(1);
      reports[r].present = true;
      reports[r].code = static_cast<absl::StatusCode>(code);
      reports[r].message.assign(std::istreambuf_iterator<char>(in),
                                std::istreambuf_iterator<char>());
    }
    int chosen = -1;
    for (size_t r = 0; r < reports.size() && chosen < 0; ++r)
      if (reports[r].present && !IsSecondary(reports[r].code)) chosen = static_cast<int>(r);
    if (chosen < 0 && reports[static_cast<size_t>(first_failed)].present)
      chosen = first_failed;
    if (chosen >= 0) {
      const Report& rep = reports[static_cast<size_t>(chosen)];
      result = absl::Status(rep.code, absl::StrCat("rank ", chosen, ": ", rep.message));
    } else {
      const int st = status[static_cast<size_t>(first_failed)];
      result = absl::InternalError(absl::StrCat(
          "rank ", first_failed,
          WIFSIGNALED(st) ? absl::StrCat(" was killed by signal ", WTERMSIG(st))
                          : absl::StrCat(" exited with status ", WEXITSTATUS(st)),
          " without reporting an error; the other ranks were stopped"));
    }
  }
  std::filesystem::remove_all(dir, ec);
  return result;
}

int RunCommand(int argc, char** argv) {
  FlagSet flags("denoised run",
                "Runs the engine without the service: N local rank processes "
                "(Ulysses sequence parallel), one generation, latents to --out.");
  RankOptions ro;
  RunFlags rf;
  AddRankFlags(flags, &ro);
  AddRunFlags(flags, &rf);
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;
  absl::Status s = CheckRankOptions(ro);
  if (s.ok()) s = CheckRunFlags(rf);
  if (!s.ok()) {
    std::fprintf(stderr, "denoised run: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  std::vector<std::string> args(argv + 1, argv + argc);
  s = SpawnRanks({"run-rank"}, args, ro);
  if (!s.ok()) {
    std::fprintf(stderr, "denoised run: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}

int RunRankCommand(int argc, char** argv) {
  FlagSet flags("denoised run-rank", "One rank of `denoised run` (internal).");
  RankOptions ro;
  RunFlags rf;
  AddRankFlags(flags, &ro);
  AddRunFlags(flags, &rf);
  flags.Int("rank", &ro.rank, "this process's rank");
  flags.String("store-dir", &ro.store_dir, "rendezvous folder");
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;
  SetLogTag(absl::StrCat("rank", ro.rank));
  absl::Status s = CheckRunFlags(rf);
  if (s.ok()) s = RunGeneration(ro, rf);
  if (!s.ok()) {
    ReportRankError(ro, s);
    return 1;
  }
  return 0;
}

}  // namespace dn::worker
