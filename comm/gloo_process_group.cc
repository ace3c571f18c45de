// GlooProcessGroup: ProcessGroup over Gloo TCP. See comm/gloo_process_group.h.
#include "comm/gloo_process_group.h"

#include <dirent.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "base/log.h"
#include "gloo/allgather.h"
#include "gloo/allreduce.h"
#include "gloo/alltoall.h"
#include "gloo/barrier.h"
#include "gloo/broadcast.h"
#include "gloo/common/error.h"
#include "gloo/common/logging.h"
#include "gloo/context.h"
#include "gloo/math.h"
#include "gloo/rendezvous/context.h"
#include "gloo/rendezvous/store.h"
#include "gloo/transport/tcp/device.h"
#include "gloo/transport/tcp/address.h"
#include "gloo/transport/unbound_buffer.h"

namespace dn::comm {
namespace {

using Clock = std::chrono::steady_clock;

// Our Store seen as a gloo::rendezvous::Store: keys get the group prefix, and
// every wait is bounded by the rendezvous deadline (whatever timeout Gloo
// passes). Failures are thrown as gloo::IoException (Gloo's own error type,
// caught in Create) and the precise Status is kept for the caller.
class StoreAdapter : public gloo::rendezvous::Store {
 public:
  StoreAdapter(comm::Store& store, std::string prefix, Clock::time_point deadline)
      : store_(store), prefix_(std::move(prefix)), deadline_(deadline) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    absl::Status st = store_.Set(Key(key), data);
    if (!st.ok()) Throw(std::move(st));
  }

  std::vector<char> get(const std::string& key) override {
    auto it = cache_.find(key);
    if (it != cache_.end()) return it->second;
    absl::StatusOr<std::vector<char>> value = store_.Get(Key(key), Remaining());
    if (!value.ok()) Throw(value.status());
    cache_[key] = *value;
    return *std::move(value);
  }

  void wait(const std::vector<std::string>& keys) override {
    for (const std::string& key : keys) get(key);
  }

  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& /*timeout*/) override {
    wait(keys);
  }

  const absl::Status& error() const { return error_; }

 private:
  std::string Key(const std::string& key) const {
    return absl::StrCat(prefix_, "/", key);
  }
  std::chrono::milliseconds Remaining() const {
    return std::max(std::chrono::milliseconds(0),
                    std::chrono::duration_cast<std::chrono::milliseconds>(
                        deadline_ - Clock::now()));
  }
  [[noreturn]] void Throw(absl::Status st) {
    error_ = std::move(st);
    throw gloo::IoException(std::string(error_.message()));
  }

  comm::Store& store_;
  const std::string prefix_;
  const Clock::time_point deadline_;
  std::map<std::string, std::vector<char>> cache_;
  absl::Status error_;
};

bool SameEndpoint(const sockaddr_storage& a, const sockaddr_storage& b) {
  if (a.ss_family != b.ss_family) return false;
  if (a.ss_family == AF_INET) {
    const auto& x = reinterpret_cast<const sockaddr_in&>(a);
    const auto& y = reinterpret_cast<const sockaddr_in&>(b);
    return x.sin_port == y.sin_port &&
           x.sin_addr.s_addr == y.sin_addr.s_addr;
  }
  if (a.ss_family == AF_INET6) {
    const auto& x = reinterpret_cast<const sockaddr_in6&>(a);
    const auto& y = reinterpret_cast<const sockaddr_in6&>(b);
    return x.sin6_port == y.sin6_port &&
           std::memcmp(&x.sin6_addr, &y.sin6_addr, sizeof(x.sin6_addr)) == 0;
  }
  return false;
}

bool LooksLikeTimeout(const std::string& what) {
  std::string lower(what);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return std::tolower(c); });
  return lower.find("timed out") != std::string::npos ||
         lower.find("timeout") != std::string::npos;
}

void IgnoreSigpipe() {
  struct sigaction old {};
  if (sigaction(SIGPIPE, nullptr, &old) == 0 && old.sa_handler == SIG_DFL) {
    struct sigaction ign {};
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    sigaction(SIGPIPE, &ign, nullptr);
  }
}

template <typename T>
void SetReduce(gloo::AllreduceOptions& o,
               std::unique_ptr<gloo::transport::UnboundBuffer> buf,
               ReduceOp op) {
  using Fn = void (*)(void*, const void*, const void*, size_t);
  o.setOutput<T>(std::move(buf));
  o.setReduceFunction(op == ReduceOp::kSum ? static_cast<Fn>(&gloo::sum<T>)
                                           : static_cast<Fn>(&gloo::max<T>));
}

size_t ElementSize(ReduceType type) {
  switch (type) {
    case ReduceType::kF32:
      return sizeof(float);
    case ReduceType::kF64:
      return sizeof(double);
    case ReduceType::kI64:
      return sizeof(int64_t);
  }
  return 1;
}

}  // namespace

absl::StatusOr<std::unique_ptr<GlooProcessGroup>> GlooProcessGroup::Create(
    Store& store, const GlooOptions& options) {
  if (options.size < 1)
    return absl::InvalidArgumentError(
        absl::StrCat("gloo group: size must be >= 1, got ", options.size));
  if (options.rank < 0 || options.rank >= options.size)
    return absl::InvalidArgumentError(absl::StrCat(
        "gloo group: rank ", options.rank, " outside [0, ", options.size, ")"));
  if (options.timeout.count() <= 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "gloo group: timeout must be positive, got ", options.timeout.count(),
        " ms"));
  IgnoreSigpipe();

  const auto deadline = Clock::now() + options.timeout;
  StoreAdapter adapter(store, options.prefix, deadline);
  const std::string where =
      absl::StrCat("gloo group '", options.prefix, "' rank ", options.rank,
                   "/", options.size, ": rendezvous: ");
  try {
    gloo::transport::tcp::attr attr;
    attr.hostname = options.hostname;
    std::shared_ptr<gloo::transport::Device> device =
        gloo::transport::tcp::CreateDevice(attr);
    auto context = std::make_shared<gloo::rendezvous::Context>(options.rank,
                                                               options.size);
    // A pair waits up to 5x the context timeout for its connection; keep
    // that within the group timeout.
    context->setTimeout(std::max(std::chrono::milliseconds(1),
                                 options.timeout / 5));
    context->connectFullMesh(adapter, device);
    context->setTimeout(options.timeout);

    // Learn both ends of every connection (this side from the pair, the
    // other side from the peer) so that Abort() can find the sockets.
    const size_t n = static_cast<size_t>(options.size);
    std::vector<sockaddr_storage> mine(n), all(n * n);  // zeroed
    for (int j = 0; j < options.size; ++j) {
      if (j == options.rank) continue;
      const auto* address = dynamic_cast<const gloo::transport::tcp::Address*>(
          &context->getPair(j)->address());
      if (address != nullptr) mine[j] = address->getSockaddr();
    }
    if (options.size > 1) {
      gloo::AllgatherOptions o(context);
      o.setInput(reinterpret_cast<uint8_t*>(mine.data()),
                 n * sizeof(sockaddr_storage));
      o.setOutput(reinterpret_cast<uint8_t*>(all.data()),
                  n * n * sizeof(sockaddr_storage));
      o.setTag(0);
      // Everyone has joined; this exchange gets a full timeout of its own.
      o.setTimeout(options.timeout);
      gloo::allgather(o);
    }
    std::vector<PeerSocket> sockets;
    for (int j = 0; j < options.size; ++j) {
      if (j == options.rank) continue;
      sockets.push_back(PeerSocket{j, mine[j],
                                   all[static_cast<size_t>(j) * n +
                                       static_cast<size_t>(options.rank)]});
    }
    std::unique_ptr<GlooProcessGroup> group(
        new GlooProcessGroup(options, std::move(device), std::move(context)));
    group->peer_sockets_ = std::move(sockets);
    const size_t found = group->FindPeerSockets().size();
    if (found != group->peer_sockets_.size()) {
      DN_LOG(WARNING) << where << "found " << found << " of "
                      << group->peer_sockets_.size()
                      << " peer sockets; Abort() falls back to per-call "
                         "timeouts for the rest";
    }
    return group;
  } catch (const gloo::IoException& e) {
    if (!adapter.error().ok())
      return absl::Status(adapter.error().code(),
                          absl::StrCat(where, adapter.error().message()));
    if (LooksLikeTimeout(e.what()))
      return absl::DeadlineExceededError(absl::StrCat(where, e.what()));
    return absl::UnavailableError(absl::StrCat(where, e.what()));
  } catch (const gloo::EnforceNotMet& e) {
    return absl::UnavailableError(absl::StrCat(where, e.what()));
  } catch (const std::exception& e) {
    if (LooksLikeTimeout(e.what()))
      return absl::DeadlineExceededError(absl::StrCat(where, e.what()));
    return absl::UnavailableError(absl::StrCat(where, e.what()));
  }
}

GlooProcessGroup::GlooProcessGroup(
    const GlooOptions& options,
    std::shared_ptr<gloo::transport::Device> device,
    std::shared_ptr<gloo::Context> context)
    : options_(options),
      device_(std::move(device)),
      context_(std::move(context)) {}

GlooProcessGroup::~GlooProcessGroup() {
  {
    std::lock_guard<std::mutex> lock(active_mu_);
    stopping_ = true;
  }
  if (waker_.joinable()) waker_.join();
  // Pairs (owned by the context) unregister from the device's loop, so the
  // context goes first.
  context_.reset();
  device_.reset();
}

void GlooProcessGroup::Track(
    std::vector<gloo::transport::UnboundBuffer*> buffers) {
  std::lock_guard<std::mutex> lock(active_mu_);
  if (aborted_) throw std::runtime_error("Abort() was called");
  active_ = std::move(buffers);
}

void GlooProcessGroup::Untrack() {
  std::lock_guard<std::mutex> lock(active_mu_);
  active_.clear();
}

void GlooProcessGroup::StartWaker() {
  if (waker_started_.exchange(true)) return;
  waker_ = std::thread([this] {
    // A Gloo wait returns early (and Gloo's algorithm moves on to its next
    // wait) each time it is interrupted, so keep interrupting until the
    // running call is gone. No call starts after Abort() (see Track).
    for (;;) {
      {
        std::lock_guard<std::mutex> lock(active_mu_);
        if (stopping_ || active_.empty()) return;
        for (gloo::transport::UnboundBuffer* b : active_) {
          b->abortWaitSend();
          b->abortWaitRecv();
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  });
}

std::vector<int> GlooProcessGroup::FindPeerSockets() const {
  std::vector<int> fds;
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return fds;
  while (dirent* entry = ::readdir(dir)) {
    char* end = nullptr;
    const long fd = std::strtol(entry->d_name, &end, 10);
    if (end == entry->d_name || *end != '\0' || fd == ::dirfd(dir)) continue;
    sockaddr_storage local{}, remote{};
    socklen_t local_len = sizeof(local), remote_len = sizeof(remote);
    if (::getsockname(static_cast<int>(fd),
                      reinterpret_cast<sockaddr*>(&local), &local_len) != 0 ||
        ::getpeername(static_cast<int>(fd),
                      reinterpret_cast<sockaddr*>(&remote), &remote_len) != 0)
      continue;
    for (const PeerSocket& s : peer_sockets_) {
      if (SameEndpoint(local, s.local) && SameEndpoint(remote, s.remote)) {
        fds.push_back(static_cast<int>(fd));
        break;
      }
    }
  }
  ::closedir(dir);
  return fds;
}

void GlooProcessGroup::ShutdownSockets() {
  // Gloo's device loop then reads EOF on each socket and fails every pending
  // operation of its pair ("Connection closed by peer"); the peer reads EOF
  // too. The sockets stay open (Gloo closes them), so no descriptor is
  // closed behind Gloo's back.
  for (int fd : FindPeerSockets()) ::shutdown(fd, SHUT_RDWR);
}

absl::Status GlooProcessGroup::Fail(absl::Status status) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (first_error_.ok()) first_error_ = status;
  }
  broken_ = true;
  ShutdownSockets();
  return status;
}

void GlooProcessGroup::Abort() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (first_error_.ok())
      first_error_ = absl::AbortedError("Abort() was called");
  }
  {
    std::lock_guard<std::mutex> lock(active_mu_);
    aborted_ = true;
  }
  broken_ = true;
  ShutdownSockets();
  StartWaker();
}

template <typename Fn>
absl::Status GlooProcessGroup::Run(const char* op, Fn&& fn) {
  const std::string where =
      absl::StrCat("gloo ", op, " (group '", options_.prefix, "' rank ",
                   options_.rank, "/", options_.size, "): ");
  if (broken_) {
    std::lock_guard<std::mutex> lock(mu_);
    return absl::AbortedError(
        absl::StrCat(where, "group is unusable after an earlier failure: ",
                     first_error_.message()));
  }
  const uint32_t tag = next_tag_++;
  std::string what;
  bool io = false;
  try {
    fn(tag);
    // An interrupted wait returns normally; the data is not complete then.
    if (!aborted_) return absl::OkStatus();
    what = "Abort() was called during the call";
  } catch (const gloo::IoException& e) {
    what = e.what();
    io = true;
  } catch (const gloo::EnforceNotMet& e) {
    what = e.what();
  } catch (const std::exception& e) {
    what = e.what();
  }
  if (aborted_)
    return Fail(absl::AbortedError(absl::StrCat(where, "aborted: ", what)));
  if (LooksLikeTimeout(what))
    return Fail(absl::DeadlineExceededError(absl::StrCat(
        where, "no answer within ", options_.timeout.count(), " ms: ", what)));
  if (io) return Fail(absl::UnavailableError(absl::StrCat(where, what)));
  return Fail(absl::AbortedError(absl::StrCat(where, what)));
}

absl::Status GlooProcessGroup::AllToAll(const void* send, void* recv,
                                        size_t bytes_per_peer) {
  if (bytes_per_peer > 0 && (send == nullptr || recv == nullptr))
    return absl::InvalidArgumentError("gloo AllToAll: null buffer");
  const size_t total = bytes_per_peer * static_cast<size_t>(size());
  return Run("AllToAll", [&](uint32_t tag) {
    if (total == 0) return;
    gloo::AlltoallOptions o(context_);
    auto in = context_->createUnboundBuffer(const_cast<void*>(send), total);
    auto out = context_->createUnboundBuffer(recv, total);
    Track({in.get(), out.get()});
    absl::Cleanup untrack = [this] { Untrack(); };
    o.setInput<uint8_t>(std::move(in));
    o.setOutput<uint8_t>(std::move(out));
    o.setTag(tag);
    o.setTimeout(options_.timeout);
    gloo::alltoall(o);
  });
}

absl::Status GlooProcessGroup::AllGather(const void* send, void* recv,
                                         size_t bytes_per_rank) {
  if (bytes_per_rank > 0 && (send == nullptr || recv == nullptr))
    return absl::InvalidArgumentError("gloo AllGather: null buffer");
  return Run("AllGather", [&](uint32_t tag) {
    if (bytes_per_rank == 0) return;
    gloo::AllgatherOptions o(context_);
    auto in = context_->createUnboundBuffer(const_cast<void*>(send),
                                            bytes_per_rank);
    auto out = context_->createUnboundBuffer(
        recv, bytes_per_rank * static_cast<size_t>(size()));
    Track({in.get(), out.get()});
    absl::Cleanup untrack = [this] { Untrack(); };
    o.setInput<uint8_t>(std::move(in));
    o.setOutput<uint8_t>(std::move(out));
    o.setTag(tag);
    o.setTimeout(options_.timeout);
    gloo::allgather(o);
  });
}

absl::Status GlooProcessGroup::Broadcast(void* buf, size_t bytes, int root) {
  if (root < 0 || root >= size())
    return absl::InvalidArgumentError(absl::StrCat(
        "gloo Broadcast: root ", root, " outside [0, ", size(), ")"));
  if (bytes > 0 && buf == nullptr)
    return absl::InvalidArgumentError("gloo Broadcast: null buffer");
  return Run("Broadcast", [&](uint32_t tag) {
    if (bytes == 0) return;
    gloo::BroadcastOptions o(context_);
    auto out = context_->createUnboundBuffer(buf, bytes);
    Track({out.get()});
    absl::Cleanup untrack = [this] { Untrack(); };
    o.setOutput<uint8_t>(std::move(out));
    o.setRoot(root);
    o.setTag(tag);
    o.setTimeout(options_.timeout);
    gloo::broadcast(o);
  });
}

absl::Status GlooProcessGroup::AllReduce(void* buf, size_t count,
                                         ReduceType type, ReduceOp op) {
  if (count > 0 && buf == nullptr)
    return absl::InvalidArgumentError("gloo AllReduce: null buffer");
  return Run("AllReduce", [&](uint32_t tag) {
    if (count == 0) return;
    gloo::AllreduceOptions o(context_);
    auto out = context_->createUnboundBuffer(buf, count * ElementSize(type));
    Track({out.get()});
    absl::Cleanup untrack = [this] { Untrack(); };
    switch (type) {
      case ReduceType::kF32:
        SetReduce<float>(o, std::move(out), op);
        break;
      case ReduceType::kF64:
        SetReduce<double>(o, std::move(out), op);
        break;
      case ReduceType::kI64:
        SetReduce<int64_t>(o, std::move(out), op);
        break;
    }
    o.setTag(tag);
    o.setTimeout(options_.timeout);
    gloo::allreduce(o);
  });
}

absl::Status GlooProcessGroup::Barrier() {
  return Run("Barrier", [&](uint32_t tag) {
    // Gloo's barrier keeps its (tiny) buffer private; its messages are never
    // left half-written, so the socket shutdown of Abort() is enough here.
    Track({});
    gloo::BarrierOptions o(context_);
    o.setTag(tag);
    o.setTimeout(options_.timeout);
    gloo::barrier(o);
  });
}

absl::StatusOr<std::unique_ptr<ProcessGroup>> MakeGlooProcessGroup(
    Store& store, const GlooOptions& options) {
  absl::StatusOr<std::unique_ptr<GlooProcessGroup>> group =
      GlooProcessGroup::Create(store, options);
  if (!group.ok()) return group.status();
  return std::unique_ptr<ProcessGroup>(*std::move(group));
}

}  // namespace dn::comm
