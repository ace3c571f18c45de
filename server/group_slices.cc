#include "server/group_slices.h"

#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace dn::server {

namespace {

std::string Range(int first, int count) {
  return count == 1 ? absl::StrCat("rank ", first)
                    : absl::StrCat("ranks ", first, "-", first + count - 1);
}

std::string TopologyName(int cfg_degree, int group_size) {
  return cfg_degree > 1 ? absl::StrCat("CFG-parallel (cfg ", cfg_degree, " x ulysses ",
                                       group_size / cfg_degree, ")")
                        : absl::StrCat("Ulysses over all ", group_size, " ranks");
}

}  // namespace

std::string RankList(const std::vector<int>& ranks) {
  std::string out;
  for (size_t i = 0; i < ranks.size();) {
    size_t j = i;
    while (j + 1 < ranks.size() && ranks[j + 1] == ranks[j] + 1) ++j;
    if (!out.empty()) out += ", ";
    out += j == i ? absl::StrCat(ranks[i])
                  : absl::StrCat(ranks[i], "-", ranks[j]);
    i = j + 1;
  }
  return out;
}

absl::StatusOr<SliceAnswer> SliceRegistry::Sync(const SliceSync& s,
                                                const LiveGroupView& live,
                                                Clock::time_point now) {
  if (s.group.empty() || s.group.size() > 128 || absl::StrContains(s.group, "/")) {
    return absl::InvalidArgumentError(
        "--name: the group name must be 1-128 characters without '/'");
  }
  if (s.launcher_id.empty() || s.launcher_id.size() > 256 || s.host.size() > 256) {
    return absl::InvalidArgumentError(
        "SliceRequest.launcher_id/host: launcher_id 1-256 and host at most 256 "
        "characters");
  }
  if (s.group_size < 1 || s.group_size > kMaxWorldSize) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--group-size: ", s.group_size, " is not in [1, ", kMaxWorldSize, "]"));
  }
  if (s.first_rank < 0 || s.local_ranks < 1 ||
      s.first_rank > s.group_size - s.local_ranks) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--first-rank/--local-ranks: first rank ", s.first_rank, " and ",
        s.local_ranks, " local rank(s) do not lie inside a group of "
        "--group-size ", s.group_size));
  }
  if ((s.cfg_degree != 1 && s.cfg_degree != 2) || s.group_size % s.cfg_degree != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--cfg-parallel: cfg degree ", s.cfg_degree, " with --group-size ", s.group_size,
        " (1: Ulysses only; 2: CFG-parallel, even group size)"));
  }
  if (s.generation < 0) {
    return absl::InvalidArgumentError("SliceRequest.generation: must be >= 0");
  }

  Entry& e = entries_[s.group];
  // Forget slices whose launcher stopped syncing.
  const auto lease = std::chrono::milliseconds(kSliceLeaseMs);
  for (auto it = e.claims.begin(); it != e.claims.end();) {
    it = now - it->second.last_seen > lease ? e.claims.erase(it) : std::next(it);
  }
  if (s.leaving) {
    e.claims.erase(s.launcher_id);
    SliceAnswer a;
    a.generation = e.generation;
    return a;
  }

  // Agreement with the live slices of other launchers.
  bool others = false;
  for (const auto& [id, c] : e.claims) {
    if (id == s.launcher_id) continue;
    others = true;
    if (e.group_size != s.group_size) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--group-size ", s.group_size, " disagrees with group '", s.group,
          "': its launcher of ", Range(c.first, c.count), " (host ", c.host,
          ") runs it with --group-size ", e.group_size));
    }
    if (s.first_rank < c.first + c.count && c.first < s.first_rank + s.local_ranks) {
      return absl::AlreadyExistsError(absl::StrCat(
          "--first-rank/--local-ranks: ", Range(s.first_rank, s.local_ranks),
          " of group '", s.group, "' overlap ", Range(c.first, c.count),
          " of launcher ", id, " (host ", c.host, ")"));
    }
    if (e.cfg_degree != s.cfg_degree) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--cfg-parallel: this launcher runs group '", s.group, "' as ",
          TopologyName(s.cfg_degree, s.group_size), ", but its launcher of ",
          Range(c.first, c.count), " (host ", c.host, ") runs it as ",
          TopologyName(e.cfg_degree, e.group_size),
          "; every launcher of a group must run the same (docs/SERVICE.md, "
          "\"Which axis crosses hosts\")"));
    }
  }
  if (live.exists && !live.failed && live.world_size != s.group_size) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--group-size ", s.group_size, " disagrees with group '", s.group,
        "', whose live generation ", live.generation, " has ", live.world_size,
        " ranks"));
  }
  if (!others) {
    e.group_size = s.group_size;
    e.cfg_degree = s.cfg_degree;
  }
  if (live.exists) e.generation = std::max(e.generation, live.generation);

  Claim& claim = e.claims[s.launcher_id];
  claim.first = s.first_rank;
  claim.count = s.local_ranks;
  claim.host = s.host;
  claim.last_seen = now;

  SliceAnswer a;
  const bool live_is_current = live.exists && live.generation == e.generation;
  if (s.generation == 0) {
    // Join the current generation only while it forms and another live
    // slice has started in it; otherwise open a new one.
    bool others_started = false;
    for (const auto& [id, c] : e.claims) {
      if (id != s.launcher_id && c.started) others_started = true;
    }
    const bool formed_or_failed = live_is_current && !live.forming;
    if (e.generation == 0 || formed_or_failed || claim.started ||
        (!live_is_current && !others_started)) {
      // Open a new generation: every other slice restarts in it.
      const int64_t old = e.generation;
      e.generation = old + 1;
      for (auto it = e.claims.begin(); it != e.claims.end();) {
        it = it->first == s.launcher_id ? std::next(it) : e.claims.erase(it);
      }
      if (live_is_current && !live.failed) {
        a.fail_generation = old;
        a.fail_reason = absl::StrCat("the launcher of ",
                                     Range(s.first_rank, s.local_ranks),
                                     " (host ", s.host, ") restarts them as generation ",
                                     e.generation);
      }
    }
    claim.started = true;
  } else if (s.generation == e.generation) {
    claim.started = true;
  }
  a.generation = e.generation;

  std::vector<bool> claimed(static_cast<size_t>(e.group_size), false);
  for (const auto& [id, c] : e.claims) {
    for (int r = c.first; r < c.first + c.count && r < e.group_size; ++r) {
      claimed[static_cast<size_t>(r)] = true;
    }
  }
  for (int r = 0; r < e.group_size; ++r) {
    const bool attached = live.exists && live.generation == e.generation &&
                          static_cast<size_t>(r) < live.attached.size() &&
                          live.attached[static_cast<size_t>(r)];
    if (!attached) a.missing_ranks.push_back(r);
    if (!claimed[static_cast<size_t>(r)]) a.unclaimed_ranks.push_back(r);
  }
  return a;
}

std::optional<SliceRegistry::Expected> SliceRegistry::ExpectedFor(
    const std::string& group, Clock::time_point now) const {
  auto it = entries_.find(group);
  if (it == entries_.end() || it->second.generation == 0) return std::nullopt;
  for (const auto& [id, c] : it->second.claims) {
    if (now - c.last_seen <= std::chrono::milliseconds(kSliceLeaseMs)) {
      return Expected{it->second.generation, it->second.group_size};
    }
  }
  return std::nullopt;
}

}  // namespace dn::server
