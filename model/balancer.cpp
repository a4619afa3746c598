#include "model/balancer.h"

#include <ATen/ops/sign.h>

namespace moetrain::model {

void update_bias(at::Tensor& bias, const at::Tensor& counts, double rate) {
  at::NoGradGuard no_grad;
  // In double so that the sign of (mean − c_i) is exact for integer counts.
  at::Tensor c = counts.to(at::kDouble);
  bias.add_((at::sign(c.mean() - c) * rate).to(bias.scalar_type()));
}

double max_violation(const at::Tensor& counts) {
  at::Tensor c = counts.to(at::kDouble);
  double mean = c.mean().item<double>();
  return mean > 0 ? (c.max().item<double>() - mean) / mean : 0.0;
}

}  // namespace moetrain::model
