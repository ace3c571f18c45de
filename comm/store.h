// File: comm/store.h
//
// A key-value rendezvous store used to form process groups. Implementations:
// FileStore (a shared folder; tests and `denoised run`) and the coordinator's
// store (server/, over the internal gRPC protocol).
#ifndef DN_COMM_STORE_H_
#define DN_COMM_STORE_H_

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace dn::comm {

class Store {
 public:
  virtual ~Store() = default;
  // Sets `key` to `value`. Keys are written once per rendezvous.
  virtual absl::Status Set(const std::string& key,
                           const std::vector<char>& value) = 0;
  // Waits up to `timeout` for `key` to exist and returns its value;
  // DEADLINE_EXCEEDED names the key when it does not appear in time.
  virtual absl::StatusOr<std::vector<char>> Get(
      const std::string& key, std::chrono::milliseconds timeout) = 0;
};

// A store in a folder shared by all ranks (one file per key, written
// atomically by rename).
absl::StatusOr<std::unique_ptr<Store>> MakeFileStore(const std::string& dir);

}  // namespace dn::comm

#endif  // DN_COMM_STORE_H_
