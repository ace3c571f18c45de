// CFG-parallel (docs/ENGINE.md, "CFG-parallel") end to end through
// `denoised run` with real rank processes over loopback Gloo:
// - 2 CFG halves x N/2 Ulysses ranks give exactly the latents, bit for bit,
//   of Ulysses over 1, 2 and 4 ranks (trained demo model, CFG on, a text
//   length that puts the negative prompt's rows mid-tile when both branches
//   are stacked, and more than one 64-row tile per shard);
// - without CFG (guidance 1) a CFG-parallel group gives the Ulysses result;
// - the heads need only divide the Ulysses degree N/2: the tiny preset's 4
//   heads run on 8 ranks as cfg 2 x ulysses 4, and the refusals name the
//   right degree and flag.
// Nothing here sets OPENBLAS_* variables: the equality must hold under
// whatever the machine sets.
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/worker/cli_test_util.h"

namespace dn::worker {
namespace {

using ::testing::HasSubstr;

class CfgParallelTest : public ::testing::Test {
 protected:
  using Result = testing_util::CliResult;
  // `denoised run <model> --threads 1 <args>`.
  Result Run(const std::string& model, const std::string& args) {
    return testing_util::RunDenoised(DENOISED_BIN, dir_.path(), &counter_, "run " + model, args);
  }
  // The latents `run` wrote (empty on failure).
  std::vector<float> Latents(const std::string& model, const std::string& args) {
    const std::string out = dir_ / absl::StrCat("out", counter_, ".safetensors");
    const Result r = Run(model, absl::StrCat(args, " --out ", out));
    EXPECT_EQ(r.exit_code, 0) << args << "\n" << r.err;
    if (r.exit_code != 0) return {};
    return testing_util::ReadLatents(out);
  }
  // Bit for bit (unlike ==, tells -0 from 0 and matches NaN payloads).
  static bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() &&
           std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  }
  static double MaxDiff(const std::vector<float>& a, const std::vector<float>& b) {
    return testing_util::MaxDiff(a, b);
  }

  testing_util::TempDir dir_;
  int counter_ = 0;
};

const std::string kDemo = absl::StrCat("--model ", DN_DEMO_MODEL_DIR);

// The trained demo model (4 heads, pixel space, patch 1x2x2): 2 x 16 x 16 =
// 512 tokens, so a shard holds 2 to 8 row tiles of 64; 80 text tokens, so
// the negative prompt's rows start mid-tile when both branches are stacked.
TEST_F(CfgParallelTest, EqualsUlyssesBitForBitOnTheDemoModel) {
  const std::string args =
      "--frames 2 --height 32 --width 32 --steps 4 --guidance 5 --scheduler unipc "
      "--seed 7 --text-len 80";
  const std::vector<float> ref = Latents(kDemo, absl::StrCat(args, " --ranks 1"));
  ASSERT_FALSE(ref.empty());
  const struct {
    const char* flags;
  } runs[] = {{"--ranks 2"}, {"--ranks 4"}, {"--ranks 2 --cfg-parallel"},
              {"--ranks 4 --cfg-parallel"}};
  for (const auto& r : runs) {
    const std::vector<float> got = Latents(kDemo, absl::StrCat(args, " ", r.flags));
    EXPECT_TRUE(SameBits(ref, got)) << "max diff " << MaxDiff(ref, got) << " " << r.flags << " vs --ranks 1";
    EXPECT_TRUE(SameBits(ref, got)) << r.flags << ": not bit-identical to --ranks 1";
  }
  // Not vacuous: CFG matters here (the unconditional branch changes the result).
  const std::vector<float> no_cfg =
      Latents(kDemo, absl::StrCat(args, " --ranks 1 --guidance 1"));
  EXPECT_GT(MaxDiff(ref, no_cfg), 1e-3);
}

// Without CFG both halves run the conditional branch; the result is the
// Ulysses one.
TEST_F(CfgParallelTest, WithoutCfgEqualsUlysses) {
  const std::string args =
      "--frames 2 --height 32 --width 32 --steps 3 --guidance 1 --seed 3 --text-len 9";
  const std::vector<float> ref = Latents(kDemo, absl::StrCat(args, " --ranks 1"));
  ASSERT_FALSE(ref.empty());
  const std::vector<float> got = Latents(kDemo, absl::StrCat(args, " --ranks 4 --cfg-parallel"));
  EXPECT_TRUE(SameBits(ref, got)) << "max diff " << MaxDiff(ref, got);
}

// Heads divide the Ulysses degree N/2, not N: the tiny preset (4 heads)
// cannot run Ulysses over 8 ranks, but runs as cfg 2 x ulysses 4, with the
// same bits as one rank. Uneven: 18 tokens over 4 Ulysses ranks.
TEST_F(CfgParallelTest, HeadsDivideTheUlyssesDegreeOnly) {
  const std::string tiny = "--preset tiny";
  const std::string args =
      "--frames 5 --height 48 --width 48 --steps 2 --guidance 4 --seed 11 --text-len 7";
  const std::string out = absl::StrCat(" --out ", dir_ / "refused.safetensors");
  const Result refused = Run(tiny, absl::StrCat(args, out, " --ranks 8"));
  EXPECT_NE(refused.exit_code, 0);
  EXPECT_THAT(refused.err, HasSubstr("num_attention_heads 4 does not divide by the group size 8"));
  EXPECT_THAT(refused.err, HasSubstr("--cfg-parallel would run 2 CFG halves x 4 Ulysses ranks"));

  const std::vector<float> ref = Latents(tiny, absl::StrCat(args, " --ranks 1"));
  ASSERT_FALSE(ref.empty());
  const std::vector<float> got = Latents(tiny, absl::StrCat(args, " --ranks 8 --cfg-parallel"));
  EXPECT_TRUE(SameBits(ref, got)) << "max diff " << MaxDiff(ref, got);

  const Result six = Run(tiny, absl::StrCat(args, out, " --ranks 6 --cfg-parallel"));
  EXPECT_NE(six.exit_code, 0);
  EXPECT_THAT(six.err, HasSubstr("num_attention_heads 4 does not divide by the Ulysses "
                                 "degree 3 (--cfg-parallel: 6 ranks = 2 CFG halves x 3"));
  EXPECT_FALSE(std::filesystem::exists(dir_ / "refused.safetensors"));
}

TEST_F(CfgParallelTest, OddRanksAreRefusedNamingTheFlag) {
  const Result r = Run("--preset tiny", "--frames 1 --height 16 --width 16 --steps 1 "
                                        "--ranks 3 --cfg-parallel");
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_THAT(r.err, HasSubstr("--cfg-parallel needs an even --ranks"));
}

}  // namespace
}  // namespace dn::worker
