// File: worker/cuda/cuda_backend.h
//
// The CUDA implementation of worker/backend.h: bf16 activations and GEMM
// weights with fp32 accumulation, fp32 norms/modulation/RoPE maths, on one
// device and one non-blocking stream. GEMMs go through cuBLASLt (fused
// bias/GELU epilogues), attention through cuDNN's fused SDPA (backend API),
// everything else through the kernels of worker/cuda/kernels.h. Capture()
// records the stream into a CUDA graph. See docs/CUDA.md.
//
// This header needs no CUDA headers; the backend is built only when CMake's
// DENOISED_WITH_CUDA is on.
#ifndef DN_WORKER_CUDA_CUDA_BACKEND_H_
#define DN_WORKER_CUDA_CUDA_BACKEND_H_

#include <memory>

#include "absl/status/statusor.h"
#include "worker/backend.h"

namespace dn::worker {

// Selects options.device, creates the stream, the cuBLASLt and cuDNN
// handles and the workspaces. FAILED_PRECONDITION when there is no usable
// device (no driver, bad ordinal) or the cuDNN runtime is unusable.
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(
    const BackendOptions& options);

}  // namespace dn::worker

#endif  // DN_WORKER_CUDA_CUDA_BACKEND_H_
