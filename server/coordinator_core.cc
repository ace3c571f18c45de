#include "server/coordinator_core.h"

#include <algorithm>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/log.h"
#include "server/proto_convert.h"
#include "server/protocol.h"
#include "server/request_validation.h"
#include "server/version.h"

namespace dn::server {

namespace v1 = ::denoised::v1;
namespace vi = ::denoised::v1::internal;

namespace {

const char* StateLabel(v1::GroupState s) {
  switch (s) {
    case v1::GROUP_STATE_FORMING: return "forming";
    case v1::GROUP_STATE_READY: return "ready";
    case v1::GROUP_STATE_BUSY: return "busy";
    case v1::GROUP_STATE_FAILED: return "failed";
    default: return "unknown";
  }
}

// Longest error message sent to a client: every echoed value is bounded on
// its own (Bounded), and this bounds what the request rules may add.
constexpr size_t kMaxErrorMessage = 2048;

absl::Status BoundMessage(const absl::Status& s) {
  if (s.message().size() <= kMaxErrorMessage) return s;
  return absl::Status(s.code(), Bounded(s.message(), kMaxErrorMessage));
}

}  // namespace

std::string Bounded(absl::string_view text, size_t max) {
  if (text.size() <= max) return std::string(text);
  size_t cut = max;
  // Back off over UTF-8 continuation bytes (10xxxxxx).
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  return absl::StrCat(text.substr(0, cut), "...[", text.size(), " bytes]");
}

CoordinatorCore::CoordinatorCore(const CoreOptions& options, const Clock& clock,
                                 CoordinatorMetrics& metrics,
                                 std::function<void(bool)> set_serving)
    : options_(options),
      clock_(clock),
      metrics_(metrics),
      set_serving_(std::move(set_serving)),
      admission_(clock),
      queue_(options.max_queue),
      store_(clock),
      registry_(clock, options.secret,
                GroupRegistry::Listener{
                    [this](Group& g, std::shared_ptr<Request> running,
                           absl::Status status) {
                      OnGroupFailed(g, std::move(running), std::move(status));
                    },
                    [this](const std::string& g) { metrics_.CountRestart(g); },
                    [this] {
                      UpdateHealthAndGauges();
                      Dispatch();
                    }}),
      rng_(std::random_device{}()),
      last_heartbeat_check_(clock.Now()) {}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

std::string CoordinatorCore::NewRequestId() {
  static constexpr char kHex[] = "0123456789abcdef";
  uint64_t v = rng_();
  std::string id = "req-";
  for (int i = 0; i < 16; ++i) {
    id.push_back(kHex[v & 15]);
    v >>= 4;
  }
  return id;
}

void CoordinatorCore::Reject(RequestSink& sink, const std::string& model_label,
                             absl::Status status) {
  metrics_.CountRequest(model_label, StatusCodeName(static_cast<int>(status.code())));
  sink.Finish(BoundMessage(status));
}

void CoordinatorCore::CountRefused(const std::string& model, absl::StatusCode code) {
  metrics_.CountRequest(registry_.models().count(model) > 0 ? model : kUnknownModelLabel,
                        StatusCodeName(static_cast<int>(code)));
}

void CoordinatorCore::Submit(v1::GenerateRequest request,
                             std::shared_ptr<RequestSink> sink,
                             int64_t deadline_unix_ms) {
  const std::string model_name = request.model();  // the request moves below
  const std::string label =
      registry_.models().count(model_name) > 0 ? model_name : kUnknownModelLabel;
  if (shutting_down_) {
    return Reject(*sink, label, absl::UnavailableError("the coordinator is shutting down"));
  }
  if (sink->cancelled) {
    return Reject(*sink, label, absl::CancelledError("cancelled by the client"));
  }
  if (model_name.empty()) {
    return Reject(*sink, kUnknownModelLabel,
                  absl::InvalidArgumentError("model: required (see ListModels)"));
  }
  if (model_name.size() > kMaxModelNameLength) {
    return Reject(*sink, kUnknownModelLabel,
                  absl::InvalidArgumentError(absl::StrCat(
                      "model: at most ", kMaxModelNameLength, " bytes, got ",
                      model_name.size())));
  }
  if (label == kUnknownModelLabel || !registry_.ModelServed(model_name)) {
    std::vector<std::string> names;
    for (const auto& [name, m] : registry_.models()) {
      if (registry_.ModelServed(name)) names.push_back(name);
    }
    return Reject(*sink, kUnknownModelLabel,
                  absl::NotFoundError(absl::StrCat(
                      "model '", Bounded(model_name),
                      "' is not served by any worker group (served: ",
                      names.empty() ? "none" : absl::StrJoin(names, ", "), ")")));
  }
  v1::ModelInfo limits = registry_.models().at(model_name).info;
  limits.set_max_tokens(registry_.ModelMaxTokens(model_name));
  // The request rules (server/request_validation.h): their one call site.
  // Its tensors move into the resolved job (no copy).
  absl::StatusOr<ResolvedRequest> resolved = ValidateRequest(std::move(request), limits);
  if (!resolved.ok()) return Reject(*sink, model_name, resolved.status());
  const std::string client_id = resolved->request.client_request_id();
  if (!client_id.empty() && client_ids_.count(client_id) > 0) {
    return Reject(*sink, model_name,
                  absl::AlreadyExistsError(absl::StrCat(
                      "client_request_id '", Bounded(client_id),
                      "' is already live as ", client_ids_.at(client_id))));
  }
  const std::vector<GroupLoad> loads = registry_.Loads(model_name);
  if (registry_.IdleGroupFor(model_name, resolved->tokens) == nullptr &&
      queue_.Full(model_name)) {
    const int64_t retry_ms = admission_.RetryAfterMillis(loads);
    sink->Trailer(kRetryAfterMetadata, absl::StrCat(retry_ms));
    return Reject(*sink, model_name,
                  absl::ResourceExhaustedError(absl::StrCat(
                      "the queue for model '", model_name, "' is full (",
                      queue_.Size(model_name), " waiting, --max-queue ",
                      queue_.max_per_model(), "); retry after ", retry_ms,
                      " ms (", kRetryAfterMetadata, " trailer)")));
  }

  auto req = std::make_shared<Request>();
  req->id = NewRequestId();
  req->client_id = client_id;
  req->model = model_name;
  req->resolved = *std::move(resolved);
  req->priority = req->resolved.request.priority();
  req->deadline_unix_ms = deadline_unix_ms;
  if (options_.admission_by_cost) {
    if (absl::Status s = admission_.CheckDeadline(loads, queue_.Waiting(req->model), *req);
        !s.ok()) {
      return Reject(*sink, req->model, s);
    }
  }
  req->accepted = clock_.Now();
  req->sink = std::move(sink);
  req->sink->request_id = req->id;
  requests_[req->id] = req;
  if (!client_id.empty()) client_ids_[client_id] = req->id;
  const int position = queue_.Push(req);

  v1::GenerateEvent accepted;
  accepted.mutable_accepted()->set_request_id(req->id);
  accepted.mutable_accepted()->set_queue_position(position);
  accepted.mutable_accepted()->set_estimated_seconds(
      Admission::EstimateSeconds(loads, *req));
  req->sink->Event(std::move(accepted));
  DN_VLOG << "request " << req->id << " accepted for " << req->model;
  Dispatch();
  UpdateHealthAndGauges();
}

void CoordinatorCore::Dispatch() {
  if (shutting_down_) return;
  for (const std::string& model : queue_.Models()) {
    for (;;) {
      // In order: the head waits for a group that takes it (no overtaking).
      std::shared_ptr<Request> req = queue_.Head(model);
      if (req == nullptr) break;
      Group* group = registry_.IdleGroupFor(model, req->resolved.tokens);
      if (group == nullptr) break;
      if (req->deadline_unix_ms > 0 && clock_.UnixMillis() >= req->deadline_unix_ms) {
        req->cancel_code = absl::StatusCode::kDeadlineExceeded;
        FinishRequest(req, absl::DeadlineExceededError("deadline exceeded in the queue"));
        continue;
      }
      queue_.Remove(*req);
      StartOnGroup(req, *group);
    }
  }
}

void CoordinatorCore::StartOnGroup(const std::shared_ptr<Request>& req, Group& group) {
  req->phase = Request::kRunning;
  req->started = clock_.Now();
  req->group = group.name;
  req->group_generation = group.generation;
  group.state = v1::GROUP_STATE_BUSY;
  group.running = req;
  group.results_pending = group.world_size;
  group.last_dispatch = clock_.Now();
  running_[req->model]++;
  const double queued =
      std::chrono::duration<double>(req->started - req->accepted).count();
  metrics_.ObserveQueueDuration(req->model, queued);

  v1::GenerateEvent started;
  started.mutable_started()->set_worker_group(group.name);
  started.mutable_started()->set_ranks(group.world_size);
  started.mutable_started()->set_queue_seconds(queued);
  req->sink->Event(std::move(started));
  UpdateHealthAndGauges();

  // One message for every rank: the job (the request's tensors were moved
  // into it at validation) moves into it, and the ranks' streams share it.
  auto m = std::make_shared<vi::CoordinatorMessage>();
  vi::Job* job = m->mutable_job();
  *job = std::move(req->resolved.job);
  job->set_request_id(req->id);
  job->set_deadline_unix_millis(req->deadline_unix_ms);
  for (auto& rank : group.ranks) rank->SendShared(m);
  DN_LOG(INFO) << "request " << req->id << " -> group " << group.name << " ("
               << group.world_size << " ranks, latent "
               << LatentString(req->resolved.latent) << ", "
               << req->resolved.request.steps() << " steps, "
               << req->resolved.tensor_bytes << " tensor bytes in one shared job)";
  // A cancel that raced with dispatch.
  if (req->cancel_code != absl::StatusCode::kOk) {
    const absl::StatusCode code = req->cancel_code;
    req->cancel_code = absl::StatusCode::kOk;
    CancelRunning(*req, code);
  }
}

void CoordinatorCore::CancelRunning(Request& req, absl::StatusCode code) {
  if (req.cancel_code != absl::StatusCode::kOk) return;  // already asked
  req.cancel_code = code;
  auto it = registry_.groups().find(req.group);
  if (it == registry_.groups().end() ||
      it->second->generation != req.group_generation) {
    return;
  }
  vi::CoordinatorMessage m;
  m.mutable_cancel()->set_request_id(req.id);
  m.mutable_cancel()->set_status_code(static_cast<int>(code));
  for (auto& link : it->second->ranks) link->Send(m);
  DN_LOG(INFO) << "request " << req.id << ": "
               << StatusCodeName(static_cast<int>(code)) << ", stopping group "
               << req.group;
}

void CoordinatorCore::FinishRequest(const std::shared_ptr<Request>& req,
                                    absl::Status status) {
  if (req->phase == Request::kDone) return;
  if (req->phase == Request::kQueued) {
    queue_.Remove(*req);
  } else if (req->phase == Request::kRunning) {
    running_[req->model]--;
  }
  req->phase = Request::kDone;
  requests_.erase(req->id);
  if (!req->client_id.empty()) client_ids_.erase(req->client_id);
  // A call the client abandoned ends with the code it abandoned it for.
  if (req->cancel_code != absl::StatusCode::kOk && !status.ok() &&
      status.code() != absl::StatusCode::kUnavailable) {
    status = absl::Status(req->cancel_code, status.message());
  }
  const std::string code = StatusCodeName(static_cast<int>(status.code()));
  metrics_.CountRequest(req->model, code);
  metrics_.ObserveRequestDuration(req->model, clock_.SecondsSince(req->accepted));
  DN_LOG(INFO) << "request " << req->id << " finished: " << code
               << (status.ok() ? "" : absl::StrCat(" (", status.message(), ")"));
  req->sink->Finish(BoundMessage(status));
  UpdateHealthAndGauges();
}

void CoordinatorCore::ClientGone(RequestSink& sink, bool deadline) {
  auto it = requests_.find(sink.request_id);
  if (sink.request_id.empty() || it == requests_.end()) {
    // Not admitted (or already finished): just make sure the call ends.
    sink.Finish(absl::CancelledError());
    return;
  }
  std::shared_ptr<Request> req = it->second;
  const absl::StatusCode code =
      deadline ? absl::StatusCode::kDeadlineExceeded : absl::StatusCode::kCancelled;
  if (req->phase == Request::kQueued) {
    req->cancel_code = code;
    FinishRequest(req, absl::Status(code, deadline ? "deadline exceeded in the queue"
                                                   : "cancelled by the client"));
    Dispatch();
  } else if (req->phase == Request::kRunning) {
    CancelRunning(*req, code);
  }
}

v1::CancelResponse CoordinatorCore::Cancel(const v1::CancelRequest& in) {
  v1::CancelResponse resp;
  std::string id = in.request_id();
  if (auto c = client_ids_.find(id); c != client_ids_.end()) id = c->second;
  auto it = requests_.find(id);
  resp.set_found(it != requests_.end());
  if (it == requests_.end()) return resp;
  std::shared_ptr<Request> req = it->second;
  if (req->phase == Request::kQueued) {
    req->cancel_code = absl::StatusCode::kCancelled;
    FinishRequest(req, absl::CancelledError("cancelled by a Cancel call"));
  } else if (req->phase == Request::kRunning) {
    CancelRunning(*req, absl::StatusCode::kCancelled);
  }
  return resp;
}

void CoordinatorCore::ExpireQueued() {
  // Queued requests whose deadline passed (the call's own cancellation may
  // come later than the deadline).
  const int64_t now_ms = clock_.UnixMillis();
  std::vector<std::shared_ptr<Request>> expired;
  for (auto& [id, r] : requests_) {
    if (r->phase == Request::kQueued && r->deadline_unix_ms > 0 &&
        now_ms >= r->deadline_unix_ms) {
      expired.push_back(r);
    }
  }
  for (auto& r : expired) {
    r->cancel_code = absl::StatusCode::kDeadlineExceeded;
    FinishRequest(r, absl::DeadlineExceededError("deadline exceeded in the queue"));
  }
}

void CoordinatorCore::ExpireUnserved() {
  // Requests queued for a model that has had no live group for the limit
  // would otherwise wait for their deadline, or forever without one.
  const auto now = clock_.Now();
  const auto limit = std::chrono::milliseconds(options_.unserved_timeout_ms);
  for (auto& [name, model] : registry_.models()) {
    if (registry_.ModelLive(name)) {
      model.unserved_since.reset();
      continue;
    }
    if (!model.unserved_since.has_value()) model.unserved_since = now;
    if (queue_.Size(name) == 0 || now - *model.unserved_since < limit) continue;
    for (auto& r : queue_.Waiting(name)) {
      FinishRequest(r, absl::UnavailableError(absl::StrCat(
                           "model '", name, "' has had no live worker group for ",
                           options_.unserved_timeout_ms / 1000, " s (last: ",
                           model.last_failure, "); the request left the queue")));
    }
  }
  // A FAILED group whose launcher never registered a new generation (it
  // died with its ranks, or its host did) is forgotten.
  if (registry_.ForgetFailed(options_.unserved_timeout_ms)) UpdateHealthAndGauges();
}

void CoordinatorCore::Tick() {
  store_.ExpireWaits();
  ExpireQueued();
  const auto now = clock_.Now();
  if (now - last_heartbeat_check_ < std::chrono::seconds(1)) return;
  last_heartbeat_check_ = now;
  registry_.ExpireSilent(options_.heartbeat_timeout_ms);
  ExpireUnserved();
}

void CoordinatorCore::Shutdown() {
  if (shutting_down_) return;
  shutting_down_ = true;
  UpdateHealthAndGauges();
  std::vector<std::shared_ptr<Request>> live;
  for (auto& [id, r] : requests_) live.push_back(r);
  for (auto& r : live) {
    FinishRequest(r, absl::UnavailableError("the coordinator is shutting down"));
  }
  registry_.CloseAll("coordinator shutting down");
  store_.CloseWaits(absl::UnavailableError("coordinator shutting down"));
}

// ---------------------------------------------------------------------------
// Ranks
// ---------------------------------------------------------------------------

void CoordinatorCore::OnRankMessage(const std::shared_ptr<RankLink>& link,
                                    vi::RankMessage& msg) {
  if (link->ended) return;
  if (!link->hello_done) {
    if (msg.msg_case() != vi::RankMessage::kHello) {
      link->Close(absl::FailedPreconditionError("the first message must be Hello"));
      link->ended = true;
      return;
    }
    (void)registry_.Attach(link, msg.hello(), shutting_down_);
    return;
  }
  Group* group = registry_.Find(*link);
  // A rank of a replaced or failed generation: it is being closed.
  if (group == nullptr || !group->live()) return;
  switch (msg.msg_case()) {
    case vi::RankMessage::kHeartbeat:
      if (link->rank == 0)  // the LoRA files of the group's --lora-dir
        group->loras.assign(msg.heartbeat().loras().begin(), msg.heartbeat().loras().end());
      break;
    case vi::RankMessage::kLeave:
      DN_LOG(INFO) << "rank " << link->rank << " of group " << group->name
                   << " is leaving: " << msg.leave().reason();
      link->leaving = true;
      break;
    case vi::RankMessage::kReady:
      registry_.MarkReady(*link, msg.ready());
      break;
    case vi::RankMessage::kStep:
      HandleStep(*group, *link, msg.step());
      break;
    case vi::RankMessage::kResult:
      HandleResult(*group, *link, *msg.mutable_result());
      break;
    case vi::RankMessage::kHello:
      link->Close(absl::FailedPreconditionError("Hello sent twice"));
      registry_.Fail(*group, absl::StrCat("rank ", link->rank, " sent Hello twice"));
      break;
    default:
      break;
  }
}

void CoordinatorCore::OnRankStreamEnd(const std::shared_ptr<RankLink>& link,
                                      bool broken) {
  registry_.StreamEnded(link, broken);
}

void CoordinatorCore::HandleStep(Group& group, const RankLink& link,
                                 const vi::StepReport& report) {
  if (link.rank != 0 || group.running == nullptr ||
      group.running->id != report.request_id()) {
    return;
  }
  Request& req = *group.running;
  const v1::Step& step = report.step();
  metrics_.ObserveStep(req.model, group.world_size, step.step_seconds(),
                       step.all_to_all_seconds(), step.rank_skew_seconds(), step.cached());
  req.steps_seen++;
  req.step_seconds_sum += step.step_seconds();
  const int interval = std::max(1, req.resolved.request.step_event_interval());
  if (step.index() % interval == 0 || step.index() == step.total() - 1) {
    v1::GenerateEvent event;
    *event.mutable_step() = step;
    req.sink->Event(std::move(event));
  }
}

void CoordinatorCore::HandleResult(Group& group, const RankLink& link,
                                   vi::JobResult& result) {
  if (group.running == nullptr || group.running->id != result.request_id()) {
    return;
  }
  std::shared_ptr<Request> req = group.running;
  const auto code = static_cast<absl::StatusCode>(result.status_code());
  if (!IsRequestLevelError(code)) {
    registry_.Fail(group, absl::StrCat("rank ", link.rank, " failed: ",
                                       StatusCodeName(result.status_code()), ": ",
                                       result.status_message()));
    return;
  }
  if (link.rank == 0 && req->phase == Request::kRunning) {
    if (req->steps_seen > 0) {
      group.mean_step_seconds = req->step_seconds_sum / req->steps_seen;
      if (req->resolved.tokens > 0) {
        group.seconds_per_token_step =
            group.mean_step_seconds / static_cast<double>(req->resolved.tokens);
      }
    }
    if (code == absl::StatusCode::kOk) {
      v1::GenerateResult out;
      out.set_request_id(req->id);
      out.mutable_latents()->Swap(result.mutable_latents());
      v1::GenerationMetadata* md = out.mutable_metadata();
      const v1::GenerateRequest& r = req->resolved.request;
      md->set_seed(r.seed());
      md->set_scheduler(r.scheduler());
      md->set_steps(r.steps());
      md->set_shift(r.shift());
      md->set_guidance_scale(r.guidance_scale());
      md->set_model(req->model);
      md->set_model_config_hash(group.config_hash);
      md->set_ranks(group.world_size);
      md->set_backend(group.backend);
      md->set_server_version(Version());
      *md->mutable_latent_shape() = req->resolved.latent;
      md->set_worker_group(group.name);
      if (r.has_acceleration()) *md->mutable_acceleration() = r.acceleration();
      *md->mutable_cached_steps() = result.cached_steps();
      out.set_queue_seconds(
          std::chrono::duration<double>(req->started - req->accepted).count());
      out.set_run_seconds(result.run_seconds());
      req->sink->Result(std::move(out));
      FinishRequest(req, absl::OkStatus());
    } else {
      FinishRequest(req, absl::Status(code, result.status_message()));
    }
  }
  if (--group.results_pending <= 0) {
    if (req->phase != Request::kDone) {
      // Rank 0's result never came (it cannot be missing if the others
      // succeeded): treat as a group failure.
      registry_.Fail(group, "rank 0 sent no result");
      return;
    }
    group.running = nullptr;
    group.state = v1::GROUP_STATE_READY;
    UpdateHealthAndGauges();
    Dispatch();
  }
}

void CoordinatorCore::OnGroupFailed(Group& group, std::shared_ptr<Request> running,
                                    absl::Status status) {
  if (running != nullptr) FinishRequest(running, std::move(status));
  // Forget the rendezvous keys of this generation.
  store_.EraseUnder(group.store_prefix);
  UpdateHealthAndGauges();
  Dispatch();
}

// ---------------------------------------------------------------------------
// Store and launcher slices
// ---------------------------------------------------------------------------

namespace {

absl::Status NotUnderLivePrefix(const std::string& key) {
  return absl::FailedPreconditionError(absl::StrCat(
      "store key '", Bounded(key, 256),
      "' is not under the prefix of a live worker-group generation"));
}

}  // namespace

absl::Status CoordinatorCore::StoreSet(const vi::StoreSetRequest& req) {
  if (!SecretMatches(options_.secret, req.secret())) {
    return absl::PermissionDeniedError("StoreSetRequest.secret does not match");
  }
  if (!registry_.KeyUnderLivePrefix(req.key())) return NotUnderLivePrefix(req.key());
  store_.Set(req.key(), req.value());
  return absl::OkStatus();
}

void CoordinatorCore::StoreGet(
    const vi::StoreGetRequest& req,
    std::function<void(absl::StatusOr<vi::StoreGetResponse>)> done) {
  if (!SecretMatches(options_.secret, req.secret())) {
    return done(absl::PermissionDeniedError("StoreGetRequest.secret does not match"));
  }
  if (!registry_.KeyUnderLivePrefix(req.key())) {
    return done(NotUnderLivePrefix(req.key()));
  }
  store_.Get(req.key(), shutting_down_ ? 0 : req.wait_millis(),
             [done = std::move(done)](
                 absl::StatusOr<std::optional<std::string>> value) {
               if (!value.ok()) return done(value.status());
               vi::StoreGetResponse resp;
               resp.set_found(value->has_value());
               if (value->has_value()) resp.set_value(**value);
               done(std::move(resp));
             });
}

absl::StatusOr<vi::SliceStatus> CoordinatorCore::SyncSlice(const vi::SliceRequest& req) {
  if (!SecretMatches(options_.secret, req.secret())) {
    return absl::PermissionDeniedError(
        "SliceRequest.secret does not match the coordinator's --secret");
  }
  if (shutting_down_) return absl::UnavailableError("coordinator shutting down");
  SliceSync sync{req.group(),       req.group_size(), req.first_rank(),
                 req.local_ranks(), req.launcher_id(), req.generation(),
                 req.host(),        req.leaving(),     std::max(1, req.cfg_degree())};
  auto a = registry_.SyncSlice(sync);
  if (!a.ok()) {
    DN_LOG(WARNING) << "refused the launcher slice of group '"
                    << Bounded(req.group(), 128) << "' from " << Bounded(req.host(), 128)
                    << ": " << a.status().message();
    return a.status();
  }
  vi::SliceStatus resp;
  resp.set_generation(a->first.generation);
  resp.set_state(a->second);
  for (int r : a->first.missing_ranks) resp.add_missing_ranks(r);
  for (int r : a->first.unclaimed_ranks) resp.add_unclaimed_ranks(r);
  return resp;
}

// ---------------------------------------------------------------------------
// Info, health and gauges
// ---------------------------------------------------------------------------

v1::ListModelsResponse CoordinatorCore::ListModels() const {
  v1::ListModelsResponse resp;
  for (const auto& [name, m] : registry_.models()) {
    if (!registry_.ModelServed(name)) continue;
    v1::ModelInfo* info = resp.add_models();
    *info = m.info;
    info->set_max_tokens(registry_.ModelMaxTokens(name));
    int ready = 0;
    for (const auto& [gname, g] : registry_.groups()) {
      if (g->model != name || !g->live()) continue;
      if (g->serving()) ++ready;
      v1::GroupTopology* t = info->add_groups();
      t->set_name(g->name);
      t->set_world_size(g->world_size);
      t->set_cfg_degree(g->cfg_degree);
      t->set_ulysses_degree(g->world_size / g->cfg_degree);
      t->set_state(g->state);
    }
    info->set_ready_groups(ready);
    // LoRAs: those of the model's live groups, as their heartbeats list them.
    std::set<std::string> loras(info->loras().begin(), info->loras().end());
    for (const auto& [gname, g] : registry_.groups())
      if (g->model == name && g->live()) loras.insert(g->loras.begin(), g->loras.end());
    info->clear_loras();
    for (const std::string& l : loras) info->add_loras(l);
  }
  return resp;
}

v1::ServerInfo CoordinatorCore::GetServerInfo() const {
  v1::ServerInfo resp;
  resp.set_version(Version());
  resp.set_max_queue_per_model(options_.max_queue);
  resp.set_max_message_bytes(options_.max_message_bytes);
  for (const auto& [name, g] : registry_.groups()) {
    v1::WorkerGroupInfo* gi = resp.add_groups();
    gi->set_name(g->name);
    gi->set_model(g->model);
    gi->set_state(g->state);
    gi->set_world_size(g->world_size);
    gi->set_cfg_degree(g->cfg_degree);
    gi->set_ulysses_degree(g->world_size / g->cfg_degree);
    gi->set_backend(g->backend);
    gi->set_generation(g->generation);
    gi->set_mean_step_seconds(g->mean_step_seconds);
    if (g->running != nullptr) gi->set_running_request_id(g->running->id);
    for (const auto& link : g->ranks) {
      if (link != nullptr) *gi->add_ranks() = link->info;
    }
  }
  return resp;
}

void CoordinatorCore::UpdateHealthAndGauges() {
  bool serving = false;
  std::map<std::string, std::map<std::string, int>> counts;
  for (const auto& [name, m] : registry_.models()) {
    for (const char* s : kGroupStateLabels) counts[name][s] = 0;
  }
  for (const auto& [name, g] : registry_.groups()) {
    counts[g->model][StateLabel(g->state)]++;
    if (g->serving()) serving = true;
  }
  for (const auto& [model, states] : counts) {
    for (const auto& [state, n] : states) metrics_.SetGroups(model, state, n);
  }
  for (const auto& [name, m] : registry_.models()) {
    metrics_.SetQueueDepth(name, static_cast<double>(queue_.Size(name)));
    metrics_.SetRunning(name, running_[name]);
  }
  if (shutting_down_) serving = false;
  if (serving != serving_) {
    serving_ = serving;
    if (set_serving_) set_serving_(serving);
    DN_LOG(INFO) << "health: " << (serving ? "SERVING" : "NOT_SERVING");
  }
}

}  // namespace dn::server
