#include "worker/cuda/sdpa.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/log.h"
#include "base/status_macros.h"

namespace dn::worker::cuda {

namespace {

// Tensor uids: the real ones the variant pack binds, then virtual ones.
constexpr int64_t kUidQ = 1, kUidK = 2, kUidV = 3, kUidO = 4, kUidScale = 5;
constexpr int64_t kUidScores = 101, kUidScaled = 102, kUidMax = 103,
                  kUidShifted = 104, kUidExp = 105, kUidSum = 106,
                  kUidLogSum = 107, kUidStats = 108, kUidProbs = 109;

// Runtime versions: the single SDPA op needs 9.13.1; 9.10.0/9.10.1 have
// known bf16 SDPA forward bugs (the frontend refuses them).
//
// Device: cuDNN must be told which GPU the graph targets. Without it the
// heuristics see smVersion 0 and every engine reports ARCH_MISMATCH (seen on
// H100 with 9.19: "only Hopper is supported for this engine"). We pass the
// handle through the deprecated-but-honoured OPERATIONGRAPH/EXECUTION_PLAN
// handle attributes and, where the runtime has it (9.x DEVICEPROP
// descriptor), through ENGINEHEUR_DEVICEPROP / EXECUTION_PLAN_DEVICEPROP too.
constexpr size_t kUnifiedSince = 91301;
// CUDNN_ATTR_OPERATIONGRAPH_HANDLE / CUDNN_ATTR_EXECUTION_PLAN_HANDLE, by
// value: the enumerators are deprecated in the 9.19 headers.
constexpr auto kGraphHandleAttr = static_cast<cudnnBackendAttributeName_t>(800);
constexpr auto kPlanHandleAttr = static_cast<cudnnBackendAttributeName_t>(400);

absl::StatusOr<CudnnDescPtr> NewDesc(cudnnBackendDescriptorType_t type) {
  cudnnBackendDescriptor_t d = nullptr;
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendCreateDescriptor(type, &d));
  return CudnnDescPtr(d);
}

absl::Status SetDesc(const CudnnDescPtr& d, cudnnBackendAttributeName_t name,
                     const CudnnDescPtr& value) {
  cudnnBackendDescriptor_t raw = value.get();
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      d.get(), name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &raw));
  return absl::OkStatus();
}

struct Dims4 {
  int64_t v[4];
};

absl::StatusOr<CudnnDescPtr> MakeTensor(int64_t uid, cudnnDataType_t dtype,
                                        Dims4 dims, Dims4 strides,
                                        bool is_virtual, bool by_value = false) {
  DN_ASSIGN_OR_RETURN(CudnnDescPtr t, NewDesc(CUDNN_BACKEND_TENSOR_DESCRIPTOR));
  const int64_t alignment = 16;
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      t.get(), CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &dtype));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      t.get(), CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims.v));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      t.get(), CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides.v));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      t.get(), CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      t.get(), CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1,
      &alignment));
  if (is_virtual) {
    const bool yes = true;
    DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
        t.get(), CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &yes));
  }
  if (by_value) {
    const bool yes = true;
    DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
        t.get(), CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &yes));
  }
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendFinalize(t.get()));
  return t;
}

// Composite-graph node builders. Each appends its descriptor(s) to `keep`
// and returns the finalized operation.
absl::StatusOr<CudnnDescPtr> MatmulOp(const CudnnDescPtr& a,
                                      const CudnnDescPtr& b,
                                      const CudnnDescPtr& c,
                                      std::vector<CudnnDescPtr>* keep) {
  DN_ASSIGN_OR_RETURN(CudnnDescPtr desc, NewDesc(CUDNN_BACKEND_MATMUL_DESCRIPTOR));
  const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      desc.get(), CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendFinalize(desc.get()));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr op,
                      NewDesc(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR));
  DN_RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_MATMUL_ADESC, a));
  DN_RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_MATMUL_BDESC, b));
  DN_RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_MATMUL_CDESC, c));
  DN_RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_MATMUL_DESC, desc));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendFinalize(op.get()));
  keep->push_back(std::move(desc));
  return op;
}

absl::StatusOr<CudnnDescPtr> PointwiseOp(cudnnPointwiseMode_t mode,
                                         const CudnnDescPtr& x,
                                         const CudnnDescPtr* b,
                                         const CudnnDescPtr& y,
                                         std::vector<CudnnDescPtr>* keep) {
  DN_ASSIGN_OR_RETURN(CudnnDescPtr desc,
                      NewDesc(CUDNN_BACKEND_POINTWISE_DESCRIPTOR));
  const cudnnDataType_t prec = CUDNN_DATA_FLOAT;
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      desc.get(), CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1,
      &mode));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      desc.get(), CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1,
      &prec));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendFinalize(desc.get()));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr op,
                      NewDesc(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR));
  DN_RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, desc));
  DN_RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x));
  if (b != nullptr)
    DN_RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, *b));
  DN_RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendFinalize(op.get()));
  keep->push_back(std::move(desc));
  return op;
}

absl::StatusOr<CudnnDescPtr> ReductionOp(cudnnReduceTensorOp_t reduce,
                                         const CudnnDescPtr& x,
                                         const CudnnDescPtr& y,
                                         std::vector<CudnnDescPtr>* keep) {
  DN_ASSIGN_OR_RETURN(CudnnDescPtr desc,
                      NewDesc(CUDNN_BACKEND_REDUCTION_DESCRIPTOR));
  const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      desc.get(), CUDNN_ATTR_REDUCTION_OPERATOR,
      CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &reduce));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      desc.get(), CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1,
      &comp));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendFinalize(desc.get()));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr op,
                      NewDesc(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR));
  DN_RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_REDUCTION_DESC, desc));
  DN_RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x));
  DN_RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendFinalize(op.get()));
  keep->push_back(std::move(desc));
  return op;
}

std::string ShapeText(const SdpaShape& s) {
  return absl::StrCat("B=", s.batch, " H=", s.heads, " Sq=", s.seq_q,
                      " Skv=", s.seq_kv, " kv_len=", s.kv_len,
                      " d=", s.head_dim);
}

}  // namespace

absl::StatusOr<std::unique_ptr<CudnnSdpa>> CudnnSdpa::Create(
    cudaStream_t stream, void* workspace, size_t workspace_bytes) {
  const size_t version = cudnnGetVersion();
  if (version < 90000)
    return absl::FailedPreconditionError(absl::StrCat(
        "cuda Attention: cuDNN runtime ", version, " is older than 9.0"));
  if (version == 91000 || version == 91001)
    return absl::FailedPreconditionError(absl::StrCat(
        "cuda Attention: cuDNN runtime ", version,
        " (9.10.0/9.10.1) has known bf16 SDPA bugs; use 9.10.2 or newer"));
  Form form = version >= kUnifiedSince ? Form::kUnified : Form::kComposite;
  const char* forced = std::getenv("DN_CUDNN_SDPA");
  if (forced != nullptr && std::strcmp(forced, "composite") == 0)
    form = Form::kComposite;
  cudnnHandle_t raw = nullptr;
  DN_CUDNN_RETURN_IF_ERROR(cudnnCreate(&raw));
  CudnnPtr handle(raw);
  DN_CUDNN_RETURN_IF_ERROR(cudnnSetStream(raw, stream));
  const char* tune = std::getenv("DN_CUDNN_SDPA_AUTOTUNE");
  const bool autotune = tune != nullptr && std::strcmp(tune, "1") == 0;
  return std::unique_ptr<CudnnSdpa>(new CudnnSdpa(std::move(handle), stream, form,
                                                  version, workspace,
                                                  workspace_bytes, autotune));
}

namespace {

// The operation graph of one shape (and the descriptors it refers to).
struct GraphParts {
  std::vector<CudnnDescPtr> keep;
  CudnnDescPtr graph;
  CudnnDescPtr devprop;  // null where the runtime has no DEVICEPROP descriptor
};

absl::StatusOr<GraphParts> BuildGraph(cudnnHandle_t handle, CudnnSdpa::Form form,
                                      const SdpaShape& s) {
  GraphParts parts;
  std::vector<CudnnDescPtr>& keep = parts.keep;
  const int64_t B = s.batch, H = s.heads, Sq = s.seq_q, Skv = s.seq_kv,
                L = s.kv_len, D = s.head_dim;
  // Token-major [B,S,H,D] buffers seen as [B,H,S,D].
  const Dims4 q_dims{{B, H, Sq, D}}, q_strides{{Sq * H * D, D, H * D, 1}};
  const Dims4 kv_dims{{B, H, L, D}}, kv_strides{{Skv * H * D, D, H * D, 1}};
  const Dims4 one{{1, 1, 1, 1}};

  DN_ASSIGN_OR_RETURN(CudnnDescPtr q, MakeTensor(kUidQ, CUDNN_DATA_BFLOAT16,
                                                 q_dims, q_strides, false));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr v, MakeTensor(kUidV, CUDNN_DATA_BFLOAT16,
                                                 kv_dims, kv_strides, false));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr o, MakeTensor(kUidO, CUDNN_DATA_BFLOAT16,
                                                 q_dims, q_strides, false));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr scale, MakeTensor(kUidScale, CUDNN_DATA_FLOAT,
                                                     one, one, false, true));
  std::vector<CudnnDescPtr> ops;
  if (form == CudnnSdpa::Form::kUnified) {
    // The single op takes plain K [B,H,L,D].
    DN_ASSIGN_OR_RETURN(CudnnDescPtr k, MakeTensor(kUidK, CUDNN_DATA_BFLOAT16,
                                                   kv_dims, kv_strides, false));
    DN_ASSIGN_OR_RETURN(CudnnDescPtr op,
                        NewDesc(CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR));
    DN_RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_SDPA_FWD_QDESC, q));
    DN_RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_SDPA_FWD_KDESC, k));
    DN_RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_SDPA_FWD_VDESC, v));
    DN_RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_SDPA_FWD_ODESC, o));
    DN_RETURN_IF_ERROR(SetDesc(op, CUDNN_ATTR_OPERATION_SDPA_FWD_SCALEDESC, scale));
    DN_CUDNN_RETURN_IF_ERROR(cudnnBackendFinalize(op.get()));
    keep.push_back(std::move(k));
    ops.push_back(std::move(op));
  } else {
    // The composite form takes the transposed K view [B,H,D,L]: K's strides
    // with the last two swapped.
    const Dims4 kt_dims{{B, H, D, L}}, kt_strides{{Skv * H * D, D, 1, H * D}};
    const Dims4 score_dims{{B, H, Sq, L}},
        score_strides{{H * Sq * L, Sq * L, L, 1}};
    const Dims4 row_dims{{B, H, Sq, 1}}, row_strides{{H * Sq, Sq, 1, 1}};
    DN_ASSIGN_OR_RETURN(CudnnDescPtr kt, MakeTensor(kUidK, CUDNN_DATA_BFLOAT16,
                                                    kt_dims, kt_strides, false));
    auto score = [&](int64_t uid, cudnnDataType_t dt) {
      return MakeTensor(uid, dt, score_dims, score_strides, true);
    };
    auto row = [&](int64_t uid) {
      return MakeTensor(uid, CUDNN_DATA_FLOAT, row_dims, row_strides, true);
    };
    DN_ASSIGN_OR_RETURN(CudnnDescPtr scores, score(kUidScores, CUDNN_DATA_FLOAT));
    DN_ASSIGN_OR_RETURN(CudnnDescPtr scaled, score(kUidScaled, CUDNN_DATA_FLOAT));
    DN_ASSIGN_OR_RETURN(CudnnDescPtr mx, row(kUidMax));
    DN_ASSIGN_OR_RETURN(CudnnDescPtr shifted, score(kUidShifted, CUDNN_DATA_FLOAT));
    DN_ASSIGN_OR_RETURN(CudnnDescPtr ex, score(kUidExp, CUDNN_DATA_FLOAT));
    DN_ASSIGN_OR_RETURN(CudnnDescPtr sum, row(kUidSum));
    DN_ASSIGN_OR_RETURN(CudnnDescPtr logsum, row(kUidLogSum));
    DN_ASSIGN_OR_RETURN(CudnnDescPtr stats, row(kUidStats));
    // P is virtual but bf16 (the I/O type): a FLOAT P gives zero configs.
    DN_ASSIGN_OR_RETURN(CudnnDescPtr probs, score(kUidProbs, CUDNN_DATA_BFLOAT16));

    DN_ASSIGN_OR_RETURN(CudnnDescPtr op1, MatmulOp(q, kt, scores, &keep));
    DN_ASSIGN_OR_RETURN(CudnnDescPtr op2, PointwiseOp(CUDNN_POINTWISE_MUL, scores,
                                                      &scale, scaled, &keep));
    DN_ASSIGN_OR_RETURN(CudnnDescPtr op3, ReductionOp(CUDNN_REDUCE_TENSOR_MAX,
                                                      scaled, mx, &keep));
    DN_ASSIGN_OR_RETURN(CudnnDescPtr op4, PointwiseOp(CUDNN_POINTWISE_SUB, scaled,
                                                      &mx, shifted, &keep));
    DN_ASSIGN_OR_RETURN(CudnnDescPtr op5, PointwiseOp(CUDNN_POINTWISE_EXP, shifted,
                                                      nullptr, ex, &keep));
    DN_ASSIGN_OR_RETURN(CudnnDescPtr op6, ReductionOp(CUDNN_REDUCE_TENSOR_ADD, ex,
                                                      sum, &keep));
    // Steps 7-8 (the log-sum-exp stats) are required even though the stats
    // stay virtual: without them the heuristics return zero configs.
    DN_ASSIGN_OR_RETURN(CudnnDescPtr op7, PointwiseOp(CUDNN_POINTWISE_LOG, sum,
                                                      nullptr, logsum, &keep));
    DN_ASSIGN_OR_RETURN(CudnnDescPtr op8, PointwiseOp(CUDNN_POINTWISE_ADD, mx,
                                                      &logsum, stats, &keep));
    DN_ASSIGN_OR_RETURN(CudnnDescPtr op9, PointwiseOp(CUDNN_POINTWISE_DIV, ex,
                                                      &sum, probs, &keep));
    DN_ASSIGN_OR_RETURN(CudnnDescPtr op10, MatmulOp(probs, v, o, &keep));
    for (CudnnDescPtr* p : {&op1, &op2, &op3, &op4, &op5, &op6, &op7, &op8,
                            &op9, &op10})
      ops.push_back(std::move(*p));
    for (CudnnDescPtr* p : {&kt, &scores, &scaled, &mx, &shifted, &ex, &sum,
                            &logsum, &stats, &probs})
      keep.push_back(std::move(*p));
  }
  for (CudnnDescPtr* p : {&q, &v, &o, &scale}) keep.push_back(std::move(*p));

  // Operation graph.
  DN_ASSIGN_OR_RETURN(CudnnDescPtr graph,
                      NewDesc(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR));
  std::vector<cudnnBackendDescriptor_t> raw_ops;
  for (const CudnnDescPtr& op : ops) raw_ops.push_back(op.get());
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      graph.get(), CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
      static_cast<int64_t>(raw_ops.size()), raw_ops.data()));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      graph.get(), kGraphHandleAttr, CUDNN_TYPE_HANDLE, 1, &handle));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendFinalize(graph.get()));
  // Optional device-properties descriptor (ignored when unsupported).
  {
    cudnnBackendDescriptor_t d = nullptr;
    if (cudnnBackendCreateDescriptor(CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR, &d) ==
        CUDNN_STATUS_SUCCESS) {
      CudnnDescPtr candidate(d);
      if (cudnnBackendSetAttribute(candidate.get(), CUDNN_ATTR_DEVICEPROP_HANDLE,
                                   CUDNN_TYPE_HANDLE, 1,
                                   &handle) == CUDNN_STATUS_SUCCESS &&
          cudnnBackendFinalize(candidate.get()) == CUDNN_STATUS_SUCCESS)
        parts.devprop = std::move(candidate);
    }
  }
  for (CudnnDescPtr& op : ops) keep.push_back(std::move(op));
  parts.graph = std::move(graph);
  return parts;
}

// One engine configuration whose execution plan finalized.
struct Candidate {
  CudnnDescPtr exec;
  std::vector<CudnnDescPtr> keep;  // its config, engine, knob choices
  int64_t workspace = 0;
  std::string name;
};

void SetDevprop(const GraphParts& g, cudnnBackendDescriptor_t d,
                cudnnBackendAttributeName_t attr) {
  if (!g.devprop) return;
  cudnnBackendDescriptor_t dp = g.devprop.get();
  (void)cudnnBackendSetAttribute(d, attr, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &dp);
}

// Execution plan of `cfg`; appends the reason to `tried` when it does not
// finalize or needs more than `workspace_bytes`.
absl::StatusOr<std::optional<Candidate>> MakeCandidate(
    cudnnHandle_t handle, const GraphParts& g, CudnnDescPtr cfg,
    std::vector<CudnnDescPtr> keep, size_t workspace_bytes, std::string name,
    std::string* tried) {
  DN_ASSIGN_OR_RETURN(CudnnDescPtr exec,
                      NewDesc(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR));
  DN_RETURN_IF_ERROR(SetDesc(exec, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, cfg));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      exec.get(), kPlanHandleAttr, CUDNN_TYPE_HANDLE, 1, &handle));
  SetDevprop(g, exec.get(), CUDNN_ATTR_EXECUTION_PLAN_DEVICEPROP);
  const cudnnStatus_t fin = cudnnBackendFinalize(exec.get());
  if (fin != CUDNN_STATUS_SUCCESS) {
    char reason[256] = {0};
    cudnnGetLastErrorString(reason, sizeof(reason));
    absl::StrAppend(tried, ", ", name, ": ", cudnnGetErrorString(fin),
                    reason[0] ? absl::StrCat(" (", reason, ")") : "");
    return std::optional<Candidate>();
  }
  int64_t ws = 0, n = 0;
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendGetAttribute(
      exec.get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1,
      &n, &ws));
  if (ws < 0 || static_cast<size_t>(ws) > workspace_bytes) {
    absl::StrAppend(tried, ", ", name, ": needs ", ws, " workspace bytes");
    return std::optional<Candidate>();
  }
  Candidate c;
  c.exec = std::move(exec);
  c.keep = std::move(keep);
  c.keep.push_back(std::move(cfg));
  c.workspace = ws;
  c.name = std::move(name);
  return std::optional<Candidate>(std::move(c));
}

// The configs the heuristics offer in `mode` (finalized ENGINECFG descriptors).
absl::StatusOr<std::vector<CudnnDescPtr>> HeuristicConfigs(
    const GraphParts& g, cudnnBackendHeurMode_t mode, CudnnDescPtr* heur_out) {
  DN_ASSIGN_OR_RETURN(CudnnDescPtr heur, NewDesc(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR));
  DN_RETURN_IF_ERROR(SetDesc(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, g.graph));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      heur.get(), CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode));
  SetDevprop(g, heur.get(), CUDNN_ATTR_ENGINEHEUR_DEVICEPROP);
  std::vector<CudnnDescPtr> cfgs;
  if (cudnnBackendFinalize(heur.get()) != CUDNN_STATUS_SUCCESS) return cfgs;
  int64_t count = 0;
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendGetAttribute(
      heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0,
      &count, nullptr));
  std::vector<cudnnBackendDescriptor_t> raw;
  for (int64_t i = 0; i < count; ++i) {
    DN_ASSIGN_OR_RETURN(CudnnDescPtr cfg, NewDesc(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR));
    raw.push_back(cfg.get());
    cfgs.push_back(std::move(cfg));
  }
  int64_t got = 0;
  if (count > 0)
    DN_CUDNN_RETURN_IF_ERROR(cudnnBackendGetAttribute(
        heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
        count, &got, raw.data()));
  cfgs.resize(static_cast<size_t>(std::max<int64_t>(0, std::min(got, count))));
  *heur_out = std::move(heur);
  return cfgs;
}

const char* HeurName(cudnnBackendHeurMode_t mode) {
  switch (mode) {
    case CUDNN_HEUR_MODE_A: return "A";
    case CUDNN_HEUR_MODE_B: return "B";
    case CUDNN_HEUR_MODE_FALLBACK: return "fallback";
    default: return "instant";
  }
}

struct Knob {
  cudnnBackendKnobType_t type;
  int64_t min = 0, max = 0, stride = 1, value = 0;
};

// The engine of a heuristics config: its global index, its knobs (range and
// the value the config chose).
absl::Status DescribeConfig(const CudnnDescPtr& cfg, int64_t* global_index,
                            std::vector<Knob>* knobs) {
  DN_ASSIGN_OR_RETURN(CudnnDescPtr engine, NewDesc(CUDNN_BACKEND_ENGINE_DESCRIPTOR));
  cudnnBackendDescriptor_t raw_engine = engine.get();
  int64_t n = 0;
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendGetAttribute(
      cfg.get(), CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &n,
      &raw_engine));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendGetAttribute(
      engine.get(), CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &n,
      global_index));
  auto descs = [](const CudnnDescPtr& d, cudnnBackendAttributeName_t attr,
                  cudnnBackendDescriptorType_t type)
      -> absl::StatusOr<std::vector<CudnnDescPtr>> {
    int64_t count = 0;
    DN_CUDNN_RETURN_IF_ERROR(cudnnBackendGetAttribute(
        d.get(), attr, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr));
    std::vector<CudnnDescPtr> out;
    std::vector<cudnnBackendDescriptor_t> raw;
    for (int64_t i = 0; i < count; ++i) {
      DN_ASSIGN_OR_RETURN(CudnnDescPtr x, NewDesc(type));
      raw.push_back(x.get());
      out.push_back(std::move(x));
    }
    int64_t got = 0;
    if (count > 0)
      DN_CUDNN_RETURN_IF_ERROR(cudnnBackendGetAttribute(
          d.get(), attr, CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &got, raw.data()));
    out.resize(static_cast<size_t>(std::max<int64_t>(0, std::min(got, count))));
    return out;
  };
  DN_ASSIGN_OR_RETURN(std::vector<CudnnDescPtr> infos,
                      descs(engine, CUDNN_ATTR_ENGINE_KNOB_INFO,
                            CUDNN_BACKEND_KNOB_INFO_DESCRIPTOR));
  DN_ASSIGN_OR_RETURN(std::vector<CudnnDescPtr> choices,
                      descs(cfg, CUDNN_ATTR_ENGINECFG_KNOB_CHOICES,
                            CUDNN_BACKEND_KNOB_CHOICE_DESCRIPTOR));
  knobs->clear();
  for (const CudnnDescPtr& info : infos) {
    Knob k{};
    DN_CUDNN_RETURN_IF_ERROR(cudnnBackendGetAttribute(
        info.get(), CUDNN_ATTR_KNOB_INFO_TYPE, CUDNN_TYPE_KNOB_TYPE, 1, &n, &k.type));
    DN_CUDNN_RETURN_IF_ERROR(cudnnBackendGetAttribute(
        info.get(), CUDNN_ATTR_KNOB_INFO_MINIMUM_VALUE, CUDNN_TYPE_INT64, 1, &n, &k.min));
    DN_CUDNN_RETURN_IF_ERROR(cudnnBackendGetAttribute(
        info.get(), CUDNN_ATTR_KNOB_INFO_MAXIMUM_VALUE, CUDNN_TYPE_INT64, 1, &n, &k.max));
    DN_CUDNN_RETURN_IF_ERROR(cudnnBackendGetAttribute(
        info.get(), CUDNN_ATTR_KNOB_INFO_STRIDE, CUDNN_TYPE_INT64, 1, &n, &k.stride));
    k.value = k.min;
    knobs->push_back(k);
  }
  for (const CudnnDescPtr& choice : choices) {
    cudnnBackendKnobType_t type{};
    int64_t value = 0;
    DN_CUDNN_RETURN_IF_ERROR(cudnnBackendGetAttribute(
        choice.get(), CUDNN_ATTR_KNOB_CHOICE_KNOB_TYPE, CUDNN_TYPE_KNOB_TYPE, 1, &n, &type));
    DN_CUDNN_RETURN_IF_ERROR(cudnnBackendGetAttribute(
        choice.get(), CUDNN_ATTR_KNOB_CHOICE_KNOB_VALUE, CUDNN_TYPE_INT64, 1, &n, &value));
    for (Knob& k : *knobs)
      if (k.type == type) k.value = value;
  }
  return absl::OkStatus();
}

// A config of engine `global_index` with the given knob values (none: the
// engine's defaults). The engine and knob descriptors go to `keep`.
absl::StatusOr<CudnnDescPtr> MakeConfig(const GraphParts& g, int64_t global_index,
                                        const std::vector<Knob>& knobs,
                                        std::vector<CudnnDescPtr>* keep) {
  DN_ASSIGN_OR_RETURN(CudnnDescPtr engine, NewDesc(CUDNN_BACKEND_ENGINE_DESCRIPTOR));
  DN_RETURN_IF_ERROR(SetDesc(engine, CUDNN_ATTR_ENGINE_OPERATION_GRAPH, g.graph));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      engine.get(), CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1,
      &global_index));
  SetDevprop(g, engine.get(), CUDNN_ATTR_ENGINE_DEVICEPROP);
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendFinalize(engine.get()));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr cfg, NewDesc(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR));
  DN_RETURN_IF_ERROR(SetDesc(cfg, CUDNN_ATTR_ENGINECFG_ENGINE, engine));
  std::vector<cudnnBackendDescriptor_t> raw;
  for (const Knob& k : knobs) {
    DN_ASSIGN_OR_RETURN(CudnnDescPtr choice,
                        NewDesc(CUDNN_BACKEND_KNOB_CHOICE_DESCRIPTOR));
    DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
        choice.get(), CUDNN_ATTR_KNOB_CHOICE_KNOB_TYPE, CUDNN_TYPE_KNOB_TYPE, 1, &k.type));
    DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
        choice.get(), CUDNN_ATTR_KNOB_CHOICE_KNOB_VALUE, CUDNN_TYPE_INT64, 1, &k.value));
    DN_CUDNN_RETURN_IF_ERROR(cudnnBackendFinalize(choice.get()));
    raw.push_back(choice.get());
    keep->push_back(std::move(choice));
  }
  if (!raw.empty())
    DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
        cfg.get(), CUDNN_ATTR_ENGINECFG_KNOB_CHOICES, CUDNN_TYPE_BACKEND_DESCRIPTOR,
        static_cast<int64_t>(raw.size()), raw.data()));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendFinalize(cfg.get()));
  keep->push_back(std::move(engine));
  return cfg;
}

std::string KnobText(const std::vector<Knob>& knobs) {
  std::string s;
  for (const Knob& k : knobs)
    absl::StrAppend(&s, s.empty() ? "" : ",", "k", static_cast<int>(k.type), "=", k.value);
  return s.empty() ? "-" : s;
}

// Candidates for graph `g`: without `explore`, the first config of heuristics
// mode A (then fallback) that finalizes (what Run uses). With `explore`:
// every config of modes A, B and fallback, every engine of the graph with its
// default knobs, and each heuristics config with one knob moved at a time
// (at most `limit` candidates in all).
absl::StatusOr<std::vector<Candidate>> Candidates(cudnnHandle_t handle,
                                                  GraphParts& g, const char* form,
                                                  size_t workspace_bytes,
                                                  bool explore, size_t limit,
                                                  std::string* tried) {
  std::vector<Candidate> out;
  std::vector<cudnnBackendHeurMode_t> modes = {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK};
  if (explore) modes = {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_B, CUDNN_HEUR_MODE_FALLBACK};
  struct Seen { int64_t engine; std::vector<Knob> knobs; };
  std::vector<Seen> heur_cfgs;
  auto add = [&](CudnnDescPtr cfg, std::vector<CudnnDescPtr> keep,
                 std::string name) -> absl::Status {
    DN_ASSIGN_OR_RETURN(std::optional<Candidate> c,
                        MakeCandidate(handle, g, std::move(cfg), std::move(keep),
                                      workspace_bytes, std::move(name), tried));
    if (c) out.push_back(std::move(*c));
    return absl::OkStatus();
  };
  for (cudnnBackendHeurMode_t mode : modes) {
    CudnnDescPtr heur;
    DN_ASSIGN_OR_RETURN(std::vector<CudnnDescPtr> cfgs, HeuristicConfigs(g, mode, &heur));
    absl::StrAppend(tried, tried->empty() ? "" : "; ", "mode ", HeurName(mode), ": ",
                    cfgs.size(), " configs");
    if (heur) g.keep.push_back(std::move(heur));
    for (size_t i = 0; i < cfgs.size() && out.size() < limit; ++i) {
      int64_t engine = -1;
      std::vector<Knob> knobs;
      if (explore && DescribeConfig(cfgs[i], &engine, &knobs).ok())
        heur_cfgs.push_back({engine, knobs});
      std::string name = absl::StrCat(form, " heuristics ", HeurName(mode), "#", i);
      if (explore) absl::StrAppend(&name, " engine ", engine, " knobs ", KnobText(knobs));
      DN_RETURN_IF_ERROR(add(std::move(cfgs[i]), {}, std::move(name)));
      if (!explore && !out.empty()) return out;
    }
  }
  if (!explore) return out;
  int64_t engines = 0, n = 0;
  (void)cudnnBackendGetAttribute(g.graph.get(), CUDNN_ATTR_OPERATIONGRAPH_ENGINE_GLOBAL_COUNT,
                                 CUDNN_TYPE_INT64, 1, &n, &engines);
  absl::StrAppend(tried, "; ", engines, " engines");
  for (int64_t e = 0; e < engines && out.size() < limit; ++e) {
    std::vector<CudnnDescPtr> keep;
    absl::StatusOr<CudnnDescPtr> cfg = MakeConfig(g, e, {}, &keep);
    if (!cfg.ok()) continue;  // engine does not support this graph
    DN_RETURN_IF_ERROR(add(std::move(*cfg), std::move(keep),
                           absl::StrCat(form, " engine ", e, " default knobs")));
  }
  for (const Seen& h : heur_cfgs) {
    for (size_t ki = 0; ki < h.knobs.size(); ++ki) {
      const Knob& k = h.knobs[ki];
      const int64_t stride = std::max<int64_t>(1, k.stride);
      int tries = 0;
      for (int64_t v = k.min; v <= k.max && tries < 12 && out.size() < limit;
           v += stride, ++tries) {
        if (v == k.value) continue;
        std::vector<Knob> knobs = h.knobs;
        knobs[ki].value = v;
        std::vector<CudnnDescPtr> keep;
        absl::StatusOr<CudnnDescPtr> cfg = MakeConfig(g, h.engine, knobs, &keep);
        if (!cfg.ok()) continue;
        DN_RETURN_IF_ERROR(add(std::move(*cfg), std::move(keep),
                               absl::StrCat(form, " engine ", h.engine, " knobs ",
                                            KnobText(knobs))));
      }
    }
  }
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<CudnnSdpa::Plan>> CudnnSdpa::Build(
    const SdpaShape& s) {
  DN_ASSIGN_OR_RETURN(GraphParts g, BuildGraph(handle_.get(), form_, s));
  std::string tried;
  DN_ASSIGN_OR_RETURN(
      std::vector<Candidate> found,
      Candidates(handle_.get(), g, form_ == Form::kUnified ? "unified" : "composite",
                 workspace_bytes_, /*explore=*/false, 1, &tried));
  if (found.empty())
    return absl::UnimplementedError(absl::StrCat(
        "cuda Attention: cuDNN ", version_, " (",
        form_ == Form::kUnified ? "SDPA_FWD op" : "composite graph",
        ") has no engine for bf16 ", ShapeText(s), " [", tried,
        "]; run with CUDNN_LOGLEVEL_DBG=2 CUDNN_LOGDEST_DBG=stderr for the "
        "reasons"));
  return Adopt(std::move(g.keep), std::move(g.graph), std::move(g.devprop),
               std::move(found.front().exec), std::move(found.front().keep),
               found.front().workspace, found.front().name);
}

std::unique_ptr<CudnnSdpa::Plan> CudnnSdpa::Adopt(
    std::vector<CudnnDescPtr> graph_keep, CudnnDescPtr graph, CudnnDescPtr devprop,
    CudnnDescPtr exec, std::vector<CudnnDescPtr> exec_keep, int64_t workspace,
    std::string name) {
  auto plan = std::make_unique<Plan>();
  plan->keep = std::move(graph_keep);
  plan->keep.push_back(std::move(graph));
  if (devprop) plan->keep.push_back(std::move(devprop));
  for (CudnnDescPtr& d : exec_keep) plan->keep.push_back(std::move(d));
  plan->plan = std::move(exec);
  plan->workspace = workspace;
  plan->engine = std::move(name);
  return plan;
}

absl::StatusOr<std::vector<CudnnSdpa::SweepRow>> CudnnSdpa::Sweep(
    const SdpaShape& s, const void* q, const void* k, const void* v, void* o,
    float scale, int iters, size_t limit, bool adopt) {
  DN_RETURN_IF_ERROR(CheckAligned(s, q, k, v, o));
  std::vector<SweepRow> rows;
  struct Timed { GraphParts g; std::vector<Candidate> found; };
  std::vector<Timed> all;
  for (Form form : {Form::kUnified, Form::kComposite}) {
    if (form == Form::kUnified && version_ < kUnifiedSince) continue;
    absl::StatusOr<GraphParts> g = BuildGraph(handle_.get(), form, s);
    if (!g.ok()) {
      rows.push_back({absl::StrCat(form == Form::kUnified ? "unified" : "composite",
                                   ": graph: ", g.status().message()), 0, -1, false});
      continue;
    }
    std::string tried;
    DN_ASSIGN_OR_RETURN(std::vector<Candidate> found,
                        Candidates(handle_.get(), *g,
                                   form == Form::kUnified ? "unified" : "composite",
                                   workspace_bytes_, true, limit, &tried));
    DN_VLOG << "cuda Attention sweep: " << tried;
    all.push_back({std::move(*g), std::move(found)});
  }
  // The plan Run would use, for the "default" mark.
  DN_ASSIGN_OR_RETURN(Plan * current, GetPlan(s));
  const std::string current_name = current->engine;
  cudaEvent_t raw_start = nullptr, raw_stop = nullptr;
  DN_CUDA_RETURN_IF_ERROR(cudaEventCreate(&raw_start));
  EventPtr start(raw_start);
  DN_CUDA_RETURN_IF_ERROR(cudaEventCreate(&raw_stop));
  EventPtr stop(raw_stop);
  double best_ms = -1;
  Timed* best_t = nullptr;
  size_t best_i = 0;
  for (Timed& t : all) {
    for (size_t i = 0; i < t.found.size(); ++i) {
      Candidate& c = t.found[i];
      std::vector<double> ms;
      absl::Status run = absl::OkStatus();
      for (int it = 0; it < iters + 2 && run.ok(); ++it) {
        DN_CUDA_RETURN_IF_ERROR(cudaEventRecord(start.get(), stream_));
        run = Execute(c.exec.get(), q, k, v, o, scale);
        DN_CUDA_RETURN_IF_ERROR(cudaEventRecord(stop.get(), stream_));
        // A device fault here leaves the context unusable: the sweep ends.
        DN_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(stop.get()));
        float e = 0;
        DN_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&e, start.get(), stop.get()));
        if (run.ok() && it >= 2) ms.push_back(e);
      }
      if (!run.ok() || ms.empty()) {
        rows.push_back({absl::StrCat(c.name, " (failed: ", run.message(), ")"),
                        c.workspace, -1, false});
        continue;
      }
      std::sort(ms.begin(), ms.end());
      const double med = ms[ms.size() / 2];
      // Explored names extend the plain one with " engine E knobs ..." (Candidates).
      const bool is_default = c.name == current_name ||
                              absl::StartsWith(c.name, absl::StrCat(current_name, " engine "));
      rows.push_back({c.name, c.workspace, med, is_default});
      if (best_ms < 0 || med < best_ms) {
        best_ms = med;
        best_t = &t;
        best_i = i;
      }
    }
  }
  if (adopt && best_t != nullptr) {
    Candidate& c = best_t->found[best_i];
    const Key key{s.batch, s.heads, s.seq_q, s.seq_kv, s.kv_len, s.head_dim};
    plans_[key] = Adopt(std::move(best_t->g.keep), std::move(best_t->g.graph),
                        std::move(best_t->g.devprop), std::move(c.exec),
                        std::move(c.keep), c.workspace, c.name + " (autotuned)");
  }
  return rows;
}

absl::StatusOr<CudnnSdpa::Plan*> CudnnSdpa::GetPlan(const SdpaShape& s) {
  if (s.batch <= 0 || s.heads <= 0 || s.seq_q <= 0 || s.seq_kv <= 0 ||
      s.kv_len <= 0 || s.kv_len > s.seq_kv)
    return absl::InvalidArgumentError(
        absl::StrCat("cuda Attention: bad shape ", ShapeText(s)));
  if (s.head_dim % 8 != 0 || s.head_dim > 256)
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda Attention: head dim ", s.head_dim,
        " must be a multiple of 8 and at most 256 (cuDNN on Hopper)"));
  const Key key{s.batch, s.heads, s.seq_q, s.seq_kv, s.kv_len, s.head_dim};
  auto it = plans_.find(key);
  if (it == plans_.end()) {
    DN_ASSIGN_OR_RETURN(std::unique_ptr<Plan> plan, Build(s));
    DN_VLOG << "cuda Attention: built plan for " << ShapeText(s) << " ("
            << plan->engine << ", workspace " << plan->workspace << " B)";
    it = plans_.emplace(key, std::move(plan)).first;
  }
  return it->second.get();
}

absl::Status CudnnSdpa::CheckAligned(const SdpaShape& shape, const void* q,
                                     const void* k, const void* v,
                                     const void* o) const {
  for (const void* p : {q, k, v, o}) {
    if ((reinterpret_cast<uintptr_t>(p) & 15u) != 0)
      return absl::InvalidArgumentError(absl::StrCat(
          "cuda Attention: q/k/v/o must be 16-byte aligned (", ShapeText(shape),
          ")"));
  }
  return absl::OkStatus();
}

absl::Status CudnnSdpa::Execute(cudnnBackendDescriptor_t plan, const void* q,
                                const void* k, const void* v, void* o,
                                float scale) {
  DN_ASSIGN_OR_RETURN(CudnnDescPtr pack,
                      NewDesc(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR));
  // The by-value scale is read from this host float when execute is called
  // (and baked into a CUDA graph when captured).
  float scale_value = scale;
  int64_t uids[5] = {kUidQ, kUidK, kUidV, kUidO, kUidScale};
  void* ptrs[5] = {const_cast<void*>(q), const_cast<void*>(k),
                   const_cast<void*>(v), o, &scale_value};
  void* workspace = workspace_;
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      pack.get(), CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, 5, uids));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      pack.get(), CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, 5,
      ptrs));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      pack.get(), CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1,
      &workspace));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendFinalize(pack.get()));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendExecute(handle_.get(), plan, pack.get()));
  return absl::OkStatus();
}

absl::Status CudnnSdpa::Run(const SdpaShape& shape, const void* q,
                            const void* k, const void* v, void* o,
                            float scale) {
  DN_RETURN_IF_ERROR(CheckAligned(shape, q, k, v, o));
  if (autotune_) {
    const Key key{shape.batch, shape.heads, shape.seq_q, shape.seq_kv,
                  shape.kv_len, shape.head_dim};
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    DN_CUDA_RETURN_IF_ERROR(cudaStreamIsCapturing(stream_, &capturing));
    if (capturing == cudaStreamCaptureStatusNone && tuned_.insert(key).second) {
      DN_ASSIGN_OR_RETURN(std::vector<SweepRow> rows,
                          Sweep(shape, q, k, v, o, scale, /*iters=*/5,
                                /*limit=*/64, /*adopt=*/true));
      DN_LOG(INFO) << "cuda Attention: autotuned " << ShapeText(shape) << " over "
                   << rows.size() << " configs: " << plans_[key]->engine;
    }
  }
  DN_ASSIGN_OR_RETURN(Plan * plan, GetPlan(shape));
  return Execute(plan->plan.get(), q, k, v, o, scale);
}

}  // namespace dn::worker::cuda
