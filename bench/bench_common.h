// File: bench/bench_common.h
//
// Helpers shared by the benchmarks: the median, and the latent of a token
// count (one patch-frame with a token grid H' x W' = N, H' the largest
// divisor of N that is <= sqrt(N)).
#ifndef DN_BENCH_BENCH_COMMON_H_
#define DN_BENCH_BENCH_COMMON_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/request_rules.h"
#include "worker/wan_config.h"

namespace dn::bench {

double Median(std::vector<double> values);

// INVALID_ARGUMENT naming `flag` when the grid is wider than the config's
// rope_max_seq_len.
absl::StatusOr<worker::LatentShape> TokenGridShape(const worker::WanConfig& c, int64_t tokens,
                                                   const char* flag = "--tokens");

}  // namespace dn::bench

#endif  // DN_BENCH_BENCH_COMMON_H_
