#include "worker/expert_schedule.h"

namespace dn::worker {

int ExpertForTimestep(double t, double boundary_ratio) {
  if (boundary_ratio <= 0) return 0;
  // diffusers / Wan2.2: `t >= boundary_ratio * num_train_timesteps`, in
  // double (875.0 and 900.0 are exact).
  return t >= boundary_ratio * kNumTrainTimesteps ? 0 : 1;
}

int HighNoiseSteps(const std::vector<double>& timesteps, double boundary_ratio) {
  int n = 0;
  for (double t : timesteps) n += ExpertForTimestep(t, boundary_ratio) == 0;
  return n;
}

}  // namespace dn::worker
