// File: worker/cuda/sdpa_fp8.h
//
// CudnnSdpaFp8: the fast tier's attention (Backend::AttentionFp8) through
// cuDNN's fp8 SDPA forward on Hopper, backend API only (same building blocks
// as sdpa.h, worker/cuda/cudnn_graph.h). docs/CUDA.md, "fp8 attention".
//
// Per call, on the stream (nothing allocated, all capturable):
//   1. amax of q, k[:kv_len], v[:kv_len] (bf16) into device slots;
//   2. scales on the device: s_x = 448 / amax_x, descale_x = 1 / s_x; P's
//      scale 448 (descale 1/448); O's scale (fp8 O: s_v, as |O| <= max |V|);
//   3. q, k, v quantized to e4m3 into the plan's buffers (same [B,S,H,d]
//      layout, one byte per element);
//   4. the cuDNN graph (the frontend's sdpa_fp8 pattern):
//        S = (Q8 K8^T) * scale * descale_q * descale_k      (fp32)
//        P = softmax(S) (max, sub, exp, sum, log+add -> virtual stats, div)
//        amax_s = max |P|;  P8 = e4m3(P * scale_s)
//        O' = (P8 V8) * descale_s * descale_v;  amax_o = max |O'|
//        O = O' * scale_o            (bf16 straight into o where cuDNN
//                                     supports it, else e4m3 into a buffer)
//   5. fp8 O only: o = bf16(O * descale_o).
// Scales are one scalar per tensor: cuDNN's fp8 SDPA takes [1,1,1,1]
// descale/scale tensors (no per-head form), so per-tensor is what the GPU
// can do; docs/CUDA.md says why e4m3's range makes that adequate.
//
// Plans are cached per (B, H, Sq, Skv, kv_len, d) like the bf16 ones; each
// plan owns its cuDNN workspace (what its engine asks for, up to
// kMaxWorkspaceBytes) and its quantization buffers (one byte per q, k and v element, plus
// one per o element for e4m3 O), allocated once when the plan is built and
// never resized, so captured graphs keep valid pointers. Needs cuDNN >= 9.1 and sm_90; anything unsupported
// comes back as UNIMPLEMENTED with the tried configs.
#ifndef DN_WORKER_CUDA_SDPA_FP8_H_
#define DN_WORKER_CUDA_SDPA_FP8_H_

#include <cuda_runtime_api.h>
#include <cudnn_graph.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/cuda/cuda_handles.h"
#include "worker/cuda/sdpa.h"

namespace dn::worker::cuda {

class CudnnSdpaFp8 {
 public:
  using Allocate = std::function<absl::StatusOr<std::shared_ptr<void>>(size_t)>;

  // Binds a new cuDNN handle to `stream`; `allocate` gives device memory for
  // the plans' buffers (quantized q/k/v/o, scalar slots, cuDNN workspace).
  static absl::StatusOr<std::unique_ptr<CudnnSdpaFp8>> Create(cudaStream_t stream,
                                                              Allocate allocate);

  // Engine configs needing more cuDNN workspace than this are skipped.
  static constexpr size_t kMaxWorkspaceBytes = size_t{256} << 20;

  // o (bf16 [B,Sq,H,d]) = fp8 attention of bf16 q [B,Sq,H,d], k, v
  // [B,Skv,H,d] (first kv_len rows). Pointers 16-byte aligned.
  absl::Status Run(const SdpaShape& shape, const void* q, const void* k,
                   const void* v, void* o, float scale);

  // Builds (or finds) the plan of `shape` and says whether it writes O as
  // e4m3 (true) or bf16 (false), and which engine it uses.
  absl::StatusOr<std::pair<bool, std::string>> Describe(const SdpaShape& shape);

  // The engine space of the fp8 graph (issue 16: the 1.5x target), for
  // sdpa_sweep --fp8: every config of heuristics modes A, B and fallback,
  // every engine, one knob moved at a time (at most `limit`), each timed over
  // `iters` executions of the SDPA alone (the quantization is the same for
  // all) on the operands a Run(shape, q, k, v, o, scale) just quantized. The
  // row marked default is the plan Run uses; rel_l2 is each config's output
  // (as the plan writes it, e4m3 or bf16) against the default's.
  struct SweepRow {
    std::string config;
    int64_t workspace = 0;
    double ms = -1;
    double rel_l2 = -1;
    bool is_default = false;
  };
  absl::StatusOr<std::vector<SweepRow>> Sweep(const SdpaShape& shape, const void* q,
                                              const void* k, const void* v, void* o,
                                              float scale, int iters, size_t limit);

  // The device buffers of every plan (a captured graph keeps them alive).
  std::vector<std::shared_ptr<void>> buffers() const;

  size_t cudnn_version() const { return version_; }

 private:
  struct Plan {
    std::vector<CudnnDescPtr> keep;
    CudnnDescPtr plan;
    int64_t workspace = 0;
    bool o_fp8 = false;
    std::string engine;
    std::shared_ptr<void> q8, k8, v8, o8, slots, workspace_mem;
  };
  using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

  CudnnSdpaFp8(CudnnPtr handle, cudaStream_t stream, size_t version,
               Allocate allocate)
      : handle_(std::move(handle)),
        stream_(stream),
        version_(version),
        allocate_(std::move(allocate)) {}

  absl::StatusOr<Plan*> GetPlan(const SdpaShape& shape);
  absl::StatusOr<std::unique_ptr<Plan>> Build(const SdpaShape& shape);
  absl::Status Execute(const Plan& plan, void* o, float scale);

  CudnnPtr handle_;
  cudaStream_t stream_;
  size_t version_;
  Allocate allocate_;
  std::vector<bool> o_kinds_ = {false, true};  // e4m3 O? in the order tried
  std::map<Key, std::unique_ptr<Plan>> plans_;
};

}  // namespace dn::worker::cuda

#endif  // DN_WORKER_CUDA_SDPA_FP8_H_
