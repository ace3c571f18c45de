// File: worker/backend.h
//
// The compute-backend interface: every operation the Wan2.1 DiT needs, on one
// device. The model code (worker/wan_model.*) is written only against this
// interface; CpuBackend (worker/cpu/) is the plain fp32 reference, and
// CudaBackend (worker/cuda/, bf16 with fp32 accumulation) plugs in without
// touching the model.
//
// Conventions for every op:
// - Tensors are dense, row-major, in this backend's memory (device()).
// - "Activations" and GEMM weights/biases are in compute_dtype() (f32 on CPU,
//   bf16 on CUDA). Norm weights, modulation tables, modulation vectors and
//   RoPE tables are always f32. Each op states the dtypes it takes.
// - Outputs are preallocated by the caller with Empty(); ops never allocate
//   device memory (workspaces are owned by the backend and sized at startup).
// - Ops are asynchronous on the backend's stream (CPU: synchronous). Only
//   CopyToHost, Synchronize and ElapsedSeconds wait.
// - Errors (bad shapes, library failures) come back as absl::Status.
#ifndef DN_WORKER_BACKEND_H_
#define DN_WORKER_BACKEND_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/tensor.h"

namespace dn::worker {

enum class Activation { kNone, kGeluTanh };

// A point in the backend's stream, for timing (CUDA: an event; CPU: a clock).
class Marker {
 public:
  virtual ~Marker() = default;
};

// A recorded sequence of ops that can be replayed with the same buffers
// (CUDA: a CUDA graph; CPU: the body is simply run again).
class Graph {
 public:
  virtual ~Graph() = default;
  virtual absl::Status Replay() = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string name() const = 0;        // "cpu" | "cuda"
  virtual Device device() const = 0;
  virtual DType compute_dtype() const = 0;
  virtual std::string device_description() const = 0;  // e.g. "NVIDIA H100 80GB HBM3 (0)"
  // The CUDA stream (cudaStream_t) ops run on; nullptr on CPU. The NCCL
  // process group issues its collectives on it.
  virtual void* stream() const = 0;

  // --- memory -------------------------------------------------------------
  virtual absl::StatusOr<Tensor> Empty(const Shape& shape, DType dtype) = 0;
  // Converts `src` (dst->numel() floats) into dst's dtype.
  virtual absl::Status CopyFromHost(const float* src, Tensor* dst) = 0;
  // Converts src into floats; waits for pending work.
  virtual absl::Status CopyToHost(const Tensor& src, float* dst) = 0;
  // Same-device copy of equal-sized tensors (dtype may differ; converted).
  virtual absl::Status Copy(const Tensor& src, Tensor* dst) = 0;
  // dst[i] = mean + std * N(0,1)[seed, stream, i], with the counter-based
  // generator of worker/noise.h, so every backend makes the same numbers
  // (up to dst's dtype rounding).
  virtual absl::Status FillNormal(Tensor* dst, uint64_t seed, uint64_t stream,
                                  float mean, float std) = 0;
  // Peak bytes of device memory this backend has allocated.
  virtual int64_t peak_memory_bytes() const = 0;

  // --- dense ops ------------------------------------------------------------
  // y[M,N] = act(x[M,K] · w[N,K]^T + bias[N]). bias may be null.
  // x, w, bias, y: compute dtype.
  virtual absl::Status Linear(const Tensor& x, const Tensor& w,
                              const Tensor* bias, Activation act,
                              Tensor* y) = 0;
  // y = x * sigmoid(x), elementwise; compute dtype.
  virtual absl::Status Silu(const Tensor& x, Tensor* y) = 0;
  // y = GELU_tanh(x), elementwise (the Linear epilogue's activation, applied
  // on its own: the LoRA path adds its delta before the activation);
  // compute dtype; y may be x.
  virtual absl::Status GeluTanh(const Tensor& x, Tensor* y) = 0;
  // y = 0.5 x (1 + erf(x / sqrt 2)) (exact GELU: the I2V image embedder);
  // compute dtype; y may be x.
  virtual absl::Status GeluErf(const Tensor& x, Tensor* y) = 0;
  // out[B,k,D] (f32) = table[k,D] (f32) + proj, where proj (compute dtype) is
  // [B, k*D] (one row of D per k) or [B, D] (broadcast to every k).
  virtual absl::Status AddModulation(const Tensor& table, const Tensor& proj,
                                     Tensor* out) = 0;
  // y[B,S,D] = LN(x)[b,s,:] * (1 + mod[b,scale_index,:]) + mod[b,shift_index,:]
  // LN without affine parameters, statistics in fp32. x, y: compute dtype;
  // mod: f32 [B,k,D].
  virtual absl::Status LayerNormModulate(const Tensor& x, const Tensor& mod,
                                         int shift_index, int scale_index,
                                         float eps, Tensor* y) = 0;
  // y[M,D] = LN(x) * weight + bias; weight, bias f32 [D].
  virtual absl::Status LayerNormAffine(const Tensor& x, const Tensor& weight,
                                       const Tensor& bias, float eps,
                                       Tensor* y) = 0;
  // y[M,D] = x / sqrt(mean(x^2 over all D) + eps) * weight; weight f32 [D].
  virtual absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps,
                               Tensor* y) = 0;
  // RmsNorm over all D of x[B,S,D], then 3-axis RoPE of each of `heads` heads
  // (head h = channels [h*d, (h+1)*d), d = D/heads) with interleaved pairs:
  //   y[2k]   = x[2k] cos φ[s,k] - x[2k+1] sin φ[s,k]
  //   y[2k+1] = x[2k] sin φ[s,k] + x[2k+1] cos φ[s,k]
  // rope: f32 [S, d/2, 2] holding (cos φ, sin φ) per token s and pair k.
  virtual absl::Status RmsNormRope(const Tensor& x, const Tensor& weight,
                                   const Tensor& rope, int heads, float eps,
                                   Tensor* y) = 0;
  // Fused q/k RMSNorm + RoPE + Ulysses pack: the result of
  //   RmsNormRope(q, q_weight, rope, heads, eps, &q')
  //   RmsNormRope(k, k_weight, rope, heads, eps, &k')
  //   PackQkv(q' [B,S,H,d], k' [B,S,H,d], v [B,S,H,d], world, send)
  // without writing q' and k'. q, k, v: [B, S, D] in compute dtype (D =
  // heads * d); send: [P, 3, B, S, H/P, d] (with world == 1: q', k', v
  // stacked as [1, 3, B, S, H, d]).
  virtual absl::Status RmsNormRopePackQkv(const Tensor& q, const Tensor& k,
                                          const Tensor& v,
                                          const Tensor& q_weight,
                                          const Tensor& k_weight,
                                          const Tensor& rope, int heads,
                                          float eps, int world,
                                          Tensor* send) = 0;
  // o[B,Sq,H,d] = softmax(q k^T * scale) v per batch and head, non-causal,
  // over the first kv_len rows of k, v [B,Skv,H,d] (kv_len <= Skv; rows past
  // kv_len are padding and ignored). Compute dtype.
  virtual absl::Status Attention(const Tensor& q, const Tensor& k,
                                 const Tensor& v, int64_t kv_len, float scale,
                                 Tensor* o) = 0;
  // The fast tier's self-attention (opt-in per request, issue 16 part 3;
  // docs/ENGINE.md, "fp8 attention"): the same contract as Attention, with
  // q, k, v and the softmax probabilities quantized to fp8 e4m3 under scales
  // the backend derives from the data (CPU: an fp32 emulation; CUDA:
  // cuDNN's fp8 SDPA, docs/CUDA.md). Not exact: its error against Attention
  // is bounded in docs/CUDA.md and docs/QUALITY.md. A shape the backend
  // cannot run gives a status naming the shape.
  virtual absl::Status AttentionFp8(const Tensor& q, const Tensor& k,
                                    const Tensor& v, int64_t kv_len,
                                    float scale, Tensor* o) = 0;
  // x[B,S,D] += y[B,S,D] * mod[b,gate_index,:]   (mod f32 [B,k,D]).
  virtual absl::Status GatedResidual(Tensor* x, const Tensor& y,
                                     const Tensor& mod, int gate_index) = 0;
  // x += y (same shape).
  virtual absl::Status AddInPlace(Tensor* x, const Tensor& y) = 0;
  // Step caching's signal (docs/ENGINE.md "Step caching"): for cur, prev
  // [B, S, D] (compute dtype) cut into tiles of `tile` rows (S % tile == 0,
  // T = S / tile tiles per batch row), over rows r < valid_rows only:
  //   sums[2 (b T + t)]     = sum over the tile's rows of |cur - prev|
  //   sums[2 (b T + t) + 1] = sum over the tile's rows of |prev|
  // accumulated in double. sums: host, 2 B T values; waits for the result.
  // Each tile is reduced on its own in an order fixed by the backend, so a
  // tile's sums do not depend on which rows around it are in the call (the
  // engine's decision is the same for every rank count where tiles align).
  virtual absl::Status TileAbsDiffSums(const Tensor& cur, const Tensor& prev,
                                       int64_t tile, int64_t valid_rows,
                                       double* sums) = 0;

  // --- Ulysses relayouts (see comm/ulysses.h for the layouts) ---------------
  // q,k,v [B,S,H,d] (S = this rank's padded shard) -> send [P,3,B,S,H/P,d]
  // (destination-major: block p holds heads [p*H/P, (p+1)*H/P)).
  virtual absl::Status PackQkv(const Tensor& q, const Tensor& k,
                               const Tensor& v, int world, Tensor* send) = 0;
  // recv [P,3,B,S,H/P,d] (block p from rank p = tokens [p*S,(p+1)*S)) ->
  // q,k,v [B,P*S,H/P,d].
  virtual absl::Status UnpackQkv(const Tensor& recv, int world, Tensor* q,
                                 Tensor* k, Tensor* v) = 0;
  // o [B,P*S,H/P,d] -> send [P,B,S,H/P,d] (block p = tokens of rank p).
  virtual absl::Status PackOut(const Tensor& o, int world, Tensor* send) = 0;
  // recv [P,B,S,H/P,d] (block p = heads of rank p) -> o [B,S,H,d].
  virtual absl::Status UnpackOut(const Tensor& recv, int world, Tensor* o) = 0;

  // --- stream, timing, graphs -----------------------------------------------
  virtual absl::Status Synchronize() = 0;
  virtual absl::StatusOr<std::unique_ptr<Marker>> Mark() = 0;
  // Seconds from a to b; waits for b.
  virtual absl::StatusOr<double> ElapsedSeconds(const Marker& a,
                                                const Marker& b) = 0;
  // Runs `body` once, recording its ops; the Graph replays them.
  virtual absl::StatusOr<std::unique_ptr<Graph>> Capture(
      const std::function<absl::Status()>& body) = 0;
  // True when Replay launches the recorded device work without running the
  // body's host code again (CUDA graphs): markers placed by the body then
  // time nothing on replays. False when Replay just runs the body (CPU).
  virtual bool replay_skips_host() const = 0;
  // Token rows per rank are padded to a multiple of this (docs/ENGINE.md,
  // "Rank invariance"): the CPU backend computes every GEMM in calls of
  // exactly this many rows aligned to global token positions.
  virtual int64_t shard_alignment() const { return 1; }
};

struct BackendOptions {
  std::string name = "cpu";  // cpu | cuda
  int device = 0;            // CUDA device ordinal
  int threads = 0;           // CPU threads; 0 = hardware concurrency
};

// Makes a backend by name. "cuda" gives UNIMPLEMENTED in builds without CUDA.
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(
    const BackendOptions& options);

}  // namespace dn::worker

#endif  // DN_WORKER_BACKEND_H_
