#include "bench/load_bench.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <mutex>
#include <optional>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/flags.h"
#include "denoised/v1/denoiser.grpc.pb.h"
#include "server/client.h"
#include "server/protocol.h"

namespace dn::bench {

namespace {

namespace v1 = ::denoised::v1;
using Clock = std::chrono::steady_clock;

// One call's record.
struct CallRecord {
  grpc::StatusCode code = grpc::StatusCode::OK;
  double seconds = 0;
  std::optional<double> queue_seconds;
  bool accepted = false;
  bool result = false;
  std::string anomaly;  // empty: consistent
  std::string message;  // the status message
  int64_t retry_after_ms = -1;
};

std::string CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return absl::StrCat("CODE_", static_cast<int>(code));
  }
}

// One streamed Generate call, checked event by event.
CallRecord OneCall(v1::Denoiser::Stub& stub, const v1::GenerateRequest& req,
                   double deadline_s) {
  CallRecord rec;
  grpc::ClientContext ctx;
  if (deadline_s > 0) {
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::microseconds(
                         static_cast<int64_t>(deadline_s * 1e6)));
  }
  const auto t0 = Clock::now();
  std::unique_ptr<grpc::ClientReader<v1::GenerateEvent>> reader =
      stub.Generate(&ctx, req);
  v1::GenerateEvent e;
  int index = 0;
  int started = 0;
  auto note = [&rec](const std::string& what) {
    if (rec.anomaly.empty()) rec.anomaly = what;
  };
  while (reader->Read(&e)) {
    if (rec.result) note("an event after Result");
    if (index == 0 && !e.has_accepted()) note("first event is not Accepted");
    if (index > 0 && e.has_accepted()) note("a second Accepted");
    if (e.has_started()) {
      if (++started > 1) note("a second Started");
      rec.queue_seconds = e.started().queue_seconds();
    }
    if (e.has_step() && started == 0) note("a Step before Started");
    if (e.has_result()) {
      if (started == 0) note("a Result before Started");
      rec.result = true;
    }
    rec.accepted = rec.accepted || e.has_accepted();
    ++index;
  }
  const grpc::Status s = reader->Finish();
  rec.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  rec.code = s.error_code();
  rec.message = s.error_message();
  if (rec.code == grpc::StatusCode::OK && !rec.result) note("OK without Result");
  if (rec.code != grpc::StatusCode::OK && rec.result) note("Result but not OK");
  if (rec.code == grpc::StatusCode::RESOURCE_EXHAUSTED) {
    if (rec.accepted) note("RESOURCE_EXHAUSTED after Accepted");
    const auto& md = ctx.GetServerTrailingMetadata();
    auto it = md.find(dn::server::kRetryAfterMetadata);
    int64_t ms = 0;
    if (it != md.end() &&
        absl::SimpleAtoi(absl::string_view(it->second.data(), it->second.size()),
                         &ms)) {
      rec.retry_after_ms = ms;
    }
  }
  if (!rec.anomaly.empty()) {
    rec.anomaly = absl::StrCat(rec.anomaly, " (status ", CodeName(rec.code),
                               ": ", s.error_message(), ")");
  }
  return rec;
}

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += absl::StrCat("\\u00", c < 0x10 ? "0" : "",
                          absl::Hex(static_cast<unsigned char>(c)));
    } else {
      out += c;
    }
  }
  return out + "\"";
}

}  // namespace

double Percentile(std::vector<double> values, double pct) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const double rank = std::ceil(pct / 100.0 * static_cast<double>(values.size()));
  const size_t i = static_cast<size_t>(std::clamp(rank, 1.0,
                                                  static_cast<double>(values.size())));
  return values[i - 1];
}

std::string LoadReportJson(const LoadReport& r) {
  std::vector<std::string> outcomes;
  for (const auto& [code, n] : r.outcomes) {
    outcomes.push_back(absl::StrCat(JsonString(code), ": ", n));
  }
  std::vector<std::string> examples;
  for (const auto& a : r.anomaly_examples) examples.push_back(JsonString(a));
  std::vector<std::string> messages;
  for (const auto& [code, m] : r.first_message) {
    messages.push_back(absl::StrCat(JsonString(code), ": ", JsonString(m)));
  }
  return absl::StrCat(
      "{\"clients\": ", r.clients, ", \"duration_seconds\": ", r.duration_seconds,
      ", \"requests\": ", r.requests, ", \"accepted\": ", r.accepted,
      ", \"started\": ", r.started, ", \"results\": ", r.results,
      ", \"anomalies\": ", r.anomalies, ", \"outcomes\": {",
      absl::StrJoin(outcomes, ", "), "}, \"throughput_ok_rps\": ", r.throughput_ok,
      ", \"throughput_all_rps\": ", r.throughput_all,
      ", \"latency_seconds\": {\"p50\": ", r.latency_p50, ", \"p90\": ", r.latency_p90,
      ", \"p99\": ", r.latency_p99, "}, \"queue_seconds\": {\"p50\": ", r.queue_p50,
      ", \"p90\": ", r.queue_p90, ", \"p99\": ", r.queue_p99,
      "}, \"first_messages\": {", absl::StrJoin(messages, ", "),
      "}, \"anomaly_examples\": [", absl::StrJoin(examples, ", "), "]}\n");
}

int BenchLoadCommand(int argc, char** argv) {
  std::string target = "127.0.0.1:50051", model, json;
  int clients = 4, frames = 5, height = 64, width = 64, steps = 10;
  int latent_frames = 0, latent_height = 0, latent_width = 0, text_len = 8;
  double duration_s = 10, deadline_s = 0, guidance = 5;
  FlagSet flags("denoised bench load",
                "N concurrent streaming clients call Generate back to back "
                "for --duration seconds; reports throughput, latency and queue "
                "percentiles and outcomes by status code.");
  flags.String("target", &target, "coordinator address HOST:PORT");
  flags.String("model", &model, "model name");
  flags.Int("clients", &clients, "concurrent clients");
  flags.Double("duration", &duration_s,
               "seconds during which clients start new calls");
  flags.Int("frames", &frames, "pixel frames (1 + 4k)");
  flags.Int("height", &height, "pixel height");
  flags.Int("width", &width, "pixel width");
  flags.Int("latent-frames", &latent_frames, "or: latent frames");
  flags.Int("latent-height", &latent_height, "latent height");
  flags.Int("latent-width", &latent_width, "latent width");
  flags.Int("steps", &steps, "denoising steps");
  flags.Double("guidance", &guidance, "CFG scale");
  flags.Int("text-len", &text_len, "random prompt tokens");
  flags.Double("deadline", &deadline_s, "per-call gRPC deadline in seconds (0: none)");
  flags.String("json", &json, "write the report as JSON to this file");
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;
  if (model.empty()) {
    std::fprintf(stderr, "denoised bench load: --model is required\n");
    return 2;
  }
  if (clients < 1 || duration_s <= 0) {
    std::fprintf(stderr,
                 "denoised bench load: --clients must be >= 1 and --duration > 0\n");
    return 2;
  }

  dn::server::DenoiserClient probe(target);
  absl::StatusOr<v1::ListModelsResponse> models = probe.ListModels();
  if (!models.ok()) {
    std::fprintf(stderr, "denoised bench load: ListModels: %s\n",
                 models.status().ToString().c_str());
    return 1;
  }
  int text_dim = 0;
  for (const auto& m : models->models()) {
    if (m.name() == model) text_dim = m.text_dim();
  }
  if (text_dim == 0) {
    std::fprintf(stderr, "denoised bench load: model '%s' is not served by %s\n",
                 model.c_str(), target.c_str());
    return 1;
  }
  v1::GenerateRequest base;
  base.set_model(model);
  if (latent_frames > 0 || latent_height > 0 || latent_width > 0) {
    base.mutable_latent_shape()->set_frames(latent_frames);
    base.mutable_latent_shape()->set_height(latent_height);
    base.mutable_latent_shape()->set_width(latent_width);
  } else {
    base.mutable_pixel_size()->set_frames(frames);
    base.mutable_pixel_size()->set_height(height);
    base.mutable_pixel_size()->set_width(width);
  }
  base.set_steps(steps);
  base.set_guidance_scale(static_cast<float>(guidance));
  // One shared embedding per client; seeds vary per call.
  *base.mutable_prompt_embeds() = dn::server::SeededEmbeds(1, text_len, text_dim);

  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(std::numeric_limits<int>::max());
  args.SetMaxSendMessageSize(std::numeric_limits<int>::max());
  std::mutex mu;
  std::vector<CallRecord> records;
  const auto t0 = Clock::now();
  const auto stop_at =
      t0 + std::chrono::microseconds(static_cast<int64_t>(duration_s * 1e6));
  std::vector<std::thread> threads;
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&, c] {
      // A channel per client: separate HTTP/2 connections, as real clients.
      grpc::ChannelArguments a = args;
      a.SetInt("grpc.channel_id", c);  // no subchannel sharing
      auto channel = grpc::CreateCustomChannel(
          target, grpc::InsecureChannelCredentials(), a);
      auto stub = v1::Denoiser::NewStub(channel);
      v1::GenerateRequest req = base;
      for (uint64_t i = 0; Clock::now() < stop_at; ++i) {
        req.set_seed(static_cast<uint64_t>(c) * 1000003u + i);
        CallRecord rec = OneCall(*stub, req, deadline_s);
        int64_t wait_ms = 0;
        if (rec.code == grpc::StatusCode::RESOURCE_EXHAUSTED) {
          wait_ms = std::clamp<int64_t>(rec.retry_after_ms >= 0 ? rec.retry_after_ms : 100,
                                        10, 1000);
        } else if (rec.code != grpc::StatusCode::OK) {
          wait_ms = 10;  // never spin on a failing server
        }
        {
          std::lock_guard<std::mutex> lock(mu);
          records.push_back(std::move(rec));
        }
        const auto until = std::min(Clock::now() + std::chrono::milliseconds(wait_ms),
                                    stop_at);
        if (until > Clock::now()) std::this_thread::sleep_until(until);
      }
    });
  }
  for (auto& t : threads) t.join();
  LoadReport r;
  r.clients = clients;
  r.duration_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  std::vector<double> latency, queue;
  for (const CallRecord& rec : records) {
    ++r.requests;
    r.accepted += rec.accepted;
    r.results += rec.result;
    r.outcomes[CodeName(rec.code)]++;
    if (rec.code != grpc::StatusCode::OK) {
      r.first_message.emplace(CodeName(rec.code), rec.message);
    }
    if (rec.queue_seconds.has_value()) {
      ++r.started;
      queue.push_back(*rec.queue_seconds);
    }
    if (rec.code == grpc::StatusCode::OK) latency.push_back(rec.seconds);
    if (!rec.anomaly.empty()) {
      ++r.anomalies;
      if (r.anomaly_examples.size() < 5) r.anomaly_examples.push_back(rec.anomaly);
    }
  }
  r.throughput_ok = static_cast<double>(latency.size()) / r.duration_seconds;
  r.throughput_all = static_cast<double>(r.requests) / r.duration_seconds;
  r.latency_p50 = Percentile(latency, 50);
  r.latency_p90 = Percentile(latency, 90);
  r.latency_p99 = Percentile(latency, 99);
  r.queue_p50 = Percentile(queue, 50);
  r.queue_p90 = Percentile(queue, 90);
  r.queue_p99 = Percentile(queue, 99);

  std::printf("bench load: %d clients, %.1f s, model %s, %d steps\n", clients,
              r.duration_seconds, model.c_str(), steps);
  std::printf("  requests %lld (accepted %lld, started %lld, results %lld, "
              "anomalies %lld)\n",
              static_cast<long long>(r.requests), static_cast<long long>(r.accepted),
              static_cast<long long>(r.started), static_cast<long long>(r.results),
              static_cast<long long>(r.anomalies));
  std::printf("  throughput %.2f OK/s (%.2f calls/s)\n", r.throughput_ok,
              r.throughput_all);
  std::printf("  latency OK  p50 %.3f s  p90 %.3f s  p99 %.3f s\n", r.latency_p50,
              r.latency_p90, r.latency_p99);
  std::printf("  queue       p50 %.3f s  p90 %.3f s  p99 %.3f s\n", r.queue_p50,
              r.queue_p90, r.queue_p99);
  for (const auto& [code, n] : r.outcomes) {
    auto m = r.first_message.find(code);
    std::printf("  %-20s %lld%s%s\n", code.c_str(), static_cast<long long>(n),
                m == r.first_message.end() ? "" : "  first: ",
                m == r.first_message.end() ? "" : m->second.c_str());
  }
  for (const auto& a : r.anomaly_examples) std::printf("  anomaly: %s\n", a.c_str());
  if (!json.empty()) {
    std::ofstream f(json);
    f << LoadReportJson(r);
    if (!f) {
      std::fprintf(stderr, "denoised bench load: --json: cannot write %s\n",
                   json.c_str());
      return 1;
    }
  }
  return r.anomalies == 0 ? 0 : 1;
}

}  // namespace dn::bench
