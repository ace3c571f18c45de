// Step caching (First-Block-Cache, docs/ENGINE.md "Step caching") end to end
// through `denoised run` with real rank processes over loopback Gloo, on the
// trained demo model:
// - threshold 0 is the exact path, and a threshold too small to skip anything
//   runs the split forward (block 0, decision, the rest) bit-identically to
//   the exact path;
// - a threshold that skips steps skips the same steps on 1, 2 and 4 ranks,
//   with and without CFG-parallel, and the latents are bitwise equal across
//   all of them (the engine's CPU rank-invariance rule);
// - bad thresholds are refused naming the flag (the engine's Validate);
// - fp8 attention, where the backend has it, stays close to the exact path.
// Nothing here sets OPENBLAS_* variables.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/worker/cli_test_util.h"

namespace dn::worker {
namespace {

using ::testing::HasSubstr;

struct RunOutput {
  std::vector<float> latents;
  std::string cached_steps;  // metadata "cached_steps" ("" when absent)
  bool has_acceleration = false;
};

class StepCacheTest : public ::testing::Test {
 protected:
  testing_util::CliResult Run(const std::string& args) {
    return testing_util::RunDenoised(DENOISED_BIN, dir_.path(), &counter_,
                                     absl::StrCat("run --model ", DN_DEMO_MODEL_DIR), args);
  }
  RunOutput Generate(const std::string& args) {
    const std::string out = dir_ / absl::StrCat("out", counter_, ".safetensors");
    const testing_util::CliResult r = Run(absl::StrCat(args, " --out ", out));
    EXPECT_EQ(r.exit_code, 0) << args << "\n" << r.err;
    RunOutput o;
    if (r.exit_code != 0) return o;
    SafetensorsHeader header;
    o.latents = testing_util::ReadLatents(out, nullptr, &header);
    if (auto it = header.metadata.find("cached_steps"); it != header.metadata.end()) {
      o.cached_steps = it->second;
      o.has_acceleration = true;
    }
    return o;
  }
  static bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
    return !a.empty() && a.size() == b.size() &&
           std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  }

  testing_util::TempDir dir_;
  int counter_ = 0;
};

// 2 x 16 x 16 = 512 tokens (2 to 8 row tiles per shard), CFG on, 80 text
// tokens (the negative prompt's rows start mid-tile when stacked).
const char kArgs[] =
    "--frames 2 --height 32 --width 32 --steps 12 --guidance 5 --scheduler unipc "
    "--seed 7 --text-len 80";
// Skips some of the 12 steps of kArgs on the demo model, not all of them.
const char kSkipping[] = "--cache-threshold 0.2";

TEST_F(StepCacheTest, ThresholdZeroAndANeverSkippingThresholdAreExact) {
  const RunOutput exact = Generate(absl::StrCat(kArgs, " --ranks 1"));
  ASSERT_FALSE(exact.latents.empty());
  EXPECT_FALSE(exact.has_acceleration);
  const RunOutput zero = Generate(absl::StrCat(kArgs, " --ranks 1 --cache-threshold 0"));
  EXPECT_TRUE(SameBits(exact.latents, zero.latents));
  // 1e-30 skips nothing but runs block 0, the decision and the rest as
  // separate parts every step: still the exact op sequence.
  for (const char* ranks : {"--ranks 1", "--ranks 2 --cfg-parallel"}) {
    const RunOutput split =
        Generate(absl::StrCat(kArgs, " ", ranks, " --cache-threshold 1e-30"));
    EXPECT_TRUE(split.has_acceleration) << ranks;
    EXPECT_EQ(split.cached_steps, "") << ranks;
    EXPECT_TRUE(SameBits(exact.latents, split.latents)) << ranks;
  }
}

// The decision is one for the group: every rank's block-0 residual sums,
// over real token rows only, summed in one order whatever the rank count.
TEST_F(StepCacheTest, SkipsTheSameStepsOnEveryRankCountBitForBit) {
  // kArgs' 512 tokens (several 64-row tiles per shard, no padding), and 300
  // tokens (3 x 10 x 10), padded to 320, 384 and 512 rows on 1, 2 and 4
  // ranks: padded rows must not enter the signal.
  for (const char* shape : {"", "--frames 3 --height 20 --width 20"}) {
    SCOPED_TRACE(shape);
    const std::string args = absl::StrCat(kArgs, " ", shape, " ", kSkipping);
    const RunOutput exact = Generate(absl::StrCat(kArgs, " ", shape, " --ranks 1"));
    const RunOutput one = Generate(absl::StrCat(args, " --ranks 1"));
    ASSERT_FALSE(one.latents.empty());
    // Not vacuous: some steps are skipped, not all, never the first or last.
    ASSERT_NE(one.cached_steps, "") << "the threshold skips nothing";
    EXPECT_THAT(one.cached_steps, ::testing::Not(HasSubstr("11")));
    EXPECT_NE(one.cached_steps.rfind("0", 0), 0u) << one.cached_steps;
    EXPECT_LT(std::count(one.cached_steps.begin(), one.cached_steps.end(), ',') + 1, 10)
        << one.cached_steps;
    EXPECT_FALSE(SameBits(exact.latents, one.latents));
    EXPECT_LT(testing_util::MaxDiff(exact.latents, one.latents), 0.5);
    for (const char* ranks :
         {"--ranks 2", "--ranks 4", "--ranks 2 --cfg-parallel", "--ranks 4 --cfg-parallel"}) {
      const RunOutput got = Generate(absl::StrCat(args, " ", ranks));
      EXPECT_EQ(got.cached_steps, one.cached_steps) << ranks;
      EXPECT_TRUE(SameBits(one.latents, got.latents))
          << ranks << ": max diff " << testing_util::MaxDiff(one.latents, got.latents);
    }
  }
}

TEST_F(StepCacheTest, WithoutCfgTheDecisionIsTheSameOnACfgParallelGroup) {
  const std::string args = absl::StrCat(kArgs, " --guidance 1 ", kSkipping);
  const RunOutput one = Generate(absl::StrCat(args, " --ranks 1"));
  ASSERT_FALSE(one.latents.empty());
  const RunOutput cfgp = Generate(absl::StrCat(args, " --ranks 2 --cfg-parallel"));
  EXPECT_EQ(cfgp.cached_steps, one.cached_steps);
  EXPECT_TRUE(SameBits(one.latents, cfgp.latents));
}

TEST_F(StepCacheTest, BadThresholdsAreRefusedNamingTheFlag) {
  for (const char* bad : {"-0.1", "1.5", "nan", "inf"}) {
    const testing_util::CliResult r =
        Run(absl::StrCat(kArgs, " --ranks 1 --cache-threshold ", bad, " --out ",
                         dir_ / "bad.safetensors"));
    EXPECT_NE(r.exit_code, 0) << bad;
    EXPECT_THAT(r.err, HasSubstr("--cache-threshold")) << bad << "\n" << r.err;
    EXPECT_THAT(r.err, HasSubstr("INVALID_ARGUMENT")) << bad << "\n" << r.err;
  }
}

// fp8 self-attention (Backend::AttentionFp8; the CPU backend's emulation
// here) on 2 ranks: finite, and close to but not equal to the exact path.
TEST_F(StepCacheTest, Fp8AttentionIsCloseToTheExactPath) {
  const RunOutput exact = Generate(absl::StrCat(kArgs, " --ranks 1"));
  const std::string out = dir_ / "fp8.safetensors";
  const testing_util::CliResult r =
      Run(absl::StrCat(kArgs, " --ranks 2 --attention-fp8 --out ", out));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<float> fp8 = testing_util::ReadLatents(out);
  ASSERT_EQ(fp8.size(), exact.latents.size());
  for (float v : fp8) ASSERT_TRUE(std::isfinite(v));
  double num = 0, den = 0;
  for (size_t i = 0; i < fp8.size(); ++i) {
    num += (fp8[i] - exact.latents[i]) * static_cast<double>(fp8[i] - exact.latents[i]);
    den += exact.latents[i] * static_cast<double>(exact.latents[i]);
  }
  EXPECT_LT(std::sqrt(num / den), 0.2) << "rel L2 of fp8 attention against the exact path";
  EXPECT_GT(std::sqrt(num / den), 0.0) << "fp8 attention gave the exact latents";
}

}  // namespace
}  // namespace dn::worker
