// The CFG-parallel split of a group (comm/cfg_parallel.h): halves, ranks
// inside a half, sub-group options and refusals.
#include "comm/cfg_parallel.h"

#include <gtest/gtest.h>

#include "comm/process_group.h"

namespace dn::comm {
namespace {

TEST(CfgSplitTest, HalvesOfAGroup) {
  // 8 ranks: ranks 0-3 the conditional half, 4-7 the unconditional one.
  for (int r = 0; r < 8; ++r) {
    absl::StatusOr<CfgSplit> s = SplitForCfg(8, r, true);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ(s->cfg_degree, 2);
    EXPECT_EQ(s->ulysses_degree, 4);
    EXPECT_EQ(s->half, r / 4);
    EXPECT_EQ(s->ulysses_rank, r % 4);
    EXPECT_EQ(s->GlobalRank(s->half, s->ulysses_rank), r);
  }
  absl::StatusOr<CfgSplit> two = SplitForCfg(2, 1, true);
  ASSERT_TRUE(two.ok());
  EXPECT_EQ(two->ulysses_degree, 1);
  EXPECT_EQ(two->half, 1);
  EXPECT_EQ(two->ulysses_rank, 0);
}

TEST(CfgSplitTest, WithoutCfgParallelOneUlyssesGroup) {
  absl::StatusOr<CfgSplit> s = SplitForCfg(6, 5, false);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->cfg_degree, 1);
  EXPECT_EQ(s->ulysses_degree, 6);
  EXPECT_EQ(s->half, 0);
  EXPECT_EQ(s->ulysses_rank, 5);
}

TEST(CfgSplitTest, RefusesOddGroupsAndBadRanks) {
  absl::StatusOr<CfgSplit> odd = SplitForCfg(3, 0, true);
  EXPECT_EQ(odd.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(odd.status().message().find("--cfg-parallel needs an even group size"),
            std::string::npos);
  EXPECT_EQ(SplitForCfg(4, 4, true).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SplitForCfg(0, 0, false).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(CfgSplitTest, HalfGroupOptionsKeepTheRestAndSeparateTheHalves) {
  GlooOptions data;
  data.rank = 6;
  data.size = 8;
  data.hostname = "10.0.0.2";
  data.prefix = "g/7/data";
  const CfgSplit s0 = *SplitForCfg(8, 1, true);
  const CfgSplit s1 = *SplitForCfg(8, 6, true);
  const GlooOptions h = HalfGroupOptions(data, s1);
  EXPECT_EQ(h.rank, 2);
  EXPECT_EQ(h.size, 4);
  EXPECT_EQ(h.hostname, "10.0.0.2");
  EXPECT_EQ(h.timeout, data.timeout);
  EXPECT_NE(h.prefix, data.prefix);
  EXPECT_EQ(h.prefix.rfind("g/7/data/", 0), 0u) << h.prefix;
  EXPECT_NE(UlyssesPrefix(data.prefix, s0), UlyssesPrefix(data.prefix, s1));
}

}  // namespace
}  // namespace dn::comm
