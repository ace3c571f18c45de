#include "server/metadata_gate.h"

#include <string_view>
#include <utility>

#include "grpc/grpc_security.h"
#include "grpcpp/security/auth_metadata_processor.h"

namespace dn::server {
namespace {

struct Checker {
  std::shared_ptr<const ClientGate> gate;
  std::string gated_prefix;
  RefusedCallback on_refused;

  // `path` and `authorization` are null when the metadata lacks them.
  grpc::Status Check(const std::string_view* path,
                     const std::string_view* authorization) const {
    // A call without a path is not routed to any service; let gRPC refuse it.
    if (path == nullptr || path->substr(0, gated_prefix.size()) != gated_prefix) {
      return grpc::Status::OK;
    }
    grpc::Status s = gate->CheckAuthorization(authorization, nullptr);
    if (!s.ok() && on_refused) on_refused(*path);
    return s;
  }
};

std::string_view View(const grpc_slice& s) {
  return std::string_view(reinterpret_cast<const char*>(GRPC_SLICE_START_PTR(s)),
                          GRPC_SLICE_LENGTH(s));
}

// The core processor of a plaintext port: answers inline (a few string
// comparisons), on the transport's thread.
void ProcessCore(void* state, grpc_auth_context*, const grpc_metadata* md,
                 size_t num_md, grpc_process_auth_metadata_done_cb cb,
                 void* user_data) {
  const auto* checker = static_cast<const Checker*>(state);
  std::string_view path, authorization;
  bool has_path = false, has_authorization = false;
  for (size_t i = 0; i < num_md; ++i) {
    const std::string_view key = View(md[i].key);
    if (key == ":path") {
      path = View(md[i].value);
      has_path = true;
    } else if (key == "authorization") {
      authorization = View(md[i].value);
      has_authorization = true;
    }
  }
  const grpc::Status s = checker->Check(has_path ? &path : nullptr,
                                        has_authorization ? &authorization : nullptr);
  cb(user_data, nullptr, 0, nullptr, 0,
     static_cast<grpc_status_code>(s.error_code()),
     s.ok() ? nullptr : s.error_message().c_str());
}

void DestroyCore(void* state) { delete static_cast<Checker*>(state); }

// A plaintext port with a core auth metadata processor.
class GatedInsecureCredentials final : public grpc::ServerCredentials {
 public:
  explicit GatedInsecureCredentials(Checker checker)
      : creds_(grpc_insecure_server_credentials_create()) {
    grpc_server_credentials_set_auth_metadata_processor(
        creds_, grpc_auth_metadata_processor{ProcessCore, DestroyCore,
                                             new Checker(std::move(checker))});
  }
  ~GatedInsecureCredentials() override { grpc_server_credentials_release(creds_); }
  GatedInsecureCredentials(const GatedInsecureCredentials&) = delete;
  GatedInsecureCredentials& operator=(const GatedInsecureCredentials&) = delete;

  void SetAuthMetadataProcessor(
      const std::shared_ptr<grpc::AuthMetadataProcessor>&) override {
    // The processor is fixed at construction; nothing calls this.
  }

 private:
  int AddPortToServer(const std::string& addr, grpc_server* server) override {
    return grpc_server_add_http2_port(server, addr.c_str(), creds_);
  }

  grpc_server_credentials* creds_;
};

// The processor of a TLS port.
class TlsProcessor final : public grpc::AuthMetadataProcessor {
 public:
  explicit TlsProcessor(Checker checker) : checker_(std::move(checker)) {}
  bool IsBlocking() const override { return false; }
  grpc::Status Process(const InputMetadata& md, grpc::AuthContext*, OutputMetadata*,
                       OutputMetadata*) override {
    std::string_view path, authorization;
    auto p = md.find(":path");
    if (p != md.end()) path = std::string_view(p->second.data(), p->second.size());
    auto a = md.find("authorization");
    if (a != md.end()) {
      authorization = std::string_view(a->second.data(), a->second.size());
    }
    return checker_.Check(p != md.end() ? &path : nullptr,
                          a != md.end() ? &authorization : nullptr);
  }

 private:
  Checker checker_;
};

}  // namespace

std::shared_ptr<grpc::ServerCredentials> GateByMetadata(
    std::shared_ptr<grpc::ServerCredentials> tls,
    std::shared_ptr<const ClientGate> gate, std::string gated_prefix,
    RefusedCallback on_refused) {
  if (!gate->auth_enabled()) {
    return tls != nullptr ? tls : grpc::InsecureServerCredentials();
  }
  Checker checker{std::move(gate), std::move(gated_prefix), std::move(on_refused)};
  if (tls == nullptr) {
    return std::make_shared<GatedInsecureCredentials>(std::move(checker));
  }
  tls->SetAuthMetadataProcessor(std::make_shared<TlsProcessor>(std::move(checker)));
  return tls;
}

}  // namespace dn::server
