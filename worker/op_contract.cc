// OpContract: the Backend ops' argument checks, shared by every backend.
#include "worker/op_contract.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "comm/ulysses.h"

namespace dn::worker {

OpContract::OpContract(std::string backend, Device device, DType compute)
    : backend_(std::move(backend)), device_(device), compute_(compute) {}

absl::Status OpContract::Error(const char* op, const std::string& message) const {
  return absl::InvalidArgumentError(absl::StrCat(backend_, " ", op, ": ", message));
}

absl::Status OpContract::Resident(const Tensor& t, const char* op,
                                  const char* what) const {
  if (!t.defined()) return Error(op, absl::StrCat("tensor '", what, "' is undefined"));
  if (t.device() != device_)
    return Error(op, absl::StrCat("tensor '", what, "' is ", t.DebugString(), ", not in ",
                                  device_ == Device::kCpu ? "host" : "CUDA", " memory"));
  return absl::OkStatus();
}

absl::Status OpContract::Of(const Tensor& t, DType dtype, const char* op,
                            const char* what) const {
  DN_RETURN_IF_ERROR(Resident(t, op, what));
  if (t.dtype() != dtype)
    return Error(op, absl::StrCat("tensor '", what, "' is ", t.DebugString(), ", expected ",
                                  DTypeName(dtype),
                                  dtype == compute_
                                      ? absl::StrCat(" (the ", backend_,
                                                     " backend computes in ",
                                                     DTypeName(compute_), ")")
                                      : ""));
  return absl::OkStatus();
}

absl::Status OpContract::Act(const Tensor& t, const char* op, const char* what) const {
  return Of(t, compute_, op, what);
}

absl::Status OpContract::F32(const Tensor& t, const char* op, const char* what) const {
  return Of(t, DType::kF32, op, what);
}

absl::Status OpContract::ShapeError(const char* op, const char* what, const Tensor& t,
                                    const std::string& expected) const {
  return Error(op, absl::StrCat("tensor '", what, "' has shape ", ShapeString(t.shape()),
                                ", expected ", expected));
}

absl::Status OpContract::ShapeIs(const Tensor& t, const Shape& shape, const char* op,
                                 const char* what) const {
  if (t.shape() != shape) return ShapeError(op, what, t, ShapeString(shape));
  return absl::OkStatus();
}

absl::Status OpContract::NumelIs(const Tensor& t, int64_t n, const char* op,
                                 const char* what) const {
  if (t.numel() != n) return ShapeError(op, what, t, absl::StrCat(n, " elements"));
  return absl::OkStatus();
}

absl::Status OpContract::ModRows(const Tensor& mod, const Tensor& x, const char* op,
                                 const char* index_name, int index) const {
  const int64_t b = x.dim(0), d = x.dim(2);
  if (mod.rank() != 3 || mod.dim(0) != b || mod.dim(2) != d)
    return ShapeError(op, "mod", mod, absl::StrCat("[", b, ", k, ", d, "]"));
  if (index < 0 || index >= mod.dim(1))
    return Error(op, absl::StrCat(index_name, " ", index, " outside the ", mod.dim(1),
                                  " rows of mod"));
  return absl::OkStatus();
}

absl::Status OpContract::HeadsSplitD(int heads, int64_t d, const char* op) const {
  if (heads <= 0 || d % heads != 0 || (d / heads) % 2 != 0)
    return Error(op, absl::StrCat("heads ", heads, " must divide D ", d,
                                  " into even head dims"));
  return absl::OkStatus();
}

namespace {

// The Ulysses layout of a sequence-sharded [B, S, H, d] shape on `world`.
comm::UlyssesLayout LayoutOf(const Shape& seq, int world, DType dtype) {
  comm::UlyssesLayout l;
  l.batch = seq[0];
  l.world = world;
  l.seq_total = seq[1] * world;  // shard() == S
  l.heads = static_cast<int>(seq[2]);
  l.head_dim = static_cast<int>(seq[3]);
  l.elem_size = DTypeSize(dtype);
  return l;
}

}  // namespace

absl::Status OpContract::Layout(const Shape& seq, int world, const char* op,
                                const char* what) const {
  const absl::Status valid = LayoutOf(seq, world, compute_).Validate();
  if (!valid.ok())
    return absl::Status(valid.code(), absl::StrCat(backend_, " ", op, ": tensor '", what,
                                                    "' ", ShapeString(seq), ": ",
                                                    valid.message()));
  return absl::OkStatus();
}

absl::Status OpContract::SeqSharded(const Tensor& seq, int world, const char* op,
                                    const char* what) const {
  if (seq.rank() != 4) return ShapeError(op, what, seq, "[B, S, H, d]");
  return Layout(seq.shape(), world, op, what);
}

absl::Status OpContract::HeadSharded(const Tensor& head, int world, const char* op,
                                     const char* what) const {
  if (head.rank() != 4 || world <= 0 || head.dim(1) % world != 0)
    return ShapeError(op, what, head, absl::StrCat("[B, P*S, h, d] with P = ", world));
  return Layout({head.dim(0), head.dim(1) / world, head.dim(2) * world, head.dim(3)}, world,
                op, what);
}

// --- memory --------------------------------------------------------------------

absl::Status OpContract::Copy(const Tensor& src, const Tensor& dst) const {
  DN_RETURN_IF_ERROR(Resident(src, "Copy", "src"));
  DN_RETURN_IF_ERROR(Resident(dst, "Copy", "dst"));
  return NumelIs(dst, src.numel(), "Copy", "dst");
}

// --- dense ops -----------------------------------------------------------------

absl::Status OpContract::Linear(const Tensor& x, const Tensor& w, const Tensor* bias,
                                const Tensor& y) const {
  constexpr const char* kOp = "Linear";
  DN_RETURN_IF_ERROR(Act(x, kOp, "x"));
  DN_RETURN_IF_ERROR(Act(w, kOp, "w"));
  DN_RETURN_IF_ERROR(Act(y, kOp, "y"));
  if (w.rank() != 2) return ShapeError(kOp, "w", w, "[N, K]");
  const int64_t n = w.dim(0), k = w.dim(1);
  if (x.rank() < 1 || x.shape().back() != k)
    return ShapeError(kOp, "x", x, absl::StrCat("[..., ", k, "]"));
  const int64_t m = k > 0 ? x.numel() / k : 0;
  if (y.rank() < 1 || y.shape().back() != n || y.numel() != m * n)
    return ShapeError(kOp, "y", y, absl::StrCat("[", m, " rows, ", n, "]"));
  if (bias != nullptr) {
    DN_RETURN_IF_ERROR(Act(*bias, kOp, "bias"));
    DN_RETURN_IF_ERROR(NumelIs(*bias, n, kOp, "bias"));
  }
  return absl::OkStatus();
}

absl::Status OpContract::GeluTanh(const Tensor& x, const Tensor& y) const {
  DN_RETURN_IF_ERROR(Act(x, "GeluTanh", "x"));
  DN_RETURN_IF_ERROR(Act(y, "GeluTanh", "y"));
  return NumelIs(y, x.numel(), "GeluTanh", "y");
}

absl::Status OpContract::GeluErf(const Tensor& x, const Tensor& y) const {
  DN_RETURN_IF_ERROR(Act(x, "GeluErf", "x"));
  DN_RETURN_IF_ERROR(Act(y, "GeluErf", "y"));
  return NumelIs(y, x.numel(), "GeluErf", "y");
}

absl::Status OpContract::Silu(const Tensor& x, const Tensor& y) const {
  DN_RETURN_IF_ERROR(Act(x, "Silu", "x"));
  DN_RETURN_IF_ERROR(Act(y, "Silu", "y"));
  return NumelIs(y, x.numel(), "Silu", "y");
}

absl::Status OpContract::AddModulation(const Tensor& table, const Tensor& proj,
                                       const Tensor& out) const {
  constexpr const char* kOp = "AddModulation";
  DN_RETURN_IF_ERROR(F32(table, kOp, "table"));
  DN_RETURN_IF_ERROR(Act(proj, kOp, "proj"));
  DN_RETURN_IF_ERROR(F32(out, kOp, "out"));
  if (out.rank() != 3) return ShapeError(kOp, "out", out, "[B, k, D]");
  const int64_t b = out.dim(0), k = out.dim(1), d = out.dim(2);
  DN_RETURN_IF_ERROR(NumelIs(table, k * d, kOp, "table"));
  const bool broadcast = proj.numel() == b * d && k != 1;
  if (!broadcast && proj.numel() != b * k * d)
    return ShapeError(kOp, "proj", proj,
                      absl::StrCat("[", b, ", ", k * d, "] or [", b, ", ", d, "]"));
  return absl::OkStatus();
}

absl::Status OpContract::LayerNormModulate(const Tensor& x, const Tensor& mod,
                                           int shift_index, int scale_index,
                                           const Tensor& y) const {
  constexpr const char* kOp = "LayerNormModulate";
  DN_RETURN_IF_ERROR(Act(x, kOp, "x"));
  DN_RETURN_IF_ERROR(F32(mod, kOp, "mod"));
  DN_RETURN_IF_ERROR(Act(y, kOp, "y"));
  if (x.rank() != 3) return ShapeError(kOp, "x", x, "[B, S, D]");
  DN_RETURN_IF_ERROR(ShapeIs(y, x.shape(), kOp, "y"));
  DN_RETURN_IF_ERROR(ModRows(mod, x, kOp, "shift_index", shift_index));
  return ModRows(mod, x, kOp, "scale_index", scale_index);
}

absl::Status OpContract::LayerNormAffine(const Tensor& x, const Tensor& weight,
                                         const Tensor& bias, const Tensor& y) const {
  constexpr const char* kOp = "LayerNormAffine";
  DN_RETURN_IF_ERROR(Act(x, kOp, "x"));
  DN_RETURN_IF_ERROR(F32(weight, kOp, "weight"));
  DN_RETURN_IF_ERROR(F32(bias, kOp, "bias"));
  DN_RETURN_IF_ERROR(Act(y, kOp, "y"));
  if (x.rank() < 1) return ShapeError(kOp, "x", x, "[M, D]");
  const int64_t d = x.shape().back();
  DN_RETURN_IF_ERROR(NumelIs(weight, d, kOp, "weight"));
  DN_RETURN_IF_ERROR(NumelIs(bias, d, kOp, "bias"));
  return NumelIs(y, x.numel(), kOp, "y");
}

absl::Status OpContract::RmsNorm(const Tensor& x, const Tensor& weight,
                                 const Tensor& y) const {
  constexpr const char* kOp = "RmsNorm";
  DN_RETURN_IF_ERROR(Act(x, kOp, "x"));
  DN_RETURN_IF_ERROR(F32(weight, kOp, "weight"));
  DN_RETURN_IF_ERROR(Act(y, kOp, "y"));
  if (x.rank() < 1) return ShapeError(kOp, "x", x, "[M, D]");
  DN_RETURN_IF_ERROR(NumelIs(weight, x.shape().back(), kOp, "weight"));
  return NumelIs(y, x.numel(), kOp, "y");
}

absl::Status OpContract::RmsNormRope(const Tensor& x, const Tensor& weight,
                                     const Tensor& rope, int heads,
                                     const Tensor& y) const {
  constexpr const char* kOp = "RmsNormRope";
  DN_RETURN_IF_ERROR(Act(x, kOp, "x"));
  DN_RETURN_IF_ERROR(F32(weight, kOp, "weight"));
  DN_RETURN_IF_ERROR(F32(rope, kOp, "rope"));
  DN_RETURN_IF_ERROR(Act(y, kOp, "y"));
  if (x.rank() != 3) return ShapeError(kOp, "x", x, "[B, S, D]");
  DN_RETURN_IF_ERROR(ShapeIs(y, x.shape(), kOp, "y"));
  const int64_t s = x.dim(1), d = x.dim(2);
  DN_RETURN_IF_ERROR(HeadsSplitD(heads, d, kOp));
  DN_RETURN_IF_ERROR(NumelIs(weight, d, kOp, "weight"));
  return ShapeIs(rope, {s, d / heads / 2, 2}, kOp, "rope");
}

absl::Status OpContract::RmsNormRopePackQkv(const Tensor& q, const Tensor& k,
                                            const Tensor& v, const Tensor& q_weight,
                                            const Tensor& k_weight, const Tensor& rope,
                                            int heads, int world,
                                            const Tensor& send) const {
  constexpr const char* kOp = "RmsNormRopePackQkv";
  DN_RETURN_IF_ERROR(Act(q, kOp, "q"));
  DN_RETURN_IF_ERROR(Act(k, kOp, "k"));
  DN_RETURN_IF_ERROR(Act(v, kOp, "v"));
  DN_RETURN_IF_ERROR(F32(q_weight, kOp, "q_weight"));
  DN_RETURN_IF_ERROR(F32(k_weight, kOp, "k_weight"));
  DN_RETURN_IF_ERROR(F32(rope, kOp, "rope"));
  DN_RETURN_IF_ERROR(Act(send, kOp, "send"));
  if (q.rank() != 3) return ShapeError(kOp, "q", q, "[B, S, D]");
  DN_RETURN_IF_ERROR(ShapeIs(k, q.shape(), kOp, "k"));
  DN_RETURN_IF_ERROR(ShapeIs(v, q.shape(), kOp, "v"));
  const int64_t b = q.dim(0), s = q.dim(1), d = q.dim(2);
  DN_RETURN_IF_ERROR(HeadsSplitD(heads, d, kOp));
  DN_RETURN_IF_ERROR(Layout({b, s, heads, d / heads}, world, kOp, "q"));
  DN_RETURN_IF_ERROR(NumelIs(q_weight, d, kOp, "q_weight"));
  DN_RETURN_IF_ERROR(NumelIs(k_weight, d, kOp, "k_weight"));
  DN_RETURN_IF_ERROR(ShapeIs(rope, {s, d / heads / 2, 2}, kOp, "rope"));
  return NumelIs(send, 3 * q.numel(), kOp, "send");
}

absl::Status OpContract::Attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                   int64_t kv_len, const Tensor& o) const {
  constexpr const char* kOp = "Attention";
  DN_RETURN_IF_ERROR(Act(q, kOp, "q"));
  DN_RETURN_IF_ERROR(Act(k, kOp, "k"));
  DN_RETURN_IF_ERROR(Act(v, kOp, "v"));
  DN_RETURN_IF_ERROR(Act(o, kOp, "o"));
  if (q.rank() != 4) return ShapeError(kOp, "q", q, "[B, Sq, H, d]");
  const int64_t b = q.dim(0), h = q.dim(2), d = q.dim(3);
  if (k.rank() != 4 || k.dim(0) != b || k.dim(2) != h || k.dim(3) != d)
    return ShapeError(kOp, "k", k, absl::StrCat("[", b, ", Skv, ", h, ", ", d, "]"));
  DN_RETURN_IF_ERROR(ShapeIs(v, k.shape(), kOp, "v"));
  DN_RETURN_IF_ERROR(ShapeIs(o, q.shape(), kOp, "o"));
  if (kv_len < 1 || kv_len > k.dim(1))
    return Error(kOp, absl::StrCat("kv_len ", kv_len, " outside [1, ", k.dim(1), "]"));
  return absl::OkStatus();
}

absl::Status OpContract::GatedResidual(const Tensor& x, const Tensor& y,
                                       const Tensor& mod, int gate_index) const {
  constexpr const char* kOp = "GatedResidual";
  DN_RETURN_IF_ERROR(Act(x, kOp, "x"));
  DN_RETURN_IF_ERROR(Act(y, kOp, "y"));
  DN_RETURN_IF_ERROR(F32(mod, kOp, "mod"));
  if (x.rank() != 3) return ShapeError(kOp, "x", x, "[B, S, D]");
  DN_RETURN_IF_ERROR(NumelIs(y, x.numel(), kOp, "y"));
  return ModRows(mod, x, kOp, "gate_index", gate_index);
}

absl::Status OpContract::AddInPlace(const Tensor& x, const Tensor& y) const {
  DN_RETURN_IF_ERROR(Act(x, "AddInPlace", "x"));
  DN_RETURN_IF_ERROR(Act(y, "AddInPlace", "y"));
  return NumelIs(y, x.numel(), "AddInPlace", "y");
}

absl::Status OpContract::TileAbsDiffSums(const Tensor& cur, const Tensor& prev,
                                         int64_t tile, int64_t valid_rows) const {
  constexpr const char* kOp = "TileAbsDiffSums";
  DN_RETURN_IF_ERROR(Act(cur, kOp, "cur"));
  DN_RETURN_IF_ERROR(Act(prev, kOp, "prev"));
  if (cur.rank() != 3) return ShapeError(kOp, "cur", cur, "[B, S, D]");
  DN_RETURN_IF_ERROR(ShapeIs(prev, cur.shape(), kOp, "prev"));
  const int64_t s = cur.dim(1);
  if (tile < 1 || s % tile != 0)
    return Error(kOp, absl::StrCat("tile ", tile, " does not divide S = ", s));
  if (valid_rows < 0 || valid_rows > s)
    return Error(kOp, absl::StrCat("valid_rows ", valid_rows, " outside [0, ", s, "]"));
  return absl::OkStatus();
}

// --- Ulysses relayouts ---------------------------------------------------------

absl::Status OpContract::PackQkv(const Tensor& q, const Tensor& k, const Tensor& v,
                                 int world, const Tensor& send) const {
  constexpr const char* kOp = "PackQkv";
  DN_RETURN_IF_ERROR(Act(q, kOp, "q"));
  DN_RETURN_IF_ERROR(Act(k, kOp, "k"));
  DN_RETURN_IF_ERROR(Act(v, kOp, "v"));
  DN_RETURN_IF_ERROR(Act(send, kOp, "send"));
  DN_RETURN_IF_ERROR(SeqSharded(q, world, kOp, "q"));
  DN_RETURN_IF_ERROR(ShapeIs(k, q.shape(), kOp, "k"));
  DN_RETURN_IF_ERROR(ShapeIs(v, q.shape(), kOp, "v"));
  return NumelIs(send, 3 * q.numel(), kOp, "send");
}

absl::Status OpContract::UnpackQkv(const Tensor& recv, int world, const Tensor& q,
                                   const Tensor& k, const Tensor& v) const {
  constexpr const char* kOp = "UnpackQkv";
  DN_RETURN_IF_ERROR(Act(recv, kOp, "recv"));
  DN_RETURN_IF_ERROR(Act(q, kOp, "q"));
  DN_RETURN_IF_ERROR(Act(k, kOp, "k"));
  DN_RETURN_IF_ERROR(Act(v, kOp, "v"));
  DN_RETURN_IF_ERROR(HeadSharded(q, world, kOp, "q"));
  DN_RETURN_IF_ERROR(ShapeIs(k, q.shape(), kOp, "k"));
  DN_RETURN_IF_ERROR(ShapeIs(v, q.shape(), kOp, "v"));
  return NumelIs(recv, 3 * q.numel(), kOp, "recv");
}

absl::Status OpContract::PackOut(const Tensor& o, int world, const Tensor& send) const {
  DN_RETURN_IF_ERROR(Act(o, "PackOut", "o"));
  DN_RETURN_IF_ERROR(Act(send, "PackOut", "send"));
  DN_RETURN_IF_ERROR(HeadSharded(o, world, "PackOut", "o"));
  return NumelIs(send, o.numel(), "PackOut", "send");
}

absl::Status OpContract::UnpackOut(const Tensor& recv, int world, const Tensor& o) const {
  DN_RETURN_IF_ERROR(Act(recv, "UnpackOut", "recv"));
  DN_RETURN_IF_ERROR(Act(o, "UnpackOut", "o"));
  DN_RETURN_IF_ERROR(SeqSharded(o, world, "UnpackOut", "o"));
  return NumelIs(recv, o.numel(), "UnpackOut", "recv");
}

}  // namespace dn::worker
