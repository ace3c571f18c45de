// sdpa_sweep: the cuDNN engine space for our attention shapes, timed on the
// GPU (issue 16: "whatever the cuDNN engine and knob space offers beyond
// today's plan"). For each shape it lists every config CudnnSdpa::Sweep finds
// (both graph forms, heuristics modes A/B/fallback, every engine of the graph,
// one knob moved at a time) with its median time and rate, marks the config
// Run uses by default, and checks that the fastest computes the same function
// as the default (relative L2 of the outputs on random inputs).
//
//   sdpa_sweep [--tokens 32760,4096] [--heads 12] [--batch 2] [--iters 10] [--limit 64]
//
// With --fp8 it instead measures the fast tier's attention against the bf16
// default plan on the same inputs: bf16 CudnnSdpa::Run vs CudnnSdpaFp8::Run
// (amax, then scales + e4m3 quantization of q/k/v, cuDNN fp8 SDPA, any O
// dequantization, i.e. what AttentionFp8 costs), the quantization kernels
// alone, the rates (4*B*H*S*S*d FLOPs), the speed-up (issue 16 target: fp8
// >= 1.5x bf16) and the fp8 output's relative L2 against bf16. Lines start
// with "FP8" (one per shape) and "FP8 TARGET" (met / not met).
//
//   sdpa_sweep --fp8 [--tokens 32760,4096] [--heads 12] [--batch 2] [--iters 20]
//
// --fp8 --fp8-sweep also times every config of the fp8 graph (heuristics
// modes A/B/fallback, every engine, one knob moved at a time; at most
// --limit), the SDPA alone, with each config's output against the default's
// (lines "FP8 CONFIG", then "FP8 SWEEP" with the op time the fastest gives).
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <algorithm>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "base/cuda_check.h"
#include "base/flags.h"
#include "base/status_macros.h"
#include "worker/cuda/fp8_kernels.h"
#include "worker/cuda/sdpa.h"
#include "worker/cuda/sdpa_fp8.h"

namespace dn::bench {
namespace {

using worker::cuda::CudnnSdpa;
using worker::cuda::CudnnSdpaFp8;
using worker::cuda::Fp8Slots;
using worker::cuda::RowsLayout;
using worker::cuda::SdpaShape;

struct CudaFree {
  void operator()(void* p) const { cudaFree(p); }
};
using DevicePtr = std::unique_ptr<void, CudaFree>;

absl::StatusOr<DevicePtr> Alloc(size_t bytes) {
  void* p = nullptr;
  DN_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, bytes));
  return DevicePtr(p);
}

// Random bf16 N(0, 1) values (fresh for every tensor; never zeros).
absl::StatusOr<DevicePtr> RandomBf16(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<__nv_bfloat16> host(n);
  for (auto& x : host) x = __float2bfloat16(normal(rng));
  DN_ASSIGN_OR_RETURN(DevicePtr d, Alloc(n * sizeof(__nv_bfloat16)));
  DN_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(d.get(), host.data(), n * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
  return d;
}

// ||got - ref|| / ||ref||.
double RelL2(const std::vector<float>& got, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (got[i] - ref[i]) * double(got[i] - ref[i]);
    den += ref[i] * double(ref[i]);
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

absl::StatusOr<std::vector<float>> ToHost(const void* d, size_t n) {
  std::vector<__nv_bfloat16> host(n);
  DN_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(host.data(), d, n * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost));
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = __bfloat162float(host[i]);
  return out;
}

absl::Status SweepShape(int64_t batch, int64_t heads, int64_t tokens, int iters,
                        int limit) {
  const int64_t d = 128;
  const size_t n = static_cast<size_t>(batch * tokens * heads * d);
  DN_ASSIGN_OR_RETURN(DevicePtr q, RandomBf16(n, 1 + tokens));
  DN_ASSIGN_OR_RETURN(DevicePtr k, RandomBf16(n, 2 + tokens));
  DN_ASSIGN_OR_RETURN(DevicePtr v, RandomBf16(n, 3 + tokens));
  DN_ASSIGN_OR_RETURN(DevicePtr o, Alloc(n * 2));
  const size_t ws_bytes = size_t{256} << 20;
  DN_ASSIGN_OR_RETURN(DevicePtr ws, Alloc(ws_bytes));
  cudaStream_t stream = nullptr;
  DN_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  DN_ASSIGN_OR_RETURN(std::unique_ptr<CudnnSdpa> sdpa,
                      CudnnSdpa::Create(stream, ws.get(), ws_bytes));
  const SdpaShape shape{batch, heads, tokens, tokens, tokens, d};
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  // The default plan's output, for the same-function check.
  DN_RETURN_IF_ERROR(sdpa->Run(shape, q.get(), k.get(), v.get(), o.get(), scale));
  DN_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  DN_ASSIGN_OR_RETURN(std::vector<float> ref, ToHost(o.get(), n));
  DN_ASSIGN_OR_RETURN(std::vector<CudnnSdpa::SweepRow> rows,
                      sdpa->Sweep(shape, q.get(), k.get(), v.get(), o.get(), scale,
                                  iters, static_cast<size_t>(limit), /*adopt=*/true));
  const double flop = 4.0 * batch * heads * double(tokens) * tokens * d;
  std::printf("\n## B=%lld H=%lld S=%lld d=128 (cuDNN %zu)\n", (long long)batch,
              (long long)heads, (long long)tokens, sdpa->cudnn_version());
  std::printf("%10s %9s %12s  %s\n", "median ms", "TFLOP/s", "workspace", "config");
  double best = -1, def = -1;
  for (const auto& r : rows) {
    if (r.ms > 0) {
      std::printf("%10.3f %9.1f %12lld  %s%s\n", r.ms, flop / (r.ms * 1e-3) * 1e-12,
                  (long long)r.workspace, r.config.c_str(), r.is_default ? "  <- default" : "");
      if (best < 0 || r.ms < best) best = r.ms;
      if (r.is_default) def = r.ms;
    } else {
      std::printf("%10s %9s %12lld  %s\n", "-", "-", (long long)r.workspace, r.config.c_str());
    }
  }
  // The adopted (fastest) plan computes the same function as the default.
  DN_RETURN_IF_ERROR(sdpa->Run(shape, q.get(), k.get(), v.get(), o.get(), scale));
  DN_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  DN_ASSIGN_OR_RETURN(std::vector<float> got, ToHost(o.get(), n));
  const double rel = RelL2(got, ref);
  std::printf("SUMMARY B=%lld H=%lld S=%lld: default %.3f ms, fastest %.3f ms (%.1f%%), "
              "%zu configs, fastest vs default output rel L2 %.2e\n",
              (long long)batch, (long long)heads, (long long)tokens, def, best,
              def > 0 ? 100.0 * (def - best) / def : 0.0, rows.size(), rel);
  cudaStreamDestroy(stream);
  if (!(rel < 1e-2))
    return absl::InternalError(absl::StrCat("fastest config differs from the default: rel L2 ", rel));
  return absl::OkStatus();
}

// Median milliseconds of `iters` runs of fn on `stream` (2 warm-up runs).
absl::StatusOr<double> MedianMs(cudaStream_t stream, int iters,
                                const std::function<absl::Status()>& fn) {
  cudaEvent_t a = nullptr, b = nullptr;
  DN_CUDA_RETURN_IF_ERROR(cudaEventCreate(&a));
  DN_CUDA_RETURN_IF_ERROR(cudaEventCreate(&b));
  std::vector<double> ms;
  absl::Status st = absl::OkStatus();
  for (int it = 0; it < iters + 2 && st.ok(); ++it) {
    if (cudaEventRecord(a, stream) != cudaSuccess) {
      st = absl::InternalError("cudaEventRecord failed");
      break;
    }
    st = fn();
    if (!st.ok()) break;
    (void)cudaEventRecord(b, stream);
    (void)cudaEventSynchronize(b);
    float e = 0;
    (void)cudaEventElapsedTime(&e, a, b);
    if (it >= 2) ms.push_back(e);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  DN_RETURN_IF_ERROR(st);
  if (ms.empty()) return absl::InvalidArgumentError("--iters must be at least 1");
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// bf16 vs fp8 attention on one shape; *ratio = bf16 ms / fp8 ms.
absl::Status Fp8Shape(int64_t batch, int64_t heads, int64_t tokens, int iters,
                      bool sweep, int limit, double* ratio) {
  const int64_t d = 128;
  const size_t n = static_cast<size_t>(batch * tokens * heads * d);
  DN_ASSIGN_OR_RETURN(DevicePtr q, RandomBf16(n, 1 + tokens));
  DN_ASSIGN_OR_RETURN(DevicePtr k, RandomBf16(n, 2 + tokens));
  DN_ASSIGN_OR_RETURN(DevicePtr v, RandomBf16(n, 3 + tokens));
  DN_ASSIGN_OR_RETURN(DevicePtr o, Alloc(n * 2));
  DN_ASSIGN_OR_RETURN(DevicePtr o8, Alloc(n * 2));
  const size_t ws_bytes = size_t{16} << 20;  // the backend's cuDNN workspace
  DN_ASSIGN_OR_RETURN(DevicePtr ws, Alloc(ws_bytes));
  cudaStream_t stream = nullptr;
  DN_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  DN_ASSIGN_OR_RETURN(std::unique_ptr<CudnnSdpa> sdpa,
                      CudnnSdpa::Create(stream, ws.get(), ws_bytes));
  DN_ASSIGN_OR_RETURN(
      std::unique_ptr<CudnnSdpaFp8> fp8,
      CudnnSdpaFp8::Create(stream,
                           [](size_t bytes) -> absl::StatusOr<std::shared_ptr<void>> {
                             void* p = nullptr;
                             DN_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, bytes));
                             return std::shared_ptr<void>(p, [](void* x) { cudaFree(x); });
                           }));
  const SdpaShape shape{batch, heads, tokens, tokens, tokens, d};
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  DN_ASSIGN_OR_RETURN(auto described, fp8->Describe(shape));
  DN_ASSIGN_OR_RETURN(double bf16_ms, MedianMs(stream, iters, [&] {
    return sdpa->Run(shape, q.get(), k.get(), v.get(), o.get(), scale);
  }));
  DN_ASSIGN_OR_RETURN(double fp8_ms, MedianMs(stream, iters, [&] {
    return fp8->Run(shape, q.get(), k.get(), v.get(), o8.get(), scale);
  }));
  // The quantization kernels alone (amax of q/k/v, then scales + quantize)
  // into scratch buffers of their own.
  DN_ASSIGN_OR_RETURN(DevicePtr q8, Alloc(n));
  DN_ASSIGN_OR_RETURN(DevicePtr k8, Alloc(n));
  DN_ASSIGN_OR_RETURN(DevicePtr v8, Alloc(n));
  DN_ASSIGN_OR_RETURN(DevicePtr slots_mem, Alloc(Fp8Slots::kBytes));
  auto* slots = static_cast<float*>(slots_mem.get());
  const int64_t per_batch = tokens * heads * d;
  worker::cuda::Fp8Qkv qkv;
  qkv.x[0] = static_cast<const __nv_bfloat16*>(q.get());
  qkv.x[1] = static_cast<const __nv_bfloat16*>(k.get());
  qkv.x[2] = static_cast<const __nv_bfloat16*>(v.get());
  for (auto& r : qkv.rows) r = RowsLayout{batch, per_batch, per_batch};
  qkv.out[0] = static_cast<uint8_t*>(q8.get());
  qkv.out[1] = static_cast<uint8_t*>(k8.get());
  qkv.out[2] = static_cast<uint8_t*>(v8.get());
  DN_ASSIGN_OR_RETURN(double quant_ms, MedianMs(stream, iters, [&]() -> absl::Status {
    DN_RETURN_IF_ERROR(worker::cuda::InvokeFp8Amax(qkv, slots, stream));
    return worker::cuda::InvokeFp8Quantize(qkv, slots, false, stream);
  }));
  DN_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  DN_ASSIGN_OR_RETURN(std::vector<float> ref, ToHost(o.get(), n));
  DN_ASSIGN_OR_RETURN(std::vector<float> got, ToHost(o8.get(), n));
  const double rel = RelL2(got, ref);
  const double flop = 4.0 * batch * heads * double(tokens) * tokens * d;
  auto tf = [&](double ms) { return flop / (ms * 1e-3) * 1e-12; };
  *ratio = bf16_ms / fp8_ms;
  std::printf("FP8 B=%lld H=%lld S=%lld d=128 (cuDNN %zu): bf16 %.3f ms %.1f TFLOP/s | "
              "fp8 %.3f ms %.1f TFLOP/s incl. quantization (%.3f ms; attention alone "
              "~%.1f TFLOP/s) | speed-up %.2fx | fp8 vs bf16 rel L2 %.3e | %s O, %s\n",
              (long long)batch, (long long)heads, (long long)tokens, fp8->cudnn_version(),
              bf16_ms, tf(bf16_ms), fp8_ms, tf(fp8_ms), quant_ms,
              fp8_ms > quant_ms ? tf(fp8_ms - quant_ms) : 0.0, *ratio, rel,
              described.first ? "e4m3" : "bf16", described.second.c_str());
  std::fflush(stdout);
  if (sweep) {
    // The fp8 graph's engine space, the SDPA alone (the quantization is the
    // same for every config): is there a config that reaches the target?
    DN_ASSIGN_OR_RETURN(std::vector<CudnnSdpaFp8::SweepRow> rows,
                        fp8->Sweep(shape, q.get(), k.get(), v.get(), o8.get(), scale, iters,
                                   static_cast<size_t>(limit)));
    std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) {
      return (a.ms < 0) != (b.ms < 0) ? a.ms >= 0 : a.ms < b.ms;
    });
    double default_ms = -1;
    for (const auto& r : rows) {
      std::printf("FP8 CONFIG S=%lld %-60s ws %10lld B  %9.3f ms  %7.1f TFLOP/s  rel L2 vs "
                  "default %.2e%s\n",
                  (long long)tokens, r.config.c_str(), (long long)r.workspace, r.ms,
                  r.ms > 0 ? tf(r.ms) : 0.0, r.rel_l2, r.is_default ? "  (default)" : "");
      if (r.is_default) default_ms = r.ms;
    }
    if (!rows.empty() && rows.front().ms > 0 && default_ms > 0) {
      // fp8 op time with the fastest config: the measured op minus the
      // default SDPA plus the fastest one.
      const double best_op = fp8_ms - default_ms + rows.front().ms;
      std::printf("FP8 SWEEP S=%lld: %zu configs; default SDPA %.3f ms, fastest %.3f ms (%s, "
                  "rel L2 vs default %.2e); op with it ~%.3f ms = %.2fx bf16\n",
                  (long long)tokens, rows.size(), default_ms, rows.front().ms,
                  rows.front().config.c_str(), rows.front().rel_l2, best_op,
                  bf16_ms / best_op);
    } else {
      std::printf("FP8 SWEEP S=%lld: %zu configs, no timing of the default\n",
                  (long long)tokens, rows.size());
    }
    std::fflush(stdout);
  }
  cudaStreamDestroy(stream);
  if (!(rel < 0.1))
    return absl::InternalError(absl::StrCat("fp8 output differs from bf16: rel L2 ", rel));
  return absl::OkStatus();
}

int Main(int argc, char** argv) {
  std::string tokens = "32760,4096";
  int heads = 12, batch = 2, iters = 10, limit = 64;
  bool fp8 = false, fp8_sweep = false;
  FlagSet flags("sdpa_sweep", "times the cuDNN engine space of our attention shapes");
  flags.String("tokens", &tokens, "comma-separated sequence lengths");
  flags.Int("heads", &heads, "heads");
  flags.Int("batch", &batch, "batch (2 = both CFG branches)");
  flags.Int("iters", &iters, "timed runs per config (median)");
  flags.Int("limit", &limit, "most candidates per graph form");
  flags.Bool("fp8", &fp8, "compare fp8 attention (AttentionFp8) with bf16 instead of sweeping");
  flags.Bool("fp8-sweep", &fp8_sweep, "with --fp8: also time every config of the fp8 graph");
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;
  int failures = 0;
  for (absl::string_view t : absl::StrSplit(tokens, ',')) {
    int64_t s = 0;
    if (!absl::SimpleAtoi(t, &s) || s <= 0) {
      std::fprintf(stderr, "--tokens: bad value '%s'\n", std::string(t).c_str());
      return 2;
    }
    if (fp8) {
      double ratio = 0;
      if (absl::Status st = Fp8Shape(batch, heads, s, iters, fp8_sweep, limit, &ratio); !st.ok()) {
        std::fprintf(stderr, "S=%lld: %s\n", (long long)s, st.ToString().c_str());
        std::printf("FP8 TARGET S=%lld: FAIL (error)\n", (long long)s);
        ++failures;
      } else {
        std::printf("FP8 TARGET S=%lld: fp8/bf16 speed-up %.2fx, target >= 1.50x: %s\n",
                    (long long)s, ratio, ratio >= 1.5 ? "met" : "NOT met");
      }
      continue;
    }
    if (absl::Status st = SweepShape(batch, heads, s, iters, limit); !st.ok()) {
      std::fprintf(stderr, "S=%lld: %s\n", (long long)s, st.ToString().c_str());
      ++failures;
    }
  }
  return failures == 0 ? 0 : 1;
}

}  // namespace
}  // namespace dn::bench

int main(int argc, char** argv) { return dn::bench::Main(argc, argv); }
