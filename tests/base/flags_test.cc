#include "base/flags.h"

#include <gtest/gtest.h>

#include <optional>
#include <utility>
#include <vector>

namespace dn {
namespace {

TEST(FlagSetTest, ParsesAllForms) {
  FlagSet flags("t", "test");
  std::string model;
  int ranks = 1;
  double shift = 3.0;
  bool verbose = false, color = true;
  flags.String("model", &model, "m");
  flags.Int("ranks", &ranks, "r");
  flags.Double("shift", &shift, "s");
  flags.Bool("verbose", &verbose, "v");
  flags.Bool("color", &color, "c");
  const char* argv[] = {"t", "--model", "dir", "--ranks=4", "--shift", "5.5",
                        "--verbose", "--no-color"};
  ASSERT_TRUE(flags.Parse(8, const_cast<char**>(argv)).ok());
  EXPECT_EQ(model, "dir");
  EXPECT_EQ(ranks, 4);
  EXPECT_DOUBLE_EQ(shift, 5.5);
  EXPECT_TRUE(verbose);
  EXPECT_FALSE(color);
}

TEST(FlagSetTest, OptionalBoolStaysUnsetUnlessGiven) {
  for (const auto& [arg, want] :
       std::vector<std::pair<const char*, std::optional<bool>>>{
           {nullptr, std::nullopt},
           {"--cfg", true},
           {"--cfg=false", false},
           {"--no-cfg", false}}) {
    FlagSet flags("t", "test");
    std::optional<bool> cfg;
    flags.OptionalBool("cfg", &cfg, "c");
    const char* argv[] = {"t", arg};
    ASSERT_TRUE(flags.Parse(arg == nullptr ? 1 : 2, const_cast<char**>(argv)).ok());
    EXPECT_EQ(cfg, want) << (arg == nullptr ? "(none)" : arg);
  }
  FlagSet flags("t", "test");
  std::optional<bool> cfg;
  flags.OptionalBool("cfg", &cfg, "c");
  const char* bad[] = {"t", "--cfg=maybe"};
  EXPECT_NE(flags.Parse(2, const_cast<char**>(bad)).message().find("--cfg"),
            std::string::npos);
  EXPECT_FALSE(cfg.has_value());
}

TEST(FlagSetTest, RejectsUnknownAndBadValues) {
  FlagSet flags("t", "test");
  int ranks = 1;
  flags.Int("ranks", &ranks, "r");
  const char* unknown[] = {"t", "--rank=2"};
  absl::Status s = flags.Parse(2, const_cast<char**>(unknown));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("--rank"), std::string::npos);
  const char* bad[] = {"t", "--ranks=two"};
  s = flags.Parse(2, const_cast<char**>(bad));
  EXPECT_NE(s.message().find("--ranks"), std::string::npos);
  const char* missing[] = {"t", "--ranks"};
  EXPECT_FALSE(flags.Parse(2, const_cast<char**>(missing)).ok());
}

}  // namespace
}  // namespace dn
