// File: worker/cuda/sdpa.h
//
// CudnnSdpa: bf16 non-causal scaled-dot-product attention forward through
// cuDNN's backend C API alone (no cudnn-frontend), following
// /work/shared/docs/cudnn-sdpa.md (verified on H100 with cuDNN 9.19):
//
// - Runtime cuDNN >= 9.13.1: one CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR
//   ("unified" form). Older 9.x: the 10-node composite graph (matmul, scale,
//   max, sub, exp, sum, log, add -> stats, div -> bf16 P, matmul). 9.10.0/1
//   are refused (the frontend refuses bf16 SDPA there: known bugs).
//   DN_CUDNN_SDPA=composite forces the composite form (to test it).
// - Q/K/V/O stay token-major [B,S,H,d] in memory; the descriptors see
//   [B,H,S,d] through strides [S*H*d, d, H*d, 1]. kv_len < Skv is handled by
//   giving K and V the dims [B,H,kv_len,d] with the full buffer's strides, so
//   the padding rows are simply never read.
// - The scale is a by-value FLOAT tensor: one plan serves any scale.
// - Plans (descriptors + execution plan + workspace size) are cached per
//   (B, H, Sq, Skv, kv_len, d, form); strides follow from these.
// - The workspace is owned by the caller, sized at start-up; engine configs
//   that need more are skipped.
// - DN_CUDNN_SDPA_AUTOTUNE=1: the first (uncaptured) call of each shape times
//   the engine space (Sweep) and keeps the fastest config; otherwise the
//   first config of heuristics mode A is used, as measured in
//   docs/PERFORMANCE.md ("cuDNN engine space").
//
// Diagnosis: "not supported" shows up as zero heuristic results or failing
// plan finalizes, with the reasons logged by cuDNN only at warning level:
// run with CUDNN_LOGLEVEL_DBG=2 CUDNN_LOGDEST_DBG=stderr.
#ifndef DN_WORKER_CUDA_SDPA_H_
#define DN_WORKER_CUDA_SDPA_H_

#include <cuda_runtime_api.h>
#include <cudnn_graph.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/cuda/cuda_handles.h"

namespace dn::worker::cuda {

struct SdpaShape {
  int64_t batch = 1;
  int64_t heads = 1;
  int64_t seq_q = 1;
  int64_t seq_kv = 1;  // rows of the K/V buffers (the stride)
  int64_t kv_len = 1;  // rows attended (<= seq_kv)
  int64_t head_dim = 128;
};

class CudnnSdpa {
 public:
  enum class Form { kUnified, kComposite };

  // Binds a new cuDNN handle to `stream`. `workspace` (device memory of
  // `workspace_bytes`) must outlive this object.
  static absl::StatusOr<std::unique_ptr<CudnnSdpa>> Create(
      cudaStream_t stream, void* workspace, size_t workspace_bytes);

  // o = softmax(q k^T * scale) v for bf16 q, o [B,Sq,H,d] and k, v
  // [B,Skv,H,d] (first kv_len rows). Pointers must be 16-byte aligned.
  absl::Status Run(const SdpaShape& shape, const void* q, const void* k,
                   const void* v, void* o, float scale);

  // The engine space for one shape, timed on the given buffers (o is
  // overwritten): both graph forms (unified SDPA_FWD op where the runtime has
  // it, and the composite graph), every config of heuristics modes A, B and
  // fallback, every engine of the graph with default knobs, and each
  // heuristics config with one knob moved at a time; at most `limit`
  // candidates per form. Each row is the median of `iters` runs (CUDA events),
  // ms < 0 where the config failed. With `adopt`, the fastest becomes the
  // plan Run uses for this shape. Not while the stream is capturing.
  struct SweepRow {
    std::string config;
    int64_t workspace = 0;
    double ms = -1;
    bool is_default = false;  // the config Run picks without autotuning
  };
  absl::StatusOr<std::vector<SweepRow>> Sweep(const SdpaShape& shape,
                                              const void* q, const void* k,
                                              const void* v, void* o,
                                              float scale, int iters,
                                              size_t limit, bool adopt);

  Form form() const { return form_; }
  size_t cudnn_version() const { return version_; }

 private:
  struct Plan {
    std::vector<CudnnDescPtr> keep;  // every descriptor the plan refers to
    CudnnDescPtr plan;
    int64_t workspace = 0;
    std::string engine;  // for error messages
  };
  using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

  CudnnSdpa(CudnnPtr handle, cudaStream_t stream, Form form, size_t version,
            void* workspace, size_t workspace_bytes, bool autotune)
      : handle_(std::move(handle)),
        stream_(stream),
        autotune_(autotune),
        form_(form),
        version_(version),
        workspace_(workspace),
        workspace_bytes_(workspace_bytes) {}

  absl::StatusOr<Plan*> GetPlan(const SdpaShape& shape);
  absl::StatusOr<std::unique_ptr<Plan>> Build(const SdpaShape& shape);
  static std::unique_ptr<Plan> Adopt(std::vector<CudnnDescPtr> graph_keep,
                                     CudnnDescPtr graph, CudnnDescPtr devprop,
                                     CudnnDescPtr exec,
                                     std::vector<CudnnDescPtr> exec_keep,
                                     int64_t workspace, std::string name);
  absl::Status CheckAligned(const SdpaShape& shape, const void* q,
                            const void* k, const void* v, const void* o) const;
  absl::Status Execute(cudnnBackendDescriptor_t plan, const void* q,
                       const void* k, const void* v, void* o, float scale);

  CudnnPtr handle_;
  cudaStream_t stream_;
  bool autotune_;
  std::set<Key> tuned_;
  Form form_;
  size_t version_;
  void* workspace_;
  size_t workspace_bytes_;
  std::map<Key, std::unique_ptr<Plan>> plans_;
};

}  // namespace dn::worker::cuda

#endif  // DN_WORKER_CUDA_SDPA_H_
