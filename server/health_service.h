// File: server/health_service.h
//
// grpc.health.v1.Health with the callback API, for the coordinator's public
// port. The overall status ("") and "denoised.v1.Denoiser" follow the
// coordinator: SERVING while at least one worker group is READY or BUSY
// (CoordinatorCore reports it through SetServing). Watch streams get every
// change.
#ifndef DN_SERVER_HEALTH_SERVICE_H_
#define DN_SERVER_HEALTH_SERVICE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "server/stream_writer.h"

namespace dn::server {

inline constexpr char kDenoiserServiceName[] = "denoised.v1.Denoiser";

class HealthService final : public ::grpc::health::v1::Health::CallbackService {
 public:
  HealthService() {
    status_[""] = false;
    status_[kDenoiserServiceName] = false;
  }

  void SetServing(bool serving) {
    std::vector<std::shared_ptr<Watcher>> watchers;
    uint64_t version;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [name, s] : status_) s = serving;
      watchers = watchers_;
      version = ++version_;
    }
    for (auto& w : watchers) w->Update(Status(serving), version);
  }

  grpc::ServerUnaryReactor* Check(grpc::CallbackServerContext* ctx,
                                  const ::grpc::health::v1::HealthCheckRequest* request,
                                  ::grpc::health::v1::HealthCheckResponse* response) override {
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    std::lock_guard<std::mutex> lock(mu_);
    auto it = status_.find(request->service());
    if (it == status_.end()) {
      reactor->Finish(grpc::Status(grpc::StatusCode::NOT_FOUND,
                                   "unknown service " + request->service()));
    } else {
      response->set_status(Status(it->second));
      reactor->Finish(grpc::Status::OK);
    }
    return reactor;
  }

  grpc::ServerWriteReactor<::grpc::health::v1::HealthCheckResponse>* Watch(
      grpc::CallbackServerContext* /*ctx*/,
      const ::grpc::health::v1::HealthCheckRequest* request) override {
    auto* reactor = new WatchReactor(this);
    ::grpc::health::v1::HealthCheckResponse::ServingStatus current;
    uint64_t version;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = status_.find(request->service());
      current = it == status_.end()
                    ? ::grpc::health::v1::HealthCheckResponse::SERVICE_UNKNOWN
                    : Status(it->second);
      if (it != status_.end()) watchers_.push_back(reactor->watcher());
      version = version_;
    }
    // A SetServing between the unlock and here has already sent a newer
    // status; the version keeps this older one from overwriting it.
    reactor->watcher()->Update(current, version);
    return reactor;
  }

 private:
  static ::grpc::health::v1::HealthCheckResponse::ServingStatus Status(bool serving) {
    return serving ? ::grpc::health::v1::HealthCheckResponse::SERVING
                   : ::grpc::health::v1::HealthCheckResponse::NOT_SERVING;
  }

  class WatchReactor;
  // The thread-safe part of a Watch call; outlives the reactor.
  class Watcher {
   public:
    explicit Watcher(WatchReactor* r) : writer(r) {}
    // `version` orders the updates (SetServing's counter): an older one
    // arriving late is dropped.
    void Update(::grpc::health::v1::HealthCheckResponse::ServingStatus s, uint64_t version) {
      {
        std::lock_guard<std::mutex> lock(mu);
        if (version < last_version) return;
        last_version = version;
        if (s == last) return;
        last = s;
      }
      ::grpc::health::v1::HealthCheckResponse msg;
      msg.set_status(s);
      writer.Write(std::move(msg));
    }
    std::mutex mu;
    int last = -1;
    uint64_t last_version = 0;
    OrderedWriter<WatchReactor, ::grpc::health::v1::HealthCheckResponse> writer;
  };

  class WatchReactor
      : public grpc::ServerWriteReactor<::grpc::health::v1::HealthCheckResponse> {
   public:
    explicit WatchReactor(HealthService* service)
        : service_(service), watcher_(std::make_shared<Watcher>(this)) {}
    const std::shared_ptr<Watcher>& watcher() { return watcher_; }
    void OnWriteDone(bool ok) override { watcher_->writer.OnWriteDone(ok); }
    void OnCancel() override { watcher_->writer.Finish(grpc::Status::CANCELLED); }
    void OnDone() override {
      watcher_->writer.Detach();
      service_->RemoveWatcher(watcher_.get());
      delete this;
    }

   private:
    HealthService* service_;
    std::shared_ptr<Watcher> watcher_;
  };

  void RemoveWatcher(Watcher* w) {
    std::lock_guard<std::mutex> lock(mu_);
    watchers_.erase(std::remove_if(watchers_.begin(), watchers_.end(),
                                   [w](const auto& p) { return p.get() == w; }),
                    watchers_.end());
  }

 public:
  // Ends every Watch stream (server shutdown).
  void FinishWatchers() {
    std::vector<std::shared_ptr<Watcher>> watchers;
    {
      std::lock_guard<std::mutex> lock(mu_);
      watchers = watchers_;
    }
    for (auto& w : watchers) w->writer.Finish(grpc::Status::OK);
  }

 private:
  std::mutex mu_;
  std::map<std::string, bool> status_;
  uint64_t version_ = 0;  // SetServing calls so far
  std::vector<std::shared_ptr<Watcher>> watchers_;
};


}  // namespace dn::server

#endif  // DN_SERVER_HEALTH_SERVICE_H_
