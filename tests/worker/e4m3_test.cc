// The fp8 e4m3 conversion (worker/cpu/e4m3.h): every one of the 256 codes,
// round trips, and rounding against a brute-force nearest-value search.
#include "worker/cpu/e4m3.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace dn::worker {
namespace {

bool IsNanCode(int c) { return (c & 0x7F) == 0x7F; }

// The value of a code from the format's definition, written independently of
// DecodeE4m3 (powers of two as products, no ldexp).
double ReferenceValue(int c) {
  const int e = (c >> 3) & 0xF, m = c & 7;
  double p = 1.0;
  if (e == 0) {
    for (int i = 0; i < 9; ++i) p /= 2;  // 2^-9
    p *= m;
  } else {
    for (int i = 0; i < e - 7; ++i) p *= 2;
    for (int i = 0; i < 7 - e; ++i) p /= 2;
    p *= 1.0 + m / 8.0;
  }
  return (c & 0x80) ? -p : p;
}

// Brute force: the finite code nearest to x, ties to the even code; beyond
// the largest finite value, saturation.
int ReferenceEncode(float x) {
  const double a = std::fabs(static_cast<double>(x));
  const int sign = std::signbit(x) ? 0x80 : 0;
  if (a >= 448.0) return sign | 0x7E;
  int best = 0;
  double best_err = std::numeric_limits<double>::infinity();
  for (int c = 0; c <= 0x7E; ++c) {
    const double err = std::fabs(ReferenceValue(c) - a);
    if (err < best_err || (err == best_err && (c & 1) == 0)) {
      best = c;
      best_err = err;
    }
  }
  return sign | best;
}

TEST(E4m3Test, EveryCodeDecodesToItsDefinitionAndRoundTrips) {
  for (int c = 0; c < 256; ++c) {
    const float value = DecodeE4m3(static_cast<uint8_t>(c));
    if (IsNanCode(c)) {
      EXPECT_TRUE(std::isnan(value)) << "code " << c;
      EXPECT_TRUE(std::isnan(RoundE4m3(value)));
      continue;
    }
    EXPECT_EQ(static_cast<double>(value), ReferenceValue(c)) << "code " << c;
    EXPECT_EQ(EncodeE4m3(value), c) << "code " << c << " value " << value;
    EXPECT_EQ(RoundE4m3(value), value);
  }
  // Landmarks of the format.
  EXPECT_EQ(DecodeE4m3(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(DecodeE4m3(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_EQ(DecodeE4m3(0x38), 1.0f);
  EXPECT_EQ(DecodeE4m3(0x7E), 448.0f);
  EXPECT_EQ(DecodeE4m3(0xFE), -448.0f);
  EXPECT_EQ(DecodeE4m3(0x80), 0.0f);
  EXPECT_TRUE(std::signbit(DecodeE4m3(0x80)));
}

TEST(E4m3Test, CodesAreMonotonic) {
  for (int c = 1; c <= 0x7E; ++c) {
    EXPECT_LT(DecodeE4m3(static_cast<uint8_t>(c - 1)),
              DecodeE4m3(static_cast<uint8_t>(c)));
    EXPECT_GT(DecodeE4m3(static_cast<uint8_t>(0x80 | (c - 1))),
              DecodeE4m3(static_cast<uint8_t>(0x80 | c)));
  }
}

TEST(E4m3Test, MidpointsRoundToEvenAndNeighboursToTheNearest) {
  for (int c = 0; c < 0x7E; ++c) {
    for (int sign : {0, 0x80}) {
      const float lo = DecodeE4m3(static_cast<uint8_t>(sign | c));
      const float hi = DecodeE4m3(static_cast<uint8_t>(sign | (c + 1)));
      const float mid = 0.5f * (lo + hi);  // exact: 4 significant bits
      ASSERT_EQ(static_cast<double>(mid),
                0.5 * (static_cast<double>(lo) + static_cast<double>(hi)));
      const int even = (c % 2 == 0) ? c : c + 1;
      EXPECT_EQ(EncodeE4m3(mid), sign | even) << "between codes " << c << ", " << c + 1;
      const float toward_hi = std::nextafter(mid, hi);
      const float toward_lo = std::nextafter(mid, lo);
      EXPECT_EQ(EncodeE4m3(toward_hi), sign | (c + 1)) << toward_hi;
      EXPECT_EQ(EncodeE4m3(toward_lo), sign | c) << toward_lo;
    }
  }
}

TEST(E4m3Test, SaturatesAtTheLargestFiniteValue) {
  for (float x : {448.0f, 449.0f, 463.99f, 464.0f, 465.0f, 1e9f,
                  std::numeric_limits<float>::max(),
                  std::numeric_limits<float>::infinity()}) {
    EXPECT_EQ(RoundE4m3(x), 448.0f) << x;
    EXPECT_EQ(RoundE4m3(-x), -448.0f) << x;
  }
  EXPECT_TRUE(std::isnan(RoundE4m3(std::numeric_limits<float>::quiet_NaN())));
  // Below half the smallest subnormal: zero, keeping the sign.
  EXPECT_EQ(RoundE4m3(std::ldexp(1.0f, -11)), 0.0f);
  EXPECT_EQ(RoundE4m3(std::ldexp(1.0f, -10)), 0.0f);  // tie with 0: even
  EXPECT_EQ(RoundE4m3(std::nextafter(std::ldexp(1.0f, -10), 1.0f)),
            std::ldexp(1.0f, -9));
  EXPECT_TRUE(std::signbit(RoundE4m3(-1e-30f)));
}

TEST(E4m3Test, MatchesBruteForceNearestOnRandomValues) {
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> exponent(-14.0f, 10.0f);
  std::uniform_int_distribution<int> sign(0, 1);
  for (int i = 0; i < 20000; ++i) {
    float x = std::exp2(exponent(gen));
    if (sign(gen)) x = -x;
    ASSERT_EQ(EncodeE4m3(x), ReferenceEncode(x)) << "x = " << x;
  }
}

TEST(E4m3Test, RoundEqualsDecodeOfEncode) {
  // RoundE4m3 has its own fast path: it must agree with the code route
  // everywhere, bitwise (signed zeros included).
  auto same = [](float x) {
    const float a = RoundE4m3(x), b = DecodeE4m3(EncodeE4m3(x));
    return std::memcmp(&a, &b, sizeof a) == 0;
  };
  for (int c = 0; c < 256; ++c) {
    if (IsNanCode(c)) continue;
    const float v = DecodeE4m3(static_cast<uint8_t>(c));
    for (float x : {v, std::nextafter(v, 1e9f), std::nextafter(v, -1e9f)})
      ASSERT_TRUE(same(x)) << "x = " << x;
    if (c < 0x7E && (c & 0x7F) != 0x7E) {
      const float next = DecodeE4m3(static_cast<uint8_t>(c + 1));
      const float mid = 0.5f * (v + next);
      for (float x : {mid, std::nextafter(mid, 1e9f), std::nextafter(mid, -1e9f)})
        ASSERT_TRUE(same(x)) << "x = " << x;
    }
  }
  std::mt19937 gen(9);
  std::uniform_real_distribution<float> exponent(-40.0f, 12.0f);
  for (int i = 0; i < 200000; ++i) {
    const float x = (i % 2 ? -1.0f : 1.0f) * std::exp2(exponent(gen));
    ASSERT_TRUE(same(x)) << "x = " << x;
  }
  for (float x : {0.0f, -0.0f, 448.0f, -448.0f, 1e30f,
                  std::numeric_limits<float>::infinity(),
                  -std::numeric_limits<float>::infinity(),
                  std::numeric_limits<float>::denorm_min()})
    EXPECT_TRUE(same(x)) << "x = " << x;
}

TEST(E4m3Test, ScaleMapsAmaxOntoTheRange) {
  EXPECT_EQ(E4m3ScaleForAmax(448.0f), 1.0f);
  EXPECT_EQ(E4m3ScaleForAmax(2.0f), 224.0f);
  EXPECT_EQ(E4m3ScaleForAmax(0.0f), 1.0f);
  EXPECT_EQ(E4m3ScaleForAmax(std::numeric_limits<float>::infinity()), 1.0f);
  EXPECT_EQ(E4m3ScaleForAmax(std::numeric_limits<float>::quiet_NaN()), 1.0f);
  EXPECT_EQ(E4m3ScaleForAmax(1e-44f), 1.0f);  // 448 / amax overflows
  // The scaled amax lands on the largest code.
  for (float amax : {0.37f, 3.0f, 1234.5f})
    EXPECT_EQ(RoundE4m3(amax * E4m3ScaleForAmax(amax)), 448.0f) << amax;
}

}  // namespace
}  // namespace dn::worker
