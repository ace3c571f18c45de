// Shared helpers of the benchmarks (median, token-count latents).
#include "bench/bench_common.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"

namespace dn::bench {

double Median(std::vector<double> values) {
  if (values.empty()) return 0.0;
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

absl::StatusOr<worker::LatentShape> TokenGridShape(const worker::WanConfig& c, int64_t tokens,
                                                   const char* flag) {
  int64_t gh = static_cast<int64_t>(std::sqrt(static_cast<double>(tokens)));
  while (gh > 1 && tokens % gh != 0) --gh;
  const int64_t gw = tokens / gh;
  if (gw > c.rope_max_seq_len)
    return absl::InvalidArgumentError(absl::StrCat(
        flag, " ", tokens, " gives a token grid 1 x ", gh, " x ", gw,
        " wider than rope_max_seq_len ", c.rope_max_seq_len,
        "; pick a token count with a divisor closer to its square root"));
  worker::LatentShape s;
  s.channels = c.in_channels;
  s.frames = c.patch_size[0];
  s.height = static_cast<int>(gh) * c.patch_size[1];
  s.width = static_cast<int>(gw) * c.patch_size[2];
  return s;
}

}  // namespace dn::bench
