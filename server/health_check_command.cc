// `denoised health`: see server/health_check_command.h.
#include "server/health_check_command.h"

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/flags.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpc/health/v1/health.pb.h"

namespace dn::server {

absl::StatusOr<std::string> CheckHealth(const std::string& target,
                                        const std::string& service,
                                        double timeout_seconds) {
  if (target.empty()) {
    return absl::InvalidArgumentError("--target: empty; want HOST:PORT");
  }
  if (!(timeout_seconds > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--timeout: ", timeout_seconds, " is not positive"));
  }
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
  std::unique_ptr<grpc::health::v1::Health::Stub> stub =
      grpc::health::v1::Health::NewStub(channel);

  grpc::ClientContext context;
  context.set_deadline(
      std::chrono::system_clock::now() +
      std::chrono::duration_cast<std::chrono::system_clock::duration>(
          std::chrono::duration<double>(timeout_seconds)));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status rpc = stub->Check(&context, request, &response);
  if (!rpc.ok()) {
    // grpc::StatusCode and absl::StatusCode share their values.
    return absl::Status(static_cast<absl::StatusCode>(rpc.error_code()),
                        absl::StrCat("grpc.health.v1.Health/Check on ", target,
                                     " (service \"", service,
                                     "\"): ", rpc.error_message()));
  }
  return grpc::health::v1::HealthCheckResponse::ServingStatus_Name(
      response.status());
}

int HealthCommand(int argc, char** argv) {
  dn::FlagSet flags("denoised health",
                    "Asks a server for its grpc.health.v1 serving status; "
                    "exits 0 iff SERVING (for container health checks).");
  std::string target = "127.0.0.1:50051";
  std::string service;
  double timeout = 3.0;
  flags.String("target", &target, "server address HOST:PORT (plaintext)");
  flags.String("service", &service,
               "service name to check; empty = the server as a whole");
  flags.Double("timeout", &timeout, "seconds to wait for the answer");
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;

  absl::StatusOr<std::string> status = CheckHealth(target, service, timeout);
  if (!status.ok()) {
    std::fprintf(stderr, "denoised health: %s\n",
                 status.status().ToString().c_str());
    return status.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  std::printf("%s\n", status->c_str());
  return *status == "SERVING" ? 0 : 1;
}

}  // namespace dn::server
