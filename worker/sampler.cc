#include "worker/sampler.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"

// Both samplers follow ../shared/docs/wan-spec.md §4, checked against
// diffusers' UniPCMultistepScheduler (use_flow_sigmas, flow_prediction, bh2,
// order 2, lower_order_final, final_sigmas_type zero) and
// FlowMatchEulerDiscreteScheduler. Schedules reproduce diffusers' arithmetic
// (float64 where numpy computes, float32 where torch does), so sigmas() and
// timesteps() equal diffusers' tables. Update coefficients are computed in
// float64 from the float32 sigmas; element updates are computed in float64
// and stored in float32 (diffusers does them in float32: agreement is at
// float32 rounding level).

namespace dn::worker {
namespace {

constexpr int kNumTrainTimesteps = 1000;
constexpr int kMaxSteps = 100000;

double Shift(double shift, double u) { return shift * u / (1.0 + (shift - 1.0) * u); }

// diffusers' int64 truncation of a timestep. A degenerate shift can make t
// infinite or NaN (1 + (shift - 1)·u rounds to 0 for shift near 0): t is
// kept as is, so CheckSchedule refuses it, instead of an undefined cast.
double TruncatedTimestep(double t) {
  if (!(std::fabs(t) < 9.0e18)) return t;
  return static_cast<double>(static_cast<int64_t>(t));
}

// λ(σ) = ln α − ln σ with α = 1 − σ (flow sigmas).
double Lambda(double sigma) { return std::log(1.0 - sigma) - std::log(sigma); }

absl::Status CheckStep(int i, int next, int steps, size_t n, size_t* size) {
  if (i != next)
    return absl::FailedPreconditionError(absl::StrCat(
        "sampler: step ", i, " taken out of order (expected step ", next, ")"));
  if (i >= steps)
    return absl::FailedPreconditionError(
        absl::StrCat("sampler: step ", i, " past the last step ", steps - 1));
  if (i == 0) {
    *size = n;
  } else if (n != *size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sampler: step ", i, " got ", n, " elements, step 0 had ", *size));
  }
  return absl::OkStatus();
}

class UniPCSampler : public Sampler {
 public:
  // diffusers set_timesteps (use_flow_sigmas): u = linspace(1, 1/1000, n+1)
  // without its last point, shifted; sigma_0 nudged below 1 (so λ is finite);
  // timesteps truncated from the float64 sigmas; sigmas stored as float32;
  // final sigma 0.
  UniPCSampler(int steps, double shift) {
    const double start = 1.0;
    const double stop = 1.0 / kNumTrainTimesteps;
    const double step = (stop - start) / steps;  // numpy linspace, n+1 points
    std::vector<double> grid(static_cast<size_t>(steps));
    for (int i = 0; i < steps; ++i)
      grid[i] = Shift(shift, static_cast<double>(i) * step + start);
    if (std::fabs(grid[0] - 1.0) < 1e-6) grid[0] -= 1e-6;
    for (int i = 0; i < steps; ++i) {
      timesteps_.push_back(TruncatedTimestep(grid[i] * kNumTrainTimesteps));
      sigmas_.push_back(static_cast<double>(static_cast<float>(grid[i])));
    }
    sigmas_.push_back(0.0);
  }

  SchedulerKind kind() const override { return SchedulerKind::kUniPC; }

  absl::Status CheckSchedule() const {
    for (int i = 0; i < steps(); ++i) {
      if (!(sigmas_[i] > 0.0 && sigmas_[i] < 1.0))
        return absl::InvalidArgumentError(absl::StrCat(
            "unipc: sigma_", i, " = ", sigmas_[i],
            " is outside (0, 1); the shift is too extreme"));
      if (i > 0 && !(sigmas_[i] < sigmas_[i - 1]))
        return absl::InvalidArgumentError(absl::StrCat(
            "unipc: sigmas ", i - 1, " and ", i,
            " coincide in float32; too many steps for this shift"));
    }
    return absl::OkStatus();
  }

  absl::Status Step(int i, const float* v, float* x, size_t n) override {
    const int steps = this->steps();
    if (absl::Status s = CheckStep(i, next_, steps, n, &size_); !s.ok())
      return s;
    if (i == 0) {
      m_.assign(n, 0.0f);
      m1_.assign(n, 0.0f);
      m2_.assign(n, 0.0f);
      last_.assign(n, 0.0f);
    }
    const double sigma = sigmas_[i];

    // Data prediction x0 = x − σ·v.
    for (size_t k = 0; k < n; ++k)
      m_[k] = static_cast<float>(static_cast<double>(x[k]) -
                                 sigma * static_cast<double>(v[k]));

    // UniC corrector, of the previous step's predictor order, from σ_{i−1}
    // to σ_i; it rewrites the sample the predictor produced.
    if (i > 0) {
      const double sigma_prev = sigmas_[i - 1];
      const double alpha = 1.0 - sigma;
      const double h = Lambda(sigma) - Lambda(sigma_prev);
      const double phi = std::expm1(-h);  // B(h) of bh2 = h·φ1(h) = e^{−h} − 1
      const double ratio = sigma / sigma_prev;
      const double c_m1 = alpha * phi;
      double rho0 = 0.0, rho1 = 0.5, inv_r = 0.0;  // order 1: ρ = 0.5
      if (prev_order_ == 2) {
        const double r = (Lambda(sigmas_[i - 2]) - Lambda(sigma_prev)) / h;
        const double g1 = phi / (-h) - 1.0;
        const double g2 = g1 / (-h) - 0.5;
        const double b0 = g1 / phi, b1 = 2.0 * g2 / phi;
        // [[1, 1], [r, 1]] ρ = [b0, b1]
        rho0 = (b0 - b1) / (1.0 - r);
        rho1 = b0 - rho0;
        inv_r = 1.0 / r;
      }
      for (size_t k = 0; k < n; ++k) {
        const double m1 = m1_[k];
        const double base = ratio * last_[k] - c_m1 * m1;
        double res = rho1 * (static_cast<double>(m_[k]) - m1);
        if (prev_order_ == 2)
          res += rho0 * ((static_cast<double>(m2_[k]) - m1) * inv_r);
        x[k] = static_cast<float>(base - c_m1 * res);
      }
    }

    // Push m: M[-2] = old M[-1], M[-1] = m (old M[-2] becomes scratch).
    std::swap(m2_, m1_);
    std::swap(m1_, m_);
    const int order = std::min({2, steps - i, i + 1});  // lower_order_final, warm-up
    last_.assign(x, x + n);

    // UniP predictor from σ_i to σ_{i+1}.
    const double sigma_next = sigmas_[i + 1];
    if (sigma_next == 0.0) {
      // λ = +∞: φ = −1, ratio 0, α = 1 ⇒ x_{i+1} = m (order is 1 here).
      for (size_t k = 0; k < n; ++k) x[k] = m1_[k];
    } else {
      const double alpha_next = 1.0 - sigma_next;
      const double h = Lambda(sigma_next) - Lambda(sigma);
      const double phi = std::expm1(-h);
      const double ratio = sigma_next / sigma;
      const double c_m = alpha_next * phi;
      double c_d = 0.0, inv_r = 0.0;
      if (order == 2) {
        inv_r = h / (Lambda(sigmas_[i - 1]) - Lambda(sigma));
        c_d = alpha_next * phi * 0.5;
      }
      for (size_t k = 0; k < n; ++k) {
        const double m = m1_[k];
        double next = ratio * static_cast<double>(x[k]) - c_m * m;
        if (order == 2) next -= c_d * ((static_cast<double>(m2_[k]) - m) * inv_r);
        x[k] = static_cast<float>(next);
      }
    }
    prev_order_ = order;
    ++next_;
    return absl::OkStatus();
  }

 private:
  int next_ = 0;
  size_t size_ = 0;
  int prev_order_ = 0;
  std::vector<float> m_;   // scratch for this step's x0 prediction
  std::vector<float> m1_;  // M[-1]
  std::vector<float> m2_;  // M[-2]
  std::vector<float> last_;
};

class EulerSampler : public Sampler {
 public:
  // diffusers FlowMatchEulerDiscreteScheduler(shift): __init__ computes the
  // training sigmas t/1000 (t = 1..1000, float32) shifted in float32, giving
  // sigma_max = shift(1) and sigma_min = shift(1/1000); set_timesteps(n)
  // spaces n timesteps linearly (float64) between 1000·sigma_max and
  // 1000·sigma_min and shifts them again (so the min end is shifted twice),
  // stores sigmas as float32, timesteps = float32 sigma · 1000, final 0.
  EulerSampler(int steps, double shift) {
    const float shift_f = static_cast<float>(shift);
    const float shift_m1_f = static_cast<float>(shift - 1.0);
    auto shift_f32 = [&](float u) {
      const float num = shift_f * u;
      const float den = 1.0f + shift_m1_f * u;
      return num / den;
    };
    const double sigma_max = shift_f32(1000.0f / 1000.0f);
    const double sigma_min = shift_f32(1.0f / 1000.0f);
    const double t_start = sigma_max * kNumTrainTimesteps;
    const double t_stop = sigma_min * kNumTrainTimesteps;
    for (int i = 0; i < steps; ++i) {
      double t;
      if (steps == 1) {
        t = t_start;
      } else if (i == steps - 1) {
        t = t_stop;  // numpy linspace sets the endpoint exactly
      } else {
        const double step = (t_stop - t_start) / (steps - 1);
        t = static_cast<double>(i) * step + t_start;
      }
      const float sigma =
          static_cast<float>(Shift(shift, t / kNumTrainTimesteps));
      sigmas_.push_back(sigma);
      timesteps_.push_back(static_cast<double>(sigma * 1000.0f));
    }
    sigmas_.push_back(0.0);
  }

  SchedulerKind kind() const override { return SchedulerKind::kEuler; }

  absl::Status Step(int i, const float* v, float* x, size_t n) override {
    if (absl::Status s = CheckStep(i, next_, steps(), n, &size_); !s.ok())
      return s;
    // x_{i+1} = x_i + (σ_{i+1} − σ_i)·v, in float32 like diffusers.
    const float dt =
        static_cast<float>(sigmas_[i + 1]) - static_cast<float>(sigmas_[i]);
    for (size_t k = 0; k < n; ++k) x[k] = x[k] + dt * v[k];
    ++next_;
    return absl::OkStatus();
  }

 private:
  int next_ = 0;
  size_t size_ = 0;
};

}  // namespace

const char* SchedulerName(SchedulerKind kind) {
  switch (kind) {
    case SchedulerKind::kUniPC: return "unipc";
    case SchedulerKind::kEuler: return "euler";
  }
  return "?";
}

absl::StatusOr<std::unique_ptr<Sampler>> Sampler::Create(SchedulerKind kind,
                                                         int steps,
                                                         double shift) {
  if (steps < 1 || steps > kMaxSteps)
    return absl::InvalidArgumentError(absl::StrCat(
        "sampler: steps must be in [1, ", kMaxSteps, "] (got ", steps, ")"));
  if (!(shift > 0.0) || !std::isfinite(shift))
    return absl::InvalidArgumentError(
        absl::StrCat("sampler: shift must be positive (got ", shift, ")"));
  switch (kind) {
    case SchedulerKind::kUniPC: {
      auto sampler = std::make_unique<UniPCSampler>(steps, shift);
      if (absl::Status s = sampler->CheckSchedule(); !s.ok()) return s;
      return std::unique_ptr<Sampler>(std::move(sampler));
    }
    case SchedulerKind::kEuler:
      return std::unique_ptr<Sampler>(std::make_unique<EulerSampler>(steps, shift));
  }
  return absl::InvalidArgumentError("sampler: unknown scheduler kind");
}

void ApplyGuidance(const float* cond, const float* uncond, float guidance,
                   float* out, size_t n) {
  for (size_t k = 0; k < n; ++k)
    out[k] = uncond[k] + guidance * (cond[k] - uncond[k]);
}

}  // namespace dn::worker
