// File: server/hello_validation.h
//
// The bounds of every field of a rank's Hello (WorkerControl.Attach), checked
// by the coordinator before it allocates or keeps anything for the rank: a
// Hello is input from the network, and a world size of 2^31-1 must be
// refused, not allocated. The secret is checked by the coordinator itself
// (before this); the group-level agreement (same world size, model and
// backend as the group's other ranks, the generation its launchers agreed
// on) is checked against the group afterwards.
#ifndef DN_SERVER_HELLO_VALIDATION_H_
#define DN_SERVER_HELLO_VALIDATION_H_

#include "absl/status/status.h"
#include "denoised/v1/worker.pb.h"

namespace dn::server {

// INVALID_ARGUMENT naming the first field out of bounds; OK otherwise.
absl::Status ValidateHello(const ::denoised::v1::internal::Hello& hello);

}  // namespace dn::server

#endif  // DN_SERVER_HELLO_VALIDATION_H_
