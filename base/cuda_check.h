// File: base/cuda_check.h
//
// The one place where CUDA runtime, cuBLAS(Lt), cuDNN and NCCL return codes
// become absl::Status. Include only from CUDA-enabled code (comm/nccl_*,
// worker/cuda/); server/ never includes it.
//
//   DN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(...));
//   DN_CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(...));
//   DN_CUDNN_RETURN_IF_ERROR(cudnnBackendFinalize(desc));
//   DN_NCCL_RETURN_IF_ERROR(ncclAlltoAll(...));
//   DN_CUDA_RETURN_IF_ERROR(cudaGetLastError());   // after every launch
//
// The resulting status carries the statement, file:line and the library's
// error text. CUDA errors map to INTERNAL; NCCL remote/system errors to
// UNAVAILABLE (a peer is gone); NCCL in-progress is not an error here.
#ifndef DN_BASE_CUDA_CHECK_H_
#define DN_BASE_CUDA_CHECK_H_

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

#if defined(DN_CHECK_WITH_CUDA_RUNTIME) || defined(__CUDACC__) || \
    __has_include(<cuda_runtime_api.h>)
#include <cuda_runtime_api.h>
#define DN_HAVE_CUDA_RUNTIME_ 1
#endif
#if __has_include(<nccl.h>)
#include <nccl.h>
#define DN_HAVE_NCCL_ 1
#endif
#if __has_include(<cublasLt.h>)
#include <cublasLt.h>
#define DN_HAVE_CUBLASLT_ 1
#endif
#if __has_include(<cudnn_graph.h>)
#include <cudnn_graph.h>
#define DN_HAVE_CUDNN_ 1
#endif

namespace dn::internal {

inline std::string CheckWhere(const char* expr, const char* file, int line) {
  const char* base = file;
  for (const char* p = file; *p; ++p)
    if (*p == '/') base = p + 1;
  return absl::StrCat(expr, " at ", base, ":", line);
}

#ifdef DN_HAVE_CUDA_RUNTIME_
inline absl::Status CudaStatus(cudaError_t e, const char* expr,
                               const char* file, int line) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("CUDA error ", cudaGetErrorName(e),
                                          " (", cudaGetErrorString(e),
                                          ") in ", CheckWhere(expr, file, line)));
}
#endif

#ifdef DN_HAVE_NCCL_
inline absl::Status NcclStatus(ncclResult_t r, const char* expr,
                               const char* file, int line) {
  if (r == ncclSuccess || r == ncclInProgress) return absl::OkStatus();
  std::string msg = absl::StrCat("NCCL error ", static_cast<int>(r), " (",
                                 ncclGetErrorString(r), ") in ",
                                 CheckWhere(expr, file, line));
  if (r == ncclRemoteError || r == ncclSystemError)
    return absl::UnavailableError(msg);
  if (r == ncclInvalidArgument || r == ncclInvalidUsage)
    return absl::InvalidArgumentError(msg);
  return absl::InternalError(msg);
}
#endif

#ifdef DN_HAVE_CUBLASLT_
inline absl::Status CublasStatus(cublasStatus_t s, const char* expr,
                                 const char* file, int line) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(
      "cuBLAS error ", cublasLtGetStatusName(s), " (",
      cublasLtGetStatusString(s), ") in ", CheckWhere(expr, file, line)));
}
#endif

#ifdef DN_HAVE_CUDNN_
inline absl::Status CudnnStatus(cudnnStatus_t s, const char* expr,
                                const char* file, int line) {
  if (s == CUDNN_STATUS_SUCCESS) return absl::OkStatus();
  char last[512] = {0};
  cudnnGetLastErrorString(last, sizeof(last));
  return absl::InternalError(absl::StrCat(
      "cuDNN error ", cudnnGetErrorString(s), " in ",
      CheckWhere(expr, file, line), last[0] ? absl::StrCat(": ", last) : ""));
}
#endif

}  // namespace dn::internal

#define DN_CHECK_RETURN_(fn, expr)                                        \
  do {                                                                    \
    ::absl::Status dn_check_status_ = fn((expr), #expr, __FILE__, __LINE__); \
    if (!dn_check_status_.ok()) return dn_check_status_;                  \
  } while (0)

#define DN_CUDA_RETURN_IF_ERROR(expr) DN_CHECK_RETURN_(::dn::internal::CudaStatus, expr)
#define DN_NCCL_RETURN_IF_ERROR(expr) DN_CHECK_RETURN_(::dn::internal::NcclStatus, expr)
#define DN_CUBLAS_RETURN_IF_ERROR(expr) DN_CHECK_RETURN_(::dn::internal::CublasStatus, expr)
#define DN_CUDNN_RETURN_IF_ERROR(expr) DN_CHECK_RETURN_(::dn::internal::CudnnStatus, expr)

// As a Status value rather than an early return (e.g. in destructors, where
// the error is logged).
#define DN_CUDA_STATUS(expr) ::dn::internal::CudaStatus((expr), #expr, __FILE__, __LINE__)
#define DN_NCCL_STATUS(expr) ::dn::internal::NcclStatus((expr), #expr, __FILE__, __LINE__)

#endif  // DN_BASE_CUDA_CHECK_H_
