// File: tests/server/service_test_util.h
//
// Helpers of the service tests: real `denoised` processes (DENOISED_BIN) on
// loopback, started with free ports and stopped (SIGTERM, then SIGKILL) when
// the helper goes out of scope.
#ifndef DN_TESTS_SERVER_SERVICE_TEST_UTIL_H_
#define DN_TESTS_SERVER_SERVICE_TEST_UTIL_H_

#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "denoised/v1/denoiser.pb.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/impl/codegen/client_unary_call.h"
#include "grpcpp/impl/codegen/rpc_method.h"
#include "grpcpp/impl/codegen/sync_stream.h"
#include "gtest/gtest.h"
#include "server/auth.h"
#include "server/client.h"
#include "server/metrics_scrape.h"
#include "base/process.h"

namespace dn::server::testing {

// The samples of a /metrics endpoint (an EXPECT failure and none when it
// cannot be read).
inline std::vector<MetricSample> Scrape(const std::string& address) {
  absl::StatusOr<std::string> text = HttpGet(address, "/metrics", std::chrono::seconds(5));
  EXPECT_TRUE(text.ok()) << text.status();
  return text.ok() ? ParseMetricsText(*text) : std::vector<MetricSample>{};
}

// A temporary folder removed with its files at the end.
class TempDir {
 public:
  TempDir() {
    const char* tmp = std::getenv("TMPDIR");
    std::string t = absl::StrCat(tmp && *tmp ? tmp : "/tmp", "/dn-server-test-XXXXXX");
    path_ = mkdtemp(t.data()) ? t : "";
  }
  ~TempDir() {
    if (!path_.empty()) std::system(("rm -rf '" + path_ + "'").c_str());
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// A child process of DENOISED_BIN, stopped at scope exit.
class Proc {
 public:
  Proc() = default;
  Proc(std::vector<std::string> args, const std::string& log_file,
       std::vector<std::pair<std::string, std::string>> env = {}) {
    SpawnOptions o;
    o.exe = DENOISED_BIN;
    o.args = std::move(args);
    o.log_file = log_file;
    o.env = std::move(env);
    o.new_process_group = true;
    absl::StatusOr<pid_t> pid = Spawn(o);
    pid_ = pid.ok() ? *pid : -1;
  }
  ~Proc() { Stop(); }
  Proc(Proc&& o) noexcept : pid_(o.pid_) { o.pid_ = -1; }
  Proc& operator=(Proc&& o) noexcept {
    Stop();
    pid_ = o.pid_;
    o.pid_ = -1;
    return *this;
  }
  pid_t pid() const { return pid_; }
  bool running() {
    if (pid_ <= 0) return false;
    if (WaitPid(pid_, std::chrono::milliseconds(0)).has_value()) {
      pid_ = -1;
      return false;
    }
    return true;
  }
  // Returns the wait status (-1 if it was not running).
  int Stop() {
    if (pid_ <= 0) return -1;
    const int s = Terminate(pid_, std::chrono::seconds(15));
    pid_ = -1;
    return s;
  }

 private:
  pid_t pid_ = -1;
};

inline std::map<std::string, std::string> ReadKeyValues(const std::string& path) {
  std::map<std::string, std::string> kv;
  std::ifstream in(path);
  for (std::string l; std::getline(in, l);) {
    const size_t eq = l.find('=');
    if (eq != std::string::npos) kv[l.substr(0, eq)] = l.substr(eq + 1);
  }
  return kv;
}

inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Peak resident memory of process `pid` (VmHWM of /proc/PID/status), KiB;
// -1 if it cannot be read.
inline int64_t PeakRssKib(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6));
  }
  return -1;
}

// The child processes of `pid` (a launcher's ranks).
inline std::vector<pid_t> Children(pid_t pid) {
  std::vector<pid_t> out;
  std::ifstream in("/proc/" + std::to_string(pid) + "/task/" + std::to_string(pid) +
                   "/children");
  for (pid_t c; in >> c;) out.push_back(c);
  return out;
}

// Runs DENOISED_BIN with `args` to completion (at most 120 s); returns its
// exit code, or -1 (spawn failed), -2 (timed out, killed), -3 (signalled).
inline int RunDenoised(std::vector<std::string> args, const std::string& log) {
  SpawnOptions o;
  o.exe = DENOISED_BIN;
  o.args = std::move(args);
  o.log_file = log;
  absl::StatusOr<pid_t> pid = Spawn(o);
  if (!pid.ok()) return -1;
  std::optional<int> status = WaitPid(*pid, std::chrono::seconds(120));
  if (!status.has_value()) {
    Terminate(*pid, std::chrono::seconds(1));
    return -2;
  }
  return WIFEXITED(*status) ? WEXITSTATUS(*status) : -3;
}

// A coordinator on free loopback ports.
struct CoordinatorProc {
  Proc proc;
  std::string target;   // public gRPC address
  std::string worker;   // WorkerControl address (= target unless --worker-listen)
  std::string metrics;  // HOST:PORT of /metrics
  std::string log;
};

inline absl::StatusOr<std::unique_ptr<CoordinatorProc>> StartCoordinator(
    const std::string& dir, std::vector<std::string> extra = {},
    const std::string& tag = "coordinator") {
  auto c = std::make_unique<CoordinatorProc>();
  const std::string ready = absl::StrCat(dir, "/", tag, ".addr");
  c->log = absl::StrCat(dir, "/", tag, ".log");
  std::vector<std::string> args = {"coordinator", "--listen", "127.0.0.1:0",
                                   "--metrics-listen", "127.0.0.1:0",
                                   "--ready-file", ready};
  args.insert(args.end(), extra.begin(), extra.end());
  c->proc = Proc(args, c->log);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    auto kv = ReadKeyValues(ready);
    if (kv.count("listen") && kv.count("metrics")) {
      c->target = kv["listen"];
      c->worker = kv["worker_listen"];
      c->metrics = kv["metrics"];
      return c;
    }
    if (!c->proc.running()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return absl::UnavailableError("coordinator did not start: " + ReadFile(c->log));
}

// A worker group of the tiny preset on CPU.
inline Proc StartTinyGroup(const std::string& target, const std::string& name,
                           int ranks, const std::string& log,
                           std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {"worker", "--coordinator", target,
                                   "--preset", "tiny", "--ranks",
                                   std::to_string(ranks), "--backend", "cpu",
                                   "--name", name, "--threads", "1",
                                   "--metrics-listen", "127.0.0.1:0"};
  args.insert(args.end(), extra.begin(), extra.end());
  return Proc(args, log);
}

// Waits until every named group is in `state`.
inline absl::Status WaitGroups(DenoiserClient& client,
                               const std::vector<std::string>& names,
                               denoised::v1::GroupState state,
                               std::chrono::seconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::string last;
  while (std::chrono::steady_clock::now() < deadline) {
    absl::StatusOr<denoised::v1::ServerInfo> info = client.GetServerInfo();
    if (info.ok()) {
      size_t n = 0;
      for (const auto& g : info->groups()) {
        for (const auto& name : names) {
          if (g.name() == name && g.state() == state) ++n;
        }
      }
      if (n == names.size()) return absl::OkStatus();
      last = info->DebugString();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return absl::DeadlineExceededError("groups not in the expected state: " + last);
}

// A request for the tiny model: latent [16, F, H, W], seeded embeddings.
inline denoised::v1::GenerateRequest TinyRequest(int frames, int height, int width,
                                                 int steps, uint64_t seed,
                                                 int text_len = 8) {
  denoised::v1::GenerateRequest r;
  r.set_model("tiny");
  r.mutable_pixel_size()->set_frames(frames);
  r.mutable_pixel_size()->set_height(height);
  r.mutable_pixel_size()->set_width(width);
  r.set_steps(steps);
  r.set_guidance_scale(5.0f);
  r.set_seed(seed);
  *r.mutable_prompt_embeds() = SeededEmbeds(seed, text_len, 32);
  return r;
}

// Calls denoised.v1.Denoiser/<method> (Generate or GenerateUnary) with
// `body` as the raw request bytes (which need not be a valid message), as an
// outside client could; returns the call's status.
inline grpc::Status RawGenerateCall(const std::string& target, const std::string& method,
                                    const std::string& body, const std::string& token = "") {
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(512 << 20);
  args.SetMaxReceiveMessageSize(512 << 20);
  auto channel = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  ::dn::server::AddBearerToken(ctx, token);
  grpc::Slice slice(body.data(), body.size());
  grpc::ByteBuffer request(&slice, 1);
  const std::string path = "/denoised.v1.Denoiser/" + method;
  if (method == "GenerateUnary") {
    grpc::ByteBuffer response;
    return grpc::internal::BlockingUnaryCall<grpc::ByteBuffer, grpc::ByteBuffer>(
        channel.get(),
        grpc::internal::RpcMethod(path.c_str(), grpc::internal::RpcMethod::NORMAL_RPC),
        &ctx, request, &response);
  }
  std::unique_ptr<grpc::ClientReader<grpc::ByteBuffer>> reader(
      grpc::internal::ClientReaderFactory<grpc::ByteBuffer>::Create(
          channel.get(),
          grpc::internal::RpcMethod(path.c_str(),
                                    grpc::internal::RpcMethod::SERVER_STREAMING),
          &ctx, request));
  grpc::ByteBuffer in;
  while (reader->Read(&in)) {
  }
  return reader->Finish();
}

// `promtool check metrics` on `text`; returns promtool's output, or an error.
inline absl::StatusOr<std::string> PromtoolCheck(const std::string& text,
                                                 const std::string& dir) {
  const std::string in = dir + "/metrics.txt";
  const std::string out = dir + "/promtool.txt";
  {
    std::ofstream f(in);
    f << text;
  }
  const int rc = std::system(
      ("promtool check metrics < '" + in + "' > '" + out + "' 2>&1").c_str());
  const std::string output = ReadFile(out);
  if (rc != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("promtool check metrics failed (rc ", rc, "): ", output));
  }
  return output;
}

}  // namespace dn::server::testing

#endif  // DN_TESTS_SERVER_SERVICE_TEST_UTIL_H_
