// CudaBackend: worker/backend.h on one CUDA device (see cuda_backend.h and
// docs/CUDA.md). This file checks tensors (device, dtype, shape) and calls
// the pieces: DeviceAllocator (memory), LtGemm (Linear), CudnnSdpa
// (Attention), CudnnSdpaFp8 (AttentionFp8) and the kernels of kernels.h
// (everything else).
#include "worker/cuda/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "worker/cuda/cuda_handles.h"
#include "worker/cuda/device_allocator.h"
#include "worker/cuda/gemm.h"
#include "worker/cuda/kernels.h"
#include "worker/cuda/sdpa.h"
#include "worker/cuda/sdpa_fp8.h"
#include "worker/op_contract.h"

namespace dn::worker {
namespace cuda {
namespace {

// Workspaces, allocated once at start-up (never during capture, never
// resized, so pointers baked into CUDA graphs stay valid).
constexpr size_t kGemmWorkspaceBytes = size_t{32} << 20;  // cuBLASLt on Hopper
constexpr size_t kSdpaWorkspaceBytes = size_t{16} << 20;  // cuDNN SDPA (needs <= 256 B)
// Pinned host staging for CopyFromHost/CopyToHost: two buffers, so host
// conversion of one chunk overlaps the DMA of the other.
constexpr size_t kStagingBytes = size_t{16} << 20;

using SharedStream = std::shared_ptr<std::remove_pointer_t<cudaStream_t>>;

// --- host-side dtype conversion for the staging copies -----------------------

void FloatsToDType(const float* src, DType dtype, void* dst, size_t n) {
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, n * sizeof(float));
      break;
    case DType::kBF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = F32ToBF16(src[i]);
      break;
    }
    case DType::kF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = F32ToF16(src[i]);
      break;
    }
  }
}

void DTypeToFloats(const void* src, DType dtype, float* dst, size_t n) {
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, n * sizeof(float));
      break;
    case DType::kBF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = BF16ToF32(s[i]);
      break;
    }
    case DType::kF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = F16ToF32(s[i]);
      break;
    }
  }
}

// --- markers and graphs --------------------------------------------------------

class EventPool {
 public:
  absl::StatusOr<EventPtr> Get() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_.empty()) {
        EventPtr e = std::move(free_.back());
        free_.pop_back();
        return e;
      }
    }
    cudaEvent_t raw = nullptr;
    DN_CUDA_RETURN_IF_ERROR(cudaEventCreate(&raw));
    return EventPtr(raw);
  }
  void Put(EventPtr e) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(std::move(e));
  }

 private:
  std::mutex mu_;
  std::vector<EventPtr> free_;
};

class CudaMarker final : public Marker {
 public:
  CudaMarker(std::shared_ptr<EventPool> pool, EventPtr event)
      : pool_(std::move(pool)), event_(std::move(event)) {}
  ~CudaMarker() override { pool_->Put(std::move(event_)); }
  cudaEvent_t event() const { return event_.get(); }

 private:
  std::shared_ptr<EventPool> pool_;
  EventPtr event_;
};

absl::Status UseDevice(int device) {
  int current = -1;
  DN_CUDA_RETURN_IF_ERROR(cudaGetDevice(&current));
  if (current != device) DN_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  return absl::OkStatus();
}

class CudaGraph final : public Graph {
 public:
  CudaGraph(int device, SharedStream stream, GraphPtr graph, GraphExecPtr exec,
            std::vector<std::shared_ptr<void>> retained)
      : device_(device),
        stream_(std::move(stream)),
        graph_(std::move(graph)),
        exec_(std::move(exec)),
        retained_(std::move(retained)) {}

  absl::Status Replay() override {
    DN_RETURN_IF_ERROR(UseDevice(device_));
    DN_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(exec_.get(), stream_.get()));
    return absl::OkStatus();
  }

 private:
  int device_;
  SharedStream stream_;
  GraphPtr graph_;
  GraphExecPtr exec_;
  // Every block allocated during the capture, and the workspaces: the graph
  // may write them on replay, so they must not be recycled while it lives.
  std::vector<std::shared_ptr<void>> retained_;
};

// --- the backend -----------------------------------------------------------------

class CudaBackend final : public Backend {
 public:
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(
      const BackendOptions& options);
  ~CudaBackend() override;

  std::string name() const override { return "cuda"; }
  Device device() const override { return Device::kCuda; }
  DType compute_dtype() const override { return DType::kBF16; }
  std::string device_description() const override { return description_; }
  void* stream() const override { return stream_.get(); }

  absl::StatusOr<Tensor> Empty(const Shape& shape, DType dtype) override;
  absl::Status CopyFromHost(const float* src, Tensor* dst) override;
  absl::Status CopyToHost(const Tensor& src, float* dst) override;
  absl::Status Copy(const Tensor& src, Tensor* dst) override;
  absl::Status FillNormal(Tensor* dst, uint64_t seed, uint64_t stream,
                          float mean, float std) override;
  int64_t peak_memory_bytes() const override {
    return allocator_->peak_reserved_bytes();
  }

  absl::Status Linear(const Tensor& x, const Tensor& w, const Tensor* bias,
                      Activation act, Tensor* y) override;
  absl::Status Silu(const Tensor& x, Tensor* y) override;
  absl::Status GeluTanh(const Tensor& x, Tensor* y) override;
  absl::Status GeluErf(const Tensor& x, Tensor* y) override;
  absl::Status AddModulation(const Tensor& table, const Tensor& proj,
                             Tensor* out) override;
  absl::Status LayerNormModulate(const Tensor& x, const Tensor& mod,
                                 int shift_index, int scale_index, float eps,
                                 Tensor* y) override;
  absl::Status LayerNormAffine(const Tensor& x, const Tensor& weight,
                               const Tensor& bias, float eps,
                               Tensor* y) override;
  absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps,
                       Tensor* y) override;
  absl::Status RmsNormRope(const Tensor& x, const Tensor& weight,
                           const Tensor& rope, int heads, float eps,
                           Tensor* y) override;
  absl::Status RmsNormRopePackQkv(const Tensor& q, const Tensor& k,
                                  const Tensor& v, const Tensor& q_weight,
                                  const Tensor& k_weight, const Tensor& rope,
                                  int heads, float eps, int world,
                                  Tensor* send) override;
  absl::Status Attention(const Tensor& q, const Tensor& k, const Tensor& v,
                         int64_t kv_len, float scale, Tensor* o) override;
  absl::Status AttentionFp8(const Tensor& q, const Tensor& k, const Tensor& v,
                            int64_t kv_len, float scale, Tensor* o) override;
  absl::Status GatedResidual(Tensor* x, const Tensor& y, const Tensor& mod,
                             int gate_index) override;
  absl::Status AddInPlace(Tensor* x, const Tensor& y) override;
  absl::Status TileAbsDiffSums(const Tensor& cur, const Tensor& prev,
                               int64_t tile, int64_t valid_rows,
                               double* sums) override;

  absl::Status PackQkv(const Tensor& q, const Tensor& k, const Tensor& v,
                       int world, Tensor* send) override;
  absl::Status UnpackQkv(const Tensor& recv, int world, Tensor* q, Tensor* k,
                         Tensor* v) override;
  absl::Status PackOut(const Tensor& o, int world, Tensor* send) override;
  absl::Status UnpackOut(const Tensor& recv, int world, Tensor* o) override;

  absl::Status Synchronize() override;
  absl::StatusOr<std::unique_ptr<Marker>> Mark() override;
  absl::StatusOr<double> ElapsedSeconds(const Marker& a,
                                        const Marker& b) override;
  absl::StatusOr<std::unique_ptr<Graph>> Capture(
      const std::function<absl::Status()>& body) override;
  bool replay_skips_host() const override { return true; }

 private:
  CudaBackend() = default;
  cudaStream_t s() const { return stream_.get(); }
  absl::Status Activate() const { return UseDevice(device_); }
  // Host-synchronizing calls cannot be recorded into a graph.
  absl::Status NotCapturing(const char* op) const {
    if (!capturing_) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrCat(
        "cuda ", op, ": not allowed inside Capture() (it synchronizes with the "
        "host or cannot be replayed); do it before the capture or around Replay()"));
  }

  const OpContract contract_{"cuda", Device::kCuda, DType::kBF16};
  int device_ = 0;
  std::string description_;
  SharedStream stream_;
  std::shared_ptr<DeviceAllocator> allocator_;
  std::shared_ptr<void> gemm_workspace_;
  std::shared_ptr<void> sdpa_workspace_;
  std::unique_ptr<LtGemm> gemm_;
  std::unique_ptr<CudnnSdpa> sdpa_;
  std::unique_ptr<CudnnSdpaFp8> sdpa_fp8_;  // AttentionFp8 (docs/CUDA.md)
  // TileAbsDiffSums' per-chunk partials: device scratch (grown on demand)
  // and its host copy.
  std::shared_ptr<void> tile_partials_;
  size_t tile_partials_bytes_ = 0;
  std::vector<double> tile_partials_host_;
  PinnedPtr staging_[2];
  EventPtr staging_free_[2];  // recorded after the DMA that reads/writes it
  std::shared_ptr<EventPool> events_ = std::make_shared<EventPool>();
  bool capturing_ = false;
};

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(
    const BackendOptions& options) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return absl::FailedPreconditionError(absl::StrCat(
        "cuda: no usable CUDA device (cudaGetDeviceCount: ",
        cudaGetErrorString(err), "); a CUDA 13 build needs an R580+ driver"));
  }
  if (options.device < 0 || options.device >= count)
    return absl::FailedPreconditionError(
        absl::StrCat("cuda: device ", options.device, " does not exist (",
                     count, " visible devices)"));
  std::unique_ptr<CudaBackend> b(new CudaBackend());
  b->device_ = options.device;
  DN_CUDA_RETURN_IF_ERROR(cudaSetDevice(b->device_));
  cudaDeviceProp prop{};
  DN_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, b->device_));
  b->description_ = absl::StrCat(prop.name, " (", b->device_, ")");
  if (prop.major < 9)
    return absl::FailedPreconditionError(absl::StrCat(
        "cuda: ", b->description_, " has compute capability ", prop.major, ".",
        prop.minor, "; this build targets sm_90 (Hopper) and newer"));

  cudaStream_t raw_stream = nullptr;
  DN_CUDA_RETURN_IF_ERROR(
      cudaStreamCreateWithFlags(&raw_stream, cudaStreamNonBlocking));
  b->stream_ = SharedStream(raw_stream, StreamDeleter());

  b->allocator_ = DeviceAllocator::Create(b->device_);
  DN_ASSIGN_OR_RETURN(b->gemm_workspace_,
                      b->allocator_->Allocate(kGemmWorkspaceBytes));
  DN_ASSIGN_OR_RETURN(b->sdpa_workspace_,
                      b->allocator_->Allocate(kSdpaWorkspaceBytes));
  DN_ASSIGN_OR_RETURN(b->gemm_,
                      LtGemm::Create(b->gemm_workspace_.get(), kGemmWorkspaceBytes));
  DN_ASSIGN_OR_RETURN(b->sdpa_, CudnnSdpa::Create(raw_stream,
                                                  b->sdpa_workspace_.get(),
                                                  kSdpaWorkspaceBytes));
  // The fp8 attention takes its buffers (quantized tensors, scales, cuDNN
  // workspace) from the allocator when a shape's plan is built.
  std::weak_ptr<DeviceAllocator> weak_allocator = b->allocator_;
  DN_ASSIGN_OR_RETURN(
      b->sdpa_fp8_,
      CudnnSdpaFp8::Create(
          raw_stream,
          [weak_allocator](size_t bytes) -> absl::StatusOr<std::shared_ptr<void>> {
            std::shared_ptr<DeviceAllocator> a = weak_allocator.lock();
            if (a == nullptr)
              return absl::FailedPreconditionError("cuda AttentionFp8: backend destroyed");
            return a->Allocate(bytes);
          }));
  for (int i = 0; i < 2; ++i) {
    void* pinned = nullptr;
    DN_CUDA_RETURN_IF_ERROR(cudaMallocHost(&pinned, kStagingBytes));
    b->staging_[i].reset(pinned);
    cudaEvent_t ev = nullptr;
    DN_CUDA_RETURN_IF_ERROR(
        cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    b->staging_free_[i].reset(ev);
  }
  DN_LOG(INFO) << "cuda backend on " << b->description_ << ", "
               << prop.multiProcessorCount << " SMs; cuBLASLt "
               << cublasLtGetVersion() << ", cuDNN " << b->sdpa_->cudnn_version()
               << " (attention: "
               << (b->sdpa_->form() == CudnnSdpa::Form::kUnified
                       ? "SDPA_FWD op"
                       : "composite graph")
               << ")";
  return b;
}

CudaBackend::~CudaBackend() {
  if (stream_ == nullptr) return;
  if (!Activate().ok()) return;
  if (capturing_) {
    cudaGraph_t g = nullptr;
    (void)cudaStreamEndCapture(s(), &g);
    if (g != nullptr) (void)cudaGraphDestroy(g);
  }
  const cudaError_t err = cudaStreamSynchronize(s());
  if (err != cudaSuccess)
    DN_LOG(ERROR) << "cuda backend teardown: " << cudaGetErrorString(err);
}

// --- memory --------------------------------------------------------------------

absl::StatusOr<Tensor> CudaBackend::Empty(const Shape& shape, DType dtype) {
  for (int64_t d : shape)
    if (d < 0)
      return absl::InvalidArgumentError(
          absl::StrCat("cuda Empty: negative dimension in ", ShapeString(shape)));
  DN_RETURN_IF_ERROR(Activate());
  const size_t bytes = static_cast<size_t>(NumElements(shape)) * DTypeSize(dtype);
  DN_ASSIGN_OR_RETURN(std::shared_ptr<void> block, allocator_->Allocate(bytes));
  return Tensor(std::move(block), 0, Device::kCuda, dtype, shape);
}

absl::Status CudaBackend::CopyFromHost(const float* src, Tensor* dst) {
  DN_RETURN_IF_ERROR(contract_.Resident(*dst, "CopyFromHost", "dst"));
  DN_RETURN_IF_ERROR(NotCapturing("CopyFromHost"));
  DN_RETURN_IF_ERROR(Activate());
  const size_t elem = DTypeSize(dst->dtype());
  const size_t n = static_cast<size_t>(dst->numel());
  const size_t chunk = kStagingBytes / elem;
  char* out = static_cast<char*>(dst->data());
  for (size_t off = 0, i = 0; off < n; off += chunk, i ^= 1) {
    const size_t count = std::min(chunk, n - off);
    // The previous DMA out of this staging buffer must be done.
    DN_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(staging_free_[i].get()));
    FloatsToDType(src + off, dst->dtype(), staging_[i].get(), count);
    DN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out + off * elem, staging_[i].get(),
                                            count * elem,
                                            cudaMemcpyHostToDevice, s()));
    DN_CUDA_RETURN_IF_ERROR(cudaEventRecord(staging_free_[i].get(), s()));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::CopyToHost(const Tensor& src, float* dst) {
  DN_RETURN_IF_ERROR(contract_.Resident(src, "CopyToHost", "src"));
  DN_RETURN_IF_ERROR(NotCapturing("CopyToHost"));
  DN_RETURN_IF_ERROR(Activate());
  const size_t elem = DTypeSize(src.dtype());
  const size_t n = static_cast<size_t>(src.numel());
  const size_t chunk = kStagingBytes / elem;
  const char* in = static_cast<const char*>(src.data());
  if (n == 0) return Synchronize();
  auto issue = [&](size_t off, int buf) -> absl::Status {
    const size_t count = std::min(chunk, n - off);
    DN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(staging_[buf].get(), in + off * elem,
                                            count * elem,
                                            cudaMemcpyDeviceToHost, s()));
    DN_CUDA_RETURN_IF_ERROR(cudaEventRecord(staging_free_[buf].get(), s()));
    return absl::OkStatus();
  };
  // Double buffering: the DMA of chunk c+1 runs while chunk c is converted.
  DN_RETURN_IF_ERROR(issue(0, 0));
  for (size_t off = 0, i = 0; off < n; off += chunk, i ^= 1) {
    if (off + chunk < n) DN_RETURN_IF_ERROR(issue(off + chunk, static_cast<int>(i ^ 1)));
    DN_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(staging_free_[i].get()));
    DTypeToFloats(staging_[i].get(), src.dtype(), dst + off,
                  std::min(chunk, n - off));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Copy(const Tensor& src, Tensor* dst) {
  DN_RETURN_IF_ERROR(contract_.Copy(src, *dst));
  DN_RETURN_IF_ERROR(Activate());
  if (src.dtype() == dst->dtype()) {
    if (src.nbytes() > 0)
      DN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst->data(), src.data(),
                                              src.nbytes(),
                                              cudaMemcpyDeviceToDevice, s()));
    return absl::OkStatus();
  }
  return InvokeConvert(src.data(), src.dtype(), dst->data(), dst->dtype(),
                       src.numel(), s());
}

absl::Status CudaBackend::FillNormal(Tensor* dst, uint64_t seed,
                                     uint64_t stream, float mean, float std) {
  DN_RETURN_IF_ERROR(contract_.Resident(*dst, "FillNormal", "dst"));
  DN_RETURN_IF_ERROR(Activate());
  return InvokeFillNormal(dst->data(), dst->dtype(), dst->numel(), seed, stream,
                          mean, std, s());
}

// --- dense ops -----------------------------------------------------------------

absl::Status CudaBackend::Linear(const Tensor& x, const Tensor& w,
                                 const Tensor* bias, Activation act,
                                 Tensor* y) {
  DN_RETURN_IF_ERROR(contract_.Linear(x, w, bias, *y));
  const int64_t n = w.dim(0), k = w.dim(1);
  const int64_t m = k > 0 ? x.numel() / k : 0;
  DN_RETURN_IF_ERROR(Activate());
  return gemm_->Run(x.data(), w.data(),
                    bias != nullptr ? bias->data() : nullptr,
                    act == Activation::kGeluTanh, m, n, k, y->data(), s());
}

absl::Status CudaBackend::GeluTanh(const Tensor& x, Tensor* y) {
  DN_RETURN_IF_ERROR(contract_.GeluTanh(x, *y));
  return InvokeGeluTanh(x.data_as<bf16>(), y->data_as<bf16>(), x.numel(), s());
}

absl::Status CudaBackend::GeluErf(const Tensor& x, Tensor* y) {
  DN_RETURN_IF_ERROR(contract_.GeluErf(x, *y));
  return InvokeGeluErf(x.data_as<bf16>(), y->data_as<bf16>(), x.numel(), s());
}

absl::Status CudaBackend::Silu(const Tensor& x, Tensor* y) {
  DN_RETURN_IF_ERROR(contract_.Silu(x, *y));
  DN_RETURN_IF_ERROR(Activate());
  return InvokeSilu(x.data_as<bf16>(), y->data_as<bf16>(), x.numel(), s());
}

absl::Status CudaBackend::AddModulation(const Tensor& table, const Tensor& proj,
                                        Tensor* out) {
  DN_RETURN_IF_ERROR(contract_.AddModulation(table, proj, *out));
  const int64_t b = out->dim(0), k = out->dim(1), d = out->dim(2);
  const bool broadcast = proj.numel() == b * d && k != 1;
  DN_RETURN_IF_ERROR(Activate());
  return InvokeAddModulation(table.data_as<float>(), proj.data_as<bf16>(),
                             out->data_as<float>(), b, k, d, broadcast, s());
}

absl::Status CudaBackend::LayerNormModulate(const Tensor& x, const Tensor& mod,
                                            int shift_index, int scale_index,
                                            float eps, Tensor* y) {
  DN_RETURN_IF_ERROR(contract_.LayerNormModulate(x, mod, shift_index, scale_index, *y));
  const int64_t b = x.dim(0), seq = x.dim(1), d = x.dim(2);
  DN_RETURN_IF_ERROR(Activate());
  return InvokeLayerNormModulate(x.data_as<bf16>(), mod.data_as<float>(),
                                 y->data_as<bf16>(), b, seq, d, mod.dim(1),
                                 shift_index, scale_index, eps, s());
}

absl::Status CudaBackend::LayerNormAffine(const Tensor& x, const Tensor& weight,
                                          const Tensor& bias, float eps,
                                          Tensor* y) {
  DN_RETURN_IF_ERROR(contract_.LayerNormAffine(x, weight, bias, *y));
  const int64_t d = x.shape().back();
  DN_RETURN_IF_ERROR(Activate());
  return InvokeLayerNormAffine(x.data_as<bf16>(), weight.data_as<float>(),
                               bias.data_as<float>(), y->data_as<bf16>(),
                               d > 0 ? x.numel() / d : 0, d, eps, s());
}

absl::Status CudaBackend::RmsNorm(const Tensor& x, const Tensor& weight,
                                  float eps, Tensor* y) {
  DN_RETURN_IF_ERROR(contract_.RmsNorm(x, weight, *y));
  const int64_t d = x.shape().back();
  DN_RETURN_IF_ERROR(Activate());
  return InvokeRmsNorm(x.data_as<bf16>(), weight.data_as<float>(),
                       y->data_as<bf16>(), d > 0 ? x.numel() / d : 0, d, eps,
                       s());
}

absl::Status CudaBackend::RmsNormRope(const Tensor& x, const Tensor& weight,
                                      const Tensor& rope, int heads, float eps,
                                      Tensor* y) {
  DN_RETURN_IF_ERROR(contract_.RmsNormRope(x, weight, rope, heads, *y));
  const int64_t b = x.dim(0), seq = x.dim(1), d = x.dim(2);
  DN_RETURN_IF_ERROR(Activate());
  return InvokeRmsNormRope(x.data_as<bf16>(), weight.data_as<float>(),
                           rope.data_as<float>(), y->data_as<bf16>(), b, seq, d,
                           heads, eps, s());
}

absl::Status CudaBackend::RmsNormRopePackQkv(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_weight,
    const Tensor& k_weight, const Tensor& rope, int heads, float eps, int world,
    Tensor* send) {
  DN_RETURN_IF_ERROR(contract_.RmsNormRopePackQkv(q, k, v, q_weight, k_weight, rope,
                                                 heads, world, *send));
  const int64_t b = q.dim(0), seq = q.dim(1), d = q.dim(2);
  DN_RETURN_IF_ERROR(Activate());
  return InvokeRmsNormRopePackQkv(
      q.data_as<bf16>(), k.data_as<bf16>(), v.data_as<bf16>(),
      q_weight.data_as<float>(), k_weight.data_as<float>(),
      rope.data_as<float>(), send->data_as<bf16>(), b, seq, d, heads, world,
      eps, s());
}

namespace {

// The cuDNN shape of q [B,Sq,H,d] attending over the first kv_len rows of
// k [B,Skv,H,d] (checked by the op contract).
SdpaShape SdpaShapeOf(const Tensor& q, const Tensor& k, int64_t kv_len) {
  SdpaShape shape;
  shape.batch = q.dim(0);
  shape.seq_q = q.dim(1);
  shape.heads = q.dim(2);
  shape.head_dim = q.dim(3);
  shape.seq_kv = k.dim(1);
  shape.kv_len = kv_len;
  return shape;
}

}  // namespace

absl::Status CudaBackend::Attention(const Tensor& q, const Tensor& k,
                                    const Tensor& v, int64_t kv_len,
                                    float scale, Tensor* o) {
  DN_RETURN_IF_ERROR(contract_.Attention(q, k, v, kv_len, *o));
  if (q.dim(0) == 0 || q.dim(1) == 0 || q.dim(2) == 0) return absl::OkStatus();
  DN_RETURN_IF_ERROR(Activate());
  return sdpa_->Run(SdpaShapeOf(q, k, kv_len), q.data(), k.data(), v.data(), o->data(),
                    scale);
}

absl::Status CudaBackend::AttentionFp8(const Tensor& q, const Tensor& k,
                                       const Tensor& v, int64_t kv_len,
                                       float scale, Tensor* o) {
  DN_RETURN_IF_ERROR(contract_.Attention(q, k, v, kv_len, *o));
  if (q.dim(0) == 0 || q.dim(1) == 0 || q.dim(2) == 0) return absl::OkStatus();
  DN_RETURN_IF_ERROR(Activate());
  return sdpa_fp8_->Run(SdpaShapeOf(q, k, kv_len), q.data(), k.data(), v.data(),
                        o->data(), scale);
}

absl::Status CudaBackend::GatedResidual(Tensor* x, const Tensor& y,
                                        const Tensor& mod, int gate_index) {
  DN_RETURN_IF_ERROR(contract_.GatedResidual(*x, y, mod, gate_index));
  const int64_t b = x->dim(0), seq = x->dim(1), d = x->dim(2);
  DN_RETURN_IF_ERROR(Activate());
  return InvokeGatedResidual(x->data_as<bf16>(), y.data_as<bf16>(),
                             mod.data_as<float>(), b, seq, d, mod.dim(1),
                             gate_index, s());
}

absl::Status CudaBackend::AddInPlace(Tensor* x, const Tensor& y) {
  DN_RETURN_IF_ERROR(contract_.AddInPlace(*x, y));
  DN_RETURN_IF_ERROR(Activate());
  return InvokeAddInPlace(x->data_as<bf16>(), y.data_as<bf16>(), x->numel(), s());
}

absl::Status CudaBackend::TileAbsDiffSums(const Tensor& cur, const Tensor& prev,
                                          int64_t tile, int64_t valid_rows,
                                          double* sums) {
  DN_RETURN_IF_ERROR(contract_.TileAbsDiffSums(cur, prev, tile, valid_rows));
  DN_RETURN_IF_ERROR(NotCapturing("TileAbsDiffSums"));
  const int64_t b = cur.dim(0), seq = cur.dim(1), d = cur.dim(2);
  const int64_t tiles = seq / tile, chunks = TileAbsDiffChunks(tile);
  const size_t count = static_cast<size_t>(b * tiles * chunks);
  if (count == 0) return absl::OkStatus();
  DN_RETURN_IF_ERROR(Activate());
  const size_t bytes = 2 * count * sizeof(double);
  if (bytes > tile_partials_bytes_) {
    DN_ASSIGN_OR_RETURN(tile_partials_, allocator_->Allocate(bytes));
    tile_partials_bytes_ = bytes;
  }
  auto* partials = static_cast<double*>(tile_partials_.get());
  DN_RETURN_IF_ERROR(InvokeTileAbsDiffSums(cur.data_as<bf16>(), prev.data_as<bf16>(),
                                           partials, b, seq, d, tile, valid_rows, s()));
  tile_partials_host_.resize(2 * count);
  DN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(tile_partials_host_.data(), partials, bytes,
                                          cudaMemcpyDeviceToHost, s()));
  DN_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s()));
  // A tile's chunks in order: the same sums for the same tile data.
  for (size_t bt = 0; bt < static_cast<size_t>(b * tiles); ++bt) {
    double num = 0, den = 0;
    for (size_t c = 0; c < static_cast<size_t>(chunks); ++c) {
      num += tile_partials_host_[2 * (bt * chunks + c)];
      den += tile_partials_host_[2 * (bt * chunks + c) + 1];
    }
    sums[2 * bt] = num;
    sums[2 * bt + 1] = den;
  }
  return absl::OkStatus();
}

// --- Ulysses relayouts -------------------------------------------------------------

namespace {

// Dims of a sequence-sharded [B,S,H,d] tensor (checked by the op contract).
RelayoutDims SeqShardedDims(const Tensor& t, int world) {
  RelayoutDims d;
  d.batch = t.dim(0);
  d.shard = t.dim(1);
  d.heads = t.dim(2);
  d.head_dim = t.dim(3);
  d.world = world;
  d.elem_size = DTypeSize(t.dtype());
  return d;
}

// Dims of a head-sharded [B,P*S,h,d] tensor (checked by the op contract).
RelayoutDims HeadShardedDims(const Tensor& t, int world) {
  RelayoutDims d;
  d.batch = t.dim(0);
  d.shard = t.dim(1) / world;
  d.heads = t.dim(2) * world;
  d.head_dim = t.dim(3);
  d.world = world;
  d.elem_size = DTypeSize(t.dtype());
  return d;
}

}  // namespace

absl::Status CudaBackend::PackQkv(const Tensor& q, const Tensor& k,
                                  const Tensor& v, int world, Tensor* send) {
  DN_RETURN_IF_ERROR(contract_.PackQkv(q, k, v, world, *send));
  DN_RETURN_IF_ERROR(Activate());
  return InvokePackQkv(q.data(), k.data(), v.data(), send->data(),
                       SeqShardedDims(q, world), s());
}

absl::Status CudaBackend::UnpackQkv(const Tensor& recv, int world, Tensor* q,
                                    Tensor* k, Tensor* v) {
  DN_RETURN_IF_ERROR(contract_.UnpackQkv(recv, world, *q, *k, *v));
  DN_RETURN_IF_ERROR(Activate());
  return InvokeUnpackQkv(recv.data(), q->data(), k->data(), v->data(),
                         HeadShardedDims(*q, world), s());
}

absl::Status CudaBackend::PackOut(const Tensor& o, int world, Tensor* send) {
  DN_RETURN_IF_ERROR(contract_.PackOut(o, world, *send));
  DN_RETURN_IF_ERROR(Activate());
  return InvokePackOut(o.data(), send->data(), HeadShardedDims(o, world), s());
}

absl::Status CudaBackend::UnpackOut(const Tensor& recv, int world, Tensor* o) {
  DN_RETURN_IF_ERROR(contract_.UnpackOut(recv, world, *o));
  DN_RETURN_IF_ERROR(Activate());
  return InvokeUnpackOut(recv.data(), o->data(), SeqShardedDims(*o, world), s());
}

// --- stream, timing, graphs ----------------------------------------------------------

absl::Status CudaBackend::Synchronize() {
  DN_RETURN_IF_ERROR(NotCapturing("Synchronize"));
  DN_RETURN_IF_ERROR(Activate());
  DN_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s()));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Marker>> CudaBackend::Mark() {
  DN_RETURN_IF_ERROR(NotCapturing("Mark"));
  DN_RETURN_IF_ERROR(Activate());
  DN_ASSIGN_OR_RETURN(EventPtr event, events_->Get());
  DN_CUDA_RETURN_IF_ERROR(cudaEventRecord(event.get(), s()));
  return std::unique_ptr<Marker>(
      std::make_unique<CudaMarker>(events_, std::move(event)));
}

absl::StatusOr<double> CudaBackend::ElapsedSeconds(const Marker& a,
                                                   const Marker& b) {
  const auto* ma = dynamic_cast<const CudaMarker*>(&a);
  const auto* mb = dynamic_cast<const CudaMarker*>(&b);
  if (ma == nullptr || mb == nullptr)
    return absl::InvalidArgumentError(
        "cuda ElapsedSeconds: markers do not come from a CUDA backend");
  DN_RETURN_IF_ERROR(NotCapturing("ElapsedSeconds"));
  DN_RETURN_IF_ERROR(Activate());
  DN_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(mb->event()));
  float ms = 0.0f;
  DN_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, ma->event(), mb->event()));
  return static_cast<double>(ms) * 1e-3;
}

absl::StatusOr<std::unique_ptr<Graph>> CudaBackend::Capture(
    const std::function<absl::Status()>& body) {
  if (capturing_)
    return absl::FailedPreconditionError("cuda Capture: captures do not nest");
  DN_RETURN_IF_ERROR(Activate());
  // Relaxed mode: the body may still allocate (cudaMalloc on a cache miss)
  // and build cuDNN/cuBLASLt plans on first use; kernels, cuBLASLt/cuDNN
  // launches and NCCL collectives on this stream are recorded.
  DN_CUDA_RETURN_IF_ERROR(
      cudaStreamBeginCapture(s(), cudaStreamCaptureModeRelaxed));
  capturing_ = true;
  allocator_->BeginRetain();
  const absl::Status body_status = body();
  cudaGraph_t raw_graph = nullptr;
  const cudaError_t end = cudaStreamEndCapture(s(), &raw_graph);
  capturing_ = false;
  std::vector<std::shared_ptr<void>> retained = allocator_->EndRetain();
  // The workspaces are baked into the graph too.
  retained.push_back(gemm_workspace_);
  retained.push_back(sdpa_workspace_);
  for (std::shared_ptr<void>& b : sdpa_fp8_->buffers()) retained.push_back(std::move(b));
  GraphPtr graph(raw_graph);
  if (!body_status.ok()) {
    (void)cudaGetLastError();
    return body_status;
  }
  if (end != cudaSuccess) {
    (void)cudaGetLastError();
    return absl::InternalError(absl::StrCat(
        "cuda Capture: cudaStreamEndCapture failed: ", cudaGetErrorName(end),
        " (", cudaGetErrorString(end),
        "); something in the body broke the capture (a synchronizing call or "
        "work on another stream)"));
  }
  cudaGraphExec_t raw_exec = nullptr;
  DN_CUDA_RETURN_IF_ERROR(cudaGraphInstantiate(&raw_exec, raw_graph, 0));
  GraphExecPtr exec(raw_exec);
  size_t nodes = 0;
  DN_CUDA_RETURN_IF_ERROR(cudaGraphGetNodes(raw_graph, nullptr, &nodes));
  DN_VLOG << "cuda Capture: " << nodes << " graph nodes, "
          << retained.size() - 2 << " buffers allocated inside";
  auto result = std::make_unique<CudaGraph>(
      device_, stream_, std::move(graph), std::move(exec), std::move(retained));
  // Stream capture only records; launch once so that Capture has the effect
  // of running the body, as on the CPU backend.
  DN_RETURN_IF_ERROR(result->Replay());
  return std::unique_ptr<Graph>(std::move(result));
}

}  // namespace
}  // namespace cuda

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(
    const BackendOptions& options) {
  DN_ASSIGN_OR_RETURN(std::unique_ptr<cuda::CudaBackend> backend,
                      cuda::CudaBackend::Create(options));
  return std::unique_ptr<Backend>(std::move(backend));
}

}  // namespace dn::worker
