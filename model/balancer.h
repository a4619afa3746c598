// The auxiliary-loss-free balancer (DeepSeek-V3; Wang et al., Loss-Free Balancing): after each optimizer step,
// from the loads c_i of the whole global batch (all micro-batches, all dp ranks):
//   b_i += u · sign(mean(c) − c_i)
// so overloaded experts become less likely to be selected and underloaded ones more. MaxVio = (max c − mean c) /
// mean c measures the imbalance.
#pragma once

#include <ATen/core/Tensor.h>

namespace moetrain::model {

// counts: [n_routed] int64 loads; bias: the router's FP32 bias buffer, updated in place.
void update_bias(at::Tensor& bias, const at::Tensor& counts, double rate);

double max_violation(const at::Tensor& counts);

}  // namespace moetrain::model
