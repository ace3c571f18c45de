#include "server/worker_control_service.h"

#include <utility>

#include "denoised/v1/worker.grpc.pb.h"
#include "server/loop_reactor.h"
#include "server/proto_convert.h"
#include "server/stream_writer.h"

namespace dn::server {

namespace vi = ::denoised::v1::internal;

namespace {

class AttachReactor;

// The core's view of an Attach stream.
class ReactorLink final : public RankLink {
 public:
  explicit ReactorLink(AttachReactor* r) : writer(r) {}
  void Send(vi::CoordinatorMessage msg) override { writer.Write(std::move(msg)); }
  void SendShared(std::shared_ptr<const vi::CoordinatorMessage> msg) override {
    writer.Write(std::move(msg));
  }
  void Close(const absl::Status& status) override {
    writer.Finish(ToGrpcStatus(status));
  }
  OrderedWriter<AttachReactor, vi::CoordinatorMessage> writer;
};

class AttachReactor final
    : public grpc::ServerBidiReactor<vi::RankMessage, vi::CoordinatorMessage> {
 public:
  AttachReactor(EventLoop& loop, CoordinatorCore& core, const Clock& clock,
                grpc::CallbackServerContext* ctx)
      : loop_(loop),
        core_(core),
        clock_(clock),
        ctx_(ctx),
        link_(std::make_shared<ReactorLink>(this)) {
    link_->peer = ctx->peer();
    link_->Touch(clock_.Now());
    StartRead(&in_);
  }
  void OnReadDone(bool ok) override {
    if (!ok) {
      // A half-close after the rank's Leave is a clean leave; anything else
      // (no Leave, a cancelled call) is a broken stream.
      PostEnd(ctx_->IsCancelled());
      return;
    }
    link_->Touch(clock_.Now());
    auto msg = std::make_shared<vi::RankMessage>(std::move(in_));
    in_.Clear();
    loop_.Post([&core = core_, link = link_, msg = std::move(msg)] {
      core.OnRankMessage(link, *msg);
    });
    StartRead(&in_);
  }
  void OnWriteDone(bool ok) override { link_->writer.OnWriteDone(ok); }
  void OnCancel() override { PostEnd(true); }
  void OnDone() override {
    link_->writer.Detach();
    delete this;
  }

 private:
  void PostEnd(bool broken) {
    loop_.Post([&core = core_, link = link_, broken] {
      core.OnRankStreamEnd(link, broken);
    });
  }

  EventLoop& loop_;
  CoordinatorCore& core_;
  const Clock& clock_;
  grpc::CallbackServerContext* ctx_;
  std::shared_ptr<ReactorLink> link_;
  vi::RankMessage in_;
};

class StoreGetReactor final : public grpc::ServerUnaryReactor {
 public:
  StoreGetReactor(EventLoop& loop, CoordinatorCore& core,
                  const vi::StoreGetRequest* request, vi::StoreGetResponse* response) {
    loop.Post([this, &core, request, response] {
      core.StoreGet(*request,
                    [this, response](absl::StatusOr<vi::StoreGetResponse> answer) {
                      if (answer.ok()) *response = *std::move(answer);
                      Finish(ToGrpcStatus(answer.status()));
                    });
    });
  }
  void OnDone() override { delete this; }
};

class WorkerControlService final : public vi::WorkerControl::CallbackService {
 public:
  WorkerControlService(EventLoop& loop, CoordinatorCore& core, const Clock& clock)
      : loop_(loop), core_(core), clock_(clock) {}

  grpc::ServerBidiReactor<vi::RankMessage, vi::CoordinatorMessage>* Attach(
      grpc::CallbackServerContext* ctx) override {
    return new AttachReactor(loop_, core_, clock_, ctx);
  }
  grpc::ServerUnaryReactor* StoreSet(grpc::CallbackServerContext*,
                                     const vi::StoreSetRequest* request,
                                     vi::StoreSetResponse*) override {
    return new LoopUnaryReactor(loop_, [this, request] {
      return ToGrpcStatus(core_.StoreSet(*request));
    });
  }
  grpc::ServerUnaryReactor* StoreGet(grpc::CallbackServerContext*,
                                     const vi::StoreGetRequest* request,
                                     vi::StoreGetResponse* response) override {
    return new StoreGetReactor(loop_, core_, request, response);
  }
  grpc::ServerUnaryReactor* SyncSlice(grpc::CallbackServerContext*,
                                      const vi::SliceRequest* request,
                                      vi::SliceStatus* response) override {
    return new LoopUnaryReactor(loop_, [this, request, response] {
      absl::StatusOr<vi::SliceStatus> s = core_.SyncSlice(*request);
      if (s.ok()) *response = *std::move(s);
      return ToGrpcStatus(s.status());
    });
  }

 private:
  EventLoop& loop_;
  CoordinatorCore& core_;
  const Clock& clock_;
};

}  // namespace

std::unique_ptr<grpc::Service> MakeWorkerControlService(EventLoop& loop,
                                                        CoordinatorCore& core,
                                                        const Clock& clock) {
  return std::make_unique<WorkerControlService>(loop, core, clock);
}

}  // namespace dn::server
