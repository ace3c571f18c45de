#include "server/metrics.h"

#include <cmath>
#include <exception>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "prometheus/exposer.h"

namespace dn::server {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using prometheus::Histogram;

Histogram::BucketBoundaries ExponentialBuckets(double first, double last,
                                               int count) {
  Histogram::BucketBoundaries bounds;
  if (count <= 1) {
    bounds.push_back(first);
    return bounds;
  }
  const double factor = std::pow(last / first, 1.0 / (count - 1));
  double v = first;
  for (int i = 0; i < count; ++i) {
    // Round to 3 significant digits so the `le` labels stay readable.
    const double mag = std::pow(10.0, std::floor(std::log10(v)) - 2);
    bounds.push_back(i == count - 1 ? last : std::round(v / mag) * mag);
    v *= factor;
  }
  return bounds;
}

const Histogram::BucketBoundaries& StepBuckets() {
  static const Histogram::BucketBoundaries b = ExponentialBuckets(0.001, 60.0, 20);
  return b;
}
const Histogram::BucketBoundaries& AllToAllBuckets() {
  static const Histogram::BucketBoundaries b = ExponentialBuckets(1e-5, 10.0, 19);
  return b;
}
const Histogram::BucketBoundaries& RequestBuckets() {
  static const Histogram::BucketBoundaries b = ExponentialBuckets(0.01, 1200.0, 18);
  return b;
}
const Histogram::BucketBoundaries& QueueBuckets() {
  static const Histogram::BucketBoundaries b = ExponentialBuckets(0.001, 1200.0, 22);
  return b;
}

namespace {

std::shared_ptr<prometheus::Registry> NewRegistry() {
  return std::make_shared<prometheus::Registry>();
}

}  // namespace

// --- coordinator ------------------------------------------------------------

CoordinatorMetrics::CoordinatorMetrics()
    : registry(NewRegistry()),
      requests_total(
          BuildCounter()
              .Name("denoised_requests_total")
              .Help("Finished Generate/GenerateUnary requests by model and "
                    "final gRPC status code name.")
              .Register(*registry)),
      request_duration(
          BuildHistogram()
              .Name("denoised_request_duration_seconds")
              .Help("Seconds from admission to the final status of admitted "
                    "requests (any status).")
              .Register(*registry)),
      queue_duration(BuildHistogram()
                         .Name("denoised_queue_duration_seconds")
                         .Help("Seconds requests waited in the queue before "
                               "dispatch to a worker group.")
                         .Register(*registry)),
      queue_depth(BuildGauge()
                      .Name("denoised_queue_depth")
                      .Help("Requests admitted and waiting for a worker "
                            "group, per model.")
                      .Register(*registry)),
      running_requests(BuildGauge()
                           .Name("denoised_running_requests")
                           .Help("Requests running on a worker group, per "
                                 "model.")
                           .Register(*registry)),
      worker_groups(BuildGauge()
                        .Name("denoised_worker_groups")
                        .Help("Registered worker groups per model and state "
                              "(forming, ready, busy, failed).")
                        .Register(*registry)),
      step_duration(
          BuildHistogram()
              .Name("denoised_step_duration_seconds")
              .Help("Denoising step time of the slowest rank, one observation "
                    "per step (CUDA: GPU events; CPU: wall time).")
              .Register(*registry)),
      alltoall_duration(
          BuildHistogram()
              .Name("denoised_alltoall_duration_seconds")
              .Help("Time spent in Ulysses all-to-all per step (slowest "
                    "rank), one observation per step.")
              .Register(*registry)),
      rank_skew(BuildHistogram()
                    .Name("denoised_rank_skew_seconds")
                    .Help("Per-step difference between the slowest and the "
                          "fastest rank's step time.")
                    .Register(*registry)),
      steps_total(BuildCounter()
                      .Name("denoised_steps_total")
                      .Help("Denoising steps run, per model and group size.")
                      .Register(*registry)),
      group_restarts(BuildCounter()
                         .Name("denoised_worker_group_restarts_total")
                         .Help("Times a worker group re-registered with a new "
                               "generation (after a rank failure).")
                         .Register(*registry)) {}

void CoordinatorMetrics::CountRequest(const std::string& model,
                                      const std::string& code) {
  requests_total.Add({{"model", model}, {"code", code}}).Increment();
}

void CoordinatorMetrics::ObserveRequestDuration(const std::string& model,
                                                double seconds) {
  request_duration.Add({{"model", model}}, RequestBuckets()).Observe(seconds);
}

void CoordinatorMetrics::ObserveQueueDuration(const std::string& model,
                                              double seconds) {
  queue_duration.Add({{"model", model}}, QueueBuckets()).Observe(seconds);
}

void CoordinatorMetrics::SetQueueDepth(const std::string& model,
                                       double depth) {
  queue_depth.Add({{"model", model}}).Set(depth);
}

void CoordinatorMetrics::SetRunning(const std::string& model,
                                    double running) {
  running_requests.Add({{"model", model}}).Set(running);
}

void CoordinatorMetrics::SetGroups(const std::string& model,
                                   const std::string& state, double count) {
  worker_groups.Add({{"model", model}, {"state", state}}).Set(count);
}

void CoordinatorMetrics::ObserveStep(const std::string& model, int ranks,
                                     double step_seconds,
                                     double alltoall_seconds,
                                     double skew_seconds) {
  const prometheus::Labels labels = {{"model", model},
                                     {"ranks", absl::StrCat(ranks)}};
  step_duration.Add(labels, StepBuckets()).Observe(step_seconds);
  alltoall_duration.Add(labels, AllToAllBuckets()).Observe(alltoall_seconds);
  rank_skew.Add(labels, AllToAllBuckets()).Observe(skew_seconds);
  steps_total.Add(labels).Increment();
}

void CoordinatorMetrics::CountRestart(const std::string& group) {
  group_restarts.Add({{"group", group}}).Increment();
}

// --- rank -------------------------------------------------------------------

RankMetrics::RankMetrics(const std::string& group_name, int rank_index)
    : registry(NewRegistry()),
      group(group_name),
      rank(absl::StrCat(rank_index)),
      step_duration(BuildHistogram()
                        .Name("denoised_rank_step_duration_seconds")
                        .Help("This rank's own denoising step time (CUDA: GPU "
                              "events; CPU: wall time).")
                        .Register(*registry)),
      alltoall_duration(
          BuildHistogram()
              .Name("denoised_rank_alltoall_duration_seconds")
              .Help("All-to-all time per step as the engine reports it (the "
                    "group's slowest rank).")
              .Register(*registry)),
      memory_peak(BuildGauge()
                      .Name("denoised_rank_device_memory_peak_bytes")
                      .Help("Peak device memory the backend has allocated.")
                      .Register(*registry)),
      steps_total(BuildCounter()
                      .Name("denoised_rank_steps_total")
                      .Help("Denoising steps this rank has run.")
                      .Register(*registry)),
      info(BuildGauge()
               .Name("denoised_rank_info")
               .Help("Constant 1, labelled with the rank's backend and "
                     "device.")
               .Register(*registry)) {
  const prometheus::Labels labels = {{"group", group}, {"rank", rank}};
  // Create the series up front so a fresh rank exports zeros, not nothing.
  step_duration.Add(labels, StepBuckets());
  alltoall_duration.Add(labels, AllToAllBuckets());
  memory_peak.Add(labels);
  steps_total.Add(labels);
}

void RankMetrics::ObserveStep(double rank_step_seconds,
                              double alltoall_seconds) {
  const prometheus::Labels labels = {{"group", group}, {"rank", rank}};
  step_duration.Add(labels, StepBuckets()).Observe(rank_step_seconds);
  alltoall_duration.Add(labels, AllToAllBuckets()).Observe(alltoall_seconds);
  steps_total.Add(labels).Increment();
}

void RankMetrics::SetMemoryPeak(int64_t bytes) {
  memory_peak.Add({{"group", group}, {"rank", rank}})
      .Set(static_cast<double>(bytes));
}

void RankMetrics::SetInfo(const std::string& backend,
                          const std::string& device) {
  info.Add({{"group", group},
            {"rank", rank},
            {"backend", backend},
            {"device", device}})
      .Set(1);
}

// --- endpoint ---------------------------------------------------------------

absl::StatusOr<std::unique_ptr<MetricsEndpoint>> MetricsEndpoint::Start(
    const std::string& listen,
    const std::shared_ptr<prometheus::Registry>& registry) {
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--metrics-listen: expected HOST:PORT, got '", listen, "'"));
  }
  std::unique_ptr<MetricsEndpoint> endpoint(new MetricsEndpoint());
  try {
    endpoint->exposer_ = std::make_unique<prometheus::Exposer>(listen, 2);
    endpoint->exposer_->RegisterCollectable(registry);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat(
        "--metrics-listen: cannot serve /metrics on ", listen, ": ", e.what()));
  }
  const std::vector<int> ports = endpoint->exposer_->GetListeningPorts();
  if (ports.empty()) {
    return absl::UnavailableError(
        absl::StrCat("--metrics-listen: no port bound for ", listen));
  }
  endpoint->address_ = absl::StrCat(listen.substr(0, colon), ":", ports[0]);
  return endpoint;
}

MetricsEndpoint::~MetricsEndpoint() = default;

}  // namespace dn::server
