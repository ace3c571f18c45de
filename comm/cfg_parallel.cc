#include "comm/cfg_parallel.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace dn::comm {

absl::StatusOr<CfgSplit> SplitForCfg(int world, int rank, bool cfg_parallel) {
  if (world < 1 || rank < 0 || rank >= world)
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", rank, " outside a group of ", world));
  CfgSplit s;
  if (!cfg_parallel) {
    s.ulysses_degree = world;
    s.ulysses_rank = rank;
    return s;
  }
  if (world % 2 != 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "--cfg-parallel needs an even group size (2 CFG halves x N/2 Ulysses "
        "ranks), got ",
        world, " ranks"));
  s.cfg_degree = 2;
  s.ulysses_degree = world / 2;
  s.half = rank / s.ulysses_degree;
  s.ulysses_rank = rank % s.ulysses_degree;
  return s;
}

std::string UlyssesPrefix(const std::string& data_prefix, const CfgSplit& split) {
  return absl::StrCat(data_prefix, "/cfg", split.half, "_ulysses");
}

}  // namespace dn::comm
