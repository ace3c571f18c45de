// MakeBackend: picks the compute backend by name.
#include "worker/backend.h"

#include "absl/strings/str_cat.h"
#include "worker/cpu/cpu_backend.h"

#ifdef DENOISED_WITH_CUDA
#include "worker/cuda/cuda_backend.h"
#endif

namespace dn::worker {

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(
    const BackendOptions& options) {
  if (options.name == "cpu")
    return std::unique_ptr<Backend>(
        std::make_unique<CpuBackend>(options.threads));
  if (options.name == "cuda") {
#ifdef DENOISED_WITH_CUDA
    return MakeCudaBackend(options);
#else
    return absl::UnimplementedError(
        "backend 'cuda': this build has no CUDA backend (configure with "
        "-DDENOISED_CUDA=ON on a machine with nvcc)");
#endif
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "backend '", options.name, "' is unknown (expected cpu or cuda)"));
}

}  // namespace dn::worker
