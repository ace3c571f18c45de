// File: worker/sampler.h
//
// The samplers of ../shared/docs/wan-spec.md §4, exactly: UniPC (bh2, flow
// prediction, predict_x0, order 2, lower_order_final, final sigma 0; the
// diffusers Wan default) and flow-match Euler (diffusers
// FlowMatchEulerDiscreteScheduler with shift), plus classifier-free guidance.
// All state is fp32/f64 on the host. A Sampler is made per request.
#ifndef DN_WORKER_SAMPLER_H_
#define DN_WORKER_SAMPLER_H_

#include <cstddef>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace dn::worker {

enum class SchedulerKind { kUniPC, kEuler };

const char* SchedulerName(SchedulerKind kind);  // "unipc" | "euler"

class Sampler {
 public:
  virtual ~Sampler() = default;

  // steps >= 1, shift > 0.
  static absl::StatusOr<std::unique_ptr<Sampler>> Create(SchedulerKind kind,
                                                         int steps,
                                                         double shift);

  virtual SchedulerKind kind() const = 0;
  int steps() const { return static_cast<int>(timesteps_.size()); }
  // sigma_0 .. sigma_n (sigma_n = 0).
  const std::vector<double>& sigmas() const { return sigmas_; }
  // The model's timestep input for step i (UniPC: int-truncated sigma*1000;
  // Euler: sigma*1000 as a float).
  const std::vector<double>& timesteps() const { return timesteps_; }

  // Advances x (n floats, the sample at sigma_i) by one step given the model
  // output v (flow velocity) at step i. Steps must be taken in order 0..n-1.
  virtual absl::Status Step(int i, const float* v, float* x, size_t n) = 0;

 protected:
  std::vector<double> sigmas_;
  std::vector<double> timesteps_;
};

// out = uncond + guidance * (cond - uncond), elementwise over n floats.
void ApplyGuidance(const float* cond, const float* uncond, float guidance,
                   float* out, size_t n);

}  // namespace dn::worker

#endif  // DN_WORKER_SAMPLER_H_
