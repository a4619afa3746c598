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
  EXPECT_EQ(fp32.master_weight_bytes, 0);  // the parameters are the master weights
  EXPECT_EQ(fp32.param_dtype(), c10::ScalarType::Undefined);
  p.mode = config::PrecisionMode::kBf16;
  Policy bf16 = policy_for(p);
  EXPECT_EQ(bf16.weight_bytes_per_param(), 2);  // BF16 parameters, no other copy
  EXPECT_EQ(bf16.master_weight_bytes, 4);
  EXPECT_EQ(bf16.param_dtype(), c10::ScalarType::BFloat16);
  p.mode = config::PrecisionMode::kFp8;
  p.moment_dtype = config::MomentDtype::kBf16;
  Policy fp8 = policy_for(p);
  EXPECT_EQ(fp8.mode, Mode::kFp8);
  EXPECT_EQ(fp8.weight_bytes_per_param(), 4);  // BF16 parameters + E4M3 w and wᵀ
  EXPECT_EQ(fp8.master_weight_bytes, 4);       // FP32, held by the optimizer
  EXPECT_EQ(fp8.grad_bytes, 4);                // gradients stay FP32
  EXPECT_EQ(fp8.optimizer_bytes_per_param(), 4);
  EXPECT_EQ(fp8.activation_bytes, 2);
  EXPECT_EQ(config::name(Mode::kBf16), "bf16");
}

}  // namespace
}  // namespace moetrain::precision
