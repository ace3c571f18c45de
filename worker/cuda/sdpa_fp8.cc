#include "worker/cuda/sdpa_fp8.h"

#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "worker/cuda/cudnn_graph.h"
#include "worker/cuda/fp8_kernels.h"
#include "worker/tensor.h"

namespace dn::worker::cuda {

namespace {

// Real tensors the variant pack binds.
constexpr int64_t kUidQ = 1, kUidK = 2, kUidV = 3, kUidO = 4, kUidScale = 5,
                  kUidDescaleQ = 6, kUidDescaleK = 7, kUidDescaleV = 8,
                  kUidDescaleS = 9, kUidScaleS = 10, kUidScaleO = 11,
                  kUidAmaxS = 12, kUidAmaxO = 13;
// Virtual tensors.
constexpr int64_t kUidS1 = 101, kUidS2 = 102, kUidS3 = 103, kUidS4 = 104,
                  kUidMax = 105, kUidShifted = 106, kUidExp = 107, kUidSum = 108,
                  kUidLogSum = 109, kUidStats = 110, kUidP = 111, kUidP8 = 112,
                  kUidO1 = 113, kUidO2 = 114, kUidO3 = 115;

// The frontend's sdpa_fp8 node needs runtime 9.1.0.
constexpr size_t kFp8Since = 90100;

std::string ShapeText(const SdpaShape& s) {
  return absl::StrCat("B=", s.batch, " H=", s.heads, " Sq=", s.seq_q,
                      " Skv=", s.seq_kv, " kv_len=", s.kv_len,
                      " d=", s.head_dim);
}

absl::StatusOr<GraphParts> BuildFp8Graph(cudnnHandle_t handle, const SdpaShape& s,
                                         bool o_fp8) {
  GraphParts parts;
  std::vector<CudnnDescPtr>& keep = parts.keep;
  const int64_t B = s.batch, H = s.heads, Sq = s.seq_q, Skv = s.seq_kv,
                L = s.kv_len, D = s.head_dim;
  constexpr cudnnDataType_t kF8 = CUDNN_DATA_FP8_E4M3, kF32 = CUDNN_DATA_FLOAT;
  // Token-major [B,S,H,D] buffers (e4m3: one byte per element) seen as
  // [B,H,S,D]; K as the transposed view [B,H,D,L].
  const Dims4 q_dims{{B, H, Sq, D}}, q_strides{{Sq * H * D, D, H * D, 1}};
  const Dims4 kt_dims{{B, H, D, L}}, kt_strides{{Skv * H * D, D, 1, H * D}};
  const Dims4 v_dims{{B, H, L, D}}, v_strides{{Skv * H * D, D, H * D, 1}};
  const Dims4 score_dims{{B, H, Sq, L}}, score_strides{{H * Sq * L, Sq * L, L, 1}};
  const Dims4 row_dims{{B, H, Sq, 1}}, row_strides{{H * Sq, Sq, 1, 1}};
  const Dims4 out_strides{{H * Sq * D, Sq * D, D, 1}};  // virtual O' tensors
  const Dims4 one{{1, 1, 1, 1}};

  auto real_scalar = [&](int64_t uid) { return MakeTensor(uid, kF32, one, one, false); };
  auto score = [&](int64_t uid, cudnnDataType_t dt) {
    return MakeTensor(uid, dt, score_dims, score_strides, true);
  };
  auto row = [&](int64_t uid) { return MakeTensor(uid, kF32, row_dims, row_strides, true); };
  auto out_virtual = [&](int64_t uid) {
    return MakeTensor(uid, kF32, q_dims, out_strides, true);
  };

  DN_ASSIGN_OR_RETURN(CudnnDescPtr q, MakeTensor(kUidQ, kF8, q_dims, q_strides, false));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr kt, MakeTensor(kUidK, kF8, kt_dims, kt_strides, false));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr v, MakeTensor(kUidV, kF8, v_dims, v_strides, false));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr o,
                      MakeTensor(kUidO, o_fp8 ? kF8 : CUDNN_DATA_BFLOAT16, q_dims,
                                 q_strides, false));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr scale, MakeTensor(kUidScale, kF32, one, one, false,
                                                     /*by_value=*/true));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr dq, real_scalar(kUidDescaleQ));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr dk, real_scalar(kUidDescaleK));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr dv, real_scalar(kUidDescaleV));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr ds, real_scalar(kUidDescaleS));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr ss, real_scalar(kUidScaleS));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr so, real_scalar(kUidScaleO));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr amax_s, real_scalar(kUidAmaxS));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr amax_o, real_scalar(kUidAmaxO));

  DN_ASSIGN_OR_RETURN(CudnnDescPtr s1, score(kUidS1, kF32));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr s2, score(kUidS2, kF32));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr s3, score(kUidS3, kF32));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr s4, score(kUidS4, kF32));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr mx, row(kUidMax));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr shifted, score(kUidShifted, kF32));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr ex, score(kUidExp, kF32));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr sum, row(kUidSum));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr logsum, row(kUidLogSum));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr stats, row(kUidStats));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr p, score(kUidP, kF32));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr p8, score(kUidP8, kF8));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr o1, out_virtual(kUidO1));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr o2, out_virtual(kUidO2));
  DN_ASSIGN_OR_RETURN(CudnnDescPtr o3, out_virtual(kUidO3));

  std::vector<CudnnDescPtr> ops;
  auto add = [&](absl::StatusOr<CudnnDescPtr> op) -> absl::Status {
    if (!op.ok()) return op.status();
    ops.push_back(std::move(*op));
    return absl::OkStatus();
  };
  // bmm1 and its scales, in the frontend's order.
  DN_RETURN_IF_ERROR(add(MatmulOp(q, kt, s1, &keep)));
  DN_RETURN_IF_ERROR(add(PointwiseOp(CUDNN_POINTWISE_MUL, s1, &scale, s2, &keep)));
  DN_RETURN_IF_ERROR(add(PointwiseOp(CUDNN_POINTWISE_MUL, s2, &dq, s3, &keep)));
  DN_RETURN_IF_ERROR(add(PointwiseOp(CUDNN_POINTWISE_MUL, s3, &dk, s4, &keep)));
  // Softmax with (virtual) stats: without the log/add pair the heuristics
  // offer nothing (as for the bf16 composite graph).
  DN_RETURN_IF_ERROR(add(ReductionOp(CUDNN_REDUCE_TENSOR_MAX, s4, mx, &keep)));
  DN_RETURN_IF_ERROR(add(PointwiseOp(CUDNN_POINTWISE_SUB, s4, &mx, shifted, &keep)));
  DN_RETURN_IF_ERROR(add(PointwiseOp(CUDNN_POINTWISE_EXP, shifted, nullptr, ex, &keep)));
  DN_RETURN_IF_ERROR(add(ReductionOp(CUDNN_REDUCE_TENSOR_ADD, ex, sum, &keep)));
  DN_RETURN_IF_ERROR(add(PointwiseOp(CUDNN_POINTWISE_LOG, sum, nullptr, logsum, &keep)));
  DN_RETURN_IF_ERROR(add(PointwiseOp(CUDNN_POINTWISE_ADD, mx, &logsum, stats, &keep)));
  DN_RETURN_IF_ERROR(add(PointwiseOp(CUDNN_POINTWISE_DIV, ex, &sum, p, &keep)));
  // amax of P, then P to e4m3 with its scale.
  DN_RETURN_IF_ERROR(add(ReductionOp(CUDNN_REDUCE_TENSOR_AMAX, p, amax_s, &keep)));
  DN_RETURN_IF_ERROR(add(PointwiseOp(CUDNN_POINTWISE_MUL, p, &ss, p8, &keep)));
  // bmm2 and its scales; amax of the unscaled O.
  DN_RETURN_IF_ERROR(add(MatmulOp(p8, v, o1, &keep)));
  DN_RETURN_IF_ERROR(add(PointwiseOp(CUDNN_POINTWISE_MUL, o1, &ds, o2, &keep)));
  DN_RETURN_IF_ERROR(add(PointwiseOp(CUDNN_POINTWISE_MUL, o2, &dv, o3, &keep)));
  DN_RETURN_IF_ERROR(add(PointwiseOp(CUDNN_POINTWISE_MUL, o3, &so, o, &keep)));
  DN_RETURN_IF_ERROR(add(ReductionOp(CUDNN_REDUCE_TENSOR_AMAX, o3, amax_o, &keep)));

  for (CudnnDescPtr* t : {&q, &kt, &v, &o, &scale, &dq, &dk, &dv, &ds, &ss, &so,
                          &amax_s, &amax_o, &s1, &s2, &s3, &s4, &mx, &shifted, &ex,
                          &sum, &logsum, &stats, &p, &p8, &o1, &o2, &o3})
    keep.push_back(std::move(*t));
  DN_RETURN_IF_ERROR(FinalizeGraph(handle, std::move(ops), &parts));
  return parts;
}

}  // namespace

absl::StatusOr<std::unique_ptr<CudnnSdpaFp8>> CudnnSdpaFp8::Create(
    cudaStream_t stream, Allocate allocate) {
  cudnnHandle_t raw = nullptr;
  DN_CUDNN_RETURN_IF_ERROR(cudnnCreate(&raw));
  CudnnPtr handle(raw);
  DN_CUDNN_RETURN_IF_ERROR(cudnnSetStream(raw, stream));
  std::unique_ptr<CudnnSdpaFp8> sdpa(
      new CudnnSdpaFp8(std::move(handle), stream, cudnnGetVersion(),
                       std::move(allocate)));
  // DN_CUDNN_SDPA_FP8_O=fp8|bf16 forces the output type (the test uses it to
  // check both); by default bf16 O first, e4m3 O if that has no engine.
  if (const char* forced = std::getenv("DN_CUDNN_SDPA_FP8_O")) {
    if (std::strcmp(forced, "fp8") == 0) sdpa->o_kinds_ = {true};
    if (std::strcmp(forced, "bf16") == 0) sdpa->o_kinds_ = {false};
  }
  return sdpa;
}

absl::StatusOr<std::unique_ptr<CudnnSdpaFp8::Plan>> CudnnSdpaFp8::Build(
    const SdpaShape& s) {
  // bf16 O first (no dequantization pass); e4m3 O where cuDNN has no engine
  // for that (o_kinds_, from DN_CUDNN_SDPA_FP8_O at Create).
  std::string tried;
  for (bool o_fp8 : o_kinds_) {
    absl::StatusOr<GraphParts> g = BuildFp8Graph(handle_.get(), s, o_fp8);
    const char* form = o_fp8 ? "fp8 O" : "bf16 O";
    if (!g.ok()) {
      absl::StrAppend(&tried, tried.empty() ? "" : "; ", form, ": graph: ",
                      g.status().message());
      continue;
    }
    std::string form_tried;
    DN_ASSIGN_OR_RETURN(std::vector<Candidate> found,
                        Candidates(handle_.get(), *g, form, kMaxWorkspaceBytes,
                                   /*explore=*/false, 1, &form_tried));
    absl::StrAppend(&tried, tried.empty() ? "" : "; ", form, ": ", form_tried);
    if (found.empty()) continue;
    auto plan = std::make_unique<Plan>();
    plan->keep = std::move(g->keep);
    plan->keep.push_back(std::move(g->graph));
    if (g->devprop) plan->keep.push_back(std::move(g->devprop));
    for (CudnnDescPtr& d : found.front().keep) plan->keep.push_back(std::move(d));
    plan->plan = std::move(found.front().exec);
    plan->workspace = found.front().workspace;
    plan->o_fp8 = o_fp8;
    plan->engine = found.front().name;
    const size_t q_bytes = static_cast<size_t>(s.batch * s.seq_q * s.heads * s.head_dim);
    const size_t kv_bytes = static_cast<size_t>(s.batch * s.seq_kv * s.heads * s.head_dim);
    DN_ASSIGN_OR_RETURN(plan->q8, allocate_(q_bytes));
    DN_ASSIGN_OR_RETURN(plan->k8, allocate_(kv_bytes));
    DN_ASSIGN_OR_RETURN(plan->v8, allocate_(kv_bytes));
    if (o_fp8) {
      DN_ASSIGN_OR_RETURN(plan->o8, allocate_(q_bytes));
    }
    DN_ASSIGN_OR_RETURN(plan->slots, allocate_(static_cast<size_t>(Fp8Slots::kBytes)));
    DN_ASSIGN_OR_RETURN(plan->workspace_mem,
                        allocate_(static_cast<size_t>(std::max<int64_t>(plan->workspace, 256))));
    DN_CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(plan->slots.get(), 0, static_cast<size_t>(Fp8Slots::kBytes), stream_));
    return plan;
  }
  return absl::UnimplementedError(absl::StrCat(
      "cuda AttentionFp8: cuDNN ", version_, " has no fp8 SDPA engine for ",
      ShapeText(s), " [", tried,
      "]; run with CUDNN_LOGLEVEL_DBG=2 CUDNN_LOGDEST_DBG=stderr for the reasons"));
}

absl::StatusOr<CudnnSdpaFp8::Plan*> CudnnSdpaFp8::GetPlan(const SdpaShape& s) {
  if (version_ < kFp8Since)
    return absl::UnimplementedError(absl::StrCat(
        "cuda AttentionFp8: cuDNN runtime ", version_,
        " has no fp8 SDPA (needs 9.1 or newer)"));
  if (s.batch <= 0 || s.batch > 65535 || s.heads <= 0 || s.seq_q <= 0 ||
      s.seq_kv <= 0 || s.kv_len <= 0 || s.kv_len > s.seq_kv)
    return absl::InvalidArgumentError(
        absl::StrCat("cuda AttentionFp8: bad shape ", ShapeText(s)));
  if (s.head_dim % 16 != 0 || s.head_dim > 256)
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda AttentionFp8: head dim ", s.head_dim,
        " must be a multiple of 16 and at most 256 (16-byte e4m3 rows)"));
  const Key key{s.batch, s.heads, s.seq_q, s.seq_kv, s.kv_len, s.head_dim};
  auto it = plans_.find(key);
  if (it == plans_.end()) {
    DN_ASSIGN_OR_RETURN(std::unique_ptr<Plan> plan, Build(s));
    DN_LOG(INFO) << "cuda AttentionFp8: built plan for " << ShapeText(s) << " ("
            << plan->engine << (plan->o_fp8 ? ", e4m3 O" : ", bf16 O")
            << ", workspace " << plan->workspace << " B)";
    it = plans_.emplace(key, std::move(plan)).first;
  }
  return it->second.get();
}

absl::StatusOr<std::pair<bool, std::string>> CudnnSdpaFp8::Describe(
    const SdpaShape& shape) {
  DN_ASSIGN_OR_RETURN(Plan * plan, GetPlan(shape));
  return std::make_pair(plan->o_fp8, plan->engine);
}

absl::StatusOr<std::vector<CudnnSdpaFp8::SweepRow>> CudnnSdpaFp8::Sweep(
    const SdpaShape& shape, const void* q, const void* k, const void* v, void* o,
    float scale, int iters, size_t limit) {
  DN_RETURN_IF_ERROR(Run(shape, q, k, v, o, scale));  // quantizes q/k/v, sets the scales
  DN_ASSIGN_OR_RETURN(Plan * def, GetPlan(shape));
  DN_ASSIGN_OR_RETURN(GraphParts g, BuildFp8Graph(handle_.get(), shape, def->o_fp8));
  std::string tried;
  DN_ASSIGN_OR_RETURN(std::vector<Candidate> found,
                      Candidates(handle_.get(), g, def->o_fp8 ? "fp8 O" : "bf16 O",
                                 kMaxWorkspaceBytes, /*explore=*/true, limit, &tried));
  const size_t elems = static_cast<size_t>(shape.batch * shape.seq_q * shape.heads *
                                           shape.head_dim);
  const size_t out_bytes = elems * (def->o_fp8 ? 1 : 2);
  void* out = def->o_fp8 ? def->o8.get() : o;
  // Decoded output of the plan last executed.
  auto output = [&]() -> absl::StatusOr<std::vector<float>> {
    std::vector<uint8_t> raw(out_bytes);
    DN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(raw.data(), out, out_bytes,
                                            cudaMemcpyDeviceToHost, stream_));
    DN_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    std::vector<float> f(elems);
    for (size_t i = 0; i < elems; ++i) {
      if (def->o_fp8) {
        __nv_fp8_e4m3 e;
        e.__x = static_cast<__nv_fp8_storage_t>(raw[i]);
        f[i] = static_cast<float>(e);
      } else {
        uint16_t b;
        std::memcpy(&b, raw.data() + 2 * i, 2);
        f[i] = BF16ToF32(b);
      }
    }
    return f;
  };
  DN_RETURN_IF_ERROR(Execute(*def, o, scale));
  DN_ASSIGN_OR_RETURN(std::vector<float> ref, output());
  cudaEvent_t raw_start = nullptr, raw_stop = nullptr;
  DN_CUDA_RETURN_IF_ERROR(cudaEventCreate(&raw_start));
  EventPtr start(raw_start);
  DN_CUDA_RETURN_IF_ERROR(cudaEventCreate(&raw_stop));
  EventPtr stop(raw_stop);
  std::vector<SweepRow> rows;
  for (Candidate& c : found) {
    Plan p;
    p.plan = std::move(c.exec);
    p.workspace = c.workspace;
    p.o_fp8 = def->o_fp8;
    p.q8 = def->q8;
    p.k8 = def->k8;
    p.v8 = def->v8;
    p.o8 = def->o8;
    p.slots = def->slots;
    p.workspace_mem = def->workspace_mem;
    if (c.workspace > std::max<int64_t>(def->workspace, 256)) {
      DN_ASSIGN_OR_RETURN(p.workspace_mem, allocate_(static_cast<size_t>(c.workspace)));
    }
    SweepRow row;
    row.config = c.name;
    row.workspace = c.workspace;
    // Explored names extend the heuristics' ("... A#0" + " engine 2 knobs ...").
    row.is_default = c.name.rfind(def->engine, 0) == 0 &&
                     (c.name.size() == def->engine.size() || c.name[def->engine.size()] == ' ');
    absl::Status st = Execute(p, o, scale);  // warm-up
    if (st.ok()) st = Execute(p, o, scale);
    if (st.ok()) {
      DN_CUDA_RETURN_IF_ERROR(cudaEventRecord(start.get(), stream_));
      for (int i = 0; i < iters && st.ok(); ++i) st = Execute(p, o, scale);
      DN_CUDA_RETURN_IF_ERROR(cudaEventRecord(stop.get(), stream_));
      DN_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(stop.get()));
    }
    if (st.ok()) {
      float ms = 0;
      DN_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start.get(), stop.get()));
      row.ms = ms / std::max(iters, 1);
      DN_ASSIGN_OR_RETURN(std::vector<float> got, output());
      double num = 0, den = 0;
      for (size_t i = 0; i < elems; ++i) {
        const double d = static_cast<double>(got[i]) - ref[i];
        num += d * d;
        den += static_cast<double>(ref[i]) * ref[i];
      }
      row.rel_l2 = std::sqrt(num / std::max(den, 1e-30));
    } else {
      DN_LOG(WARNING) << "fp8 sweep: " << c.name << " failed: " << st.message();
    }
    rows.push_back(std::move(row));
  }
  return rows;
}

std::vector<std::shared_ptr<void>> CudnnSdpaFp8::buffers() const {
  std::vector<std::shared_ptr<void>> out;
  for (const auto& [key, plan] : plans_)
    for (const std::shared_ptr<void>& b :
         {plan->q8, plan->k8, plan->v8, plan->o8, plan->slots, plan->workspace_mem})
      if (b) out.push_back(b);
  return out;
}

absl::Status CudnnSdpaFp8::Execute(const Plan& plan, void* o, float scale) {
  DN_ASSIGN_OR_RETURN(CudnnDescPtr pack, NewDesc(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR));
  float scale_value = scale;  // by value: read now (baked into a capture)
  float* slots = static_cast<float*>(plan.slots.get());
  auto slot = [&](Fp8Slots::Slot s) -> void* { return Fp8Slots::At(slots, s); };
  constexpr int kN = 13;
  int64_t uids[kN] = {kUidQ, kUidK, kUidV, kUidO, kUidScale,
                      kUidDescaleQ, kUidDescaleK, kUidDescaleV, kUidDescaleS,
                      kUidScaleS, kUidScaleO, kUidAmaxS, kUidAmaxO};
  void* ptrs[kN] = {plan.q8.get(), plan.k8.get(), plan.v8.get(),
                    plan.o_fp8 ? plan.o8.get() : o, &scale_value,
                    slot(Fp8Slots::kDescaleQ), slot(Fp8Slots::kDescaleK),
                    slot(Fp8Slots::kDescaleV), slot(Fp8Slots::kDescaleS),
                    slot(Fp8Slots::kScaleS), slot(Fp8Slots::kScaleO),
                    slot(Fp8Slots::kAmaxS), slot(Fp8Slots::kAmaxO)};
  void* workspace = plan.workspace_mem.get();
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      pack.get(), CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, kN, uids));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      pack.get(), CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, kN, ptrs));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendSetAttribute(
      pack.get(), CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &workspace));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendFinalize(pack.get()));
  DN_CUDNN_RETURN_IF_ERROR(cudnnBackendExecute(handle_.get(), plan.plan.get(), pack.get()));
  return absl::OkStatus();
}

absl::Status CudnnSdpaFp8::Run(const SdpaShape& s, const void* q, const void* k,
                               const void* v, void* o, float scale) {
  for (const void* ptr : {q, k, v, static_cast<const void*>(o)}) {
    if ((reinterpret_cast<uintptr_t>(ptr) & 15u) != 0)
      return absl::InvalidArgumentError(absl::StrCat(
          "cuda AttentionFp8: q/k/v/o must be 16-byte aligned (", ShapeText(s), ")"));
  }
  DN_ASSIGN_OR_RETURN(Plan * plan, GetPlan(s));
  const int64_t row = s.heads * s.head_dim;
  const RowsLayout q_rows{s.batch, s.seq_q * row, s.seq_q * row};
  const RowsLayout kv_rows{s.batch, s.seq_kv * row, s.kv_len * row};
  auto* slots = static_cast<float*>(plan->slots.get());
  Fp8Qkv qkv;
  qkv.x[0] = static_cast<const __nv_bfloat16*>(q);
  qkv.x[1] = static_cast<const __nv_bfloat16*>(k);
  qkv.x[2] = static_cast<const __nv_bfloat16*>(v);
  qkv.rows[0] = q_rows;
  qkv.rows[1] = kv_rows;
  qkv.rows[2] = kv_rows;
  qkv.out[0] = static_cast<uint8_t*>(plan->q8.get());
  qkv.out[1] = static_cast<uint8_t*>(plan->k8.get());
  qkv.out[2] = static_cast<uint8_t*>(plan->v8.get());
  DN_RETURN_IF_ERROR(InvokeFp8Amax(qkv, slots, stream_));
  DN_RETURN_IF_ERROR(InvokeFp8Quantize(qkv, slots, plan->o_fp8, stream_));
  DN_RETURN_IF_ERROR(Execute(*plan, o, scale));
  if (plan->o_fp8) {
    DN_RETURN_IF_ERROR(InvokeDequantizeE4m3(
        static_cast<const uint8_t*>(plan->o8.get()), s.batch * s.seq_q * row, slots,
        Fp8Slots::kDescaleO, static_cast<__nv_bfloat16*>(o), stream_));
  }
  return absl::OkStatus();
}

}  // namespace dn::worker::cuda
