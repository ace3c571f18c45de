#include "server/credentials.h"

#include <fstream>
#include <iterator>

#include "absl/strings/str_cat.h"
#include "base/flags.h"
#include "base/status_macros.h"

namespace dn::server {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path,
                                    const std::string& flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, ": cannot read ", path));
  }
  std::string pem((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (pem.find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, ": ", path, " is not a PEM file"));
  }
  return pem;
}

}  // namespace

void AddTlsFlags(FlagSet& flags, const std::string& prefix, TlsFiles* files,
                 const std::string& what) {
  flags.String(prefix + "tls-cert", &files->cert,
               absl::StrCat(what, ": PEM certificate chain"));
  flags.String(prefix + "tls-key", &files->key,
               absl::StrCat(what, ": PEM private key"));
  flags.String(prefix + "tls-ca", &files->ca,
               absl::StrCat(what, ": PEM CA bundle that verifies the peer"));
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsFiles& files, bool require_client_cert, const std::string& prefix) {
  if (!files.enabled()) return grpc::InsecureServerCredentials();
  if (files.cert.empty() || files.key.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--", prefix, "tls-cert and --", prefix, "tls-key go together"));
  }
  if (require_client_cert && files.ca.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--", prefix, "tls-ca: required to verify client certificates"));
  }
  grpc::SslServerCredentialsOptions opts(
      require_client_cert
          ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
          : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  DN_ASSIGN_OR_RETURN(pair.cert_chain, ReadPem(files.cert, prefix + "tls-cert"));
  DN_ASSIGN_OR_RETURN(pair.private_key, ReadPem(files.key, prefix + "tls-key"));
  opts.pem_key_cert_pairs.push_back(std::move(pair));
  if (!files.ca.empty()) {
    DN_ASSIGN_OR_RETURN(opts.pem_root_certs, ReadPem(files.ca, prefix + "tls-ca"));
  }
  return grpc::SslServerCredentials(opts);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const TlsFiles& files, const std::string& prefix) {
  if (!files.enabled()) return grpc::InsecureChannelCredentials();
  if (files.cert.empty() != files.key.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--", prefix, "tls-cert and --", prefix, "tls-key go together"));
  }
  grpc::SslCredentialsOptions opts;
  if (!files.ca.empty()) {
    DN_ASSIGN_OR_RETURN(opts.pem_root_certs, ReadPem(files.ca, prefix + "tls-ca"));
  }
  if (!files.cert.empty()) {
    DN_ASSIGN_OR_RETURN(opts.pem_cert_chain, ReadPem(files.cert, prefix + "tls-cert"));
    DN_ASSIGN_OR_RETURN(opts.pem_private_key, ReadPem(files.key, prefix + "tls-key"));
  }
  return grpc::SslCredentials(opts);
}

}  // namespace dn::server
