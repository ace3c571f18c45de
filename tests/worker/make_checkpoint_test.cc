// Runs the real `denoised make-checkpoint` and loads what it wrote.
#include <sys/wait.h>

#include <cstdlib>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/worker/io_test_util.h"
#include "worker/checkpoint.h"
#include "worker/checkpoint_format.h"

namespace dn::worker {
namespace {

using testing_util::ReadFile;
using testing_util::TempDir;

int RunMakeCheckpoint(const std::string& args, const std::string& log) {
  const std::string cmd =
      std::string(DENOISED_BIN) + " make-checkpoint " + args + " > " + log + " 2>&1";
  const int status = std::system(cmd.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::vector<float> Read(const WeightSource& w, const TensorSpec& s) {
  std::vector<float> out(static_cast<size_t>(NumElements(s.shape)));
  EXPECT_TRUE(w.ReadF32(s.name, out.data()).ok()) << s.name;
  return out;
}

TEST(MakeCheckpointTest, WritesLoadableCheckpoints) {
  TempDir dir;
  WanConfig config = *PresetConfig("tiny");
  config.num_layers = 1;
  auto preset = MakePresetWeights(config, 7);
  ASSERT_TRUE(preset.ok());

  struct Case {
    std::string flags;
    bool bf16;
  };
  const Case cases[] = {
      {"--preset tiny --seed 7 --layers 1 --dtype bf16", true},
      {"--preset tiny --seed 7 --layers 1 --original-names", false},
      {"--preset=tiny --seed=7 --layers=1 --max-shard-bytes 50000", false},
  };
  int index = 0;
  for (const Case& c : cases) {
    const std::string out = dir / ("ck" + std::to_string(index++));
    const std::string log = dir / "log.txt";
    ASSERT_EQ(RunMakeCheckpoint(c.flags + " --out " + out, log), 0) << ReadFile(log);
    EXPECT_THAT(ReadFile(log), ::testing::HasSubstr(config.Hash()));
    auto opened = OpenCheckpoint(out);
    ASSERT_TRUE(opened.ok()) << opened.status();
    EXPECT_EQ((*opened)->config().ToJson(), config.ToJson());
    for (const TensorSpec& s : ExpectedTensors(config)) {
      std::vector<float> want = Read(**preset, s);
      if (c.bf16)
        for (float& v : want) v = BF16ToF32(F32ToBF16(v));
      EXPECT_EQ(Read(**opened, s), want) << c.flags << " " << s.name;
    }
  }
  EXPECT_TRUE(std::filesystem::exists(dir.path() + "/ck2/" + kIndexFileName));
}

TEST(MakeCheckpointTest, RejectsBadFlags) {
  TempDir dir;
  const std::string log = dir / "log.txt";
  EXPECT_EQ(RunMakeCheckpoint("--preset tiny --out " + dir / "a" + " --dtype f64", log), 2);
  EXPECT_THAT(ReadFile(log), ::testing::HasSubstr("--dtype"));
  EXPECT_EQ(RunMakeCheckpoint("--preset huge --out " + dir / "b", log), 2);
  EXPECT_THAT(ReadFile(log), ::testing::HasSubstr("unknown preset 'huge'"));
  EXPECT_EQ(RunMakeCheckpoint("--preset tiny", log), 2);
  EXPECT_THAT(ReadFile(log), ::testing::HasSubstr("--out is required"));
  EXPECT_EQ(RunMakeCheckpoint("--preset tiny --layers -3 --out " + dir / "c", log), 2);
  EXPECT_EQ(RunMakeCheckpoint("--bogus --out " + dir / "d", log), 2);
  EXPECT_EQ(RunMakeCheckpoint("--help", log), 0);
  EXPECT_THAT(ReadFile(log), ::testing::HasSubstr("--original-names"));
}

}  // namespace
}  // namespace dn::worker
