#include "worker/sampler.h"

#include <cmath>
#include <cstdint>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace dn::worker {
namespace {

std::unique_ptr<Sampler> Make(SchedulerKind kind, int steps, double shift) {
  auto s = Sampler::Create(kind, steps, shift);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? std::move(*s) : nullptr;
}

TEST(SamplerTest, UniPCScheduleMatchesDiffusers) {
  auto s = Make(SchedulerKind::kUniPC, 50, 5.0);
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->kind(), SchedulerKind::kUniPC);
  EXPECT_STREQ(SchedulerName(s->kind()), "unipc");
  ASSERT_EQ(s->steps(), 50);
  ASSERT_EQ(s->sigmas().size(), 51u);
  const std::vector<double>& t = s->timesteps();
  // Spec §4 (diffusers, n=50, shift=5): 999, 995, 991, 987, 982, ..., 175, 96.
  EXPECT_EQ(t[0], 999);
  EXPECT_EQ(t[1], 995);
  EXPECT_EQ(t[2], 991);
  EXPECT_EQ(t[3], 987);
  EXPECT_EQ(t[4], 982);
  EXPECT_EQ(t[48], 175);
  EXPECT_EQ(t[49], 96);
  EXPECT_EQ(s->sigmas().back(), 0.0);
  // sigma_0 = 1 - 1e-6 (the quirk), stored as float32.
  EXPECT_EQ(s->sigmas()[0], static_cast<double>(static_cast<float>(1.0 - 1e-6)));
  // Every entry from the formula: u_i = 1 + i·(1/1000 − 1)/n, σ = s·u/(1+(s−1)·u).
  for (int i = 1; i < 50; ++i) {
    const double u = 1.0 + i * ((0.001 - 1.0) / 50);
    const double sigma = 5.0 * u / (1.0 + 4.0 * u);
    EXPECT_EQ(s->sigmas()[i], static_cast<double>(static_cast<float>(sigma))) << i;
    EXPECT_EQ(t[i], std::floor(sigma * 1000)) << i;
    EXPECT_LT(s->sigmas()[i], s->sigmas()[i - 1]);
  }
  // One step: sigma_0 then 0.
  auto one = Make(SchedulerKind::kUniPC, 1, 3.0);
  ASSERT_NE(one, nullptr);
  EXPECT_EQ(one->timesteps(), std::vector<double>{999});
  EXPECT_EQ(one->sigmas().size(), 2u);
}

TEST(SamplerTest, EulerScheduleMatchesDiffusers) {
  auto s = Make(SchedulerKind::kEuler, 50, 5.0);
  ASSERT_NE(s, nullptr);
  EXPECT_STREQ(SchedulerName(s->kind()), "euler");
  ASSERT_EQ(s->sigmas().size(), 51u);
  EXPECT_EQ(s->sigmas()[0], 1.0);
  EXPECT_EQ(s->timesteps()[0], 1000.0);
  EXPECT_EQ(s->sigmas().back(), 0.0);
  // The min end is shifted twice: shift(shift(1/1000)).
  const double once = 5.0 * 0.001 / (1.0 + 4.0 * 0.001);
  const double twice = 5.0 * once / (1.0 + 4.0 * once);
  EXPECT_NEAR(s->sigmas()[49], twice, 1e-7);
  EXPECT_NEAR(s->timesteps()[49], 1000 * twice, 1e-4);
  // Timesteps are floats, t = float32(σ)·1000 in float32.
  EXPECT_NE(s->timesteps()[1], std::floor(s->timesteps()[1]));
  for (int i = 0; i < 50; ++i) {
    EXPECT_EQ(s->timesteps()[i],
              static_cast<double>(static_cast<float>(s->sigmas()[i]) * 1000.0f));
    // Before the second shift the timesteps are evenly spaced.
    const double sigma = s->sigmas()[i];
    const double unshifted = sigma / (5.0 - 4.0 * sigma);
    const double expected = 1.0 + i * (once - 1.0) / 49;
    EXPECT_NEAR(unshifted, expected, 1e-6) << i;
  }
}

// A direct transcription of spec §4's UniPC pseudo-code, in double.
class ReferenceUniPC {
 public:
  explicit ReferenceUniPC(std::vector<double> sigmas) : sigma_(std::move(sigmas)) {}

  void Step(int i, const std::vector<double>& v, std::vector<double>& x) {
    const int n = static_cast<int>(sigma_.size()) - 1;
    std::vector<double> m(x.size());
    for (size_t k = 0; k < x.size(); ++k) m[k] = x[k] - sigma_[i] * v[k];
    if (i > 0) {
      const double h = L(sigma_[i]) - L(sigma_[i - 1]);
      const double phi = std::expm1(-h);
      const std::vector<double>& last = M_.back();
      std::vector<double> base(x.size());
      for (size_t k = 0; k < x.size(); ++k)
        base[k] = (sigma_[i] / sigma_[i - 1]) * last_sample_[k] - A(sigma_[i]) * phi * last[k];
      if (prev_order_ == 1) {
        for (size_t k = 0; k < x.size(); ++k)
          x[k] = base[k] - A(sigma_[i]) * phi * 0.5 * (m[k] - last[k]);
      } else {
        const std::vector<double>& before = M_[M_.size() - 2];
        const double r = (L(sigma_[i - 2]) - L(sigma_[i - 1])) / h;
        const double g1 = phi / (-h) - 1;
        const double g2 = g1 / (-h) - 0.5;
        const double b0 = g1 / phi, b1 = 2 * g2 / phi;
        // Cramer's rule on [[1, 1], [r, 1]] ρ = b.
        const double det = 1 - r;
        const double rho0 = (b0 - b1) / det;
        const double rho1 = (b1 - r * b0) / det;
        for (size_t k = 0; k < x.size(); ++k) {
          const double dm = (before[k] - last[k]) / r;
          x[k] = base[k] - A(sigma_[i]) * phi * (rho0 * dm + rho1 * (m[k] - last[k]));
        }
      }
    }
    M_.push_back(m);
    const int p = std::min({2, n - i, i + 1});
    last_sample_ = x;
    prev_order_ = p;
    const double h = L(sigma_[i + 1]) - L(sigma_[i]);  // +inf at sigma_n = 0
    const double phi = std::expm1(-h);
    for (size_t k = 0; k < x.size(); ++k)
      x[k] = (sigma_[i + 1] / sigma_[i]) * x[k] - A(sigma_[i + 1]) * phi * m[k];
    if (p == 2) {
      const double r = (L(sigma_[i - 1]) - L(sigma_[i])) / h;
      const std::vector<double>& before = M_[M_.size() - 2];
      for (size_t k = 0; k < x.size(); ++k)
        x[k] -= A(sigma_[i + 1]) * phi * 0.5 * (before[k] - m[k]) / r;
    }
  }

 private:
  static double A(double s) { return 1 - s; }
  static double L(double s) { return std::log(A(s)) - std::log(s); }
  std::vector<double> sigma_;
  std::vector<std::vector<double>> M_;
  std::vector<double> last_sample_;
  int prev_order_ = 0;
};

// Runs the sampler and the reference side by side with model outputs
// v_i = model(i, x_i) and compares every intermediate sample.
template <typename Model>
void CompareWithReference(int steps, double shift, std::vector<float> x, Model model) {
  auto s = Make(SchedulerKind::kUniPC, steps, shift);
  ASSERT_NE(s, nullptr);
  ReferenceUniPC ref(s->sigmas());
  std::vector<double> xr(x.begin(), x.end());
  for (int i = 0; i < steps; ++i) {
    const std::vector<float> v = model(i, x);
    ASSERT_TRUE(s->Step(i, v.data(), x.data(), x.size()).ok());
    ref.Step(i, std::vector<double>(v.begin(), v.end()), xr);
    for (size_t k = 0; k < x.size(); ++k)
      EXPECT_NEAR(x[k], xr[k], 2e-6 * (1 + std::fabs(xr[k]))) << "step " << i << " elem " << k;
  }
}

TEST(SamplerTest, UniPCThreeStepsWithConstantVelocity) {
  CompareWithReference(3, 5.0, {1.0f, -2.0f, 0.5f, 0.0f},
                       [](int, const std::vector<float>& x) {
                         return std::vector<float>(x.size(), 0.3f);
                       });
}

TEST(SamplerTest, UniPCMatchesReferenceWithChangingVelocity) {
  // Enough steps for order-2 predictor and corrector; v depends on x and i.
  for (double shift : {1.0, 3.0, 5.0}) {
    CompareWithReference(8, shift, {0.8f, -1.3f, 2.2f, 0.05f, -0.7f},
                         [](int i, const std::vector<float>& x) {
                           std::vector<float> v(x.size());
                           for (size_t k = 0; k < x.size(); ++k)
                             v[k] = 0.6f * x[k] + 0.1f * static_cast<float>(i) -
                                    0.2f * static_cast<float>(k);
                           return v;
                         });
  }
}

TEST(SamplerTest, UniPCOneStepIsTheX0Prediction) {
  auto s = Make(SchedulerKind::kUniPC, 1, 5.0);
  ASSERT_NE(s, nullptr);
  std::vector<float> x = {1.0f, 2.0f}, v = {0.25f, -4.0f};
  const double sigma = s->sigmas()[0];
  ASSERT_TRUE(s->Step(0, v.data(), x.data(), 2).ok());
  EXPECT_EQ(x[0], static_cast<float>(1.0 - sigma * 0.25));
  EXPECT_EQ(x[1], static_cast<float>(2.0 + sigma * 4.0));
}

TEST(SamplerTest, EulerStepArithmetic) {
  auto s = Make(SchedulerKind::kEuler, 3, 3.0);
  ASSERT_NE(s, nullptr);
  std::vector<float> x = {1.0f, -0.5f, 2.0f};
  const std::vector<float> v = {0.3f, 0.3f, 0.3f};
  std::vector<float> expected = x;
  for (int i = 0; i < 3; ++i) {
    const float dt = static_cast<float>(s->sigmas()[i + 1]) - static_cast<float>(s->sigmas()[i]);
    for (float& e : expected) e = e + dt * 0.3f;
    ASSERT_TRUE(s->Step(i, v.data(), x.data(), x.size()).ok());
    EXPECT_EQ(x, expected) << i;
  }
  // Constant v over the whole run moves x by -sigma_0 * v in total.
  EXPECT_NEAR(x[0], 1.0f - 0.3f * static_cast<float>(s->sigmas()[0]), 1e-6);
}

// With the exact velocity v = eps - x0 of the straight path
// x_sigma = (1 - sigma) x0 + sigma eps, both samplers land on x0.
TEST(SamplerTest, ExactVelocityRecoversX0) {
  const std::vector<float> x0 = {0.5f, -1.25f, 2.0f, 0.0f, 3.5f, -0.1f};
  const std::vector<float> eps = {1.1f, -0.3f, 0.7f, -2.0f, 0.05f, 1.6f};
  std::vector<float> v(x0.size());
  for (size_t k = 0; k < v.size(); ++k) v[k] = eps[k] - x0[k];
  struct Case {
    SchedulerKind kind;
    int steps;
    double shift;
  };
  for (const Case& c : {Case{SchedulerKind::kUniPC, 50, 5.0}, Case{SchedulerKind::kUniPC, 7, 3.0},
                        Case{SchedulerKind::kUniPC, 2, 1.0}, Case{SchedulerKind::kEuler, 50, 5.0},
                        Case{SchedulerKind::kEuler, 4, 3.0}}) {
    auto s = Make(c.kind, c.steps, c.shift);
    ASSERT_NE(s, nullptr);
    std::vector<float> x(x0.size());
    const double s0 = s->sigmas()[0];
    for (size_t k = 0; k < x.size(); ++k)
      x[k] = static_cast<float>((1 - s0) * x0[k] + s0 * eps[k]);
    for (int i = 0; i < c.steps; ++i) {
      ASSERT_TRUE(s->Step(i, v.data(), x.data(), x.size()).ok());
      // Every intermediate sample stays on the path.
      const double si = s->sigmas()[i + 1];
      for (size_t k = 0; k < x.size(); ++k)
        EXPECT_NEAR(x[k], (1 - si) * x0[k] + si * eps[k], 2e-5)
            << SchedulerName(c.kind) << " step " << i;
    }
    for (size_t k = 0; k < x.size(); ++k)
      EXPECT_NEAR(x[k], x0[k], 2e-5) << SchedulerName(c.kind) << " n=" << c.steps;
  }
}

TEST(SamplerTest, RejectsMisuse) {
  EXPECT_FALSE(Sampler::Create(SchedulerKind::kUniPC, 0, 5.0).ok());
  EXPECT_FALSE(Sampler::Create(SchedulerKind::kEuler, -1, 5.0).ok());
  EXPECT_FALSE(Sampler::Create(SchedulerKind::kUniPC, 10, 0.0).ok());
  EXPECT_FALSE(Sampler::Create(SchedulerKind::kUniPC, 10, std::nan("")).ok());
  EXPECT_FALSE(Sampler::Create(SchedulerKind::kEuler, 10, -2.0).ok());
  EXPECT_FALSE(Sampler::Create(SchedulerKind::kUniPC, 50, 1e12).ok());  // sigmas collapse
  auto s = Make(SchedulerKind::kUniPC, 3, 5.0);
  std::vector<float> x(4, 1.0f), v(4, 0.0f);
  EXPECT_FALSE(s->Step(1, v.data(), x.data(), 4).ok());  // out of order
  ASSERT_TRUE(s->Step(0, v.data(), x.data(), 4).ok());
  EXPECT_FALSE(s->Step(1, v.data(), x.data(), 3).ok());  // size changed
  ASSERT_TRUE(s->Step(1, v.data(), x.data(), 4).ok());
  ASSERT_TRUE(s->Step(2, v.data(), x.data(), 4).ok());
  EXPECT_FALSE(s->Step(3, v.data(), x.data(), 4).ok());  // past the end
}

TEST(SamplerTest, ApplyGuidance) {
  const float cond[3] = {1.0f, 2.0f, -1.0f};
  const float uncond[3] = {0.5f, 2.0f, 1.0f};
  float out[3];
  ApplyGuidance(cond, uncond, 5.0f, out, 3);
  EXPECT_EQ(out[0], 3.0f);
  EXPECT_EQ(out[1], 2.0f);
  EXPECT_EQ(out[2], -9.0f);
  ApplyGuidance(cond, uncond, 1.0f, out, 3);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[2], -1.0f);
}

}  // namespace
}  // namespace dn::worker
