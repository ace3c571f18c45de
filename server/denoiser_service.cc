#include "server/denoiser_service.h"

#include <chrono>
#include <mutex>
#include <string>
#include <utility>

#include "denoised/v1/denoiser.grpc.pb.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/proto_buffer_reader.h"
#include "server/loop_reactor.h"
#include "server/proto_convert.h"
#include "server/stream_writer.h"

namespace dn::server {

namespace v1 = ::denoised::v1;

namespace {

// Whether a cancelled call was cancelled by its deadline. The client's own
// deadline timer usually fires first and cancels the call a moment before
// the server's copy of the deadline (computed from grpc-timeout on arrival)
// passes, so a cancellation this close to the deadline counts as one.
bool DeadlineReached(grpc::CallbackServerContext* ctx) {
  return ctx->deadline() <=
         std::chrono::system_clock::now() + std::chrono::milliseconds(500);
}

int64_t DeadlineUnixMillis(grpc::CallbackServerContext* ctx) {
  const auto d = ctx->deadline();
  if (d >= std::chrono::system_clock::time_point::max() -
               std::chrono::hours(24 * 365)) {
    return 0;
  }
  return std::chrono::duration_cast<std::chrono::milliseconds>(d.time_since_epoch())
      .count();
}

grpc::ByteBuffer Serialize(const google::protobuf::MessageLite& msg) {
  grpc::ByteBuffer out;
  bool own = false;
  (void)grpc::SerializationTraits<google::protobuf::MessageLite>::Serialize(msg, &out, &own);
  return out;
}

// What a Generate call holds while it runs: its client slot and its share of
// the memory budget, released when the call is done.
struct CallHolds {
  ClientGate::Slot slot;
  InflightBudget::Hold bytes;
};

// Parses a request body on the intake thread, never on gRPC's threads (a
// 200 MiB body takes a while, and the ranks' messages are delivered on
// those threads), then hands the message to the core's loop. The body is
// owned here: the call may end (a cancel) while it is parsed.
void PostParse(EventLoop& intake, EventLoop& loop, CoordinatorCore& core,
               grpc::ByteBuffer body, std::shared_ptr<RequestSink> sink,
               int64_t deadline) {
  intake.Post([&loop, &core, body = std::move(body), sink = std::move(sink),
               deadline]() mutable {
    auto request = std::make_shared<v1::GenerateRequest>();
    // Deserialize consumes the buffer: its bytes are freed once parsed.
    const bool parsed =
        grpc::SerializationTraits<v1::GenerateRequest>::Deserialize(&body, request.get())
            .ok();
    loop.Post([&core, parsed, request = std::move(request), sink = std::move(sink),
               deadline]() mutable {
      if (!parsed) {
        core.CountRefused("", absl::StatusCode::kInvalidArgument);
        sink->Finish(absl::InvalidArgumentError(
            "the request could not be parsed as a denoised.v1.GenerateRequest "
            "(malformed protobuf, a truncated field, or a string that is not "
            "UTF-8)"));
        return;
      }
      core.Submit(std::move(*request), std::move(sink), deadline);
    });
  });
}

class StreamReactor;
class StreamSink final : public RequestSink {
 public:
  StreamSink(StreamReactor* r, grpc::CallbackServerContext* ctx) : writer(r), ctx_(ctx) {}
  void Event(v1::GenerateEvent event) override { writer.Write(Serialize(event)); }
  void Result(v1::GenerateResult result) override {
    v1::GenerateEvent event;
    *event.mutable_result() = std::move(result);
    writer.Write(Serialize(event));
  }
  void Finish(absl::Status status) override { writer.Finish(ToGrpcStatus(status)); }
  // Called on the loop before Finish, while the call is alive.
  void Trailer(const std::string& key, const std::string& value) override {
    ctx_->AddTrailingMetadata(key, value);
  }
  OrderedWriter<StreamReactor, grpc::ByteBuffer> writer;

 private:
  grpc::CallbackServerContext* ctx_;
};

class StreamReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  StreamReactor(EventLoop& intake, EventLoop& loop, CoordinatorCore& core,
                grpc::CallbackServerContext* ctx, grpc::ByteBuffer body,
                CallHolds holds)
      : loop_(loop),
        core_(core),
        ctx_(ctx),
        sink_(std::make_shared<StreamSink>(this, ctx)),
        holds_(std::move(holds)) {
    PostParse(intake, loop, core, std::move(body), sink_, DeadlineUnixMillis(ctx));
  }
  void OnWriteDone(bool ok) override { sink_->writer.OnWriteDone(ok); }
  void OnCancel() override {
    sink_->cancelled = true;
    loop_.Post([&core = core_, sink = sink_, deadline = DeadlineReached(ctx_)] {
      core.ClientGone(*sink, deadline);
    });
  }
  void OnDone() override {
    sink_->writer.Detach();
    delete this;
  }

 private:
  EventLoop& loop_;
  CoordinatorCore& core_;
  grpc::CallbackServerContext* ctx_;
  std::shared_ptr<StreamSink> sink_;
  CallHolds holds_;
};

class UnarySink final : public RequestSink {
 public:
  UnarySink(grpc::ServerUnaryReactor* r, grpc::CallbackServerContext* ctx,
            grpc::ByteBuffer* response)
      : reactor_(r), ctx_(ctx), response_(response) {}
  void Event(v1::GenerateEvent) override {}
  void Result(v1::GenerateResult result) override {
    grpc::ByteBuffer bytes = Serialize(result);
    std::lock_guard<std::mutex> lock(mu_);
    if (!finished_) *response_ = std::move(bytes);
  }
  void Finish(absl::Status status) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) return;
      finished_ = true;
    }
    reactor_->Finish(ToGrpcStatus(status));
  }
  void Trailer(const std::string& key, const std::string& value) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!finished_) ctx_->AddTrailingMetadata(key, value);
  }

 private:
  std::mutex mu_;
  bool finished_ = false;
  grpc::ServerUnaryReactor* reactor_;
  grpc::CallbackServerContext* ctx_;
  grpc::ByteBuffer* response_;
};

class UnaryReactor final : public grpc::ServerUnaryReactor {
 public:
  UnaryReactor(EventLoop& intake, EventLoop& loop, CoordinatorCore& core,
               grpc::CallbackServerContext* ctx, grpc::ByteBuffer body,
               grpc::ByteBuffer* response, CallHolds holds)
      : loop_(loop),
        core_(core),
        ctx_(ctx),
        sink_(std::make_shared<UnarySink>(this, ctx, response)),
        holds_(std::move(holds)) {
    PostParse(intake, loop, core, std::move(body), sink_, DeadlineUnixMillis(ctx));
  }
  void OnCancel() override {
    sink_->cancelled = true;
    loop_.Post([&core = core_, sink = sink_, deadline = DeadlineReached(ctx_)] {
      core.ClientGone(*sink, deadline);
    });
  }
  void OnDone() override { delete this; }

 private:
  EventLoop& loop_;
  CoordinatorCore& core_;
  grpc::CallbackServerContext* ctx_;
  std::shared_ptr<UnarySink> sink_;
  CallHolds holds_;
};

using RawGenerateService = v1::Denoiser::WithRawCallbackMethod_Generate<
    v1::Denoiser::WithRawCallbackMethod_GenerateUnary<v1::Denoiser::CallbackService>>;

class DenoiserService final : public RawGenerateService {
 public:
  DenoiserService(EventLoop& intake, EventLoop& loop, CoordinatorCore& core,
                  ClientGate& gate, InflightBudget& budget)
      : intake_(intake), loop_(loop), core_(core), gate_(gate), budget_(budget) {}

  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(
      grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* body) override {
    CallHolds holds;
    if (grpc::Status s = Admit(ctx, *body, &holds); !s.ok()) {
      return new RejectedWriteReactor<grpc::ByteBuffer>(s);
    }
    return new StreamReactor(intake_, loop_, core_, ctx, TakeBody(body), std::move(holds));
  }
  grpc::ServerUnaryReactor* GenerateUnary(grpc::CallbackServerContext* ctx,
                                          const grpc::ByteBuffer* body,
                                          grpc::ByteBuffer* response) override {
    CallHolds holds;
    if (grpc::Status s = Admit(ctx, *body, &holds); !s.ok()) {
      return RejectUnary(ctx, s);
    }
    return new UnaryReactor(intake_, loop_, core_, ctx, TakeBody(body), response,
                            std::move(holds));
  }
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* ctx,
                                   const v1::CancelRequest* request,
                                   v1::CancelResponse* response) override {
    if (grpc::Status s = Authenticate(ctx); !s.ok()) return RejectUnary(ctx, s);
    return new LoopUnaryReactor(loop_, [this, request, response] {
      *response = core_.Cancel(*request);
      return grpc::Status::OK;
    });
  }
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* ctx,
                                       const v1::ListModelsRequest*,
                                       v1::ListModelsResponse* response) override {
    if (grpc::Status s = Authenticate(ctx); !s.ok()) return RejectUnary(ctx, s);
    return new LoopUnaryReactor(loop_, [this, response] {
      *response = core_.ListModels();
      return grpc::Status::OK;
    });
  }
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* ctx,
                                          const v1::GetServerInfoRequest*,
                                          v1::ServerInfo* response) override {
    if (grpc::Status s = Authenticate(ctx); !s.ok()) return RejectUnary(ctx, s);
    return new LoopUnaryReactor(loop_, [this, response] {
      *response = core_.GetServerInfo();
      return grpc::Status::OK;
    });
  }

 private:
  grpc::Status Authenticate(grpc::CallbackServerContext* ctx) {
    ClientGate::Slot unused;
    return gate_.Admit(*ctx, false, &unused);
  }
  // The ClientGate, then the memory budget, on the call's metadata and
  // size only. A refusal is counted (model "_unknown_": the body is not
  // parsed).
  grpc::Status Admit(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer& body,
                     CallHolds* holds) {
    grpc::Status s = gate_.Admit(*ctx, true, &holds->slot);
    if (s.ok()) {
      absl::StatusOr<InflightBudget::Hold> hold =
          budget_.Acquire(static_cast<int64_t>(body.Length()));
      if (hold.ok()) {
        holds->bytes = *std::move(hold);
      } else {
        s = ToGrpcStatus(hold.status());
      }
    }
    if (!s.ok()) {
      loop_.Post([&core = core_, code = s.error_code()] {
        core.CountRefused("", static_cast<absl::StatusCode>(code));
      });
    }
    return s;
  }
  // gRPC owns the request buffer and reads it no more once the handler
  // runs; its slices move out without a copy.
  static grpc::ByteBuffer TakeBody(const grpc::ByteBuffer* body) {
    grpc::ByteBuffer out;
    out.Swap(const_cast<grpc::ByteBuffer*>(body));
    return out;
  }

  EventLoop& intake_;
  EventLoop& loop_;
  CoordinatorCore& core_;
  ClientGate& gate_;
  InflightBudget& budget_;
};

}  // namespace

std::unique_ptr<grpc::Service> MakeDenoiserService(EventLoop& intake, EventLoop& loop,
                                                   CoordinatorCore& core,
                                                   ClientGate& gate,
                                                   InflightBudget& budget) {
  return std::make_unique<DenoiserService>(intake, loop, core, gate, budget);
}

}  // namespace dn::server
