#include "worker/cuda/sdpa.h"

#include <cstdlib>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "comm/base/cuda_check.h"
#include "comm/base/log.h"
#include "comm/base/status_macros.h"

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
  return std::unique_ptr<CudnnSdpa>(new CudnnSdpa(
      std::move(handle), form, version, workspace, workspace_bytes));
}

absl::StatusOr<std::unique_ptr<CudnnSdpa::Plan>> CudnnSdpa::Build(
    const SdpaShape& s) {
  auto plan = std::make_unique<Plan>();
  std::vector<CudnnDescPtr>& keep = plan->keep;
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
  if (form_ == Form::kUnified) {
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
  cudnnHandle_t handle = handle_.get();
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      graph.get(), kGraphHandleAttr, CUDNN_TYPE_HANDLE, 1, &handle));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendFinalize(graph.get()));
  // Optional device-properties descriptor (ignored when unsupported).
  CudnnDescPtr devprop;
  {
    cudnnBackendDescriptor_t d = nullptr;
    if (cudnnBackendCreateDescriptor(CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR, &d) ==
        CUDNN_STATUS_SUCCESS) {
      CudnnDescPtr candidate(d);
      if (cudnnBackendSetAttribute(candidate.get(), CUDNN_ATTR_DEVICEPROP_HANDLE,
                                   CUDNN_TYPE_HANDLE, 1,
                                   &handle) == CUDNN_STATUS_SUCCESS &&
          cudnnBackendFinalize(candidate.get()) == CUDNN_STATUS_SUCCESS)
        devprop = std::move(candidate);
    }
  }
  for (CudnnDescPtr& op : ops) keep.push_back(std::move(op));

  // Heuristics (mode A, then fallback); the first config whose plan
  // finalizes and fits the workspace wins.
  std::string tried;
  for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
    const char* mode_name = mode == CUDNN_HEUR_MODE_A ? "A" : "fallback";
    DN_ASSIGN_OR_RETURN(CudnnDescPtr heur,
                        NewDesc(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR));
    DN_RETURN_IF_ERROR(SetDesc(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph));
    DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
        heur.get(), CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode));
    if (devprop) {
      cudnnBackendDescriptor_t dp = devprop.get();
      (void)cudnnBackendSetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_DEVICEPROP,
                                     CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &dp);
    }
    DN_CUDNN_RETURN_IF_ERROR(cudnnBackendFinalize(heur.get()));
    int64_t count = 0;
    DN_CUDNN_RETURN_IF_ERROR(cudnnBackendGetAttribute(
        heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
        0, &count, nullptr));
    absl::StrAppend(&tried, tried.empty() ? "" : "; ", "mode ", mode_name, ": ",
                    count, " configs");
    if (count <= 0) continue;
    std::vector<CudnnDescPtr> cfgs;
    std::vector<cudnnBackendDescriptor_t> raw_cfgs;
    for (int64_t i = 0; i < count; ++i) {
      DN_ASSIGN_OR_RETURN(CudnnDescPtr cfg,
                          NewDesc(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR));
      raw_cfgs.push_back(cfg.get());
      cfgs.push_back(std::move(cfg));
    }
    int64_t got = 0;
    DN_CUDNN_RETURN_IF_ERROR(cudnnBackendGetAttribute(
        heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
        count, &got, raw_cfgs.data()));
    for (int64_t i = 0; i < got && i < count; ++i) {
      DN_ASSIGN_OR_RETURN(CudnnDescPtr exec,
                          NewDesc(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR));
      DN_RETURN_IF_ERROR(SetDesc(exec, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG,
                                 cfgs[static_cast<size_t>(i)]));
      DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
          exec.get(), kPlanHandleAttr, CUDNN_TYPE_HANDLE, 1, &handle));
      if (devprop) {
        cudnnBackendDescriptor_t dp = devprop.get();
        (void)cudnnBackendSetAttribute(exec.get(),
                                       CUDNN_ATTR_EXECUTION_PLAN_DEVICEPROP,
                                       CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &dp);
      }
      const cudnnStatus_t fin = cudnnBackendFinalize(exec.get());
      if (fin != CUDNN_STATUS_SUCCESS) {
        char reason[256] = {0};
        cudnnGetLastErrorString(reason, sizeof(reason));
        absl::StrAppend(&tried, ", config ", i, ": ", cudnnGetErrorString(fin),
                        reason[0] ? absl::StrCat(" (", reason, ")") : "");
        continue;
      }
      int64_t ws = 0, n = 0;
      DN_CUDNN_RETURN_IF_ERROR(cudnnBackendGetAttribute(
          exec.get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
          CUDNN_TYPE_INT64, 1, &n, &ws));
      if (ws < 0 || static_cast<size_t>(ws) > workspace_bytes_) {
        absl::StrAppend(&tried, ", config ", i, ": needs ", ws,
                        " workspace bytes");
        continue;
      }
      plan->plan = std::move(exec);
      plan->workspace = ws;
      plan->engine = absl::StrCat("heuristics mode ", mode_name, " config ", i);
      plan->keep.push_back(std::move(graph));
      for (CudnnDescPtr& c : cfgs) plan->keep.push_back(std::move(c));
      plan->keep.push_back(std::move(heur));
      if (devprop) plan->keep.push_back(std::move(devprop));
      return plan;
    }
  }
  return absl::UnimplementedError(absl::StrCat(
      "cuda Attention: cuDNN ", version_, " (",
      form_ == Form::kUnified ? "SDPA_FWD op" : "composite graph",
      ") has no engine for bf16 ", ShapeText(s), " [", tried,
      "]; run with CUDNN_LOGLEVEL_DBG=2 CUDNN_LOGDEST_DBG=stderr for the "
      "reasons"));
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

absl::Status CudnnSdpa::Run(const SdpaShape& shape, const void* q,
                            const void* k, const void* v, void* o,
                            float scale) {
  for (const void* p : {q, k, v, static_cast<const void*>(o)}) {
    if ((reinterpret_cast<uintptr_t>(p) & 15u) != 0)
      return absl::InvalidArgumentError(absl::StrCat(
          "cuda Attention: q/k/v/o must be 16-byte aligned (", ShapeText(shape),
          ")"));
  }
  DN_ASSIGN_OR_RETURN(Plan * plan, GetPlan(shape));
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
  DN_CUDNN_RETURN_IF_ERROR(
      cudnnBackendExecute(handle_.get(), plan->plan.get(), pack.get()));
  return absl::OkStatus();
}

}  // namespace dn::worker::cuda
