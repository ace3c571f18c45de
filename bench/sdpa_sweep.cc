// sdpa_sweep: the cuDNN engine space for our attention shapes, timed on the
// GPU (issue 16: "whatever the cuDNN engine and knob space offers beyond
// today's plan"). For each shape it lists every config CudnnSdpa::Sweep finds
// (both graph forms, heuristics modes A/B/fallback, every engine of the graph,
// one knob moved at a time) with its median time and rate, marks the config
// Run uses by default, and checks that the fastest computes the same function
// as the default (relative L2 of the outputs on random inputs).
//
//   sdpa_sweep [--tokens 32760,4096] [--heads 12] [--batch 2] [--iters 10] [--limit 64]
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
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
#include "worker/cuda/sdpa.h"

namespace dn::bench {
namespace {

using worker::cuda::CudnnSdpa;
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
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    num += (got[i] - ref[i]) * double(got[i] - ref[i]);
    den += ref[i] * double(ref[i]);
  }
  const double rel = std::sqrt(num / std::max(den, 1e-30));
  std::printf("SUMMARY B=%lld H=%lld S=%lld: default %.3f ms, fastest %.3f ms (%.1f%%), "
              "%zu configs, fastest vs default output rel L2 %.2e\n",
              (long long)batch, (long long)heads, (long long)tokens, def, best,
              def > 0 ? 100.0 * (def - best) / def : 0.0, rows.size(), rel);
  cudaStreamDestroy(stream);
  if (!(rel < 1e-2))
    return absl::InternalError(absl::StrCat("fastest config differs from the default: rel L2 ", rel));
  return absl::OkStatus();
}

int Main(int argc, char** argv) {
  std::string tokens = "32760,4096";
  int heads = 12, batch = 2, iters = 10, limit = 64;
  FlagSet flags("sdpa_sweep", "times the cuDNN engine space of our attention shapes");
  flags.String("tokens", &tokens, "comma-separated sequence lengths");
  flags.Int("heads", &heads, "heads");
  flags.Int("batch", &batch, "batch (2 = both CFG branches)");
  flags.Int("iters", &iters, "timed runs per config (median)");
  flags.Int("limit", &limit, "most candidates per graph form");
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;
  int failures = 0;
  for (absl::string_view t : absl::StrSplit(tokens, ',')) {
    int64_t s = 0;
    if (!absl::SimpleAtoi(t, &s) || s <= 0) {
      std::fprintf(stderr, "--tokens: bad value '%s'\n", std::string(t).c_str());
      return 2;
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
