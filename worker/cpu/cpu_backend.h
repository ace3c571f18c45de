// File: worker/cpu/cpu_backend.h
//
// CpuBackend: the plain fp32 implementation of worker/backend.h. It is the
// numerical reference the CUDA backend is tested against, so every op is
// written the straightforward way: GEMMs through OpenBLAS cblas_sgemm,
// attention per (batch, head) as sgemm -> stable softmax -> sgemm, norms and
// RoPE in fp32 with double-precision reductions. Compute dtype is f32; other
// dtypes are accepted only by the memory ops (Empty, copies, FillNormal).
//
// Threads: OpenBLAS runs the GEMMs on `threads` threads
// (openblas_set_num_threads, process-wide: one backend per process), and a
// small fixed pool splits the row-wise ops (norms, RoPE, softmax, noise)
// when they are large enough to pay.
#ifndef DN_WORKER_CPU_CPU_BACKEND_H_
#define DN_WORKER_CPU_CPU_BACKEND_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "worker/backend.h"
#include "worker/op_contract.h"

namespace dn::worker {

class ThreadPool;

class CpuBackend : public Backend {
 public:
  // threads <= 0: hardware concurrency.
  explicit CpuBackend(int threads);
  ~CpuBackend() override;

  std::string name() const override { return "cpu"; }
  Device device() const override { return Device::kCpu; }
  DType compute_dtype() const override { return DType::kF32; }
  std::string device_description() const override;
  void* stream() const override { return nullptr; }
  int threads() const { return threads_; }

  absl::StatusOr<Tensor> Empty(const Shape& shape, DType dtype) override;
  absl::Status CopyFromHost(const float* src, Tensor* dst) override;
  absl::Status CopyToHost(const Tensor& src, float* dst) override;
  absl::Status Copy(const Tensor& src, Tensor* dst) override;
  absl::Status FillNormal(Tensor* dst, uint64_t seed, uint64_t stream,
                          float mean, float std) override;
  int64_t peak_memory_bytes() const override;

  absl::Status Linear(const Tensor& x, const Tensor& w, const Tensor* bias,
                      Activation act, Tensor* y) override;
  absl::Status Silu(const Tensor& x, Tensor* y) override;
  absl::Status GeluTanh(const Tensor& x, Tensor* y) override;
  absl::Status GeluErf(const Tensor& x, Tensor* y) override;
  absl::Status AddModulation(const Tensor& table, const Tensor& proj,
                             Tensor* out) override;
  absl::Status LayerNormModulate(const Tensor& x, const Tensor& mod,
                                 int shift_index, int scale_index, float eps,
                                 Tensor* y) override;
  absl::Status LayerNormAffine(const Tensor& x, const Tensor& weight,
                               const Tensor& bias, float eps,
                               Tensor* y) override;
  absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps,
                       Tensor* y) override;
  absl::Status RmsNormRope(const Tensor& x, const Tensor& weight,
                           const Tensor& rope, int heads, float eps,
                           Tensor* y) override;
  absl::Status RmsNormRopePackQkv(const Tensor& q, const Tensor& k,
                                  const Tensor& v, const Tensor& q_weight,
                                  const Tensor& k_weight, const Tensor& rope,
                                  int heads, float eps, int world,
                                  Tensor* send) override;
  absl::Status Attention(const Tensor& q, const Tensor& k, const Tensor& v,
                         int64_t kv_len, float scale, Tensor* o) override;
  // The fp8 e4m3 emulation of CUDA's AttentionFp8, in fp32 (docs/CUDA.md,
  // "fp8 attention"): q, k, v quantized with one data-derived scale per
  // tensor (448 / amax), S = q8 k8^T * descales * scale, P = exp(S - rowmax)
  // quantized with scale 448, O = P8 v8 * descales / rowsum. Not bitwise the
  // GPU's numbers (accumulation order, flash tiling), but the same roundings.
  absl::Status AttentionFp8(const Tensor& q, const Tensor& k, const Tensor& v,
                            int64_t kv_len, float scale, Tensor* o) override;
  absl::Status GatedResidual(Tensor* x, const Tensor& y, const Tensor& mod,
                             int gate_index) override;
  absl::Status AddInPlace(Tensor* x, const Tensor& y) override;
  absl::Status TileAbsDiffSums(const Tensor& cur, const Tensor& prev,
                               int64_t tile, int64_t valid_rows,
                               double* sums) override;

  absl::Status PackQkv(const Tensor& q, const Tensor& k, const Tensor& v,
                       int world, Tensor* send) override;
  absl::Status UnpackQkv(const Tensor& recv, int world, Tensor* q, Tensor* k,
                         Tensor* v) override;
  absl::Status PackOut(const Tensor& o, int world, Tensor* send) override;
  absl::Status UnpackOut(const Tensor& recv, int world, Tensor* o) override;

  absl::Status Synchronize() override { return absl::OkStatus(); }
  // GEMM row tile: every GEMM runs in single-threaded calls of kRowTile rows
  // (the last call of a tensor may be shorter), so a token row's arithmetic
  // does not depend on the shard size, the thread count or the rank count.
  static constexpr int64_t kRowTile = 64;
  int64_t shard_alignment() const override { return kRowTile; }
  absl::StatusOr<std::unique_ptr<Marker>> Mark() override;
  absl::StatusOr<double> ElapsedSeconds(const Marker& a,
                                        const Marker& b) override;
  absl::StatusOr<std::unique_ptr<Graph>> Capture(
      const std::function<absl::Status()>& body) override;
  bool replay_skips_host() const override { return false; }

 private:
  // Runs fn(begin, end) over [0, n) split across the pool; inline when the
  // work (n * cost_per_item) is small.
  void ParallelFor(int64_t n, int64_t cost_per_item,
                   const std::function<void(int64_t, int64_t)>& fn);

  struct MemoryCounter {
    std::atomic<int64_t> current{0};
    std::atomic<int64_t> peak{0};
  };

  const OpContract contract_{"cpu", Device::kCpu, DType::kF32};
  int threads_;
  std::unique_ptr<ThreadPool> pool_;
  std::shared_ptr<MemoryCounter> memory_;
};

}  // namespace dn::worker

#endif  // DN_WORKER_CPU_CPU_BACKEND_H_
