// File: worker/cuda/cudnn_graph.h
//
// Building blocks for cuDNN backend-API operation graphs, shared by the bf16
// SDPA (sdpa.cc) and the fp8 SDPA (sdpa_fp8.cc): descriptor creation,
// tensors, matmul/pointwise/reduction nodes, graph finalization (with the
// handle and device-properties descriptor the Hopper engines need), and the
// engine-config search (heuristics modes, engines, knobs) that turns a graph
// into finalized execution plans. Every cuDNN return code goes through
// base/cuda_check.h. /work/shared/docs/cudnn-sdpa.md has the background.
#ifndef DN_WORKER_CUDA_CUDNN_GRAPH_H_
#define DN_WORKER_CUDA_CUDNN_GRAPH_H_

#include <cudnn_graph.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/cuda/cuda_handles.h"

namespace dn::worker::cuda {

// CUDNN_ATTR_OPERATIONGRAPH_HANDLE / CUDNN_ATTR_EXECUTION_PLAN_HANDLE, by
// value: the enumerators are deprecated in the 9.19 headers.
inline constexpr auto kGraphHandleAttr = static_cast<cudnnBackendAttributeName_t>(800);
inline constexpr auto kPlanHandleAttr = static_cast<cudnnBackendAttributeName_t>(400);

absl::StatusOr<CudnnDescPtr> NewDesc(cudnnBackendDescriptorType_t type);
absl::Status SetDesc(const CudnnDescPtr& d, cudnnBackendAttributeName_t name,
                     const CudnnDescPtr& value);

struct Dims4 {
  int64_t v[4];
};

// A finalized tensor descriptor (16-byte alignment declared).
absl::StatusOr<CudnnDescPtr> MakeTensor(int64_t uid, cudnnDataType_t dtype,
                                        Dims4 dims, Dims4 strides,
                                        bool is_virtual, bool by_value = false);

// Graph nodes (FLOAT compute/math precision). Each appends its descriptor to
// `keep` and returns the finalized operation. `b` may be null (unary ops).
absl::StatusOr<CudnnDescPtr> MatmulOp(const CudnnDescPtr& a, const CudnnDescPtr& b,
                                      const CudnnDescPtr& c,
                                      std::vector<CudnnDescPtr>* keep);
absl::StatusOr<CudnnDescPtr> PointwiseOp(cudnnPointwiseMode_t mode,
                                         const CudnnDescPtr& x,
                                         const CudnnDescPtr* b,
                                         const CudnnDescPtr& y,
                                         std::vector<CudnnDescPtr>* keep);
absl::StatusOr<CudnnDescPtr> ReductionOp(cudnnReduceTensorOp_t reduce,
                                         const CudnnDescPtr& x,
                                         const CudnnDescPtr& y,
                                         std::vector<CudnnDescPtr>* keep);

// The operation graph of one shape (and the descriptors it refers to).
struct GraphParts {
  std::vector<CudnnDescPtr> keep;
  CudnnDescPtr graph;
  CudnnDescPtr devprop;  // null where the runtime has no DEVICEPROP descriptor
};

// Finalizes the operation graph of `ops` (bound to `handle`) into out->graph,
// adds the device-properties descriptor where the runtime has one, and moves
// the ops into out->keep.
absl::Status FinalizeGraph(cudnnHandle_t handle, std::vector<CudnnDescPtr> ops,
                           GraphParts* out);

// One engine configuration whose execution plan finalized.
struct Candidate {
  CudnnDescPtr exec;
  std::vector<CudnnDescPtr> keep;  // its config, engine, knob choices
  int64_t workspace = 0;
  std::string name;
};

// Candidates for graph `g`: without `explore`, the first config of heuristics
// mode A (then fallback) that finalizes and fits `workspace_bytes`. With
// `explore`: every config of modes A, B and fallback, every engine of the
// graph with its default knobs, and each heuristics config with one knob
// moved at a time (at most `limit` candidates in all). `tried` collects what
// was offered and why configs were refused (for error messages).
absl::StatusOr<std::vector<Candidate>> Candidates(cudnnHandle_t handle,
                                                  GraphParts& g, const char* form,
                                                  size_t workspace_bytes,
                                                  bool explore, size_t limit,
                                                  std::string* tried);

}  // namespace dn::worker::cuda

#endif  // DN_WORKER_CUDA_CUDNN_GRAPH_H_
