#include "worker/cuda/gemm.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"

namespace dn::worker::cuda {

namespace {

// The largest power of two (at most 256) that divides the address: what the
// alignment preferences of the heuristic query want to know.
uint32_t AlignmentOf(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a == 0) return 256;
  uint32_t align = 1;
  while (align < 256 && (a & (2 * align - 1)) == 0) align *= 2;
  return align;
}

const char* EpilogueName(cublasLtEpilogue_t e) {
  switch (e) {
    case CUBLASLT_EPILOGUE_DEFAULT: return "none";
    case CUBLASLT_EPILOGUE_BIAS: return "bias";
    case CUBLASLT_EPILOGUE_GELU: return "gelu";
    case CUBLASLT_EPILOGUE_GELU_BIAS: return "gelu+bias";
    default: return "?";
  }
}

}  // namespace

size_t LtGemm::KeyHash::operator()(const Key& k) const {
  size_t h = std::hash<int64_t>()(k.m);
  auto mix = [&h](uint64_t v) {
    h ^= std::hash<uint64_t>()(v) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  };
  mix(static_cast<uint64_t>(k.n));
  mix(static_cast<uint64_t>(k.k));
  mix(k.epilogue);
  mix((uint64_t{k.align_x} << 48) ^ (uint64_t{k.align_w} << 32) ^
      (uint64_t{k.align_y} << 16) ^ k.align_bias);
  return h;
}

absl::StatusOr<std::unique_ptr<LtGemm>> LtGemm::Create(void* workspace,
                                                       size_t workspace_bytes) {
  cublasLtHandle_t raw = nullptr;
  DN_CUBLAS_RETURN_IF_ERROR(cublasLtCreate(&raw));
  CublasLtPtr handle(raw);
  return std::unique_ptr<LtGemm>(
      new LtGemm(std::move(handle), workspace, workspace_bytes));
}

absl::StatusOr<std::unique_ptr<LtGemm::Plan>> LtGemm::MakePlan(
    const Key& key, const void* bias) {
  auto plan = std::make_unique<Plan>();
  cublasLtMatmulDesc_t desc = nullptr;
  DN_CUBLAS_RETURN_IF_ERROR(
      cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  plan->desc.reset(desc);
  const int32_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  DN_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
      desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)));
  DN_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
      desc, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b)));
  const uint32_t epilogue = key.epilogue;
  DN_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
      desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
  if (bias != nullptr) {
    // Bias dtype defaults to D's (bf16); the pointer value tells the
    // heuristic its alignment.
    DN_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
        desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  }

  // Column-major views: A = w as [K, N] (ld K), B = x as [K, M] (ld K),
  // D = y as [N, M] (ld N).
  const uint64_t m = static_cast<uint64_t>(key.m);
  const uint64_t n = static_cast<uint64_t>(key.n);
  const uint64_t k = static_cast<uint64_t>(key.k);
  cublasLtMatrixLayout_t layout = nullptr;
  DN_CUBLAS_RETURN_IF_ERROR(
      cublasLtMatrixLayoutCreate(&layout, CUDA_R_16BF, k, n, key.k));
  plan->a.reset(layout);
  DN_CUBLAS_RETURN_IF_ERROR(
      cublasLtMatrixLayoutCreate(&layout, CUDA_R_16BF, k, m, key.k));
  plan->b.reset(layout);
  DN_CUBLAS_RETURN_IF_ERROR(
      cublasLtMatrixLayoutCreate(&layout, CUDA_R_16BF, n, m, key.n));
  plan->d.reset(layout);

  cublasLtMatmulPreference_t raw_pref = nullptr;
  DN_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(&raw_pref));
  MatmulPreferencePtr pref(raw_pref);
  const uint64_t ws = workspace_bytes_;
  DN_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
      raw_pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  DN_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
      raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &key.align_w,
      sizeof(key.align_w)));
  DN_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
      raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &key.align_x,
      sizeof(key.align_x)));
  DN_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
      raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &key.align_y,
      sizeof(key.align_y)));
  DN_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
      raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &key.align_y,
      sizeof(key.align_y)));

  cublasLtMatmulHeuristicResult_t results[4] = {};
  int returned = 0;
  DN_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulAlgoGetHeuristic(
      handle_.get(), desc, plan->a.get(), plan->b.get(), plan->d.get(),
      plan->d.get(), raw_pref, 4, results, &returned));
  for (int i = 0; i < returned; ++i) {
    if (results[i].state == CUBLAS_STATUS_SUCCESS &&
        results[i].workspaceSize <= workspace_bytes_) {
      plan->algo = results[i].algo;
      return plan;
    }
  }
  return absl::InternalError(absl::StrCat(
      "cuda Linear: cuBLASLt has no algorithm for bf16 M=", key.m,
      " N=", key.n, " K=", key.k, " epilogue ",
      EpilogueName(static_cast<cublasLtEpilogue_t>(key.epilogue)),
      " with alignments x/w/y/bias ", key.align_x, "/", key.align_w, "/",
      key.align_y, "/", key.align_bias, " (", returned,
      " heuristic results); set CUBLASLT_LOG_LEVEL=5 for details"));
}

absl::Status LtGemm::Run(const void* x, const void* w, const void* bias,
                         bool gelu, int64_t m, int64_t n, int64_t k, void* y,
                         cudaStream_t stream) {
  if (m < 0 || n < 0 || k <= 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda Linear: sizes M=", m, " N=", n, " K=", k,
        " (K must be positive)"));
  if (m == 0 || n == 0) return absl::OkStatus();
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  if (bias != nullptr)
    epilogue = gelu ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_BIAS;
  else if (gelu)
    epilogue = CUBLASLT_EPILOGUE_GELU;
  const Key key{m, n, k, static_cast<uint32_t>(epilogue),
                AlignmentOf(x), AlignmentOf(w), AlignmentOf(y),
                bias != nullptr ? AlignmentOf(bias) : 256u};
  auto it = plans_.find(key);
  if (it == plans_.end()) {
    DN_ASSIGN_OR_RETURN(std::unique_ptr<Plan> plan, MakePlan(key, bias));
    it = plans_.emplace(key, std::move(plan)).first;
  }
  Plan& plan = *it->second;
  if (bias != nullptr) {
    DN_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
        plan.desc.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
        sizeof(bias)));
  }
  const float alpha = 1.0f, beta = 0.0f;
  DN_CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(
      handle_.get(), plan.desc.get(), &alpha, w, plan.a.get(), x, plan.b.get(),
      &beta, y, plan.d.get(), y, plan.d.get(), &plan.algo, workspace_,
      workspace_bytes_, stream));
  return absl::OkStatus();
}

}  // namespace dn::worker::cuda
