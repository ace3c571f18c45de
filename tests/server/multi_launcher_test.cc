// One worker group formed by several launchers (issue 17; docs/SERVICE.md,
// "Groups across hosts"), as real processes on loopback: a coordinator and
// `denoised worker --group-size N --first-rank R --local-ranks K` launchers,
// each with its own rank processes.
// - two launchers of 2 ranks serve a 4-rank Gloo group with the same latents,
//   bit for bit, as one launcher of 4 ranks; each launcher is one half of the
//   group, so the group runs CFG-parallel by default (cfg 2 x ulysses 2: the
//   CFG axis crosses launchers) while the single launcher runs Ulysses over 4;
// - launchers of one group that disagree on --cfg-parallel are refused;
// - SIGKILL of one launcher (its whole process group) mid-request: the request
//   ends UNAVAILABLE, and the group re-forms as one unit, in a new generation,
//   once that launcher is back;
// - a launcher whose group size disagrees with its peers', whose slice
//   overlaps a peer's, or lies outside the group, is refused and stops with
//   an error naming the flag;
// - a launcher whose peer slice never arrives gives up after --slice-timeout
//   naming the missing ranks;
// - out-of-bounds Hello and SyncSlice fields are refused before anything is
//   allocated.
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "denoised/v1/denoiser.grpc.pb.h"
#include "denoised/v1/worker.grpc.pb.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/client.h"
#include "server/group_slices.h"
#include "base/process.h"
#include "tests/server/service_test_util.h"

namespace dn::server {
namespace {

namespace v1 = ::denoised::v1;
namespace vi = ::denoised::v1::internal;
using ::dn::server::testing::CoordinatorProc;
using ::dn::server::testing::Proc;
using ::dn::server::testing::ReadFile;
using ::dn::server::testing::RunDenoised;
using ::dn::server::testing::StartCoordinator;
using ::dn::server::testing::StartTinyGroup;
using ::dn::server::testing::TempDir;
using ::dn::server::testing::TinyRequest;
using ::dn::server::testing::WaitGroups;
using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

constexpr int kTextLen = 8;

// The launcher arguments of one slice of a tiny-preset CPU group.
std::vector<std::string> SliceArgs(const std::string& target, const std::string& name,
                                   int group_size, int first_rank, int local_ranks,
                                   std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {
      "worker", "--coordinator", target, "--preset", "tiny", "--backend", "cpu",
      "--name", name, "--threads", "1", "--group-size", std::to_string(group_size),
      "--first-rank", std::to_string(first_rank), "--local-ranks",
      std::to_string(local_ranks),
      // Loopback, explicitly: every launcher of these tests is on this host.
      "--host", "127.0.0.1", "--metrics-listen", "127.0.0.1:0"};
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

Proc StartSlice(const std::string& target, const std::string& name, int group_size,
                int first_rank, int local_ranks, const std::string& log,
                std::vector<std::string> extra = {}) {
  return Proc(SliceArgs(target, name, group_size, first_rank, local_ranks,
                        std::move(extra)),
              log);
}

// The group's entry in GetServerInfo (an empty one if absent).
v1::WorkerGroupInfo GroupInfo(DenoiserClient& client, const std::string& name) {
  absl::StatusOr<v1::ServerInfo> info = client.GetServerInfo();
  if (info.ok()) {
    for (const auto& g : info->groups()) {
      if (g.name() == name) return g;
    }
  }
  return {};
}

// Waits until `name` is READY in a generation above `after`.
bool WaitReadyAfter(DenoiserClient& client, const std::string& name, int64_t after,
                    std::chrono::seconds timeout, v1::WorkerGroupInfo* out) {
  const auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    v1::WorkerGroupInfo g = GroupInfo(client, name);
    if (g.state() == v1::GROUP_STATE_READY && g.generation() > after) {
      *out = g;
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

std::vector<float> Floats(const v1::Tensor& t) {
  std::vector<float> v(t.data().size() / sizeof(float));
  std::memcpy(v.data(), t.data().data(), v.size() * sizeof(float));
  return v;
}

// Two launchers, ranks 0-1 and 2-3 of one 4-rank group, give exactly the
// latents one launcher's 4 ranks give for the same request.
TEST(MultiLauncherTest, TwoLaunchersServeLikeOne) {
  TempDir dir;
  absl::StatusOr<std::unique_ptr<CoordinatorProc>> c = StartCoordinator(dir.path());
  ASSERT_TRUE(c.ok()) << c.status();
  DenoiserClient client((*c)->target);
  const v1::GenerateRequest req = TinyRequest(5, 64, 64, 3, 11, kTextLen);

  absl::StatusOr<v1::GenerateResult> one;
  {
    Proc single = StartTinyGroup((*c)->target, "one", 4, dir.path() + "/one.log");
    ASSERT_TRUE(WaitGroups(client, {"one"}, v1::GROUP_STATE_READY,
                           std::chrono::seconds(120)).ok())
        << ReadFile(dir.path() + "/one.log");
    const v1::WorkerGroupInfo g1 = GroupInfo(client, "one");
    EXPECT_EQ(g1.cfg_degree(), 1);
    EXPECT_EQ(g1.ulysses_degree(), 4);
    one = client.Generate(req, std::chrono::seconds(120), {});
    ASSERT_TRUE(one.ok()) << one.status();
    EXPECT_EQ(single.Stop(), 0);
  }

  Proc a = StartSlice((*c)->target, "two", 4, 0, 2, dir.path() + "/a.log");
  Proc b = StartSlice((*c)->target, "two", 4, 2, 2, dir.path() + "/b.log");
  ASSERT_TRUE(WaitGroups(client, {"two"}, v1::GROUP_STATE_READY,
                         std::chrono::seconds(120)).ok())
      << ReadFile(dir.path() + "/a.log") << ReadFile(dir.path() + "/b.log");
  const v1::WorkerGroupInfo g = GroupInfo(client, "two");
  EXPECT_EQ(g.world_size(), 4);
  EXPECT_EQ(g.ranks_size(), 4);
  // Each launcher holds one half: CFG-parallel by default.
  EXPECT_EQ(g.cfg_degree(), 2);
  EXPECT_EQ(g.ulysses_degree(), 2);
  absl::StatusOr<v1::GenerateResult> two =
      client.Generate(req, std::chrono::seconds(120), {});
  ASSERT_TRUE(two.ok()) << two.status();
  EXPECT_EQ(two->metadata().worker_group(), "two");
  EXPECT_EQ(two->metadata().ranks(), 4);
  ASSERT_EQ(one->latents().shape_size(), two->latents().shape_size());
  for (int i = 0; i < one->latents().shape_size(); ++i) {
    EXPECT_EQ(one->latents().shape(i), two->latents().shape(i));
  }
  const std::vector<float> x = Floats(one->latents());
  const std::vector<float> y = Floats(two->latents());
  ASSERT_EQ(x.size(), y.size());
  ASSERT_FALSE(x.empty());
  double max_diff = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    max_diff = std::max(max_diff, static_cast<double>(std::fabs(x[i] - y[i])));
  }
  EXPECT_EQ(max_diff, 0.0);
  EXPECT_EQ(one->latents().data(), two->latents().data()) << "not bit-identical";
  EXPECT_EQ(a.Stop(), 0);
  EXPECT_EQ(b.Stop(), 0);
}

// SIGKILL of one launcher and its ranks mid-request: the request ends
// UNAVAILABLE, the other launcher restarts its slice in the new generation
// the coordinator opens, and the group is READY again once the killed
// launcher is started again; then it serves.
TEST(MultiLauncherTest, KilledLauncherFailsTheGroupWhichReformsWhenItIsBack) {
  TempDir dir;
  absl::StatusOr<std::unique_ptr<CoordinatorProc>> c = StartCoordinator(dir.path());
  ASSERT_TRUE(c.ok()) << c.status();
  DenoiserClient client((*c)->target);
  Proc a = StartSlice((*c)->target, "g", 4, 0, 2, dir.path() + "/a.log");
  Proc b = StartSlice((*c)->target, "g", 4, 2, 2, dir.path() + "/b.log");
  ASSERT_TRUE(WaitGroups(client, {"g"}, v1::GROUP_STATE_READY,
                         std::chrono::seconds(120)).ok())
      << ReadFile(dir.path() + "/a.log") << ReadFile(dir.path() + "/b.log");
  const int64_t first = GroupInfo(client, "g").generation();

  // A long request (no deadline): it is running when the launcher dies.
  DenoiserClient caller((*c)->target);
  std::promise<void> stepped;
  bool signalled = false;
  std::future<absl::StatusOr<v1::GenerateResult>> call =
      std::async(std::launch::async, [&] {
        return caller.Generate(TinyRequest(5, 64, 64, 1000, 5, kTextLen),
                               std::chrono::milliseconds(0),
                               [&](const v1::GenerateEvent& e) {
                                 if (e.has_step() && e.step().index() >= 1 && !signalled) {
                                   signalled = true;
                                   stepped.set_value();
                                 }
                                 return true;
                               });
      });
  ASSERT_EQ(stepped.get_future().wait_for(std::chrono::seconds(60)),
            std::future_status::ready);
  // The launcher is the leader of its process group; its ranks are in it.
  ASSERT_EQ(kill(-b.pid(), SIGKILL), 0);
  const auto t0 = Clock::now();
  ASSERT_EQ(call.wait_for(std::chrono::seconds(60)), std::future_status::ready)
      << "the request hung after a launcher died";
  const absl::Status st = call.get().status();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  std::printf("launcher SIGKILL: request ended %s after %.2f s\n",
              absl::StatusCodeToString(st.code()).c_str(),
              std::chrono::duration<double>(Clock::now() - t0).count());

  // Not READY while half of it is gone.
  std::this_thread::sleep_for(std::chrono::seconds(2));
  EXPECT_NE(GroupInfo(client, "g").state(), v1::GROUP_STATE_READY);
  EXPECT_TRUE(a.running()) << "the surviving launcher keeps supervising";

  b = StartSlice((*c)->target, "g", 4, 2, 2, dir.path() + "/b2.log");
  v1::WorkerGroupInfo g;
  ASSERT_TRUE(WaitReadyAfter(client, "g", first, std::chrono::seconds(120), &g))
      << ReadFile(dir.path() + "/a.log") << ReadFile(dir.path() + "/b2.log");
  EXPECT_EQ(g.world_size(), 4);
  std::printf("group re-formed: generation %lld -> %lld, READY %.2f s after the kill\n",
              static_cast<long long>(first), static_cast<long long>(g.generation()),
              std::chrono::duration<double>(Clock::now() - t0).count());
  absl::StatusOr<v1::GenerateResult> r = client.Generate(
      TinyRequest(5, 64, 64, 2, 6, kTextLen), std::chrono::seconds(60), {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->metadata().ranks(), 4);
  EXPECT_EQ(a.Stop(), 0);
  EXPECT_EQ(b.Stop(), 0);
}

// A launcher whose slice disagrees with its group is refused and stops with
// an error naming the flag, instead of retrying forever.
TEST(MultiLauncherTest, DisagreeingSliceIsRefusedWithTheFlagNamed) {
  TempDir dir;
  absl::StatusOr<std::unique_ptr<CoordinatorProc>> c = StartCoordinator(dir.path());
  ASSERT_TRUE(c.ok()) << c.status();
  DenoiserClient client((*c)->target);
  Proc a = StartSlice((*c)->target, "g", 4, 0, 2, dir.path() + "/a.log");
  // Its ranks attach once the coordinator took its slice.
  ASSERT_TRUE(WaitGroups(client, {"g"}, v1::GROUP_STATE_FORMING,
                         std::chrono::seconds(60)).ok())
      << ReadFile(dir.path() + "/a.log");

  // Another group size.
  const std::string size_log = dir.path() + "/size.log";
  EXPECT_EQ(RunDenoised(SliceArgs((*c)->target, "g", 3, 2, 1), size_log), 2);
  EXPECT_THAT(ReadFile(size_log), HasSubstr("FAILED_PRECONDITION"));
  EXPECT_THAT(ReadFile(size_log),
              HasSubstr("--group-size 3 disagrees with group 'g': its launcher of "
                        "ranks 0-1 (host 127.0.0.1) runs it with --group-size 4"));

  // Ranks a live peer has: retried until --slice-timeout, then refused.
  const std::string overlap_log = dir.path() + "/overlap.log";
  const auto t0 = Clock::now();
  EXPECT_EQ(RunDenoised(SliceArgs((*c)->target, "g", 4, 1, 2, {"--slice-timeout", "2"}),
                        overlap_log),
            2);
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(30));
  EXPECT_THAT(ReadFile(overlap_log), HasSubstr("ALREADY_EXISTS"));
  EXPECT_THAT(ReadFile(overlap_log),
              HasSubstr("--first-rank/--local-ranks: ranks 1-2 of group 'g' overlap "
                        "ranks 0-1"));

  // Ranks outside the group: the launcher's own check.
  const std::string outside_log = dir.path() + "/outside.log";
  EXPECT_EQ(RunDenoised(SliceArgs((*c)->target, "g", 4, 3, 2), outside_log), 2);
  EXPECT_THAT(ReadFile(outside_log), HasSubstr("--first-rank/--local-ranks/--group-size"));

  EXPECT_TRUE(a.running()) << "the refusals did not disturb the group's launcher";
  EXPECT_EQ(a.Stop(), 0);
}

// Launchers of one group must agree on --cfg-parallel: one that runs its
// half without it, beside a peer that runs CFG-parallel (the default for
// halves), is refused naming the flag and both topologies.
TEST(MultiLauncherTest, DisagreeingCfgParallelIsRefused) {
  TempDir dir;
  absl::StatusOr<std::unique_ptr<CoordinatorProc>> c = StartCoordinator(dir.path());
  ASSERT_TRUE(c.ok()) << c.status();
  DenoiserClient client((*c)->target);
  Proc a = StartSlice((*c)->target, "g", 4, 0, 2, dir.path() + "/a.log");
  ASSERT_TRUE(WaitGroups(client, {"g"}, v1::GROUP_STATE_FORMING,
                         std::chrono::seconds(60)).ok())
      << ReadFile(dir.path() + "/a.log");
  const std::string log = dir.path() + "/off.log";
  EXPECT_EQ(RunDenoised(SliceArgs((*c)->target, "g", 4, 2, 2, {"--no-cfg-parallel"}), log),
            2);
  EXPECT_THAT(ReadFile(log), HasSubstr("FAILED_PRECONDITION"));
  EXPECT_THAT(ReadFile(log),
              HasSubstr("--cfg-parallel: this launcher runs group 'g' as Ulysses over "
                        "all 4 ranks, but its launcher of ranks 0-1 (host 127.0.0.1) "
                        "runs it as CFG-parallel (cfg 2 x ulysses 2)"));
  EXPECT_TRUE(a.running());
  EXPECT_EQ(a.Stop(), 0);
}

// The second slice never comes: the launcher gives up after --slice-timeout
// and names the missing ranks (exit 3).
TEST(MultiLauncherTest, MissingPeerSliceTimesOutNamingTheRanks) {
  TempDir dir;
  absl::StatusOr<std::unique_ptr<CoordinatorProc>> c = StartCoordinator(dir.path());
  ASSERT_TRUE(c.ok()) << c.status();
  const std::string log = dir.path() + "/a.log";
  const auto t0 = Clock::now();
  EXPECT_EQ(RunDenoised(SliceArgs((*c)->target, "g", 4, 0, 2, {"--slice-timeout", "3"}),
                        log),
            3);
  const double took = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_GE(took, 3.0);
  EXPECT_LT(took, 60.0);
  EXPECT_THAT(ReadFile(log), HasSubstr("giving up: group g generation 1 has missed "
                                       "ranks 2-3 of 4 for --slice-timeout 3 s (no "
                                       "launcher started ranks 2-3)"));
}

// Hello and SyncSlice fields out of bounds are refused (INVALID_ARGUMENT
// naming the field); the coordinator allocates nothing for them and serves on.
TEST(MultiLauncherTest, OutOfBoundsHelloAndSliceAreRefused) {
  TempDir dir;
  absl::StatusOr<std::unique_ptr<CoordinatorProc>> c = StartCoordinator(dir.path());
  ASSERT_TRUE(c.ok()) << c.status();
  auto stub = vi::WorkerControl::NewStub(
      grpc::CreateChannel((*c)->worker, grpc::InsecureChannelCredentials()));
  auto hello = [&](const std::function<void(vi::Hello*)>& edit) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    auto stream = stub->Attach(&ctx);
    vi::RankMessage m;
    vi::Hello* h = m.mutable_hello();
    h->set_group("g");
    h->set_rank(0);
    h->set_world_size(1);
    h->set_generation(1);
    h->mutable_model()->set_name("tiny");
    h->mutable_model()->set_config_hash("c0ffee");
    h->mutable_model()->mutable_info()->set_in_channels(16);
    h->mutable_model()->mutable_info()->set_text_dim(32);
    h->set_backend("cpu");
    edit(h);
    stream->Write(m);
    vi::CoordinatorMessage w;
    EXPECT_FALSE(stream->Read(&w) && w.has_welcome());
    return stream->Finish();
  };
  grpc::Status s = hello([](vi::Hello* h) { h->set_world_size(2147483647); });
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("Hello.rank/world_size"));
  s = hello([](vi::Hello* h) { h->set_world_size(100000000); });
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  s = hello([](vi::Hello* h) { h->set_host(std::string(100000, 'x')); });
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("Hello.host"));
  s = hello([](vi::Hello* h) { h->set_generation(0); });
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("Hello.generation"));
  s = hello([](vi::Hello* h) { h->mutable_model()->mutable_info()->add_vae_stride(1 << 30); });
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("Hello.model.info.vae_stride"));
  s = hello([](vi::Hello* h) { h->set_cfg_degree(3); });
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("Hello.cfg_degree"));
  s = hello([](vi::Hello* h) { h->set_cfg_degree(2); });  // world_size 1: odd
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("Hello.cfg_degree"));

  auto slice = [&](int size, int first, int local) {
    grpc::ClientContext ctx;
    vi::SliceRequest req;
    req.set_group("g");
    req.set_group_size(size);
    req.set_first_rank(first);
    req.set_local_ranks(local);
    req.set_launcher_id("test");
    vi::SliceStatus resp;
    return stub->SyncSlice(&ctx, req, &resp);
  };
  s = slice(2147483647, 0, 1);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("--group-size"));
  s = slice(4, 2147483647, 2);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("--first-rank/--local-ranks"));

  // Still serving: a real group forms and works.
  DenoiserClient client((*c)->target);
  Proc group = StartTinyGroup((*c)->target, "ok", 1, dir.path() + "/ok.log");
  ASSERT_TRUE(WaitGroups(client, {"ok"}, v1::GROUP_STATE_READY,
                         std::chrono::seconds(60)).ok())
      << ReadFile((*c)->log);
  EXPECT_EQ(group.Stop(), 0);
}

// The slice book itself (no processes): how launchers agree on generations.
TEST(SliceRegistryTest, LaunchersAgreeOnTheGenerationTheCoordinatorAssigns) {
  SliceRegistry reg;
  auto now = SliceRegistry::Clock::now();
  auto sync = [&](const std::string& id, int first, int64_t gen, const LiveGroupView& live) {
    return reg.Sync({"g", 4, first, 2, id, gen, "h", false}, live, now);
  };
  LiveGroupView none;
  // A starts: generation 1. B joins it while it forms.
  ASSERT_EQ(sync("A", 0, 0, none)->generation, 1);
  ASSERT_EQ(sync("B", 2, 0, none)->generation, 1);
  LiveGroupView ready{true, 1, false, false, 4, {true, true, true, true}};
  absl::StatusOr<SliceAnswer> a = sync("A", 0, 1, ready);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->generation, 1);
  EXPECT_TRUE(a->missing_ranks.empty());
  // B's rank fails: the group FAILED; B restarts first and opens generation
  // 2 (nothing left to fail), A learns it on its next sync and joins it.
  LiveGroupView failed{true, 1, false, true, 4, {true, true, false, true}};
  a = sync("B", 2, 0, failed);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->generation, 2);
  EXPECT_EQ(a->fail_generation, 0);
  EXPECT_EQ(sync("A", 0, 1, failed)->generation, 2);
  EXPECT_EQ(sync("A", 0, 0, failed)->generation, 2);
  EXPECT_EQ(reg.ExpectedFor("g", now)->generation, 2);
  // A restarts its slice while generation 2 forms: generation 3, and 2 is
  // failed by the coordinator.
  LiveGroupView forming{true, 2, true, false, 4, {true, true, false, false}};
  a = sync("A", 0, 0, forming);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->generation, 3);
  EXPECT_EQ(a->fail_generation, 2);
  // B has not started in 3 yet: it is told 3; its claim was dropped at the
  // new generation and comes back.
  a = sync("B", 2, 2, forming);
  EXPECT_EQ(a->generation, 3);
  EXPECT_TRUE(a->unclaimed_ranks.empty());
  // Another size, or claimed ranks, are refused while A and B are live.
  EXPECT_EQ(reg.Sync({"g", 8, 4, 4, "C", 0, "h", false}, forming, now).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(reg.Sync({"g", 4, 1, 2, "C", 0, "h", false}, forming, now).status().code(),
            absl::StatusCode::kAlreadyExists);
  // A and B run Ulysses over the group (cfg degree 1): a CFG-parallel slice
  // is refused, and a cfg degree other than 1 or 2 is no slice at all.
  absl::StatusOr<SliceAnswer> cfg =
      reg.Sync({"g", 4, 2, 2, "B", 3, "h", false, 2}, forming, now);
  EXPECT_EQ(cfg.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(cfg.status().message()), HasSubstr("--cfg-parallel"));
  EXPECT_EQ(reg.Sync({"g", 4, 2, 2, "B", 3, "h", false, 3}, forming, now).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Once their leases run out, a launcher with a new size may take the name.
  now += std::chrono::milliseconds(kSliceLeaseMs + 1);
  EXPECT_FALSE(reg.ExpectedFor("g", now).has_value());
  a = reg.Sync({"g", 8, 0, 8, "C", 0, "h", false}, none, now);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->generation, 4) << "generations never go back";
}

}  // namespace
}  // namespace dn::server
