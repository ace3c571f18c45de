// Tests `denoised health` (server/health_check_command.h) against gRPC's own
// grpc.health.v1 server implementation (the default health-check service of
// libgrpc++, the one the coordinator serves): the generated client from
// proto/grpc/health/v1/health.proto must interoperate with it.
#include "server/health_check_command.h"

#include <sys/wait.h>

#include <cstdlib>
#include <memory>
#include <string>

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "gtest/gtest.h"

namespace dn::server {
namespace {

class HealthServer {
 public:
  HealthServer() {
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(),
                             &port_);
    // A server needs one service of its own besides the health service.
    builder.RegisterCallbackGenericService(&generic_);
    server_ = builder.BuildAndStart();
  }
  ~HealthServer() {
    if (server_) server_->Shutdown();
  }
  bool started() const { return server_ != nullptr; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  grpc::HealthCheckServiceInterface* health() {
    return server_->GetHealthCheckService();
  }

 private:
  int port_ = 0;
  grpc::CallbackGenericService generic_;  // answers UNIMPLEMENTED
  std::unique_ptr<grpc::Server> server_;
};

// Runs the real binary; returns its exit code.
int RunBinary(const std::string& args) {
  const std::string cmd = std::string(DENOISED_BIN) + " health " + args +
                          " >/dev/null 2>&1";
  const int raw = std::system(cmd.c_str());
  return WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
}

TEST(HealthCheckTest, WholeServerIsServing) {
  HealthServer server;
  ASSERT_TRUE(server.started());
  ASSERT_NE(server.health(), nullptr);
  absl::StatusOr<std::string> status = CheckHealth(server.address(), "", 5);
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_EQ(*status, "SERVING");
  EXPECT_EQ(RunBinary("--target " + server.address()), 0);
}

TEST(HealthCheckTest, ServiceStatusFollowsTheServer) {
  HealthServer server;
  ASSERT_TRUE(server.started());
  server.health()->SetServingStatus("denoised.v1.Denoiser", false);
  absl::StatusOr<std::string> status =
      CheckHealth(server.address(), "denoised.v1.Denoiser", 5);
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_EQ(*status, "NOT_SERVING");
  EXPECT_EQ(RunBinary("--target " + server.address() +
                      " --service denoised.v1.Denoiser"),
            1);

  server.health()->SetServingStatus("denoised.v1.Denoiser", true);
  status = CheckHealth(server.address(), "denoised.v1.Denoiser", 5);
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_EQ(*status, "SERVING");
  EXPECT_EQ(RunBinary("--target " + server.address() +
                      " --service=denoised.v1.Denoiser"),
            0);

  // Shutdown() marks every service NOT_SERVING.
  server.health()->Shutdown();
  status = CheckHealth(server.address(), "", 5);
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_EQ(*status, "NOT_SERVING");
}

TEST(HealthCheckTest, UnknownServiceIsNotFound) {
  HealthServer server;
  ASSERT_TRUE(server.started());
  absl::StatusOr<std::string> status =
      CheckHealth(server.address(), "no.such.Service", 5);
  EXPECT_EQ(status.status().code(), absl::StatusCode::kNotFound)
      << status.status();
  EXPECT_EQ(RunBinary("--target " + server.address() +
                      " --service no.such.Service"),
            1);
}

TEST(HealthCheckTest, NothingListeningIsUnavailable) {
  std::string address;
  {
    HealthServer server;  // take a free port, then close it
    ASSERT_TRUE(server.started());
    address = server.address();
  }
  absl::StatusOr<std::string> status = CheckHealth(address, "", 2);
  EXPECT_FALSE(status.ok());
  EXPECT_EQ(RunBinary("--target " + address + " --timeout 2"), 1);
}

TEST(HealthCheckTest, BadFlagsAreUsageErrors) {
  EXPECT_EQ(CheckHealth("", "", 1).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckHealth("127.0.0.1:1", "", 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RunBinary("--timeout 0"), 2);
  EXPECT_EQ(RunBinary("--no-such-flag"), 2);
}

}  // namespace
}  // namespace dn::server
