// File: worker/op_contract.h
//
// The tensor contract of every Backend op (worker/backend.h), written once:
// where each argument lives, its dtype and its shape. Both backends check
// their arguments here before they compute, so a rule holds on CPU and CUDA
// alike and a violation reads the same on both:
//   "<backend> <Op>: tensor '<name>' has shape [..], expected [..]".
// A backend may add restrictions of its own (alignment, say) after these.
#ifndef DN_WORKER_OP_CONTRACT_H_
#define DN_WORKER_OP_CONTRACT_H_

#include <string>

#include "absl/status/status.h"
#include "worker/tensor.h"

namespace dn::worker {

class OpContract {
 public:
  // `backend` names the backend in messages ("cpu", "cuda"); its tensors
  // live on `device` and its activations are in `compute`.
  OpContract(std::string backend, Device device, DType compute);

  // Every check returns OK or INVALID_ARGUMENT naming the op and the tensor
  // or argument at fault (a relayout whose heads do not divide by the world
  // size: FAILED_PRECONDITION, as comm::UlyssesLayout::Validate says).

  // --- memory ---
  // `t` is defined and in this backend's memory.
  absl::Status Resident(const Tensor& t, const char* op, const char* what) const;
  absl::Status Copy(const Tensor& src, const Tensor& dst) const;

  // --- dense ops (argument order and meaning as in Backend) ---
  absl::Status Linear(const Tensor& x, const Tensor& w, const Tensor* bias,
                      const Tensor& y) const;
  absl::Status Silu(const Tensor& x, const Tensor& y) const;
  absl::Status GeluTanh(const Tensor& x, const Tensor& y) const;
  absl::Status GeluErf(const Tensor& x, const Tensor& y) const;
  absl::Status AddModulation(const Tensor& table, const Tensor& proj,
                             const Tensor& out) const;
  absl::Status LayerNormModulate(const Tensor& x, const Tensor& mod,
                                 int shift_index, int scale_index,
                                 const Tensor& y) const;
  absl::Status LayerNormAffine(const Tensor& x, const Tensor& weight,
                               const Tensor& bias, const Tensor& y) const;
  absl::Status RmsNorm(const Tensor& x, const Tensor& weight,
                       const Tensor& y) const;
  absl::Status RmsNormRope(const Tensor& x, const Tensor& weight,
                           const Tensor& rope, int heads, const Tensor& y) const;
  absl::Status RmsNormRopePackQkv(const Tensor& q, const Tensor& k,
                                  const Tensor& v, const Tensor& q_weight,
                                  const Tensor& k_weight, const Tensor& rope,
                                  int heads, int world, const Tensor& send) const;
  absl::Status Attention(const Tensor& q, const Tensor& k, const Tensor& v,
                         int64_t kv_len, const Tensor& o) const;
  absl::Status GatedResidual(const Tensor& x, const Tensor& y, const Tensor& mod,
                             int gate_index) const;
  absl::Status AddInPlace(const Tensor& x, const Tensor& y) const;
  absl::Status TileAbsDiffSums(const Tensor& cur, const Tensor& prev,
                               int64_t tile, int64_t valid_rows) const;

  // --- Ulysses relayouts ---
  absl::Status PackQkv(const Tensor& q, const Tensor& k, const Tensor& v,
                       int world, const Tensor& send) const;
  absl::Status UnpackQkv(const Tensor& recv, int world, const Tensor& q,
                         const Tensor& k, const Tensor& v) const;
  absl::Status PackOut(const Tensor& o, int world, const Tensor& send) const;
  absl::Status UnpackOut(const Tensor& recv, int world, const Tensor& o) const;

 private:
  absl::Status Error(const char* op, const std::string& message) const;
  absl::Status Of(const Tensor& t, DType dtype, const char* op,
                  const char* what) const;
  absl::Status Act(const Tensor& t, const char* op, const char* what) const;
  absl::Status F32(const Tensor& t, const char* op, const char* what) const;
  absl::Status ShapeError(const char* op, const char* what, const Tensor& t,
                          const std::string& expected) const;
  absl::Status ShapeIs(const Tensor& t, const Shape& shape, const char* op,
                       const char* what) const;
  absl::Status NumelIs(const Tensor& t, int64_t n, const char* op,
                       const char* what) const;
  // Rows [B, k, D] of a modulation table `mod` for activations [B, S, D],
  // and `index` one of its k rows.
  absl::Status ModRows(const Tensor& mod, const Tensor& x, const char* op,
                       const char* index_name, int index) const;
  absl::Status HeadsSplitD(int heads, int64_t d, const char* op) const;
  // The Ulysses layout of sequence-sharded shape [B, S, H, d] is valid for
  // `world` (no tensor views are made: these run on every op call).
  absl::Status Layout(const Shape& seq, int world, const char* op,
                      const char* what) const;
  // `seq` is sequence-sharded [B, S, H, d] and its layout valid for `world`.
  absl::Status SeqSharded(const Tensor& seq, int world, const char* op,
                          const char* what) const;
  // `head` is head-sharded [B, P*S, h, d] with P = world.
  absl::Status HeadSharded(const Tensor& head, int world, const char* op,
                           const char* what) const;

  std::string backend_;
  Device device_;
  DType compute_;
};

}  // namespace dn::worker

#endif  // DN_WORKER_OP_CONTRACT_H_
