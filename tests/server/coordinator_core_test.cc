// The coordinator's core without gRPC and without processes: the request
// queue and admission, the group registry, the rendezvous store and
// CoordinatorCore, driven directly with a FakeClock (no sleeps). The ranks
// and clients are recorders of what the core sends them; the process-level
// behaviour is tested in coordinator_test.cc and the service tests.
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/admission.h"
#include "server/clock.h"
#include "server/coordinator_core.h"
#include "server/group_registry.h"
#include "server/inflight_budget.h"
#include "server/metrics.h"
#include "server/rendezvous_store.h"
#include "server/request_queue.h"
#include "worker/tensor.h"

namespace dn::server {
namespace {

namespace v1 = ::denoised::v1;
namespace vi = ::denoised::v1::internal;
using ::testing::HasSubstr;
using ::testing::StartsWith;
using std::chrono::milliseconds;
using std::chrono::seconds;

// --- recorders --------------------------------------------------------------

class RecordingSink final : public RequestSink {
 public:
  void Event(v1::GenerateEvent e) override { events.push_back(std::move(e)); }
  void Result(v1::GenerateResult r) override { result = std::move(r); }
  void Finish(absl::Status s) override {
    if (!status.has_value()) status = std::move(s);
  }
  void Trailer(const std::string& k, const std::string& v) override {
    trailers.emplace_back(k, v);
  }
  bool accepted() const { return !events.empty() && events[0].has_accepted(); }
  std::vector<v1::GenerateEvent> events;
  std::optional<v1::GenerateResult> result;
  std::optional<absl::Status> status;
  std::vector<std::pair<std::string, std::string>> trailers;
};

class RecordingLink final : public RankLink {
 public:
  void Send(vi::CoordinatorMessage m) override { sent.push_back(std::move(m)); }
  void SendShared(std::shared_ptr<const vi::CoordinatorMessage> m) override {
    sent.push_back(*m);  // a copy for the test's own record
    shared.push_back(std::move(m));
  }
  void Close(const absl::Status& s) override {
    if (!closed.has_value()) closed = s;
  }
  std::optional<vi::Job> LastJob() const {
    for (auto it = sent.rbegin(); it != sent.rend(); ++it) {
      if (it->has_job()) return it->job();
    }
    return std::nullopt;
  }
  bool GotCancel() const {
    for (const auto& m : sent) {
      if (m.has_cancel()) return true;
    }
    return false;
  }
  std::vector<vi::CoordinatorMessage> sent;
  std::vector<std::shared_ptr<const vi::CoordinatorMessage>> shared;  // as sent
  std::optional<absl::Status> closed;
};

v1::ModelInfo TinyInfo() {
  v1::ModelInfo m;
  m.set_name("tiny");
  m.set_config_hash("c0ffee");
  m.set_in_channels(16);
  m.set_out_channels(16);
  m.set_text_dim(32);
  m.set_num_layers(2);
  m.set_num_heads(4);
  m.set_head_dim(16);
  for (int s : {4, 8, 8}) m.add_vae_stride(s);
  for (int p : {1, 2, 2}) m.add_patch_size(p);
  m.set_max_tokens(100000);
  m.set_max_axis_tokens(1024);
  return m;
}

vi::Hello MakeHello(const std::string& group, int rank, int world, int64_t generation,
                    const std::string& secret = "") {
  vi::Hello h;
  h.set_group(group);
  h.set_rank(rank);
  h.set_world_size(world);
  h.set_generation(generation);
  h.mutable_model()->set_name("tiny");
  h.mutable_model()->set_config_hash("c0ffee");
  *h.mutable_model()->mutable_info() = TinyInfo();
  h.set_backend("cpu");
  h.set_secret(secret);
  return h;
}

v1::GenerateRequest Tiny(int steps, int frames = 5, int hw = 32) {
  v1::GenerateRequest r;
  r.set_model("tiny");
  r.mutable_pixel_size()->set_frames(frames);
  r.mutable_pixel_size()->set_height(hw);
  r.mutable_pixel_size()->set_width(hw);
  r.set_steps(steps);
  v1::Tensor* t = r.mutable_prompt_embeds();
  t->set_dtype(v1::DTYPE_F32);
  t->add_shape(8);
  t->add_shape(32);
  t->mutable_data()->assign(8 * 32 * 4, '\0');
  return r;
}

// A core with one READY group "g" of `world` ranks.
class CoreTest : public ::testing::Test {
 protected:
  explicit CoreTest(std::string secret = "") {
    options_.secret = std::move(secret);
    options_.max_queue = 2;
    options_.heartbeat_timeout_ms = 5000;
    options_.unserved_timeout_ms = 10000;
    core_ = std::make_unique<CoordinatorCore>(
        options_, clock_, metrics_, [this](bool s) { serving_ = s; });
  }

  std::shared_ptr<RecordingLink> AttachRank(const vi::Hello& hello) {
    auto link = std::make_shared<RecordingLink>();
    link->Touch(clock_.Now());
    vi::RankMessage m;
    *m.mutable_hello() = hello;
    core_->OnRankMessage(link, m);
    return link;
  }
  void Ready(const std::shared_ptr<RecordingLink>& link, double rate = 1e-3) {
    vi::RankMessage m;
    m.mutable_ready()->set_seconds_per_token_step(rate);
    core_->OnRankMessage(link, m);
  }
  std::vector<std::shared_ptr<RecordingLink>> ReadyGroup(const std::string& name,
                                                         int world, int64_t gen = 1) {
    std::vector<std::shared_ptr<RecordingLink>> links;
    for (int r = 0; r < world; ++r) {
      links.push_back(AttachRank(MakeHello(name, r, world, gen, options_.secret)));
    }
    for (auto& l : links) Ready(l);
    return links;
  }
  std::shared_ptr<RecordingSink> Submit(v1::GenerateRequest r, int64_t deadline_ms = 0) {
    auto sink = std::make_shared<RecordingSink>();
    core_->Submit(std::move(r), sink, deadline_ms);
    return sink;
  }
  void Result(const std::shared_ptr<RecordingLink>& link, const std::string& id,
              absl::StatusCode code) {
    vi::RankMessage m;
    m.mutable_result()->set_request_id(id);
    m.mutable_result()->set_status_code(static_cast<int>(code));
    core_->OnRankMessage(link, m);
  }
  v1::GroupState StateOf(const std::string& name) {
    auto it = core_->registry().groups().find(name);
    return it == core_->registry().groups().end() ? v1::GROUP_STATE_UNSPECIFIED
                                                  : it->second->state;
  }
  // Advances the clock in ticks of 100 ms, as the event loop would.
  void Run(milliseconds d) {
    for (milliseconds t{0}; t < d; t += milliseconds(100)) {
      clock_.Advance(milliseconds(100));
      core_->Tick();
    }
  }

  CoreOptions options_;
  FakeClock clock_;
  CoordinatorMetrics metrics_;
  bool serving_ = false;
  std::unique_ptr<CoordinatorCore> core_;
};

// --- RequestQueue -------------------------------------------------------------

TEST(RequestQueueTest, PriorityThenArrivalAndBounded) {
  RequestQueue q(3);
  auto make = [](int priority) {
    auto r = std::make_shared<Request>();
    r->model = "m";
    r->priority = priority;
    return r;
  };
  auto a = make(0), b = make(5), c = make(0);
  EXPECT_EQ(q.Push(a), 0);
  EXPECT_EQ(q.Push(b), 0);  // higher priority goes first
  EXPECT_EQ(q.Push(c), 2);  // same priority: after a
  EXPECT_TRUE(q.Full("m"));
  EXPECT_FALSE(q.Full("other"));
  EXPECT_EQ(q.Head("m"), b);
  q.Remove(*b);
  EXPECT_EQ(q.Head("m"), a);
  EXPECT_EQ(q.Waiting("m"), (std::vector<std::shared_ptr<Request>>{a, c}));
}

// --- Admission ----------------------------------------------------------------

TEST(AdmissionTest, DeadlineEstimateWaitAndRetryAfter) {
  FakeClock clock;
  Admission adm(clock);
  auto running = std::make_shared<Request>();
  running->phase = Request::kRunning;
  running->resolved.tokens = 1000;
  running->resolved.request.set_steps(10);
  running->started = clock.Now();
  GroupLoad busy;
  busy.best_rate = 1e-3;  // 1000 tokens x 10 steps = 10 s
  busy.running = running;
  clock.Advance(seconds(4));
  EXPECT_DOUBLE_EQ(adm.WaitSeconds({busy}, {}, 0), 6.0);
  EXPECT_EQ(adm.RetryAfterMillis({busy}), 6000);
  GroupLoad idle;
  idle.idle = true;
  EXPECT_EQ(adm.WaitSeconds({busy, idle}, {}, 0), 0);
  EXPECT_EQ(adm.RetryAfterMillis({}), 1000);

  Request req;
  req.resolved.tokens = 100;
  req.resolved.request.set_steps(10);  // 1 s to run
  req.deadline_unix_ms = clock.UnixMillis() + 5000;
  absl::Status s = adm.CheckDeadline({busy}, {}, req);
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(std::string(s.message()), StartsWith("deadline: rejected at admission: estimated 7.000 s"));
  req.deadline_unix_ms = clock.UnixMillis() + 8000;
  EXPECT_TRUE(adm.CheckDeadline({busy}, {}, req).ok());
}

// Issue 14, defect 4: a running request whose cancellation was asked for
// has no work left; the group is about to be free.
TEST(AdmissionTest, CancelledRunningRequestCountsNoWork) {
  FakeClock clock;
  Admission adm(clock);
  auto running = std::make_shared<Request>();
  running->phase = Request::kRunning;
  running->resolved.tokens = 1000;
  running->resolved.request.set_steps(1000);
  running->started = clock.Now();
  GroupLoad busy;
  busy.best_rate = 1e-3;
  busy.running = running;
  EXPECT_GT(adm.WaitSeconds({busy}, {}, 0), 900);
  running->cancel_code = absl::StatusCode::kCancelled;
  EXPECT_EQ(adm.WaitSeconds({busy}, {}, 0), 0);
}

// --- InflightBudget -----------------------------------------------------------

TEST(InflightBudgetTest, BoundsBytesInFlightAndReleases) {
  InflightBudget budget(100);
  absl::StatusOr<InflightBudget::Hold> a = budget.Acquire(60);
  ASSERT_TRUE(a.ok());
  absl::StatusOr<InflightBudget::Hold> b = budget.Acquire(60);
  EXPECT_EQ(b.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(b.status().message()), HasSubstr("--max-inflight-mb"));
  a->reset();
  EXPECT_EQ(budget.in_flight(), 0);
  EXPECT_TRUE(budget.Acquire(100).ok());
  EXPECT_EQ(budget.Acquire(101).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(InflightBudget(0).Acquire(int64_t{1} << 40).ok());  // no limit
}

// --- RendezvousStore ----------------------------------------------------------

TEST(RendezvousStoreTest, WaitersAreAnsweredBySetExpiryOrClose) {
  FakeClock clock;
  RendezvousStore store(clock);
  std::vector<std::string> answers;
  auto record = [&answers](absl::StatusOr<std::optional<std::string>> v) {
    answers.push_back(!v.ok() ? "error" : v->has_value() ? **v : "missing");
  };
  store.Get("g/1/a", 0, record);      // no wait: answered now
  store.Get("g/1/a", 1000, record);   // waits for Set
  store.Get("g/1/b", 500, record);    // waits, expires
  store.Get("g/1/c", 60000, record);  // waits, closed
  EXPECT_EQ(answers, std::vector<std::string>{"missing"});
  store.Set("g/1/a", "va");
  EXPECT_EQ(answers, (std::vector<std::string>{"missing", "va"}));
  clock.Advance(milliseconds(499));
  store.ExpireWaits();
  EXPECT_EQ(answers.size(), 2u);
  clock.Advance(milliseconds(1));
  store.ExpireWaits();
  EXPECT_EQ(answers, (std::vector<std::string>{"missing", "va", "missing"}));
  store.CloseWaits(absl::UnavailableError("bye"));
  EXPECT_EQ(answers.back(), "error");
  store.EraseUnder("g/1/");
  store.Get("g/1/a", 0, record);
  EXPECT_EQ(answers.back(), "missing");
}

// --- GroupRegistry through the core -----------------------------------------

TEST_F(CoreTest, GroupFormsThenServes) {
  auto r0 = AttachRank(MakeHello("g", 0, 2, 1));
  ASSERT_EQ(r0->sent.size(), 1u);
  EXPECT_EQ(r0->sent[0].welcome().store_prefix(), "g/1/");
  EXPECT_EQ(StateOf("g"), v1::GROUP_STATE_FORMING);
  auto r1 = AttachRank(MakeHello("g", 1, 2, 1));
  Ready(r0);
  EXPECT_FALSE(serving_);
  Ready(r1);
  EXPECT_EQ(StateOf("g"), v1::GROUP_STATE_READY);
  EXPECT_TRUE(serving_);
  ASSERT_EQ(core_->ListModels().models_size(), 1);
  EXPECT_EQ(core_->ListModels().models(0).ready_groups(), 1);
}

TEST_F(CoreTest, HelloOutOfBoundsIsRefusedWithoutAllocating) {
  auto link = AttachRank(MakeHello("g", 0, 2147483647, 1));
  ASSERT_TRUE(link->closed.has_value());
  EXPECT_EQ(link->closed->code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(link->closed->message()), HasSubstr("world_size"));
  EXPECT_TRUE(core_->registry().groups().empty());
}

// Issue 14, defect 1: without a secret nobody is authenticated, so a Hello
// reusing a live group's name with another generation cannot take it over.
TEST_F(CoreTest, RogueHelloCannotTakeOverALiveGroup) {
  auto ranks = ReadyGroup("g", 1);
  auto rogue = AttachRank(MakeHello("g", 0, 1, 2));
  ASSERT_TRUE(rogue->closed.has_value());
  EXPECT_EQ(rogue->closed->code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(rogue->closed->message()), HasSubstr("is live"));
  EXPECT_EQ(StateOf("g"), v1::GROUP_STATE_READY);
  EXPECT_FALSE(ranks[0]->closed.has_value());
  // Once the live generation has failed, the next one registers.
  core_->OnRankStreamEnd(ranks[0], /*broken=*/true);
  EXPECT_EQ(StateOf("g"), v1::GROUP_STATE_FAILED);
  auto next = AttachRank(MakeHello("g", 0, 1, 2));
  EXPECT_FALSE(next->closed.has_value());
  EXPECT_EQ(StateOf("g"), v1::GROUP_STATE_FORMING);
}

class SecretCoreTest : public CoreTest {
 protected:
  SecretCoreTest() : CoreTest("s3cret") {}
};

TEST_F(SecretCoreTest, OnlyTheSecretJoinsOrReplacesALiveGroup) {
  auto ranks = ReadyGroup("g", 1);
  ASSERT_EQ(StateOf("g"), v1::GROUP_STATE_READY);
  auto rogue = AttachRank(MakeHello("g", 0, 1, 2, "guess"));
  ASSERT_TRUE(rogue->closed.has_value());
  EXPECT_EQ(rogue->closed->code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(StateOf("g"), v1::GROUP_STATE_READY);
  // A rank with the secret is trusted to start the next generation.
  auto next = AttachRank(MakeHello("g", 0, 1, 2, "s3cret"));
  EXPECT_FALSE(next->closed.has_value());
  EXPECT_TRUE(ranks[0]->closed.has_value());
  EXPECT_EQ(core_->registry().groups().at("g")->generation, 2);
}

TEST_F(CoreTest, SilentRankFailsItsGroupAndArrivalStampsCount) {
  auto ranks = ReadyGroup("g", 2);
  // Rank 0's messages arrive (stamped by the shell as they come); rank 1
  // stays silent.
  for (int i = 0; i < 40; ++i) {
    Run(milliseconds(200));
    ranks[0]->Touch(clock_.Now());
    if (i < 20) ranks[1]->Touch(clock_.Now());
  }
  // 4 s after rank 1's last message: still within the 5 s timeout.
  EXPECT_EQ(StateOf("g"), v1::GROUP_STATE_READY);
  // Silence is checked once a second: failed within 5 + 1 s.
  Run(milliseconds(2100));
  EXPECT_EQ(StateOf("g"), v1::GROUP_STATE_FAILED);
  ASSERT_TRUE(ranks[0]->closed.has_value());
  EXPECT_THAT(std::string(ranks[0]->closed->message()), HasSubstr("rank 1 sent no heartbeat"));
  EXPECT_FALSE(serving_);
}

TEST_F(CoreTest, QueuedRequestsEndWhenNoGroupComesBackThenGroupIsForgotten) {
  auto ranks = ReadyGroup("g", 1);
  auto first = Submit(Tiny(2));
  auto queued = Submit(Tiny(2));
  ASSERT_TRUE(queued->accepted());
  core_->OnRankStreamEnd(ranks[0], true);
  ASSERT_TRUE(first->status.has_value());
  EXPECT_EQ(first->status->code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE(queued->status.has_value());
  Run(milliseconds(8000));
  EXPECT_FALSE(queued->status.has_value());
  Run(milliseconds(4000));  // the 10 s limit, counted from the next check
  ASSERT_TRUE(queued->status.has_value());
  EXPECT_EQ(queued->status->code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(queued->status->message()), HasSubstr("no live worker group"));
  EXPECT_TRUE(core_->registry().groups().empty());
  EXPECT_EQ(Submit(Tiny(2))->status->code(), absl::StatusCode::kNotFound);
}

// --- requests -------------------------------------------------------------------

TEST_F(CoreTest, RequestRunsStepByStepToItsResult) {
  auto ranks = ReadyGroup("g", 2);
  auto sink = Submit(Tiny(3));
  ASSERT_TRUE(sink->accepted());
  ASSERT_EQ(sink->events.size(), 2u);
  EXPECT_TRUE(sink->events[1].has_started());
  EXPECT_EQ(StateOf("g"), v1::GROUP_STATE_BUSY);
  std::optional<vi::Job> job = ranks[1]->LastJob();
  ASSERT_TRUE(job.has_value());
  const std::string id = job->request_id();
  EXPECT_EQ(job->steps(), 3);
  // Every rank gets the tensors, in one message the ranks' streams share
  // (moved from the request, never copied per rank).
  EXPECT_EQ(job->prompt_embeds().data().size(), 8u * 32 * 4);
  ASSERT_EQ(ranks[0]->shared.size(), 1u);
  ASSERT_EQ(ranks[1]->shared.size(), 1u);
  EXPECT_EQ(ranks[0]->shared[0].get(), ranks[1]->shared[0].get());
  EXPECT_EQ(ranks[0]->shared[0]->job().prompt_embeds().data().size(), 8u * 32 * 4);
  for (int i = 0; i < 3; ++i) {
    vi::RankMessage m;
    m.mutable_step()->set_request_id(id);
    m.mutable_step()->mutable_step()->set_index(i);
    m.mutable_step()->mutable_step()->set_total(3);
    m.mutable_step()->mutable_step()->set_step_seconds(0.01);
    core_->OnRankMessage(ranks[0], m);
  }
  Result(ranks[1], id, absl::StatusCode::kOk);
  Result(ranks[0], id, absl::StatusCode::kOk);
  ASSERT_TRUE(sink->status.has_value());
  EXPECT_TRUE(sink->status->ok()) << *sink->status;
  ASSERT_TRUE(sink->result.has_value());
  EXPECT_EQ(sink->result->metadata().ranks(), 2);
  EXPECT_EQ(sink->events.size(), 5u);  // accepted, started, 3 steps
  EXPECT_EQ(StateOf("g"), v1::GROUP_STATE_READY);
}

TEST_F(CoreTest, FullQueueIsRefusedWithRetryAfter) {
  ReadyGroup("g", 1);
  auto running = Submit(Tiny(2));
  auto q1 = Submit(Tiny(2));
  auto q2 = Submit(Tiny(2));
  auto refused = Submit(Tiny(2));
  EXPECT_TRUE(q1->accepted() && q2->accepted());
  ASSERT_TRUE(refused->status.has_value());
  EXPECT_EQ(refused->status->code(), absl::StatusCode::kResourceExhausted);
  ASSERT_EQ(refused->trailers.size(), 1u);
  EXPECT_EQ(refused->trailers[0].first, "retry-after-ms");
  // Cancel of a queued request frees its slot at once.
  v1::CancelRequest c;
  c.set_request_id(q1->request_id);
  EXPECT_TRUE(core_->Cancel(c).found());
  EXPECT_EQ(q1->status->code(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(Submit(Tiny(2))->accepted());
}

TEST_F(CoreTest, DeadlinePassesInTheQueue) {
  ReadyGroup("g", 1);
  auto running = Submit(Tiny(2));
  auto queued = Submit(Tiny(2), clock_.UnixMillis() + 1000);
  ASSERT_TRUE(queued->accepted());
  Run(milliseconds(900));
  EXPECT_FALSE(queued->status.has_value());
  Run(milliseconds(200));
  ASSERT_TRUE(queued->status.has_value());
  EXPECT_EQ(queued->status->code(), absl::StatusCode::kDeadlineExceeded);
}

// Issue 14, defect 4, end to end in the core: after a found=true Cancel of
// a long request, a small request with a short deadline is admitted (it
// used to be refused with the cancelled request's remaining estimate).
TEST_F(CoreTest, CancelledRequestDoesNotCountAgainstAdmission) {
  auto ranks = ReadyGroup("g", 1);
  auto big = Submit(Tiny(1000));  // 1000 steps x tokens x 1e-3 s: minutes
  ASSERT_TRUE(big->accepted());
  ASSERT_EQ(StateOf("g"), v1::GROUP_STATE_BUSY);
  auto before = Submit(Tiny(3), clock_.UnixMillis() + 3000);
  ASSERT_TRUE(before->status.has_value());
  EXPECT_EQ(before->status->code(), absl::StatusCode::kDeadlineExceeded);
  v1::CancelRequest c;
  c.set_request_id(big->request_id);
  ASSERT_TRUE(core_->Cancel(c).found());
  EXPECT_TRUE(ranks[0]->GotCancel());
  EXPECT_EQ(StateOf("g"), v1::GROUP_STATE_BUSY);  // until the ranks stop
  auto small = Submit(Tiny(3), clock_.UnixMillis() + 3000);
  EXPECT_TRUE(small->accepted()) << (small->status ? small->status->ToString() : "");
  Result(ranks[0], ranks[0]->LastJob()->request_id(), absl::StatusCode::kCancelled);
  EXPECT_EQ(big->status->code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(StateOf("g"), v1::GROUP_STATE_BUSY);  // now running `small`
}

// Issue 14, defect 6: echoed client input is bounded, and so is the model
// name, so no error outgrows gRPC's metadata limit.
TEST_F(CoreTest, ErrorMessagesStayBounded) {
  ReadyGroup("g", 1);
  v1::GenerateRequest long_name = Tiny(2);
  long_name.set_model(std::string(8000, 'm'));
  auto s1 = Submit(long_name);
  ASSERT_TRUE(s1->status.has_value());
  EXPECT_EQ(s1->status->code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s1->status->message()), StartsWith("model: at most 256 bytes"));
  v1::GenerateRequest unknown = Tiny(2);
  unknown.set_model(std::string(200, 'x'));
  auto s2 = Submit(unknown);
  EXPECT_EQ(s2->status->code(), absl::StatusCode::kNotFound);
  EXPECT_LT(s2->status->message().size(), 200u);
  EXPECT_THAT(std::string(s2->status->message()), HasSubstr("[200 bytes]"));
  v1::GenerateRequest shape = Tiny(2);
  shape.mutable_prompt_embeds()->clear_shape();
  for (int i = 0; i < 20000; ++i) shape.mutable_prompt_embeds()->add_shape(1);
  auto s3 = Submit(shape);
  ASSERT_TRUE(s3->status.has_value());
  EXPECT_EQ(s3->status->code(), absl::StatusCode::kInvalidArgument);
  EXPECT_LE(s3->status->message().size(), 2100u);
  EXPECT_THAT(std::string(s3->status->message()), StartsWith("prompt_embeds"));
}

TEST(BoundedTest, CutsWithAMarkerAndKeepsUtf8Whole) {
  EXPECT_EQ(Bounded("short"), "short");
  EXPECT_EQ(Bounded(std::string(100, 'a'), 4), "aaaa...[100 bytes]");
  // "é" is 2 bytes: a cut inside it backs off to before it.
  EXPECT_EQ(Bounded("abc\xc3\xa9xyz", 4), "abc...[8 bytes]");
}

TEST_F(CoreTest, StoreIsScopedToLiveGenerations) {
  ReadyGroup("g", 1);
  vi::StoreSetRequest set;
  set.set_key("other/1/k");
  EXPECT_EQ(core_->StoreSet(set).code(), absl::StatusCode::kFailedPrecondition);
  std::optional<absl::StatusOr<vi::StoreGetResponse>> got;
  vi::StoreGetRequest get;
  get.set_key("g/1/k");
  get.set_wait_millis(1000);
  core_->StoreGet(get, [&got](absl::StatusOr<vi::StoreGetResponse> r) { got = r; });
  EXPECT_FALSE(got.has_value());
  set.set_key("g/1/k");
  set.set_value("v");
  ASSERT_TRUE(core_->StoreSet(set).ok());
  ASSERT_TRUE(got.has_value() && got->ok());
  EXPECT_EQ((*got)->value(), "v");
}

TEST_F(CoreTest, ShutdownFailsWorkAndReleasesRanks) {
  auto ranks = ReadyGroup("g", 1);
  auto running = Submit(Tiny(2));
  core_->Shutdown();
  EXPECT_EQ(running->status->code(), absl::StatusCode::kUnavailable);
  ASSERT_TRUE(ranks[0]->closed.has_value());
  EXPECT_TRUE(ranks[0]->sent.back().has_shutdown());
  EXPECT_FALSE(serving_);
  EXPECT_EQ(Submit(Tiny(2))->status->code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace dn::server
