#include "worker/noise.h"

namespace dn::worker {

void FillNormal(uint64_t seed, uint64_t stream, uint64_t offset, float mean,
                float std, float* out, size_t n) {
  size_t i = 0;
  // Leading odd element: the sin half of its pair.
  if (n > 0 && (offset & 1)) {
    out[0] = mean + std * NormalAt(seed, stream, offset);
    i = 1;
  }
  // Whole pairs share one Philox call and one radius, exactly as NormalAt
  // computes them (the test checks bit equality with NormalAt).
  for (; i + 1 < n; i += 2) {
    const uint64_t pair = (offset + i) >> 1;
    const Philox4x32 r = PhiloxRound10(
        static_cast<uint32_t>(pair), static_cast<uint32_t>(pair >> 32),
        static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32),
        static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    const double u1 = (static_cast<double>(r.v[0]) + 1.0) * (1.0 / 4294967296.0);
    const double u2 = static_cast<double>(r.v[1]) * (1.0 / 4294967296.0);
    const double radius = sqrt(-2.0 * log(u1));
    const double angle = 6.283185307179586476925286766559 * u2;
    out[i] = mean + std * static_cast<float>(radius * cos(angle));
    out[i + 1] = mean + std * static_cast<float>(radius * sin(angle));
  }
  if (i < n) out[i] = mean + std * NormalAt(seed, stream, offset + i);
}

}  // namespace dn::worker
