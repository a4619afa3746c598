// The precision policy: the mode precision.mode selects, the AdamW moment dtype, and the bytes per parameter and
// per activation that `moetrain plan` budgets for them.
// Weights and gradients are stored only in FP32 (the master weights the optimizer updates), in every mode; no
// low-precision copy of the weights is kept. precision::gemm converts per call: bf16 casts the GEMM's input and
// weight to BF16; fp8 rounds them through E4M3 with a scale per 1×128 input tile and 128×128 weight block and
// multiplies the dequantized values in the input's dtype. The converted operands live only in the micro-batch's
// autograd graph until its backward.
#pragma once

#include <cstdint>

#include "config/config.h"

namespace moetrain::precision {

// The config enum itself (kFp32, kBf16, kFp8); config::name(mode) gives "fp32", "bf16", "fp8".
using Mode = config::PrecisionMode;

struct Policy {
  Mode mode = Mode::kFp32;
  int master_weight_bytes = 4;   // FP32 master weights, what the optimizer updates
  int compute_weight_bytes = 0;  // a budget for the BF16 weight operands gemm makes per call (not a stored copy)
  int grad_bytes = 4;            // gradients are accumulated and reduced in FP32
  int moment_bytes = 4;          // each of AdamW's two moments
  int activation_bytes = 4;      // activations saved for backward

  int64_t weight_bytes_per_param() const { return master_weight_bytes + compute_weight_bytes; }
  int64_t optimizer_bytes_per_param() const { return 2 * static_cast<int64_t>(moment_bytes); }
};

Policy policy_for(const config::PrecisionConfig& precision);

}  // namespace moetrain::precision
