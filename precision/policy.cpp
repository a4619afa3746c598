#include "precision/policy.h"

namespace moetrain::precision {

Policy policy_for(const config::PrecisionConfig& precision) {
  Policy p;
  p.mode = precision.mode;
  p.moment_bytes = precision.moment_dtype == config::MomentDtype::kBf16 ? 2 : 4;
  if (p.mode != Mode::kFp32) {
    p.compute_weight_bytes = 2;  // the stored GEMM copy: BF16, or E4M3 twice (w and wᵀ) in fp8 mode
    p.activation_bytes = 2;
  }
  return p;
}

}  // namespace moetrain::precision
