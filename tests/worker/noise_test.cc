#include "worker/noise.h"

#include <cmath>
#include <cstring>
#include <vector>

#include <gtest/gtest.h>

namespace dn::worker {
namespace {

std::vector<float> Fill(uint64_t seed, uint64_t stream, uint64_t offset, size_t n,
                        float mean = 0.0f, float std = 1.0f) {
  std::vector<float> out(n);
  FillNormal(seed, stream, offset, mean, std, out.data(), n);
  return out;
}

bool BitEqual(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

TEST(NoiseTest, PhiloxKnownAnswers) {
  // Random123's philox4x32-10 known-answer vectors.
  Philox4x32 r = PhiloxRound10(0, 0, 0, 0, 0, 0);
  EXPECT_EQ(r.v[0], 0x6627e8d5u);
  EXPECT_EQ(r.v[1], 0xe169c58du);
  EXPECT_EQ(r.v[2], 0xbc57ac4cu);
  EXPECT_EQ(r.v[3], 0x9b00dbd8u);
  r = PhiloxRound10(~0u, ~0u, ~0u, ~0u, ~0u, ~0u);
  EXPECT_EQ(r.v[0], 0x408f276du);
  EXPECT_EQ(r.v[1], 0x41c83b0eu);
  EXPECT_EQ(r.v[2], 0xa20bc7c6u);
  EXPECT_EQ(r.v[3], 0x6d5451fdu);
  r = PhiloxRound10(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u,
                    0x299f31d0u);
  EXPECT_EQ(r.v[0], 0xd16cfe09u);
  EXPECT_EQ(r.v[1], 0x94fdccebu);
  EXPECT_EQ(r.v[2], 0x5001e420u);
  EXPECT_EQ(r.v[3], 0x24126ea1u);
}

TEST(NoiseTest, DeterministicAndKeyedBySeedAndStream) {
  const std::vector<float> a = Fill(7, kNoiseStream, 0, 4096);
  EXPECT_EQ(a, Fill(7, kNoiseStream, 0, 4096));
  EXPECT_NE(a, Fill(8, kNoiseStream, 0, 4096));
  EXPECT_NE(a, Fill(7, kEmbedStream, 0, 4096));
  EXPECT_NE(a, Fill(7, kNoiseStream, 4096, 4096));
  // High halves of seed and stream matter too.
  EXPECT_NE(a, Fill(7 + (uint64_t{1} << 40), kNoiseStream, 0, 4096));
  EXPECT_NE(a, Fill(7, kNoiseStream + (uint64_t{1} << 40), 0, 4096));
  // mean/std are applied as mean + std * z.
  const std::vector<float> b = Fill(7, kNoiseStream, 0, 4096, 3.0f, 2.0f);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(b[i], 3.0f + 2.0f * a[i]);
}

TEST(NoiseTest, MeanAndStdAreStandardNormal) {
  const size_t n = size_t{1} << 20;
  const std::vector<float> z = Fill(123, kNoiseStream, 0, n);
  double sum = 0, sq = 0, quad = 0;
  size_t beyond3 = 0;
  for (float v : z) {
    ASSERT_TRUE(std::isfinite(v));
    sum += v;
    sq += static_cast<double>(v) * v;
    quad += static_cast<double>(v) * v * v * v;
    if (std::fabs(v) > 3) ++beyond3;
  }
  const double mean = sum / n, var = sq / n - mean * mean;
  EXPECT_NEAR(mean, 0.0, 0.005);
  EXPECT_NEAR(std::sqrt(var), 1.0, 0.005);
  EXPECT_NEAR(quad / n, 3.0, 0.05);  // kurtosis of N(0, 1)
  EXPECT_NEAR(static_cast<double>(beyond3) / n, 0.0027, 0.0005);
  // Even (cos) and odd (sin) elements are each standard normal.
  double even = 0, odd = 0;
  for (size_t i = 0; i < n; i += 2) {
    even += static_cast<double>(z[i]) * z[i];
    odd += static_cast<double>(z[i + 1]) * z[i + 1];
  }
  EXPECT_NEAR(even / (n / 2), 1.0, 0.01);
  EXPECT_NEAR(odd / (n / 2), 1.0, 0.01);
}

TEST(NoiseTest, SlicesEqualThePartsOfTheWhole) {
  const size_t n = 1001;
  const std::vector<float> whole = Fill(42, 99, 0, n, 0.5f, 1.5f);
  for (size_t i = 0; i < n; ++i)
    ASSERT_TRUE(BitEqual(whole[i], 0.5f + 1.5f * NormalAt(42, 99, i))) << i;
  for (size_t offset : {0, 1, 2, 3, 500, 777, 999, 1000}) {
    for (size_t len : {0, 1, 2, 3, 5, 100}) {
      if (offset + len > n) continue;
      const std::vector<float> part = Fill(42, 99, offset, len, 0.5f, 1.5f);
      for (size_t i = 0; i < len; ++i)
        EXPECT_TRUE(BitEqual(part[i], whole[offset + i])) << offset << "+" << i;
    }
  }
  // Indices past 2^32 (a 64-bit pair counter) are consistent too.
  const uint64_t far = (uint64_t{1} << 33) + 1;
  const std::vector<float> tail = Fill(1, 2, far, 4);
  for (size_t i = 0; i < 4; ++i) EXPECT_TRUE(BitEqual(tail[i], NormalAt(1, 2, far + i)));
  EXPECT_NE(NormalAt(1, 2, far), NormalAt(1, 2, far - (uint64_t{1} << 33)));
}

}  // namespace
}  // namespace dn::worker
