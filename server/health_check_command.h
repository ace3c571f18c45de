// File: server/health_check_command.h
//
// `denoised health`: a grpc.health.v1 client, for container HEALTHCHECKs and
// scripts. It asks a server (the coordinator's public port) for the serving
// status of one service ("" = the server as a whole) and exits 0 only when
// the answer is SERVING.
//
//   denoised health --target 127.0.0.1:50051 [--service denoised.v1.Denoiser]
//                   [--timeout 3]
//
// Exit codes: 0 SERVING; 1 anything else (NOT_SERVING, unknown service,
// unreachable, timed out); 2 usage error.
#ifndef DN_SERVER_HEALTH_CHECK_COMMAND_H_
#define DN_SERVER_HEALTH_CHECK_COMMAND_H_

#include <string>

#include "absl/status/statusor.h"

namespace dn::server {

// Calls grpc.health.v1.Health/Check on `target` (HOST:PORT, plaintext) for
// `service`, waiting at most `timeout_seconds`. Returns the serving status's
// name (SERVING, NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN), or the RPC's error
// (e.g. UNAVAILABLE when nothing listens, NOT_FOUND for an unknown service).
absl::StatusOr<std::string> CheckHealth(const std::string& target,
                                        const std::string& service,
                                        double timeout_seconds);

// The `denoised health` subcommand; argv[0] is "health".
int HealthCommand(int argc, char** argv);

}  // namespace dn::server

#endif  // DN_SERVER_HEALTH_CHECK_COMMAND_H_
