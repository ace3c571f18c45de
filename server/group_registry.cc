#include "server/group_registry.h"

#include <algorithm>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/log.h"
#include "server/hello_validation.h"
#include "server/protocol.h"
#include "server/version.h"

namespace dn::server {

namespace v1 = ::denoised::v1;
namespace vi = ::denoised::v1::internal;

bool SecretMatches(const std::string& expected, const std::string& given) {
  if (expected.empty()) return true;
  if (expected.size() != given.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    diff |= static_cast<unsigned char>(expected[i] ^ given[i]);
  }
  return diff == 0;
}

absl::Status GroupRegistry::CheckHello(const vi::Hello& hello) {
  if (!SecretMatches(secret_, hello.secret())) {
    return absl::PermissionDeniedError(
        "Hello.secret does not match the coordinator's --secret");
  }
  if (absl::Status v = ValidateHello(hello); !v.ok()) return v;
  // A group whose launchers sync their slices runs the generation and size
  // they agreed on (docs/SERVICE.md, "Groups across hosts").
  if (std::optional<SliceRegistry::Expected> want =
          slices_.ExpectedFor(hello.group(), clock_.Now());
      want.has_value() && (hello.generation() != want->generation ||
                           hello.world_size() != want->group_size)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Hello.generation/world_size: generation ", hello.generation(), " of ",
        hello.world_size(), " ranks, but the launchers of group ", hello.group(),
        " run generation ", want->generation, " of ", want->group_size));
  }
  const std::string& model_name = hello.model().name();
  if (auto mit = models_.find(model_name);
      mit != models_.end() && ModelServed(model_name) &&
      mit->second.info.config_hash() != hello.model().config_hash()) {
    // Another generation of this very group may replace it, though.
    bool only_this_group = groups_.count(hello.group()) > 0;
    for (const auto& [n, g] : groups_) {
      if (g->model == model_name && n != hello.group()) only_this_group = false;
    }
    if (!only_this_group) {
      return absl::FailedPreconditionError(absl::StrCat(
          "model '", model_name, "' is served with config hash ",
          mit->second.info.config_hash(), "; this rank has ",
          hello.model().config_hash()));
    }
  }
  auto git = groups_.find(hello.group());
  if (git == groups_.end() || git->second->generation == hello.generation()) {
    return absl::OkStatus();
  }
  const Group& old = *git->second;
  if (hello.generation() < old.generation && old.live()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Hello.generation ", hello.generation(),
        " is older than the live generation ", old.generation, " of group ",
        old.name));
  }
  if (secret_.empty() && old.live()) {
    // Without a secret nobody is authenticated: a live group is never taken
    // over (see the header).
    return absl::FailedPreconditionError(absl::StrCat(
        "Hello.generation: generation ", old.generation, " of group ", old.name,
        " is live; generation ", hello.generation(),
        " may register once it has failed (or, to replace live groups, run "
        "the coordinator and its ranks with --secret)"));
  }
  return absl::OkStatus();
}

absl::Status GroupRegistry::Attach(const std::shared_ptr<RankLink>& link,
                                   const vi::Hello& hello, bool shutting_down) {
  absl::Status status = shutting_down
                            ? absl::UnavailableError("coordinator shutting down")
                            : CheckHello(hello);
  // The secret's message first: an unauthenticated rank learns nothing else.
  if (!SecretMatches(secret_, hello.secret())) {
    status = absl::PermissionDeniedError(
        "Hello.secret does not match the coordinator's --secret");
  }
  const std::string& model_name = hello.model().name();
  Group* group = nullptr;
  auto git = groups_.find(hello.group());
  if (status.ok() && git != groups_.end() &&
      git->second->generation != hello.generation()) {
    Group& old = *git->second;
    DN_LOG(INFO) << "group " << old.name << " re-registers: generation "
                 << old.generation << " -> " << hello.generation();
    Fail(old, absl::StrCat("replaced by generation ", hello.generation()));
    if (listener_.restarted) listener_.restarted(old.name);
    groups_.erase(hello.group());
    git = groups_.end();
  }
  if (status.ok() && git == groups_.end()) {
    auto g = std::make_unique<Group>();
    g->name = hello.group();
    g->model = model_name;
    g->config_hash = hello.model().config_hash();
    g->backend = hello.backend();
    g->generation = hello.generation();
    g->max_tokens = hello.model().info().max_tokens();
    g->world_size = hello.world_size();
    g->cfg_degree = std::max(1, hello.cfg_degree());
    g->store_prefix = StorePrefix(g->name, g->generation);
    g->ranks.resize(static_cast<size_t>(g->world_size));
    g->ready.assign(static_cast<size_t>(g->world_size), false);
    group = g.get();
    groups_[g->name] = std::move(g);
    ModelRecord& m = models_[model_name];
    m.info = hello.model().info();
    m.info.set_name(model_name);
    m.info.set_config_hash(hello.model().config_hash());
    DN_LOG(INFO) << "group " << group->name << " (generation "
                 << group->generation << ", " << group->world_size
                 << " ranks, model " << model_name << ") is forming";
  } else if (status.ok()) {
    group = git->second.get();
    if (!group->live()) {
      status = absl::UnavailableError(absl::StrCat(
          "group ", group->name, " generation ", group->generation,
          " has failed (", group->failure, "); restart it with a new generation"));
    } else if (group->world_size != hello.world_size() ||
               group->cfg_degree != std::max(1, hello.cfg_degree()) ||
               group->model != model_name ||
               group->config_hash != hello.model().config_hash() ||
               group->backend != hello.backend()) {
      status = absl::FailedPreconditionError(absl::StrCat(
          "Hello of rank ", hello.rank(), " does not match group ", group->name,
          " (world size, cfg degree, model, config hash or backend differ)"));
    } else if (group->ranks[static_cast<size_t>(hello.rank())] != nullptr) {
      status = absl::AlreadyExistsError(absl::StrCat(
          "rank ", hello.rank(), " of group ", group->name, " generation ",
          group->generation, " is already attached"));
    }
  }
  if (!status.ok()) {
    DN_LOG(WARNING) << "rejected rank " << hello.rank() << " of group '"
                    << hello.group().substr(0, 128) << "' from " << link->peer
                    << ": " << status.message();
    link->ended = true;
    link->Close(status);
    return status;
  }
  if (!hello.server_version().empty() && hello.server_version() != Version()) {
    DN_LOG(WARNING) << "rank " << hello.rank() << " of group " << group->name
                    << " runs denoised " << hello.server_version()
                    << ", the coordinator " << Version();
  }
  link->hello_done = true;
  link->group = group->name;
  link->generation = group->generation;
  link->rank = hello.rank();
  link->info.set_rank(hello.rank());
  link->info.set_host(hello.host());
  link->info.set_device(hello.device());
  link->info.set_metrics_address(hello.metrics_address());
  group->ranks[static_cast<size_t>(hello.rank())] = link;

  vi::CoordinatorMessage welcome;
  welcome.mutable_welcome()->set_store_prefix(group->store_prefix);
  welcome.mutable_welcome()->set_heartbeat_interval_ms(kHeartbeatIntervalMs);
  link->Send(std::move(welcome));
  DN_VLOG << "rank " << hello.rank() << " of group " << group->name
          << " attached from " << link->peer;
  if (listener_.changed) listener_.changed();
  return absl::OkStatus();
}

bool GroupRegistry::MarkReady(const RankLink& link, const vi::Ready& ready) {
  Group* group = Find(link);
  if (group == nullptr || group->state != v1::GROUP_STATE_FORMING) return false;
  group->ready[static_cast<size_t>(link.rank)] = true;
  if (link.rank == 0) {
    group->seconds_per_token_step = ready.seconds_per_token_step();
    group->warmup_seconds_per_token_step = std::max(
        group->warmup_seconds_per_token_step, ready.seconds_per_token_step());
  }
  if (!std::all_of(group->ready.begin(), group->ready.end(),
                   [](bool b) { return b; })) {
    return false;
  }
  group->state = v1::GROUP_STATE_READY;
  DN_LOG(INFO) << "group " << group->name << " (generation " << group->generation
               << ", " << group->world_size << " ranks, " << group->backend
               << ", model " << group->model << ") is READY; warm-up took "
               << ready.warmup_seconds() << " s";
  if (listener_.changed) listener_.changed();
  return true;
}

Group* GroupRegistry::Find(const RankLink& link) {
  auto it = groups_.find(link.group);
  if (it == groups_.end() || it->second->generation != link.generation) {
    return nullptr;
  }
  return it->second.get();
}

void GroupRegistry::Fail(Group& group, const std::string& reason, bool leaving) {
  if (!group.live()) return;
  group.state = v1::GROUP_STATE_FAILED;
  group.failure = reason;
  group.failed_at = clock_.Now();
  models_[group.model].last_failure = absl::StrCat(
      "worker group ", group.name, leaving ? " left: " : " failed: ", reason);
  if (leaving) {
    DN_LOG(INFO) << "group " << group.name << " generation " << group.generation
                 << " is leaving: " << reason;
  } else {
    DN_LOG(WARNING) << "group " << group.name << " generation "
                    << group.generation << " FAILED: " << reason;
  }
  std::shared_ptr<Request> running = std::move(group.running);
  group.running = nullptr;
  for (auto& link : group.ranks) {
    if (link == nullptr || link->ended) continue;
    link->Close(leaving ? absl::OkStatus()
                        : absl::UnavailableError("worker group failed: " + reason));
  }
  if (listener_.failed) {
    listener_.failed(group, std::move(running),
                     absl::UnavailableError(absl::StrCat(
                         "worker group ", group.name, " failed: ", reason)));
  }
}

void GroupRegistry::StreamEnded(const std::shared_ptr<RankLink>& link,
                                bool broken) {
  if (link->ended) {
    link->Close(absl::OkStatus());  // make sure the call is finished
    return;
  }
  link->ended = true;
  link->Close(absl::OkStatus());
  if (!link->hello_done) return;
  Group* group = Find(*link);
  if (group == nullptr) return;
  if (broken || !link->leaving || !group->live()) {
    // Kept as FAILED until a new generation registers (the launcher
    // restarts the whole group).
    Fail(*group, absl::StrCat("rank ", link->rank, " disconnected"));
  } else {
    // A clean leave (the launcher stopped the group): fail what runs, then
    // forget the group.
    Fail(*group, absl::StrCat("rank ", link->rank, " left"), true);
    groups_.erase(link->group);
    if (listener_.changed) listener_.changed();
  }
}

void GroupRegistry::ExpireSilent(int timeout_ms) {
  const auto now = clock_.Now();
  const auto timeout = std::chrono::milliseconds(timeout_ms);
  std::vector<std::pair<std::string, std::string>> silent;
  for (auto& [name, g] : groups_) {
    if (!g->live()) continue;
    for (const auto& link : g->ranks) {
      if (link != nullptr && !link->ended && now - link->last_seen() > timeout) {
        silent.emplace_back(name, absl::StrCat("rank ", link->rank,
                                               " sent no heartbeat for ",
                                               timeout_ms / 1000, " s"));
        break;
      }
    }
  }
  for (const auto& [name, why] : silent) {
    auto it = groups_.find(name);
    if (it != groups_.end()) Fail(*it->second, why);
  }
}

bool GroupRegistry::ForgetFailed(int limit_ms) {
  const auto now = clock_.Now();
  bool forgot = false;
  for (auto it = groups_.begin(); it != groups_.end();) {
    const Group& g = *it->second;
    if (!g.live() && now - g.failed_at >= std::chrono::milliseconds(limit_ms)) {
      DN_LOG(WARNING) << "group " << g.name << " generation " << g.generation
                      << " failed " << clock_.SecondsSince(g.failed_at)
                      << " s ago and no new generation registered; forgetting it";
      it = groups_.erase(it);
      forgot = true;
    } else {
      ++it;
    }
  }
  return forgot;
}

absl::StatusOr<std::pair<SliceAnswer, v1::GroupState>> GroupRegistry::SyncSlice(
    const SliceSync& sync) {
  LiveGroupView live;
  auto git = groups_.find(sync.group);
  if (git != groups_.end()) {
    const Group& g = *git->second;
    live.exists = true;
    live.generation = g.generation;
    live.forming = g.state == v1::GROUP_STATE_FORMING;
    live.failed = !g.live();
    live.world_size = g.world_size;
    for (const auto& link : g.ranks) {
      live.attached.push_back(link != nullptr && !link->ended);
    }
  }
  absl::StatusOr<SliceAnswer> a = slices_.Sync(sync, live, clock_.Now());
  if (!a.ok()) return a.status();
  if (a->fail_generation != 0 && git != groups_.end() &&
      git->second->generation == a->fail_generation) {
    Fail(*git->second, a->fail_reason);
  }
  git = groups_.find(sync.group);
  const v1::GroupState state =
      git != groups_.end() && git->second->generation == a->generation
          ? git->second->state
          : v1::GROUP_STATE_UNSPECIFIED;
  return std::make_pair(*std::move(a), state);
}

void GroupRegistry::CloseAll(const std::string& reason) {
  for (auto& [name, g] : groups_) {
    for (auto& link : g->ranks) {
      if (link == nullptr || link->ended) continue;
      vi::CoordinatorMessage m;
      m.mutable_shutdown()->set_reason(reason);
      link->Send(std::move(m));
      link->Close(absl::UnavailableError(reason));
    }
  }
}

Group* GroupRegistry::IdleGroupFor(const std::string& model, int64_t tokens) {
  Group* best = nullptr;
  for (auto& [name, g] : groups_) {
    if (g->model != model || g->state != v1::GROUP_STATE_READY) continue;
    if (g->max_tokens > 0 && tokens > g->max_tokens) continue;  // too big for it
    if (best == nullptr || g->last_dispatch < best->last_dispatch) best = g.get();
  }
  return best;
}

int64_t GroupRegistry::ModelMaxTokens(const std::string& model) const {
  int64_t most = -1;
  for (const auto& [name, g] : groups_) {
    if (g->model != model || !g->live()) continue;
    if (g->max_tokens <= 0) return 0;  // one group without a limit
    most = std::max(most, g->max_tokens);
  }
  if (most >= 0) return most;
  auto it = models_.find(model);
  return it == models_.end() ? 0 : it->second.info.max_tokens();
}

bool GroupRegistry::ModelServed(const std::string& model) const {
  for (const auto& [name, g] : groups_) {
    if (g->model == model) return true;
  }
  return false;
}

bool GroupRegistry::ModelLive(const std::string& model) const {
  for (const auto& [name, g] : groups_) {
    if (g->model == model && g->live()) return true;
  }
  return false;
}

std::vector<GroupLoad> GroupRegistry::Loads(const std::string& model) const {
  std::vector<GroupLoad> out;
  for (const auto& [name, g] : groups_) {
    if (g->model != model || !g->serving()) continue;
    GroupLoad l;
    l.idle = g->state == v1::GROUP_STATE_READY;
    l.measured_rate = g->seconds_per_token_step;
    l.best_rate = g->warmup_seconds_per_token_step;
    l.running = g->running;
    out.push_back(std::move(l));
  }
  return out;
}

bool GroupRegistry::KeyUnderLivePrefix(const std::string& key) const {
  const size_t slash = key.find('/');
  if (slash == std::string::npos) return false;
  auto it = groups_.find(key.substr(0, slash));
  if (it == groups_.end() || !it->second->live()) return false;
  return absl::StartsWith(key, it->second->store_prefix);
}

}  // namespace dn::server
