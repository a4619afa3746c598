#include "precision/policy.h"

#include <gtest/gtest.h>

namespace moetrain::precision {
namespace {

TEST(PrecisionPolicy, BytesPerModeAndMoments) {
  config::PrecisionConfig p;
  Policy fp32 = policy_for(p);
  EXPECT_EQ(fp32.weight_bytes_per_param(), 4);
  EXPECT_EQ(fp32.grad_bytes, 4);
  EXPECT_EQ(fp32.optimizer_bytes_per_param(), 8);
  EXPECT_EQ(fp32.activation_bytes, 4);
  p.mode = config::PrecisionMode::kFp8;
  p.moment_dtype = config::MomentDtype::kBf16;
  Policy fp8 = policy_for(p);
  EXPECT_EQ(fp8.mode, Mode::kFp8);
  EXPECT_EQ(fp8.weight_bytes_per_param(), 6);  // FP32 master + BF16 compute copy
  EXPECT_EQ(fp8.grad_bytes, 4);                // gradients stay FP32
  EXPECT_EQ(fp8.optimizer_bytes_per_param(), 4);
  EXPECT_EQ(fp8.activation_bytes, 2);
  EXPECT_EQ(config::name(Mode::kBf16), "bf16");
}

}  // namespace
}  // namespace moetrain::precision
