// File: cmd/coordinator_command.h
//
// `denoised coordinator`: its flags -> server::CoordinatorOptions, then serve
// until SIGTERM/SIGINT.
#ifndef DN_CMD_COORDINATOR_COMMAND_H_
#define DN_CMD_COORDINATOR_COMMAND_H_

namespace dn::cmd {

// `denoised coordinator --listen HOST:PORT --metrics-listen HOST:PORT
//  [--worker-listen HOST:PORT] [--max-queue N] [--max-message-mb M]
//  [--max-inflight-mb M]
//  [--secret S] [--ready-file PATH] [--auth-token-file F]
//  [--max-streams-per-client N] [--tls-cert/--tls-key]
//  [--worker-tls-cert/--worker-tls-key/--worker-tls-ca]`. Runs until
// SIGTERM/SIGINT.
int CoordinatorCommand(int argc, char** argv);

}  // namespace dn::cmd

#endif  // DN_CMD_COORDINATOR_COMMAND_H_
