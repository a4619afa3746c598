#include "precision/policy.h"

#include <stdexcept>

namespace moetrain::precision {

Mode parse_mode(const std::string& name) {
  if (name == "fp32") return Mode::kFp32;
  if (name == "bf16") return Mode::kBf16;
  if (name == "fp8") return Mode::kFp8;
  throw std::invalid_argument("precision mode '" + name + "' is not one of fp32, bf16, fp8");
}

const char* mode_name(Mode mode) {
  switch (mode) {
    case Mode::kFp32: return "fp32";
    case Mode::kBf16: return "bf16";
    case Mode::kFp8: return "fp8";
  }
  return "?";
}

Policy policy_for(const config::PrecisionConfig& precision) {
  Policy p;
  p.mode = parse_mode(precision.mode);
  p.moment_bytes = precision.moment_dtype == "bf16" ? 2 : 4;
  if (p.mode != Mode::kFp32) {
    p.compute_weight_bytes = 2;  // BF16 copy; FP8 tiles are quantized from it per GEMM, not stored
    p.activation_bytes = 2;
  }
  return p;
}

}  // namespace moetrain::precision
