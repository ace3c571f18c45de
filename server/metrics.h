// File: server/metrics.h
//
// Every Prometheus metric of denoised, in one place: one struct of metric
// families per process kind (the coordinator and a worker-group rank), each
// built from its own prometheus::Registry, plus the HTTP endpoint that serves
// a registry at /metrics. docs/METRICS.md documents each metric; keep the two
// in step.
//
// Conventions: base units (seconds, bytes), `_total` for counters, labels
// never carry request ids or prompts. Label values for `model` are model
// names registered by worker groups (a request naming an unknown model is
// counted under model="_unknown_"), so the label set stays bounded.
#ifndef DN_SERVER_METRICS_H_
#define DN_SERVER_METRICS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <atomic>
#include <thread>

#include "absl/status/statusor.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace dn::server {

// `count` bucket bounds growing geometrically from `first` to `last`
// (both included).
prometheus::Histogram::BucketBoundaries ExponentialBuckets(double first,
                                                           double last,
                                                           int count);

// Bucket layouts shared by the coordinator and the ranks.
const prometheus::Histogram::BucketBoundaries& StepBuckets();      // 1 ms .. 60 s
const prometheus::Histogram::BucketBoundaries& AllToAllBuckets();  // 10 us .. 10 s
const prometheus::Histogram::BucketBoundaries& RequestBuckets();   // 10 ms .. 1200 s
const prometheus::Histogram::BucketBoundaries& QueueBuckets();     // 1 ms .. 1200 s

// Model label used for requests that name a model no group serves.
inline constexpr char kUnknownModelLabel[] = "_unknown_";

// The worker-group states of denoised_worker_groups{state}.
inline constexpr const char* kGroupStateLabels[] = {"forming", "ready", "busy",
                                                    "failed"};

// The metrics of `denoised coordinator`.
struct CoordinatorMetrics {
  CoordinatorMetrics();

  std::shared_ptr<prometheus::Registry> registry;

  // denoised_requests_total{model,code}: finished requests by final gRPC code.
  prometheus::Family<prometheus::Counter>& requests_total;
  // denoised_request_duration_seconds{model}: admission to final status.
  prometheus::Family<prometheus::Histogram>& request_duration;
  // denoised_queue_duration_seconds{model}: admission to dispatch.
  prometheus::Family<prometheus::Histogram>& queue_duration;
  // denoised_queue_depth{model}: admitted, not yet dispatched.
  prometheus::Family<prometheus::Gauge>& queue_depth;
  // denoised_running_requests{model}: dispatched, not yet finished.
  prometheus::Family<prometheus::Gauge>& running_requests;
  // denoised_worker_groups{model,state}: registered groups per state.
  prometheus::Family<prometheus::Gauge>& worker_groups;
  // denoised_step_duration_seconds{model,ranks}: slowest rank's step time.
  prometheus::Family<prometheus::Histogram>& step_duration;
  // denoised_alltoall_duration_seconds{model,ranks}: all-to-all time per step.
  prometheus::Family<prometheus::Histogram>& alltoall_duration;
  // denoised_rank_skew_seconds{model,ranks}: slowest minus fastest rank.
  prometheus::Family<prometheus::Histogram>& rank_skew;
  // denoised_steps_total{model,ranks}: denoising steps run.
  prometheus::Family<prometheus::Counter>& steps_total;
  // denoised_cached_steps_total{model,ranks}: steps that step caching
  // skipped (only block 0 ran; docs/ENGINE.md "Step caching").
  prometheus::Family<prometheus::Counter>& cached_steps_total;
  // denoised_worker_group_restarts_total{group}: re-registrations with a new
  // generation.
  prometheus::Family<prometheus::Counter>& group_restarts;

  // Helpers that fill in the labels.
  void CountRequest(const std::string& model, const std::string& code);
  void ObserveRequestDuration(const std::string& model, double seconds);
  void ObserveQueueDuration(const std::string& model, double seconds);
  void SetQueueDepth(const std::string& model, double depth);
  void SetRunning(const std::string& model, double running);
  void SetGroups(const std::string& model, const std::string& state,
                 double count);
  void ObserveStep(const std::string& model, int ranks, double step_seconds,
                   double alltoall_seconds, double skew_seconds, bool cached = false);
  void CountRestart(const std::string& group);
};

// The metrics of one `denoised worker-rank` process.
struct RankMetrics {
  RankMetrics(const std::string& group, int rank);

  std::shared_ptr<prometheus::Registry> registry;
  std::string group;
  std::string rank;

  // denoised_rank_step_duration_seconds{group,rank}: this rank's step time.
  prometheus::Family<prometheus::Histogram>& step_duration;
  // denoised_rank_alltoall_duration_seconds{group,rank}.
  prometheus::Family<prometheus::Histogram>& alltoall_duration;
  // denoised_rank_device_memory_peak_bytes{group,rank}.
  prometheus::Family<prometheus::Gauge>& memory_peak;
  // denoised_rank_steps_total{group,rank}.
  prometheus::Family<prometheus::Counter>& steps_total;
  // denoised_rank_info{group,rank,backend,device} = 1.
  prometheus::Family<prometheus::Gauge>& info;

  void ObserveStep(double rank_step_seconds, double alltoall_seconds);
  void SetMemoryPeak(int64_t bytes);
  void SetInfo(const std::string& backend, const std::string& device);
};

// Serves a registry over HTTP at /metrics (text exposition format 0.0.4,
// serialized by prometheus-cpp). Port 0 picks a free port; address() tells
// the bound one. One server thread with an ordinary stack answers scrapes one
// at a time (each bounded by a 2 s socket timeout).
//
// Not prometheus-cpp's civetweb Exposer: civetweb creates its threads with a
// fixed 100 KB stack, and the static TLS of the CUDA libraries a CUDA build
// links (cuDNN, NCCL, cudart) takes nearly all of it, so scrapes of a CUDA
// build crashed with "stack smashing detected" on the GPU machine.
class MetricsEndpoint {
 public:
  static absl::StatusOr<std::unique_ptr<MetricsEndpoint>> Start(
      const std::string& listen,
      const std::shared_ptr<prometheus::Registry>& registry);
  ~MetricsEndpoint();
  MetricsEndpoint(const MetricsEndpoint&) = delete;
  MetricsEndpoint& operator=(const MetricsEndpoint&) = delete;

  // "HOST:PORT" as bound (the host part as given in `listen`).
  const std::string& address() const { return address_; }

 private:
  MetricsEndpoint() = default;
  void Serve();
  std::string Respond(const std::string& request) const;

  std::shared_ptr<prometheus::Registry> registry_;
  int listen_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::thread thread_;
  std::string address_;
};

}  // namespace dn::server

#endif  // DN_SERVER_METRICS_H_
