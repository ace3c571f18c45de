// A CFG-parallel worker group through the service, as real processes on
// loopback: `denoised worker --ranks 4 --cfg-parallel` (2 CFG halves x 2
// Ulysses ranks) serves the same latents, byte for byte, as a plain 2-rank
// group (Ulysses over both), with CFG on and off, and ListModels /
// GetServerInfo show each group's topology.
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "denoised/v1/denoiser.grpc.pb.h"
#include "gtest/gtest.h"
#include "server/client.h"
#include "tests/server/service_test_util.h"

namespace dn::server {
namespace {

namespace v1 = ::denoised::v1;
using ::dn::server::testing::CoordinatorProc;
using ::dn::server::testing::Proc;
using ::dn::server::testing::ReadFile;
using ::dn::server::testing::StartCoordinator;
using ::dn::server::testing::StartTinyGroup;
using ::dn::server::testing::TempDir;
using ::dn::server::testing::TinyRequest;
using ::dn::server::testing::WaitGroups;

struct Served {
  std::string cfg_on;   // latents bytes, guidance 5
  std::string cfg_off;  // guidance 1
};

// Starts `name` (tiny, CPU), waits for READY, serves both requests, stops it.
Served Serve(const std::string& target, DenoiserClient& client, const std::string& name,
             int ranks, std::vector<std::string> extra, const std::string& log,
             v1::GroupTopology* topology) {
  Served s;
  Proc group = StartTinyGroup(target, name, ranks, log, std::move(extra));
  absl::Status ready =
      WaitGroups(client, {name}, v1::GROUP_STATE_READY, std::chrono::seconds(180));
  EXPECT_TRUE(ready.ok()) << ready << ReadFile(log);
  if (!ready.ok()) return s;
  absl::StatusOr<v1::ListModelsResponse> models = client.ListModels();
  EXPECT_TRUE(models.ok()) << models.status();
  if (models.ok()) {
    for (const auto& m : models->models()) {
      for (const auto& t : m.groups()) {
        if (t.name() == name) *topology = t;
      }
    }
  }
  v1::GenerateRequest req = TinyRequest(5, 64, 64, 3, 11, 8);
  absl::StatusOr<v1::GenerateResult> on = client.Generate(req, std::chrono::seconds(120), {});
  EXPECT_TRUE(on.ok()) << on.status();
  req.set_guidance_scale(1.0f);
  absl::StatusOr<v1::GenerateResult> off = client.Generate(req, std::chrono::seconds(120), {});
  EXPECT_TRUE(off.ok()) << off.status();
  if (on.ok()) {
    EXPECT_EQ(on->metadata().worker_group(), name);
    EXPECT_EQ(on->metadata().ranks(), ranks);
    s.cfg_on = on->latents().data();
  }
  if (off.ok()) s.cfg_off = off->latents().data();
  EXPECT_EQ(group.Stop(), 0);
  return s;
}

TEST(CfgParallelServiceTest, ServesThePlainGroupsLatentsAndShowsItsTopology) {
  TempDir dir;
  absl::StatusOr<std::unique_ptr<CoordinatorProc>> c = StartCoordinator(dir.path());
  ASSERT_TRUE(c.ok()) << c.status();
  DenoiserClient client((*c)->target);

  v1::GroupTopology plain_t, cfg_t;
  const Served plain =
      Serve((*c)->target, client, "plain", 2, {}, dir.path() + "/plain.log", &plain_t);
  const Served cfg = Serve((*c)->target, client, "cfgpar", 4, {"--cfg-parallel"},
                           dir.path() + "/cfgpar.log", &cfg_t);

  EXPECT_EQ(plain_t.world_size(), 2);
  EXPECT_EQ(plain_t.cfg_degree(), 1);
  EXPECT_EQ(plain_t.ulysses_degree(), 2);
  EXPECT_EQ(cfg_t.world_size(), 4);
  EXPECT_EQ(cfg_t.cfg_degree(), 2);
  EXPECT_EQ(cfg_t.ulysses_degree(), 2);

  ASSERT_FALSE(plain.cfg_on.empty());
  ASSERT_FALSE(plain.cfg_off.empty());
  EXPECT_NE(plain.cfg_on, plain.cfg_off) << "guidance changes nothing: a vacuous check";
  EXPECT_TRUE(cfg.cfg_on == plain.cfg_on) << "CFG on: not byte-equal to the plain group";
  EXPECT_TRUE(cfg.cfg_off == plain.cfg_off) << "CFG off: not byte-equal to the plain group";
}

}  // namespace
}  // namespace dn::server
