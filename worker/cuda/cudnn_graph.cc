#include "worker/cuda/cudnn_graph.h"

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"

namespace dn::worker::cuda {

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

absl::StatusOr<CudnnDescPtr> MakeTensor(int64_t uid, cudnnDataType_t dtype,
                                        Dims4 dims, Dims4 strides,
                                        bool is_virtual, bool by_value) {
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

absl::Status FinalizeGraph(cudnnHandle_t handle, std::vector<CudnnDescPtr> ops,
                           GraphParts* out) {
  GraphParts& parts = *out;
  std::vector<CudnnDescPtr>& keep = parts.keep;
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
  return absl::OkStatus();
}

namespace {

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

}  // namespace

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

}  // namespace dn::worker::cuda
