// File: server/protocol.h
//
// Rules of the internal coordinator <-> rank protocol (WorkerControl in
// proto/denoised/v1/worker.proto) that both sides must agree on, kept in one
// place: which job errors are request-level (the group stays usable) and
// which are fatal (the group is torn down and re-formed), the environment
// variable that carries the shared secret to rank processes, and timing
// defaults.
#ifndef DN_SERVER_PROTOCOL_H_
#define DN_SERVER_PROTOCOL_H_

#include <string>

#include "absl/status/status.h"

namespace dn::server {

// The shared secret travels to child processes in the environment, not on
// the command line (which `ps` shows).
inline constexpr char kSecretEnv[] = "DENOISED_SECRET";

// Ranks send a Heartbeat this often; by default (--heartbeat-timeout) the
// coordinator fails a group whose rank has been silent for kHeartbeatTimeoutMs.
inline constexpr int kHeartbeatIntervalMs = 1000;
inline constexpr int kHeartbeatTimeoutMs = 15000;

// Default per-message size limit of every channel and server (latents of a
// 720p video are tens of MB).
inline constexpr int64_t kDefaultMaxMessageBytes = int64_t{256} << 20;

// Trailing metadata of a RESOURCE_EXHAUSTED Generate call (full queue): the
// coordinator's estimate, in milliseconds, of when a queue slot frees.
inline constexpr char kRetryAfterMetadata[] = "retry-after-ms";

// A job error with one of these codes concerns the request only: every rank
// left Generate at the same step boundary and the group's process groups are
// intact, so the group takes the next job. Any other code (INTERNAL,
// UNAVAILABLE, ABORTED, UNKNOWN, ...) means the group is broken: the rank
// exits after reporting it, and the coordinator fails the group.
inline bool IsRequestLevelError(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk:
    case absl::StatusCode::kCancelled:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kNotFound:  // a request's LoRA the worker does not hold
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kResourceExhausted:
      return true;
    default:
      return false;
  }
}

// Store keys of a group generation start with this prefix.
inline std::string StorePrefix(const std::string& group, long long generation) {
  return group + "/" + std::to_string(generation) + "/";
}

}  // namespace dn::server

#endif  // DN_SERVER_PROTOCOL_H_
