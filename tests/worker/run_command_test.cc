// `denoised run` end to end with real rank processes over loopback Gloo:
// sequence-parallel invariance (1, 2, 4 ranks give the same latents, also
// when the token count does not divide by the rank count and when a rank's
// whole shard is padding), CFG on/off, both schedulers, determinism, the
// embedding/latent file inputs, and clear errors (head count not divisible,
// bad input file).
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/worker/cli_test_util.h"
#include "worker/noise.h"
#include "worker/safetensors.h"
#include "worker/tensor.h"
#include "worker/wan_config.h"

namespace dn::worker {
namespace {

// Bound on |latents(P ranks) - latents(1 rank)|, relative to max |latents|.
// The CPU engine is rank-invariant by construction (docs/ENGINE.md, "Rank
// invariance (CPU): the rule"): shards are padded to 64-row tiles aligned to
// global token positions, and every GEMM and attention tile computes a token's
// row with the same OpenBLAS calls whatever the rank count. So 1, 2 and 4
// ranks must give bit-identical latents, under any OpenBLAS core type, L2
// size and thread count (ctest runs these tests under each: tests/CMakeLists.txt).
constexpr double kShardTolerance = 0.0;

class RunTest : public ::testing::Test {
 protected:
  using Result = testing_util::CliResult;
  // Runs `denoised <command> --threads 1 --timeout-s 60 <args>`.
  Result Run(const std::string& args, const std::string& command = "run --preset tiny") {
    return testing_util::RunDenoised(DENOISED_BIN, dir_.path(), &counter_, command, args);
  }
  std::string Out(const std::string& name) { return dir_ / name; }

  // Runs and returns the latents written to --out (fails the test otherwise).
  std::vector<float> Latents(const std::string& args, const std::string& name) {
    const Result r = Run(absl::StrCat(args, " --out ", Out(name)));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return ReadLatents(Out(name));
  }
  static std::vector<float> ReadLatents(const std::string& path, Shape* shape = nullptr,
                                        SafetensorsHeader* header = nullptr) {
    return testing_util::ReadLatents(path, shape, header);
  }
  static double MaxAbs(const std::vector<float>& v) { return testing_util::MaxAbs(v); }
  static double MaxDiff(const std::vector<float>& a, const std::vector<float>& b) {
    return testing_util::MaxDiff(a, b);
  }

  testing_util::TempDir dir_;
  int counter_ = 0;
};

TEST_F(RunTest, SequenceParallelMatchesOneRank) {
  struct Case {
    const char* pixels;
    int tokens;  // F' * H' * W' of the tiny model
  };
  // 12 tokens (divides by 1, 2, 4); 18; 5. On CPU every shard is one 64-row
  // tile, so on 2 and 4 ranks all ranks but rank 0 hold only padding rows.
  // 320 and 280 tokens spread over the ranks and cross 64-row tiles (280 on 4
  // ranks: S = 128, rank 2 holds 24 tokens and 104 padding rows, rank 3 only
  // padding).
  const Case cases[] = {{"--frames 5 --height 48 --width 32", 12},
                        {"--frames 5 --height 48 --width 48", 18},
                        {"--frames 1 --height 16 --width 80", 5},
                        {"--frames 17 --height 128 --width 128", 320},
                        {"--frames 17 --height 128 --width 112", 280}};
  for (const Case& c : cases) {
    const std::string args = absl::StrCat(
        c.pixels, " --steps 3 --guidance 4 --scheduler unipc --seed 11 --text-len 7");
    const auto one = Latents(absl::StrCat(args, " --ranks 1"), "one.safetensors");
    ASSERT_FALSE(one.empty());
    const double scale = std::max(1.0, MaxAbs(one));
    for (int ranks : {2, 4}) {
      const auto many = Latents(absl::StrCat(args, " --ranks ", ranks),
                                absl::StrCat("r", ranks, ".safetensors"));
      const double diff = MaxDiff(one, many);
      EXPECT_LE(diff, kShardTolerance * scale)
          << c.tokens << " tokens on " << ranks << " ranks";
      // The check is not vacuous: the latents moved away from pure noise.
      EXPECT_GT(MaxAbs(one), 0.0);
    }
  }
}

TEST_F(RunTest, SchedulersAndGuidanceOnTwoRanks) {
  const std::string base = "--frames 5 --height 48 --width 48 --steps 2 --seed 3 --text-len 5";
  for (const char* sched : {"unipc", "euler"}) {
    for (const char* g : {"1", "5"}) {
      const std::string args = absl::StrCat(base, " --scheduler ", sched, " --guidance ", g);
      const auto one = Latents(absl::StrCat(args, " --ranks 1"), "a.safetensors");
      const auto two = Latents(absl::StrCat(args, " --ranks 2"), "b.safetensors");
      EXPECT_LE(MaxDiff(one, two), kShardTolerance * std::max(1.0, MaxAbs(one)))
          << sched << " guidance " << g;
    }
  }
  // The knobs matter: CFG on vs off, UniPC vs Euler give different latents.
  const auto cfg_off = Latents(absl::StrCat(base, " --guidance 1 --ranks 2"), "c.safetensors");
  const auto cfg_on = Latents(absl::StrCat(base, " --guidance 5 --ranks 2"), "d.safetensors");
  EXPECT_GT(MaxDiff(cfg_off, cfg_on), 1e-3);
  const auto euler =
      Latents(absl::StrCat(base, " --guidance 5 --scheduler euler --ranks 2"), "e.safetensors");
  EXPECT_GT(MaxDiff(cfg_on, euler), 1e-3);
}

TEST_F(RunTest, SameSeedSameOutputAndMetadata) {
  const std::string args =
      "--frames 5 --height 32 --width 48 --steps 2 --seed 5 --text-len 4 --ranks 2";
  const auto a = Latents(args, "a.safetensors");
  const auto b = Latents(args, "b.safetensors");
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(MaxDiff(a, b), 0.0);  // bitwise: same seed, same ranks
  const auto c = Latents(
      "--frames 5 --height 32 --width 48 --steps 2 --seed 6 --text-len 4 --ranks 2",
      "c.safetensors");
  EXPECT_GT(MaxDiff(a, c), 1e-2);
  Shape shape;
  SafetensorsHeader header;
  ReadLatents(Out("a.safetensors"), &shape, &header);
  EXPECT_EQ(shape, (Shape{16, 2, 4, 6}));
  EXPECT_EQ(header.metadata["seed"], "5");
  EXPECT_EQ(header.metadata["ranks"], "2");
  EXPECT_EQ(header.metadata["scheduler"], "unipc");
  EXPECT_EQ(header.metadata["steps"], "2");
  EXPECT_EQ(header.metadata["backend"], "cpu");
  EXPECT_EQ(header.metadata["model_config_hash"], PresetConfig("tiny").value().Hash());
}

TEST_F(RunTest, FileInputsEqualTheSeededDefaults) {
  // --embeds (bf16-exact values stored as bf16) and --latents files holding
  // exactly what the seeded defaults would make give the same output.
  const WanConfig c = PresetConfig("tiny").value();
  const int text_len = 6;
  std::vector<float> embeds(static_cast<size_t>(text_len * c.text_dim));
  FillNormal(9, kEmbedStream, 0, 0.0f, 1.0f, embeds.data(), embeds.size());
  std::vector<uint16_t> embeds_bf16(embeds.size());
  for (size_t i = 0; i < embeds.size(); ++i) {
    embeds_bf16[i] = F32ToBF16(embeds[i]);
    embeds[i] = BF16ToF32(embeds_bf16[i]);
  }
  std::vector<float> noise(16 * 2 * 4 * 6);
  FillNormal(9, kNoiseStream, 0, 0.0f, 1.0f, noise.data(), noise.size());
  ASSERT_TRUE(WriteSafetensors(Out("embeds.safetensors"),
                               {{"prompt_embeds", DType::kBF16,
                                 {text_len, c.text_dim}, embeds_bf16.data()}})
                  .ok());
  ASSERT_TRUE(WriteSafetensors(Out("embeds_f32.safetensors"),
                               {{"prompt_embeds", DType::kF32,
                                 {text_len, c.text_dim}, embeds.data()}})
                  .ok());
  ASSERT_TRUE(WriteSafetensors(Out("latents.safetensors"),
                               {{"latents", DType::kF32, {16, 2, 4, 6}, noise.data()}})
                  .ok());
  const std::string base = "--frames 5 --height 32 --width 48 --steps 2 --ranks 2 --seed 9";
  const auto from_bf16 =
      Latents(absl::StrCat(base, " --embeds ", Out("embeds.safetensors")), "a.safetensors");
  const auto from_f32 = Latents(
      absl::StrCat(base, " --embeds ", Out("embeds_f32.safetensors"), " --latents ",
                   Out("latents.safetensors")),
      "b.safetensors");
  EXPECT_EQ(MaxDiff(from_bf16, from_f32), 0.0);
  // A negative prompt file changes the uncond branch.
  const auto with_negative = Latents(
      absl::StrCat(base, " --embeds ", Out("embeds.safetensors"), " --negative-embeds ",
                   Out("embeds.safetensors")),
      "c.safetensors");
  EXPECT_GT(MaxDiff(from_bf16, with_negative), 1e-3);
  // Guidance with negative == prompt is the cond branch alone = CFG off.
  const auto cfg_off = Latents(
      absl::StrCat(base, " --guidance 1 --embeds ", Out("embeds.safetensors")),
      "d.safetensors");
  EXPECT_LE(MaxDiff(with_negative, cfg_off), 1e-4 * std::max(1.0, MaxAbs(cfg_off)));
}

TEST_F(RunTest, CheckpointFolderEqualsPreset) {
  // make-checkpoint writes the tiny preset's weights (f32, original Wan2.1
  // names, sharded): loading them from files must give the same latents as
  // the on-device preset initialisation.
  const std::string ckpt = Out("ckpt");
  const std::string make = absl::StrCat(DENOISED_BIN, " make-checkpoint --preset tiny --seed 4 --out ",
                                        ckpt, " --original-names --max-shard-bytes 100000 > /dev/null 2>&1");
  ASSERT_EQ(std::system(make.c_str()), 0);
  const std::string args = "--frames 5 --height 48 --width 32 --steps 2 --ranks 2 --seed 1 --text-len 3";
  const auto preset = Latents(absl::StrCat(args, " --preset-seed 4"), "a.safetensors");
  const auto files = [&] {
    const Result r = Run(absl::StrCat(args, " --model ", ckpt, " --out ", Out("b.safetensors")), "run");
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return ReadLatents(Out("b.safetensors"));
  }();
  ASSERT_FALSE(preset.empty());
  EXPECT_EQ(MaxDiff(preset, files), 0.0);
  const auto other_seed = Latents(absl::StrCat(args, " --preset-seed 5"), "c.safetensors");
  EXPECT_GT(MaxDiff(preset, other_seed), 1e-3);
}

TEST_F(RunTest, HeadsNotDivisibleIsAClearError) {
  // The tiny model has 4 heads; 3 ranks cannot shard them.
  const Result r = Run(absl::StrCat("--frames 5 --height 48 --width 48 --steps 1 --ranks 3 --out ",
                                    Out("x.safetensors")));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("num_attention_heads 4"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("FAILED_PRECONDITION"), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(Out("x.safetensors")));
}

TEST_F(RunTest, BadInputsFailWithTheFlagNamed) {
  Result r = Run(absl::StrCat("--frames 5 --height 48 --width 48 --steps 1 --ranks 2 --embeds ",
                              Out("missing.safetensors"), " --out ", Out("x.safetensors")));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--embeds"), std::string::npos) << r.err;
  r = Run(absl::StrCat("--frames 4 --height 48 --width 48 --steps 1 --ranks 2 --out ",
                       Out("x.safetensors")));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--frames: 4"), std::string::npos) << r.err;
  r = Run(absl::StrCat("--frames 5 --height 48 --width 48 --steps 1 --ranks 2 --scheduler dpm --out ",
                       Out("x.safetensors")));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("--scheduler"), std::string::npos) << r.err;
  r = Run("--frames 5 --height 48 --width 48 --steps 1 --ranks 2", "run");
  EXPECT_EQ(r.exit_code, 2);  // neither --model nor --preset (and no --out)
}

TEST_F(RunTest, StopRequestedOnOneRankStopsAllAtTheSameStep) {
  const Result r = Run(absl::StrCat(
      "--frames 5 --height 48 --width 48 --steps 6 --ranks 2 --fault-rank 1 "
      "--fault-step 1 --fault cancel --out ", Out("x.safetensors")));
  EXPECT_EQ(r.exit_code, 1);
  // Rank 1 requests the stop during step 1's callback; step 2 still runs and
  // its control all-reduce stops every rank after 3 steps.
  EXPECT_NE(r.err.find("rank 0 failed: CANCELLED: stopped after step 3 of 6"),
            std::string::npos) << r.err;
  EXPECT_NE(r.err.find("rank 1 failed: CANCELLED: stopped after step 3 of 6"),
            std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(Out("x.safetensors")));
}

TEST_F(RunTest, DeadRankFailsTheRunWithItsName) {
  const Result r = Run(absl::StrCat(
      "--frames 5 --height 48 --width 48 --steps 6 --ranks 2 --fault-rank 1 "
      "--fault-step 1 --fault exit --out ", Out("x.safetensors")));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("denoised run: INTERNAL: rank 1 exited with status 3"),
            std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(Out("x.safetensors")));
}

TEST_F(RunTest, BenchStepReportsOnTheTinyPreset) {
  const Result r = Run("--tokens 12 --ranks 2 --cfg --iters 2 --text-len 8",
                       "bench step --preset tiny");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("RESULT ranks=2 backend=cpu tokens=12 cfg=1 layers=2"),
            std::string::npos) << r.out;
  EXPECT_NE(r.out.find("peak memory per rank"), std::string::npos) << r.out;
}


TEST_F(RunTest, BenchStepAppliesALoraOfTheLoraDir) {
  const std::string dir = Out("loras");
  std::filesystem::create_directories(dir);
  const std::string make = absl::StrCat(DENOISED_BIN, " make-checkpoint --preset tiny --lora-rank 4 "
                                        "--lora-out ", dir, "/a.safetensors > /dev/null");
  ASSERT_EQ(std::system(make.c_str()), 0) << make;
  const Result r = Run(absl::StrCat("--tokens 12 --ranks 1 --cfg --iters 2 --text-len 8 "
                                    "--lora-dir ", dir, " --lora a:0.5"),
                       "bench step --preset tiny");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("loras=1"), std::string::npos) << r.out;
  // An unknown LoRA fails the bench, naming the file.
  const Result bad = Run(absl::StrCat("--tokens 12 --ranks 1 --iters 1 --text-len 8 "
                                      "--lora-dir ", dir, " --lora nope"),
                         "bench step --preset tiny");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("nope"), std::string::npos) << bad.err;
}

}  // namespace
}  // namespace dn::worker
