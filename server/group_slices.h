// File: server/group_slices.h
//
// SliceRegistry: the coordinator's book of which launcher starts which slice
// of a worker group's ranks, and which generation the group runs. No gRPC and
// no proto in it (CoordinatorCore maps SliceRequest/SliceStatus to these
// types); GroupRegistry (server/group_registry.h) owns one.
//
// A group may be started by several launchers (`denoised worker
// --group-size N --first-rank R --local-ranks K`), each on its own host. They
// agree on the generation through this registry, never by counting on their
// own:
//  - A launcher calls Sync with generation 0 before it (re)starts its ranks.
//    It gets the group's current generation if that generation is still
//    forming and this slice has not started in it yet; otherwise (the
//    generation failed, or already formed, or this very slice restarts) the
//    registry opens generation + 1, tells the caller which generation to fail
//    (`fail_generation`), and forgets every other slice: each live launcher
//    learns of the new generation on its next Sync and restarts its ranks in
//    it.
//  - While its ranks run, a launcher calls Sync with their generation about
//    once a second. That renews its lease (a slice not synced for
//    kSliceLeaseMs is forgotten) and answers the generation to run, the ranks
//    not yet attached, and the ranks no live launcher claims.
//  - A slice that disagrees with the live slices of its group is refused:
//    another group size (FAILED_PRECONDITION naming --group-size), ranks
//    outside the group (INVALID_ARGUMENT naming --first-rank/--local-ranks),
//    ranks another live launcher claims (ALREADY_EXISTS: the launcher retries
//    until its --slice-timeout, since a launcher that just died may still
//    hold them for a lease).
#ifndef DN_SERVER_GROUP_SLICES_H_
#define DN_SERVER_GROUP_SLICES_H_

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace dn::server {

// A slice whose launcher has not synced for this long is forgotten.
inline constexpr int kSliceLeaseMs = 5000;

// The largest worker group (ranks) the coordinator accepts, in Hello and in
// SyncSlice: bounds every per-rank allocation.
inline constexpr int kMaxWorldSize = 4096;

struct SliceSync {
  std::string group;
  int group_size = 0;
  int first_rank = 0;
  int local_ranks = 0;
  std::string launcher_id;
  int64_t generation = 0;  // 0: (re)starting the slice's ranks
  std::string host;
  bool leaving = false;
  // 2: the slice's ranks run CFG-parallel (--cfg-parallel); 1: Ulysses over
  // the whole group. Every launcher of a group must run the same.
  int cfg_degree = 1;
};

// What the coordinator's group registry knows of the group's live
// generation (the Group built from the ranks' Hellos).
struct LiveGroupView {
  bool exists = false;
  int64_t generation = 0;
  bool forming = false;
  bool failed = false;
  int world_size = 0;
  std::vector<bool> attached;  // per rank, in `generation`
};

struct SliceAnswer {
  int64_t generation = 0;
  // Non-zero: the coordinator fails this generation of the group (a new one
  // was opened while it was live).
  int64_t fail_generation = 0;
  std::string fail_reason;
  std::vector<int> missing_ranks;
  std::vector<int> unclaimed_ranks;
};

class SliceRegistry {
 public:
  using Clock = std::chrono::steady_clock;

  absl::StatusOr<SliceAnswer> Sync(const SliceSync& s, const LiveGroupView& live,
                                   Clock::time_point now);

  // The generation and size that launchers set for `group`, while a live
  // launcher syncs it; ranks of such a group must Hello with exactly these.
  struct Expected {
    int64_t generation = 0;
    int group_size = 0;
  };
  std::optional<Expected> ExpectedFor(const std::string& group,
                                      Clock::time_point now) const;

 private:
  struct Claim {
    int first = 0;
    int count = 0;
    std::string host;
    Clock::time_point last_seen;
    bool started = false;  // started its ranks in the entry's generation
  };
  struct Entry {
    int group_size = 0;
    int cfg_degree = 1;
    int64_t generation = 0;
    std::map<std::string, Claim> claims;  // by launcher id
  };
  std::map<std::string, Entry> entries_;
};

// Ranks as a short list for messages: {2, 3, 6} -> "2-3, 6".
std::string RankList(const std::vector<int>& ranks);

}  // namespace dn::server

#endif  // DN_SERVER_GROUP_SLICES_H_
