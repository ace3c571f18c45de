// File: server/host_address.h
//
// The address a launcher's ranks advertise to the ranks of other hosts
// (their Gloo/NCCL endpoints): `denoised worker --host`, or, when a group
// spans several launchers and --host is not given, the first non-loopback
// address of an interface that is up (IPv4 first, then global IPv6).
#ifndef DN_SERVER_HOST_ADDRESS_H_
#define DN_SERVER_HOST_ADDRESS_H_

#include <string>

#include "absl/status/statusor.h"

namespace dn::server {

// NOT_FOUND when the host has no such address.
absl::StatusOr<std::string> DiscoverNonLoopbackAddress();

// 127.0.0.0/8, ::1 and "localhost".
bool IsLoopbackAddress(const std::string& address);

}  // namespace dn::server

#endif  // DN_SERVER_HOST_ADDRESS_H_
