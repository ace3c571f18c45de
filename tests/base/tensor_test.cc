#include "worker/tensor.h"

#include <cmath>
#include <limits>

#include <gtest/gtest.h>

namespace dn::worker {
namespace {

TEST(TensorTest, HostViewsShareStorage) {
  Tensor t = Tensor::Host({4, 3});
  for (int i = 0; i < 12; ++i) t.data_as<float>()[i] = static_cast<float>(i);
  Tensor rows = t.Rows(1, 3);
  EXPECT_EQ(rows.shape(), (Shape{2, 3}));
  EXPECT_EQ(rows.data_as<float>()[0], 3.0f);
  Tensor flat = t.View({12});
  flat.data_as<float>()[5] = -1.0f;
  EXPECT_EQ(t.data_as<float>()[5], -1.0f);
  EXPECT_EQ(t.DebugString(), "f32[4, 3]@cpu");
}

TEST(TensorTest, Bf16RoundsToNearestEven) {
  EXPECT_EQ(F32ToBF16(1.0f), 0x3f80);
  // 1 + 2^-8 is exactly halfway between two bf16 values: ties to even (1.0).
  EXPECT_EQ(F32ToBF16(1.0f + 1.0f / 256.0f), 0x3f80);
  EXPECT_EQ(F32ToBF16(1.0f + 3.0f / 256.0f), 0x3f82);
  EXPECT_EQ(BF16ToF32(0xc040), -3.0f);
  EXPECT_TRUE(std::isnan(BF16ToF32(F32ToBF16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(TensorTest, F16RoundTrips) {
  for (float v : {0.0f, 1.0f, -2.5f, 65504.0f, 6.103515625e-05f, 5.960464477539063e-08f}) {
    EXPECT_EQ(F16ToF32(F32ToF16(v)), v) << v;
  }
  EXPECT_EQ(F32ToF16(1.0f), 0x3c00);
  EXPECT_TRUE(std::isinf(F16ToF32(F32ToF16(1e6f))));
}

}  // namespace
}  // namespace dn::worker
