// The precision policy: the mode precision.mode selects, the AdamW moment dtype, and the bytes per parameter and
// per activation that `moetrain plan` budgets for them.
// fp32: the model's parameters are FP32 and are the master weights. bf16 and fp8: the parameters are BF16 (what the
// GEMMs read, all-gathered in BF16 under ZeRO-1) and the optimizer keeps FP32 master weights (partitioned under
// ZeRO-1, trainer/optimizer.h). Gradients are accumulated and reduced in FP32 in every mode. fp8 mode keeps an E4M3
// copy of each weight with 128×128 block scales, w and wᵀ, made once per optimizer step
// (precision/weight_cache.h). A GEMM's input is saved for the backward pass in BF16 (bf16) or E4M3 with 1×128
// tile scales (fp8).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "config/config.h"

namespace moetrain::precision {

// The config enum itself (kFp32, kBf16, kFp8); config::name(mode) gives "fp32", "bf16", "fp8".
using Mode = config::PrecisionMode;

struct Policy {
  Mode mode = Mode::kFp32;
  int param_bytes = 4;           // the model's parameters: FP32, or BF16 in the bf16 and fp8 modes
  int compute_weight_bytes = 0;  // the GEMM copy of the weights: E4M3 w and wᵀ in fp8 mode
  int master_weight_bytes = 0;   // the optimizer's FP32 master weights (bf16, fp8), partitioned by ZeRO-1
  int grad_bytes = 4;            // gradients are accumulated and reduced in FP32
  int moment_bytes = 4;          // each of AdamW's two moments
  int activation_bytes = 4;      // activations saved for backward

  // What every replica holds per parameter (the master weights and moments are counted apart).
  int64_t weight_bytes_per_param() const { return param_bytes + compute_weight_bytes; }
  int64_t optimizer_bytes_per_param() const { return 2 * static_cast<int64_t>(moment_bytes); }
  // The parameters' dtype for AdamW (trainer/optimizer.h): Undefined where they are the master weights.
  c10::ScalarType param_dtype() const {
    return mode == Mode::kFp32 ? c10::ScalarType::Undefined : c10::ScalarType::BFloat16;
  }
};

Policy policy_for(const config::PrecisionConfig& precision);

}  // namespace moetrain::precision
