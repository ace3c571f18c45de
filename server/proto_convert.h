// File: server/proto_convert.h
//
// Conversions between the wire types of proto/denoised/v1 and the engine's
// types (worker::Tensor, worker::WanConfig, LatentShape, SchedulerKind), and
// between absl::Status and grpc::Status. Shared by the coordinator, the rank
// runner and the client; compute code (worker/, comm/) never sees protobuf.
#ifndef DN_SERVER_PROTO_CONVERT_H_
#define DN_SERVER_PROTO_CONVERT_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "denoised/v1/denoiser.pb.h"
#include "denoised/v1/tensor.pb.h"
#include "grpcpp/support/status.h"
#include "worker/engine.h"
#include "worker/sampler.h"
#include "worker/tensor.h"

namespace dn::server {

// gRPC and absl share the numeric code values.
grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);
// "OK", "CANCELLED", "DEADLINE_EXCEEDED", ... (the metric label values).
std::string StatusCodeName(int code);

// Checks that `t` is a well-formed tensor (known dtype, non-negative dims,
// data size = numel * dtype size). `field` names it in errors.
absl::Status CheckTensor(const denoised::v1::Tensor& t,
                         const std::string& field);
// CheckTensor, and every value as worker::RequestRules::CheckValue wants it
// (finite, |v| <= kMaxInputMagnitude); the error names "<field>.data" and the
// first bad element.
absl::Status CheckTensorValues(const denoised::v1::Tensor& t,
                               const std::string& field);
// Host f32 copy of a wire tensor (f32/bf16/f16 converted); `field` names it
// in errors.
absl::StatusOr<worker::Tensor> TensorFromProto(const denoised::v1::Tensor& t,
                                               const std::string& field);
// f32 wire tensor of a host tensor (any dtype is converted to f32).
void TensorToProto(const worker::Tensor& t, denoised::v1::Tensor* out);

const char* DTypeWireName(denoised::v1::DType dtype);  // "f32", ...
int64_t DTypeWireSize(denoised::v1::DType dtype);      // 0 if unknown

worker::SchedulerKind SchedulerFromProto(denoised::v1::Scheduler s);
denoised::v1::Scheduler SchedulerToProto(worker::SchedulerKind k);
// "unipc" | "euler"; UNSPECIFIED counts as UniPC.
const char* SchedulerWireName(denoised::v1::Scheduler s);
// Parses "unipc" | "euler" (case-insensitive).
absl::StatusOr<denoised::v1::Scheduler> ParseScheduler(const std::string& s);

worker::LatentShape LatentFromProto(const denoised::v1::LatentShape& s);
denoised::v1::LatentShape LatentToProto(const worker::LatentShape& s);
std::string LatentString(const denoised::v1::LatentShape& s);  // "[16, 3, 8, 8]"

}  // namespace dn::server

#endif  // DN_SERVER_PROTO_CONVERT_H_
