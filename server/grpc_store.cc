#include "server/grpc_store.h"

#include <algorithm>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "denoised/v1/worker.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "server/proto_convert.h"

namespace dn::server {

namespace vi = ::denoised::v1::internal;
using Clock = std::chrono::steady_clock;

struct GrpcStore::Stub {
  std::unique_ptr<vi::WorkerControl::Stub> stub;
};

GrpcStore::GrpcStore(std::shared_ptr<grpc::Channel> channel, std::string secret)
    : stub_(std::make_unique<Stub>()), secret_(std::move(secret)) {
  stub_->stub = vi::WorkerControl::NewStub(std::move(channel));
}

GrpcStore::~GrpcStore() = default;

absl::Status GrpcStore::Set(const std::string& key,
                            const std::vector<char>& value) {
  vi::StoreSetRequest req;
  req.set_key(key);
  req.set_value(std::string(value.begin(), value.end()));
  req.set_secret(secret_);
  const auto deadline = Clock::now() + std::chrono::seconds(30);
  for (;;) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    vi::StoreSetResponse resp;
    const grpc::Status s = stub_->stub->StoreSet(&ctx, req, &resp);
    if (s.ok()) return absl::OkStatus();
    if (s.error_code() != grpc::StatusCode::UNAVAILABLE ||
        Clock::now() >= deadline) {
      return absl::Status(
          static_cast<absl::StatusCode>(s.error_code()),
          absl::StrCat("store Set '", key, "': ", s.error_message()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

absl::StatusOr<std::vector<char>> GrpcStore::Get(
    const std::string& key, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - Clock::now());
    vi::StoreGetRequest req;
    req.set_key(key);
    req.set_secret(secret_);
    req.set_wait_millis(static_cast<int>(
        std::clamp<int64_t>(left.count(), 0, 5000)));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::milliseconds(req.wait_millis()) +
                     std::chrono::seconds(10));
    vi::StoreGetResponse resp;
    const grpc::Status s = stub_->stub->StoreGet(&ctx, req, &resp);
    if (s.ok() && resp.found()) {
      return std::vector<char>(resp.value().begin(), resp.value().end());
    }
    if (!s.ok() && s.error_code() != grpc::StatusCode::UNAVAILABLE &&
        s.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED) {
      return absl::Status(
          static_cast<absl::StatusCode>(s.error_code()),
          absl::StrCat("store Get '", key, "': ", s.error_message()));
    }
    if (Clock::now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("store key '", key, "' did not appear within ",
                       timeout.count(), " ms"));
    }
    if (!s.ok()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

}  // namespace dn::server
