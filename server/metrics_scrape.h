// File: server/metrics_scrape.h
//
// Reading Prometheus /metrics endpoints from C++ (the demo's summary and the
// service tests): a minimal HTTP/1.0 GET over a TCP socket, a parser of the
// text exposition format, and histogram helpers (count, quantile estimated
// the way PromQL's histogram_quantile does, by linear interpolation inside
// the bucket).
#ifndef DN_SERVER_METRICS_SCRAPE_H_
#define DN_SERVER_METRICS_SCRAPE_H_

#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace dn::server {

// GET http://HOST:PORT<path>; returns the body of a 200 response.
absl::StatusOr<std::string> HttpGet(const std::string& host_port,
                                    const std::string& path,
                                    std::chrono::milliseconds timeout);

struct MetricSample {
  std::string name;  // e.g. denoised_steps_total, x_bucket, x_count
  std::map<std::string, std::string> labels;
  double value = 0;
};

// Parses the text format (comments skipped).
std::vector<MetricSample> ParseMetricsText(const std::string& text);

// The sum of the values of `name` over the samples whose labels include
// every pair of `match` (0 when none match).
double SumSamples(const std::vector<MetricSample>& samples,
                  const std::string& name,
                  const std::map<std::string, std::string>& match = {});

// Quantile q of histogram `name` (the base name, without _bucket) summed over
// the series matching `match`; NaN when it has no observations.
double HistogramQuantile(const std::vector<MetricSample>& samples,
                         const std::string& name, double q,
                         const std::map<std::string, std::string>& match = {});

}  // namespace dn::server

#endif  // DN_SERVER_METRICS_SCRAPE_H_
