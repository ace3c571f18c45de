// File: worker/cuda/kernels.h
//
// The CUDA backend's own kernels, as TensorRT-LLM-style launchers: raw typed
// device pointers, sizes, and the stream last. Kernels never see Tensor or
// Backend; the backend (cuda_backend.cc) checks tensors and calls these.
// Every launcher checks its sizes (INVALID_ARGUMENT naming the bad one),
// launches asynchronously on `stream`, and checks cudaGetLastError (INTERNAL).
//
// Numerics: activations are bf16 in memory; every kernel loads them into
// fp32, does all arithmetic (statistics, modulation, RoPE, residual adds) in
// fp32 and rounds once to bf16 (round-to-nearest-even) on store. Norm
// weights, modulation tables and RoPE tables are fp32.
//
// Vectorization: row kernels move 8 bf16 (16 bytes) per access when the row
// length is a multiple of 8 and every pointer is 16-byte aligned, else one
// element per access. Row kernels run one block per row and keep the row in
// shared memory as fp32 (so D <= kMaxRowDim).
#ifndef DN_WORKER_CUDA_KERNELS_H_
#define DN_WORKER_CUDA_KERNELS_H_

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "worker/tensor.h"

namespace dn::worker::cuda {

using bf16 = __nv_bfloat16;

// Longest row the row kernels take (the fp32 copy fills 48 KiB of shared
// memory). Wan2.1-14B has D = 5120.
inline constexpr int64_t kMaxRowDim = 12288;

// y[b,s,:] = LN(x[b,s,:]) * (1 + mod[b,scale_index,:]) + mod[b,shift_index,:]
// x, y: [batch, seq, dim]; mod: [batch, mod_rows, dim]. LN without affine,
// biased variance, statistics in fp32 (two passes over the cached row).
absl::Status InvokeLayerNormModulate(const bf16* x, const float* mod, bf16* y,
                                     int64_t batch, int64_t seq, int64_t dim,
                                     int64_t mod_rows, int shift_index,
                                     int scale_index, float eps,
                                     cudaStream_t stream);

// y[r,:] = LN(x[r,:]) * weight + bias over `rows` rows of `dim`.
absl::Status InvokeLayerNormAffine(const bf16* x, const float* weight,
                                   const float* bias, bf16* y, int64_t rows,
                                   int64_t dim, float eps, cudaStream_t stream);

// y[r,:] = x[r,:] / sqrt(mean(x[r,:]^2) + eps) * weight.
absl::Status InvokeRmsNorm(const bf16* x, const float* weight, bf16* y,
                           int64_t rows, int64_t dim, float eps,
                           cudaStream_t stream);

// RmsNorm over all `dim` channels of x[batch, seq, dim], then RoPE on each of
// `heads` heads with interleaved pairs (see worker/backend.h); rope is
// [seq, head_dim/2, 2] = (cos, sin) per token and pair.
absl::Status InvokeRmsNormRope(const bf16* x, const float* weight,
                               const float* rope, bf16* y, int64_t batch,
                               int64_t seq, int64_t dim, int64_t heads,
                               float eps, cudaStream_t stream);

// Fused q/k RMSNorm + RoPE + Ulysses PackQkv: q, k, v [batch, seq, dim]
// (dim = heads * head_dim) -> send [world, 3, batch, seq, heads/world,
// head_dim]; q and k get InvokeRmsNormRope's maths (the same numbers), v is
// copied. One block per (token row, tensor); the row's channel slice p of
// dim/world goes to destination block p.
absl::Status InvokeRmsNormRopePackQkv(const bf16* q, const bf16* k,
                                      const bf16* v, const float* q_weight,
                                      const float* k_weight, const float* rope,
                                      bf16* send, int64_t batch, int64_t seq,
                                      int64_t dim, int64_t heads, int64_t world,
                                      float eps, cudaStream_t stream);

// y = x * sigmoid(x) over n elements.
absl::Status InvokeSilu(const bf16* x, bf16* y, int64_t n, cudaStream_t stream);
// y = GELU_tanh(x) (fp32 math); y may be x.
absl::Status InvokeGeluTanh(const bf16* x, bf16* y, int64_t n, cudaStream_t stream);
// y = 0.5 x (1 + erf(x / sqrt 2)) (fp32 math); y may be x.
absl::Status InvokeGeluErf(const bf16* x, bf16* y, int64_t n, cudaStream_t stream);

// out[b,k,j] = table[k,j] + proj[b, k*dim + j] (broadcast: proj[b, j]).
absl::Status InvokeAddModulation(const float* table, const bf16* proj,
                                 float* out, int64_t batch, int64_t rows,
                                 int64_t dim, bool broadcast,
                                 cudaStream_t stream);

// x[b,s,:] = bf16(x + y * mod[b,gate_index,:]) with x, y [batch, seq, dim].
absl::Status InvokeGatedResidual(bf16* x, const bf16* y, const float* mod,
                                 int64_t batch, int64_t seq, int64_t dim,
                                 int64_t mod_rows, int gate_index,
                                 cudaStream_t stream);

// x = bf16(x + y) over n elements.
absl::Status InvokeAddInPlace(bf16* x, const bf16* y, int64_t n,
                              cudaStream_t stream);

// Step caching's tile sums (Backend::TileAbsDiffSums), first stage: for
// cur, prev [batch, seq, dim] and tiles of `tile` rows (seq % tile == 0),
// each tile cut into TileAbsDiffChunks(tile) chunks of at most 16 rows,
//   partials[2 i] = sum |cur - prev|, partials[2 i + 1] = sum |prev|
// over chunk i = (b * tiles + t) * chunks + c, rows < valid_rows only, in
// double and in a fixed order (deterministic). The caller adds a tile's
// chunks in order.
int64_t TileAbsDiffChunks(int64_t tile);
absl::Status InvokeTileAbsDiffSums(const bf16* cur, const bf16* prev,
                                   double* partials, int64_t batch, int64_t seq,
                                   int64_t dim, int64_t tile, int64_t valid_rows,
                                   cudaStream_t stream);

// Ulysses relayouts (layouts in comm/ulysses.h), dtype-agnostic copies of
// rows of h*head_dim elements of `elem_size` bytes (h = heads / world), with
// the widest access (16, 8, 4, 2 or 1 bytes) that the row length and every
// pointer allow. shard = S (this rank's padded token count).
//   PackQkv:   q,k,v [B,S,H,d]        -> send [P,3,B,S,h,d]
//   UnpackQkv: recv [P,3,B,S,h,d]     -> q,k,v [B,P*S,h,d]
//   PackOut:   o [B,P*S,h,d]          -> send [P,B,S,h,d]
//   UnpackOut: recv [P,B,S,h,d]       -> o [B,S,H,d]
struct RelayoutDims {
  int64_t batch = 1;
  int64_t shard = 0;
  int64_t heads = 1;  // H, all heads
  int64_t head_dim = 1;
  int64_t world = 1;
  size_t elem_size = 2;
};
absl::Status InvokePackQkv(const void* q, const void* k, const void* v,
                           void* send, const RelayoutDims& dims,
                           cudaStream_t stream);
absl::Status InvokeUnpackQkv(const void* recv, void* q, void* k, void* v,
                             const RelayoutDims& dims, cudaStream_t stream);
absl::Status InvokePackOut(const void* o, void* send, const RelayoutDims& dims,
                           cudaStream_t stream);
absl::Status InvokeUnpackOut(const void* recv, void* o,
                             const RelayoutDims& dims, cudaStream_t stream);

// dst[i] = convert(src[i]) between f32, bf16 and f16 (round to nearest even).
absl::Status InvokeConvert(const void* src, DType src_dtype, void* dst,
                           DType dst_dtype, int64_t n, cudaStream_t stream);

// dst[i] = mean + std * NormalAt(seed, stream_id, i) (worker/noise.h), stored
// in dst_dtype; the same numbers as the CPU backend up to the dtype rounding.
absl::Status InvokeFillNormal(void* dst, DType dst_dtype, int64_t n,
                              uint64_t seed, uint64_t stream_id, float mean,
                              float std, cudaStream_t stream);

}  // namespace dn::worker::cuda

#endif  // DN_WORKER_CUDA_KERNELS_H_
