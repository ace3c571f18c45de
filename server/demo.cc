#include "server/demo.h"

#include <sys/stat.h>
#include <unistd.h>

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
#include "comm/base/flags.h"
#include "server/client.h"
#include "server/metrics_scrape.h"
#include "server/process.h"
#include "server/proto_convert.h"
#include "server/request_validation.h"

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
  int ranks = 2, steps = 20, frames = 9, height = 64, width = 64;
  int text_len = 128;
  double guidance = 5.0;
  uint64_t seed = 42;
  bool keep_running = false;
  std::string out_dir = "denoised-demo-out";
  FlagSet flags("denoised demo",
                "Runs the whole service locally on CPU with the built-in tiny "
                "model and sends it one request.");
  flags.Int("ranks", &ranks, "CPU ranks of the worker group (sequence-parallel degree)");
  flags.Int("steps", &steps, "denoising steps of the demo request");
  flags.Int("frames", &frames, "video frames (pixel space)");
  flags.Int("height", &height, "height in pixels");
  flags.Int("width", &width, "width in pixels");
  flags.Int("text-len", &text_len, "tokens of the random prompt embeddings");
  flags.Double("guidance", &guidance, "CFG scale");
  flags.Uint64("seed", &seed, "seed of the noise and of the embeddings");
  flags.Bool("keep-running", &keep_running,
             "keep the service up after the request, until Ctrl-C");
  flags.String("out-dir", &out_dir, "where the result and the logs go");
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;
  if (ranks < 1 || ranks > 4) {
    std::fprintf(stderr, "denoised demo: --ranks must be 1..4 (the tiny model has 4 heads)\n");
    return 2;
  }

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
  std::remove(coord_log.c_str());
  std::remove(worker_log.c_str());
  std::remove(ready_file.c_str());
  const auto t_start = Clock::now();

  std::printf(
      "denoised demo: the whole service on this machine, on CPU, with the "
      "built-in tiny Wan2.1-style model\n(random weights: the numbers are "
      "real compute, the picture is not). Logs go to %s/.\n\n",
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
  wo.args = {"worker", "--coordinator", target, "--preset", "tiny", "--ranks",
             std::to_string(ranks), "--backend", "cpu", "--name", "tiny-demo",
             "--metrics-listen", "127.0.0.1:0"};
  wo.log_file = worker_log;
  wo.new_process_group = true;
  absl::StatusOr<pid_t> wpid = Spawn(wo);
  if (!wpid.ok()) return fail(wpid.status());
  Child worker("the worker group", *wpid);
  signal_state.worker = *wpid;
  std::printf(
      "[2/5] worker group  pid %d: `denoised worker` started %d rank "
      "process%s (preset \"tiny\", CPU);\n"
      "      they attach to the coordinator, form their process groups "
      "(Gloo over loopback),\n      load the model and warm up ... ",
      worker.pid(), ranks, ranks == 1 ? "" : "es");
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

  // 3. One request.
  v1::GenerateRequest req;
  req.set_model(model.name());
  req.mutable_pixel_size()->set_frames(frames);
  req.mutable_pixel_size()->set_height(height);
  req.mutable_pixel_size()->set_width(width);
  req.set_steps(steps);
  req.set_guidance_scale(static_cast<float>(guidance));
  req.set_seed(seed);
  *req.mutable_prompt_embeds() = SeededEmbeds(seed, text_len, model.text_dim());
  absl::StatusOr<v1::LatentShape> latent = ResolvePixelSize(req.pixel_size(), model);
  if (!latent.ok()) return fail(latent.status());
  std::printf(
      "\n[3/5] request       model \"%s\" (%d layers, %d heads x %d, text dim %d)\n"
      "      %d frames %dx%d px -> latent %s = %lld tokens after 1x2x2 patching,\n"
      "      %d steps UniPC, CFG %.1f (each step runs the model twice), seed %llu,\n"
      "      random prompt embeddings [%d, %d] (a real client sends its text "
      "encoder's output)\n",
      model.name().c_str(), model.num_layers(), model.num_heads(),
      model.head_dim(), model.text_dim(), frames, height, width,
      LatentString(*latent).c_str(),
      static_cast<long long>(LatentTokens(*latent, model)), steps, guidance,
      static_cast<unsigned long long>(seed), text_len, model.text_dim());
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
           {"embeds", absl::StrCat("random, text_len ", text_len)}});
      !s.ok()) {
    return fail(s);
  }
  std::printf(
      "\n[4/5] result        %s\n"
      "      tensor \"latents\" f32 %s (denoised latents; the Wan VAE, not "
      "part of denoised,\n      turns them into pixels) + metadata to "
      "reproduce it: seed, scheduler, steps,\n      shift, guidance, model "
      "config hash %.12s..., ranks, server version\n",
      result_path.c_str(), LatentString(result->metadata().latent_shape()).c_str(),
      result->metadata().model_config_hash().c_str());

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
    std::printf(
        "\nThe service keeps running (Ctrl-C stops it). Try, from another shell:\n"
        "  build/bin/denoised generate --target %s --model %s --frames 9 "
        "--height 64 --width 64 --steps 10 --out /tmp/x.safetensors\n"
        "  curl -s http://%s/metrics | grep ^denoised_\n"
        "  grpcurl -plaintext %s list      # via server reflection\n",
        target.c_str(), model.name().c_str(), coord_metrics.c_str(),
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
