// File: comm/cfg_parallel.h
//
// The CFG-parallel split of a worker group (docs/ENGINE.md, "CFG-parallel").
// A group of N ranks runs either as one Ulysses group of N ranks (cfg degree
// 1), or as 2 CFG halves x N/2 Ulysses ranks: ranks [0, N/2) run the
// conditional branch, [N/2, N) the unconditional one, each half a Ulysses
// group of its own. The whole group (the "data" group) still carries the one
// all-gather of the step's velocities and the control group still spans all
// N ranks.
//
// A half's Ulysses group is a sub-group formed through the same Store and
// the same ProcessGroup factories as the data group, under its own key prefix
// (Gloo: a new full-mesh context; NCCL: a new communicator whose unique id
// travels through the store), once per group generation; it holds its own
// persistent connections and nothing is allocated per call.
#ifndef DN_COMM_CFG_PARALLEL_H_
#define DN_COMM_CFG_PARALLEL_H_

#include <string>

#include "absl/status/statusor.h"

namespace dn::comm {

struct CfgSplit {
  int cfg_degree = 1;      // 1: Ulysses over all ranks; 2: two CFG halves
  int ulysses_degree = 1;  // ranks per half (world / cfg_degree)
  int half = 0;            // 0 = conditional branch, 1 = unconditional
  int ulysses_rank = 0;    // this rank's rank inside its half
  // Global rank of rank u of half h.
  int GlobalRank(int h, int u) const { return h * ulysses_degree + u; }
};

// The split of rank `rank` of a group of `world` ranks. cfg_parallel needs an
// even world (INVALID_ARGUMENT naming --cfg-parallel otherwise).
absl::StatusOr<CfgSplit> SplitForCfg(int world, int rank, bool cfg_parallel);

// Store prefix of half `split.half`'s Ulysses group, under the data group's.
std::string UlyssesPrefix(const std::string& data_prefix, const CfgSplit& split);

// Options of this rank's half group from the data group's options (GlooOptions
// or NcclOptions: rank, size and prefix replaced, everything else kept).
template <class Options>
Options HalfGroupOptions(Options data_options, const CfgSplit& split) {
  data_options.prefix = UlyssesPrefix(data_options.prefix, split);
  data_options.rank = split.ulysses_rank;
  data_options.size = split.ulysses_degree;
  return data_options;
}

}  // namespace dn::comm

#endif  // DN_COMM_CFG_PARALLEL_H_
