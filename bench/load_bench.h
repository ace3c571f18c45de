// File: bench/load_bench.h
//
// `denoised bench load`: N concurrent streaming clients call a coordinator's
// Generate back to back for a fixed duration and report throughput
// (requests/s), latency percentiles of the successful calls (p50/p90/p99),
// queue time (the Started event's queue_seconds) and outcomes by status code.
// Every call is checked to end with exactly one terminal outcome and a
// consistent event sequence (Accepted first, Started at most once, Result iff
// OK, nothing after Result); violations are counted as `anomalies`. A client
// that gets RESOURCE_EXHAUSTED waits for the server's retry hint
// (`retry-after-ms`, bounded) before its next call. --json FILE writes the
// figures as one JSON object.
#ifndef DN_BENCH_LOAD_BENCH_H_
#define DN_BENCH_LOAD_BENCH_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace dn::bench {

struct LoadReport {
  int clients = 0;
  double duration_seconds = 0;   // wall time until every client stopped
  int64_t requests = 0;          // calls made (each has one terminal outcome)
  int64_t accepted = 0;          // calls that got an Accepted event
  int64_t started = 0;           // calls that got a Started event
  int64_t results = 0;           // calls that got a Result event
  int64_t anomalies = 0;         // calls whose events/status disagree
  std::map<std::string, int64_t> outcomes;  // status code name -> calls
  double throughput_ok = 0;      // OK calls per second
  double throughput_all = 0;     // all calls per second
  double latency_p50 = 0, latency_p90 = 0, latency_p99 = 0;  // OK calls, s
  double queue_p50 = 0, queue_p90 = 0, queue_p99 = 0;        // started calls, s
  std::vector<std::string> anomaly_examples;  // the first few, described
  std::map<std::string, std::string> first_message;  // non-OK code -> its first message
};

// The report as one JSON object.
std::string LoadReportJson(const LoadReport& report);

// Percentile (0..100) of `values` by nearest rank; 0 for none.
double Percentile(std::vector<double> values, double pct);

int BenchLoadCommand(int argc, char** argv);

}  // namespace dn::bench

#endif  // DN_BENCH_LOAD_BENCH_H_
