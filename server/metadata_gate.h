// File: server/metadata_gate.h
//
// Bearer tokens checked on a call's metadata, before its body is read. gRPC
// core reads a unary or server-streaming request's whole message before the
// C++ handler (or an interceptor) sees the call, so a token check in the
// handler comes after a 200 MiB upload. An auth metadata processor on the
// server credentials runs in the server auth filter instead, as soon as the
// call's initial metadata arrives: a refused call ends there with
// UNAUTHENTICATED and its stream is reset, its body never buffered.
//
// gRPC 1.51's C++ InsecureServerCredentials() aborts on
// SetAuthMetadataProcessor, so a plaintext port is served through the core's
// grpc_insecure_server_credentials_create(), which takes a processor. A TLS
// port takes a (non-blocking) grpc::AuthMetadataProcessor.
//
// Only calls whose path starts with `gated_prefix` are checked: Health,
// reflection and WorkerControl (which has its own secret) pass.
#ifndef DN_SERVER_METADATA_GATE_H_
#define DN_SERVER_METADATA_GATE_H_

#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "grpcpp/grpcpp.h"
#include "server/auth.h"

namespace dn::server {

// The path prefix of the public Denoiser service's methods.
inline constexpr char kDenoiserPathPrefix[] = "/denoised.v1.Denoiser/";

// Called, on a gRPC thread, with the path of each call the gate refuses.
using RefusedCallback = std::function<void(std::string_view path)>;

// Server credentials for a port whose calls under `gated_prefix` must carry
// one of `gate`'s tokens. `tls` is the port's TLS credentials, or null for
// plaintext. With authentication off in `gate`, returns `tls` (or
// grpc::InsecureServerCredentials()) unchanged.
std::shared_ptr<grpc::ServerCredentials> GateByMetadata(
    std::shared_ptr<grpc::ServerCredentials> tls,
    std::shared_ptr<const ClientGate> gate, std::string gated_prefix,
    RefusedCallback on_refused);

}  // namespace dn::server

#endif  // DN_SERVER_METADATA_GATE_H_
