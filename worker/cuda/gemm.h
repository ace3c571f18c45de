// File: worker/cuda/gemm.h
//
// LtGemm: the CUDA backend's GEMM, y[M,N] = act(x[M,K] w[N,K]^T + bias[N])
// through cuBLASLt with bf16 inputs/outputs and fp32 accumulation
// (CUBLAS_COMPUTE_32F, fp32 scale type). Bias and GELU are fused as
// cuBLASLt epilogues (BIAS, GELU, GELU_BIAS; cuBLASLt's GELU is the tanh
// approximation, the one Wan2.1's FFN uses; PyTorch's _addmm_activation
// relies on the same fact).
//
// Row-major trick: row-major y[M,N] is column-major y^T[N,M], and
// y^T = w x^T, so cuBLASLt computes D[N,M] = op(A) B with A = w as a
// column-major [K,N] matrix (transposed: op(A) = [N,K]) and B = x as a
// column-major [K,M] matrix. The bias then runs along D's rows (length N), as
// cuBLASLt's bias epilogue wants.
//
// The matmul descriptor, the layouts and the chosen algorithm are cached per
// (M, N, K, epilogue, pointer alignments); the first call of a shape asks the
// heuristic (host-only work, so it is also safe during graph capture). The
// workspace is allocated once by the owner and passed in.
#ifndef DN_WORKER_CUDA_GEMM_H_
#define DN_WORKER_CUDA_GEMM_H_

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <unordered_map>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/cuda/cuda_handles.h"

namespace dn::worker::cuda {

class LtGemm {
 public:
  // `workspace` (device, `workspace_bytes` bytes) must outlive this object.
  static absl::StatusOr<std::unique_ptr<LtGemm>> Create(void* workspace,
                                                        size_t workspace_bytes);

  // bf16 row-major y[M,N] = act(x[M,K] w[N,K]^T + bias[N]); bias may be null.
  absl::Status Run(const void* x, const void* w, const void* bias, bool gelu,
                   int64_t m, int64_t n, int64_t k, void* y,
                   cudaStream_t stream);

 private:
  struct Key {
    int64_t m, n, k;
    uint32_t epilogue;
    uint32_t align_x, align_w, align_y, align_bias;
    bool operator==(const Key& o) const {
      return m == o.m && n == o.n && k == o.k && epilogue == o.epilogue &&
             align_x == o.align_x && align_w == o.align_w &&
             align_y == o.align_y && align_bias == o.align_bias;
    }
  };
  struct KeyHash {
    size_t operator()(const Key& k) const;
  };
  struct Plan {
    MatmulDescPtr desc;
    MatrixLayoutPtr a, b, d;
    cublasLtMatmulAlgo_t algo;
  };

  LtGemm(CublasLtPtr handle, void* workspace, size_t workspace_bytes)
      : handle_(std::move(handle)),
        workspace_(workspace),
        workspace_bytes_(workspace_bytes) {}
  absl::StatusOr<std::unique_ptr<Plan>> MakePlan(const Key& key,
                                                 const void* bias);

  CublasLtPtr handle_;
  void* workspace_;
  size_t workspace_bytes_;
  std::unordered_map<Key, std::unique_ptr<Plan>, KeyHash> plans_;
};

}  // namespace dn::worker::cuda

#endif  // DN_WORKER_CUDA_GEMM_H_
