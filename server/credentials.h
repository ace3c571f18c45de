// File: server/credentials.h
//
// TLS for the gRPC ports: server credentials for the coordinator's public
// port (TLS) and worker port (mutual TLS, client certificates required and
// verified against a CA), and channel credentials for the CLI client and the
// ranks. Empty files mean plaintext. PEM files are read once, at start-up.
// See docs/SECURITY.md.
#ifndef DN_SERVER_CREDENTIALS_H_
#define DN_SERVER_CREDENTIALS_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"

namespace dn {
class FlagSet;
}  // namespace dn

namespace dn::server {

// PEM file paths; all empty = plaintext.
struct TlsFiles {
  std::string cert;  // our certificate chain
  std::string key;   // its private key
  std::string ca;    // CA bundle that verifies the peer
  bool enabled() const { return !cert.empty() || !key.empty() || !ca.empty(); }
};

// Registers --<prefix>tls-cert, --<prefix>tls-key, --<prefix>tls-ca.
void AddTlsFlags(FlagSet& flags, const std::string& prefix, TlsFiles* files,
                 const std::string& what);

// Server side. Plaintext when `files` is empty. Otherwise cert and key are
// required; with `require_client_cert` the CA is required too and clients
// must present a certificate it signed (mutual TLS). `prefix` names the flags
// in errors.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsFiles& files, bool require_client_cert, const std::string& prefix);

// Client side. Plaintext when `files` is empty. Otherwise TLS, verifying the
// server against `ca` (the system roots when empty), presenting cert/key as a
// client certificate when both are given.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const TlsFiles& files, const std::string& prefix);

}  // namespace dn::server

#endif  // DN_SERVER_CREDENTIALS_H_
