#include "server/auth.h"

#include <fstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace dn::server {
namespace {

constexpr char kBearerPrefix[] = "Bearer ";

// Constant-time for equal lengths, so a token cannot be guessed byte by byte.
bool SameToken(const std::string& a, std::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  }
  return diff == 0;
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ReadTokenFile(const std::string& path,
                                                       const std::string& flag) {
  std::ifstream in(path);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, ": cannot read ", path));
  }
  std::vector<std::string> tokens;
  for (std::string line; std::getline(in, line);) {
    const std::string t(absl::StripAsciiWhitespace(line));
    if (t.empty() || t[0] == '#') continue;
    for (char c : t) {
      if (c < 0x21 || c > 0x7e) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--", flag, ": a token in ", path,
            " has whitespace or a non-printable character"));
      }
    }
    tokens.push_back(t);
  }
  if (tokens.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, ": no token in ", path));
  }
  return tokens;
}

void AddBearerToken(grpc::ClientContext& ctx, const std::string& token) {
  if (!token.empty()) ctx.AddMetadata("authorization", kBearerPrefix + token);
}

std::string PeerHost(const std::string& peer) {
  const size_t colon = peer.rfind(':');
  const size_t first = peer.find(':');
  if (colon == std::string::npos || colon == first) return peer;
  return peer.substr(0, colon);
}

ClientGate::ClientGate(std::vector<std::string> tokens, int max_streams_per_client)
    : tokens_(std::move(tokens)), max_streams_(max_streams_per_client) {}

grpc::Status ClientGate::CheckAuthorization(const std::string_view* authorization,
                                            int* index) const {
  if (authorization == nullptr) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "missing 'authorization: Bearer <token>' metadata");
  }
  const std::string_view value = *authorization;
  if (value.substr(0, sizeof(kBearerPrefix) - 1) != kBearerPrefix) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "authorization metadata is not 'Bearer <token>'");
  }
  const std::string_view given = value.substr(sizeof(kBearerPrefix) - 1);
  int match = -1;
  for (size_t i = 0; i < tokens_.size(); ++i) {
    // No early exit: every token is compared.
    if (SameToken(tokens_[i], given) && match < 0) match = static_cast<int>(i);
  }
  if (match < 0) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "unknown bearer token");
  }
  if (index != nullptr) *index = match;
  return grpc::Status::OK;
}

grpc::Status ClientGate::Authenticate(const grpc::ServerContextBase& ctx,
                                      std::string* client) const {
  if (tokens_.empty()) {
    *client = PeerHost(ctx.peer());
    return grpc::Status::OK;
  }
  const auto& md = ctx.client_metadata();
  auto it = md.find("authorization");
  std::string_view value;
  if (it != md.end()) value = std::string_view(it->second.data(), it->second.size());
  int match = -1;
  grpc::Status s = CheckAuthorization(it != md.end() ? &value : nullptr, &match);
  if (!s.ok()) return s;
  *client = absl::StrCat("token:", match);
  return grpc::Status::OK;
}

grpc::Status ClientGate::Admit(const grpc::ServerContextBase& ctx, bool generation,
                               Slot* slot) {
  std::string client;
  if (grpc::Status s = Authenticate(ctx, &client); !s.ok()) return s;
  if (!generation || max_streams_ <= 0) return grpc::Status::OK;
  std::lock_guard<std::mutex> lock(*mu_);
  int& held = (*held_)[client];
  if (held >= max_streams_) {
    if (held == 0) held_->erase(client);
    return grpc::Status(
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        absl::StrCat("client ", client, " already has ", max_streams_,
                     " generation calls in flight (--max-streams-per-client)"));
  }
  ++held;
  // The deleter keeps the map alive on its own, so a slot may outlive the gate.
  auto mu = mu_;
  auto map = held_;
  *slot = Slot(static_cast<void*>(nullptr), [mu, map, client](void*) {
    std::lock_guard<std::mutex> l(*mu);
    auto it = map->find(client);
    if (it != map->end() && --it->second <= 0) map->erase(it);
  });
  return grpc::Status::OK;
}

}  // namespace dn::server
