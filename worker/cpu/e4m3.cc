#include "worker/cpu/e4m3.h"

#include <cmath>
#include <cstring>
#include <limits>

namespace dn::worker {

uint8_t EncodeE4m3(float x) {
  const uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
  if (std::isnan(x)) return static_cast<uint8_t>(sign | 0x7F);
  const float a = std::fabs(x);
  // Everything at or above the largest finite value saturates (values in
  // (448, 464) would round to 448 anyway; the rest would overflow).
  if (a >= kE4m3Max) return static_cast<uint8_t>(sign | 0x7E);
  if (a < 0.015625f) {  // below 2^-6: subnormal, steps of 2^-9
    // ldexp is exact here, nearbyint rounds ties to even (default mode);
    // 8 steps of 2^-9 is the smallest normal, code 0x08, which is what
    // n == 8 encodes as well.
    const int n = static_cast<int>(std::nearbyint(std::ldexp(a, 9)));
    return static_cast<uint8_t>(sign | n);
  }
  int e2 = 0;
  const float f = std::frexp(a, &e2);  // a = f * 2^e2, f in [0.5, 1)
  int exponent = e2 - 1;               // a = m * 2^exponent, m in [1, 2)
  const float m = 2.0f * f;
  // (m - 1) * 8 is exact in float; round its fraction to even.
  int mant = static_cast<int>(std::nearbyint((m - 1.0f) * 8.0f));
  if (mant == 8) {
    mant = 0;
    ++exponent;
  }
  // a < 448 keeps the result at or below 0x7E (448).
  return static_cast<uint8_t>(sign | ((exponent + 7) << 3) | mant);
}

float DecodeE4m3(uint8_t code) {
  const bool negative = (code & 0x80) != 0;
  const int exponent = (code >> 3) & 0xF;
  const int mant = code & 0x7;
  float value;
  if (exponent == 0xF && mant == 0x7) {
    value = std::numeric_limits<float>::quiet_NaN();
  } else if (exponent == 0) {
    value = std::ldexp(static_cast<float>(mant), -9);
  } else {
    value = std::ldexp(1.0f + static_cast<float>(mant) / 8.0f, exponent - 7);
  }
  return negative ? -value : value;
}

// The same rounding as DecodeE4m3(EncodeE4m3(x)) without going through the
// code (the CPU emulation rounds every probability: this is its hot loop).
float RoundE4m3(float x) {
  if (std::isnan(x)) return x;
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const bool negative = (bits >> 31) != 0;
  bits &= 0x7FFFFFFFu;
  float a;
  std::memcpy(&a, &bits, sizeof a);
  float r;
  if (a >= kE4m3Max) {
    r = kE4m3Max;
  } else if (a < 0.015625f) {
    // Subnormal steps of 2^-9: a * 512 < 8 is exact, and adding then
    // subtracting 2^23 rounds it to an integer, ties to even.
    const float t = a * 512.0f;
    r = ((t + 8388608.0f) - 8388608.0f) * (1.0f / 512.0f);
  } else {
    // Normal: keep 3 of float's 23 mantissa bits, rounding to nearest even
    // (a carry into the exponent is the correct result; a < 448 rounds to at
    // most 448).
    const uint32_t lsb = (bits >> 20) & 1u;
    bits = (bits + 0x7FFFFu + lsb) & 0xFFF00000u;
    std::memcpy(&r, &bits, sizeof r);
  }
  return negative ? -r : r;
}

float E4m3ScaleForAmax(float amax) {
  if (!(amax > 0.0f) || !std::isfinite(amax)) return 1.0f;
  const float scale = kE4m3Max / amax;
  return std::isfinite(scale) ? scale : 1.0f;
}

}  // namespace dn::worker
