// File: worker/cuda/cublaslt_lazy.cc
//
// Loads cuBLASLt with dlopen on first use instead of linking it.
//
// Why: libcublasLt.so.13 carries a ~94 KB static TLS segment, and glibc
// carves a library's static TLS out of every thread's stack. It was first
// opened lazily because civetweb (prometheus-cpp's HTTP server) starts its
// threads with a fixed 100 KB stack, which that TLS nearly filled. civetweb
// is gone since /metrics moved to our own server thread (server/metrics.h,
// MetricsEndpoint), so that failure cannot happen any more. What remains
// true: opened with dlopen, cuBLASLt gets dynamic TLS, allocated per thread
// on first use, so the threads that never run a GEMM (gRPC, heartbeat,
// metrics, Gloo) do not pay 94 KB of their stack for it. Linking it directly
// would also work now; keeping dlopen costs one indirect call per entry point.
//
// This file defines the cuBLASLt entry points the backend uses, with the
// exact prototypes of <cublasLt.h>; each forwards to the real function,
// resolved once from the library. If the library cannot be loaded, calls
// return CUBLAS_STATUS_NOT_INITIALIZED (and the version is 0), which the
// backend reports as an error with the dlopen message in the log.
#include <cublasLt.h>
#include <dlfcn.h>


#include "base/log.h"

namespace {

void* Library() {
  static void* handle = [] {
    void* h = dlopen("libcublasLt.so.13", RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) h = dlopen("libcublasLt.so", RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr)
      DN_LOG(ERROR) << "cannot load cuBLASLt: " << dlerror();
    return h;
  }();
  return handle;
}

template <typename Fn>
Fn Resolve(const char* name) {
  void* lib = Library();
  if (lib == nullptr) return nullptr;
  void* sym = dlsym(lib, name);
  if (sym == nullptr) DN_LOG(ERROR) << "cuBLASLt has no symbol " << name;
  return reinterpret_cast<Fn>(sym);
}

}  // namespace

// Each wrapper resolves its symbol once (thread-safe static init).
#define DN_CUBLASLT_FORWARD(ret, name, fail, params, args)     \
  ret CUBLASWINAPI name params {                               \
    using Fn = ret(CUBLASWINAPI*) params;                      \
    static const Fn fn = Resolve<Fn>(#name);                   \
    if (fn == nullptr) return fail;                            \
    return fn args;                                            \
  }

extern "C" {

DN_CUBLASLT_FORWARD(size_t, cublasLtGetVersion, 0, (void), ())
DN_CUBLASLT_FORWARD(const char*, cublasLtGetStatusName, "CUBLAS_STATUS_NOT_INITIALIZED",
                    (cublasStatus_t status), (status))
DN_CUBLASLT_FORWARD(const char*, cublasLtGetStatusString, "cuBLASLt could not be loaded",
                    (cublasStatus_t status), (status))
DN_CUBLASLT_FORWARD(cublasStatus_t, cublasLtCreate, CUBLAS_STATUS_NOT_INITIALIZED,
                    (cublasLtHandle_t * handle), (handle))
DN_CUBLASLT_FORWARD(cublasStatus_t, cublasLtDestroy, CUBLAS_STATUS_NOT_INITIALIZED,
                    (cublasLtHandle_t handle), (handle))
DN_CUBLASLT_FORWARD(cublasStatus_t, cublasLtMatmul, CUBLAS_STATUS_NOT_INITIALIZED,
                    (cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void* alpha,
                     const void* a, cublasLtMatrixLayout_t adesc, const void* b,
                     cublasLtMatrixLayout_t bdesc, const void* beta, const void* c,
                     cublasLtMatrixLayout_t cdesc, void* d, cublasLtMatrixLayout_t ddesc,
                     const cublasLtMatmulAlgo_t* algo, void* workspace, size_t workspace_bytes,
                     cudaStream_t stream),
                    (handle, desc, alpha, a, adesc, b, bdesc, beta, c, cdesc, d, ddesc, algo,
                     workspace, workspace_bytes, stream))
DN_CUBLASLT_FORWARD(cublasStatus_t, cublasLtMatmulAlgoGetHeuristic, CUBLAS_STATUS_NOT_INITIALIZED,
                    (cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                     cublasLtMatrixLayout_t adesc, cublasLtMatrixLayout_t bdesc,
                     cublasLtMatrixLayout_t cdesc, cublasLtMatrixLayout_t ddesc,
                     cublasLtMatmulPreference_t pref, int requested,
                     cublasLtMatmulHeuristicResult_t results[], int* returned),
                    (handle, desc, adesc, bdesc, cdesc, ddesc, pref, requested, results, returned))
DN_CUBLASLT_FORWARD(cublasStatus_t, cublasLtMatmulDescCreate, CUBLAS_STATUS_NOT_INITIALIZED,
                    (cublasLtMatmulDesc_t * desc, cublasComputeType_t compute,
                     cudaDataType_t scale),
                    (desc, compute, scale))
DN_CUBLASLT_FORWARD(cublasStatus_t, cublasLtMatmulDescDestroy, CUBLAS_STATUS_NOT_INITIALIZED,
                    (cublasLtMatmulDesc_t desc), (desc))
DN_CUBLASLT_FORWARD(cublasStatus_t, cublasLtMatmulDescSetAttribute, CUBLAS_STATUS_NOT_INITIALIZED,
                    (cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr,
                     const void* buf, size_t bytes),
                    (desc, attr, buf, bytes))
DN_CUBLASLT_FORWARD(cublasStatus_t, cublasLtMatmulPreferenceCreate, CUBLAS_STATUS_NOT_INITIALIZED,
                    (cublasLtMatmulPreference_t * pref), (pref))
DN_CUBLASLT_FORWARD(cublasStatus_t, cublasLtMatmulPreferenceDestroy, CUBLAS_STATUS_NOT_INITIALIZED,
                    (cublasLtMatmulPreference_t pref), (pref))
DN_CUBLASLT_FORWARD(cublasStatus_t, cublasLtMatmulPreferenceSetAttribute,
                    CUBLAS_STATUS_NOT_INITIALIZED,
                    (cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr,
                     const void* buf, size_t bytes),
                    (pref, attr, buf, bytes))
DN_CUBLASLT_FORWARD(cublasStatus_t, cublasLtMatrixLayoutCreate, CUBLAS_STATUS_NOT_INITIALIZED,
                    (cublasLtMatrixLayout_t * layout, cudaDataType type, uint64_t rows,
                     uint64_t cols, int64_t ld),
                    (layout, type, rows, cols, ld))
DN_CUBLASLT_FORWARD(cublasStatus_t, cublasLtMatrixLayoutDestroy, CUBLAS_STATUS_NOT_INITIALIZED,
                    (cublasLtMatrixLayout_t layout), (layout))

}  // extern "C"
