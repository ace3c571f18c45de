// File: worker/expert_schedule.h
//
// Which expert of a two-expert model (Wan2.2 A14B) runs at a step, and with
// which guidance scale (docs/MODELS.md §3): the high-noise expert 0
// (`transformer`, guidance_scale) for model timesteps
// t >= boundary_ratio * 1000, the low-noise expert 1 (`transformer_2`,
// guidance_scale_2) after. One sampler runs across the switch.
#ifndef DN_WORKER_EXPERT_SCHEDULE_H_
#define DN_WORKER_EXPERT_SCHEDULE_H_

#include <vector>

namespace dn::worker {

inline constexpr double kNumTrainTimesteps = 1000.0;

// 0 or 1 for the timestep `t` fed to the model (int-valued for UniPC, float
// for Euler). boundary_ratio <= 0 (one transformer) always gives 0.
int ExpertForTimestep(double t, double boundary_ratio);

// How many leading steps of `timesteps` run the high-noise expert.
int HighNoiseSteps(const std::vector<double>& timesteps, double boundary_ratio);

}  // namespace dn::worker

#endif  // DN_WORKER_EXPERT_SCHEDULE_H_
