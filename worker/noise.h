// File: worker/noise.h
//
// Seeded Gaussian noise that is the same on any rank count and any backend:
// a counter-based generator (Philox4x32-10) indexed by (seed, stream, element
// index), turned into N(0,1) with Box-Muller. Element i of a tensor depends
// only on (seed, stream, i), so a rank can make any slice by itself, and a
// CUDA kernel can make the same numbers (the functions are host/device).
//
// Streams: kNoiseStream for the initial latents; RandomInit::stream for
// preset weights; kEmbedStream(+1 for negative) for missing embeddings.
#ifndef DN_WORKER_NOISE_H_
#define DN_WORKER_NOISE_H_

#include <cmath>
#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define DN_HOST_DEVICE __host__ __device__
#else
#define DN_HOST_DEVICE
#endif

namespace dn::worker {

inline constexpr uint64_t kNoiseStream = 0x6e6f697365ull;   // "noise"
inline constexpr uint64_t kEmbedStream = 0x656d626564ull;   // "embed"

struct Philox4x32 {
  uint32_t v[4];
};

// Philox4x32-10 of counter (c0..c3) under key (k0, k1).
DN_HOST_DEVICE inline Philox4x32 PhiloxRound10(uint32_t c0, uint32_t c1,
                                               uint32_t c2, uint32_t c3,
                                               uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n1 = lo1;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    const uint32_t n3 = lo0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += kW0;
    k1 += kW1;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// Standard normal for element `index` of (seed, stream). Pairs of elements
// (2j, 2j+1) share one Philox call: cos and sin branches of Box-Muller.
DN_HOST_DEVICE inline float NormalAt(uint64_t seed, uint64_t stream,
                                     uint64_t index) {
  const uint64_t pair = index >> 1;
  const Philox4x32 r = PhiloxRound10(
      static_cast<uint32_t>(pair), static_cast<uint32_t>(pair >> 32),
      static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32),
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  // u1 in (0, 1], u2 in [0, 1), from 32-bit words, in double for accuracy.
  const double u1 = (static_cast<double>(r.v[0]) + 1.0) * (1.0 / 4294967296.0);
  const double u2 = static_cast<double>(r.v[1]) * (1.0 / 4294967296.0);
  const double radius = sqrt(-2.0 * log(u1));
  const double angle = 6.283185307179586476925286766559 * u2;
  return static_cast<float>((index & 1) ? radius * sin(angle)
                                        : radius * cos(angle));
}

// out[i] = mean + std * NormalAt(seed, stream, offset + i), i in [0, n).
void FillNormal(uint64_t seed, uint64_t stream, uint64_t offset, float mean,
                float std, float* out, size_t n);

}  // namespace dn::worker

#endif  // DN_WORKER_NOISE_H_
