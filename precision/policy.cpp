#include "precision/policy.h"

namespace moetrain::precision {

Policy policy_for(const config::PrecisionConfig& precision) {
  Policy p;
  p.mode = precision.mode;
  p.moment_bytes = precision.moment_dtype == config::MomentDtype::kBf16 ? 2 : 4;
  if (p.mode != Mode::kFp32) {
    p.param_bytes = 2;
    p.master_weight_bytes = 4;
    p.compute_weight_bytes = p.mode == Mode::kFp8 ? 2 : 0;  // E4M3 twice (w and wᵀ)
    p.activation_bytes = 2;
  }
  return p;
}

}  // namespace moetrain::precision
