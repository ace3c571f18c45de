// File: server/auth.h
//
// Client admission for the public Denoiser service: optional bearer tokens
// (`authorization: Bearer <token>` metadata, tokens read from a file, one per
// line) and a per-client limit of concurrent Generate/GenerateUnary calls.
// Health and reflection are not gated. See docs/SECURITY.md.
#ifndef DN_SERVER_AUTH_H_
#define DN_SERVER_AUTH_H_

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"

namespace dn::server {

// Reads bearer tokens: one per line, surrounding whitespace trimmed, blank
// lines and lines starting with '#' ignored. Errors name `flag` and the file;
// a file without any token is an error.
absl::StatusOr<std::vector<std::string>> ReadTokenFile(const std::string& path,
                                                       const std::string& flag);

// Adds `authorization: Bearer <token>` to `ctx` when `token` is non-empty.
void AddBearerToken(grpc::ClientContext& ctx, const std::string& token);

// Decides whether a call of the Denoiser service may proceed. Thread-safe.
class ClientGate {
 public:
  // Empty `tokens`: no authentication. `max_streams_per_client` <= 0: no limit.
  ClientGate(std::vector<std::string> tokens, int max_streams_per_client);

  // A held Generate slot; releasing it (destroying the handle) frees it.
  using Slot = std::shared_ptr<void>;

  // UNAUTHENTICATED unless `authorization` (the metadata's value, null when
  // absent) is "Bearer <one of the tokens>" (constant-time comparison); on
  // success `*index` (if not null) is the token's index. Authentication must
  // be on. Used by Authenticate and, before the body, by server/metadata_gate.h.
  grpc::Status CheckAuthorization(const std::string_view* authorization,
                                  int* index) const;
  // UNAUTHENTICATED unless the call carries one of the tokens (constant-time
  // comparison). On success `*client` is the key the stream limit counts by:
  // "token:<index>" when authentication is on, else the peer's address
  // without its port.
  grpc::Status Authenticate(const grpc::ServerContextBase& ctx,
                            std::string* client) const;
  // Authenticate and, for a generation call, take one of the client's slots:
  // RESOURCE_EXHAUSTED when it already holds max_streams_per_client.
  grpc::Status Admit(const grpc::ServerContextBase& ctx, bool generation,
                     Slot* slot);

  bool auth_enabled() const { return !tokens_.empty(); }
  int max_streams_per_client() const { return max_streams_; }

 private:
  const std::vector<std::string> tokens_;
  const int max_streams_;
  std::shared_ptr<std::mutex> mu_ = std::make_shared<std::mutex>();
  // Held slots per client key; shared with the Slot deleters.
  std::shared_ptr<std::map<std::string, int>> held_ =
      std::make_shared<std::map<std::string, int>>();
};

// "ipv4:127.0.0.1:4242" -> "ipv4:127.0.0.1"; "ipv6:[::1]:4242" -> "ipv6:[::1]".
std::string PeerHost(const std::string& peer);

// A server-streaming reactor that only finishes with `status` (a rejected
// call). Deletes itself when done.
template <typename T>
class RejectedWriteReactor final : public grpc::ServerWriteReactor<T> {
 public:
  explicit RejectedWriteReactor(const grpc::Status& status) { this->Finish(status); }
  void OnDone() override { delete this; }
};

}  // namespace dn::server

#endif  // DN_SERVER_AUTH_H_
