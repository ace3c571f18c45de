// File: server/grpc_store.h
//
// GrpcStore: the comm::Store of worker-group ranks, backed by the
// coordinator's WorkerControl.StoreSet/StoreGet (the rendezvous of the Gloo
// groups, and of the NCCL unique id). Keys must lie under the store prefix
// the coordinator sent in Welcome (group + generation); the coordinator drops
// them when that generation ends.
#ifndef DN_SERVER_GRPC_STORE_H_
#define DN_SERVER_GRPC_STORE_H_

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/store.h"

namespace grpc {
class Channel;
}  // namespace grpc

namespace dn::server {

class GrpcStore : public comm::Store {
 public:
  GrpcStore(std::shared_ptr<grpc::Channel> channel, std::string secret);
  ~GrpcStore() override;

  absl::Status Set(const std::string& key,
                   const std::vector<char>& value) override;
  // Long-polls the coordinator (server-side waits of up to 5 s per call)
  // until the key appears or `timeout` passes (DEADLINE_EXCEEDED naming the
  // key). Transient UNAVAILABLE errors are retried within the timeout.
  absl::StatusOr<std::vector<char>> Get(
      const std::string& key, std::chrono::milliseconds timeout) override;

 private:
  struct Stub;
  std::unique_ptr<Stub> stub_;
  std::string secret_;
};

}  // namespace dn::server

#endif  // DN_SERVER_GRPC_STORE_H_
