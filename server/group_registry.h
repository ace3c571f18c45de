// File: server/group_registry.h
//
// GroupRegistry: the coordinator's book of worker groups and the models they
// serve. It admits ranks (Hello: the secret, the field bounds of
// server/hello_validation.h, agreement with the group's other ranks and with
// the generation its launchers agreed on in server/group_slices.h), moves
// groups through FORMING -> READY <-> BUSY -> FAILED, fails groups whose
// ranks fall silent (heartbeat expiry), and forgets FAILED groups no new
// generation replaced (unserved expiry). No gRPC: a rank is a RankLink, and
// what a failure means for requests is left to the Listener (CoordinatorCore).
//
// Who may replace a live group: with a worker secret (--secret), any rank
// that presents it. Without one, nobody: a Hello of another generation for a
// group that is FORMING, READY or BUSY is refused (FAILED_PRECONDITION), so
// an unauthenticated party cannot take a live group over; a new generation
// registers once the old one has failed (its ranks disconnected or went
// silent, or its launcher's SyncSlice opened the new generation).
#ifndef DN_SERVER_GROUP_REGISTRY_H_
#define DN_SERVER_GROUP_REGISTRY_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "denoised/v1/denoiser.pb.h"
#include "denoised/v1/worker.pb.h"
#include "server/admission.h"
#include "server/clock.h"
#include "server/core_types.h"
#include "server/group_slices.h"

namespace dn::server {

struct Group {
  std::string name;
  std::string model;
  std::string config_hash;
  std::string backend;
  std::string store_prefix;
  int64_t generation = 0;
  int world_size = 0;
  int cfg_degree = 1;  // 2: CFG-parallel halves (Hello.cfg_degree)
  denoised::v1::GroupState state = denoised::v1::GROUP_STATE_FORMING;
  std::vector<std::shared_ptr<RankLink>> ranks;
  std::vector<bool> ready;
  std::shared_ptr<Request> running;
  int results_pending = 0;
  // Seconds per token-step: the last request's, and the warm-up's (Ready).
  double seconds_per_token_step = 0;
  double warmup_seconds_per_token_step = 0;
  double mean_step_seconds = 0;
  Clock::time_point last_dispatch;
  std::string failure;
  Clock::time_point failed_at;  // when state became FAILED
  int64_t max_tokens = 0;       // its ranks' --max-tokens (0: no limit)

  bool live() const { return state != denoised::v1::GROUP_STATE_FAILED; }
  bool serving() const {
    return state == denoised::v1::GROUP_STATE_READY ||
           state == denoised::v1::GROUP_STATE_BUSY;
  }
};

struct ModelRecord {
  denoised::v1::ModelInfo info;
  // Since when no group of the model is forming, ready or busy.
  std::optional<Clock::time_point> unserved_since;
  std::string last_failure;  // "worker group g failed: ..."
};

// Constant-time comparison, so a secret cannot be guessed byte by byte.
// An empty `expected` (no secret configured) matches anything.
bool SecretMatches(const std::string& expected, const std::string& given);

class GroupRegistry {
 public:
  struct Listener {
    // `group` failed (or left cleanly): its running request, if any, must
    // end with `status`; its store keys are stale.
    std::function<void(Group& group, std::shared_ptr<Request> running,
                       absl::Status status)>
        failed;
    // `group` re-registered with a new generation.
    std::function<void(const std::string& group)> restarted;
    // Group states changed (health, gauges, dispatch).
    std::function<void()> changed;
  };

  GroupRegistry(const Clock& clock, std::string secret, Listener listener)
      : clock_(clock), secret_(std::move(secret)), listener_(std::move(listener)) {}

  // A rank's Hello. On success the link is attached and welcomed; on error
  // the link is closed with the returned status.
  absl::Status Attach(const std::shared_ptr<RankLink>& link,
                      const denoised::v1::internal::Hello& hello,
                      bool shutting_down);
  // A rank's Ready; true when its group became READY by it.
  bool MarkReady(const RankLink& link, const denoised::v1::internal::Ready& ready);
  // The live generation `link` belongs to; null for a replaced one.
  Group* Find(const RankLink& link);
  // Marks the group FAILED (idempotent), closes its rank streams (OK when
  // it leaves cleanly) and tells the listener.
  void Fail(Group& group, const std::string& reason, bool leaving = false);
  // A rank's stream ended: a clean leave (Leave sent, not `broken`) removes
  // the group, anything else fails it.
  void StreamEnded(const std::shared_ptr<RankLink>& link, bool broken);
  // Fails every live group with a rank silent for longer than `timeout_ms`.
  void ExpireSilent(int timeout_ms);
  // Forgets FAILED groups older than `limit_ms`; true when one was.
  bool ForgetFailed(int limit_ms);
  // A launcher's slice (server/group_slices.h); fails the generation it
  // replaces. The second member is the group's state in the answered
  // generation (UNSPECIFIED when none registered yet).
  absl::StatusOr<std::pair<SliceAnswer, denoised::v1::GroupState>> SyncSlice(
      const SliceSync& sync);
  // Sends every rank a Shutdown and closes its stream.
  void CloseAll(const std::string& reason);

  // The least recently used READY group of `model` that takes `tokens`.
  Group* IdleGroupFor(const std::string& model, int64_t tokens);
  // The largest max_tokens over the model's live groups (0: a group without
  // a limit); the registered model's when none is live.
  int64_t ModelMaxTokens(const std::string& model) const;
  // Whether any group (even a FAILED one) serves `model`; whether a live one does.
  bool ModelServed(const std::string& model) const;
  bool ModelLive(const std::string& model) const;
  // READY and BUSY groups of `model`, for admission.
  std::vector<GroupLoad> Loads(const std::string& model) const;
  // Whether `key` lies under the store prefix of a live group generation.
  bool KeyUnderLivePrefix(const std::string& key) const;

  const std::map<std::string, std::unique_ptr<Group>>& groups() const {
    return groups_;
  }
  std::map<std::string, ModelRecord>& models() { return models_; }
  const std::map<std::string, ModelRecord>& models() const { return models_; }

 private:
  absl::Status CheckHello(const denoised::v1::internal::Hello& hello);

  const Clock& clock_;
  const std::string secret_;
  Listener listener_;
  std::map<std::string, std::unique_ptr<Group>> groups_;
  std::map<std::string, ModelRecord> models_;
  SliceRegistry slices_;
};

}  // namespace dn::server

#endif  // DN_SERVER_GROUP_REGISTRY_H_
