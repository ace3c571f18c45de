// File: worker/cuda/cuda_handles.h
//
// Owning wrappers (std::unique_ptr with deleters) for every CUDA runtime,
// cuBLASLt and cuDNN handle the CUDA backend creates: streams, events, CUDA
// graphs and their executables, pinned host buffers, the cuBLASLt handle and
// its matmul descriptors/layouts/preferences, the cuDNN handle and cuDNN
// backend descriptors. Deleters ignore errors: they run in destructors, where
// the only sensible reaction to a failing destroy is to carry on.
//
// Include only from CUDA-enabled code in worker/cuda/.
#ifndef DN_WORKER_CUDA_CUDA_HANDLES_H_
#define DN_WORKER_CUDA_CUDA_HANDLES_H_

#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <cudnn_graph.h>

#include <memory>
#include <type_traits>

namespace dn::worker::cuda {

struct StreamDeleter {
  void operator()(cudaStream_t s) const { (void)cudaStreamDestroy(s); }
};
using StreamPtr = std::unique_ptr<std::remove_pointer_t<cudaStream_t>, StreamDeleter>;

struct EventDeleter {
  void operator()(cudaEvent_t e) const { (void)cudaEventDestroy(e); }
};
using EventPtr = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, EventDeleter>;

struct GraphDeleter {
  void operator()(cudaGraph_t g) const { (void)cudaGraphDestroy(g); }
};
using GraphPtr = std::unique_ptr<std::remove_pointer_t<cudaGraph_t>, GraphDeleter>;

struct GraphExecDeleter {
  void operator()(cudaGraphExec_t g) const { (void)cudaGraphExecDestroy(g); }
};
using GraphExecPtr =
    std::unique_ptr<std::remove_pointer_t<cudaGraphExec_t>, GraphExecDeleter>;

struct PinnedDeleter {
  void operator()(void* p) const { (void)cudaFreeHost(p); }
};
using PinnedPtr = std::unique_ptr<void, PinnedDeleter>;

struct CublasLtDeleter {
  void operator()(cublasLtHandle_t h) const { (void)cublasLtDestroy(h); }
};
using CublasLtPtr =
    std::unique_ptr<std::remove_pointer_t<cublasLtHandle_t>, CublasLtDeleter>;

struct MatmulDescDeleter {
  void operator()(cublasLtMatmulDesc_t d) const {
    (void)cublasLtMatmulDescDestroy(d);
  }
};
using MatmulDescPtr =
    std::unique_ptr<std::remove_pointer_t<cublasLtMatmulDesc_t>, MatmulDescDeleter>;

struct MatrixLayoutDeleter {
  void operator()(cublasLtMatrixLayout_t l) const {
    (void)cublasLtMatrixLayoutDestroy(l);
  }
};
using MatrixLayoutPtr = std::unique_ptr<std::remove_pointer_t<cublasLtMatrixLayout_t>,
                                        MatrixLayoutDeleter>;

struct MatmulPreferenceDeleter {
  void operator()(cublasLtMatmulPreference_t p) const {
    (void)cublasLtMatmulPreferenceDestroy(p);
  }
};
using MatmulPreferencePtr =
    std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>,
                    MatmulPreferenceDeleter>;

struct CudnnDeleter {
  void operator()(cudnnHandle_t h) const { (void)cudnnDestroy(h); }
};
using CudnnPtr = std::unique_ptr<std::remove_pointer_t<cudnnHandle_t>, CudnnDeleter>;

// cudnnBackendDescriptor_t is void*.
struct CudnnDescDeleter {
  void operator()(cudnnBackendDescriptor_t d) const {
    (void)cudnnBackendDestroyDescriptor(d);
  }
};
using CudnnDescPtr = std::unique_ptr<void, CudnnDescDeleter>;

}  // namespace dn::worker::cuda

#endif  // DN_WORKER_CUDA_CUDA_HANDLES_H_
