#include "server/proto_convert.h"

#include <cstring>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "worker/request_rules.h"

namespace dn::server {

namespace v1 = ::denoised::v1;

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                      std::string(status.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      status.error_message());
}

std::string StatusCodeName(int code) {
  if (code < 0 || code > 16) return "UNKNOWN";
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

const char* DTypeWireName(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_F32: return "f32";
    case v1::DTYPE_BF16: return "bf16";
    case v1::DTYPE_F16: return "f16";
    default: return "unspecified";
  }
}

int64_t DTypeWireSize(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_F32: return 4;
    case v1::DTYPE_BF16: return 2;
    case v1::DTYPE_F16: return 2;
    default: return 0;
  }
}

namespace {

std::string WireShapeString(const v1::Tensor& t) {
  return absl::StrCat("[", absl::StrJoin(t.shape(), ", "), "]");
}

}  // namespace

absl::Status CheckTensor(const v1::Tensor& t, const std::string& field) {
  const int64_t elem = DTypeWireSize(t.dtype());
  if (elem == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".dtype: must be DTYPE_F32, DTYPE_BF16 or DTYPE_F16"));
  }
  int64_t numel = 1;
  for (int64_t d : t.shape()) {
    if (d < 0 || (d > 0 && numel > (int64_t{1} << 40) / d)) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".shape: invalid ", WireShapeString(t)));
    }
    numel *= d;
  }
  if (static_cast<int64_t>(t.data().size()) != numel * elem) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".data: ", t.data().size(), " bytes, expected ", numel * elem,
        " for ", DTypeWireName(t.dtype()), WireShapeString(t)));
  }
  return absl::OkStatus();
}

absl::Status CheckTensorValues(const v1::Tensor& t, const std::string& field) {
  if (absl::Status s = CheckTensor(t, field); !s.ok()) return s;
  // Decoded one element at a time: no f32 copy of the tensor is made.
  const int64_t elem = DTypeWireSize(t.dtype());
  const int64_t n = static_cast<int64_t>(t.data().size()) / elem;
  const char* src = t.data().data();
  for (int64_t i = 0; i < n; ++i) {
    float v = 0;
    if (t.dtype() == v1::DTYPE_F32) {
      std::memcpy(&v, src + i * 4, 4);
    } else {
      uint16_t h = 0;
      std::memcpy(&h, src + i * 2, 2);
      v = t.dtype() == v1::DTYPE_BF16 ? worker::BF16ToF32(h) : worker::F16ToF32(h);
    }
    if (absl::Status s = worker::RequestRules::CheckValue(field, i, v); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::StatusOr<worker::Tensor> TensorFromProto(const v1::Tensor& t,
                                               const std::string& field) {
  if (absl::Status s = CheckTensor(t, field); !s.ok()) return s;
  worker::Shape shape(t.shape().begin(), t.shape().end());
  worker::Tensor out = worker::Tensor::Host(shape, worker::DType::kF32);
  const int64_t n = out.numel();
  float* dst = out.data_as<float>();
  const char* src = t.data().data();
  switch (t.dtype()) {
    case v1::DTYPE_F32:
      if (n > 0) std::memcpy(dst, src, static_cast<size_t>(n) * 4);
      break;
    case v1::DTYPE_BF16:
    case v1::DTYPE_F16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, src + 2 * i, 2);
        dst[i] = t.dtype() == v1::DTYPE_BF16 ? worker::BF16ToF32(v)
                                              : worker::F16ToF32(v);
      }
      break;
    default:
      break;  // rejected by CheckTensor
  }
  return out;
}

void TensorToProto(const worker::Tensor& t, v1::Tensor* out) {
  out->Clear();
  out->set_dtype(v1::DTYPE_F32);
  for (int64_t d : t.shape()) out->add_shape(d);
  const int64_t n = t.numel();
  std::string* data = out->mutable_data();
  data->resize(static_cast<size_t>(n) * 4);
  if (t.dtype() == worker::DType::kF32) {
    if (n > 0) std::memcpy(data->data(), t.data(), static_cast<size_t>(n) * 4);
    return;
  }
  const auto* src = t.data_as<uint16_t>();
  for (int64_t i = 0; i < n; ++i) {
    const float f = t.dtype() == worker::DType::kBF16 ? worker::BF16ToF32(src[i])
                                                      : worker::F16ToF32(src[i]);
    std::memcpy(data->data() + 4 * i, &f, 4);
  }
}

worker::SchedulerKind SchedulerFromProto(v1::Scheduler s) {
  return s == v1::SCHEDULER_EULER ? worker::SchedulerKind::kEuler
                                  : worker::SchedulerKind::kUniPC;
}

v1::Scheduler SchedulerToProto(worker::SchedulerKind k) {
  return k == worker::SchedulerKind::kEuler ? v1::SCHEDULER_EULER
                                            : v1::SCHEDULER_UNIPC;
}

const char* SchedulerWireName(v1::Scheduler s) {
  return s == v1::SCHEDULER_EULER ? "euler" : "unipc";
}

absl::StatusOr<v1::Scheduler> ParseScheduler(const std::string& s) {
  const std::string lower = absl::AsciiStrToLower(s);
  if (lower == "unipc" || lower.empty()) return v1::SCHEDULER_UNIPC;
  if (lower == "euler") return v1::SCHEDULER_EULER;
  return absl::InvalidArgumentError(
      absl::StrCat("--scheduler: expected unipc or euler, got '", s, "'"));
}

worker::LatentShape LatentFromProto(const v1::LatentShape& s) {
  worker::LatentShape l;
  l.channels = s.channels();
  l.frames = s.frames();
  l.height = s.height();
  l.width = s.width();
  return l;
}

v1::LatentShape LatentToProto(const worker::LatentShape& s) {
  v1::LatentShape l;
  l.set_channels(s.channels);
  l.set_frames(s.frames);
  l.set_height(s.height);
  l.set_width(s.width);
  return l;
}

std::string LatentString(const v1::LatentShape& s) {
  return absl::StrCat("[", s.channels(), ", ", s.frames(), ", ", s.height(),
                      ", ", s.width(), "]");
}

}  // namespace dn::server
