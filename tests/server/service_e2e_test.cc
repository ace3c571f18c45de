// The whole service as real processes on loopback: a `denoised coordinator`
// and two `denoised worker` groups of the tiny preset on CPU (1 rank and 2
// ranks), driven through the C++ client. Results are compared bit for bit
// with `denoised run` (the engine without the service) at the same seed,
// shape and rank count.
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/client.h"
#include "server/metrics_scrape.h"
#include "base/process.h"
#include "tests/server/service_test_util.h"
#include "worker/wan_config.h"
#include "worker/safetensors.h"

namespace dn::server {
namespace {

namespace v1 = ::denoised::v1;
using ::dn::server::testing::CoordinatorProc;
using ::dn::server::testing::Proc;
using ::dn::server::testing::PromtoolCheck;
using ::dn::server::testing::ReadFile;
using ::dn::server::testing::Scrape;
using ::dn::server::testing::StartCoordinator;
using ::dn::server::testing::StartTinyGroup;
using ::dn::server::testing::TempDir;
using ::dn::server::testing::TinyRequest;
using ::dn::server::testing::WaitGroups;
using ::testing::HasSubstr;

constexpr int kTextLen = 8;
// Ranks present it in Hello and in every store call of their rendezvous.
constexpr char kSecret[] = "e2e-secret";

// A request that runs for tens of seconds on the tiny model (about 50 ms a
// step on one CPU rank): long enough to be cancelled, stopped or failed
// mid-run on any machine.
v1::GenerateRequest LongRequest(uint64_t seed) {
  return TinyRequest(9, 256, 256, 1000, seed, kTextLen);
}

// A streamed call in a thread that records its events; `stop_at_step` >= 0
// cancels the call from the client side at that step.
class StreamCall {
 public:
  StreamCall(const std::string& target, v1::GenerateRequest req,
             int stop_at_step = -1)
      : client_(target) {
    done_ = std::async(std::launch::async, [this, req, stop_at_step] {
      return client_.Generate(req, std::chrono::seconds(120),
                              [this, stop_at_step](const v1::GenerateEvent& e) {
                                std::lock_guard<std::mutex> lock(mu_);
                                events_.push_back(e);
                                if (e.has_started()) started_ = true;
                                if (e.has_step()) steps_seen_ = e.step().index() + 1;
                                return !(e.has_step() && e.step().index() == stop_at_step);
                              });
    });
  }
  absl::StatusOr<v1::GenerateResult> Wait() { return done_.get(); }
  // Whether the call ended within `timeout` (a hang guard).
  bool WaitFor(std::chrono::seconds timeout) {
    return done_.wait_for(timeout) == std::future_status::ready;
  }
  bool started() {
    std::lock_guard<std::mutex> lock(mu_);
    return started_;
  }
  int steps_seen() {
    std::lock_guard<std::mutex> lock(mu_);
    return steps_seen_;
  }
  std::vector<v1::GenerateEvent> events() {
    std::lock_guard<std::mutex> lock(mu_);
    return events_;
  }
  // Waits (bounded) until the call has `n` Step events.
  bool WaitSteps(int n) {
    for (int i = 0; i < 3000 && steps_seen() < n; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return steps_seen() >= n;
  }

 private:
  DenoiserClient client_;
  std::mutex mu_;
  std::vector<v1::GenerateEvent> events_;
  bool started_ = false;
  int steps_seen_ = 0;
  std::future<absl::StatusOr<v1::GenerateResult>> done_;
};

class ServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    absl::StatusOr<std::unique_ptr<CoordinatorProc>> c =
        // The mid-run deadline test needs a deadline shorter than the
        // request's estimate, which admission by cost would reject up front
        // (tests/server/reliability_test.cc covers admission).
        StartCoordinator(dir_->path(), {"--max-queue", "2", "--secret", kSecret,
                                        "--admission-by-cost=false"});
    ASSERT_TRUE(c.ok()) << c.status();
    coord_ = c->release();
    client_ = new DenoiserClient(coord_->target);
    // Before any group is ready the service is not serving.
    health_before_ = client_->Health().value_or("unreachable");
    mkdir((dir_->path() + "/loras").c_str(), 0755);
    g1_ = new Proc(StartTinyGroup(coord_->target, "g1", 1, dir_->path() + "/g1.log",
                                  {"--secret", kSecret, "--lora-dir", dir_->path() + "/loras"}));
    g2_ = new Proc(StartTinyGroup(coord_->target, "g2", 2, dir_->path() + "/g2.log",
                                  {"--secret", kSecret, "--lora-dir", dir_->path() + "/loras"}));
    const absl::Status ready =
        WaitGroups(*client_, {"g1", "g2"}, v1::GROUP_STATE_READY,
                   std::chrono::seconds(120));
    ASSERT_TRUE(ready.ok()) << ready << "\n" << ReadFile(dir_->path() + "/g1.log")
                            << ReadFile(dir_->path() + "/g2.log")
                            << ReadFile(coord_->log);
  }
  static void TearDownTestSuite() {
    // Workers first (their ranks leave), then the coordinator.
    const int s1 = g1_ ? g1_->Stop() : -1;
    const int s2 = g2_ ? g2_->Stop() : -1;
    EXPECT_EQ(s1, 0) << DescribeWaitStatus(s1);  // a clean exit after SIGTERM
    EXPECT_EQ(s2, 0) << DescribeWaitStatus(s2);
    delete g1_;
    delete g2_;
    delete client_;
    if (coord_) {
      EXPECT_EQ(coord_->proc.Stop(), 0);
    }
    delete coord_;
    delete dir_;
  }

  static std::map<std::string, v1::WorkerGroupInfo> Groups() {
    std::map<std::string, v1::WorkerGroupInfo> out;
    absl::StatusOr<v1::ServerInfo> info = client_->GetServerInfo();
    EXPECT_TRUE(info.ok()) << info.status();
    if (info.ok()) {
      for (const auto& g : info->groups()) out[g.name()] = g;
    }
    return out;
  }
  // Runs `denoised run` and returns the raw bytes of its latents.
  static absl::StatusOr<std::string> RunEngine(int ranks, int frames,
                                               int height, int width,
                                               int steps, uint64_t seed) {
    const std::string out =
        absl::StrCat(dir_->path(), "/run-", ranks, "-", seed, ".safetensors");
    SpawnOptions o;
    o.exe = DENOISED_BIN;
    o.args = {"run", "--preset", "tiny", "--ranks", std::to_string(ranks),
              "--threads", "1", "--frames", std::to_string(frames), "--height",
              std::to_string(height), "--width", std::to_string(width),
              "--steps", std::to_string(steps), "--seed", std::to_string(seed),
              "--guidance", "5", "--text-len", std::to_string(kTextLen),
              "--out", out};
    o.log_file = dir_->path() + "/run.log";
    absl::StatusOr<pid_t> pid = Spawn(o);
    if (!pid.ok()) return pid.status();
    std::optional<int> status = WaitPid(*pid, std::chrono::seconds(120));
    if (!status.has_value()) {
      Terminate(*pid, std::chrono::seconds(1));
      return absl::DeadlineExceededError("denoised run timed out");
    }
    if (*status != 0) {
      return absl::InternalError("denoised run failed: " +
                                 ReadFile(dir_->path() + "/run.log"));
    }
    auto file = worker::SafetensorsFile::Open(out);
    if (!file.ok()) return file.status();
    const worker::SafetensorsEntry* e = (*file)->Find("latents");
    if (e == nullptr) return absl::NotFoundError("no latents in " + out);
    return std::string(reinterpret_cast<const char*>((*file)->RawData(*e)),
                       e->nbytes());
  }

  static TempDir* dir_;
  static CoordinatorProc* coord_;
  static DenoiserClient* client_;
  static Proc* g1_;
  static Proc* g2_;
  static std::string health_before_;
};

TempDir* ServiceTest::dir_ = nullptr;
CoordinatorProc* ServiceTest::coord_ = nullptr;
DenoiserClient* ServiceTest::client_ = nullptr;
Proc* ServiceTest::g1_ = nullptr;
Proc* ServiceTest::g2_ = nullptr;
std::string ServiceTest::health_before_;

TEST_F(ServiceTest, HealthFollowsTheGroups) {
  EXPECT_EQ(health_before_, "NOT_SERVING");
  EXPECT_EQ(client_->Health().value_or("?"), "SERVING");
  EXPECT_EQ(client_->Health("denoised.v1.Denoiser").value_or("?"), "SERVING");
  const auto groups = Groups();
  ASSERT_EQ(groups.count("g1"), 1u);
  ASSERT_EQ(groups.count("g2"), 1u);
  EXPECT_EQ(groups.at("g1").world_size(), 1);
  EXPECT_EQ(groups.at("g2").world_size(), 2);
  EXPECT_EQ(groups.at("g2").ranks_size(), 2);
  EXPECT_EQ(groups.at("g2").backend(), "cpu");
  // The ranks describe the model, limits included (admission checks them).
  absl::StatusOr<v1::ListModelsResponse> models = client_->ListModels();
  ASSERT_TRUE(models.ok()) << models.status();
  ASSERT_EQ(models->models_size(), 1);
  const absl::StatusOr<worker::WanConfig> tiny = worker::PresetConfig("tiny");
  ASSERT_TRUE(tiny.ok());
  EXPECT_EQ(models->models(0).max_axis_tokens(), tiny->rope_max_seq_len);
  EXPECT_GT(models->models(0).max_tokens(), 0);
}

// Several clients at once: each stream is Accepted, Started, one Step per
// step, Result; both groups get work; every result equals `denoised run`
// bit for bit; the metrics count every step.
TEST_F(ServiceTest, ConcurrentClientsMatchTheEngine) {
  constexpr int kClients = 4;  // 2 run, 2 wait (--max-queue 2)
  constexpr int kSteps = 5;
  std::vector<std::unique_ptr<StreamCall>> calls;
  for (int i = 0; i < kClients; ++i) {
    calls.push_back(std::make_unique<StreamCall>(
        coord_->target, TinyRequest(5, 64, 32, kSteps, 100 + i, kTextLen)));
  }
  std::map<int, std::pair<uint64_t, std::string>> one_result_per_ranks;
  std::set<std::string> groups_used;
  for (int i = 0; i < kClients; ++i) {
    absl::StatusOr<v1::GenerateResult> r = calls[static_cast<size_t>(i)]->Wait();
    ASSERT_TRUE(r.ok()) << "client " << i << ": " << r.status();
    const auto events = calls[static_cast<size_t>(i)]->events();
    ASSERT_EQ(events.size(), static_cast<size_t>(kSteps + 3));
    EXPECT_TRUE(events[0].has_accepted());
    EXPECT_TRUE(events[1].has_started());
    for (int s = 0; s < kSteps; ++s) {
      const v1::GenerateEvent& e = events[static_cast<size_t>(2 + s)];
      ASSERT_TRUE(e.has_step());
      EXPECT_EQ(e.step().index(), s);
      EXPECT_EQ(e.step().total(), kSteps);
      EXPECT_GT(e.step().step_seconds(), 0);
    }
    EXPECT_TRUE(events.back().has_result());
    const v1::GenerationMetadata& md = r->metadata();
    EXPECT_EQ(md.seed(), static_cast<uint64_t>(100 + i));
    EXPECT_EQ(md.steps(), kSteps);
    EXPECT_EQ(md.backend(), "cpu");
    EXPECT_EQ(md.latent_shape().frames(), 2);
    EXPECT_EQ(md.latent_shape().height(), 8);
    EXPECT_EQ(md.latent_shape().width(), 4);
    EXPECT_EQ(events[1].started().worker_group(), md.worker_group());
    groups_used.insert(md.worker_group());
    one_result_per_ranks[md.ranks()] = {md.seed(), r->latents().data()};
  }
  EXPECT_EQ(groups_used, (std::set<std::string>{"g1", "g2"}));

  // Bit-identical to the engine run directly, per rank count.
  for (const auto& [ranks, seed_and_bytes] : one_result_per_ranks) {
    absl::StatusOr<std::string> expected =
        RunEngine(ranks, 5, 64, 32, kSteps, seed_and_bytes.first);
    ASSERT_TRUE(expected.ok()) << expected.status();
    ASSERT_EQ(expected->size(), seed_and_bytes.second.size());
    EXPECT_TRUE(*expected == seed_and_bytes.second)
        << "service result differs from `denoised run` at ranks=" << ranks;
  }

  // Metrics: valid exposition, and the step histogram counts every step.
  absl::StatusOr<std::string> text =
      HttpGet(coord_->metrics, "/metrics", std::chrono::seconds(5));
  ASSERT_TRUE(text.ok()) << text.status();
  absl::StatusOr<std::string> check = PromtoolCheck(*text, dir_->path());
  EXPECT_TRUE(check.ok()) << check.status();
  const std::vector<MetricSample> m = ParseMetricsText(*text);
  EXPECT_EQ(SumSamples(m, "denoised_step_duration_seconds_count"), kClients * kSteps);
  EXPECT_EQ(SumSamples(m, "denoised_steps_total"), kClients * kSteps);
  EXPECT_EQ(SumSamples(m, "denoised_alltoall_duration_seconds_count"), kClients * kSteps);
  EXPECT_EQ(SumSamples(m, "denoised_requests_total", {{"code", "OK"}}), kClients);
  EXPECT_EQ(SumSamples(m, "denoised_worker_groups", {{"state", "ready"}}), 2);
  // Each rank's own endpoint: valid, and its steps match its group's share.
  const auto groups = Groups();
  double g2_steps = SumSamples(m, "denoised_steps_total", {{"ranks", "2"}});
  for (const auto& rank : groups.at("g2").ranks()) {
    absl::StatusOr<std::string> rt =
        HttpGet(rank.metrics_address(), "/metrics", std::chrono::seconds(5));
    ASSERT_TRUE(rt.ok()) << rt.status();
    absl::StatusOr<std::string> rc = PromtoolCheck(*rt, dir_->path());
    EXPECT_TRUE(rc.ok()) << rc.status();
    const auto rm = ParseMetricsText(*rt);
    EXPECT_EQ(SumSamples(rm, "denoised_rank_steps_total"), g2_steps);
    EXPECT_EQ(SumSamples(rm, "denoised_rank_step_duration_seconds_count"), g2_steps);
    EXPECT_EQ(SumSamples(rm, "denoised_rank_info", {{"backend", "cpu"}}), 1);
  }
}

// Per-request LoRA through the service: a file added to --lora-dir after the
// groups started shows in ListModels and is usable; a LoRA request matches
// `denoised run --lora` bit for bit; requests without LoRA give the same bytes
// before and after it; an unknown LoRA is NOT_FOUND and the groups keep
// serving.
TEST_F(ServiceTest, LoraRequestsThroughTheService) {
  const std::string ldir = dir_->path() + "/loras";
  SpawnOptions mk;
  mk.exe = DENOISED_BIN;
  mk.args = {"make-checkpoint", "--preset", "tiny", "--seed", "5", "--lora-rank", "3",
             "--lora-format", "original", "--lora-out", ldir + "/style.safetensors"};
  mk.log_file = dir_->path() + "/make-lora.log";
  absl::StatusOr<pid_t> pid = Spawn(mk);
  ASSERT_TRUE(pid.ok()) << pid.status();
  ASSERT_EQ(WaitPid(*pid, std::chrono::seconds(60)).value_or(-1), 0);
  bool listed = false;
  for (int i = 0; i < 100 && !listed; ++i) {
    absl::StatusOr<v1::ListModelsResponse> models = client_->ListModels();
    ASSERT_TRUE(models.ok()) << models.status();
    for (const auto& m : models->models())
      for (const auto& l : m.loras()) listed |= l == "style";
    if (!listed) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_TRUE(listed) << "ListModels does not show a LoRA added after start";
  constexpr int kSteps = 3;
  v1::GenerateRequest base = TinyRequest(5, 64, 32, kSteps, 42, kTextLen);
  auto before = client_->Generate(base, std::chrono::seconds(60), {});
  ASSERT_TRUE(before.ok()) << before.status();
  v1::GenerateRequest with = base;
  v1::LoraRef* l = with.add_lora();
  l->set_name("style");
  l->set_scale(0.75f);
  auto lora = client_->Generate(with, std::chrono::seconds(60), {});
  ASSERT_TRUE(lora.ok()) << lora.status();
  EXPECT_NE(lora->latents().data(), before->latents().data());
  const auto groups_before = Groups();
  v1::GenerateRequest missing = base;
  missing.add_lora()->set_name("absent");
  auto nf = client_->Generate(missing, std::chrono::seconds(60), {});
  EXPECT_EQ(nf.status().code(), absl::StatusCode::kNotFound) << nf.status();
  // Not a group failure: no restart (same generations, still ready).
  for (const auto& [name, g] : Groups()) {
    EXPECT_EQ(g.generation(), groups_before.at(name).generation()) << name;
    EXPECT_NE(g.state(), v1::GROUP_STATE_FAILED) << name;
  }
  auto after = client_->Generate(base, std::chrono::seconds(60), {});
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_TRUE(after->latents().data() == before->latents().data())
      << "a request without LoRA changed after LoRA requests";
  // The same LoRA through `denoised run` (rank invariance: any group's bytes).
  const std::string out = dir_->path() + "/run-lora.safetensors";
  SpawnOptions o;
  o.exe = DENOISED_BIN;
  o.args = {"run", "--preset", "tiny", "--ranks", "1", "--threads", "1", "--frames", "5",
            "--height", "64", "--width", "32", "--steps", std::to_string(kSteps), "--seed", "42",
            "--guidance", "5", "--text-len", std::to_string(kTextLen), "--lora-dir", ldir,
            "--lora", "style:0.75", "--out", out};
  o.log_file = dir_->path() + "/run-lora.log";
  pid = Spawn(o);
  ASSERT_TRUE(pid.ok()) << pid.status();
  ASSERT_EQ(WaitPid(*pid, std::chrono::seconds(120)).value_or(-1), 0)
      << ReadFile(o.log_file);
  auto file = worker::SafetensorsFile::Open(out);
  ASSERT_TRUE(file.ok()) << file.status();
  const worker::SafetensorsEntry* e = (*file)->Find("latents");
  ASSERT_NE(e, nullptr);
  EXPECT_TRUE(std::string(reinterpret_cast<const char*>((*file)->RawData(*e)), e->nbytes()) ==
              lora->latents().data())
      << "service LoRA result differs from `denoised run --lora`";
}

TEST_F(ServiceTest, InvalidRequestLeavesTheRunningOneAlone) {
  StreamCall running(coord_->target, TinyRequest(5, 64, 64, 30, 7, kTextLen));
  ASSERT_TRUE(running.WaitSteps(1));
  v1::GenerateRequest bad = TinyRequest(5, 64, 64, 5000, 8, kTextLen);
  absl::StatusOr<v1::GenerateResult> r =
      client_->Generate(bad, std::chrono::seconds(10), {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("steps"));
  absl::StatusOr<v1::GenerateResult> ok = running.Wait();
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->metadata().steps(), 30);
}

TEST_F(ServiceTest, CancelMidRunFreesTheGroup) {
  // Client-side cancellation at step 3 of a long request.
  StreamCall cancelled(coord_->target, LongRequest(11),
                       /*stop_at_step=*/3);
  EXPECT_EQ(cancelled.Wait().status().code(), absl::StatusCode::kCancelled);
  // The Cancel RPC, by client_request_id, while a duplicate id is refused.
  v1::GenerateRequest req = LongRequest(12);
  req.set_client_request_id("e2e-cancel");
  StreamCall by_rpc(coord_->target, req);
  ASSERT_TRUE(by_rpc.WaitSteps(2));
  EXPECT_EQ(client_->Generate(req, std::chrono::seconds(10), {}).status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(client_->Cancel("e2e-cancel").value_or(false), true);
  EXPECT_EQ(by_rpc.Wait().status().code(), absl::StatusCode::kCancelled);
  EXPECT_LT(by_rpc.steps_seen(), 1000);
  // Both groups come back READY and serve again.
  ASSERT_TRUE(WaitGroups(*client_, {"g1", "g2"}, v1::GROUP_STATE_READY,
                         std::chrono::seconds(60))
                  .ok());
  absl::StatusOr<v1::GenerateResult> after = client_->Generate(
      TinyRequest(5, 64, 64, 2, 13, kTextLen), std::chrono::seconds(60), {});
  EXPECT_TRUE(after.ok()) << after.status();
  const auto m = Scrape(coord_->metrics);
  EXPECT_GE(SumSamples(m, "denoised_requests_total", {{"code", "CANCELLED"}}), 2);
}

TEST_F(ServiceTest, DeadlineMidRunStopsTheGroup) {
  bool started = false;
  absl::StatusOr<v1::GenerateResult> late = client_->Generate(
      LongRequest(14), std::chrono::seconds(1),
      [&](const v1::GenerateEvent& e) {
        started = started || e.has_started();
        return true;
      });
  EXPECT_EQ(late.status().code(), absl::StatusCode::kDeadlineExceeded);
  ASSERT_TRUE(started) << "the request never reached a group within its deadline";
  ASSERT_TRUE(WaitGroups(*client_, {"g1", "g2"}, v1::GROUP_STATE_READY,
                         std::chrono::seconds(60))
                  .ok());
  std::vector<MetricSample> m;
  for (int i = 0; i < 500; ++i) {  // the ranks' answer lands just after
    m = Scrape(coord_->metrics);
    if (SumSamples(m, "denoised_requests_total", {{"code", "DEADLINE_EXCEEDED"}}) >= 1) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(SumSamples(m, "denoised_requests_total", {{"code", "DEADLINE_EXCEEDED"}}), 1);
  EXPECT_LT(SumSamples(m, "denoised_steps_total"), 1000);  // it really stopped
}

TEST_F(ServiceTest, FullQueueIsResourceExhausted) {
  // Occupy both groups, fill the queue (2), then one more.
  std::vector<std::unique_ptr<StreamCall>> calls;
  for (int i = 0; i < 4; ++i) {
    v1::GenerateRequest req = LongRequest(20 + i);
    req.set_client_request_id(absl::StrCat("fill-", i));
    calls.push_back(std::make_unique<StreamCall>(coord_->target, req));
    if (i < 2) {
      ASSERT_TRUE(calls.back()->WaitSteps(1));
    }
  }
  for (int i = 0; i < 200; ++i) {  // the two queued ones are admitted
    const auto m = Scrape(coord_->metrics);
    if (SumSamples(m, "denoised_queue_depth", {{"model", "tiny"}}) == 2) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  absl::StatusOr<v1::GenerateResult> full = client_->Generate(
      TinyRequest(5, 64, 64, 2, 30, kTextLen), std::chrono::seconds(10), {});
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(client_->Cancel(absl::StrCat("fill-", i)).value_or(false), true);
  }
  for (auto& c : calls) {
    EXPECT_EQ(c->Wait().status().code(), absl::StatusCode::kCancelled);
  }
  ASSERT_TRUE(WaitGroups(*client_, {"g1", "g2"}, v1::GROUP_STATE_READY,
                         std::chrono::seconds(60))
                  .ok());
}

// Kept last: it restarts g2. A rank dies mid-request: the request fails with
// UNAVAILABLE, the launcher restarts the whole group as generation 2, the
// coordinator counts the restart and the group serves again.
TEST_F(ServiceTest, RankCrashRestartsTheGroup) {
  std::vector<std::unique_ptr<StreamCall>> calls;
  for (int i = 0; i < 2; ++i) {
    calls.push_back(std::make_unique<StreamCall>(
        coord_->target, LongRequest(40 + i)));
    ASSERT_TRUE(calls.back()->WaitSteps(1));
  }
  std::string on_g2;
  for (const auto& e : calls[1]->events()) {
    if (e.has_started()) on_g2 = e.started().worker_group();
  }
  const size_t g2_call = on_g2 == "g2" ? 1 : 0;
  const std::vector<pid_t> ranks = testing::Children(g2_->pid());
  ASSERT_EQ(ranks.size(), 2u);
  const auto killed = std::chrono::steady_clock::now();
  ASSERT_EQ(kill(ranks[1], SIGKILL), 0);
  // The request ends with a clear error, well under a minute (hang guard;
  // the measured time is printed for docs/RELIABILITY.md).
  ASSERT_TRUE(calls[g2_call]->WaitFor(std::chrono::seconds(60)));
  const double fail_s = std::chrono::duration<double>(
                            std::chrono::steady_clock::now() - killed).count();
  const absl::Status failed = calls[g2_call]->Wait().status();
  EXPECT_EQ(failed.code(), absl::StatusCode::kUnavailable) << failed;
  EXPECT_THAT(std::string(failed.message()), HasSubstr("g2"));
  EXPECT_TRUE(client_->Cancel(calls[1 - g2_call]->events()[0].accepted().request_id())
                  .value_or(false));
  EXPECT_EQ(calls[1 - g2_call]->Wait().status().code(), absl::StatusCode::kCancelled);
  // Generation 2 forms and serves.
  bool restarted = false;
  for (int i = 0; i < 600 && !restarted; ++i) {
    const auto groups = Groups();
    restarted = groups.count("g2") && groups.at("g2").generation() == 2 &&
                groups.at("g2").state() == v1::GROUP_STATE_READY;
    if (!restarted) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_TRUE(restarted) << ReadFile(dir_->path() + "/g2.log");
  std::printf("rank SIGKILL: request failed after %.2f s, group READY again "
              "(generation 2) %.2f s after the kill\n",
              fail_s, std::chrono::duration<double>(
                          std::chrono::steady_clock::now() - killed).count());
  const auto m = Scrape(coord_->metrics);
  EXPECT_EQ(SumSamples(m, "denoised_worker_group_restarts_total", {{"group", "g2"}}), 1);
  std::vector<std::unique_ptr<StreamCall>> after;
  for (int i = 0; i < 2; ++i) {  // one lands on each group
    after.push_back(std::make_unique<StreamCall>(
        coord_->target, TinyRequest(5, 64, 64, 20, 50 + i, kTextLen)));
  }
  std::set<std::string> used;
  for (auto& c : after) {
    absl::StatusOr<v1::GenerateResult> r = c->Wait();
    ASSERT_TRUE(r.ok()) << r.status();
    used.insert(r->metadata().worker_group());
  }
  EXPECT_EQ(used, (std::set<std::string>{"g1", "g2"}));
}

// Image-to-video through the service (Wan2.1-I2V shape, tiny): image tokens
// and the 20-channel condition travel in the request, ListModels says kind
// i2v, the result equals `denoised run` with the same files bit for bit, and
// image_embeds are refused by a t2v model and required by the i2v one.
TEST_F(ServiceTest, ImageToVideoThroughTheService) {
  Proc g3({"worker", "--coordinator", coord_->target, "--preset", "tiny-i2v-14b", "--ranks", "2",
           "--backend", "cpu", "--name", "g3", "--threads", "1", "--metrics-listen",
           "127.0.0.1:0", "--secret", kSecret},
          dir_->path() + "/g3.log");
  const absl::Status ready =
      WaitGroups(*client_, {"g3"}, v1::GROUP_STATE_READY, std::chrono::seconds(120));
  ASSERT_TRUE(ready.ok()) << ready << ReadFile(dir_->path() + "/g3.log");
  absl::StatusOr<v1::ListModelsResponse> models = client_->ListModels();
  ASSERT_TRUE(models.ok()) << models.status();
  bool found = false;
  for (const auto& m : models->models()) {
    if (m.name() != "tiny-i2v-14b") continue;
    found = true;
    EXPECT_EQ(m.kind(), "i2v");
    EXPECT_EQ(m.image_dim(), 24);
    EXPECT_EQ(m.in_channels(), 36);
  }
  ASSERT_TRUE(found);
  // Inputs: image tokens [11, 24], condition [20, F 2, H 8, W 4].
  auto make = [](const worker::Shape& shape, uint32_t seed) {
    std::vector<float> v(static_cast<size_t>(worker::NumElements(shape)));
    uint32_t x = seed;
    for (float& f : v) {
      x = x * 1664525u + 1013904223u;
      f = static_cast<float>(x >> 8) / 16777216.0f - 0.5f;
    }
    return v;
  };
  const worker::Shape ishape = {11, 24}, cshape = {20, 2, 8, 4};
  const std::vector<float> image = make(ishape, 1), cond = make(cshape, 2);
  auto to_proto = [](const worker::Shape& shape, const std::vector<float>& v) {
    v1::Tensor t;
    t.set_dtype(v1::DTYPE_F32);
    for (int64_t d : shape) t.add_shape(d);
    t.set_data(std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float)));
    return t;
  };
  const std::string ipath = dir_->path() + "/i2v-image.safetensors";
  const std::string cpath = dir_->path() + "/i2v-cond.safetensors";
  ASSERT_TRUE(worker::WriteSafetensors(ipath, {{"image_embeds", worker::DType::kF32, ishape,
                                                image.data()}}).ok());
  ASSERT_TRUE(worker::WriteSafetensors(cpath, {{"condition_latents", worker::DType::kF32, cshape,
                                                cond.data()}}).ok());
  constexpr int kSteps = 3;
  v1::GenerateRequest req = TinyRequest(5, 64, 32, kSteps, 42, kTextLen);
  req.set_model("tiny-i2v-14b");
  *req.mutable_image_embeds() = to_proto(ishape, image);
  *req.mutable_condition_latents() = to_proto(cshape, cond);
  auto r = client_->Generate(req, std::chrono::seconds(60), {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->latents().shape(0), 16);  // the sampler state: out_channels
  const std::string out = dir_->path() + "/run-i2v.safetensors";
  SpawnOptions o;
  o.exe = DENOISED_BIN;
  o.args = {"run", "--preset", "tiny-i2v-14b", "--ranks", "1", "--threads", "1", "--frames", "5",
            "--height", "64", "--width", "32", "--steps", std::to_string(kSteps), "--seed", "42",
            "--guidance", "5", "--text-len", std::to_string(kTextLen), "--image-embeds", ipath,
            "--condition", cpath, "--out", out};
  o.log_file = dir_->path() + "/run-i2v.log";
  absl::StatusOr<pid_t> pid = Spawn(o);
  ASSERT_TRUE(pid.ok()) << pid.status();
  ASSERT_EQ(WaitPid(*pid, std::chrono::seconds(120)).value_or(-1), 0) << ReadFile(o.log_file);
  auto file = worker::SafetensorsFile::Open(out);
  ASSERT_TRUE(file.ok()) << file.status();
  const worker::SafetensorsEntry* e = (*file)->Find("latents");
  ASSERT_NE(e, nullptr);
  EXPECT_TRUE(std::string(reinterpret_cast<const char*>((*file)->RawData(*e)), e->nbytes()) ==
              r->latents().data())
      << "service I2V result differs from `denoised run` (2 ranks vs 1)";
  // Validation at admission, naming the field.
  v1::GenerateRequest t2v = TinyRequest(5, 64, 32, kSteps, 42, kTextLen);
  *t2v.mutable_image_embeds() = to_proto(ishape, image);
  auto bad = client_->Generate(t2v, std::chrono::seconds(30), {});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("image_embeds"));
  v1::GenerateRequest no_image = req;
  no_image.clear_image_embeds();
  bad = client_->Generate(no_image, std::chrono::seconds(30), {});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("image_embeds"));
  v1::GenerateRequest no_cond = req;
  no_cond.clear_condition_latents();
  bad = client_->Generate(no_cond, std::chrono::seconds(30), {});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("condition_latents"));
  EXPECT_EQ(g3.Stop(), 0);
}

// Wan2.2 TI2V through the service (tiny-ti2v: 48 channels, VAE 4x16x16):
// ListModels says kind ti2v, a first-frame condition [48, 1, H, W] travels in
// the request, the result (2 ranks) equals `denoised run` (1 rank) bit for
// bit with frame 0 = the condition, a text-only request runs too, and a
// full-length condition is refused at admission naming the field.
TEST_F(ServiceTest, TextImageToVideoThroughTheService) {
  Proc g4({"worker", "--coordinator", coord_->target, "--preset", "tiny-ti2v", "--ranks", "2",
           "--backend", "cpu", "--name", "g4", "--threads", "1", "--metrics-listen",
           "127.0.0.1:0", "--secret", kSecret},
          dir_->path() + "/g4.log");
  const absl::Status ready =
      WaitGroups(*client_, {"g4"}, v1::GROUP_STATE_READY, std::chrono::seconds(120));
  ASSERT_TRUE(ready.ok()) << ready << ReadFile(dir_->path() + "/g4.log");
  absl::StatusOr<v1::ListModelsResponse> models = client_->ListModels();
  ASSERT_TRUE(models.ok()) << models.status();
  bool found = false;
  for (const auto& m : models->models()) {
    if (m.name() != "tiny-ti2v") continue;
    found = true;
    EXPECT_EQ(m.kind(), "ti2v");
    EXPECT_EQ(m.in_channels(), 48);
    EXPECT_EQ(m.out_channels(), 48);
    ASSERT_EQ(m.vae_stride_size(), 3);
    EXPECT_EQ(m.vae_stride(1), 16);
  }
  ASSERT_TRUE(found);
  // 5 x 64 x 96 pixels -> latent [48, 2, 4, 6]; condition [48, 1, 4, 6].
  const worker::Shape cshape = {48, 1, 4, 6};
  std::vector<float> cond(static_cast<size_t>(worker::NumElements(cshape)));
  uint32_t x = 3;
  for (float& f : cond) {
    x = x * 1664525u + 1013904223u;
    f = static_cast<float>(x >> 8) / 16777216.0f - 0.5f;
  }
  auto to_proto = [](const worker::Shape& shape, const std::vector<float>& v) {
    v1::Tensor t;
    t.set_dtype(v1::DTYPE_F32);
    for (int64_t d : shape) t.add_shape(d);
    t.set_data(std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float)));
    return t;
  };
  const std::string cpath = dir_->path() + "/ti2v-cond.safetensors";
  ASSERT_TRUE(worker::WriteSafetensors(cpath, {{"condition_latents", worker::DType::kF32, cshape,
                                                cond.data()}}).ok());
  constexpr int kSteps = 3;
  v1::GenerateRequest req = TinyRequest(5, 64, 96, kSteps, 42, kTextLen);
  req.set_model("tiny-ti2v");
  *req.mutable_condition_latents() = to_proto(cshape, cond);
  auto r = client_->Generate(req, std::chrono::seconds(60), {});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->latents().shape_size(), 4);
  EXPECT_EQ(r->latents().shape(0), 48);
  EXPECT_EQ(r->latents().shape(1), 2);
  // Frame 0 of the result is the condition, exactly.
  const float* got = reinterpret_cast<const float*>(r->latents().data().data());
  bool frame0 = true;
  for (int c = 0; c < 48; ++c)
    frame0 = frame0 && std::memcmp(got + c * 2 * 24, cond.data() + c * 24, 24 * sizeof(float)) == 0;
  EXPECT_TRUE(frame0) << "frame 0 of the TI2V result is not the condition";
  const std::string out = dir_->path() + "/run-ti2v.safetensors";
  SpawnOptions o;
  o.exe = DENOISED_BIN;
  o.args = {"run", "--preset", "tiny-ti2v", "--ranks", "1", "--threads", "1", "--frames", "5",
            "--height", "64", "--width", "96", "--steps", std::to_string(kSteps), "--seed", "42",
            "--guidance", "5", "--text-len", std::to_string(kTextLen), "--condition", cpath,
            "--out", out};
  o.log_file = dir_->path() + "/run-ti2v.log";
  absl::StatusOr<pid_t> pid = Spawn(o);
  ASSERT_TRUE(pid.ok()) << pid.status();
  ASSERT_EQ(WaitPid(*pid, std::chrono::seconds(120)).value_or(-1), 0) << ReadFile(o.log_file);
  auto file = worker::SafetensorsFile::Open(out);
  ASSERT_TRUE(file.ok()) << file.status();
  const worker::SafetensorsEntry* e = (*file)->Find("latents");
  ASSERT_NE(e, nullptr);
  EXPECT_TRUE(std::string(reinterpret_cast<const char*>((*file)->RawData(*e)), e->nbytes()) ==
              r->latents().data())
      << "service TI2V result differs from `denoised run` (2 ranks vs 1)";
  // Text-only: the condition is optional.
  v1::GenerateRequest text = req;
  text.clear_condition_latents();
  auto t = client_->Generate(text, std::chrono::seconds(60), {});
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_NE(t->latents().data(), r->latents().data());
  // A full-length condition is refused at admission, naming the field.
  v1::GenerateRequest full = req;
  *full.mutable_condition_latents() =
      to_proto({48, 2, 4, 6}, std::vector<float>(48 * 2 * 4 * 6, 0.0f));
  auto bad = client_->Generate(full, std::chrono::seconds(30), {});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("condition_latents.shape"));
  EXPECT_EQ(g4.Stop(), 0);
}

}  // namespace
}  // namespace dn::server
