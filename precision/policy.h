// The precision policy: the mode precision.mode selects, the AdamW moment dtype, and the bytes per parameter and
// per activation that `moetrain plan` budgets for them.
// Master weights and gradients are FP32 (what the optimizer updates), in every mode. The GEMMs use a low-precision
// copy of each weight made once per optimizer step (precision/weight_cache.h): BF16 in bf16 mode, E4M3 with
// 128×128 block scales (w and wᵀ) in fp8 mode. A GEMM's input is saved for the backward pass in BF16 (bf16) or
// E4M3 with 1×128 tile scales (fp8).
#pragma once

#include <cstdint>

#include "config/config.h"

namespace moetrain::precision {

// The config enum itself (kFp32, kBf16, kFp8); config::name(mode) gives "fp32", "bf16", "fp8".
using Mode = config::PrecisionMode;

struct Policy {
  Mode mode = Mode::kFp32;
  int master_weight_bytes = 4;   // FP32 master weights, what the optimizer updates
  int compute_weight_bytes = 0;  // the GEMM copy of the weights (BF16, or E4M3 w and wᵀ)
  int grad_bytes = 4;            // gradients are accumulated and reduced in FP32
  int moment_bytes = 4;          // each of AdamW's two moments
  int activation_bytes = 4;      // activations saved for backward

  int64_t weight_bytes_per_param() const { return master_weight_bytes + compute_weight_bytes; }
  int64_t optimizer_bytes_per_param() const { return 2 * static_cast<int64_t>(moment_bytes); }
};

Policy policy_for(const config::PrecisionConfig& precision);

}  // namespace moetrain::precision
