#include "server/metrics.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <exception>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "prometheus/text_serializer.h"

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
      cached_steps_total(BuildCounter()
                             .Name("denoised_cached_steps_total")
                             .Help("Denoising steps skipped by step caching (only the "
                                   "first block ran), per model and group size.")
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
                                     double skew_seconds, bool cached) {
  const prometheus::Labels labels = {{"model", model},
                                     {"ranks", absl::StrCat(ranks)}};
  step_duration.Add(labels, StepBuckets()).Observe(step_seconds);
  alltoall_duration.Add(labels, AllToAllBuckets()).Observe(alltoall_seconds);
  rank_skew.Add(labels, AllToAllBuckets()).Observe(skew_seconds);
  steps_total.Add(labels).Increment();
  if (cached) cached_steps_total.Add(labels).Increment();
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
  std::string host = listen.substr(0, colon);
  const std::string port = listen.substr(colon + 1);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  if (int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(),
                           &hints, &found);
      rc != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--metrics-listen: cannot resolve '", listen, "': ", gai_strerror(rc)));
  }
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> addrs(found, freeaddrinfo);
  std::unique_ptr<MetricsEndpoint> endpoint(new MetricsEndpoint());
  std::string last_error = "no address";
  for (addrinfo* a = addrs.get(); a != nullptr; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC,
                          a->ai_protocol);
    if (fd < 0) {
      last_error = std::strerror(errno);
      continue;
    }
    const int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 || ::listen(fd, 64) != 0) {
      last_error = std::strerror(errno);
      close(fd);
      continue;
    }
    endpoint->listen_fd_ = fd;
    break;
  }
  if (endpoint->listen_fd_ < 0) {
    return absl::UnavailableError(absl::StrCat(
        "--metrics-listen: cannot serve /metrics on ", listen, ": ",
        last_error));
  }
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  getsockname(endpoint->listen_fd_, reinterpret_cast<sockaddr*>(&bound), &len);
  const int bound_port =
      bound.ss_family == AF_INET6
          ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
          : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  endpoint->address_ = absl::StrCat(listen.substr(0, colon), ":", bound_port);
  endpoint->registry_ = registry;
  endpoint->thread_ = std::thread([e = endpoint.get()] { e->Serve(); });
  return endpoint;
}

std::string MetricsEndpoint::Respond(const std::string& request) const {
  const bool get = request.rfind("GET ", 0) == 0;
  const bool head = request.rfind("HEAD ", 0) == 0;
  const size_t path_begin = request.find(' ') + 1;
  const size_t path_end = request.find_first_of(" ?\r\n", path_begin);
  const std::string path = request.substr(path_begin, path_end - path_begin);
  std::string status = "200 OK", type = "text/plain; version=0.0.4; charset=utf-8";
  std::string body;
  if (!get && !head) {
    status = "405 Method Not Allowed";
    body = "only GET /metrics\n";
  } else if (path != "/metrics") {
    status = "404 Not Found";
    body = "metrics are at /metrics\n";
  } else {
    body = prometheus::TextSerializer().Serialize(registry_->Collect());
  }
  std::string response = absl::StrCat(
      "HTTP/1.1 ", status, "\r\nContent-Type: ", type,
      "\r\nContent-Length: ", body.size(), "\r\nConnection: close\r\n\r\n");
  if (!head) response += body;
  return response;
}

void MetricsEndpoint::Serve() {
  while (!stop_.load()) {
    pollfd p{listen_fd_, POLLIN, 0};
    if (poll(&p, 1, 200) <= 0) continue;
    const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    timeval timeout{2, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
    std::string request;
    char buf[4096];
    while (request.find("\r\n\r\n") == std::string::npos &&
           request.size() < 16384) {
      const ssize_t n = recv(fd, buf, sizeof(buf), 0);
      if (n <= 0) break;
      request.append(buf, static_cast<size_t>(n));
    }
    if (!request.empty()) {
      const std::string response = Respond(request);
      size_t sent = 0;
      while (sent < response.size()) {
        const ssize_t n = send(fd, response.data() + sent,
                               response.size() - sent, MSG_NOSIGNAL);
        if (n <= 0) break;
        sent += static_cast<size_t>(n);
      }
    }
    close(fd);
  }
}

MetricsEndpoint::~MetricsEndpoint() {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
  if (listen_fd_ >= 0) close(listen_fd_);
}

}  // namespace dn::server
