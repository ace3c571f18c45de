#include "server/demo.h"

#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/flags.h"
#include "server/client.h"
#include "server/demo_model.h"
#include "server/metrics_scrape.h"
#include "base/process.h"
#include "server/proto_convert.h"
#include "server/request_validation.h"
#include "worker/prompt_table.h"
#include "worker/wan_config.h"

namespace dn::server {

namespace v1 = ::denoised::v1;

namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// A child process that is stopped (SIGTERM, then SIGKILL) when this goes
// out of scope, so no early return leaves an orphan.
class Child {
 public:
  Child(std::string what, pid_t pid) : what_(std::move(what)), pid_(pid) {}
  ~Child() { Stop(std::chrono::seconds(15)); }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  pid_t pid() const { return pid_; }
  // OK while running; an error saying how it ended otherwise.
  absl::Status Alive() {
    if (pid_ <= 0) return absl::UnavailableError(what_ + " is not running");
    if (std::optional<int> s = WaitPid(pid_, std::chrono::milliseconds(0))) {
      pid_ = -1;
      return absl::UnavailableError(
          absl::StrCat(what_, " exited early: ", DescribeWaitStatus(*s)));
    }
    return absl::OkStatus();
  }
  // Returns how it ended ("" if it was not running).
  std::string Stop(std::chrono::milliseconds grace) {
    if (pid_ <= 0) return "";
    const int status = Terminate(pid_, grace);
    pid_ = -1;
    return DescribeWaitStatus(status);
  }

 private:
  std::string what_;
  pid_t pid_;
};

std::string Tail(const std::string& path, int lines) {
  std::ifstream in(path);
  std::vector<std::string> all;
  for (std::string l; std::getline(in, l);) all.push_back(l);
  std::string out;
  for (size_t i = all.size() > static_cast<size_t>(lines)
                      ? all.size() - static_cast<size_t>(lines)
                      : 0;
       i < all.size(); ++i) {
    out += "    | " + all[i] + "\n";
  }
  return out;
}

absl::StatusOr<std::map<std::string, std::string>> WaitReadyFile(
    const std::string& path, Child& child, std::chrono::seconds timeout) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    std::ifstream in(path);
    if (in) {
      std::map<std::string, std::string> kv;
      for (std::string l; std::getline(in, l);) {
        const size_t eq = l.find('=');
        if (eq != std::string::npos) kv[l.substr(0, eq)] = l.substr(eq + 1);
      }
      if (kv.count("listen") && kv.count("metrics")) return kv;
    }
    if (absl::Status s = child.Alive(); !s.ok()) return s;
    if (Clock::now() > deadline) {
      return absl::DeadlineExceededError("the coordinator did not start in time");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

// Ctrl-C handling: during --keep-running it ends the wait; before that it
// stops the children (worker group first) and exits 130.
struct SignalState {
  std::mutex mu;
  std::condition_variable cv;
  bool signalled = false;
  bool waiting = false;  // the main thread waits for the signal
  std::atomic<pid_t> worker{-1};
  std::atomic<pid_t> coordinator{-1};
};

void SignalLoop(SignalState* st) {
  WaitStopSignal(std::chrono::milliseconds(-1));
  {
    std::lock_guard<std::mutex> lock(st->mu);
    st->signalled = true;
    if (st->waiting) {
      st->cv.notify_all();
      return;
    }
  }
  std::fprintf(stderr, "\ndenoised demo: interrupted; stopping the worker "
                       "group and the coordinator\n");
  if (pid_t w = st->worker.load(); w > 0) Terminate(w, std::chrono::seconds(15));
  if (pid_t c = st->coordinator.load(); c > 0) Terminate(c, std::chrono::seconds(10));
  std::fflush(nullptr);
  _exit(130);
}

std::string Ms(double seconds) {
  if (std::isnan(seconds)) return "n/a";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f ms", seconds * 1e3);
  return buf;
}

}  // namespace

int DemoMain(int argc, char** argv) {
  int ranks = 2, steps = 20, frames = 8, height = 32, width = 32;
  int scale = 4;
  double guidance = 5.0;
  uint64_t seed = 42;
  bool keep_running = false;
  std::string out_dir = "denoised-demo-out";
  std::string model_flag;
  std::string prompt = "red square moving right";
  FlagSet flags("denoised demo",
                "Runs the whole service locally on CPU with the built-in demo "
                "model (a small pixel-space Wan2.1 trained on coloured shapes) "
                "and sends it one prompt; writes the clip as an animated GIF, "
                "a PNG contact sheet and the raw safetensors.");
  flags.String("prompt", &prompt,
               "what to draw: <colour> <shape> moving <direction> (an unknown "
               "word lists the model's vocabulary)");
  flags.String("model", &model_flag,
               "demo model folder (config.json, safetensors, prompts."
               "safetensors); default: $DENOISED_DEMO_MODEL, then "
               "../share/denoised/demo_model next to the binary, then the "
               "source tree's tools/demo_model");
  flags.Int("ranks", &ranks,
            "CPU ranks of the worker group (sequence-parallel degree; 1, 2 or "
            "4 for the demo model's 4 heads)");
  flags.Int("steps", &steps, "denoising steps of the demo request");
  flags.Int("frames", &frames, "video frames (pixel space)");
  flags.Int("height", &height, "height in pixels");
  flags.Int("width", &width, "width in pixels");
  flags.Double("guidance", &guidance, "CFG scale");
  flags.Uint64("seed", &seed, "seed of the noise");
  flags.Int("scale", &scale, "upscaling of the GIF and PNG (nearest), 1..64");
  flags.Bool("keep-running", &keep_running,
             "keep the service up after the request, until Ctrl-C");
  flags.String("out-dir", &out_dir, "where the result and the logs go");
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;
  auto usage = [](const std::string& msg) {
    std::fprintf(stderr, "denoised demo: %s\n", msg.c_str());
    return 2;
  };
  if (ranks < 1 || ranks > 4) return usage("--ranks must be 1..4");
  if (scale < 1 || scale > 64) return usage("--scale must be 1..64");

  // The model and its prompt table, checked before anything starts.
  absl::StatusOr<DemoModelSearch> found = FindDemoModel(model_flag);
  if (!found.ok()) return usage(std::string(found.status().message()));
  const bool stand_in = found->dir.empty();
  worker::WanConfig config;
  std::optional<worker::PromptTable> table;
  if (stand_in) {
    config = *worker::PresetConfig("demo-pixel");
    absl::StatusOr<worker::PromptTable> t = worker::PromptTable::Random(
        worker::DemoStandInVocabulary(), worker::kDemoStandInTokens,
        config.text_dim, /*seed=*/0, worker::kDemoGrammar);
    if (!t.ok()) return usage(std::string(t.status().message()));
    table = *std::move(t);
  } else {
    std::ifstream in(found->dir + "/config.json");
    std::stringstream text;
    text << in.rdbuf();
    absl::StatusOr<worker::WanConfig> c = worker::WanConfig::FromJson(text.str());
    if (!c.ok()) {
      return usage(absl::StrCat(found->dir, "/config.json: ", c.status().message()));
    }
    config = *c;
    absl::StatusOr<worker::PromptTable> t = worker::PromptTable::Load(
        absl::StrCat(found->dir, "/", kDemoPromptTableFile));
    if (!t.ok()) return usage(std::string(t.status().message()));
    table = *std::move(t);
  }
  if (config.out_channels != 3 || config.vae_stride != std::array<int, 3>{1, 1, 1}) {
    return usage(absl::StrCat(
        "the demo model must be pixel-space RGB (vae_stride [1, 1, 1], 3 "
        "channels); ", found->dir, " has ", config.out_channels, " channels"));
  }
  if (table->text_dim() != config.text_dim) {
    return usage(absl::StrCat("the prompt table has text_dim ",
                              table->text_dim(), ", the model ",
                              config.text_dim));
  }
  if (config.num_attention_heads % ranks != 0) {
    return usage(absl::StrCat("--ranks ", ranks, " does not divide the model's ",
                              config.num_attention_heads,
                              " attention heads (Ulysses splits heads)"));
  }
  absl::StatusOr<v1::Tensor> embeds = EmbedPrompt(*table, prompt);
  if (!embeds.ok()) return usage(std::string(embeds.status().message()));
  if (const std::string note = PartialPromptNote(*table, prompt); !note.empty())
    std::fprintf(stderr, "denoised demo: %s\n", note.c_str());

  // Ctrl-C / SIGTERM are taken by a thread (children live in their own
  // process groups, and are stopped in order).
  InstallStopSignalHandlers();
  static SignalState signal_state;
  std::thread(SignalLoop, &signal_state).detach();

  mkdir(out_dir.c_str(), 0755);
  const std::string coord_log = out_dir + "/coordinator.log";
  const std::string worker_log = out_dir + "/worker.log";
  const std::string ready_file = out_dir + "/coordinator.addr";
  const std::string result_path = out_dir + "/latents.safetensors";
  const std::string gif_path = out_dir + "/clip.gif";
  const std::string png_path = out_dir + "/clip.png";
  for (const std::string* f :
       {&coord_log, &worker_log, &ready_file, &result_path, &gif_path, &png_path}) {
    std::remove(f->c_str());
  }
  const auto t_start = Clock::now();

  if (stand_in) {
    std::printf(
        "denoised demo: WARNING: no trained demo model found (%s).\n"
        "Using a random-weight stand-in of the same architecture (preset "
        "demo-pixel, random prompt table):\nthe service runs for real, but "
        "the clip will be noise. Give --model DIR or set $%s.\n\n",
        absl::StrJoin(found->looked, "; ").c_str(), kDemoModelEnv);
  }
  std::printf(
      "denoised demo: the whole service on this machine, on CPU, with the "
      "demo model,\na small Wan2.1 DiT that draws coloured shapes in pixel "
      "space (%s).\nLogs go to %s/.\n\n",
      stand_in ? "random-weight stand-in"
               : absl::StrCat("from ", found->dir).c_str(),
      out_dir.c_str());

  auto fail = [&](const absl::Status& s) {
    std::fflush(stdout);
    std::fprintf(stderr, "\ndenoised demo failed: %s\n", s.ToString().c_str());
    std::fprintf(stderr, "  last lines of %s:\n%s", coord_log.c_str(),
                 Tail(coord_log, 8).c_str());
    std::fprintf(stderr, "  last lines of %s:\n%s", worker_log.c_str(),
                 Tail(worker_log, 12).c_str());
    return 1;
  };

  // 1. Coordinator.
  SpawnOptions co;
  co.args = {"coordinator", "--listen", "127.0.0.1:0", "--metrics-listen",
             "127.0.0.1:0", "--ready-file", ready_file};
  co.log_file = coord_log;
  co.new_process_group = true;
  absl::StatusOr<pid_t> cpid = Spawn(co);
  if (!cpid.ok()) return fail(cpid.status());
  Child coordinator("the coordinator", *cpid);
  signal_state.coordinator = *cpid;
  absl::StatusOr<std::map<std::string, std::string>> addrs =
      WaitReadyFile(ready_file, coordinator, std::chrono::seconds(30));
  if (!addrs.ok()) return fail(addrs.status());
  const std::string target = (*addrs)["listen"];
  const std::string coord_metrics = (*addrs)["metrics"];
  std::printf(
      "[1/5] coordinator   pid %d\n"
      "      gRPC          %s  (denoised.v1.Denoiser, grpc.health.v1, reflection;\n"
      "                    ranks attach here too)\n"
      "      metrics       http://%s/metrics\n",
      coordinator.pid(), target.c_str(), coord_metrics.c_str());

  // 2. Worker group.
  SpawnOptions wo;
  wo.args = {"worker", "--coordinator", target};
  if (stand_in) {
    wo.args.insert(wo.args.end(), {"--preset", "demo-pixel"});
  } else {
    wo.args.insert(wo.args.end(), {"--model", found->dir});
  }
  wo.args.insert(wo.args.end(),
                 {"--model-name", kDemoModelName, "--ranks", std::to_string(ranks),
                  "--backend", "cpu", "--name", "demo", "--metrics-listen",
                  "127.0.0.1:0"});
  wo.log_file = worker_log;
  wo.new_process_group = true;
  absl::StatusOr<pid_t> wpid = Spawn(wo);
  if (!wpid.ok()) return fail(wpid.status());
  Child worker("the worker group", *wpid);
  signal_state.worker = *wpid;
  std::printf(
      "[2/5] worker group  pid %d: `denoised worker` started %d rank "
      "process%s (%s, CPU);\n"
      "      they attach to the coordinator, form their process groups "
      "(Gloo over loopback),\n      load the model and warm up ... ",
      worker.pid(), ranks, ranks == 1 ? "" : "es",
      stand_in ? "preset \"demo-pixel\", random weights"
               : "the trained demo model");
  std::fflush(stdout);
  auto client_holder = std::make_unique<DenoiserClient>(target);
  DenoiserClient& client = *client_holder;
  const auto t_wait = Clock::now();
  absl::Status serving =
      client.WaitServing(std::chrono::seconds(180), [&]() -> absl::Status {
        if (absl::Status s = worker.Alive(); !s.ok()) return s;
        return coordinator.Alive();
      });
  if (!serving.ok()) return fail(serving);
  std::printf("health SERVING after %.1f s\n", Since(t_wait));
  absl::StatusOr<v1::ServerInfo> info = client.GetServerInfo();
  if (!info.ok()) return fail(info.status());
  std::vector<std::string> rank_metrics;
  for (const auto& g : info->groups()) {
    for (const auto& r : g.ranks()) {
      std::printf("      rank %d        %s, metrics http://%s/metrics\n", r.rank(),
                  r.device().c_str(), r.metrics_address().c_str());
      rank_metrics.push_back(r.metrics_address());
    }
  }
  absl::StatusOr<v1::ListModelsResponse> models = client.ListModels();
  if (!models.ok() || models->models_size() == 0) {
    return fail(models.ok() ? absl::NotFoundError("no model listed") : models.status());
  }
  const v1::ModelInfo& model = models->models(0);
  if (!IsPixelSpaceRgb(model)) {
    return fail(absl::FailedPreconditionError(absl::StrCat(
        "model \"", model.name(), "\" is not pixel-space RGB")));
  }

  // 3. One request.
  v1::GenerateRequest req;
  req.set_model(model.name());
  req.mutable_pixel_size()->set_frames(frames);
  req.mutable_pixel_size()->set_height(height);
  req.mutable_pixel_size()->set_width(width);
  req.set_steps(steps);
  req.set_guidance_scale(static_cast<float>(guidance));
  req.set_seed(seed);
  *req.mutable_prompt_embeds() = *embeds;
  // The empty prompt (zero rows) is the unconditional embedding of CFG.
  *req.mutable_negative_prompt_embeds() = *EmbedPrompt(*table, "");
  absl::StatusOr<v1::LatentShape> latent = ResolvePixelSize(req.pixel_size(), model);
  if (!latent.ok()) return fail(latent.status());
  std::printf(
      "\n[3/5] request       \"%s\" -> model \"%s\" (%d layers, %d heads x %d, "
      "text dim %d)\n"
      "      the prompt table turns the %zu words into embeddings [%d, %d] "
      "(what a text encoder\n      would send); %d frames %dx%d px RGB = "
      "%s, %lld tokens after 1x2x2 patching,\n"
      "      %d steps UniPC, CFG %.1f (each step runs the model twice), seed "
      "%llu\n",
      prompt.c_str(), model.name().c_str(), model.num_layers(),
      model.num_heads(), model.head_dim(), model.text_dim(),
      worker::PromptTable::Tokenize(prompt).size(), table->tokens(),
      table->text_dim(), frames, height, width, LatentString(*latent).c_str(),
      static_cast<long long>(LatentTokens(*latent, model)), steps, guidance,
      static_cast<unsigned long long>(seed));
  std::fflush(stdout);
  ProgressPrinter printer("      ");
  absl::StatusOr<v1::GenerateResult> result = client.Generate(
      req, std::chrono::minutes(10),
      [&](const v1::GenerateEvent& e) { return printer(e); });
  if (!result.ok()) return fail(result.status());
  std::printf("      done: %s ran on group %s (%d ranks, Ulysses sequence "
              "parallel) in %.2f s\n",
              result->request_id().c_str(),
              result->metadata().worker_group().c_str(),
              result->metadata().ranks(), result->run_seconds());

  // 4. Result.
  if (absl::Status s = WriteResult(
          result_path, *result,
          {{"frames", std::to_string(frames)},
           {"height", std::to_string(height)},
           {"width", std::to_string(width)},
           {"prompt", prompt},
           {"demo_model", stand_in ? "random stand-in (preset demo-pixel)"
                                   : found->dir}});
      !s.ok()) {
    return fail(s);
  }
  if (absl::Status s = WriteResultImages(*result, gif_path, png_path, scale);
      !s.ok()) {
    return fail(s);
  }
  std::printf(
      "\n[4/5] result        the clip \"%s\", %d frames of %dx%d shown %dx "
      "larger:\n"
      "      %s   animated GIF (open it in a browser or image viewer)\n"
      "      %s   the frames side by side (PNG)\n"
      "      %s   tensor \"latents\" f32 %s: the raw\n"
      "      pixels in [-1, 1] + metadata to reproduce them: seed, scheduler, "
      "steps, shift,\n      guidance, prompt, model config hash %.12s..., "
      "ranks, server version\n",
      prompt.c_str(), frames, width, height, scale, gif_path.c_str(),
      png_path.c_str(), result_path.c_str(),
      LatentString(result->metadata().latent_shape()).c_str(),
      result->metadata().model_config_hash().c_str());
  if (stand_in) {
    std::printf("      (random weights: expect noise, not a %s)\n",
                prompt.c_str());
  }

  // 5. Metrics.
  std::printf("\n[5/5] metrics (scraped from the /metrics endpoints above)\n");
  absl::StatusOr<std::string> text =
      HttpGet(coord_metrics, "/metrics", std::chrono::seconds(5));
  if (!text.ok()) return fail(text.status());
  std::vector<MetricSample> samples = ParseMetricsText(*text);
  const std::map<std::string, std::string> sel = {
      {"model", model.name()}, {"ranks", std::to_string(ranks)}};
  std::printf(
      "      coordinator   denoised_steps_total %g, step time p50 %s "
      "(slowest rank), all-to-all p50 %s,\n"
      "                    rank skew p50 %s, denoised_requests_total{code=\"OK\"} %g\n",
      SumSamples(samples, "denoised_steps_total", sel),
      Ms(HistogramQuantile(samples, "denoised_step_duration_seconds", 0.5, sel)).c_str(),
      Ms(HistogramQuantile(samples, "denoised_alltoall_duration_seconds", 0.5, sel)).c_str(),
      Ms(HistogramQuantile(samples, "denoised_rank_skew_seconds", 0.5, sel)).c_str(),
      SumSamples(samples, "denoised_requests_total",
                 {{"model", model.name()}, {"code", "OK"}}));
  for (size_t r = 0; r < rank_metrics.size(); ++r) {
    absl::StatusOr<std::string> rt =
        HttpGet(rank_metrics[r], "/metrics", std::chrono::seconds(5));
    if (!rt.ok()) return fail(rt.status());
    std::vector<MetricSample> rs = ParseMetricsText(*rt);
    std::printf("      rank %zu        denoised_rank_steps_total %g, own step time "
                "p50 %s\n",
                r, SumSamples(rs, "denoised_rank_steps_total"),
                Ms(HistogramQuantile(rs, "denoised_rank_step_duration_seconds", 0.5)).c_str());
  }

  if (keep_running) {
    // generate needs the same prompt table (the stand-in's is saved here).
    std::string table_path = absl::StrCat(found->dir, "/", kDemoPromptTableFile);
    if (stand_in) {
      table_path = out_dir + "/stand-in-prompts.safetensors";
      if (absl::Status s = table->Save(table_path); !s.ok()) return fail(s);
    }
    std::printf(
        "\nThe service keeps running (Ctrl-C stops it). Try, from another shell:\n"
        "  build/bin/denoised generate --target %s --model %s --frames %d "
        "--height %d --width %d \\\n"
        "      --steps %d --prompt \"%s\" --prompt-table %s \\\n"
        "      --gif /tmp/x.gif --png /tmp/x.png\n"
        "  curl -s http://%s/metrics | grep ^denoised_\n"
        "  grpcurl -plaintext %s list      # via server reflection\n",
        target.c_str(), model.name().c_str(), frames, height, width, steps,
        prompt.c_str(), table_path.c_str(), coord_metrics.c_str(),
        target.c_str());
    std::fflush(stdout);
    std::unique_lock<std::mutex> lock(signal_state.mu);
    signal_state.waiting = true;
    signal_state.cv.wait(lock, [] { return signal_state.signalled; });
    std::printf("\n");
  } else {
    std::lock_guard<std::mutex> lock(signal_state.mu);
    signal_state.waiting = true;  // a late Ctrl-C no longer kills anything
  }

  // Shut down: the worker group first (its ranks leave the coordinator),
  // then the coordinator.
  client_holder.reset();  // no idle connection delays the coordinator's exit
  signal_state.worker = -1;
  signal_state.coordinator = -1;
  const std::string worker_end = worker.Stop(std::chrono::seconds(15));
  const std::string coord_end = coordinator.Stop(std::chrono::seconds(10));
  std::printf(
      "\nshut down: worker group (%s), coordinator (%s); total %.1f s.\n"
      "Next: docs/SERVICE.md runs the same pieces by hand; docs/API.md "
      "describes the API,\ndocs/METRICS.md every metric.\n",
      worker_end.c_str(), coord_end.c_str(), Since(t_start));
  return 0;
}

}  // namespace dn::server
