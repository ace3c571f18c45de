// backend_ops_test: the CUDA backend against the CPU reference, op by op, in
// the style of ggml's test-backend-ops. Needs a GPU; not registered with
// ctest (CI has none). Run it on the GPU machine:
//
//   backend_ops_test                  # every case; exit 1 if any fails
//   backend_ops_test --op=Attention   # only ops whose name contains this
//   backend_ops_test --list           # print the cases, run nothing
//   backend_ops_test --perf           # timings (attention bf16 and fp8, GEMMs, kernels)
//   backend_ops_test --cpu_only       # CPU on both sides: checks the harness
//                                     # and the cases without a GPU
//
// Correctness mode, for every case:
// - fresh random inputs (seeded per case, never zero); values of
//   compute-dtype tensors are rounded to bf16 first, so both backends see
//   exactly the same numbers and only the CUDA maths is under test;
// - every tensor sits inside a buffer with NaN guard zones on both sides,
//   outputs are poisoned with NaN: an unwritten output element, an
//   out-of-bounds write (a guard no longer NaN) or an out-of-bounds read
//   (NaN leaking into the result) all fail the case; inputs must come back
//   unchanged;
// - the op runs on the CPU backend (fp32) and on the CUDA backend (bf16);
//   each output is compared by relative L2 error ||cuda - cpu|| / ||cpu||
//   against the case's bound (1e-2 for bf16 maths, ~0 for exact copies);
//   NaN or Inf fails.
// Attention cases also run on a second CUDA backend that uses cuDNN's
// composite SDPA graph (the fallback for cuDNN < 9.13.1).
// AttentionFp8 cases (the fast tier, docs/CUDA.md "fp8 attention") compare
// the CUDA fp8 path with the CPU backend's fp8 emulation (AttentionFp8,
// bound 5e-2) and with the CPU's exact Attention ("AttentionFp8~exact",
// bound 1e-1); "[fp8 O]" cases run on a third CUDA backend forced to the
// e4m3-output graph (DN_CUDNN_SDPA_FP8_O=fp8) to cover the dequantization.
// Output: one table row per case (op, rel L2, bound, PASS/FAIL, shapes; the
// reason of a failure on the next line) and a final "N passed, M failed".
//
// Perf mode times with CUDA events (median of --iters runs after 3 warm-up
// runs): attention TFLOP/s (4*B*H*Sq*Skv*d FLOPs), GEMM TFLOP/s (2*M*N*K)
// and the bandwidth of the memory-bound kernels (bytes read + written).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "base/flags.h"
#include "base/status_macros.h"
#include "worker/backend.h"
#include "worker/cpu/e4m3.h"
#include "worker/cuda/cuda_backend.h"
#include "worker/cuda/fp8_kernels.h"
#include "worker/noise.h"
#include "worker/tensor.h"

namespace dn::worker {
namespace {

// --- case description ---------------------------------------------------------

// Kind: kAct tensors take each backend's compute dtype (CPU f32, CUDA bf16);
// the others have a fixed dtype on both backends.
enum class Kind { kAct, kF32, kBF16, kF16 };
enum class Role { kIn, kOut, kInOut };

using Host = std::vector<float>;
using Rng = std::mt19937_64;
using Fill = std::function<void(Host&, Rng&)>;

struct Arg {
  std::string name;
  Shape shape;
  Kind kind = Kind::kAct;
  Role role = Role::kIn;
  Fill fill;          // inputs; default: N(0,1) with no values near zero
  int misalign = 0;   // extra element offset (defeats 16-byte alignment)
};

struct Case {
  std::string op;
  std::string extra;  // parameters beyond the shapes, e.g. "gelu"
  std::vector<Arg> args;
  std::function<absl::Status(Backend&, std::vector<Tensor>&)> run;
  double bound = 1e-2;
  bool composite = false;  // run on the composite-SDPA CUDA backend
  bool fp8_o = false;      // run on the e4m3-output fp8-attention CUDA backend
};

Arg In(std::string name, Shape shape, Kind kind = Kind::kAct, Fill fill = {}) {
  return Arg{std::move(name), std::move(shape), kind, Role::kIn, std::move(fill), 0};
}
Arg Out(std::string name, Shape shape, Kind kind = Kind::kAct) {
  return Arg{std::move(name), std::move(shape), kind, Role::kOut, {}, 0};
}
Arg InOut(std::string name, Shape shape, Kind kind = Kind::kAct) {
  return Arg{std::move(name), std::move(shape), kind, Role::kInOut, {}, 0};
}
// Offsets the tensor by one element when `on` (defeats 16-byte alignment).
Arg Misaligned(Arg a, bool on = true) {
  if (on) a.misalign = 1;
  return a;
}

// --- random data ------------------------------------------------------------------

float NonZeroNormal(Rng& rng, float stddev) {
  std::normal_distribution<float> dist(0.0f, stddev);
  for (;;) {
    const float v = dist(rng);
    if (std::fabs(v) >= 1e-3f * stddev) return v;
  }
}

Fill Normal(float stddev) {
  return [stddev](Host& h, Rng& rng) {
    for (float& v : h) v = NonZeroNormal(rng, stddev);
  };
}

// Norm weights around 1.
Fill NearOne(float spread) {
  return [spread](Host& h, Rng& rng) {
    for (float& v : h) v = 1.0f + NonZeroNormal(rng, spread);
  };
}

// RoPE table [S, d/2, 2]: (cos, sin) of random angles.
Fill RopeTable() {
  return [](Host& h, Rng& rng) {
    std::uniform_real_distribution<float> angle(0.0f, 6.2831853f);
    for (size_t i = 0; i + 1 < h.size(); i += 2) {
      const float a = angle(rng);
      h[i] = std::cos(a);
      h[i + 1] = std::sin(a);
    }
  };
}

float RoundTo(Kind kind, float v) {
  switch (kind) {
    case Kind::kAct:   // the CUDA compute dtype
    case Kind::kBF16: return BF16ToF32(F32ToBF16(v));
    case Kind::kF16: return F16ToF32(F32ToF16(v));
    case Kind::kF32: return v;
  }
  return v;
}

DType DTypeOn(const Backend& backend, Kind kind) {
  switch (kind) {
    case Kind::kAct: return backend.compute_dtype();
    case Kind::kF32: return DType::kF32;
    case Kind::kBF16: return DType::kBF16;
    case Kind::kF16: return DType::kF16;
  }
  return DType::kF32;
}

// --- running one case on one backend ---------------------------------------------

constexpr int64_t kGuard = 64;  // elements of NaN on each side of every tensor

struct RunResult {
  absl::Status status;
  std::vector<Host> outputs;  // per arg (empty for inputs)
  std::string damage;         // guard/input violations, empty if none
};

RunResult RunOn(Backend& backend, const Case& c, const std::vector<Host>& inputs) {
  RunResult result;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<Tensor> full(c.args.size()), views(c.args.size());
  auto fail = [&](absl::Status s) {
    result.status = std::move(s);
    return result;
  };
  for (size_t i = 0; i < c.args.size(); ++i) {
    const Arg& a = c.args[i];
    const int64_t n = NumElements(a.shape);
    const int64_t lead = kGuard + a.misalign;
    auto t = backend.Empty({lead + n + kGuard}, DTypeOn(backend, a.kind));
    if (!t.ok()) return fail(t.status());
    full[i] = *t;
    const Host poison(static_cast<size_t>(lead + n + kGuard), nan);
    if (auto s = backend.CopyFromHost(poison.data(), &full[i]); !s.ok()) return fail(s);
    views[i] = full[i].Rows(lead, lead + n).View(a.shape);
    if (a.role != Role::kOut) {
      if (auto s = backend.CopyFromHost(inputs[i].data(), &views[i]); !s.ok())
        return fail(s);
    }
  }
  if (auto s = c.run(backend, views); !s.ok()) return fail(s);
  if (auto s = backend.Synchronize(); !s.ok()) return fail(s);
  result.outputs.resize(c.args.size());
  for (size_t i = 0; i < c.args.size(); ++i) {
    const Arg& a = c.args[i];
    const int64_t n = NumElements(a.shape);
    const int64_t lead = kGuard + a.misalign;
    Host all(static_cast<size_t>(full[i].numel()));
    if (auto s = backend.CopyToHost(full[i], all.data()); !s.ok()) return fail(s);
    int64_t bad_guard = 0;
    for (int64_t j = 0; j < static_cast<int64_t>(all.size()); ++j)
      if ((j < lead || j >= lead + n) && !std::isnan(all[static_cast<size_t>(j)]))
        ++bad_guard;
    if (bad_guard > 0)
      absl::StrAppend(&result.damage, result.damage.empty() ? "" : "; ",
                      bad_guard, " guard elements of '", a.name,
                      "' overwritten");
    Host body(all.begin() + lead, all.begin() + lead + n);
    if (a.role == Role::kIn) {
      int64_t changed = 0;
      for (size_t j = 0; j < body.size(); ++j)
        if (!(body[j] == inputs[i][j])) ++changed;  // NaN counts as changed
      if (changed > 0)
        absl::StrAppend(&result.damage, result.damage.empty() ? "" : "; ",
                        "input '", a.name, "' changed in ", changed, " elements");
    } else {
      result.outputs[i] = std::move(body);
    }
  }
  return result;
}

// ||a - b|| / ||b||; NaN when either holds a NaN or Inf.
double RelL2(const Host& a, const Host& b) {
  double diff = 0.0, ref = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i]))
      return std::numeric_limits<double>::quiet_NaN();
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    diff += d * d;
    ref += static_cast<double>(b[i]) * static_cast<double>(b[i]);
  }
  if (ref == 0.0) return std::sqrt(diff);
  return std::sqrt(diff / ref);
}

std::string Describe(const Case& c) {
  // Fixed dtypes are spelled out where they are the point of the case.
  const bool dtype_case = c.op == "Copy" || c.op == "FillNormal";
  auto arg = [dtype_case](const Arg& a) {
    std::string s = absl::StrCat(a.name, ShapeString(a.shape));
    if (a.kind == Kind::kF16) absl::StrAppend(&s, ":f16");
    if (a.kind == Kind::kBF16) absl::StrAppend(&s, ":bf16");
    if (a.kind == Kind::kF32 && dtype_case) absl::StrAppend(&s, ":f32");
    if (a.misalign) absl::StrAppend(&s, "+1");
    return s;
  };
  std::string in, out;
  for (const Arg& a : c.args) {
    std::string& side = a.role == Role::kOut ? out : in;
    absl::StrAppend(&side, side.empty() ? "" : " ", arg(a));
  }
  std::string s = in;
  if (!out.empty()) absl::StrAppend(&s, s.empty() ? "-> " : " -> ", out);
  if (!c.extra.empty()) absl::StrAppend(&s, " ", c.extra);
  return s;
}

// --- the cases ------------------------------------------------------------------------

std::vector<Case> MakeCases() {
  std::vector<Case> cases;
  const Kind kF32 = Kind::kF32;

  // Linear: y = act(x w^T + b). Wan2.1-1.3B shapes (D=1536, FFN 8960, text
  // 4096 -> D, time 256 -> D -> 6D, head D -> 64) on a 4096-token shard, and
  // odd sizes.
  auto linear = [&](Shape x, int64_t n, bool bias, bool gelu, bool misalign = false) {
    const int64_t k = x.back();
    Shape y = x;
    y.back() = n;
    Case c;
    c.op = "Linear";
    c.args = {Misaligned(In("x", x), misalign),
              In("w", {n, k}, Kind::kAct, Normal(1.0f / std::sqrt(float(k))))};
    if (bias) c.args.push_back(In("b", {n}, Kind::kAct, Normal(0.5f)));
    c.args.push_back(Out("y", y));
    c.extra = gelu ? "gelu_tanh" : "";
    c.run = [bias, gelu](Backend& be, std::vector<Tensor>& t) {
      return be.Linear(t[0], t[1], bias ? &t[2] : nullptr,
                       gelu ? Activation::kGeluTanh : Activation::kNone,
                       &t[bias ? 3 : 2]);
    };
    cases.push_back(std::move(c));
  };
  linear({512, 4096}, 1536, true, false);        // text_embedder.linear_1
  linear({1, 512, 1536}, 1536, true, true);      // text linear_2 shape, GELU
  linear({1, 4096, 1536}, 1536, true, false);    // q/k/v/o projections
  linear({1, 4096, 1536}, 8960, true, true);     // FFN up + GELU
  linear({1, 4096, 8960}, 1536, true, false);    // FFN down
  linear({1, 1536}, 9216, true, false);          // time_proj (6D)
  linear({2, 256}, 1536, true, false);           // time_embedder.linear_1
  linear({1, 4096, 1536}, 64, true, false);      // proj_out
  linear({7, 17}, 13, true, true);               // odd sizes
  linear({33, 40}, 65, false, false);
  linear({5, 24}, 3, false, true);
  linear({31, 64}, 48, true, false, true);       // x only 2-byte aligned

  // Silu.
  auto silu = [&](Shape s, bool misalign = false) {
    Case c;
    c.op = "Silu";
    c.args = {Misaligned(In("x", s, Kind::kAct, Normal(3.0f)), misalign),
              Out("y", s)};
    c.run = [](Backend& be, std::vector<Tensor>& t) { return be.Silu(t[0], &t[1]); };
    cases.push_back(std::move(c));
  };
  silu({1, 1536});
  silu({4096, 1536});
  silu({3, 1001});
  silu({1000}, true);

  // AddModulation: out[B,k,D] = table[k,D] + proj.
  auto add_mod = [&](Shape table, Shape proj, Shape out) {
    Case c;
    c.op = "AddModulation";
    c.args = {In("table", table, kF32, Normal(0.5f)), In("proj", proj),
              Out("out", out, kF32)};
    c.bound = 1e-6;  // fp32 add of identical inputs
    c.run = [](Backend& be, std::vector<Tensor>& t) {
      return be.AddModulation(t[0], t[1], &t[2]);
    };
    cases.push_back(std::move(c));
  };
  add_mod({1, 6, 1536}, {1, 9216}, {1, 6, 1536});   // block modulation
  add_mod({6, 1536}, {2, 9216}, {2, 6, 1536});      // batch 2
  add_mod({1, 2, 1536}, {1, 1536}, {1, 2, 1536});   // head: broadcast temb
  add_mod({3, 37}, {2, 111}, {2, 3, 37});           // odd

  // LayerNormModulate.
  auto ln_mod = [&](Shape x, int64_t k, int shift, int scale, bool misalign = false) {
    Case c;
    c.op = "LayerNormModulate";
    c.args = {Misaligned(In("x", x, Kind::kAct, Normal(2.0f)), misalign),
              In("mod", {x[0], k, x[2]}, kF32, Normal(0.5f)),
              Misaligned(Out("y", x), misalign)};
    c.extra = absl::StrCat("shift=", shift, " scale=", scale);
    c.run = [shift, scale](Backend& be, std::vector<Tensor>& t) {
      return be.LayerNormModulate(t[0], t[1], shift, scale, 1e-6f, &t[2]);
    };
    cases.push_back(std::move(c));
  };
  ln_mod({1, 4096, 1536}, 6, 0, 1);   // norm1
  ln_mod({2, 300, 1536}, 6, 3, 4);    // norm3, batch 2
  ln_mod({1, 512, 1536}, 2, 0, 1);    // head norm_out
  ln_mod({1, 256, 5120}, 6, 0, 1);    // 14B width
  ln_mod({2, 7, 100}, 6, 3, 4);       // D not a multiple of 8
  ln_mod({1, 64, 1536}, 6, 0, 1, true);

  // LayerNormAffine (norm2 before cross-attention).
  auto ln_aff = [&](Shape x, bool misalign = false) {
    const int64_t d = x.back();
    Case c;
    c.op = "LayerNormAffine";
    const Arg xa = Misaligned(In("x", x, Kind::kAct, Normal(2.0f)), misalign);
    const Arg ya = Misaligned(Out("y", x), misalign);
    c.args = {xa, In("weight", {d}, kF32, NearOne(0.2f)),
              In("bias", {d}, kF32, Normal(0.2f)), ya};
    c.run = [](Backend& be, std::vector<Tensor>& t) {
      return be.LayerNormAffine(t[0], t[1], t[2], 1e-6f, &t[3]);
    };
    cases.push_back(std::move(c));
  };
  ln_aff({1, 4096, 1536});
  ln_aff({3, 5120});
  ln_aff({5, 77});
  ln_aff({2, 100, 1536}, true);

  // RmsNorm (cross-attention q/k norms, text K over 512 tokens).
  auto rms = [&](Shape x, bool misalign = false) {
    const int64_t d = x.back();
    Case c;
    c.op = "RmsNorm";
    const Arg xa = Misaligned(In("x", x, Kind::kAct, Normal(2.0f)), misalign);
    const Arg ya = Misaligned(Out("y", x), misalign);
    c.args = {xa, In("weight", {d}, kF32, NearOne(0.2f)), ya};
    c.run = [](Backend& be, std::vector<Tensor>& t) {
      return be.RmsNorm(t[0], t[1], 1e-6f, &t[2]);
    };
    cases.push_back(std::move(c));
  };
  rms({1, 512, 1536});
  rms({1, 4096, 1536});
  rms({9, 100});
  rms({3, 1536}, true);

  // RmsNormRope (self-attention q/k: norm over all D, RoPE per head).
  auto rms_rope = [&](Shape x, int heads, bool misalign = false) {
    const int64_t d = x[2], hd = d / heads;
    Case c;
    c.op = "RmsNormRope";
    const Arg xa = Misaligned(In("x", x, Kind::kAct, Normal(2.0f)), misalign);
    const Arg ya = Misaligned(Out("y", x), misalign);
    c.args = {xa, In("weight", {d}, kF32, NearOne(0.2f)),
              In("rope", {x[1], hd / 2, 2}, kF32, RopeTable()), ya};
    c.extra = absl::StrCat("heads=", heads);
    c.run = [heads](Backend& be, std::vector<Tensor>& t) {
      return be.RmsNormRope(t[0], t[1], t[2], heads, 1e-6f, &t[3]);
    };
    cases.push_back(std::move(c));
  };
  rms_rope({1, 4096, 1536}, 12);
  rms_rope({2, 100, 1536}, 12);
  rms_rope({1, 128, 5120}, 40);   // 14B
  rms_rope({1, 7, 30}, 3);        // head dim 10
  rms_rope({1, 33, 1536}, 12, true);

  // RmsNormRopePackQkv: q/k norm + RoPE + PackQkv fused (world 1 = stacked).
  auto rms_rope_pack = [&](int64_t b, int64_t s, int64_t d, int heads, int world,
                           bool misalign = false) {
    const int64_t hd = d / heads;
    Case c;
    c.op = "RmsNormRopePackQkv";
    auto mis = [misalign](Arg a) { return Misaligned(std::move(a), misalign); };
    c.args = {mis(In("q", {b, s, d}, Kind::kAct, Normal(2.0f))),
              mis(In("k", {b, s, d}, Kind::kAct, Normal(2.0f))),
              mis(In("v", {b, s, d})),
              In("q_weight", {d}, kF32, NearOne(0.2f)),
              In("k_weight", {d}, kF32, NearOne(0.2f)),
              In("rope", {s, hd / 2, 2}, kF32, RopeTable()),
              mis(Out("send", {world, 3, b, s, heads / world, hd}))};
    c.extra = absl::StrCat("heads=", heads, " world=", world);
    c.run = [heads, world](Backend& be, std::vector<Tensor>& t) {
      return be.RmsNormRopePackQkv(t[0], t[1], t[2], t[3], t[4], t[5], heads,
                                   1e-6f, world, &t[6]);
    };
    cases.push_back(std::move(c));
  };
  rms_rope_pack(1, 4096, 1536, 12, 4);   // 1.3B, P=4
  rms_rope_pack(2, 100, 1536, 12, 2);    // CFG batch, P=2
  rms_rope_pack(1, 128, 5120, 40, 4);    // 14B
  rms_rope_pack(1, 64, 1536, 12, 1);     // world 1: stacked q', k', v
  rms_rope_pack(1, 7, 30, 3, 3);         // head dim 10: chunk of 10, pair path
  rms_rope_pack(1, 33, 1536, 12, 2, true);

  // Attention: o = softmax(q k^T / sqrt(d)) v over the first kv_len rows.
  auto attention = [&](int64_t b, int64_t sq, int64_t skv, int64_t kv_len,
                       int64_t h, int64_t d) {
    for (bool composite : {false, true}) {
      Case c;
      c.op = composite ? "Attention[composite]" : "Attention";
      c.composite = composite;
      c.args = {In("q", {b, sq, h, d}, Kind::kAct, Normal(1.5f)),
                In("k", {b, skv, h, d}, Kind::kAct, Normal(1.5f)),
                In("v", {b, skv, h, d}), Out("o", {b, sq, h, d})};
      c.extra = absl::StrCat("kv_len=", kv_len);
      const float scale = 1.0f / std::sqrt(static_cast<float>(d));
      c.run = [kv_len, scale](Backend& be, std::vector<Tensor>& t) {
        return be.Attention(t[0], t[1], t[2], kv_len, scale, &t[3]);
      };
      cases.push_back(std::move(c));
    }
  };
  attention(1, 4096, 4096, 4096, 12, 128);  // self-attention, all 12 heads
  attention(1, 4096, 4096, 4000, 3, 128);   // head-sharded (P=4), padded keys
  attention(1, 4096, 512, 512, 12, 128);    // cross-attention on 512 text tokens
  attention(2, 1000, 512, 500, 4, 128);     // batch 2, kv_len < Skv
  attention(1, 333, 197, 197, 2, 64);       // odd lengths, d=64
  attention(1, 700, 700, 650, 5, 64);
  attention(1, 1, 77, 77, 12, 128);         // one query

  // AttentionFp8 (fast tier). Against the CPU emulation (same e4m3 roundings
  // of q, k, v: bitwise the same quantized inputs; the differences are
  // accumulation order, the GPU's exp, the flash kernel quantizing P against
  // the running row max instead of the final one (an independent ~2.4% RMS
  // rounding of some P elements, averaged over the row), bf16 O, and for
  // [fp8 O] one more e4m3 rounding of O): bound 5e-2 (6e-2 with fp8 O).
  // Against exact attention: the CPU measured 0.05 at these magnitudes
  // (tests/worker/attention_fp8_test.cc); bound 1e-1.
  auto attention_fp8 = [&](int64_t b, int64_t sq, int64_t skv, int64_t kv_len,
                           int64_t h, int64_t d, bool vs_exact, bool fp8_o) {
    Case c;
    c.op = vs_exact ? "AttentionFp8~exact" : fp8_o ? "AttentionFp8[fp8 O]" : "AttentionFp8";
    c.fp8_o = fp8_o;
    c.bound = vs_exact ? 1e-1 : fp8_o ? 6e-2 : 5e-2;
    c.args = {In("q", {b, sq, h, d}, Kind::kAct, Normal(1.0f)),
              In("k", {b, skv, h, d}, Kind::kAct, Normal(1.0f)),
              In("v", {b, skv, h, d}), Out("o", {b, sq, h, d})};
    c.extra = absl::StrCat("kv_len=", kv_len);
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    c.run = [kv_len, scale, vs_exact](Backend& be, std::vector<Tensor>& t) {
      if (vs_exact && be.name() == "cpu")
        return be.Attention(t[0], t[1], t[2], kv_len, scale, &t[3]);
      return be.AttentionFp8(t[0], t[1], t[2], kv_len, scale, &t[3]);
    };
    cases.push_back(std::move(c));
  };
  for (bool vs_exact : {false, true}) {
    attention_fp8(1, 4096, 4096, 4096, 12, 128, vs_exact, false);  // 1.3B, P=1
    attention_fp8(1, 4096, 4096, 4000, 3, 128, vs_exact, false);   // P=4, padded keys
    attention_fp8(2, 1000, 512, 500, 4, 128, vs_exact, false);     // batch 2, kv_len < Skv
    attention_fp8(1, 333, 197, 197, 2, 64, vs_exact, false);       // odd lengths, d=64
  }
  attention_fp8(1, 4096, 4096, 4000, 3, 128, false, true);
  attention_fp8(2, 1000, 512, 500, 4, 128, false, true);

  // GatedResidual: x += y * gate.
  auto gated = [&](Shape x, int64_t k, int gate, bool misalign = false) {
    Case c;
    c.op = "GatedResidual";
    const Arg xa = Misaligned(InOut("x", x), misalign);
    const Arg ya = Misaligned(In("y", x), misalign);
    c.args = {xa, ya, In("mod", {x[0], k, x[2]}, kF32, Normal(0.5f))};
    c.extra = absl::StrCat("gate=", gate);
    c.run = [gate](Backend& be, std::vector<Tensor>& t) {
      return be.GatedResidual(&t[0], t[1], t[2], gate);
    };
    cases.push_back(std::move(c));
  };
  gated({1, 4096, 1536}, 6, 2);
  gated({2, 100, 1536}, 6, 5);
  gated({2, 7, 100}, 6, 2);
  gated({1, 50, 1536}, 6, 5, true);

  // AddInPlace.
  auto add = [&](Shape x, bool misalign = false) {
    Case c;
    c.op = "AddInPlace";
    const Arg xa = Misaligned(InOut("x", x), misalign);
    const Arg ya = Misaligned(In("y", x), misalign);
    c.args = {xa, ya};
    c.run = [](Backend& be, std::vector<Tensor>& t) { return be.AddInPlace(&t[0], t[1]); };
    cases.push_back(std::move(c));
  };
  add({4096, 1536});
  add({7, 13});
  add({1001}, true);

  // TileAbsDiffSums (step caching's signal): the host sums, written into an
  // f32 output so the harness compares them. Both sides read the same bf16
  // values and add in double, so only the order differs.
  auto tile_sums = [&](Shape x, int64_t tile, int64_t valid, bool misalign = false) {
    Case c;
    c.op = "TileAbsDiffSums";
    const int64_t n = 2 * x[0] * (x[1] / tile);
    c.args = {Misaligned(In("cur", x), misalign), Misaligned(In("prev", x), misalign),
              Out("sums", {n}, kF32)};
    c.extra = absl::StrCat("tile=", tile, " valid_rows=", valid);
    c.bound = 1e-6;
    c.run = [tile, valid, n](Backend& be, std::vector<Tensor>& t) -> absl::Status {
      std::vector<double> sums(static_cast<size_t>(n));
      DN_RETURN_IF_ERROR(be.TileAbsDiffSums(t[0], t[1], tile, valid, sums.data()));
      std::vector<float> f(sums.begin(), sums.end());
      return be.CopyFromHost(f.data(), &t[2]);
    };
    cases.push_back(std::move(c));
  };
  tile_sums({2, 4096, 1536}, 4096, 4096);  // the CUDA engine's tile: the whole shard
  tile_sums({2, 4096, 1536}, 64, 4000);    // 64-row tiles, a padded tail
  tile_sums({1, 100, 100}, 25, 63);        // D % 8 != 0: the scalar kernel
  tile_sums({2, 48, 1536}, 48, 0);         // no valid rows: zeros
  tile_sums({1, 50, 1536}, 50, 50, true);  // misaligned: the scalar kernel

  // Ulysses relayouts (exact copies).
  constexpr double kExact = 1e-7;
  auto relayouts = [&](int64_t b, int64_t s, int64_t heads, int64_t d, int world,
                       bool misalign = false) {
    const int64_t h = heads / world;
    const std::string w = absl::StrCat("world=", world);
    auto mis = [misalign](Arg a) { return Misaligned(std::move(a), misalign); };
    Case pack;
    pack.op = "PackQkv";
    pack.extra = w;
    pack.bound = kExact;
    pack.args = {mis(In("q", {b, s, heads, d})), mis(In("k", {b, s, heads, d})),
                 mis(In("v", {b, s, heads, d})), mis(Out("send", {world, 3, b, s, h, d}))};
    pack.run = [world](Backend& be, std::vector<Tensor>& t) {
      return be.PackQkv(t[0], t[1], t[2], world, &t[3]);
    };
    cases.push_back(std::move(pack));
    Case unpack;
    unpack.op = "UnpackQkv";
    unpack.extra = w;
    unpack.bound = kExact;
    unpack.args = {mis(In("recv", {world, 3, b, s, h, d})),
                   mis(Out("q", {b, world * s, h, d})),
                   mis(Out("k", {b, world * s, h, d})),
                   mis(Out("v", {b, world * s, h, d}))};
    unpack.run = [world](Backend& be, std::vector<Tensor>& t) {
      return be.UnpackQkv(t[0], world, &t[1], &t[2], &t[3]);
    };
    cases.push_back(std::move(unpack));
    Case pack_out;
    pack_out.op = "PackOut";
    pack_out.extra = w;
    pack_out.bound = kExact;
    pack_out.args = {mis(In("o", {b, world * s, h, d})),
                     mis(Out("send", {world, b, s, h, d}))};
    pack_out.run = [world](Backend& be, std::vector<Tensor>& t) {
      return be.PackOut(t[0], world, &t[1]);
    };
    cases.push_back(std::move(pack_out));
    Case unpack_out;
    unpack_out.op = "UnpackOut";
    unpack_out.extra = w;
    unpack_out.bound = kExact;
    unpack_out.args = {mis(In("recv", {world, b, s, h, d})),
                       mis(Out("o", {b, s, heads, d}))};
    unpack_out.run = [world](Backend& be, std::vector<Tensor>& t) {
      return be.UnpackOut(t[0], world, &t[1]);
    };
    cases.push_back(std::move(unpack_out));
  };
  relayouts(1, 1024, 12, 128, 4);   // 1.3B on 4 ranks (3 heads each)
  relayouts(1, 512, 12, 128, 3);
  relayouts(2, 100, 12, 128, 2);
  relayouts(1, 256, 12, 128, 1);
  relayouts(2, 5, 6, 6, 3);         // rows of 12 bytes (bf16)
  relayouts(1, 9, 3, 5, 3);         // rows of 10 bytes
  relayouts(1, 64, 8, 128, 2, true);

  // Copy (dtype conversion) and the chunked host copies (buffers larger than
  // the 16 MiB staging buffers).
  auto copy = [&](Shape s, Kind from, Kind to, double bound) {
    Case c;
    c.op = "Copy";
    c.bound = bound;
    c.args = {In("src", s, from), Out("dst", s, to)};
    c.run = [](Backend& be, std::vector<Tensor>& t) { return be.Copy(t[0], &t[1]); };
    cases.push_back(std::move(c));
  };
  copy({1000, 37}, Kind::kF32, Kind::kBF16, 0.0);
  copy({1000, 37}, Kind::kBF16, Kind::kF32, 0.0);
  copy({999}, Kind::kBF16, Kind::kF16, 0.0);
  copy({999}, Kind::kF16, Kind::kBF16, 0.0);
  copy({333}, Kind::kF32, Kind::kF16, 0.0);
  copy({5, 1000, 1000}, Kind::kF32, Kind::kF32, 0.0);    // 20 MB
  copy({9, 1000, 1000}, Kind::kBF16, Kind::kBF16, 0.0);  // 18 MB

  // FillNormal: the same Philox/Box-Muller numbers as the CPU.
  auto fill = [&](Shape s, Kind kind, double bound) {
    Case c;
    c.op = "FillNormal";
    c.bound = bound;
    c.extra = "seed=42 stream=noise mean=0.5 std=2";
    c.args = {Out("x", s, kind)};
    c.run = [](Backend& be, std::vector<Tensor>& t) {
      return be.FillNormal(&t[0], 42, kNoiseStream, 0.5f, 2.0f);
    };
    cases.push_back(std::move(c));
  };
  fill({1, 16, 21, 60, 104}, Kind::kF32, 1e-6);  // 480p latents
  fill({1001, 37}, Kind::kBF16, 1e-4);
  fill({999}, Kind::kF16, 1e-4);

  // Capture/Replay: a captured Linear -> Silu -> AddInPlace with a
  // temporary allocated inside the body. Capture runs the body once; then x
  // gets new contents and the graph is replayed twice, so y must hold
  // y0 + f(x1) + 2 f(x2) and h the last f(x2).
  {
    const int64_t m = 96, k = 256, n = 192;
    Rng rng(7);
    Host x2(static_cast<size_t>(m * k));
    for (float& v : x2) v = RoundTo(Kind::kAct, NonZeroNormal(rng, 1.0f));
    Case c;
    c.op = "Capture+Replay";
    c.extra = "Linear->Silu->AddInPlace, 2 replays";
    c.args = {InOut("x", {m, k}), In("w", {n, k}, Kind::kAct, Normal(1.0f / 16)),
              In("b", {n}), InOut("y", {m, n}), Out("h", {m, n})};
    c.run = [x2, m, n](Backend& be, std::vector<Tensor>& t) -> absl::Status {
      auto body = [&be, &t, m, n]() -> absl::Status {
        DN_ASSIGN_OR_RETURN(Tensor tmp, be.Empty({m, n}, be.compute_dtype()));
        DN_RETURN_IF_ERROR(be.Linear(t[0], t[1], &t[2], Activation::kNone, &tmp));
        DN_RETURN_IF_ERROR(be.Silu(tmp, &t[4]));
        return be.AddInPlace(&t[3], t[4]);
      };
      DN_ASSIGN_OR_RETURN(std::unique_ptr<Graph> graph, be.Capture(body));
      DN_RETURN_IF_ERROR(be.CopyFromHost(x2.data(), &t[0]));
      DN_RETURN_IF_ERROR(graph->Replay());
      return graph->Replay();
    };
    cases.push_back(std::move(c));
  }
  return cases;
}

// --- checks that compare nothing with the CPU --------------------------------------

struct Check {
  std::string name;
  std::function<absl::Status(Backend&)> run;
};

std::vector<Check> MakeChecks() {
  std::vector<Check> checks;
  checks.push_back({"Empty reuses a freed block", [](Backend& be) -> absl::Status {
    const void* first = nullptr;
    {
      DN_ASSIGN_OR_RETURN(Tensor t, be.Empty({3, 1000, 1000}, DType::kBF16));
      first = t.data();
    }
    const int64_t peak = be.peak_memory_bytes();
    DN_ASSIGN_OR_RETURN(Tensor again, be.Empty({3, 1000, 1000}, DType::kBF16));
    if (again.data() != first)
      return absl::InternalError("the same size class got a different block");
    if (be.peak_memory_bytes() != peak)
      return absl::InternalError("peak memory grew on a cache hit");
    if (peak <= 0) return absl::InternalError("peak_memory_bytes is not positive");
    return absl::OkStatus();
  }});
  checks.push_back({"Mark/ElapsedSeconds", [](Backend& be) -> absl::Status {
    DN_ASSIGN_OR_RETURN(Tensor x, be.Empty({1 << 20}, DType::kF32));
    DN_ASSIGN_OR_RETURN(std::unique_ptr<Marker> a, be.Mark());
    DN_RETURN_IF_ERROR(be.FillNormal(&x, 1, 2, 0.0f, 1.0f));
    DN_ASSIGN_OR_RETURN(std::unique_ptr<Marker> b, be.Mark());
    DN_ASSIGN_OR_RETURN(double sec, be.ElapsedSeconds(*a, *b));
    if (!(sec >= 0.0) || !std::isfinite(sec))
      return absl::InternalError(absl::StrCat("elapsed ", sec, " s"));
    return absl::OkStatus();
  }});
  checks.push_back({"bad shapes give INVALID_ARGUMENT", [](Backend& be) -> absl::Status {
    const DType act = be.compute_dtype();
    DN_ASSIGN_OR_RETURN(Tensor x, be.Empty({4, 16}, act));
    DN_ASSIGN_OR_RETURN(Tensor w, be.Empty({8, 15}, act));
    DN_ASSIGN_OR_RETURN(Tensor y, be.Empty({4, 8}, act));
    absl::Status s = be.Linear(x, w, nullptr, Activation::kNone, &y);
    if (!absl::IsInvalidArgument(s))
      return absl::InternalError(absl::StrCat("Linear K mismatch gave: ", s.ToString()));
    DN_ASSIGN_OR_RETURN(Tensor q, be.Empty({1, 8, 2, 12}, act));
    s = be.Attention(q, q, q, 8, 1.0f, &q);
    if (!absl::IsInvalidArgument(s))
      return absl::InternalError(absl::StrCat("Attention d=12 gave: ", s.ToString()));
    s = be.Attention(q, q, q, 9, 1.0f, &q);
    if (!absl::IsInvalidArgument(s))
      return absl::InternalError(absl::StrCat("Attention kv_len>Skv gave: ", s.ToString()));
    DN_ASSIGN_OR_RETURN(Tensor f, be.Empty({4, 16}, DType::kF32));
    s = be.Silu(f, &f);
    if (!absl::IsInvalidArgument(s))
      return absl::InternalError(absl::StrCat("Silu on f32 gave: ", s.ToString()));
    return absl::OkStatus();
  }});
  // The device quantizer against the host one (worker/cpu/e4m3.h) that the
  // CPU emulation uses: every bf16 bit pattern (NaN aside), bitwise, first
  // with scale 1 (the infinities make amax infinite), then with the finite
  // patterns and the scale 448 / amax.
  checks.push_back({"AttentionFp8 quantize kernel == host EncodeE4m3 (all bf16 values)",
                    [](Backend& be) -> absl::Status {
    auto stream = static_cast<cudaStream_t>(be.stream());
    std::vector<uint16_t> all;
    for (uint32_t b = 0; b < 65536; ++b)
      if (!std::isnan(BF16ToF32(static_cast<uint16_t>(b)))) all.push_back(static_cast<uint16_t>(b));
    std::vector<uint16_t> finite;
    for (uint16_t b : all)
      if (std::isfinite(BF16ToF32(b))) finite.push_back(b);
    for (const std::vector<uint16_t>* values : {&all, &finite}) {
      const int64_t n = static_cast<int64_t>(values->size());
      DN_ASSIGN_OR_RETURN(Tensor x, be.Empty({n}, DType::kBF16));
      DN_ASSIGN_OR_RETURN(Tensor q8, be.Empty({n}, DType::kBF16));  // n bytes used
      DN_ASSIGN_OR_RETURN(Tensor slots, be.Empty({cuda::Fp8Slots::kBytes / 4}, DType::kF32));
      DN_RETURN_IF_ERROR(be.Synchronize());
      if (cudaMemcpy(x.data(), values->data(), n * 2, cudaMemcpyHostToDevice) != cudaSuccess)
        return absl::InternalError("cudaMemcpy to device failed");
      cuda::Fp8Qkv qkv;
      for (int t = 0; t < 3; ++t) {
        qkv.x[t] = static_cast<const __nv_bfloat16*>(x.data());
        qkv.rows[t] = cuda::RowsLayout{1, n, n};
        qkv.out[t] = static_cast<uint8_t*>(q8.data());
      }
      auto* sl = static_cast<float*>(slots.data());
      DN_RETURN_IF_ERROR(cuda::InvokeFp8Amax(qkv, sl, stream));
      DN_RETURN_IF_ERROR(cuda::InvokeFp8Quantize(qkv, sl, false, stream));
      DN_RETURN_IF_ERROR(be.Synchronize());
      std::vector<uint8_t> got(static_cast<size_t>(n));
      float scale = 0;
      if (cudaMemcpy(got.data(), q8.data(), n, cudaMemcpyDeviceToHost) != cudaSuccess ||
          cudaMemcpy(&scale, sl + cuda::Fp8Slots::kScaleQ * cuda::Fp8Slots::kStride,
                     sizeof(float), cudaMemcpyDeviceToHost) != cudaSuccess)
        return absl::InternalError("cudaMemcpy to host failed");
      float amax = 0;
      for (uint16_t b : *values) amax = std::max(amax, std::fabs(BF16ToF32(b)));
      const float want_scale = E4m3ScaleForAmax(amax);
      if (scale != want_scale)
        return absl::InternalError(absl::StrCat("device scale ", scale, " != host ", want_scale));
      int64_t bad = 0;
      std::string first;
      for (int64_t i = 0; i < n; ++i) {
        const float xv = BF16ToF32((*values)[static_cast<size_t>(i)]);
        const uint8_t want = EncodeE4m3(xv * want_scale);
        if (got[static_cast<size_t>(i)] != want && bad++ == 0)
          first = absl::StrCat("x=", xv, " scale=", want_scale, ": device ",
                               int{got[static_cast<size_t>(i)]}, " host ", int{want});
      }
      if (bad > 0)
        return absl::InternalError(absl::StrCat(bad, " of ", n, " codes differ, first ", first));
    }
    return absl::OkStatus();
  }});
  checks.push_back({"AttentionFp8 bad shapes give INVALID_ARGUMENT",
                    [](Backend& be) -> absl::Status {
    const DType act = be.compute_dtype();
    DN_ASSIGN_OR_RETURN(Tensor q, be.Empty({1, 8, 2, 24}, act));  // d % 16 != 0
    absl::Status s = be.AttentionFp8(q, q, q, 8, 1.0f, &q);
    if (!absl::IsInvalidArgument(s))
      return absl::InternalError(absl::StrCat("AttentionFp8 d=24 gave: ", s.ToString()));
    s = be.AttentionFp8(q, q, q, 9, 1.0f, &q);
    if (!absl::IsInvalidArgument(s))
      return absl::InternalError(absl::StrCat("AttentionFp8 kv_len>Skv gave: ", s.ToString()));
    return absl::OkStatus();
  }});
  // The scales are computed on the device from each call's data, so a
  // replay with new inputs (10x larger: new amax) equals an eager call.
  checks.push_back({"AttentionFp8 replay with new inputs == eager (scales on device)",
                    [](Backend& be) -> absl::Status {
    const DType act = be.compute_dtype();
    const int64_t b = 2, s = 1024, h = 4, d = 128;
    DN_ASSIGN_OR_RETURN(Tensor q, be.Empty({b, s, h, d}, act));
    DN_ASSIGN_OR_RETURN(Tensor k, be.Empty({b, s, h, d}, act));
    DN_ASSIGN_OR_RETURN(Tensor v, be.Empty({b, s, h, d}, act));
    DN_ASSIGN_OR_RETURN(Tensor o, be.Empty({b, s, h, d}, act));
    DN_ASSIGN_OR_RETURN(Tensor want, be.Empty({b, s, h, d}, act));
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    auto fill = [&](float sq, float sv, uint64_t seed) -> absl::Status {
      DN_RETURN_IF_ERROR(be.FillNormal(&q, seed, 1, 0.0f, sq));
      DN_RETURN_IF_ERROR(be.FillNormal(&k, seed, 2, 0.0f, 1.0f));
      return be.FillNormal(&v, seed, 3, 0.0f, sv);
    };
    DN_RETURN_IF_ERROR(fill(1.0f, 1.0f, 11));
    DN_ASSIGN_OR_RETURN(std::unique_ptr<Graph> graph, be.Capture([&] {
      return be.AttentionFp8(q, k, v, s, scale, &o);
    }));
    DN_RETURN_IF_ERROR(fill(0.1f, 10.0f, 12));
    DN_RETURN_IF_ERROR(be.AttentionFp8(q, k, v, s, scale, &want));
    DN_RETURN_IF_ERROR(graph->Replay());
    std::vector<float> w(static_cast<size_t>(want.numel())), g(w.size());
    DN_RETURN_IF_ERROR(be.CopyToHost(want, w.data()));
    DN_RETURN_IF_ERROR(be.CopyToHost(o, g.data()));
    const double e = RelL2(g, w);
    if (!(e <= 1e-6))
      return absl::InternalError(absl::StrCat("replay vs eager rel L2 ", e));
    return absl::OkStatus();
  }});
  checks.push_back({"RmsNormRopePackQkv == RmsNormRope then PackQkv (bitwise)",
                    [](Backend& be) -> absl::Status {
    const DType act = be.compute_dtype();
    const int64_t b = 2, s = 300, heads = 12, hd = 128, d = heads * hd;
    const int world = 4;
    DN_ASSIGN_OR_RETURN(Tensor q, be.Empty({b, s, d}, act));
    DN_ASSIGN_OR_RETURN(Tensor k, be.Empty({b, s, d}, act));
    DN_ASSIGN_OR_RETURN(Tensor v, be.Empty({b, s, d}, act));
    DN_ASSIGN_OR_RETURN(Tensor gq, be.Empty({d}, DType::kF32));
    DN_ASSIGN_OR_RETURN(Tensor gk, be.Empty({d}, DType::kF32));
    DN_ASSIGN_OR_RETURN(Tensor rope, be.Empty({s, hd / 2, 2}, DType::kF32));
    DN_RETURN_IF_ERROR(be.FillNormal(&q, 1, 1, 0.0f, 2.0f));
    DN_RETURN_IF_ERROR(be.FillNormal(&k, 1, 2, 0.0f, 2.0f));
    DN_RETURN_IF_ERROR(be.FillNormal(&v, 1, 3, 0.0f, 1.0f));
    DN_RETURN_IF_ERROR(be.FillNormal(&gq, 1, 4, 1.0f, 0.2f));
    DN_RETURN_IF_ERROR(be.FillNormal(&gk, 1, 5, 1.0f, 0.2f));
    DN_RETURN_IF_ERROR(be.FillNormal(&rope, 1, 6, 0.0f, 0.7f));
    DN_ASSIGN_OR_RETURN(Tensor qr, be.Empty({b, s, d}, act));
    DN_ASSIGN_OR_RETURN(Tensor kr, be.Empty({b, s, d}, act));
    DN_RETURN_IF_ERROR(be.RmsNormRope(q, gq, rope, heads, 1e-6f, &qr));
    DN_RETURN_IF_ERROR(be.RmsNormRope(k, gk, rope, heads, 1e-6f, &kr));
    const Shape seq4 = {b, s, heads, hd};
    const Shape packed = {world, 3, b, s, heads / world, hd};
    DN_ASSIGN_OR_RETURN(Tensor want, be.Empty(packed, act));
    DN_ASSIGN_OR_RETURN(Tensor got, be.Empty(packed, act));
    DN_RETURN_IF_ERROR(be.PackQkv(qr.View(seq4), kr.View(seq4), v.View(seq4),
                                  world, &want));
    DN_RETURN_IF_ERROR(be.RmsNormRopePackQkv(q, k, v, gq, gk, rope, heads,
                                             1e-6f, world, &got));
    std::vector<float> w(static_cast<size_t>(want.numel())),
        g(static_cast<size_t>(got.numel()));
    DN_RETURN_IF_ERROR(be.CopyToHost(want, w.data()));
    DN_RETURN_IF_ERROR(be.CopyToHost(got, g.data()));
    for (size_t i = 0; i < w.size(); ++i)
      if (!(g[i] == w[i]))
        return absl::InternalError(absl::StrCat("element ", i, ": fused ", g[i],
                                                ", unfused ", w[i]));
    return absl::OkStatus();
  }});
  checks.push_back({"host syncs are refused inside Capture", [](Backend& be) -> absl::Status {
    DN_ASSIGN_OR_RETURN(Tensor x, be.Empty({1024}, DType::kF32));
    absl::Status inner;
    auto graph = be.Capture([&]() -> absl::Status {
      inner = be.Synchronize();
      return be.FillNormal(&x, 1, 2, 0.0f, 1.0f);
    });
    if (!graph.ok()) return graph.status();
    if (!absl::IsFailedPrecondition(inner))
      return absl::InternalError(absl::StrCat("Synchronize in Capture gave: ", inner.ToString()));
    return be.Synchronize();
  }});
  return checks;
}

// --- perf mode ------------------------------------------------------------------------

absl::StatusOr<double> MedianSeconds(Backend& be, const std::function<absl::Status()>& fn,
                                     int iters) {
  for (int i = 0; i < 3; ++i) DN_RETURN_IF_ERROR(fn());
  std::vector<double> times;
  for (int i = 0; i < iters; ++i) {
    DN_ASSIGN_OR_RETURN(std::unique_ptr<Marker> a, be.Mark());
    DN_RETURN_IF_ERROR(fn());
    DN_ASSIGN_OR_RETURN(std::unique_ptr<Marker> b, be.Mark());
    DN_ASSIGN_OR_RETURN(double t, be.ElapsedSeconds(*a, *b));
    times.push_back(t);
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

absl::StatusOr<Tensor> Random(Backend& be, Shape shape, DType dtype, float std,
                              uint64_t stream) {
  DN_ASSIGN_OR_RETURN(Tensor t, be.Empty(shape, dtype));
  DN_RETURN_IF_ERROR(be.FillNormal(&t, 1234, stream, 0.0f, std));
  return t;
}

absl::Status RunPerf(Backend& be, int iters) {
  const DType act = be.compute_dtype();
  std::printf("\n%-22s %-44s %10s %12s\n", "op", "shape", "median ms", "rate");
  auto row = [](const std::string& op, const std::string& shape, double sec,
                double amount, const char* unit) {
    std::printf("%-22s %-44s %10.3f %9.1f %s\n", op.c_str(), shape.c_str(),
                sec * 1e3, amount / sec, unit);
    std::fflush(stdout);
  };

  struct Attn {
    int64_t b, h, sq, skv;
  };
  for (const Attn& a : {Attn{1, 12, 32760, 32760}, Attn{1, 3, 32760, 32760},
                        Attn{1, 12, 4096, 4096}, Attn{1, 12, 32760, 512},
                        Attn{1, 5, 75600, 75600}}) {
    const int64_t d = 128;
    DN_ASSIGN_OR_RETURN(Tensor q, Random(be, {a.b, a.sq, a.h, d}, act, 1.0f, 1));
    DN_ASSIGN_OR_RETURN(Tensor k, Random(be, {a.b, a.skv, a.h, d}, act, 1.0f, 2));
    DN_ASSIGN_OR_RETURN(Tensor v, Random(be, {a.b, a.skv, a.h, d}, act, 1.0f, 3));
    DN_ASSIGN_OR_RETURN(Tensor o, be.Empty({a.b, a.sq, a.h, d}, act));
    const float scale = 1.0f / std::sqrt(128.0f);
    DN_ASSIGN_OR_RETURN(double sec, MedianSeconds(be, [&] {
      return be.Attention(q, k, v, a.skv, scale, &o);
    }, iters));
    row("Attention", absl::StrCat(a.b, "x", a.h, "x", a.sq, "x", a.skv, " d=128"),
        sec, 4.0 * a.b * a.h * a.sq * a.skv * d * 1e-12, "TFLOP/s");
    // The fast tier's fp8 attention, quantization included.
    absl::StatusOr<double> sec8 = MedianSeconds(be, [&] {
      return be.AttentionFp8(q, k, v, a.skv, scale, &o);
    }, iters);
    if (sec8.ok()) {
      row("AttentionFp8", absl::StrCat(a.b, "x", a.h, "x", a.sq, "x", a.skv, " d=128"),
          *sec8, 4.0 * a.b * a.h * a.sq * a.skv * d * 1e-12, "TFLOP/s");
    } else {
      std::printf("%-22s %s\n", "AttentionFp8", sec8.status().ToString().c_str());
    }
  }

  struct Gemm {
    const char* what;
    int64_t m, n, k;
    bool gelu;
  };
  for (const Gemm& g : {Gemm{"1.3B qkvo", 32760, 1536, 1536, false},
                        Gemm{"1.3B ffn up+gelu", 32760, 8960, 1536, true},
                        Gemm{"1.3B ffn down", 32760, 1536, 8960, false},
                        Gemm{"text 4096->D", 512, 1536, 4096, false},
                        Gemm{"14B qkvo (P=4)", 8190, 5120, 5120, false},
                        Gemm{"14B ffn up (P=4)", 8190, 13824, 5120, true},
                        Gemm{"14B ffn down (P=4)", 8190, 5120, 13824, false}}) {
    DN_ASSIGN_OR_RETURN(Tensor x, Random(be, {g.m, g.k}, act, 1.0f, 4));
    DN_ASSIGN_OR_RETURN(Tensor w, Random(be, {g.n, g.k}, act, 0.02f, 5));
    DN_ASSIGN_OR_RETURN(Tensor bias, Random(be, {g.n}, act, 0.1f, 6));
    DN_ASSIGN_OR_RETURN(Tensor y, be.Empty({g.m, g.n}, act));
    DN_ASSIGN_OR_RETURN(double sec, MedianSeconds(be, [&] {
      return be.Linear(x, w, &bias, g.gelu ? Activation::kGeluTanh : Activation::kNone, &y);
    }, iters));
    row(absl::StrCat("Linear ", g.what),
        absl::StrCat("M=", g.m, " N=", g.n, " K=", g.k, " +bias", g.gelu ? "+gelu" : ""),
        sec, 2.0 * g.m * g.n * g.k * 1e-12, "TFLOP/s");
  }

  // Memory-bound kernels on a 480p 1.3B activation [1, 32760, 1536].
  const int64_t s = 32760, dm = 1536, elems = s * dm;
  DN_ASSIGN_OR_RETURN(Tensor x, Random(be, {1, s, dm}, act, 1.0f, 7));
  DN_ASSIGN_OR_RETURN(Tensor y, Random(be, {1, s, dm}, act, 1.0f, 8));
  DN_ASSIGN_OR_RETURN(Tensor mod, Random(be, {1, 6, dm}, DType::kF32, 0.5f, 9));
  DN_ASSIGN_OR_RETURN(Tensor weight, Random(be, {dm}, DType::kF32, 0.1f, 10));
  DN_ASSIGN_OR_RETURN(Tensor rope, Random(be, {s, 64, 2}, DType::kF32, 0.7f, 11));
  DN_ASSIGN_OR_RETURN(Tensor out, be.Empty({1, s, dm}, act));
  const double act_bytes = static_cast<double>(elems) * 2.0 * 1e-9;  // bf16
  const std::string shape = "[1, 32760, 1536]";
  DN_ASSIGN_OR_RETURN(double t_ln, MedianSeconds(be, [&] {
    return be.LayerNormModulate(x, mod, 0, 1, 1e-6f, &out);
  }, iters));
  row("LayerNormModulate", shape, t_ln, 2 * act_bytes, "GB/s");
  DN_ASSIGN_OR_RETURN(double t_rr, MedianSeconds(be, [&] {
    return be.RmsNormRope(x, weight, rope, 12, 1e-6f, &out);
  }, iters));
  row("RmsNormRope", shape, t_rr, 2 * act_bytes + s * 64 * 2 * 4 * 1e-9, "GB/s");
  DN_ASSIGN_OR_RETURN(double t_gr, MedianSeconds(be, [&] {
    return be.GatedResidual(&out, y, mod, 2);
  }, iters));
  row("GatedResidual", shape, t_gr, 3 * act_bytes, "GB/s");
  DN_ASSIGN_OR_RETURN(double t_add, MedianSeconds(be, [&] {
    return be.AddInPlace(&out, y);
  }, iters));
  row("AddInPlace", shape, t_add, 3 * act_bytes, "GB/s");
  {
    std::vector<double> sums(2);
    DN_ASSIGN_OR_RETURN(double t_tile, MedianSeconds(be, [&] {
      return be.TileAbsDiffSums(out, y, s, s, sums.data());
    }, iters));
    row("TileAbsDiffSums", shape, t_tile, 2 * act_bytes, "GB/s");
  }
  DN_ASSIGN_OR_RETURN(double t_silu, MedianSeconds(be, [&] {
    return be.Silu(x, &out);
  }, iters));
  row("Silu", shape, t_silu, 2 * act_bytes, "GB/s");
  // Ulysses P=4 relayouts of one rank's q, k, v shards [1, 32760, 12, 128].
  {
    const Tensor q4 = x.View({1, s, 12, 128});
    const Tensor k4 = y.View({1, s, 12, 128});
    const Tensor v4 = out.View({1, s, 12, 128});
    DN_ASSIGN_OR_RETURN(Tensor send, be.Empty({4, 3, 1, s, 3, 128}, act));
    DN_ASSIGN_OR_RETURN(double t_pack, MedianSeconds(be, [&] {
      return be.PackQkv(q4, k4, v4, 4, &send);
    }, iters));
    row("PackQkv (P=4)", "3 x [1, 32760, 12, 128]", t_pack, 6 * act_bytes, "GB/s");
    Tensor qh = x.View({1, 4 * s, 3, 128}), kh = y.View({1, 4 * s, 3, 128}),
           vh = out.View({1, 4 * s, 3, 128});
    DN_ASSIGN_OR_RETURN(double t_unpack, MedianSeconds(be, [&] {
      return be.UnpackQkv(send, 4, &qh, &kh, &vh);
    }, iters));
    row("UnpackQkv (P=4)", "-> 3 x [1, 131040, 3, 128]", t_unpack, 6 * act_bytes, "GB/s");
    // The fused q/k norm + RoPE + pack against its unfused sequence (two
    // RmsNormRope then PackQkv) on the same inputs.
    DN_ASSIGN_OR_RETURN(Tensor qr, be.Empty({1, s, dm}, act));
    DN_ASSIGN_OR_RETURN(Tensor kr, be.Empty({1, s, dm}, act));
    DN_ASSIGN_OR_RETURN(double t_fused, MedianSeconds(be, [&] {
      return be.RmsNormRopePackQkv(x, y, out, weight, weight, rope, 12, 1e-6f, 4,
                                   &send);
    }, iters));
    const double rope_bytes = s * 64 * 2 * 4 * 1e-9;
    row("RmsNormRopePackQkv P=4", "3 x [1, 32760, 1536] -> send", t_fused,
        6 * act_bytes + rope_bytes, "GB/s");
    DN_ASSIGN_OR_RETURN(double t_unfused, MedianSeconds(be, [&] {
      DN_RETURN_IF_ERROR(be.RmsNormRope(x, weight, rope, 12, 1e-6f, &qr));
      DN_RETURN_IF_ERROR(be.RmsNormRope(y, weight, rope, 12, 1e-6f, &kr));
      return be.PackQkv(qr.View({1, s, 12, 128}), kr.View({1, s, 12, 128}), v4, 4,
                        &send);
    }, iters));
    row("  unfused (2 RNR+Pack)", "same", t_unfused, 6 * act_bytes + rope_bytes,
        "GB/s");
  }
  return absl::OkStatus();
}

// --- main ----------------------------------------------------------------------------

int Main(int argc, char** argv) {
  FlagSet flags("backend_ops_test",
                "Compares every op of the CUDA backend with the CPU backend "
                "(relative L2), or times them with --perf.");
  bool perf = false, list = false, cpu_only = false;
  std::string op_filter;
  int device = 0, iters = 10;
  uint64_t seed = 1;
  flags.Bool("perf", &perf, "time attention, GEMMs and kernels instead of testing");
  flags.Bool("list", &list, "print the cases and exit");
  flags.Bool("cpu_only", &cpu_only,
             "compare the CPU backend with itself (checks the harness and the "
             "case definitions on a machine without a GPU)");
  flags.String("op", &op_filter, "only cases whose op name contains this");
  flags.Int("device", &device, "CUDA device ordinal");
  flags.Int("iters", &iters, "timed runs per perf row (median)");
  flags.Uint64("seed", &seed, "base seed of the random inputs");
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;

  std::vector<Case> cases = MakeCases();
  std::vector<Check> checks = MakeChecks();
  auto selected = [&](const std::string& op) {
    return op_filter.empty() || op.find(op_filter) != std::string::npos;
  };
  if (list) {
    for (const Case& c : cases)
      if (selected(c.op)) std::printf("%-22s %s\n", c.op.c_str(), Describe(c).c_str());
    for (const Check& k : checks)
      if (selected(k.name)) std::printf("%-22s %s\n", "check", k.name.c_str());
    return 0;
  }

  BackendOptions cuda_options;
  cuda_options.name = cpu_only ? "cpu" : "cuda";
  cuda_options.device = device;
  auto cuda = cpu_only ? MakeBackend(cuda_options) : MakeCudaBackend(cuda_options);
  if (!cuda.ok()) {
    std::fprintf(stderr, "backend_ops_test: cannot create the CUDA backend: %s\n",
                 cuda.status().ToString().c_str());
    return 2;
  }
  std::printf("backend under test: %s on %s\n", (*cuda)->name().c_str(),
              (*cuda)->device_description().c_str());
  if (perf) {
    absl::Status s = RunPerf(**cuda, std::max(1, iters));
    if (!s.ok()) {
      std::fprintf(stderr, "perf failed: %s\n", s.ToString().c_str());
      return 1;
    }
    return 0;
  }

  BackendOptions cpu_options;
  cpu_options.name = "cpu";
  auto cpu = MakeBackend(cpu_options);
  if (!cpu.ok()) {
    std::fprintf(stderr, "backend_ops_test: cannot create the CPU backend: %s\n",
                 cpu.status().ToString().c_str());
    return 2;
  }
  // A second CUDA backend whose attention uses cuDNN's composite graph.
  std::unique_ptr<Backend> composite;
  bool want_composite = false;
  for (const Case& c : cases) want_composite |= c.composite && selected(c.op);
  want_composite &= !cpu_only;
  if (want_composite) {
    setenv("DN_CUDNN_SDPA", "composite", 1);
    auto made = MakeCudaBackend(cuda_options);
    unsetenv("DN_CUDNN_SDPA");
    if (!made.ok()) {
      std::fprintf(stderr, "backend_ops_test: cannot create the composite-SDPA "
                   "CUDA backend: %s\n", made.status().ToString().c_str());
      return 2;
    }
    composite = std::move(*made);
  }

  // A third CUDA backend whose fp8 attention writes e4m3 O (dequantized).
  std::unique_ptr<Backend> fp8_o;
  bool want_fp8_o = false;
  for (const Case& c : cases) want_fp8_o |= c.fp8_o && selected(c.op);
  want_fp8_o &= !cpu_only;
  if (want_fp8_o) {
    setenv("DN_CUDNN_SDPA_FP8_O", "fp8", 1);
    auto made = MakeCudaBackend(cuda_options);
    unsetenv("DN_CUDNN_SDPA_FP8_O");
    if (!made.ok()) {
      std::fprintf(stderr, "backend_ops_test: cannot create the fp8-O CUDA "
                   "backend: %s\n", made.status().ToString().c_str());
      return 2;
    }
    fp8_o = std::move(*made);
  }

  std::printf("%-22s %10s %8s  %-6s %s\n", "op", "rel_l2", "bound", "result", "shapes");
  int passed = 0, failed = 0;
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const Case& c = cases[ci];
    if (!selected(c.op)) continue;
    Rng rng(seed * 1000003ull + ci);
    std::vector<Host> inputs(c.args.size());
    for (size_t i = 0; i < c.args.size(); ++i) {
      const Arg& a = c.args[i];
      if (a.role == Role::kOut) continue;
      inputs[i].resize(static_cast<size_t>(NumElements(a.shape)));
      (a.fill ? a.fill : Normal(1.0f))(inputs[i], rng);
      for (float& v : inputs[i]) v = RoundTo(a.kind, v);
    }
    Backend& gpu = c.composite && composite ? *composite
                   : c.fp8_o && fp8_o       ? *fp8_o
                                            : **cuda;
    RunResult want = RunOn(**cpu, c, inputs);
    RunResult got = want.status.ok() ? RunOn(gpu, c, inputs) : RunResult{};
    std::string why;  // empty when the case passes
    double worst = 0.0;
    if (!want.status.ok()) {
      why = "cpu: " + want.status.ToString();
    } else if (!got.status.ok()) {
      why = "cuda: " + got.status.ToString();
    } else {
      for (size_t i = 0; i < c.args.size(); ++i) {
        if (c.args[i].role == Role::kIn) continue;
        const double e = RelL2(got.outputs[i], want.outputs[i]);
        if (std::isnan(e) || e > worst || std::isnan(worst)) worst = e;
      }
      if (std::isnan(worst)) why = "NaN/Inf in the output (unwritten or out-of-bounds read)";
      else if (worst > c.bound) why = "error above the bound";
      if (!got.damage.empty()) why = "cuda: " + got.damage;
      if (!want.damage.empty()) why = "cpu: " + want.damage;
    }
    (why.empty() ? passed : failed)++;
    std::printf("%-22s %10.2e %8.0e  %-6s %s\n", c.op.c_str(), worst, c.bound,
                why.empty() ? "PASS" : "FAIL", Describe(c).c_str());
    if (!why.empty()) std::printf("    %s\n", why.c_str());
    std::fflush(stdout);
  }
  for (const Check& k : checks) {
    if (!selected(k.name) || cpu_only) continue;  // the checks are CUDA-specific
    const absl::Status s = k.run(**cuda);
    (s.ok() ? passed : failed)++;
    std::printf("%-22s %10s %8s  %-6s %s\n", "check", "-", "-",
                s.ok() ? "PASS" : "FAIL", k.name.c_str());
    if (!s.ok()) std::printf("    %s\n", s.ToString().c_str());
    std::fflush(stdout);
  }
  std::printf("\n%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace
}  // namespace dn::worker

int main(int argc, char** argv) { return dn::worker::Main(argc, argv); }
