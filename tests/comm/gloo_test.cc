// Multi-process tests of the Gloo process group: each test starts real
// comm_test_rank processes that rendezvous through a FileStore in a temporary
// folder and talk over loopback TCP.
#include <chrono>
#include <fstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "comm/process_group.h"
#include "comm/store.h"
#include "tests/comm/comm_test_util.h"
#include "tests/comm/rank_launcher.h"

#ifndef COMM_TEST_RANK_BIN
#error "COMM_TEST_RANK_BIN must name the comm_test_rank helper"
#endif

namespace dn::comm {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using testing::RankLauncher;
using testing::ReadResult;
using testing::TempDir;

// Generous for healthy runs on a loaded 2-core CI machine; the failure tests
// use a short timeout.
constexpr int kHealthyTimeoutMs = 20000;
constexpr int kFailureTimeoutMs = 3000;

std::vector<std::string> RankArgs(const std::string& mode, int rank, int world,
                                  const std::string& dir, int timeout_ms) {
  return {"--mode",       mode,
          "--rank",       std::to_string(rank),
          "--world",      std::to_string(world),
          "--dir",        dir,
          "--timeout_ms", std::to_string(timeout_ms)};
}

// Runs `world` ranks of `mode` and expects all of them to pass.
void RunAll(const std::string& mode, int world) {
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  RankLauncher ranks;
  for (int r = 0; r < world; ++r)
    ASSERT_TRUE(ranks.Start(COMM_TEST_RANK_BIN,
                            RankArgs(mode, r, world, dir.path(), kHealthyTimeoutMs)));
  const bool done = ranks.Wait(Clock::now() + milliseconds(kHealthyTimeoutMs + 10000));
  EXPECT_TRUE(done) << "a rank hung";
  for (int r = 0; r < world; ++r)
    EXPECT_EQ(ranks.status(r), 0) << mode << ": rank " << r << " of " << world;
}

TEST(GlooProcessGroupTest, AllToAllTwoRanks) { RunAll("alltoall", 2); }
TEST(GlooProcessGroupTest, AllToAllFourRanks) { RunAll("alltoall", 4); }
TEST(GlooProcessGroupTest, CollectivesTwoRanks) { RunAll("collectives", 2); }
TEST(GlooProcessGroupTest, CollectivesThreeRanks) { RunAll("collectives", 3); }
TEST(GlooProcessGroupTest, UlyssesTwoRanks) { RunAll("ulysses", 2); }
TEST(GlooProcessGroupTest, UlyssesFourRanks) { RunAll("ulysses", 4); }

// A peer killed with SIGKILL while the others wait for it inside an
// all-to-all: every survivor gets an error within the timeout, and the group
// is unusable afterwards (checked by the survivors).
// With `busy`, the victim keeps exchanging data and is killed in the middle
// of a transfer instead of while the others wait for it.
void RunKilledPeer(int world, bool busy = false) {
  TempDir dir;
  RankLauncher ranks;
  const std::string mode = busy ? "killed_busy" : "killed";
  for (int r = 0; r < world; ++r)
    ASSERT_TRUE(ranks.Start(COMM_TEST_RANK_BIN,
                            RankArgs(mode, r, world, dir.path(), kFailureTimeoutMs)));
  const int victim = world - 1;
  ASSERT_TRUE(testing::WaitForFile(dir.path() + "/victim_ready",
                                   Clock::now() + milliseconds(kHealthyTimeoutMs), &ranks))
      << "the victim never reached its last collective (or a rank exited early)";
  if (busy) std::this_thread::sleep_for(milliseconds(30));
  ranks.Kill(victim, SIGKILL);
  std::vector<int> survivors;
  for (int r = 0; r < victim; ++r) survivors.push_back(r);
  // Never a hang: survivors must be done well before this deadline.
  const bool done =
      ranks.Wait(Clock::now() + milliseconds(kFailureTimeoutMs + 5000), survivors);
  ranks.Wait(Clock::now() + milliseconds(1000), {victim});
  EXPECT_TRUE(done) << "a survivor hung after its peer was killed";
  const std::set<std::string> allowed = {"UNAVAILABLE", "DEADLINE_EXCEEDED",
                                         "ABORTED"};
  for (int r : survivors) {
    EXPECT_EQ(ranks.status(r), 0) << "survivor " << r;
    const testing::RankResult res = ReadResult(dir.path(), r);
    ASSERT_TRUE(res.present) << "survivor " << r << " recorded no error";
    EXPECT_TRUE(allowed.count(res.code)) << res.code << ": " << res.message;
    // Within the group timeout (plus scheduling slack), not a hang.
    EXPECT_LE(res.elapsed_ms, kFailureTimeoutMs + 1000) << res.message;
  }
}

TEST(GlooProcessGroupTest, KilledPeerGivesErrorTwoRanks) { RunKilledPeer(2); }
TEST(GlooProcessGroupTest, KilledPeerGivesErrorFourRanks) { RunKilledPeer(4); }
TEST(GlooProcessGroupTest, PeerKilledMidTransferGivesErrorFourRanks) {
  RunKilledPeer(4, /*busy=*/true);
}

// A peer that stays alive but stops taking part: the survivors' call ends
// with DEADLINE_EXCEEDED (or UNAVAILABLE when another survivor's timeout
// closed the connections first).
TEST(GlooProcessGroupTest, StuckPeerTimesOut) {
  const int world = 3;
  TempDir dir;
  RankLauncher ranks;
  for (int r = 0; r < world; ++r)
    ASSERT_TRUE(ranks.Start(COMM_TEST_RANK_BIN,
                            RankArgs("stuck", r, world, dir.path(), kFailureTimeoutMs)));
  const bool done = ranks.Wait(Clock::now() + milliseconds(4 * kFailureTimeoutMs + 5000),
                               {0, 1});
  EXPECT_TRUE(done) << "a survivor hung on a stuck peer";
  int deadline_exceeded = 0;
  for (int r = 0; r < world - 1; ++r) {
    EXPECT_EQ(ranks.status(r), 0) << "survivor " << r;
    const testing::RankResult res = ReadResult(dir.path(), r);
    ASSERT_TRUE(res.present) << "survivor " << r << " recorded no error";
    EXPECT_TRUE(res.code == "DEADLINE_EXCEEDED" || res.code == "UNAVAILABLE")
        << res.code << ": " << res.message;
    if (res.code == "DEADLINE_EXCEEDED") ++deadline_exceeded;
    EXPECT_LE(res.elapsed_ms, kFailureTimeoutMs + 1000) << res.message;
  }
  EXPECT_GE(deadline_exceeded, 1);
  ranks.Kill(world - 1, SIGKILL);
  ranks.Wait(Clock::now() + milliseconds(1000));
}

// Abort() from another thread ends rank 0's blocked call with ABORTED long
// before the (20 s) group timeout, and the other ranks' next call fails.
TEST(GlooProcessGroupTest, AbortEndsPendingCall) {
  const int world = 3;
  TempDir dir;
  RankLauncher ranks;
  for (int r = 0; r < world; ++r)
    ASSERT_TRUE(ranks.Start(COMM_TEST_RANK_BIN,
                            RankArgs("abort", r, world, dir.path(), kHealthyTimeoutMs)));
  // Well below kHealthyTimeoutMs: only Abort() can end rank 0's wait in time.
  const bool done = ranks.Wait(Clock::now() + milliseconds(kHealthyTimeoutMs / 2));
  EXPECT_TRUE(done) << "Abort() did not end the pending call";
  for (int r = 0; r < world; ++r) {
    EXPECT_EQ(ranks.status(r), 0) << "rank " << r;
    const testing::RankResult res = ReadResult(dir.path(), r);
    ASSERT_TRUE(res.present) << "rank " << r;
    if (r == 0) {
      EXPECT_EQ(res.code, "ABORTED") << res.message;
    }
    EXPECT_LT(res.elapsed_ms, kHealthyTimeoutMs / 2) << "rank " << r << ": " << res.message;
  }
}

// Abort() while rank 0 is in the middle of writing a large broadcast to a
// peer that stopped reading (SIGSTOP): Gloo itself never wakes such a send,
// so this checks the group's own wake-up of pending waits.
TEST(GlooProcessGroupTest, AbortEndsCallStuckMidWrite) {
  const int world = 2;
  TempDir dir;
  RankLauncher ranks;
  for (int r = 0; r < world; ++r)
    ASSERT_TRUE(ranks.Start(COMM_TEST_RANK_BIN, RankArgs("abort_stopped", r, world,
                                                         dir.path(), kHealthyTimeoutMs)));
  ASSERT_TRUE(testing::WaitForFile(dir.path() + "/entering.1",
                                   Clock::now() + milliseconds(kHealthyTimeoutMs), &ranks))
      << "rank 1 never entered its all-to-all";
  // Long enough for rank 1 to post its receive and for rank 0 to start
  // writing its 128 MiB, too short for all of it to get through.
  std::this_thread::sleep_for(milliseconds(2));
  ranks.Kill(1, SIGSTOP);
  { std::ofstream(dir.path() + "/stopped") << "1\n"; }
  const bool done = ranks.Wait(Clock::now() + milliseconds(kHealthyTimeoutMs / 2), {0});
  ranks.Kill(1, SIGKILL);
  ranks.Wait(Clock::now() + milliseconds(2000), {1});
  EXPECT_TRUE(done) << "Abort() did not end a call stuck mid-write";
  EXPECT_EQ(ranks.status(0), 0);
  const testing::RankResult res = ReadResult(dir.path(), 0);
  ASSERT_TRUE(res.present);
  EXPECT_EQ(res.code, "ABORTED") << res.message;
  EXPECT_LT(res.elapsed_ms, kHealthyTimeoutMs / 2) << res.message;
}

// In-process checks that need no peers.
TEST(GlooProcessGroupTest, SingleRankGroupWorks) {
  TempDir dir;
  auto store = MakeFileStore(dir.path());
  ASSERT_TRUE(store.ok());
  GlooOptions opts;
  opts.timeout = milliseconds(5000);
  auto pg = MakeGlooProcessGroup(**store, opts);
  ASSERT_TRUE(pg.ok()) << pg.status();
  std::vector<uint8_t> send(100), recv(100, 0);
  testing::FillA2aSend(0, 1, 100, 5, send.data());
  ASSERT_TRUE((*pg)->AllToAll(send.data(), recv.data(), 100).ok());
  EXPECT_EQ(testing::CheckA2aRecv(0, 1, 100, 5, recv.data()), "");
  double x[2] = {1.5, -2};
  ASSERT_TRUE((*pg)->AllReduce(x, 2, ReduceType::kF64, ReduceOp::kSum).ok());
  EXPECT_EQ(x[0], 1.5);
  EXPECT_EQ(x[1], -2);
  ASSERT_TRUE((*pg)->Barrier().ok());
  (*pg)->Abort();
  EXPECT_EQ((*pg)->Barrier().code(), absl::StatusCode::kAborted);
}

TEST(GlooProcessGroupTest, RendezvousTimesOutNamingTheMissingKey) {
  TempDir dir;
  auto store = MakeFileStore(dir.path());
  ASSERT_TRUE(store.ok());
  GlooOptions opts;
  opts.rank = 0;
  opts.size = 2;  // rank 1 never comes
  opts.timeout = milliseconds(300);
  opts.prefix = "lonely";
  auto pg = MakeGlooProcessGroup(**store, opts);
  ASSERT_EQ(pg.status().code(), absl::StatusCode::kDeadlineExceeded) << pg.status();
  EXPECT_NE(pg.status().message().find("lonely/"), std::string::npos) << pg.status();
}

TEST(GlooProcessGroupTest, RejectsBadOptions) {
  TempDir dir;
  auto store = MakeFileStore(dir.path());
  ASSERT_TRUE(store.ok());
  GlooOptions opts;
  opts.rank = 2;
  opts.size = 2;
  EXPECT_EQ(MakeGlooProcessGroup(**store, opts).status().code(),
            absl::StatusCode::kInvalidArgument);
  opts.rank = 0;
  opts.timeout = milliseconds(0);
  EXPECT_EQ(MakeGlooProcessGroup(**store, opts).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace dn::comm
