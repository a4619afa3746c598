// The precision policy: which dtype each kind of state is kept in under precision.mode / precision.moment_dtype.
// Master weights and gradients are FP32 in every mode (DeepSeek-V3's recipe); bf16 and fp8 modes add a BF16
// compute copy of the weights, and fp8 GEMMs quantize that copy on the fly (1×128 / 128×128 scales).
#pragma once

#include <cstdint>
#include <string>

#include "configs/config.h"

namespace moetrain::precision {

enum class Mode { kFp32, kBf16, kFp8 };

Mode parse_mode(const std::string& name);  // "fp32" | "bf16" | "fp8"; anything else throws
const char* mode_name(Mode mode);

struct Policy {
  Mode mode = Mode::kFp32;
  int master_weight_bytes = 4;   // FP32 master weights, what the optimizer updates
  int compute_weight_bytes = 0;  // the low-precision copy used by the GEMMs (0: the master weights are used)
  int grad_bytes = 4;            // gradients are accumulated and reduced in FP32
  int moment_bytes = 4;          // each of AdamW's two moments
  int activation_bytes = 4;      // activations saved for backward

  int64_t weight_bytes_per_param() const { return master_weight_bytes + compute_weight_bytes; }
  int64_t optimizer_bytes_per_param() const { return 2 * static_cast<int64_t>(moment_bytes); }
};

Policy policy_for(const config::PrecisionConfig& precision);

}  // namespace moetrain::precision
