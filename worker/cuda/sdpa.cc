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
#include "worker/cuda/cudnn_graph.h"

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
// descriptor), through ENGINEHEUR_DEVICEPROP / EXECUTION_PLAN_DEVICEPROP too
// (cudnn_graph.cc: FinalizeGraph and the engine-config search).
constexpr size_t kUnifiedSince = 91301;

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

  DN_RETURN_IF_ERROR(FinalizeGraph(handle, std::move(ops), &parts));
  return parts;
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
