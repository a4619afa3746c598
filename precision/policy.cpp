#include "precision/policy.h"

namespace moetrain::precision {

Policy policy_for(const config::PrecisionConfig& precision) {
  Policy p;
  p.mode = precision.mode;
  p.moment_bytes = precision.moment_dtype == config::MomentDtype::kBf16 ? 2 : 4;
  if (p.mode != Mode::kFp32) {
    p.compute_weight_bytes = 2;  // budgeted as in DeepSeek-V3's recipe; gemm converts per call, nothing is stored
    p.activation_bytes = 2;
  }
  return p;
}

}  // namespace moetrain::precision
